"""Model architectures as frozen dataclasses, built from a Hugging Face `config.json`.

Each supported `model_type` has an explicit builder that reads the fields its transformers
implementation reads (the module names and bias flags follow `transformers/models/<type>/modeling_<type>.py`
in transformers 5.23). An unknown `model_type`, or a config missing a field the builder needs,
raises `ArchError`: peftplan never guesses a shape from ratios.

Notation (scaling-book style): V vocabulary, D hidden size, H query heads, K key/value heads,
hd head dim, F MLP intermediate size, L layers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .arch_attention import UNSUPPORTED_ATTENTION, resolve_attention
from .arch_classic import BUILDERS as _CLASSIC
from .arch_modern import BUILDERS as _MODERN
from .arch_moe import BUILDERS as _MOE
from .arch_types import ArchError, Block, Family, Linear, ModelArch, MoE, Norm, StackKind, Task

__all__ = ["UNSUPPORTED_ATTENTION", "ArchError", "BUILDERS", "Block", "Family", "Linear", "ModelArch", "MoE", "Norm",
           "StackKind", "Task", "from_hf_config", "resolve_attention"]

# every supported model_type -> its builder (the classic families, then the modern dense and the MoE ones)
BUILDERS: dict[str, Callable[[str, Mapping[str, Any]], ModelArch]] = {**_CLASSIC, **_MODERN, **_MOE}


def from_hf_config(cfg: Mapping[str, Any], name: str = "model") -> ModelArch:
    """Build a ModelArch from a parsed config.json; ArchError for anything unknown or incomplete."""
    if not isinstance(cfg, Mapping):
        raise ArchError(f"{name}: config.json must hold a JSON object")
    model_type = cfg.get("model_type")
    if not model_type:
        raise ArchError(f"{name}: config.json has no 'model_type'")
    builder = BUILDERS.get(str(model_type))
    if builder is None:
        raise ArchError(
            f"{name}: unsupported model_type {model_type!r} (supported: {', '.join(sorted(BUILDERS))})"
        )
    if model_type == "gemma2" and cfg.get("head_dim") is None:
        raise ArchError(f"{name}: gemma2 config lacks 'head_dim'")
    arch = builder(name, cfg)
    if arch.num_heads % arch.num_kv_heads:
        raise ArchError(f"{name}: {arch.num_heads} attention heads is not a multiple of {arch.num_kv_heads} KV heads")
    return arch
