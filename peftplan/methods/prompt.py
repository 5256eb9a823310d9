"""Prompt tuning (Lester et al. 2021): trainable soft-prompt embeddings prepended to the input.

peft `PromptEmbedding` (tuners/prompt_tuning/model.py): an nn.Embedding of
num_virtual_tokens * num_transformer_submodules rows and token_dim columns; the base is frozen.
Every activation of the model is (seq_len + num_virtual_tokens) long.
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
class PromptOptions:
    virtual_tokens: int = field(default=20, metadata={"help": "num_virtual_tokens (peft examples use 20)"})


def build(arch: ModelArch, options: PromptOptions, training: Training) -> TunedModel:
    check_virtual_tokens(options.virtual_tokens)
    check_prompt_task(arch, "prompt tuning")
    check_prompt_width(arch, "prompt tuning")
    base = uniform_model(arch, "prompt", frozen_base_dtype(training), trainable=False)
    rows = options.virtual_tokens * submodules(arch)
    table = ExtraParam("prompt_encoder.embedding", rows * arch.hidden_size, ADAPTER_DTYPE, True, rows)
    return replace(base, virtual_tokens=options.virtual_tokens, extra_params=(table,))


SPEC = register(MethodSpec(
    name="prompt", summary="prompt tuning: trainable soft-prompt embeddings before the input",
    options_cls=PromptOptions, build=build, peft_type="PROMPT_TUNING",
    source="Lester et al. 2021, arXiv:2104.08691",
))
