"""DoRA (Liu et al. 2024): LoRA for the direction plus a trainable magnitude vector per output.

peft implements it as a LoRA variant (`LoraConfig(use_dora=True)`, tuners/lora/dora.py): each
forward computes the column norm of W + s*B*A (a weight-sized temporary), detached as the paper
recommends, and the magnitude `lora_magnitude_vector` (out_features) is trainable.
"""

from __future__ import annotations

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedModel
from .lora import LORA_DEFAULT_TARGETS
from .base import MethodSpec, register
from .common import frozen_base_dtype, uniform_model
from .lora import LoraOptions, lora_model, validate_lora


def build(arch: ModelArch, options: LoraOptions, training: Training) -> TunedModel:
    targets = validate_lora(arch, options)
    base = uniform_model(arch, "dora", frozen_base_dtype(training), trainable=False)
    return lora_model(base, options, targets, "dora", dora=True, training=training)


SPEC = register(MethodSpec(
    name="dora", summary="DoRA: LoRA direction + trainable magnitude (peft use_dora=True)",
    options_cls=LoraOptions, build=build, peft_type="LORA", source="Liu et al. 2024, arXiv:2402.09353",
    default_targets=LORA_DEFAULT_TARGETS,
))
