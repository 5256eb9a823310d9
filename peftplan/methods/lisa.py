"""LISA (Pan et al. 2024): layerwise importance sampling, gamma blocks trainable at a time.

Algorithm 1 of the paper: freeze every layer except the embedding and the LM head, and unfreeze
gamma sampled intermediate layers for K steps. The optimizer only holds state for what is
trainable in the current period (LMFlow's implementation rebuilds it each period), so the peak
is that of a step with gamma trainable blocks. Which blocks are sampled does not change the
memory (blocks are identical); peftplan (and its tracer) take the last gamma.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedModel
from .base import MethodError, MethodSpec, register
from .common import uniform_model


@dataclass(frozen=True)
class LisaOptions:
    lisa_layers: int = field(default=2, metadata={
        "help": "gamma: number of sampled trainable layers (LMFlow --lisa_activated_layers)"})


def sampled_layers(arch: ModelArch, gamma: int) -> tuple[int, ...]:
    return tuple(range(arch.num_layers - gamma, arch.num_layers))


def build(arch: ModelArch, options: LisaOptions, training: Training) -> TunedModel:
    gamma = options.lisa_layers
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma <= 0:
        raise MethodError(f"lisa-layers must be a positive integer, got {gamma!r}")
    if gamma > arch.num_layers:
        raise MethodError(f"lisa-layers {gamma} exceeds the {arch.num_layers} layers of {arch.name}")
    dtype = training.trainable_dtype
    frozen = uniform_model(arch, "lisa", dtype, trainable=False)
    trainable = uniform_model(arch, "lisa", dtype, trainable=True)
    chosen = set(sampled_layers(arch, gamma))
    blocks = tuple(trainable.blocks[i] if i in chosen else frozen.blocks[i] for i in range(arch.num_layers))
    return replace(trainable, blocks=blocks)


SPEC = register(MethodSpec(
    name="lisa", summary="LISA: embeddings + head + gamma sampled layers trainable",
    options_cls=LisaOptions, build=build, peft_type=None, source="Pan et al. 2024, arXiv:2403.17919",
))
