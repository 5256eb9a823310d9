"""Fine-tuning methods, one module each, registered by name (see base.py)."""

from . import adapter, bitfit, dora, full, ia3, lisa, lora, prefix, prompt, ptuning, qlora  # noqa: F401  (registration)
from .base import MethodError, MethodSpec, registry

__all__ = ["MethodError", "MethodSpec", "registry", "get_method", "method_names", "explicit_grad_ckpt_options"]


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def get_method(name: str) -> MethodSpec:  # type: ignore[type-arg]
    methods = registry()
    if name not in methods:
        from ..suggest import did_you_mean
        raise MethodError(f"unknown method {name!r}{did_you_mean(name, methods)}")
    return methods[name]


def explicit_grad_ckpt_options(method: str, grad_ckpt: bool | None) -> dict[str, bool]:
    """Method options implied by an explicit `--no-grad-ckpt` (None = the flag was not given).

    QLoRA's `prepare_model_for_kbit_training` turns checkpointing on by default; a user who says
    `--no-grad-ckpt` means `use_gradient_checkpointing=False` (peft utils/other.py), so the flag wins."""
    if grad_ckpt is False and "kbit_grad_ckpt" in get_method(method).option_names():
        return {"kbit_grad_ckpt": False}
    return {}
