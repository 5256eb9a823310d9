"""FLOPs of one micro-batch, following the matmuls (scaling-book notation).

A matmul of (N x K) by (K x M) costs 2*N*K*M forward; its backward costs the same again for the
input gradient (skipped when nothing below needs one) and again for the weight gradient (skipped
for a frozen weight). Attention adds 2*B*H*T*S*hd for QK^T and as much for PV; causal kernels
(flash / memory-efficient SDPA) skip the masked half, eager attention computes the full square.
Gradient checkpointing recomputes every block's forward once more in backward.
Elementwise ops (norms, activations, softmax) are left out: under 1% of the matmul FLOPs for the
models in the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training import Training
from ..tuned import TunedModel


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


def step_flops(model: TunedModel, training: Training) -> StepFlops:
    arch = model.arch
    B = training.micro_batch
    T = training.seq_len + model.virtual_tokens
    N = B * T
    fwd = bwd_in = bwd_w = 0
    block_fwd = 0
    # Is an input gradient needed below block i? Only if something at or below it is trainable.
    trainable_below = model.embedding_trainable or model.input_requires_grad or model.virtual_tokens > 0
    for tb in model.blocks:
        trainable_below = trainable_below or tb.trainable
        f = 0
        for t in tb.linears:
            lin = t.linear
            mm = 2 * N * lin.in_features * lin.out_features
            f += mm
            if trainable_below:
                bwd_in += mm
            if t.weight_trainable:
                bwd_w += mm
            if t.lora_rank:
                lm = 2 * N * t.lora_rank * (lin.in_features + lin.out_features)
                f += lm
                bwd_in += lm
                bwd_w += lm
                if t.dora:
                    f += 2 * lin.in_features * lin.out_features * t.lora_rank  # B @ A for the weight norm
        for spec in tb.adapters:
            am = 2 * N * 2 * spec.dim * spec.size
            f += am
            bwd_in += am
            bwd_w += am
        kv = T + tb.prefix_tokens
        attn = 2 * 2 * B * arch.num_heads * T * kv * arch.head_dim
        if training.attention != "eager" and tb.block.stack != "encoder":
            attn //= 2
        f += attn
        if trainable_below:
            bwd_in += 2 * attn
        block_fwd += f
        fwd += f
    head = 2 * N * arch.head_in_features * arch.vocab_size
    fwd += head
    bwd_in += head
    if model.head_trainable or (arch.tie_word_embeddings and model.embedding_trainable):
        bwd_w += head
    recompute = block_fwd if (training.grad_ckpt or model.forces_grad_ckpt) else 0
    k = training.grad_accum
    return StepFlops(fwd * k, bwd_in * k, bwd_w * k, recompute * k)
