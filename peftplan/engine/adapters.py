"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as the adapter hooks run them: down-projection,
activation, up-projection, and where in the block each placement adds its output."""

from __future__ import annotations

from ..tuned import BottleneckAdapter
from .autograd import Param
from .ops import Ctx, add, cast, linear
from .params import BlockParams
from .sim import Tensor


def _adapter(ctx: Ctx, x: Tensor, spec: BottleneckAdapter, down: Param, up: Param) -> Tensor:
    """Bottleneck adapter body: up(relu(down(x))) (the caller adds the residual)."""
    tape = ctx.tape
    xa = cast(ctx, x, spec.dtype) if ctx.autocast is None else tape.alloc.retain(x)
    d = linear(ctx, xa, down, None, spec.size)
    tape.drop(xa)
    r = tape.new(d.numel, d.dtype, d.requires_grad, "relu")
    tape.record("relu", [d], [r], [r])
    tape.drop(d)
    u = linear(ctx, r, up, None, spec.dim)
    tape.drop(r)
    out = cast(ctx, u, x.dtype)
    tape.drop(u)
    return out


def _with_adapters(ctx: Ctx, placement: str, h: Tensor, bp: BlockParams) -> Tensor:
    for spec, down, up in bp.adapters:
        if spec.placement == placement:
            a = _adapter(ctx, h, spec, down, up)
            out = add(ctx, h, a)
            ctx.tape.drop(a, h)
            h = out
    return h
