"""The model's parameters on the symbolic tape, as engine/load.py lays them out: one LinearParams per
(tuned) linear, one BlockParams per transformer block, ModelParams for the whole model."""

from __future__ import annotations
from dataclasses import dataclass, field
from ..tuned import BottleneckAdapter, TunedBlock, TunedLinear
from .autograd import Param


@dataclass(eq=False)
class LinearParams:
    tuned: TunedLinear
    weight: Param
    bias: Param | None
    lora_a: Param | None = None
    lora_b: Param | None = None
    magnitude: Param | None = None
    ia3: Param | None = None


@dataclass(eq=False)
class BlockParams:
    tuned: TunedBlock
    linears: list[LinearParams]
    norms: list[Param]
    adapters: list[tuple[BottleneckAdapter, Param, Param]]  # (spec, down weight+bias, up weight+bias)
    extras: list[Param] = field(default_factory=list)  # block.extra_params, in order (MoE router/experts)
    expert_lora: dict[str, tuple[Param, Param]] = field(default_factory=dict)  # MoE parameter -> (lora_A, lora_B)


@dataclass(eq=False)
class ModelParams:
    embedding: Param
    other_embeddings: list[Param]
    blocks: list[BlockParams]
    final_norms: list[Param]
    head: Param | None  # untied lm_head
    head_linears: list[Param]
    extra: list[Param]
