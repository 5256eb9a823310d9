"""Ops on symbolic tensors, each saving what its PyTorch derivative saves.

`Ctx` carries the token count N (micro-batch x sequence), the autocast dtype (None without
autocast) and the per-forward autocast weight-cast cache: autocast caches the half-precision
copy of a leaf that requires grad for the whole forward (aten/src/ATen/autocast_mode.cpp,
`cached_cast`), while frozen weights are cast again at every use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..dtypes import FP32, DType
from .autograd import Param, Tape
from .counter import COUNTER, FlopCount  # noqa: F401  (FlopCount: importers use ops.FlopCount)
from .sim import Tensor


def count_matmul(fwd: int, input_grad: bool, weight_grad: bool) -> None:
    c = COUNTER[0]
    if c is None:
        return
    c.forward += fwd
    if input_grad:
        c.backward_input += fwd
    if weight_grad:
        c.backward_weight += fwd


def log_kernel(*entry: object) -> None:
    """Note one kernel for the roofline (engine/roofline.py) while a FlopCount is attached."""
    c = COUNTER[0]
    if c is not None:
        c.kernels.append(entry)


def log_matmul(m: int, n: int, k: int, dtype: DType, input_grad: bool, weight_grad: bool, batch: int = 1) -> None:
    """An (m x k) @ (k x n) GEMM forward, and its backward halves as autograd runs them: grad of the
    input (m x n) @ (n x k), grad of the weight (n x m) @ (m x k)."""
    c = COUNTER[0]
    if c is None:
        return
    c.kernels.append(("mm", "forward", m, n, k, dtype.name, batch))
    if input_grad:
        c.kernels.append(("mm", "backward", m, k, n, dtype.name, batch))
    if weight_grad:
        c.kernels.append(("mm", "backward", n, k, m, dtype.name, batch))


def tensor_bytes(t: Tensor) -> int:
    """Bytes a kernel reads or writes for `t` (unrounded: the allocator's 512-byte blocks are not moved)."""
    return t.numel * t.dtype.bits // 8


@dataclass
class Ctx:
    tape: Tape
    tokens: int
    autocast: DType | None
    cast_cache: dict[object, Tensor] = field(default_factory=dict)  # also shared per-forward tensors (T5 position bias)
    # trainer layer kernels that replace the HF ops (engine/liger.py `layer_kernels`): "rms_norm", "glu", "rope",
    # "rope_copy"; empty: the HF ops
    kernels: frozenset[str] = frozenset()

    def end_forward(self) -> None:
        """Leaving autocast clears its cache: the cached copies live on only where saved."""
        for t in self.cast_cache.values():
            self.tape.drop(t)
        self.cast_cache.clear()


def promote(a: DType, b: DType) -> DType:
    return a if a.bits >= b.bits else b


def cast(ctx: Ctx, x: Tensor, dtype: DType) -> Tensor:
    """x.to(dtype): the same tensor when already of that dtype (a new reference), else a copy."""
    if x.dtype == dtype:
        return ctx.tape.alloc.retain(x)
    out = ctx.tape.new(x.numel, dtype, x.requires_grad, "to")
    ctx.tape.record("to", [x], [out], [])
    return out


def weight_for_matmul(ctx: Ctx, w: Param) -> Tensor:
    """The weight as the matmul sees it (autocast copy, cached for trainable leaves)."""
    wt = ctx.tape.param_tensor(w)
    if ctx.autocast is None or w.dtype == ctx.autocast or w.dtype.bits < 16:
        return ctx.tape.alloc.retain(wt)
    if w.trainable:
        cached = ctx.cast_cache.get(id(w))
        if cached is None:
            cached = cast(ctx, wt, ctx.autocast)
            ctx.cast_cache[id(w)] = cached
        return ctx.tape.alloc.retain(cached)
    return cast(ctx, wt, ctx.autocast)


def linear(ctx: Ctx, x: Tensor, w: Param, bias: Param | None, out_features: int) -> Tensor:
    """F.linear: y = x W^T + b. mm saves x when W needs grad, W when x needs grad."""
    xc = cast(ctx, x, ctx.autocast) if ctx.autocast is not None else ctx.tape.alloc.retain(x)
    wc = weight_for_matmul(ctx, w)
    rows = ctx.tokens
    out_dtype = ctx.autocast or promote(xc.dtype, w.dtype)
    needs = xc.requires_grad or w.trainable or bool(bias and bias.trainable)
    out = ctx.tape.new(rows * out_features, out_dtype, needs, "linear")
    count_matmul(2 * xc.numel * out_features, xc.requires_grad, w.trainable)
    log_matmul(rows, out_features, xc.numel // rows, out_dtype, xc.requires_grad, w.trainable)
    inputs = [xc, wc]
    if bias is not None:
        inputs.append(ctx.tape.param_tensor(bias))
    ctx.tape.record("linear", inputs, [out], [xc if w.trainable else None, wc if xc.requires_grad else None])
    ctx.tape.drop(xc, wc)
    return out


def elementwise(ctx: Ctx, name: str, a: Tensor, b: Tensor | None = None, *, save_inputs: bool = True,
                numel: int | None = None, out_dtype: DType | None = None, save_output: bool = False) -> Tensor:
    """A pointwise op. mul saves each operand for the other's gradient; add saves nothing."""
    dtype = out_dtype or (promote(a.dtype, b.dtype) if b is not None else a.dtype)
    rg = a.requires_grad or (b is not None and b.requires_grad)
    out = ctx.tape.new(numel if numel is not None else max(a.numel, b.numel if b else 0), dtype, rg, name)
    saved: list[Tensor | None] = []
    if save_inputs:
        if b is None:
            saved = [a]
        else:
            saved = [b if a.requires_grad else None, a if b.requires_grad else None]
    if save_output:
        saved.append(out)
    ctx.tape.record(name, [a] + ([b] if b is not None else []), [out], saved)
    return out


def scale(ctx: Ctx, a: Tensor) -> Tensor:
    """a * python_scalar: a new tensor, nothing saved."""
    return elementwise(ctx, "mul_scalar", a, save_inputs=False)


def add(ctx: Ctx, a: Tensor, b: Tensor) -> Tensor:
    return elementwise(ctx, "add", a, b, save_inputs=False)


def mul(ctx: Ctx, a: Tensor, b: Tensor) -> Tensor:
    return elementwise(ctx, "mul", a, b)


def param_as_tensor(ctx: Ctx, p: Param) -> Tensor:
    return ctx.tape.param_tensor(p)


def fp32() -> DType:
    return FP32


def hand_over_weight_grad(tp: Tape, head: Tensor, grad_weight: Tensor) -> None:
    """A fused loss's backward returns the LM head's weight gradient it computed in its forward (Liger's
    fused linear cross-entropy, Unsloth's fused CE): AccumulateGrad takes that tensor itself as `.grad`
    when the parameter has none yet, and adds it into the existing one otherwise."""
    param = tp.leaf_params[id(head)]
    if param.grad is None or not param.grad.alive:
        tp.alloc.retain(grad_weight)
        tp.alloc.recategorize(grad_weight, "grads")
        param.grad = grad_weight
        tp._seen.add(id(param))
    else:
        tp._grad_for(head)
