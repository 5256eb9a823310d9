"""Liger's fused linear cross-entropy (liger-kernel 0.8.2), modelled from its source: Triton does not run on a CPU,
so no trace checks this model; estimates that use it say "modelled from source" until a GPU record confirms it.

How the model's forward reaches it: `apply_liger_kernel_to_llama(fused_linear_cross_entropy=True)` (what
`TrainingArguments(use_liger_kernel=True)` and axolotl's LigerPlugin call) replaces `LlamaForCausalLM.forward` with
`lce_forward`, which hands the final norm's output (a view, `logits_to_keep=0`) and `lm_head.weight` to
`LigerForCausalLMLoss` (src/liger_kernel/transformers/model/loss_utils.py 67-110) and never calls the head.

Allocations, in order (src/liger_kernel/ops/fused_linear_cross_entropy.py; BT = B x T rows, H hidden, V vocabulary,
cd the autocast dtype, else the hidden dtype):
  loss_utils.py 88-89   labels padded by one ignore_index column (B x (T+1) int64), then the shifted labels
                        made contiguous (B x T int64); both alive until the loss returns
  ops 68-69             chunk = next_power_of_2(ceil(BT / ceil(V / H))) rows per chunk
  ops 72                grad_input = zeros_like(hidden): BT x H, hidden dtype
  ops 76-81             grad_weight = zeros_like(weight) when the head is trainable (accum_dtype None: its dtype)
  ops 86                loss_1d: BT fp32
  ops 92                target_mask: BT bool
  per chunk, ops 114    logits_chunk = input_chunk @ weight.t(): chunk x V in cd (autocast casts a non-cd input
                        chunk and a non-cd weight first, as temporaries); the Triton kernel (ops 162-197) writes
                        the loss and, in place, the logits' gradient; the previous chunk's logits are freed only
                        when the name is rebound, so two chunks are alive at that moment
  ops 231               grad_input[rows] = grad_logits @ weight: a chunk x H product (cd) copied into grad_input
  ops 245-257           grad_weight: `addmm(out_dtype=fp32, out=grad_weight)` in place on compute capability >= 8
                        with an fp32 grad_weight (modelled); older GPUs take `grad_weight += mm(...).float()`,
                        two V x H temporaries (not modelled: stated as an assumption)
  ops 431-435           save_for_backward(grad_input, grad_weight): alive into backward
backward, ops 292-330   `element_mul_kernel` scales grad_input / grad_weight in place; grad_input is the final norm
                        output's gradient and grad_weight the head's (no new allocation)
"""

from __future__ import annotations

