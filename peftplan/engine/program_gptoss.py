"""gpt-oss specifics (arch_moe.py gpt_oss) as ops on the symbolic tape, following transformers 5.23
models/gpt_oss/modeling_gpt_oss.py.

- Attention: GptOssPreTrainedModel has `_supports_sdpa = False`, so transformers runs
  `eager_attention_forward` (the flash kernels that know sinks come from the kernels hub, CUDA only):
  scores, the additive mask, `torch.cat([scores, sinks])` with the per-head sink logit, a max
  subtraction, softmax, the sink column sliced off (`probs[..., :-1]`, a view), and
  `matmul(attn_weights, value_states)` on that view (strided bmm, no copy).
- Router (GptOssTopKRouter): `F.linear(x, weight, bias)`, topk on the logits, softmax over the k values.
- Gate (GptOssExperts._apply_gate): interleaved halves `gate_up[..., ::2]` / `[..., 1::2]`, both clamped
  (at `swiglu_limit`), `glu = gate * sigmoid(gate * alpha)`, `(up + 1) * glu`.
"""

from __future__ import annotations

from ..arch import ModelArch
from ..arch_moe import MoE
from ..dtypes import INT64
from ..training import Training
from . import ops
from .autograd import Param
from .attention import repeat_kv
from .ops import Ctx, cast, elementwise, linear, mul, promote
from .sim import Tensor


def gpt_oss_router(ctx: Ctx, x: Tensor, moe: MoE, weight: Param, bias: Param) -> tuple[Tensor, Tensor, Tensor]:
    """(router logits N x E, routing scores N x k, expert indices N x k); the caller drops them."""
    tape = ctx.tape
    N, E, k = ctx.tokens, moe.num_experts, moe.top_k
    logits = linear(ctx, x, weight, bias, E)
    top = tape.new(N * k, logits.dtype, logits.requires_grad, "topk_values")
    idx = tape.new(N * k, INT64, False, "topk_indices")
    tape.record("topk", [logits], [top], [idx])
    scores = tape.new(N * k, top.dtype, top.requires_grad, "router_softmax")
    tape.record("softmax", [top], [scores], [scores])
    tape.drop(top)
    return logits, scores, idx


def gpt_oss_gate(ctx: Ctx, gate_up: Tensor) -> Tensor:
    """GptOssExperts._apply_gate on the S x 2F grouped GEMM output (not consumed)."""
    tape = ctx.tape
    half = gate_up.numel // 2
    # clamp saves its input: the strided views keep the whole gate_up storage alive
    gate = tape.new(half, gate_up.dtype, gate_up.requires_grad, "clamp")
    tape.record("clamp", [gate_up], [gate], [gate_up])
    up = tape.new(half, gate_up.dtype, gate_up.requires_grad, "clamp")
    tape.record("clamp", [gate_up], [up], [gate_up])
    scaled = elementwise(ctx, "mul_scalar", gate, save_inputs=False)
    sig = elementwise(ctx, "sigmoid", scaled, save_inputs=False, save_output=True)
    tape.drop(scaled)
    glu = mul(ctx, gate, sig)
    tape.drop(gate, sig)
    up1 = elementwise(ctx, "add_scalar", up, save_inputs=False)
    tape.drop(up)
    out = mul(ctx, up1, glu)
    tape.drop(up1, glu)
    return out


def sink_attention(ctx: Ctx, arch: ModelArch, training: Training, q: Tensor, k: Tensor, v: Tensor,
                   kv_tokens: int, sinks: Param) -> Tensor:
    """modeling_gpt_oss.py `eager_attention_forward` on projected q/k/v (N x H*hd etc.); returns N x H*hd."""
    tape = ctx.tape
    B = training.micro_batch
    H, K, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
    T = ctx.tokens // B
    S = kv_tokens
    dt = ctx.autocast or q.dtype
    qc, kc, vc = cast(ctx, q, dt), cast(ctx, k, dt), cast(ctx, v, dt)
    rg = qc.requires_grad or kc.requires_grad or vc.requires_grad
    kr, vr = repeat_kv(ctx, kc, vc, H // K)  # attention.py: copies recorded as graph nodes
    tape.drop(kc, vc)
    n_scores = B * H * T * S
    bmm = 2 * B * H * T * S * hd
    scores = tape.new(n_scores, dt, rg, "scores")
    tape.record("matmul_qk", [qc, kr], [scores], [kr if qc.requires_grad else None, qc if kr.requires_grad else None])
    c = ops.COUNTER[0]
    if c is not None:
        c.forward += 2 * bmm
        c.backward_input += bmm * (int(qc.requires_grad) + int(kr.requires_grad)
                                   + int(qc.requires_grad or kr.requires_grad) + int(vr.requires_grad))
    scaled = elementwise(ctx, "mul_scalar", scores, save_inputs=False)
    tape.drop(scores)
    masked = tape.new(n_scores, dt, rg, "masked_scores")
    tape.record("add_mask", [scaled], [masked], [])
    tape.drop(scaled)
    sink = tape.param_tensor(sinks)
    cdt = promote(dt, sinks.dtype)  # torch.cat promotes to the wider dtype
    combined = tape.new(B * H * T * (S + 1), cdt, rg or sinks.trainable, "cat_sinks")
    tape.record("cat", [masked, sink], [combined], [])
    tape.drop(masked)
    mx = tape.new(B * H * T, cdt, combined.requires_grad, "max_values")
    mx_idx = tape.new(B * H * T, INT64, False, "max_indices")
    tape.record("max", [combined], [mx], [mx_idx])
    tape.drop(mx_idx)
    shifted = tape.new(combined.numel, cdt, combined.requires_grad, "sub_max")
    tape.record("sub", [combined, mx], [shifted], [])
    tape.drop(combined, mx)
    probs = tape.new(shifted.numel, cdt, shifted.requires_grad, "softmax")
    tape.record("softmax", [shifted], [probs], [probs])
    tape.drop(shifted)
    # probs[..., :-1].to(value dtype): a copy when the dtypes differ (fp32 sinks); otherwise the slice is a
    # view of probs (its batch dims merge, so matmul's bmm reads it strided, no copy) and shares its storage
    if cdt != dt:
        weights = tape.new(n_scores, dt, probs.requires_grad, "attn_weights")
        tape.record("to", [probs], [weights], [])
        tape.drop(probs)
    else:
        weights = probs
    out = tape.new(qc.numel, dt, rg, "attn_out")
    tape.record("matmul_pv", [weights, vr], [out], [vr if weights.requires_grad else None,
                                                     weights if vr.requires_grad else None])
    tape.drop(weights, kr, vr, qc)
    return out

