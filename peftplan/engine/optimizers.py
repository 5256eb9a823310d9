"""Optimizer state and step temporaries, per trainable parameter tensor.

Sources: torch/optim/adamw.py (exp_avg, exp_avg_sq in the parameter's dtype; `_multi_tensor_adamw`
(foreach) builds a full list of denominators `exp_avg_sq_sqrt`; `_fused_adamw` allocates none;
`_single_tensor_adamw` builds one denominator per parameter at a time; fused/capturable keep the
`step` counter as a one-element tensor on the device); torch/optim/sgd.py (momentum_buffer);
bitsandbytes optim/optimizer.py (8-bit blockwise states: uint8 + one fp32 absmax per 256 values,
fp32 states for tensors under `min_8bit_size` = 4096; paged states live in CUDA unified memory,
outside `max_memory_allocated`); transformers optimization.py Adafactor (factored row/column
second moments for matrices, no first moment by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import FP32, UINT8, DType
from .sim import rounded

BNB_BLOCKSIZE = 256  # bitsandbytes 8-bit optimizer blockwise quantization block (optim/optimizer.py)
BNB_MIN_8BIT_SIZE = 4096  # Optimizer8bit min_8bit_size default: smaller tensors keep 32-bit states
# bitsandbytes optim/optimizer.py Optimizer8bit.get_state_buffer: `if not self.is_paged or p.numel() < 1e5:
# return torch.zeros_like(p, ...)`: a paged optimizer pages only tensors of 1e5 elements or more
BNB_PAGED_MIN_NUMEL = 100_000


@dataclass(frozen=True)
class OptimizerCost:
    """Bytes for one trainable tensor: persistent state (on the GPU / paged) and step scratch."""

    state_bytes: int
    paged_bytes: int
    scratch_bytes: int  # alive at once during that tensor's update (for-loop) or per list (foreach)
    parts: tuple[int, ...] = ()  # the device state tensors of `state_bytes`, in the order the step creates them
    # One parameter at a time (torch's for-loop implementations, transformers' Adafactor): the peak of this
    # tensor's own update, and what the Python loop variables keep alive until the next tensor's update
    # rebinds them (`denom` in torch/optim/adamw.py _single_tensor_adamw, `update` in Adafactor.step).
    loop_parts: tuple[int, ...] = ()  # the tensors alive at once at this tensor's own update peak
    leftover_bytes: int = 0


def tensor_cost(optimizer: str, impl: str, numel: int, dtype: DType, shape2d: tuple[int, int] | None) -> OptimizerCost:
    """State and scratch for one parameter tensor of `numel` elements stored as `dtype`."""
    def r(n: int, d: DType) -> int:
        return rounded(d.bytes_for(n))

    if optimizer in ("adamw", "paged-adamw"):
        states = 2 * r(numel, dtype)
        step = r(1, FP32) if impl == "fused" else 0  # fused keeps `step` on the device
        scratch = 0 if impl == "fused" else r(numel, dtype)
        # _single_tensor_adamw: `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`: the sqrt and
        # the quotient alive together; `denom` survives into the next parameter's iteration
        loop = {"loop_parts": (scratch, scratch) if scratch else (), "leftover_bytes": scratch}
        if optimizer == "paged-adamw" and numel >= BNB_PAGED_MIN_NUMEL:
            return OptimizerCost(step, states, scratch, (step,) if step else (), **loop)
        # adamw.py _init_group: state["step"], then exp_avg, exp_avg_sq
        return OptimizerCost(states + step, 0, scratch, ((step,) if step else ()) + (r(numel, dtype),) * 2, **loop)
    if optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        if numel < BNB_MIN_8BIT_SIZE:
            parts: tuple[int, ...] = (r(numel, FP32),) * 2
        else:
            blocks = -(-numel // BNB_BLOCKSIZE)
            # Optimizer2State.init_state: state1, state2 (uint8), then absmax1, absmax2 (fp32)
            parts = (r(numel, UINT8),) * 2 + (r(blocks, FP32),) * 2
        states = sum(parts)
        if optimizer == "paged-adamw-8bit" and numel >= BNB_PAGED_MIN_NUMEL:
            return OptimizerCost(0, states, 0)
        return OptimizerCost(states, 0, 0, parts)
    if optimizer == "sgd":
        return OptimizerCost(0, 0, 0)
    if optimizer == "sgd-momentum":
        return OptimizerCost(r(numel, dtype), 0, 0 if impl == "fused" else 0, (r(numel, dtype),))
    if optimizer == "lion":
        return OptimizerCost(r(numel, dtype), 0, r(numel, dtype), (r(numel, dtype),),
                             loop_parts=(r(numel, dtype),) * 2)
    if optimizer == "adafactor":
        if shape2d is not None:
            rows, cols = shape2d
            parts = (r(rows, FP32), r(cols, FP32))  # exp_avg_sq_row, exp_avg_sq_col
            if numel > rows * cols:
                # a (rows, cols) weight grouped with its 1-D bias (a bottleneck adapter's projection,
                # engine/step.py _load): Adafactor keeps the bias's second moment unfactored
                # (transformers optimization.py Adafactor.step: `factored = len(grad_shape) >= 2`)
                parts += (r(numel - rows * cols, FP32),)
        else:
            parts = (r(numel, FP32),)
        state = sum(parts)
        # transformers optimization.py Adafactor.step, per parameter: `update = (grad**2) + eps` (the pow and
        # the sum alive together), then `_approx_sq_grad` builds the next update while the first is alive:
        # two fp32 parameter-sized tensors; a 16-bit parameter adds `grad.float()` and `p.float()` copies
        # alive through its whole update. The previous parameter's `update` is freed only when this one's
        # is assigned (sequential_step_scratch).
        own = (r(numel, FP32),) * (4 if dtype.bits < 32 else 2)
        return OptimizerCost(state, 0, sum(own), parts, loop_parts=own, leftover_bytes=r(numel, FP32))
    raise ValueError(f"unknown optimizer {optimizer!r}")


def sequential_step_scratch(costs: list[OptimizerCost]) -> tuple[int, list[int]]:
    """Peak scratch of an optimizer that updates one parameter at a time, in `costs` order, and the tensors
    alive at that peak: a tensor's own update temporaries plus what the previous iteration left alive
    (OptimizerCost.leftover_bytes)."""
    peak, peak_parts, previous = 0, [], 0
    for cost in costs:
        here = previous + sum(cost.loop_parts)
        if here > peak:
            peak, peak_parts = here, [previous, *cost.loop_parts] if previous else list(cost.loop_parts)
        previous = cost.leftover_bytes
    return peak, peak_parts
