"""FLOPs of one optimizer step, counted on the same symbolic ops as the memory (scaling-book notation).

The forward and backward of one micro-batch are run on the symbolic tape (engine/step.py) with a
`FlopCount` attached (engine/ops.py): every matmul adds 2*N*K*M forward; its backward adds the same
again for the input gradient only when its input requires grad, and again for the weight gradient
only when the weight is trainable — exactly as autograd runs them, so frozen layers below the
first trainable tensor cost no backward, and a trainable prefix/prompt makes the gradient flow
down to the first layer (prefix tuning: every layer's attention and the projections above it).
Attention adds QK^T and PV forward (torch.utils.flop_counter `sdpa_flop_count`) and 5 such bmms
backward (`sdpa_backward_flop_count`: scores recomputed, dS, dV, dQ, dK); causal kernels (flash /
memory-efficient SDPA without a mask) skip the masked half (`causal_skip=True`, the default), eager
attention computes the full square. Gradient checkpointing reruns every block's forward in backward
up to its last saved tensor (early stop). Elementwise ops (norms, activations, softmax) are left out, as FlopCounterMode
does: under 1% of the matmul FLOPs for the models in the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training import Training
from ..tuned import TunedModel
from . import ops


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer step (all micro-batches)."""

    forward: int
    backward_input: int
    backward_weight: int
    recompute: int

    @property
    def total(self) -> int:
        return self.forward + self.backward_input + self.backward_weight + self.recompute


def micro_batch_flops(model: TunedModel, training: Training) -> ops.FlopCount:
    """The raw counts of one micro-batch's forward and backward."""
    from .sim import Allocator
    from .step import _forward_backward, _load

    alloc = Allocator()
    params, _, _ = _load(alloc, model)
    grad_ckpt = training.grad_ckpt or model.forces_grad_ckpt
    counter = ops.FlopCount()
    previous = ops.COUNTER[0]
    ops.COUNTER[0] = counter
    try:
        _forward_backward(alloc, model, params, training, grad_ckpt, "flops")
    finally:
        ops.COUNTER[0] = previous
    return counter


def step_flops(model: TunedModel, training: Training, causal_skip: bool = True,
               counted: ops.FlopCount | None = None) -> StepFlops:
    """FLOPs of one optimizer step. `causal_skip=False` counts causal attention over the full square,
    as torch.utils.flop_counter (and so the tracer) does. `counted`: one micro-batch's counts already
    taken during the memory simulation (`simulate_step(..., flop_counter=...)`), saving a second run."""
    c = counted if counted is not None else micro_batch_flops(model, training)
    fwd, bwd_in = c.forward, c.backward_input
    # counted on the recompute as engine/autograd.py runs it: non-reentrant checkpoint's early stop
    # (torch/utils/checkpoint.py `_StopRecomputationError`) skips the ops after the last saved tensor
    recompute = c.recompute
    if causal_skip:
        fwd -= c.causal_forward // 2
        bwd_in -= c.causal_backward // 2
        recompute -= c.causal_recompute // 2
    k = training.grad_accum
    return StepFlops(fwd * k, bwd_in * k, c.backward_weight * k, recompute * k)
