"""Read a training run's own config file and turn it into peftplan's model / method / options / training.

Five formats are recognised (`load_run_config` detects which):

- **axolotl** YAML (`base_model`, `adapter`, `lora_r`, `micro_batch_size`, `sequence_len`, ...). Key names and
  defaults follow axolotl's config reference (docs/config-reference.qmd) and its model loader
  (src/axolotl/loaders/model.py, adapter.py): `adapter: qlora` + `load_in_4bit` builds
  `BitsAndBytesConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` (overridable through
  `bnb_config_kwargs`); `lora_target_linear` adds every linear but the output head; absent keys take axolotl's
  defaults (micro_batch_size 1, sequence_len 512, gradient_accumulation_steps 1, optimizer adamw_torch_fused,
  bf16 auto, gradient_checkpointing off).
- **LLaMA-Factory** YAML (`stage`, `finetuning_type`, `lora_rank`, `quantization_bit`, `cutoff_len`, ...): the
  `llamafactory` trainer (runconfig/llamafactory.py).
- **peft** `adapter_config.json` (`peft_type`, `r`, `lora_alpha`, `target_modules`, `num_virtual_tokens`, ...).
- **training arguments** / **TRL SFTConfig** (format "training-args" or "trl-sftconfig", which sets the trainer):
  a transformers `TrainingArguments` / TRL `SFTConfig` dump (`to_json_string()`), JSON or
  YAML, optionally with TRL's `ModelConfig` keys (`model_name_or_path`, `use_peft`, `lora_r`, `load_in_4bit`, ...)
  as TRL recipes write them. Optimizer names are transformers' `OptimizerNames` values.

Nothing is dropped silently: every key ends up either in `RunConfig.read` (mapped, with what it became) or in
`RunConfig.ignored` (with the reason: not about memory, or memory-relevant but not modelled by peftplan).
Standard library only; PyYAML is imported when a YAML file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .axolotl import _map_axolotl
from .llamafactory import is_llamafactory, map_llamafactory
from .peft_adapter import _map_peft
from .reader import FORMATS, RunConfig, RunConfigError, _parse, _Reader
from .shared import OPTIMIZER_MAP
from .training_args import _map_training_args, is_sft_config

__all__ = ["RunConfig", "RunConfigError", "load_run_config", "OPTIMIZER_MAP", "FORMATS"]


def load_run_config(path: str) -> RunConfig:
    """Read an axolotl YAML, a peft adapter_config.json or a TrainingArguments/SFTConfig JSON/YAML."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunConfigError(f"no such file: {path}") from None
    except IsADirectoryError:
        adapter = p / "adapter_config.json"
        if adapter.exists():
            return load_run_config(str(adapter))
        raise RunConfigError(f"{path} is a directory without an adapter_config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise RunConfigError(f"cannot read {path}: {reason}") from None
    data = _parse(p, text)
    fmt = _detect(p, data)
    reader = _Reader(str(p), data)
    if fmt == "peft":
        _map_peft(reader)
    elif fmt == "llamafactory":
        map_llamafactory(reader)
    elif fmt == "axolotl":
        _map_axolotl(reader)
    else:
        trl = is_sft_config(data)
        fmt = "trl-sftconfig" if trl else fmt
        _map_training_args(reader, trl)
    return reader.finish(fmt)


AXOLOTL_MARKERS = ("base_model", "adapter", "micro_batch_size", "sequence_len", "lora_target_linear")
TRAINING_ARGS_MARKERS = ("per_device_train_batch_size", "gradient_accumulation_steps", "optim", "max_seq_length",
                         "use_peft", "model_name_or_path", "num_train_epochs", "per_device_eval_batch_size")


def _detect(p: Path, data: dict[str, Any]) -> str:
    if "peft_type" in data:
        return "peft"
    if is_llamafactory(data):
        return "llamafactory"
    if any(k in data for k in AXOLOTL_MARKERS):
        return "axolotl"
    if any(k in data for k in TRAINING_ARGS_MARKERS):
        return "training-args"
    raise RunConfigError(
        f"{p}: not a recognised run config (no peft_type, axolotl base_model/adapter, "
        "or TrainingArguments per_device_train_batch_size key)")

