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


@dataclass(frozen=True)
class OptimizerCost:
    """Bytes for one trainable tensor: persistent state (on the GPU / paged) and step scratch."""

    state_bytes: int
    paged_bytes: int
    scratch_bytes: int  # alive at once during that tensor's update (for-loop) or per list (foreach)
    # One parameter at a time (torch's for-loop implementations, transformers' Adafactor): the peak of this
    # tensor's own update, and what the Python loop variables keep alive until the next tensor's update
    # rebinds them (`denom` in torch/optim/adamw.py _single_tensor_adamw, `update` in Adafactor.step).
    loop_peak_bytes: int = 0
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
        loop = (2 * scratch, scratch)
        if optimizer == "paged-adamw":
            return OptimizerCost(step, states, scratch, *loop)
        return OptimizerCost(states + step, 0, scratch, *loop)
    if optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        if numel < BNB_MIN_8BIT_SIZE:
            states = 2 * r(numel, FP32)
        else:
            blocks = -(-numel // BNB_BLOCKSIZE)
            states = 2 * (r(numel, UINT8) + r(blocks, FP32))
        if optimizer == "paged-adamw-8bit":
            return OptimizerCost(0, states, 0)
        return OptimizerCost(states, 0, 0)
    if optimizer == "sgd":
        return OptimizerCost(0, 0, 0)
    if optimizer == "sgd-momentum":
        return OptimizerCost(r(numel, dtype), 0, 0 if impl == "fused" else 0)
    if optimizer == "lion":
        return OptimizerCost(r(numel, dtype), 0, r(numel, dtype), 2 * r(numel, dtype), 0)
    if optimizer == "adafactor":
        if shape2d is not None:
            rows, cols = shape2d
            state = r(rows, FP32) + r(cols, FP32)
        else:
            state = r(numel, FP32)
        # transformers optimization.py Adafactor.step, per parameter: `update = (grad**2) + eps` (the pow and
        # the sum alive together), then `_approx_sq_grad` builds the next update while the first is alive:
        # two fp32 parameter-sized tensors; a 16-bit parameter adds `grad.float()` and `p.float()` copies
        # alive through its whole update. The previous parameter's `update` is freed only when this one's
        # is assigned (adafactor_step_scratch).
        copies = 2 * r(numel, FP32) if dtype.bits < 32 else 0
        own = 2 * r(numel, FP32) + copies
        return OptimizerCost(state, 0, own, own, r(numel, FP32))
    raise ValueError(f"unknown optimizer {optimizer!r}")


def sequential_step_scratch(costs: list[OptimizerCost]) -> int:
    """Peak scratch of an optimizer that updates one parameter at a time, in `costs` order: a tensor's own
    update peak plus what the previous iteration left alive (OptimizerCost.leftover_bytes)."""
    peak, previous = 0, 0
    for cost in costs:
        peak = max(peak, previous + cost.loop_peak_bytes)
        previous = cost.leftover_bytes
    return peak
