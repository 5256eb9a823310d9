"""LoRA (Hu et al. 2021): W x + (alpha/r) B A dropout(x), with A (r x in) and B (out x r) trainable.

peft 0.21 `LoraConfig` defaults: r=8, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules
from TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft utils/constants.py).
DoRA and QLoRA reuse `lora_model` (peft treats DoRA as a LoRA variant, QLoRA as LoRA on a
bitsandbytes-quantized base).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedLinear, TunedModel
from .base import MethodError, MethodSpec, register
from .moe_lora import moe_v4_names, split_targets
from .common import ADAPTER_DTYPE, frozen_base_dtype, replace_blocks, resolve_targets, targeted, uniform_model

# peft utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21.2)
LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "gpt2": ["c_attn"], "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
}


@dataclass(frozen=True)
class LoraOptions:
    rank: int = field(default=8, metadata={"help": "LoRA rank r (peft LoraConfig.r default 8)"})
    alpha: float = field(default=8, metadata={"help": "lora_alpha (peft default 8); scaling = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "lora_dropout (peft default 0.0)"})
    targets: str | None = field(default=None, metadata={
        "help": "comma-separated module names, or qv / attn / all-linear (default: peft's per-model list)"})


def validate_lora(arch: ModelArch, options: LoraOptions) -> tuple[str, ...]:
    if isinstance(options.rank, bool) or not isinstance(options.rank, int) or options.rank <= 0:
        raise MethodError(f"rank must be a positive integer, got {options.rank!r}")
    if not 0.0 <= options.dropout < 1.0:
        raise MethodError(f"dropout must be in [0, 1), got {options.dropout!r}")
    mapped, rest = moe_v4_names(arch, options.targets)  # MoE: router/expert names peft maps to parameters
    if mapped and not rest:
        return mapped
    targets = resolve_targets(arch, rest if mapped else options.targets, LORA_DEFAULT_TARGETS, "LoRA") + mapped
    for block in arch.blocks[:1] + arch.blocks[-1:]:
        for lin in block.linears:
            if targeted(lin, targets) and options.rank > min(lin.in_features, lin.out_features):
                raise MethodError(
                    f"rank {options.rank} exceeds the width of {lin.path} "
                    f"({lin.in_features} x {lin.out_features}): a rank above min(in, out) adds nothing"
                )
    return targets


def lora_model(base: TunedModel, options: LoraOptions, targets: tuple[str, ...], method: str,
               dora: bool = False, training: Training | None = None) -> TunedModel:
    """Attach LoRA (or DoRA) adapters in fp32 to the targeted linears of a frozen base.

    Under FSDP2 with mixed precision the adapters stay fp32 in storage (sharded parameters, grads and
    optimizer states), but `fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=bf16))`
    all-gathers every floating parameter in param_dtype for the forward (torch 2.13
    distributed/fsdp/_fully_shard/_fsdp_param.py `init_unsharded_param` / `param_dtype`), so peft's
    lora/layer.py `Linear.forward` -> `self._cast_input_dtype(x, lora_A.weight.dtype)` sees a bf16
    weight and does not copy x to fp32 per adapter: the forward dtype follows the compute dtype.
    """
    fwd = None
    if training is not None and training.mixed and training.shard in ("fsdp-full", "fsdp-grad-op", "fsdp-hybrid"):
        fwd = training.compute_dtype

    # MoE models: peft moves the router / expert targets to `target_parameters` (methods/moe_lora.py)
    targets, expert_targets = split_targets(base.arch, options.targets, targets, options.rank, options.dropout, dora)

    def wrap(_: int, tb):  # type: ignore[no-untyped-def]
        linears = tuple(
            replace(t, lora_rank=options.rank, lora_dtype=ADAPTER_DTYPE, lora_dropout=options.dropout, dora=dora,
                    lora_forward_dtype=fwd)
            if targeted(t.linear, targets) else t
            for t in tb.linears
        )
        if tb.block.moe is not None and expert_targets:
            return replace(tb, linears=linears, expert_lora=expert_targets, expert_lora_dtype=ADAPTER_DTYPE)
        return replace(tb, linears=linears)

    return replace(replace_blocks(base, wrap), method=method)


def build(arch: ModelArch, options: LoraOptions, training: Training) -> TunedModel:
    targets = validate_lora(arch, options)
    base = uniform_model(arch, "lora", frozen_base_dtype(training), trainable=False)
    return lora_model(base, options, targets, "lora", training=training)


SPEC = register(MethodSpec(
    name="lora", summary="LoRA: frozen base, trainable low-rank A/B on target linears",
    options_cls=LoraOptions, build=build, peft_type="LORA", source="Hu et al. 2021, arXiv:2106.09685",
    default_targets=LORA_DEFAULT_TARGETS,
))
