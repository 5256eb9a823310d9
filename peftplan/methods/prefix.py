"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer.

peft `PrefixEncoder` (tuners/prefix_tuning/model.py) without projection (the default):
an embedding of num_virtual_tokens x (num_layers * 2 * token_dim); for grouped-query attention
token_dim is num_key_value_heads * head_dim (utils/other.py, peft issue #1901). peft refuses
prefix tuning with gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..arch import ModelArch
from ..training import Training
from ..tuned import ExtraParam, TunedModel
from .base import MethodError, MethodSpec, register
from .common import ADAPTER_DTYPE, frozen_base_dtype, uniform_model
from .prompting import check_prompt_task, check_virtual_tokens, config_num_layers


@dataclass(frozen=True)
class PrefixOptions:
    virtual_tokens: int = field(default=20, metadata={"help": "num_virtual_tokens (peft examples use 20)"})


def token_dim(arch: ModelArch) -> int:
    if "num_key_value_heads" in arch.config:
        return arch.num_kv_heads * arch.head_dim
    return arch.hidden_size


def build(arch: ModelArch, options: PrefixOptions, training: Training) -> TunedModel:
    check_virtual_tokens(options.virtual_tokens)
    check_prompt_task(arch, "prefix tuning")
    if training.grad_ckpt:
        raise MethodError("peft 0.21 refuses prefix tuning with gradient checkpointing "
                          "(\"PREFIX_TUNING does not work with gradient checkpointing\"): drop --grad-ckpt")
    base = uniform_model(arch, "prefix", frozen_base_dtype(training), trainable=False)
    n_layers = config_num_layers(arch)
    table = ExtraParam("prompt_encoder.embedding", options.virtual_tokens * n_layers * 2 * token_dim(arch),
                       ADAPTER_DTYPE, True, options.virtual_tokens)  # nn.Embedding(num_virtual_tokens, ...)
    blocks = tuple(replace(b, prefix_tokens=options.virtual_tokens) for b in base.blocks)
    return replace(base, blocks=blocks, extra_params=(table,))


SPEC = register(MethodSpec(
    name="prefix", summary="prefix tuning: trainable key/value prefixes in every layer",
    options_cls=PrefixOptions, build=build, peft_type="PREFIX_TUNING", source="Li & Liang 2021, arXiv:2101.00190",
))