from ..arch import ModelArch
from ..dtypes import BOOL, FP32, INT64
from .autograd import Node, Param, Tape
from .ops import COUNTER, Ctx, count_matmul, hand_over_weight_grad, promote
from .sim import Tensor


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def liger_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """ops/fused_linear_cross_entropy.py 68-69: rows per chunk so a logits chunk is about the size of the input."""
    inc_factor = -(-vocab // hidden)
    return _next_power_of_2(-(-rows // inc_factor))


def liger_flce(ctx: Ctx, arch: ModelArch, h: Tensor, head: Param, batch: int, seq_len: int,
               virtual_tokens: int) -> Tensor:
    """Liger's fused linear cross-entropy through `LigerForCausalLMLoss` (module docstring)."""
    from .loss_error import require_causal_lm

    require_causal_lm(arch, "Liger's fused linear cross-entropy patches causal LMs")
    tape, alloc = ctx.tape, ctx.tape.alloc
    H, V = arch.head_in_features, arch.vocab_size
    T = seq_len + virtual_tokens
    BT = batch * T
    hd, wd = h.dtype, head.dtype
    cd = ctx.autocast or hd
    head_t = tape.param_tensor(head)
    needs = h.requires_grad or head.trainable

    padded = alloc.new(batch * (T + 1), INT64, "inputs")
    shifted = alloc.new(BT, INT64, "inputs")
    grad_input = alloc.new(BT * H, hd, "saved_activations", label="liger grad_input")
    grad_weight = alloc.new(V * H, wd, "saved_activations", label="liger grad_weight") if head.trainable else None
    loss_1d = alloc.new(BT, FP32, "temporaries")
    mask = alloc.new(BT, BOOL, "temporaries")
    chunk = liger_chunk_rows(BT, H, V)
    logits = None
    for start in range(0, BT, chunk):
        n = min(chunk, BT - start)
        x_cast = alloc.new(n * H, cd, "temporaries") if hd != cd else None
        w_cast = alloc.new(V * H, cd, "temporaries") if wd != cd else None
        new_logits = alloc.new(n * V, cd, "loss_logits", label="liger logits_chunk")
        alloc.release(w_cast)
        alloc.release(x_cast)
        alloc.release(logits)  # `logits_chunk = ...` rebinds: the previous chunk dies after the new one exists
        logits = new_logits
        if h.requires_grad:
            w_cast = alloc.new(V * H, cd, "temporaries") if wd != cd else None
            prod = alloc.new(n * H, cd, "temporaries")
            alloc.release(w_cast)
            alloc.release(prod)
        if grad_weight is not None and hd != cd:
            alloc.spike(alloc_bytes(cd, n * H))  # input_chunk.to(grad_logits dtype) for the in-place addmm
    count_matmul(2 * BT * H * V, h.requires_grad, head.trainable)
    c = COUNTER[0]
    if c is not None and h.requires_grad:
        c.forward += 2 * BT * H * V  # grad_input = grad_logits @ weight, computed in the forward (ops 231)
        c.backward_input -= 2 * BT * H * V  # ... so nothing of it is left for backward
    loss = alloc.new(1, FP32, "temporaries", needs, "loss")
    for t in (logits, loss_1d, mask, padded, shifted):
        alloc.release(t)

    def backward(tp: Tape, node: Node) -> None:
        g = tp.grads.pop(id(node.outputs[0]), None)
        tp.alloc.release(g)
        if grad_weight is not None:
            hand_over_weight_grad(tp, head_t, grad_weight)
        if h.requires_grad:
            tp._grad_for(h, alias=grad_input)  # the saved grad_input is the final norm output's gradient
        for t in node.saved:
            tp.alloc.release(t)

    inputs = [h] if h.requires_grad else []
    if head.trainable:
        inputs.append(head_t)
    saved = [grad_input] + ([grad_weight] if grad_weight is not None else [])
    if needs:
        tape.nodes.append(Node("liger_fused_linear_cross_entropy", inputs, [loss], saved, custom=backward))
    else:
        for t in saved:
            alloc.release(t)
    return loss


def alloc_bytes(dtype, numel: int) -> int:  # type: ignore[no-untyped-def]
    from .sim import rounded

    return rounded(dtype.bytes_for(numel))


# ---- Liger's layer kernels (liger-kernel 0.8.2, src/liger_kernel/), modelled from source -----------------------------
#
# `apply_liger_kernel_to_<model>(rope=True, rms_norm=True, swiglu=True, ...)` (transformers/monkey_patch.py 221-227
# for llama: the defaults `TrainingArguments(use_liger_kernel=True)` passes) swaps three HF ops for Triton kernels:
#
# RMSNorm  ops/rms_norm.py 436-510 `rms_norm_forward`: Y = empty(rows x H, X.dtype), RSTD = empty(rows, fp32 in the
#          llama / gemma casting modes); 657 `ctx.save_for_backward(X, W, RSTD)`: the input itself (a view, no fp32
#          copy) and one fp32 per row. Backward 513-609: `_dW = empty(sm_count x H, fp32)`, dX written into dY
#          (`in_place=True`, monkey_patch.py 68; gemma families pass `in_place=False`, 1024-1297: dX = zeros_like(dY)),
#          `dW = _dW.sum(0).to(W.dtype)`. The HF op (program.py `_rmsnorm`) saves an fp32 copy of the input.
# SwiGLU   ops/swiglu.py 149-188 `swiglu_forward`: c = empty_like(a); 262 `ctx.save_for_backward(a, b)` (gate and up
#          projections); backward 191-227 writes da and db into a's and b's storage (the kernel stores into a_ptr,
#          b_ptr): no new tensor. GeGLU (ops/geglu.py 133-146, the gemma families): the same. The HF ops save gate,
#          act(gate) and up and allocate both gradients.
# RoPE     ops/rope.py 115-158 `rope_forward`: q, k transposed back to their (B, T, heads, hd) storage, which is
#          contiguous, so `.contiguous()` is a no-op and the kernel rotates them in place; 226 saves cos, sin only;
#          backward 161-201 rotates dq, dk in place (modelled contiguous: the attention backward returns gradients
#          laid out like q and k). No allocation at all; the HF op allocates four q-sized temporaries.
LIGER_LAYER_TYPES = frozenset({  # model types with an `apply_liger_kernel_to_*` (monkey_patch.py MODEL_TYPE_TO_APPLY_LIGER_FN)
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "olmo2", "phi3", "smollm3", "mixtral",
    "qwen3_moe", "gpt_oss",
})
LIGER_DW_SM_COUNT = 132  # `_dW` rows = the GPU's SM count (ops/rms_norm.py 521); 132 = H100 SXM, assumed (2 MiB at H=4096)
GEMMA_RMS_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text"})  # casting_mode="gemma", in_place=False


def layer_kernels(training, arch: ModelArch) -> frozenset[str]:  # type: ignore[no-untyped-def]
    """The layer kernels the trainer switches on for this model (`TrainerSpec.kernels` / `option_kernels`), as
    engine ops read them from `Ctx.kernels`: "rms_norm", "glu", "rope" (in place) or "rope_copy" (out of place)."""
    from ..trainers import get_trainer

    spec = get_trainer(training.trainer)
    names = set(spec.kernels_for(arch))
    for opt in training.trainer_options:
        names.update(spec.option_kernels.get(opt, ()))
    if not names:
        return frozenset()
    if spec.name != "unsloth" and arch.model_type not in LIGER_LAYER_TYPES:
        return frozenset()  # Liger has no patch for this model type: the HF ops run (transformers warns)
    return frozenset(names)


def rms_norm(ctx: Ctx, h: Tensor, w: Param, rows: int | None = None, in_place: bool = True) -> Tensor:
    """LigerRMSNormFunction (above): saves the input, the weight and one fp32 rstd per row; output in h's dtype."""
    tape = ctx.tape
    rows = ctx.tokens if rows is None else rows
    wt = tape.param_tensor(w)
    rg = h.requires_grad or w.trainable or w.bias_trainable
    out = tape.new(h.numel, h.dtype, rg, "liger_rms_norm")
    rstd = tape.new(rows, FP32, False, "rstd")
    width = h.numel // rows
    scratch = alloc_bytes(FP32, LIGER_DW_SM_COUNT * width) + alloc_bytes(FP32, width) if w.trainable else 0
    tape.record("liger_rms_norm" if in_place else "liger_rms_norm_copy", [h, wt], [out], [h, rstd],
                backward_scratch=scratch)
    tape.drop(rstd)
    return out


def glu(ctx: Ctx, gate: Tensor, up: Tensor) -> Tensor:
    """LigerSiLUMulFunction / LigerGELUMulFunction (above): act(gate) * up, saving gate and up; the backward writes
    their gradients into their own storage. The caller drops gate and up."""
    tape = ctx.tape
    out = tape.new(gate.numel, promote(gate.dtype, up.dtype), gate.requires_grad or up.requires_grad, "liger_glu")
    tape.record("liger_glu", [gate, up], [out], [gate, up])
    return out


def rope(ctx: Ctx, x: Tensor, copy: bool = False) -> Tensor:
    """LigerRopeFunction (above): q / k rotated in place (the same storage, no node: its backward rotates the
    gradient in place too). `copy`: Unsloth's Fast_RoPE_Embedding_QK (unsloth kernels/rope_embedding.py 423-459),
    whose transposed (non-contiguous) q / k get `torch.empty_like` outputs and whose backward allocates dQ, dK."""
    tape = ctx.tape
    c = COUNTER[0]
    if copy:
        out = tape.new(x.numel, x.dtype, x.requires_grad, "rope")
        tape.record("unsloth_rope", [x], [out], [])
        return out
    if c is not None:  # one read and one write of q / k, forward and backward
        nbytes = 2 * x.numel * x.dtype.bits // 8
        c.kernels.append(("mem", "forward", nbytes))
        if x.requires_grad:
            c.kernels.append(("mem", "backward", nbytes))
    return tape.alloc.retain(x)


def kernel_assumptions(arch: ModelArch, training) -> list[str]:  # type: ignore[no-untyped-def]
    """One line on the layer kernels modelled for this run (printed with the estimate)."""
    kernels = layer_kernels(training, arch)
    from ..trainers import get_trainer

    asked = any(get_trainer(training.trainer).option_kernels.get(o) for o in training.trainer_options)
    if not kernels:
        return [f"Liger layer kernels: no patch for model type {arch.model_type!r}, the HF ops run"] if asked else []
    who = "Unsloth" if training.trainer == "unsloth" else "Liger (liger-kernel 0.8.2)"
    parts = {"rms_norm": "RMSNorm (saves its input + fp32 rstd)", "glu": "SwiGLU/GeGLU (saves gate and up, "
             "gradients written into them)", "rope": "RoPE (in place)", "rope_copy": "RoPE (out of place)"}
    line = (f"{who} layer kernels modelled from source, not yet confirmed by a GPU record: "
            + ", ".join(parts[k] for k in ("rms_norm", "glu", "rope", "rope_copy") if k in kernels))
    if "glu" in kernels and arch.model_type == "phi3":
        line += "; phi3's fused gate_up MLP keeps the HF activation (its chunked halves are not modelled)"
    return [line]
