"""Trainers, registered by name (see base.py): `hf` (the bare transformers Trainer + peft step), `trl` (TRL's
SFTTrainer) and `llamafactory` (LLaMA-Factory's SFT, modelled from source) and `unsloth` (Unsloth's FastLanguageModel run, modelled
from source). The CLI's `--trainer` choices and `peftplan trainers` read this registry."""

from __future__ import annotations

from .base import Default, TrainerError, TrainerSpec, register, registry
from . import hf as _hf  # noqa: F401  (registers)
from . import llamafactory as _llamafactory  # noqa: F401  (registers)
from . import trl as _trl  # noqa: F401  (registers)
from . import unsloth as _unsloth  # noqa: F401  (registers)

__all__ = ["Default", "TrainerError", "TrainerSpec", "register", "registry", "get_trainer", "trainer_names", "default_trainer_for",
           "CLI_DEFAULT_TRAINER"]

# What `peftplan estimate` models when --trainer is not given: TRL's SFTTrainer, the trainer the HF docs teach for
# supervised fine-tuning. The Python API's `Training()` keeps `trainer="hf"`, the bare step every committed record
# and test was made with (README, "Which trainer?").
CLI_DEFAULT_TRAINER = "trl"


def trainer_names() -> tuple[str, ...]:
    return tuple(registry())


def get_trainer(name: str) -> TrainerSpec:
    spec = registry().get(name)
    if spec is None:
        raise TrainerError(f"unknown trainer {name!r} (choose from {', '.join(trainer_names())})")
    return spec


def default_trainer_for(arch, trainer: str | None) -> str | None:  # type: ignore[no-untyped-def]
    """The trainer a command models: the user's choice, else the CLI default (None lets `_training` apply it).
    TRL's SFTTrainer trains causal LMs only, so a seq2seq or masked LM without --trainer gets the bare
    transformers Trainer step (`hf`), which is what its users run."""
    if trainer is None and arch.task != "causal-lm":
        return "hf"
    return trainer
