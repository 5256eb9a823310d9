"""Unsloth's fused LoRA autograd Functions (unsloth 2026.10.9 kernels/fast_lora.py, kernels/utils.py), modelled from
source: Triton and Unsloth's patched forward do not run on the CPU tracer, so no trace checks this model.

Where they run (models/llama.py 5234-5436 `FastLlamaModel.patch_peft_model`): llama / mistral / qwen2 / qwen3 (5252-
5272; the engine's UNSLOTH_KERNEL_TYPES), `bias == "none"` and a non-fp32 base (5326-5338); per layer, LoRA_MLP when
gate, up and down all carry an adapter and no base bias and no DoRA (5343-5372), LoRA_QKV when q, k and v all do
(5381-5406: qwen2's q/k/v biases keep peft's ops), LoRA_W on o (5408-5424). At run time (fast_lora.py 604-648,
974-1016, 1115-1129) `_lora_dropout_and_bias` (220-275) sends an autocast dtype other than the hidden states' back
to peft. lora_dropout > 0 runs inside the kernels too (FUSED_LORA_DROPOUT, 86) through a dropout route with saved
masks: not modelled, peft's ops are (said in the assumptions); so are FSDP and ZeRO-3 (the engine's per-block hooks
are not wired to these nodes) and int8 bases.

Plain route (dropout 0, no bias; X in the hidden dtype `cd`, adapters stored fp32 and cast with `.to(cd)`):
  matmul_lora (utils.py 1855-1900): W = fast_dequantize(W, use_global_buffer=True): the 4-bit weight decoded into
    one persistent scratch buffer (`_scratch("weight")`, 634-657: sized to the largest weight, kept for the run;
    the Triton NF4 path, 674-690 / 915-1011, needs no absmax scratch), a bf16 base is used as is; out = X @ W.t()
    (a new T x out); XA = X @ A.to(cd) (T x r), out.addmm_(XA, B.to(cd)): the A / B copies and XA die on return.
  LoRA_QKV.forward (fast_lora.py 780-859): Q, K, V (three matmul_lora); save_for_backward(X, QA, QB, KA, KB, VA,
    VB) (845-854): the layer input only (the adapters are leaves). backward (863-971): six A / B casts, six
    `empty_like` gradients (cd), q_dB / k_dB / v_dB = dY @ B (T x r each, alive to the end), per projection an
    r x T temporary `A.t() @ X.t()` (916-925); fast_dequantize(QW) (934, no global buffer: a fresh weight-sized
    tensor for 4-bit) then `matmul(dQ, QW.t(), out=X)` (935): dX is written into X's own storage (`inplace`:
    Unsloth's RMSNorm saves its input, not this output, rms_layernorm.py 925 / 976), K and V the same (939-947).
  LoRA_W.forward (1049-1076): XW; saves A, B, X (1073). backward (1080-1112): y_dB (T x r), the r x T temporary,
    a fresh dequantized W (1107) and dX = dY @ W.t() (1108): a new tensor (no out=).
  LoRA_MLP.forward (387-454): e, g (two matmul_lora), h = swiglu_fg_kernel(e, g) (swiglu.py 46-61: a new T x I),
    i = matmul_lora(h, down); saves X, e, g (448): h dies on return and is recomputed in backward. backward
    (458-598): six A / B casts; DW = matmul_lora(dY, downW.t(), ...) (507-515, the global buffer again): a new
    T x I; swiglu_DWf_DW_dfg_kernel (swiglu.py 119-135) writes h, df, de into DW, e, g (no new tensor); six
    gradients; the r x T and T x r temporaries of 535-554, up_dB / gate_dB (538-539, to the end); fresh up and
    gate weights for 4-bit (563, 569), dX written into X (565).
  The adapters' gradients come back in cd and autograd casts them to the fp32 parameters' dtype; the copies made
  in cd are freed after (a few r x in tensors, transiently counted twice when the adapters are already cd).
peft's ops (program.py `_lora`) save per adapter a cd copy of the layer input and its T x r product, and allocate
a new input gradient per projection; these Functions save the input once per group and write dX into it.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..dtypes import FP32, DType
from . import ops
from .autograd import Node, Param, Tape
from .ops import COUNTER, Ctx, count_matmul
from .sim import Allocator, Tensor, rounded

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "mlp": ("gate", "up", "down")}  # models/llama.py 5343-5424
FUSED_SHARDS = frozenset({"none", "ddp", "zero1", "zero2"})  # whole weights in the block's forward (see above)
_SCRATCH: "weakref.WeakKeyDictionary[Allocator, Tensor]" = weakref.WeakKeyDictionary()


def group_reason(tuned: list[Any], names: tuple[str, ...], training: Any) -> str | None:
    """Why Unsloth leaves this projection group (TunedLinears by role) to peft's forward, or None: fused."""
    by_role = {t.linear.role: t for t in tuned}
    lins = [by_role.get(n) for n in names]
    if any(t is None or not t.lora_rank for t in lins):
        return "not every projection of the group has an adapter (models/llama.py 5355-5408)"
    if any(t.linear.bias for t in lins):
        return "a base bias (models/llama.py 5358, 5385, 5411)"
    if any(t.dora for t in lins):
        return "DoRA (models/llama.py 5361, 5388)"
    if any(t.lora_dropout for t in lins):
        return "lora_dropout > 0 (Unsloth fuses it with saved masks, fast_lora.py 278-300: not modelled)"
    if any(t.ia3 or t.weight_trainable or t.lora_forward_dtype for t in lins):
        return "a trainable or wrapped base"
    if any(t.quant is not None and t.quant.kind == "int8" for t in lins):
        return "an 8-bit base (not modelled)"
    if any(t.quant is None and t.weight_dtype == FP32 for t in lins):
        return "a float32 base (models/llama.py 5324-5326)"
    if training.shard not in FUSED_SHARDS:
        return f"--shard {training.shard} (not modelled)"
    return None


