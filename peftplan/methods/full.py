"""Full fine-tuning: every parameter trainable (the identity wrapper)."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedModel
from .base import MethodSpec, register
from .common import uniform_model


@dataclass(frozen=True)
class FullOptions:
    """Full fine-tuning has no options."""


def build(arch: ModelArch, options: FullOptions, training: Training) -> TunedModel:
    return uniform_model(arch, "full", training.trainable_dtype, trainable=True)


SPEC = register(MethodSpec(
    name="full", summary="full fine-tuning: all weights trainable", options_cls=FullOptions,
    build=build, peft_type=None, source="-",
))
