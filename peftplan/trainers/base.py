"""The trainer registry: one module per trainer registers a `TrainerSpec` by name at import, like the methods.

A trainer is what runs the step around the model: its defaults (what a user gets without setting anything), the
loss it computes, the casts it applies to the model and the kernels it switches on. `hf` is the bare
transformers `Trainer` + peft step every committed CPU record was made with; a `Training` without a trainer is
that step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..training import TrainingError
from ..tuned import TunedModel


class TrainerError(TrainingError):
    """An unknown trainer, or an option the chosen trainer does not have (one line, for the user)."""


@dataclass(frozen=True)
class Default:
    """A `Training` field the trainer sets when the user does not: the value and where it comes from."""

    field: str
    value: Any
    source: str


@dataclass(frozen=True)
class TrainerSpec:
    """A registered trainer.

    `loss`: the engine's loss model, a key of engine/losses.py `LOSSES`. `defaults`: Training fields the trainer
    sets when the user does not. `options`: the trainer's own switches (`Training.trainer_options`), name -> help.
    `method_defaults`: method options the trainer implies (TRL never runs kbit prep).
    `adapt`: the trainer's changes to the model the method built (casts), or None. `assumptions`: lines printed
    with every estimate under this trainer.
    """

    name: str
    library: str
    version: str
    summary: str
    source: str
    loss: str
    defaults: tuple[Default, ...] = ()
    options: dict[str, str] = field(default_factory=dict)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> option defaults
    option_losses: dict[str, str] = field(default_factory=dict)  # a switch that replaces the loss -> its key
    # fused layer kernels (engine/liger.py `layer_kernels`: "rms_norm", "glu", "rope", "rope_copy") the trainer
    # always runs (`kernels`, for the model types in `kernel_types`; empty = every type) or a switch turns on
    kernels: tuple[str, ...] = ()
    kernel_types: frozenset[str] = frozenset()
    option_kernels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # switches that offload saved activations to host memory (engine/offload.py policy names)
    option_offload: dict[str, str] = field(default_factory=dict)
    offload: str | None = None  # the trainer's own offload policy (engine/offload.py), or None
    adapt: Callable[[TunedModel, Any], TunedModel] | None = None
    assumptions: Callable[[TunedModel, Any], list[str]] | None = None
    checked: str = "modelled from source"  # or how it is checked against the real step

    @property
    def label(self) -> str:
        """E.g. "trl 1.16.0 (SFTTrainer)"."""
        return f"{self.library} {self.version}"

    def check_options(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name not in self.options:
                flag = "--" + name.replace("_", "-")
                have = ", ".join("--" + o.replace("_", "-") for o in self.options) or "none"
                raise TrainerError(f"option {flag} does not apply to trainer {self.name!r} (its options: {have})")

    def apply_defaults(self, given: dict[str, Any]) -> dict[str, Any]:
        """`given` Training fields (None = not set by the user) with this trainer's defaults filled in."""
        out = {k: v for k, v in given.items() if v is not None}
        for d in self.defaults:
            if out.get(d.field) is None:
                out[d.field] = d.value
        return out

    def loss_for(self, options: tuple[str, ...]) -> str:
        """The engine loss (engine/losses.py LOSSES key) with these switches on."""
        for name in options:
            if name in self.option_losses:
                return self.option_losses[name]
        return self.loss

    def kernels_for(self, arch: Any) -> tuple[str, ...]:
        """The layer kernels this trainer always runs on `arch` (engine/liger.py)."""
        if self.kernel_types and arch.model_type not in self.kernel_types:
            return ()
        return self.kernels

    def offload_for(self, options: tuple[str, ...]) -> str | None:
        """The activation-offload policy (engine/offload.py POLICIES key) with these switches on, or None."""
        for name in options:
            if name in self.option_offload:
                return self.option_offload[name]
        return self.offload

    def method_options(self, method: str, options: dict[str, Any] | None) -> dict[str, Any]:
        """The method options with this trainer's defaults for options the user did not set."""
        return {**self.method_defaults.get(method, {}), **dict(options or {})}

    def defaults_line(self) -> str:
        return ", ".join(f"{d.field}={d.value}" for d in self.defaults) or "none (the bare step)"


_REGISTRY: dict[str, TrainerSpec] = {}


def register(spec: TrainerSpec) -> TrainerSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"trainer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def registry() -> dict[str, TrainerSpec]:
    return dict(_REGISTRY)
