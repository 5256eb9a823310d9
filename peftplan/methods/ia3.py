"""(IA)^3 (Liu et al. 2022): learned vectors that rescale keys, values and feed-forward activations.

peft `IA3Config` defaults: target_modules and feedforward_modules from
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING (peft
utils/constants.py). A feed-forward target scales its input (in_features), others their output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedModel
from .base import MethodSpec, register
from .common import ADAPTER_DTYPE, frozen_base_dtype, replace_blocks, resolve_targets, targeted, uniform_model

# peft 0.21.2 utils/constants.py
IA3_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "bert": ["key", "value", "output.dense"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"], "opt": ["fc2"], "llama": ["down_proj"], "mistral": ["down_proj"],
    "bert": ["output.dense"], "gemma2": ["down_proj"], "qwen2": ["down_proj"],
}


@dataclass(frozen=True)
class IA3Options:
    targets: str | None = field(default=None, metadata={
        "help": "comma-separated module names (default: peft's per-model IA3 list)"})


def build(arch: ModelArch, options: IA3Options, training: Training) -> TunedModel:
    targets = resolve_targets(arch, options.targets, IA3_DEFAULT_TARGETS, "IA3")
    feedforward = tuple(IA3_FEEDFORWARD.get(arch.model_type, [])) if options.targets is None else \
        tuple(t for t in targets if any(t.endswith(f) or f.endswith(t) for f in IA3_FEEDFORWARD.get(arch.model_type, [])))
    base = uniform_model(arch, "ia3", frozen_base_dtype(training), trainable=False)

    def wrap(_: int, tb):  # type: ignore[no-untyped-def]
        linears = tuple(
            replace(t, ia3=("in" if targeted(t.linear, feedforward) else "out"), ia3_dtype=ADAPTER_DTYPE)
            if targeted(t.linear, targets) else t
            for t in tb.linears
        )
        return replace(tb, linears=linears)

    return replace_blocks(base, wrap)


SPEC = register(MethodSpec(
    name="ia3", summary="(IA)3: learned rescaling vectors on keys, values and feed-forward",
    options_cls=IA3Options, build=build, peft_type="IA3", source="Liu et al. 2022, arXiv:2205.05638",
    default_targets=IA3_DEFAULT_TARGETS,
))
