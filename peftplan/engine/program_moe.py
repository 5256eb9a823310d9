"""The sparse MoE MLP (arch_moe.py) as ops on the symbolic tape, following transformers 5.23.

Router: models/mixtral/modeling_mixtral.py MixtralTopKRouter.forward (`F.linear(x, weight)`, softmax of
`router_logits.float()`, topk, in-place renormalisation `router_top_value /= sum`) and
models/qwen3_moe/modeling_qwen3_moe.py Qwen3MoeTopKRouter (`softmax(..., dtype=torch.float)`, renormalised
only with norm_topk_prob, then `.to(router_logits.dtype)`).

Experts: integrations/moe.py `grouped_mm_experts_forward`, the implementation transformers picks by
default (modeling_utils.py `get_correct_experts_implementation`: "grouped_mm" unless it cannot
dispatch): the S = tokens x top_k (token, expert) pairs are sorted by expert, gathered
(`hidden_states[perm // top_k]`), run through two grouped GEMMs over all experts' fused weights
(`torch.nn.functional.grouped_mm`, NOT autocast: the input is cast to the weight's dtype, so fp32
master weights run the experts in fp32), gated (`act(gate) * up` on the two halves), weighted by the
routing scores, un-permuted (`weighted_out[inv_perm]`) and summed over top_k. What autograd keeps:
the gather and un-permute indices, each grouped GEMM's input (when its weight is trainable), the
gate/up halves and activation, and the down projection's output with the routing weights (the
scores need it for their gradient). The auxiliary load-balancing loss runs only when
`output_router_logits` is set (False in every published config and by default: the router is
trained by the LM loss alone); peftplan refuses to guess its tensors and says so.
"""

from __future__ import annotations

from ..arch_moe import MoE
from ..dtypes import FP32, INT64, DType
from .autograd import Param
from .ops import Ctx, cast, count_matmul, elementwise, linear, mul, promote
from .sim import Tensor

INT32 = DType("int32", 32)  # grouped_mm's `offs` (torch.cumsum(..., dtype=torch.int32))


def adapted_weight(ctx: Ctx, w: Param, lora: tuple[Param, Param] | None, rank: int, experts: int) -> Tensor:
    """The weight a (possibly LoRA-wrapped) MoE parameter presents to the forward (methods/moe_lora.py).

    Unwrapped: the parameter itself. Wrapped, peft tuners/lora/layer.py ParamWrapper._activate_lora:
    experts (E > 1): `_LoraFactorsProxy`, `torch.baddbmm(W, lhs, rhs, alpha=scaling)` with autocast off,
    the factors `.to(param.dtype)` (B as E x out x r, A as E x r x in) and saved by the baddbmm for each
    other's gradient; the router (E = 1): `Linear.get_delta_weight` (`B @ A * scaling`, in the adapters'
    fp32), `.to(param.dtype)`, then `W + delta` (`_LoraParameterProxy`). Either way a new tensor of the
    parameter's full size and dtype that requires grad, built once per forward (`parametrize.cached()`)."""
    tape = ctx.tape
    wt = tape.param_tensor(w)
    if lora is None:
        return wt  # a leaf parameter: `tape.drop` leaves it alone
    a, b = tape.param_tensor(lora[0]), tape.param_tensor(lora[1])
    out_f = b.numel // (rank * experts)
    in_f = a.numel // (rank * experts)
    if experts > 1:
        lhs, rhs = cast(ctx, b, w.dtype), cast(ctx, a, w.dtype)
        adapted = tape.new(w.numel, w.dtype, True, "lora_adapted_weight")
        count_matmul(2 * experts * out_f * rank * in_f, True, False)  # the baddbmm (factor grads: input-side)
        tape.record("baddbmm", [lhs, rhs], [adapted], [lhs, rhs])
        tape.drop(lhs, rhs)
        return adapted
    ba = tape.new(out_f * in_f, lora[1].dtype, True, "lora_delta")
    count_matmul(2 * out_f * rank * in_f, True, False)
    tape.record("mm", [b, a], [ba], [])  # the saved factors are the parameters themselves
    scaled = elementwise(ctx, "mul_scalar", ba, save_inputs=False)
    tape.drop(ba)
    delta = cast(ctx, scaled, w.dtype)
    tape.drop(scaled)
    adapted = tape.new(w.numel, w.dtype, True, "lora_adapted_weight")
    tape.record("add", [delta], [adapted], [])
    tape.drop(delta)
    return adapted


