"""The method registry: one module per method registers a `MethodSpec` by name at import.

Like peft's `register_peft_method`, a name can be registered once. The CLI's `--method` choices,
the `peftplan methods` listing and the test matrix all read this registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedModel

O = TypeVar("O")


class MethodError(ValueError):
    """A method option that is invalid for this model (one line, for the user)."""


@dataclass(frozen=True)
class MethodSpec(Generic[O]):
    """A registered method: its name, a one-line summary, its options type and its builder.

    `options_cls` is a frozen dataclass whose fields are the method's options; each field's
    metadata has `help` (and optionally `cli`, the CLI flag name, defaulting to the field name).
    `build` returns the TunedModel; it may raise MethodError.
    `peft_type` names the peft method it corresponds to (None when peft has none).
    """

    name: str
    summary: str
    options_cls: type[O]
    build: Callable[[ModelArch, O, Training], TunedModel]
    peft_type: str | None
    source: str
    # peft's default target modules per model_type (utils/constants.py), for methods that take `targets`
    default_targets: Mapping[str, Sequence[str]] | None = None

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options_cls))  # type: ignore[arg-type]

    def make_options(self, values: dict[str, Any]) -> O:
        """Options from user values; unknown names raise MethodError (an option that does not apply)."""
        allowed = set(self.option_names())
        for key in values:
            if key not in allowed:
                flag = "--" + key.replace("_", "-")
                raise MethodError(f"option {flag} does not apply to method {self.name!r}")
        return self.options_cls(**values)  # type: ignore[call-arg]


_REGISTRY: dict[str, MethodSpec[Any]] = {}


def register(spec: MethodSpec[Any]) -> MethodSpec[Any]:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def registry() -> dict[str, MethodSpec[Any]]:
    return dict(_REGISTRY)
