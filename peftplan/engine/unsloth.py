"""Unsloth's fused cross-entropy (unsloth_zoo 2026.10.9 fused_losses/cross_entropy_loss.py `UnslothFusedLoss`), as
Unsloth's llama forward calls it (unsloth models/llama.py 2087-2130 `unsloth_fused_ce_loss`, logits not returned),
modelled from source: Triton / torch.compile do not run on the CPU tracer, so no trace checks it.

UnslothFusedLoss.forward (376-470): `grad_inputs = torch.empty_like(hidden_states)` (B*T x H, hidden dtype) and,
for a trainable head, `grad_lm_head = zeros_like(weight)`; the rows are split into `n_chunks`
(`get_chunk_size`, 290-303: ceil(B*T * V * 16 B / target / 4) * 4 chunks, where the target is min(half the free
memory, `_CE_TARGET_GB_CAP` = 4 GiB), 229; assumed at the cap: a GPU with >= 8 GiB free at the loss); each chunk
runs `torch.func.grad_and_value(compute_fused_ce_loss)`: the chunk's logits in the compute dtype, their fp32 upcast,
the fp32 log-softmax and the fp32 gradient (the "14 bytes per logit" of `_CE_BYTES_PER_LOGIT`'s comment, 222-224),
all freed before the next chunk, the chunk's hidden gradient written into `grad_inputs`. `grad_inputs` is saved and
returned in backward scaled in place (638-700): it is the final norm output's gradient.
"""

from __future__ import annotations

import math

from ..arch import ModelArch
from ..dtypes import FP32, INT64
from .autograd import Node, Param, Tape
from .ops import COUNTER, Ctx, count_matmul, hand_over_weight_grad
from .sim import Tensor, rounded

UNSLOTH_CE_TARGET_GIB = 4.0  # cross_entropy_loss.py:229 `_CE_TARGET_GB_CAP = 4.0` (assumed reached)
UNSLOTH_CE_BYTES_PER_LOGIT = 16.0  # cross_entropy_loss.py:225 `_CE_BYTES_PER_LOGIT = 16.0` (the chunk-count rule)


def unsloth_chunks(rows: int, vocab: int, target_gib: float = UNSLOTH_CE_TARGET_GIB) -> int:
    """cross_entropy_loss.py 262-303 `_get_chunk_multiplier` / `get_chunk_size`."""
    multiplier = (vocab * UNSLOTH_CE_BYTES_PER_LOGIT / 1024 / 1024 / 1024) / target_gib / 4
    exact = rows * multiplier * 4
    if exact <= 1.0 + 1e-9:
        return 1
    return min(math.ceil(exact / 4 - 1e-9) * 4, rows)


def unsloth_fused_ce(ctx: Ctx, arch: ModelArch, h: Tensor, head: Param, batch: int, seq_len: int,
                     virtual_tokens: int) -> Tensor:
    from .loss_error import require_causal_lm

    require_causal_lm(arch, "Unsloth's fused cross-entropy scores next tokens of a causal LM")
    tape, alloc = ctx.tape, ctx.tape.alloc
    H, V = arch.head_in_features, arch.vocab_size
    BT = batch * (seq_len + virtual_tokens)
    cd = ctx.autocast or h.dtype
    head_t = tape.param_tensor(head)
    needs = h.requires_grad or head.trainable
    labels = alloc.new(BT, INT64, "inputs")  # shifted labels (llama.py 2100-2115)
    grad_input = alloc.new(BT * H, h.dtype, "saved_activations", label="unsloth grad_inputs") if h.requires_grad \
        else None
    grad_weight = alloc.new(V * H, head.dtype, "saved_activations", label="unsloth grad_lm_head") \
        if head.trainable else None
    n = unsloth_chunks(BT, V)
    size = -(-BT // n)
    for start in range(0, BT, size):
        r = min(size, BT - start)
        # compute_fused_ce_loss under grad_and_value: logits (cd), fp32 upcast, log-softmax, gradient (fp32)
        alloc.parts = [rounded(cd.bytes_for(r * V)), *[rounded(FP32.bytes_for(r * V))] * 3]
        alloc.spike(sum(alloc.parts))
    count_matmul(2 * BT * H * V, h.requires_grad, head.trainable)
    c = COUNTER[0]
    if c is not None and h.requires_grad:  # the input gradient is computed in the forward
        c.forward += 2 * BT * H * V
        c.backward_input -= 2 * BT * H * V
    loss = alloc.new(1, FP32, "temporaries", needs, "loss")
    alloc.release(labels)
    saved = [t for t in (grad_input, grad_weight) if t is not None]

    def backward(tp: Tape, node: Node) -> None:
        tp.alloc.release(tp.grads.pop(id(node.outputs[0]), None))
        if grad_weight is not None:
            hand_over_weight_grad(tp, head_t, grad_weight)
        if grad_input is not None:
            tp._grad_for(h, alias=grad_input)
        for t in node.saved:
            tp.alloc.release(t)

    inputs = [h] if h.requires_grad else []
    if head.trainable:
        inputs.append(head_t)
    if needs:
        tape.nodes.append(Node("unsloth_fused_ce", inputs, [loss], saved, custom=backward))
    else:
        for t in saved:
            alloc.release(t)
    return loss
