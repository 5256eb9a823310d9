"""P-tuning (Liu et al. 2021): soft prompts produced by a trainable prompt encoder (MLP).

peft `PromptEncoder` (tuners/p_tuning/model.py), reparameterization "MLP" (the default): an
embedding of total_virtual_tokens x token_dim and Linear(token_dim, h) ReLU Linear(h, h) ReLU
Linear(h, token_dim), with h = encoder_hidden_size defaulting to token_dim (utils/other.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..arch import ModelArch
from ..training import Training
from ..tuned import ExtraParam, TunedModel
from .base import MethodSpec, register
from .common import ADAPTER_DTYPE, frozen_base_dtype, uniform_model
from .prompting import check_prompt_task, check_prompt_width, check_virtual_tokens, submodules


@dataclass(frozen=True)
class PTuningOptions:
    virtual_tokens: int = field(default=20, metadata={"help": "num_virtual_tokens (peft examples use 20)"})


def build(arch: ModelArch, options: PTuningOptions, training: Training) -> TunedModel:
    check_virtual_tokens(options.virtual_tokens)
    check_prompt_task(arch, "P-tuning")
    check_prompt_width(arch, "P-tuning")
    base = uniform_model(arch, "ptuning", frozen_base_dtype(training), trainable=False)
    d = arch.hidden_size
    h = d  # encoder_hidden_size default = token_dim
    rows = options.virtual_tokens * submodules(arch)
    # peft tuners/p_tuning/model.py PromptEncoder (MLP): embedding, then Linear(d, h) ReLU Linear(h, h) ReLU
    # Linear(h, d), each weight and bias its own parameter (named mlp_head.{0,2,4}.weight / .bias)
    params = (
        ExtraParam("prompt_encoder.embedding", rows * d, ADAPTER_DTYPE, True, rows),
        ExtraParam("prompt_encoder.mlp_head.0.weight", h * d, ADAPTER_DTYPE, True, h),
        ExtraParam("prompt_encoder.mlp_head.0.bias", h, ADAPTER_DTYPE, True),
        ExtraParam("prompt_encoder.mlp_head.2.weight", h * h, ADAPTER_DTYPE, True, h),
        ExtraParam("prompt_encoder.mlp_head.2.bias", h, ADAPTER_DTYPE, True),
        ExtraParam("prompt_encoder.mlp_head.4.weight", d * h, ADAPTER_DTYPE, True, d),
        ExtraParam("prompt_encoder.mlp_head.4.bias", d, ADAPTER_DTYPE, True),
    )
    return replace(base, virtual_tokens=options.virtual_tokens, extra_params=params)


SPEC = register(MethodSpec(
    name="ptuning", summary="P-tuning: soft prompts from a trainable MLP prompt encoder",
    options_cls=PTuningOptions, build=build, peft_type="P_TUNING", source="Liu et al. 2021, arXiv:2103.10385",
))