def _grouped_mm(ctx: Ctx, x: Tensor, w: Tensor, offs: Tensor, rows: int, in_features: int, out_features: int) -> Tensor:
    """integrations/moe.py `_grouped_mm`: `grouped_mm(input.to(weight.dtype), weight, offs=offs)`; the
    backward needs the input for the weight's gradient and the weight for the input's."""
    tape = ctx.tape
    xin = cast(ctx, x, w.dtype)
    out = tape.new(rows * out_features, w.dtype, xin.requires_grad or w.requires_grad, "grouped_mm")
    count_matmul(2 * rows * in_features * out_features, xin.requires_grad, w.requires_grad)
    tape.record("grouped_mm", [xin, w], [out], [xin if w.requires_grad else None,
                                                w if xin.requires_grad else None, offs])
    tape.drop(xin)
    return out


def _gather_bias(ctx: Ctx, bias: Param | None, ids: Tensor, rows: int, width: int) -> Tensor | None:
    """`bias[expert_ids_g]`: S x width rows of the expert bias (IndexBackward0 saves the indices)."""
    if bias is None:
        return None
    tape = ctx.tape
    out = tape.new(rows * width, bias.dtype, bias.trainable, "expert_bias_gather")
    tape.record("index", [tape.param_tensor(bias)], [out], [ids])
    return out


def _router_linear(ctx: Ctx, x: Tensor, w: Tensor, out_features: int) -> Tensor:
    """`F.linear(hidden_states, self.weight)` under autocast, for a wrapped (non-leaf) router weight."""
    tape = ctx.tape
    dt = ctx.autocast or promote(x.dtype, w.dtype)
    xc, wc = cast(ctx, x, dt), cast(ctx, w, dt)
    out = tape.new(ctx.tokens * out_features, dt, True, "linear")
    count_matmul(2 * xc.numel * out_features, xc.requires_grad, True)
    tape.record("linear", [xc, wc], [out], [xc, wc if xc.requires_grad else None])
    tape.drop(xc, wc)
    return out


def _softmax_router(ctx: Ctx, logits: Tensor, moe: MoE) -> tuple[Tensor, Tensor]:
    """Mixtral / Qwen3-MoE: softmax over all experts in fp32, top-k, optional renormalisation."""
    tape = ctx.tape
    N, E, k = ctx.tokens, moe.num_experts, moe.top_k
    x_dtype = logits.dtype
    if moe.kind == "mixtral":
        l32 = cast(ctx, logits, FP32)  # router_logits.float()
    else:
        l32 = tape.alloc.retain(logits)  # softmax(..., dtype=torch.float) converts inside the op
    probs = tape.new(N * E, FP32, l32.requires_grad, "router_softmax")
    tape.record("softmax", [l32], [probs], [probs])
    tape.drop(l32)  # the caller's `_` keeps router_logits alive until the MoE block returns (moe_forward)
    top = tape.new(N * k, FP32, probs.requires_grad, "topk_values")
    idx = tape.new(N * k, INT64, False, "topk_indices")
    tape.record("topk", [probs], [top], [idx])  # TopkBackward0 saves the indices
    tape.drop(probs)
    if moe.norm_topk:
        total = tape.new(N, FP32, top.requires_grad, "topk_sum")
        tape.record("sum", [top], [total], [])
        # in-place `/=`: DivBackward0 needs the original values for the divisor's gradient (a clone)
        original = tape.new(N * k, FP32, False, "div_original_self")
        renorm = tape.new(N * k, FP32, top.requires_grad, "topk_renorm")
        tape.record("div_", [top, total], [renorm], [original, total])
        tape.drop(original, total, top)
        top = renorm
    scores = cast(ctx, top, ctx.autocast or x_dtype) if moe.kind == "qwen3_moe" else tape.alloc.retain(top)
    tape.drop(top)
    return scores, idx


