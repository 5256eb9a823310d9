"""Shared building blocks for methods: a model with everything frozen or everything trainable.

Which dtype the base is loaded in follows how people run each method with HF + peft:
- methods that train base weights (full, LISA, BitFit) load the model in the trainable dtype
  (fp32 master weights under mixed precision; Trainer autocasts the matmuls);
- adapter methods (LoRA, DoRA, IA3, prompt/prefix/P-tuning, bottleneck adapters) load the frozen
  base in half precision (`torch_dtype=bfloat16`) unless the precision is fp32, and keep adapter
  weights in fp32: peft `get_peft_model(autocast_adapter_dtype=True)` upcasts them
  (peft tuners/tuners_utils.py, `_cast_adapter_dtype`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..arch import Linear, ModelArch
from ..dtypes import FP32, DType
from ..training import Training
from ..tuned import TunedBlock, TunedLinear, TunedModel

ADAPTER_DTYPE = FP32  # peft autocast_adapter_dtype=True (tuners_utils.py)


def frozen_base_dtype(training: Training) -> DType:
    """Storage dtype of a frozen base under adapter methods."""
    return FP32 if training.precision == "fp32" else training.half_dtype


def linear_dtype(arch: ModelArch, lin: Linear, load_dtype: DType) -> DType:
    """Load dtype of a linear's weight: transformers keeps `_keep_in_fp32_modules` in fp32."""
    if load_dtype.bits < 32 and any(lin.matches(name) for name in arch.keep_in_fp32):
        return FP32
    return load_dtype


def uniform_model(arch: ModelArch, method: str, dtype: DType, trainable: bool,
                  linear_fn: Callable[[Linear, DType], TunedLinear] | None = None) -> TunedModel:
    """Every parameter in `dtype`, all trainable or all frozen; `linear_fn` may wrap each block linear."""

    def plain(lin: Linear, d: DType) -> TunedLinear:
        return TunedLinear(lin, d, trainable, d, trainable and lin.bias)

    wrap = linear_fn or plain
    blocks = tuple(
        TunedBlock(block=b, linears=tuple(wrap(lin, linear_dtype(arch, lin, dtype)) for lin in b.linears),
                   norm_dtype=dtype,
                   norms_trainable=trainable)
        for b in arch.blocks
    )
    return TunedModel(
        arch=arch, method=method, blocks=blocks,
        embedding_dtype=dtype, embedding_trainable=trainable,
        head_dtype=dtype, head_trainable=trainable,
        final_norm_dtype=dtype, final_norms_trainable=trainable,
        head_bias_trainable=trainable,
    )


def resolve_targets(arch: ModelArch, targets: str | None, default_map: dict[str, list[str]],
                    what: str) -> tuple[str, ...]:
    """Turn --targets (names, or presets qv / attn / all-linear) into module suffixes peft would match.

    With no --targets, peft's per-model_type default (peft utils/constants.py) is used; peft
    raises when a model_type has none, and so does peftplan.
    """
    from .base import MethodError

    if targets is None:
        default = default_map.get(arch.model_type)
        if not default:
            raise MethodError(
                f"peft has no default {what} target modules for model_type {arch.model_type!r}: "
                f"pass --targets (e.g. all-linear, or names from: {', '.join(arch.all_linear_names())})"
            )
        return tuple(default)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise MethodError("--targets is empty")
    if names == ["all-linear"]:
        return arch.all_linear_names()
    if names == ["attn"]:
        return tuple(lin.path for lin in arch.blocks[0].linears
                     if lin.role in ("q", "k", "v", "qkv", "o", "cross_q", "cross_k", "cross_v", "cross_o"))
    if names == ["qv"]:
        out = [lin.path for b in arch.blocks[:1] for lin in b.linears if lin.role in ("q", "v", "cross_q", "cross_v")]
        if not out:
            raise MethodError(f"{arch.name} has no separate q and v projections (fused qkv): use --targets qkv names")
        return tuple(out)
    for name in names:
        if not any(lin.matches(name) for b in arch.blocks for lin in b.linears):
            raise MethodError(
                f"target module {name!r} matches no linear of {arch.name} "
                f"(linears: {', '.join(arch.all_linear_names())})"
            )
    return tuple(names)


def targeted(lin: Linear, targets: tuple[str, ...]) -> bool:
    return any(lin.matches(t) for t in targets)


def replace_blocks(model: TunedModel, fn: Callable[[int, TunedBlock], TunedBlock]) -> TunedModel:
    return replace(model, blocks=tuple(fn(i, b) for i, b in enumerate(model.blocks)))
