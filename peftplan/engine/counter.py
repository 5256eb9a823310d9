"""The FLOP and kernel counter that the symbolic ops (engine/ops.py) and the autograd tape
(engine/autograd.py) both add to while engine/flops.py runs the step: its own module, so that neither
of the two has to import the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlopCount:
    """Matmul FLOPs of one micro-batch, counted on the ops as they are recorded (engine/flops.py).

    Backward FLOPs follow autograd: a matmul's input-gradient half runs only when its input requires
    grad, its weight-gradient half only when the weight does (torch/csrc/autograd/FunctionsManual.cpp
    `mm_mat1_backward` / `mm_mat2_backward` are called per `needs_input_grad`). `causal_*` hold the
    attention FLOPs of causal SDPA calls, whose kernels (flash / memory-efficient) skip the masked
    half; torch.utils.flop_counter counts the full square.
    """

    forward: int = 0
    backward_input: int = 0
    backward_weight: int = 0
    causal_forward: int = 0
    causal_backward: int = 0
    block_forward: int = 0  # forward FLOPs inside the blocks
    recompute: int = 0  # forward FLOPs rerun by checkpointed layers in backward (early stop included)
    causal_recompute: int = 0
    # every kernel the step launches, for the roofline step time (engine/roofline.py `Kernel` tuples):
    # ("mm", phase, m, n, k, dtype name, batch), ("attn", phase, flops, bytes, dtype name), ("mem", phase, bytes),
    # ("dequant", phase, bytes), ("dora", phase, bytes); phase "forward" / "backward" (a recompute's
    # forward is renamed "recompute" by engine/autograd.py)
    kernels: list = field(default_factory=list)


# The counter the ops add to while engine/flops.py runs the symbolic step (None otherwise).
COUNTER: list[FlopCount | None] = [None]
