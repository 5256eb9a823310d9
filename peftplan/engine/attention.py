"""Attention as transformers 5.23 runs it: SDPA (integrations/sdpa_attention.py: the flash / efficient /
math kernels), eager (eager_attention_forward: scores, softmax, dropout, repeat_kv copies), RoPE
(apply_rotary_pos_emb) and Gemma 2's logit soft-capping."""

from __future__ import annotations

from ..arch import ModelArch
from ..dtypes import FP32
from ..training import Training
from . import ops
from .ops import Ctx, add, cast, elementwise
from .sim import Tensor
from .dropout import _dropout, attention_dropout


def _attention(ctx: Ctx, arch: ModelArch, training: Training, q: Tensor, k: Tensor, v: Tensor,
               kv_tokens: int, causal: bool, masked: bool = False, bias: Tensor | None = None,
               hold: Tensor | None = None) -> Tensor:
    """The attention core on projected q/k/v; returns the output (N x H*hd).

    SDPA (flash / memory-efficient kernels) saves q, k, v, the output and a logsumexp
    (B x H x T, fp32). Eager attention (eager_attention_forward) materialises repeat_kv copies of
    k and v, the scores (B x H x T x S) in the compute dtype, the fp32 softmax and its cast back.
    """
    tape = ctx.tape
    B = training.micro_batch
    H, K, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
    T = ctx.tokens // B
    dt = ctx.autocast or q.dtype
    qc = cast(ctx, q, dt)
    kc = cast(ctx, k, dt)
    vc = cast(ctx, v, dt)
    rg = qc.requires_grad or kc.requires_grad or vc.requires_grad
    bmm = 2 * B * H * T * kv_tokens * hd  # one of QK^T / PV (torch.utils.flop_counter bmm_flop)
    if training.attention == "eager":
        groups = H // K
        kr, vr = repeat_kv(ctx, kc, vc, groups)
        scores = tape.new(B * H * T * kv_tokens, dt, rg, "scores")
        tape.record("matmul_qk", [qc, kr], [scores], [kr if qc.requires_grad else None, qc if kr.requires_grad else None])
        if arch.attn_logit_softcap is not None:
            scores = _softcap(ctx, scores)
        # eager matmuls: each backward half runs only for an operand that requires grad
        c = ops.COUNTER[0]
        if c is not None:
            c.forward += 2 * bmm
            c.backward_input += bmm * (int(qc.requires_grad) + int(kr.requires_grad)
                                       + int(qc.requires_grad or kr.requires_grad) + int(vr.requires_grad))
            # per (batch, head): scores = q (T x hd) @ k^T (hd x S); out = probs (T x S) @ v (S x hd)
            ops.log_matmul(T, kv_tokens, hd, dt, qc.requires_grad, kr.requires_grad, B * H)
            ops.log_matmul(T, hd, kv_tokens, dt, qc.requires_grad or kr.requires_grad, vr.requires_grad, B * H)
        masked = tape.new(scores.numel, dt, rg, "masked_scores")
        tape.record("add_mask", [scores], [masked], [])
        tape.drop(scores)
        # llama-like, opt and bloom call softmax(..., dtype=torch.float32); gpt2, bert/roberta and t5 call
        # softmax(attn_weights) (modeling_*.py eager_attention_forward): fp32 only under autocast, whose
        # fp32 op list holds softmax
        upcast = ctx.autocast is not None or arch.family not in ("gpt2", "bert", "t5")
        probs32 = tape.new(masked.numel, FP32 if upcast else dt, rg, "softmax_fp32")
        tape.record("softmax", [masked], [probs32], [probs32])
        tape.drop(masked)
        probs = cast(ctx, probs32, dt)
        tape.drop(probs32)
        dropped = _dropout(ctx, probs, attention_dropout(arch))  # saves its bool mask
        tape.drop(probs)
        probs = dropped
        if hold is not None and groups == 1:
            # `hold`: v is a strided view of the fused qkv output (modeling_phi3.py). Eager
            # `torch.matmul(attn_weights, value_states)` reshapes it for bmm (aten/src/ATen/native/LinearAlgebra.cpp
            # `_matmul_impl`: expand + reshape of a non-contiguous view, a copy), and bmm saves that copy, not the
            # view: qkv is not held (was +1.1..+1.6% on phi3-mini prompt tuning, eager, 3 layers; fuzz seed 20261202)
            vcopy = tape.new(vc.numel, dt, vc.requires_grad, "matmul_value_copy")
            tape.record("clone", [vr], [vcopy], [])
            tape.drop(vr)
            vr = vcopy
        out = tape.new(qc.numel, dt, rg or vr.requires_grad, "attn_out")
        # (eager: a repeat_kv or matmul copy of the value is saved, never the qkv view `hold` stands for)
        tape.record("matmul_pv", [probs, vr], [out], [vr if probs.requires_grad else None, probs if vr.requires_grad else None])
        tape.drop(probs, kr, vr, qc, kc, vc)
        return out
    mask = None
    if masked:
        # With an attention mask (prefix tuning: past key/values make kv_len != q_len, so transformers
        # passes a mask instead of is_causal): sdpa_attention.py `use_gqa_in_sdpa` is False when a mask
        # is given, so GQA keys/values are expanded by `repeat_kv` (new tensors, saved by SDPA in place
        # of the un-repeated ones); torch's SDPA converts the boolean mask into a float mask of the
        # query dtype (aten/src/ATen/native/transformers/attention.cpp `convert_boolean_attn_mask`,
        # a `where` per call), which the memory-efficient kernel saves for backward.
        groups = H // K
        if groups > 1:
            kr = tape.new(kc.numel * groups, dt, kc.requires_grad, "repeat_kv")
            vr = tape.new(vc.numel * groups, dt, vc.requires_grad, "repeat_kv")
            tape.record("repeat_kv", [kc], [kr], [])
            tape.record("repeat_kv", [vc], [vr], [])
            tape.drop(kc, vc)
            kc, vc = kr, vr
        mask = tape.new(B * T * kv_tokens, dt, False, "sdpa_float_mask")
    lse = tape.new(B * H * T, FP32, False, "logsumexp")
    out = tape.new(qc.numel, dt, rg, "sdpa_out")
    tape.record("sdpa", [qc, kc, vc], [out], [qc, kc, vc, out, lse, mask, bias, hold],
                backward_scratch=0)
    tape.drop(lse, qc, kc, vc, mask)
    c = ops.COUNTER[0]
    if c is not None:
        # torch.utils.flop_counter sdpa_flop_count: QK^T + PV; sdpa_backward_flop_count: the scores
        # recomputed, grad of scores, grad V, grad Q, grad K (5 bmms); the kernel computes all of them
        is_causal = causal and not masked and bias is None
        c.forward += 2 * bmm
        if is_causal:
            c.causal_forward += 2 * bmm
        # the fused kernel reads q, k, v (and the mask), writes out and the logsumexp; its backward
        # reads those and dout, writes dq, dk, dv; a causal kernel skips the masked half of the FLOPs
        io = sum(ops.tensor_bytes(t) for t in (qc, kc, vc, out, lse)) + (ops.tensor_bytes(mask) if mask is not None else 0)
        work = bmm // 2 if is_causal else bmm
        c.kernels.append(("attn", "forward", 2 * work, io, dt.name))
        if rg:
            c.kernels.append(("attn", "backward", 5 * work, 2 * io, dt.name))
        if rg:
            c.backward_input += 5 * bmm
            if is_causal:
                c.causal_backward += 5 * bmm
    return out


