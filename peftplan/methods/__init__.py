"""Fine-tuning methods, one module each, registered by name (see base.py)."""

from . import adapter, bitfit, dora, full, ia3, lisa, lora, prefix, prompt, ptuning, qlora  # noqa: F401  (registration)
from .base import MethodError, MethodSpec, registry

__all__ = ["MethodError", "MethodSpec", "registry", "get_method", "method_names"]


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def get_method(name: str) -> MethodSpec:  # type: ignore[type-arg]
    methods = registry()
    if name not in methods:
        from ..suggest import did_you_mean
        raise MethodError(f"unknown method {name!r}{did_you_mean(name, methods)}")
    return methods[name]