def _usable(ctx: Ctx, x: Tensor, lps: list[Any]) -> bool:
    tape = ctx.tape
    if tape.stop_after is not None or (tape.ckpt_group is not None and not tape.ckpt_group.reentrant):
        return False  # non-reentrant recompute: its holders expect the recorded nodes (Unsloth is reentrant)
    if x.dtype == FP32 or (ctx.autocast is not None and ctx.autocast != x.dtype):
        return False  # fast_lora.py 171-185 `_autocast_dtype_mismatch`: peft's forward
    return all(lp.lora_a is not None and lp.lora_b is not None for lp in lps)


def _take(ctx: Ctx, training: Any, x: Tensor, lps: dict[str, Any], group: str) -> list[Any] | None:
    names = GROUPS[group]
    if any(n not in lps for n in names):
        return None
    chosen = [lps[n] for n in names]
    if group_reason([lp.tuned for lp in chosen], names, training) is not None or not _usable(ctx, x, chosen):
        return None
    return chosen


def _nb(numel: int, dtype: DType) -> int:
    return rounded(dtype.bytes_for(numel))


def _four_bit(lp: Any) -> bool:
    return lp.tuned.quant is not None and lp.tuned.quant.kind != "int8"


def _ensure_scratch(alloc: Allocator, lps: list[Any], cd: DType) -> None:
    """utils.py 649-657 `_scratch("weight")`: one buffer for the run, sized to the largest decoded weight (NF4 only:
    another 4-bit type goes through bnb's dequantize_4bit, a fresh tensor, 930-932). Allocated at first use."""
    nf4 = [lp.tuned.linear.weight_numel for lp in lps if _four_bit(lp) and lp.tuned.quant.kind == "nf4"]
    if nf4 and alloc not in _SCRATCH:  # sized to this block's largest weight: every block has the same shapes
        _SCRATCH[alloc] = alloc.new(max(nf4), cd, "temporaries", label="unsloth dequant scratch")


def _decode(alloc: Allocator, lp: Any, cd: DType, scratch: bool) -> Tensor | None:
    """fast_dequantize: nothing for a 16-bit base or a decode into the global scratch (`scratch`, NF4); else a
    fresh weight-sized tensor (utils.py 1006-1011 `dequantize_nf4(out=None)`, 930-932 bnb for FP4)."""
    if not _four_bit(lp) or (scratch and lp.tuned.quant.kind == "nf4"):
        return None
    return alloc.new(lp.tuned.linear.weight_numel, cd, "temporaries", label="unsloth dequantized W")


