"""Attention implementation resolution: which of eager / SDPA / flash transformers runs for a model class,
given what the user asked for (`resolve_attention`, `UNSUPPORTED_ATTENTION`)."""

from __future__ import annotations

from .arch_types import ArchError, ModelArch


# What each model class refuses, from transformers 5.23's class flags (`_supports_sdpa`,
# `_supports_flash_attn`; PreTrainedModel defaults both to False): modeling_bloom.py sets neither,
# modeling_gemma2.py sets `_supports_sdpa = False` ("sdpa does not support softcapping"),
# modeling_t5.py / modeling_mt5.py set `_supports_flash_attn = False`. Families not listed support all three.
UNSUPPORTED_ATTENTION: dict[str, frozenset[str]] = {
    "bloom": frozenset({"sdpa", "flash"}),
    "gemma2": frozenset({"sdpa"}),
    "t5": frozenset({"flash"}),
    "mt5": frozenset({"flash"}),
    # modeling_gpt_oss.py: `_supports_sdpa = False` (attention sinks); its flash path needs the hub's
    # kernels-community build with sink support, which peftplan does not model: eager only
    "gpt_oss": frozenset({"sdpa", "flash"}),
}


def resolve_attention(arch: "ModelArch", requested: str, explicit: bool) -> tuple[str, str | None]:
    """(implementation transformers runs, note) for `requested` on `arch`.

    transformers 5.23 `PreTrainedModel.get_correct_attn_implementation`: with no request it tries SDPA
    and falls back to eager when the class does not support it; an explicit request the class does
    not support raises. peftplan's default (`Training.attention = "sdpa"`) is "no request" unless the
    user named it (`explicit`); flash is never a default, so an unsupported flash always raises."""
    unsupported = UNSUPPORTED_ATTENTION.get(arch.model_type, frozenset())
    if requested not in unsupported:
        return requested, None
    if requested == "sdpa" and not explicit:
        return "eager", (f"{arch.model_type} does not support SDPA in transformers; it falls back to eager "
                         "attention, as transformers does when no attn_implementation is given")
    supported = [a for a in ("eager", "sdpa", "flash") if a not in unsupported]
    raise ArchError(f"{arch.name}: transformers' {arch.model_type} does not support --attn {requested} "
                    f"(supported: {', '.join(supported)})")