def _rope(ctx: Ctx, x: Tensor, cos: Tensor) -> Tensor:
    """apply_rotary_pos_emb: (x * cos) + (rotate_half(x) * sin); saves only cos/sin (no grad)."""
    if "rope" in ctx.kernels or "rope_copy" in ctx.kernels:  # a trainer's fused kernel (engine/liger.py)
        from .liger import rope
        return rope(ctx, x, copy="rope_copy" in ctx.kernels)
    tape = ctx.tape
    dt = x.dtype if x.dtype.bits >= cos.dtype.bits else cos.dtype
    a = tape.new(x.numel, dt, x.requires_grad, "x_cos")
    tape.record("mul", [x], [a], [])
    half = tape.new(x.numel // 2, x.dtype, x.requires_grad, "neg")
    rot = tape.new(x.numel, x.dtype, x.requires_grad, "cat")
    # rotate_half's backward (CatBackward0 -> NegBackward0/SliceBackward0) carries the gradient of
    # `rot` back into x's; without this node the gradient of `rot` was allocated and never consumed
    tape.record("rotate_half", [x], [rot], [])
    tape.drop(half)
    b = tape.new(x.numel, dt, x.requires_grad, "rot_sin")
    tape.record("mul", [rot], [b], [])
    tape.drop(rot)
    out = add(ctx, a, b)
    tape.drop(a, b)
    return out


def _softcap(ctx: Ctx, x: Tensor) -> Tensor:
    """Gemma 2 soft-capping, `x / cap; tanh; * cap` (modeling_gemma2.py): three new tensors of x's size,
    each freeing its input; tanh saves its output for backward. Consumes `x`."""
    div = elementwise(ctx, "div_scalar", x, save_inputs=False)
    ctx.tape.drop(x)
    t = elementwise(ctx, "tanh", div, save_inputs=False, save_output=True)
    ctx.tape.drop(div)
    out = elementwise(ctx, "mul_scalar", t, save_inputs=False)
    ctx.tape.drop(t)
    return out


def repeat_kv(ctx: Ctx, k: Tensor, v: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Eager attention's `repeat_kv` for grouped-query attention (expand + reshape: a copy of k and v, `groups`
    times wider); the caller still holds its own k and v. Each copy is a graph node whose backward sums the
    copies' gradients back into k's / v's: unrecorded, those gradients stayed alive to the end of backward
    (+2.45% on llama3.2-1b full bf16 eager + checkpointing, whose peak is there); the nodes also give the
    roofline its memory-bound copy kernels."""
    tape = ctx.tape
    if groups <= 1:
        return tape.alloc.retain(k), tape.alloc.retain(v)
    kr = tape.new(k.numel * groups, k.dtype, k.requires_grad, "repeat_kv")
    vr = tape.new(v.numel * groups, v.dtype, v.requires_grad, "repeat_kv")
    tape.record("repeat_kv", [k], [kr], [])
    tape.record("repeat_kv", [v], [vr], [])
    return kr, vr