def _dequant_traffic(lp: Any, cd: DType) -> int:
    """Bytes a 4-bit decode moves (as program.py `_quantized_base`): packed weight, absmax, the decoded weight."""
    q, lin = lp.tuned.quant, lp.tuned.linear
    absmax = -(-lin.weight_numel // q.blocksize) * (1 if q.double_quant else 4)
    return lin.weight_numel // 2 + absmax + cd.bytes_for(lin.weight_numel)


def _matmul_lora(ctx: Ctx, x: Tensor, lp: Any, cd: DType) -> Tensor:
    """utils.py 1855-1900 `matmul_lora` (forward), with the FLOPs and kernels of the product and its backward."""
    tape, alloc = ctx.tape, ctx.tape.alloc
    lin, r = lp.tuned.linear, lp.tuned.lora_rank
    T = ctx.tokens
    fin, fout = lin.in_features, lin.out_features
    rg = x.requires_grad or lp.lora_a.trainable
    w = _decode(alloc, lp, cd, scratch=True)
    out = tape.new(T * fout, cd, rg, "unsloth matmul_lora")
    alloc.release(w)
    ad = lp.lora_a.dtype
    a_c = alloc.new(r * fin, cd, "temporaries") if ad != cd else None  # A.to(dtype)
    xa = alloc.new(T * r, cd, "temporaries", label="XA")
    alloc.release(a_c)
    b_c = alloc.new(fout * r, cd, "temporaries") if lp.lora_b.dtype != cd else None  # B.to(dtype) in addmm_
    alloc.release(b_c)
    alloc.release(xa)
    trainable = lp.lora_a.trainable
    count_matmul(2 * T * fin * fout, True, False)  # dX = dY @ W is always computed (fast_lora.py 565, 935, 1108)
    ops.log_matmul(T, fout, fin, cd, True, False)
    count_matmul(2 * T * fin * r, True, trainable)
    ops.log_matmul(T, r, fin, cd, True, trainable)
    count_matmul(2 * T * r * fout, True, trainable)
    ops.log_matmul(T, fout, r, cd, True, trainable)
    c = COUNTER[0]
    if c is not None and trainable:  # d_B's `A.t() @ X.t()` recomputes XA in backward (fast_lora.py 549, 917, 1103)
        c.backward_weight += 2 * T * fin * r
        c.kernels.append(("mm", "backward", r, T, fin, cd.name, 1))
    if _four_bit(lp):
        ops.log_kernel("dequant", "forward", _dequant_traffic(lp, cd))
        ops.log_kernel("dequant", "backward", _dequant_traffic(lp, cd))
    return out


def _adapter_inputs(tape: Tape, lps: list[Any]) -> list[Tensor]:
    return [tape.param_tensor(p) for lp in lps for p in (lp.lora_a, lp.lora_b) if p.trainable]


def _node(ctx: Ctx, name: str, x: Tensor, lps: list[Any], outputs: list[Tensor], owned: list[Tensor],
          backward: Any) -> None:
    """Record the Function's node (saving x and the forward's own `owned` tensors) like Tape.record: none under a
    reentrant checkpoint's no_grad forward, where the Function keeps nothing."""
    tape = ctx.tape
    inputs = ([x] if x.requires_grad else []) + _adapter_inputs(tape, lps)
    if tape.ckpt_group is None and inputs:
        kept = [tape.save(t) for t in (x, *owned)]
        tape.nodes.append(Node(name, inputs, outputs, kept, custom=backward, block=tape.block))
    tape.drop(*owned)


def _casts(alloc: Allocator, lps: list[Any], cd: DType) -> list[Tensor]:
    """`A.to(dtype), B.to(dtype)` at the top of each backward (fast_lora.py 483-490, 886-893, 1091)."""
    return [alloc.new(p.numel, cd, "temporaries") for lp in lps for p in (lp.lora_a, lp.lora_b) if p.dtype != cd]


def _empties(alloc: Allocator, lps: list[Any], cd: DType) -> list[tuple[Param, Tensor]]:
    """`torch.empty_like(A)` per adapter weight, in the cast dtype (527-532, 898-903, 1095-1096)."""
    return [(p, alloc.new(p.numel, cd, "temporaries", label="unsloth d_AB")) for lp in lps for p in
            (lp.lora_a, lp.lora_b)]


def _finish(tp: Tape, node: Node, x: Tensor, dx: Tensor | None, locals_: list[Tensor],
            grads: list[tuple[Param, Tensor]]) -> None:
    """The Function returns: its locals die, autograd casts the adapter gradients to the parameters' dtype and
    accumulates them, the saved tensors and the output gradients are freed."""
    alloc = tp.alloc
    for t in locals_:
        alloc.release(t)
    for p, g in grads:
        if p.trainable:
            tp._grad_for(tp.param_tensor(p))
        alloc.release(g)
    if dx is not None:
        if x.requires_grad:
            alloc.recategorize(dx, "temporaries")
            tp._grad_for(x, alias=dx)
        alloc.release(dx)
    for t in node.saved:
        alloc.release(t)
    for out in node.outputs:
        alloc.release(tp.grads.pop(id(out), None))
    tp._finish_sums()


def _dx_into(alloc: Allocator, X: Tensor, inplace: bool) -> Tensor:
    """`torch.matmul(dY, W.t(), out=X if ctx.inplace)`: X's own storage (a new reference), else a new tensor."""
    return alloc.retain(X) if inplace else alloc.new(X.numel, X.dtype, "temporaries")


def qkv(ctx: Ctx, training: Any, x: Tensor, lps: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor] | None:
    """LoRA_QKV through apply_lora_qkv (module docstring); None: peft's ops run."""
    chosen = _take(ctx, training, x, lps, "qkv")
    if chosen is None:
        return None
    cd, alloc, T = x.dtype, ctx.tape.alloc, ctx.tokens
    _ensure_scratch(alloc, list(lps.values()), cd)
    outs = [_matmul_lora(ctx, x, lp, cd) for lp in chosen]

    def backward(tp: Tape, node: Node) -> None:
        X = node.saved[0]
        locals_ = _casts(tp.alloc, chosen, cd)
        grads = _empties(tp.alloc, chosen, cd)
        locals_ += [tp.alloc.new(T * lp.tuned.lora_rank, cd, "temporaries", label="dB") for lp in chosen]
        for lp in chosen:
            tp.alloc.spike(_nb(lp.tuned.lora_rank * T, cd))  # A.t() @ X.t() (916-925)
        dx = None
        for lp in chosen:  # 934-947: decode, dX (into X for q, addmm_ for k and v), free the decoded weight
            w = _decode(tp.alloc, lp, cd, scratch=False)
            if dx is None:
                dx = _dx_into(tp.alloc, X, inplace=True)
            tp.alloc.release(w)
        _finish(tp, node, x, dx, locals_, grads)

    _node(ctx, "unsloth_lora_qkv", x, chosen, outs, [], backward)
    return outs[0], outs[1], outs[2]


def o(ctx: Ctx, training: Any, x: Tensor, lps: dict[str, Any]) -> Tensor | None:
    """LoRA_W through apply_lora_o (module docstring); None: peft's ops run."""
    chosen = _take(ctx, training, x, lps, "o")
    if chosen is None:
        return None
    cd, alloc, T = x.dtype, ctx.tape.alloc, ctx.tokens
    lp = chosen[0]
    _ensure_scratch(alloc, list(lps.values()), cd)
    out = _matmul_lora(ctx, x, lp, cd)

    def backward(tp: Tape, node: Node) -> None:
        locals_ = _casts(tp.alloc, chosen, cd)
        grads = _empties(tp.alloc, chosen, cd)
        locals_.append(tp.alloc.new(T * lp.tuned.lora_rank, cd, "temporaries", label="y_dB"))  # 1098
        tp.alloc.spike(_nb(lp.tuned.lora_rank * T, cd))  # A.t() @ X.t() (1103)
        w = _decode(tp.alloc, lp, cd, scratch=False)  # 1107
        dx = tp.alloc.new(x.numel, cd, "temporaries")  # 1108: dY @ W.t(), a new tensor
        tp.alloc.release(w)
        _finish(tp, node, x, dx, locals_, grads)

    _node(ctx, "unsloth_lora_w", x, chosen, [out], [], backward)
    return out


def mlp(ctx: Ctx, training: Any, x: Tensor, lps: dict[str, Any]) -> Tensor | None:
    """LoRA_MLP through apply_lora_mlp_swiglu (module docstring); None: peft's ops run."""
    chosen = _take(ctx, training, x, lps, "mlp")
    if chosen is None:
        return None
    cd, alloc, T = x.dtype, ctx.tape.alloc, ctx.tokens
    gate, up, down = chosen
    inter = gate.tuned.linear.out_features
    _ensure_scratch(alloc, list(lps.values()), cd)
    e = _matmul_lora(ctx, x, gate, cd)
    g = _matmul_lora(ctx, x, up, cd)
    h = alloc.new(T * inter, cd, "temporaries", label="swiglu h")  # swiglu.py 49
    ops.log_kernel("mem", "forward", 3 * T * inter * cd.bits // 8)
    out = _matmul_lora(ctx, h, down, cd)
    alloc.release(h)  # a local of forward: not saved (fast_lora.py 448)

    def backward(tp: Tape, node: Node) -> None:
        X = node.saved[0]
        locals_ = _casts(tp.alloc, chosen, cd)
        w = _decode(tp.alloc, down, cd, scratch=True)  # 507-515: use_global_buffer=ctx.global_buffer (plain)
        locals_.append(tp.alloc.new(T * inter, cd, "temporaries", label="DW"))  # h, alive to the end
        tp.alloc.release(w)
        tp.alloc.spike(_nb(T * down.tuned.lora_rank, cd))  # matmul_lora's XA = dY @ downB
        ops.log_kernel("mem", "backward", 5 * T * inter * cd.bits // 8)  # reads DW, e, g; writes h, df, de in place
        grads = _empties(tp.alloc, chosen, cd)
        tp.alloc.spike(_nb(T * down.tuned.lora_rank, cd))  # dY @ downB.t() (535)
        tp.alloc.spike(_nb(down.tuned.lora_rank * T, cd))  # downA.t() @ h.t() (536)
        locals_ += [tp.alloc.new(T * lp.tuned.lora_rank, cd, "temporaries", label="dB") for lp in (up, gate)]
        tp.alloc.spike(_nb(up.tuned.lora_rank * T, cd))  # upA.t() @ X.t() (549)
        tp.alloc.spike(_nb(gate.tuned.lora_rank * T, cd))  # gateA.t() @ X.t() (554)
        dx = None
        for lp in (up, gate):  # 563-572: decode, dX into X (up), addmm_ (gate), free the decoded weight
            w = _decode(tp.alloc, lp, cd, scratch=False)
            if dx is None:
                dx = _dx_into(tp.alloc, X, inplace=True)
            tp.alloc.release(w)
        _finish(tp, node, x, dx, locals_, grads)

    _node(ctx, "unsloth_lora_mlp", x, chosen, [out], [e, g], backward)
    return out


def assumptions(model: Any, training: Any) -> list[str]:
    """One line: which LoRA groups Unsloth's Functions run on, and why any other stays on peft's ops."""
    tuned = [lin for tb in model.blocks for lin in tb.linears] if model.blocks else []
    if not any(t.lora_rank for t in tuned):
        return []
    fused: list[str] = []
    left: dict[str, list[str]] = {}
    for group, names in GROUPS.items():
        reasons = {group_reason(list(tb.linears), names, training) for tb in model.blocks}
        if reasons == {None}:
            fused.append({"qkv": "LoRA_QKV", "o": "LoRA_W (o)", "mlp": "LoRA_MLP"}[group])
        else:
            left.setdefault(next(r for r in reasons if r is not None), []).append(group)
    line = ("Unsloth LoRA kernels (fast_lora.py) modelled from source, not yet confirmed by a GPU record: "
            + (", ".join(fused) + " (the input saved once per group and dX written into it; LoRA_MLP recomputes "
               "its hidden in backward)" if fused else "none apply"))
    if left:
        line += "; peft's LoRA ops on " + "; ".join(f"{', '.join(g)}: {r}" for r, g in left.items())
    return [line]
