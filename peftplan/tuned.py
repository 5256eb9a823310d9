"""What a method does to an architecture: which tensors exist, in which dtype, which are trainable.

A method (peftplan/methods/*) turns a `ModelArch` into a `TunedModel`, the way peft turns a
model into a PeftModel. The engine reads only this description, so every method shares the same
memory and FLOP accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .arch import Block, Linear, ModelArch
from .dtypes import DType

QuantType = Literal["nf4", "fp4", "int8"]


@dataclass(frozen=True)
class Quant:
    """bitsandbytes quantization of a frozen linear weight.

    4-bit: `functional.quantize_4bit(blocksize=64)` packs two values a byte and keeps one fp32
    absmax per 64 weights; with `compress_statistics=True` (double quantization) the absmax is
    itself quantized to uint8 in blocks of 256, with one fp32 scale per block (QLoRA paper, sec. 3).
    8-bit: `Int8Params` (LLM.int8) keeps int8 weights and one fp32 scale per output row (SCB).
    """

    kind: QuantType
    double_quant: bool
    blocksize: int = 64  # bitsandbytes Linear4bit / quantize_4bit default blocksize (QLoRA paper: 64)
    dq_blocksize: int = 256  # bitsandbytes quantize_blockwise(absmax, blocksize=256) for nested stats
    # bnb_4bit_compute_dtype (transformers sets it to the load dtype): Linear4bit.forward casts its input to
    # it and MatMul4Bit runs in it, whatever dtype the activations have (bitsandbytes nn/modules.py)
    compute_dtype: DType | None = None


@dataclass(frozen=True)
class TunedLinear:
    """One linear of a block after the method: base weight storage + what wraps it."""

    linear: Linear
    weight_dtype: DType  # storage dtype of the base weight (nf4/fp4/int8 when quantized)
    weight_trainable: bool
    bias_dtype: DType
    bias_trainable: bool
    quant: Quant | None = None
    lora_rank: int = 0
    lora_dtype: DType | None = None
    # the adapter weights' dtype as the forward sees it when it differs from their storage dtype
    # (FSDP2 MixedPrecisionPolicy(param_dtype) all-gathers them in the compute dtype); None = lora_dtype
    lora_forward_dtype: DType | None = None
    lora_dropout: float = 0.0
    dora: bool = False
    ia3: Literal["out", "in"] | None = None  # peft IA3 scales the output, or the input of feed-forward layers
    ia3_dtype: DType | None = None

    @property
    def lora_numel(self) -> int:
        """A (r x in) + B (out x r), plus DoRA's magnitude vector (out)."""
        if not self.lora_rank:
            return 0
        lin = self.linear
        return self.lora_rank * (lin.in_features + lin.out_features) + (lin.out_features if self.dora else 0)

    @property
    def ia3_numel(self) -> int:
        if self.ia3 is None:
            return 0
        return self.linear.in_features if self.ia3 == "in" else self.linear.out_features


@dataclass(frozen=True)
class BottleneckAdapter:
    """A down-projection, nonlinearity, up-projection with a skip connection (Houlsby et al. 2019)."""

    placement: Literal["after-attn", "after-mlp", "parallel-mlp"]
    dim: int
    size: int
    dtype: DType

    @property
    def numel(self) -> int:
        # down: dim*size + size bias; up: size*dim + dim bias (Houlsby et al. 2019, sec. 2.1)
        return 2 * self.dim * self.size + self.size + self.dim


@dataclass(frozen=True)
class TunedBlock:
    block: Block
    linears: tuple[TunedLinear, ...]
    norm_dtype: DType
    norms_trainable: bool
    norm_bias_trainable: bool = False  # BitFit trains LayerNorm biases
    adapters: tuple[BottleneckAdapter, ...] = ()
    prefix_tokens: int = 0  # prefix tuning: past key/value length prepended to every attention
    # LoRA on MoE parameters (peft ParamWrapper, methods/moe_lora.py): (parameter name as in
    # block.extra_params, rank); the adapters are stored in `expert_lora_dtype`
    expert_lora: tuple[tuple[str, int], ...] = ()
    expert_lora_dtype: DType | None = None

    @property
    def expert_lora_numel(self) -> int:
        """peft ParamWrapper.update_layer: lora_A (r*E x in), lora_B (out x r*E) per wrapped parameter
        (E = 1 for the 2-D router weight)."""
        total = 0
        for name, rank in self.expert_lora:
            experts, in_f, out_f = wrapped_shape(self.block, name)
            total += rank * experts * (in_f + out_f)
        return total

    @property
    def trainable(self) -> bool:
        return (
            self.norms_trainable
            or self.norm_bias_trainable
            or bool(self.expert_lora)
            or bool(self.adapters)
            or any(t.weight_trainable or t.bias_trainable or t.lora_rank or t.ia3 for t in self.linears)
        )


@dataclass(frozen=True)
class ExtraParam:
    """A tensor outside the blocks that the method adds (soft prompt, prompt encoder, prefix table)."""

    name: str
    numel: int
    dtype: DType
    trainable: bool
    rows: int = 0  # a matrix's first dimension (0 = one-dimensional): Adafactor factors matrices


@dataclass(frozen=True)
class TunedModel:
    arch: ModelArch
    method: str
    blocks: tuple[TunedBlock, ...]
    embedding_dtype: DType
    embedding_trainable: bool
    head_dtype: DType  # untied lm_head and head linears (MLM transform, OPT projections)
    head_trainable: bool
    final_norm_dtype: DType
    final_norms_trainable: bool
    head_bias_trainable: bool = False
    virtual_tokens: int = 0  # prompt tuning / P-tuning: tokens prepended to the input embeddings
    extra_params: tuple[ExtraParam, ...] = ()
    forces_grad_ckpt: bool = False  # prepare_model_for_kbit_training enables it
    # ... and reentrant: peft utils/other.py `prepare_model_for_kbit_training` passes
    # gradient_checkpointing_kwargs={} (not None), so transformers 5.23 modeling_utils.py
    # `_activation_checkpointing_enable` keeps {} instead of its {"use_reentrant": False} default, and
    # torch 2.13 utils/checkpoint.py `checkpoint` falls back to `use_reentrant = True` (with a warning)
    reentrant_ckpt: bool = False
    input_requires_grad: bool = False  # enable_input_require_grads(): embedding output requires grad
    notes: tuple[str, ...] = field(default=())


def wrapped_shape(block: Block, name: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of a peft ParamWrapper (methods/moe_lora.py) on the block's MoE
    parameter `name`."""
    moe = block.moe
    assert moe is not None
    if name == "gate.weight":
        return 1, moe.hidden, moe.num_experts  # nn.Linear-like (E x D): in D, out E
    if name == "experts.gate_up_proj":
        return moe.num_experts, moe.hidden, 2 * moe.ffn  # (E, 2F, D): swapped to in D, out 2F
    if name == "experts.down_proj":
        return moe.num_experts, moe.ffn, moe.hidden
    raise ValueError(f"no LoRA wrapper shape for MoE parameter {name!r}")