def moe_forward(ctx: Ctx, x: Tensor, moe: MoE, params: dict[str, Param],
                lora: dict[str, tuple[Param, Param]] | None = None, ranks: dict[str, int] | None = None) -> Tensor:
    """One sparse MoE MLP on the normed hidden states x (N x D); returns N x D in x's dtype.
    `lora`/`ranks`: peft ParamWrapper adapters on "gate.weight" / "experts.gate_up_proj" /
    "experts.down_proj" (methods/moe_lora.py)."""
    tape = ctx.tape
    N, E, k, D, F = ctx.tokens, moe.num_experts, moe.top_k, moe.hidden, moe.ffn
    S = N * k
    lora, ranks = lora or {}, ranks or {}
    by_name = {n.removeprefix("mlp."): p for n, p in params.items()}
    router, gate_up, down = by_name[f"{moe.router}.weight"], by_name["experts.gate_up_proj"], by_name["experts.down_proj"]
    # ---- router ----
    # The block binds the router's outputs to locals (`_, top_k_weights, top_k_index = self.gate(...)`;
    # gpt-oss: `_, router_scores, router_indices = self.router(...)`): the logits (`_`), the weights and
    # the indices stay alive until the MoE block returns, whatever the experts' code does with them.
    if moe.kind == "gpt_oss":
        from .program_gptoss import gpt_oss_router

        logits, scores, idx = gpt_oss_router(ctx, x, moe, router, by_name[f"{moe.router}.bias"])
    elif "gate.weight" in lora:
        wr = adapted_weight(ctx, router, lora["gate.weight"], ranks["gate.weight"], 1)
        logits = _router_linear(ctx, x, wr, E)
        tape.drop(wr)
    else:
        logits = linear(ctx, x, router, None, E)  # F.linear under autocast: N x E in the compute dtype
    if moe.kind != "gpt_oss":
        scores, idx = _softmax_router(ctx, logits, moe)
    # ---- experts (integrations/moe.py grouped_mm_experts_forward) ----
    # Its locals (`expert_ids_g`, `perm`, `selected_hidden_states_g`, `sample_weights_g`, `histc_input`,
    # `tokens_per_expert`, `offsets`, `selected_biases`, `inv_perm`, `weighted_out`) live until it returns;
    # `selected_weights` / `selected_biases` and `proj_out` / `weighted_out` are rebound (the old tensor
    # dies after the new one exists).
    ids_sorted = tape.new(S, INT64, False, "sort_values")
    perm = tape.new(S, INT64, False, "sort_indices")
    gather = tape.new(S, INT64, False, "perm_div_topk")
    xs = tape.new(S * D, x.dtype, x.requires_grad, "gathered_tokens")
    tape.record("index", [x], [xs], [gather])  # IndexBackward0 saves the indices
    tape.drop(gather)
    sw = tape.new(S, scores.dtype, scores.requires_grad, "sorted_scores")
    tape.record("index", [scores], [sw], [perm])
    histc_in = tape.new(S, FP32, False, "histc_input")  # expert_ids_g.float() (cpu) / .int() (cuda): 4 bytes
    per_expert = tape.new(E, FP32, False, "tokens_per_expert")
    offs = tape.new(E, INT32, False, "offsets")
    # has_bias (gpt_oss): `self.gate_up_proj_bias[expert_ids_g]`, gathered before the GEMM, added in place
    bias_gu = _gather_bias(ctx, by_name.get("experts.gate_up_proj_bias"), ids_sorted, S, 2 * F)
    w_gu = adapted_weight(ctx, gate_up, lora.get("experts.gate_up_proj"), ranks.get("experts.gate_up_proj", 0), E)
    up_out = _grouped_mm(ctx, xs, w_gu, offs, S, D, 2 * F)
    if moe.kind == "gpt_oss":
        from .program_gptoss import gpt_oss_gate

        prod = gpt_oss_gate(ctx, up_out)
    else:
        gate = tape.new(S * F, up_out.dtype, up_out.requires_grad, "chunk")
        up = tape.new(S * F, up_out.dtype, up_out.requires_grad, "chunk")
        tape.record("chunk", [up_out], [gate, up], [])
        act = elementwise(ctx, "act", gate)  # silu saves its input
        tape.drop(gate)
        prod = mul(ctx, act, up)
        tape.drop(act, up)
    tape.drop(up_out)
    w_d = adapted_weight(ctx, down, lora.get("experts.down_proj"), ranks.get("experts.down_proj", 0), E)
    tape.drop(w_gu)  # `selected_weights = self.down_proj`
    bias_d = _gather_bias(ctx, by_name.get("experts.down_proj_bias"), ids_sorted, S, D)
    tape.drop(bias_gu)  # `selected_biases = self.down_proj_bias[expert_ids_g]`
    d_out = _grouped_mm(ctx, prod, w_d, offs, S, F, D)
    tape.drop(prod)
    weighted = elementwise(ctx, "mul", d_out, sw, numel=S * D, out_dtype=promote(d_out.dtype, sw.dtype))
    tape.drop(d_out)
    inv_perm = tape.new(S, INT64, False, "inv_perm")  # torch.empty_like(perm)
    positions = tape.new(S, INT64, False, "arange")  # `inv_perm[perm] = torch.arange(...)`: a temporary
    tape.drop(positions)
    unperm = tape.new(S * D, weighted.dtype, weighted.requires_grad, "unpermuted")
    tape.record("index", [weighted], [unperm], [inv_perm])
    tape.drop(weighted)
    summed = tape.new(N * D, unperm.dtype, unperm.requires_grad, "topk_sum_out")
    tape.record("sum", [unperm], [summed], [])
    out = cast(ctx, summed, x.dtype)
    tape.drop(summed)
    # grouped_mm_experts_forward returns: its frame's locals die, in the order they were bound
    tape.drop(ids_sorted, perm, xs, sw, histc_in, per_expert, offs, w_d, bias_d, inv_perm, unperm)
    # ... then the MoE block returns (`_`, the routing weights and indices); gpt-oss's decoder layer keeps
    # the returned router scores (`hidden_states, _ = self.mlp(...)`) until its residual add, modelled
    # here as the block's end (N x k elements)
    tape.drop(logits, scores, idx)
    return out
