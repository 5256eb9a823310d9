"""Read a training run's own config file and turn it into peftplan's model / method / options / training.

Three formats are recognised (`load_run_config` detects which):

- **axolotl** YAML (`base_model`, `adapter`, `lora_r`, `micro_batch_size`, `sequence_len`, ...). Key names and
  defaults follow axolotl's config reference (docs/config-reference.qmd) and its model loader
  (src/axolotl/loaders/model.py, adapter.py): `adapter: qlora` + `load_in_4bit` builds
  `BitsAndBytesConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` (overridable through
  `bnb_config_kwargs`); `lora_target_linear` adds every linear but the output head; absent keys take axolotl's
  defaults (micro_batch_size 1, sequence_len 512, gradient_accumulation_steps 1, optimizer adamw_torch_fused,
  bf16 auto, gradient_checkpointing off).
- **peft** `adapter_config.json` (`peft_type`, `r`, `lora_alpha`, `target_modules`, `num_virtual_tokens`, ...).
- **training arguments**: a transformers `TrainingArguments` / TRL `SFTConfig` dump (`to_json_string()`), JSON or
  YAML, optionally with TRL's `ModelConfig` keys (`model_name_or_path`, `use_peft`, `lora_r`, `load_in_4bit`, ...)
  as TRL recipes write them. Optimizer names are transformers' `OptimizerNames` values.

Nothing is dropped silently: every key ends up either in `RunConfig.read` (mapped, with what it became) or in
`RunConfig.ignored` (with the reason: not about memory, or memory-relevant but not modelled by peftplan).
Standard library only; PyYAML is imported when a YAML file is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["RunConfig", "RunConfigError", "load_run_config", "OPTIMIZER_MAP", "FORMATS"]

FORMATS = ("axolotl", "peft", "training-args")


class RunConfigError(ValueError):
    """A run config that cannot be read (one line, naming the file and, where relevant, the key)."""


@dataclass(frozen=True)
class RunConfig:
    """What a run config says, in peftplan's terms.

    `model`: catalog short name when the base model resolves through the catalog, else the raw hub id / path.
    `method`: a peftplan method name, or None when the file does not say (peft-less training arguments).
    `options`: method option field names -> values. `training`: `Training` field names -> values.
    `ignored`: "key: reason" for every key read but not mapped.
    """

    model: str | None
    method: str | None
    options: dict[str, Any]
    training: dict[str, Any]
    ignored: tuple[str, ...]
    source_format: str
    path: str = ""
    model_id: str | None = None  # the base model exactly as the file names it
    read: tuple[str, ...] = ()  # "key: value -> field=value" for every key mapped
    notes: tuple[str, ...] = ()  # assumptions made while mapping

    def describe(self) -> list[str]:
        """Human-readable lines: what was read, what it became, what was ignored and why."""
        name = Path(self.path).name if self.path else "run config"
        lines = [f"{name}: {self.source_format} config"]
        if self.model is not None:
            via = f" (from {self.model_id})" if self.model_id and self.model_id != self.model else ""
            lines.append(f"  model: {self.model}{via}")
        lines.append(f"  method: {self.method if self.method else '(not given by the file)'}")
        if self.options:
            lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in self.options.items()))
        if self.training:
            lines.append("  training: " + ", ".join(f"{k}={v}" for k, v in self.training.items()))
        if self.read:
            lines.append(f"  read ({len(self.read)}):")
            lines.extend(f"    {r}" for r in self.read)
        if self.notes:
            lines.append(f"  assumptions ({len(self.notes)}):")
            lines.extend(f"    {n}" for n in self.notes)
        if self.ignored:
            lines.append(f"  ignored ({len(self.ignored)}):")
            lines.extend(f"    {i}" for i in self.ignored)
        return lines

    def ignored_keys(self) -> tuple[str, ...]:
        """The keys in `ignored` (without their reasons)."""
        return tuple(i.split(":", 1)[0] for i in self.ignored)


# --------------------------------------------------------------------------------------------- reading

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
    elif fmt == "axolotl":
        _map_axolotl(reader)
    else:
        _map_training_args(reader)
    return reader.finish(fmt)


def _parse(p: Path, text: str) -> dict[str, Any]:
    suffix = p.suffix.lower()
    if suffix == ".json":
        data = _parse_json(p, text)
    elif suffix in (".yml", ".yaml"):
        data = _parse_yaml(p, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _parse_yaml(p, text)
    if data is None:
        raise RunConfigError(f"{p}: the file is empty")
    if not isinstance(data, dict):
        raise RunConfigError(f"{p}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RunConfigError(f"{p}: key {bad[0]!r} is not a string")
    return data


def _parse_json(p: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunConfigError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _parse_yaml(p: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise RunConfigError(f"{p}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunConfigError(f"{p}: not valid YAML ({problem}{where})") from None


AXOLOTL_MARKERS = ("base_model", "adapter", "micro_batch_size", "sequence_len", "lora_target_linear")
TRAINING_ARGS_MARKERS = ("per_device_train_batch_size", "gradient_accumulation_steps", "optim", "max_seq_length",
                         "use_peft", "model_name_or_path", "num_train_epochs", "per_device_eval_batch_size")


def _detect(p: Path, data: dict[str, Any]) -> str:
    if "peft_type" in data:
        return "peft"
    if any(k in data for k in AXOLOTL_MARKERS):
        return "axolotl"
    if any(k in data for k in TRAINING_ARGS_MARKERS):
        return "training-args"
    raise RunConfigError(
        f"{p}: not a recognised run config (no peft_type, axolotl base_model/adapter, "
        "or TrainingArguments per_device_train_batch_size key)")


class _Reader:
    """Consumes keys of one config; every key ends up in `read` or `ignored`."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.used: set[str] = set()
        self.mapped_keys: set[str] = set()
        self.read: list[str] = []
        self.ignored: dict[str, str] = {}
        self.notes: list[str] = []
        self.options: dict[str, Any] = {}
        self.training: dict[str, Any] = {}
        self.model: str | None = None
        self.model_id: str | None = None
        self.method: str | None = None
        self.fallback_reason: Callable[[str, Any], str] = _generic_reason

    # --- access
    def has(self, key: str) -> bool:
        return key in self.data

    def peek(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def take(self, key: str, default: Any = None) -> Any:
        if key in self.data:
            self.used.add(key)
            return self.data[key]
        return default

    def mapped(self, key: str, line: str) -> None:
        self.used.add(key)
        self.mapped_keys.add(key)
        self.read.append(f"{key}: {line}")

    def defaulted(self, key: str, line: str) -> None:
        """A key absent (or empty) whose tool default peftplan applies."""
        if key in self.data:
            self.mapped(key, f"(not set) {line}")
        else:
            self.read.append(f"{key}: (not set) {line}")

    def ignore(self, key: str, reason: str) -> None:
        self.used.add(key)
        self.ignored[key] = reason

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def error(self, key: str, message: str) -> RunConfigError:
        return RunConfigError(f"{self.path}: {key} {message}")

    # --- typed values
    def positive_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(key, f"must be a positive integer, got {value!r}")
        return value

    def number(self, key: str, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        return value

    def dropout(self, key: str, value: Any) -> float:
        v = self.number(key, value)
        if not 0.0 <= v < 1.0:
            raise self.error(key, f"must be in [0, 1), got {value!r}")
        return float(v)

    def flag(self, key: str, value: Any) -> bool:
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise self.error(key, f"must be true or false, got {value!r}")

    # --- shared mappings
    def set_model(self, key: str, raw: Any) -> None:
        if raw is None or raw == "":
            self.ignore(key, "not set")
            return
        if not isinstance(raw, str):
            raise self.error(key, f"must be a model id or path, got {raw!r}")
        from .catalog import resolve_model_name

        short = resolve_model_name(raw)
        self.model_id = raw
        self.model = short or raw
        where = f"catalog model {short}" if short else "not in the catalog (a hub id or path)"
        self.mapped(key, f"{raw} -> model={self.model} ({where})")

    def set_targets(self, key: str, value: Any) -> str | None:
        """peft target_modules (list, or a string that peft treats as a regex, or 'all-linear')."""
        if value is None or value == [] or value == "":
            return None
        if isinstance(value, str):
            if value == "all-linear":
                return "all-linear"
            self.ignore(key, f"{value!r} is a regular expression to peft (re.fullmatch on module paths): "
                             "not modelled, peft's per-model default targets used instead; pass --targets")
            return None
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = list(dict.fromkeys(value))
            if names == ["all-linear"]:
                return "all-linear"
            return ",".join(names)
        raise self.error(key, f"must be a list of module names or 'all-linear', got {value!r}")

    def finish(self, fmt: str) -> RunConfig:
        for key, value in self.data.items():
            if key in self.ignored or key in self.mapped_keys:
                continue
            if key in self.used:  # consumed into a decision without a line of its own
                self.read.append(f"{key}: {json.dumps(value, default=str)}")
            else:
                self.ignored[key] = self.fallback_reason(key, value)
        if self.method is not None:
            self._check_options()
        self._check_training()
        return RunConfig(
            model=self.model, method=self.method, options=dict(self.options), training=dict(self.training),
            ignored=tuple(f"{k}: {r}" for k, r in self.ignored.items()), source_format=fmt, path=self.path,
            model_id=self.model_id, read=tuple(self.read), notes=tuple(self.notes),
        )

    def _check_options(self) -> None:
        from .methods import MethodError, get_method

        try:
            get_method(self.method).make_options(self.options)  # type: ignore[arg-type]
        except MethodError as exc:
            raise RunConfigError(f"{self.path}: {exc}") from None
        except TypeError as exc:  # pragma: no cover - defensive
            raise RunConfigError(f"{self.path}: options do not fit method {self.method!r} ({exc})") from None

    def _check_training(self) -> None:
        from .training import Training, TrainingError

        try:
            Training(**self.training)
        except TrainingError as exc:
            raise RunConfigError(f"{self.path}: {exc}") from None


# --------------------------------------------------------------------------------------------- shared tables

# transformers OptimizerNames (training_args.py) / axolotl `optimizer` -> (peftplan optimizer, implementation).
# adamw_torch builds torch.optim.AdamW with no foreach/fused argument: torch picks foreach for CUDA params;
# adamw_torch_fused passes fused=True (trainer.py get_optimizer_cls_and_kwargs). The bitsandbytes ones are
# bnb.optim.AdamW / Lion with optim_bits 8 or 32 and is_paged; their CUDA kernels allocate no per-step scratch.
OPTIMIZER_MAP: dict[str, tuple[str, str | None]] = {
    "adamw_torch_fused": ("adamw", "fused"),
    "adamw_torch": ("adamw", "foreach"),
    "adamw_hf": ("adamw", "for-loop"),  # transformers' own AdamW (removed in v5): a per-parameter Python loop
    "adamw_bnb_8bit": ("adamw-8bit", None),
    "adamw_8bit": ("adamw-8bit", None),  # transformers: "just an alias for adamw_bnb_8bit"
    "paged_adamw_8bit": ("paged-adamw-8bit", None),
    "paged_adamw_32bit": ("paged-adamw", None),
    "adafactor": ("adafactor", None),
    "sgd": ("sgd", None),  # torch.optim.SGD without momentum: the Trainer passes no optim_args to it
    "lion_32bit": ("lion", None),
}

MEMORY_NOT_MODELLED = "memory-relevant but not modelled by peftplan"

# (regex on the key, reason): keys that do not change one step's memory, or do in ways peftplan does not model.
_GENERIC_REASONS: tuple[tuple[str, str], ...] = (
    (r"^(datasets|test_datasets|pretraining_dataset|dataset_.*|val_set_size|train_on_inputs|chat_template.*|"
     r"default_system_message|shuffle_merged_datasets|skip_prepare_dataset|push_dataset_to_hub|"
     r"dataset_text_field|dataset_kwargs|dataset_num_proc|dataset_batch_size|num_of_sequences|chars_per_token|"
     r"completion_only_loss|assistant_only_loss|remove_unused_columns|label_names|length_column_name|"
     r"group_by_length|max_train_samples|preprocessing_num_workers|data_seed|eos_token|pad_token|"
     r"field_.*|roles_to_train|train_split|test_split|input_output|sequence_len_overflow_handling|"
     r"excess_length_strategy|min_sample_len|train_sampling_strategy)$", "data, not memory"),
    (r"^(tokenizer_.*|tokenizer|tokens|special_tokens|added_tokens_overrides|processor_type|"
     r"resize_token_embeddings_to_32x|shrink_embeddings|mean_resizing_embeddings)$",
     "tokenizer settings, not memory (vocabulary size comes from the model's config.json)"),
    (r"^(model_type|type_of_model|is_.*_derived_model|model_config_type|trust_remote_code|model_revision|"
     r"revision_of_model|revision|model_config|cls_model_config|num_labels|task_type|lora_task_type|"
     r"auto_mapping|base_model_ignore_patterns|random_init_weights)$",
     "the architecture comes from the model's config.json"),
    (r"^(peft_version)$", "the peft version that saved the adapter: no memory effect"),
    (r"^(learning_rate|lr|lr_.*|lr_scheduler.*|warmup_.*|weight_decay|num_epochs|num_train_epochs|max_steps|"
     r"adam_beta\d|adam_epsilon\d?|max_grad_norm|cosine_.*|loraplus_.*|embedding_lr.*|optim_args|"
     r"label_smoothing_factor|seed|full_determinism|neftune_noise_alpha|noisy_embedding_alpha|"
     r"loss_type|loss_watchdog_.*)$",
     "optimisation hyperparameter or schedule: no effect on one step's memory"),
    (r"^(output_dir|overwrite_output_dir|logging.*|log_.*|wandb_.*|mlflow_.*|comet_.*|use_wandb|use_mlflow|"
     r"use_comet|report_to|run_name|project|trackio_.*|save.*|saves_per_epoch|resume_from_checkpoint|"
     r"auto_resume_from_checkpoints|restore_callback_states_from_checkpoint|hub_.*|push_to_hub.*|"
     r"early_stopping_patience|load_best_model_at_end|metric_for_best_model|greater_is_better|"
     r"debug|strict|local_rank|disable_tqdm|skip_memory_metrics|include_.*|profiler_steps|"
     r"gradio_.*|do_train|do_predict|ignore_data_skip|past_index|jit_mode_eval|use_ipex|"
     r"ray_.*|torchdistx_path|axolotl_config_path|batch_eval_metrics|enable_jit_checkpoint)$",
     "logging, checkpointing or run control, not memory"),
    (r"^(eval.*|do_eval|per_device_eval_batch_size|per_gpu_eval_batch_size|prediction_loss_only|"
     r"bf16_full_eval|fp16_full_eval|do_bench_eval|bench_.*|do_causal_lm_eval|use_legacy_prediction_loop|"
     r"test_.*|evals_per_epoch|eval_table_size|eval_max_new_tokens)$",
     "evaluation, not the training step peftplan estimates"),
    (r"^(dataloader_.*|group_by_length|auto_find_batch_size)$", "data loading, not GPU memory"),
    (r"^(deepspeed|fsdp.*|ddp.*|world_size|sequence_parallel_degree|context_parallel_size|tensor_parallel_size|"
     r"parallelism_config|heads_k_stride|ring_attn_func|accelerator_config|tpu_.*|mp_parameters|"
     r"ddp_backend|xpu_backend|average_tokens_across_devices)$",
     "multi-GPU sharding is " + MEMORY_NOT_MODELLED + " (one GPU holds the whole model)"),
    (r"^(device|device_map|max_memory|gpu_memory_limit|low_cpu_mem_usage|no_cuda|use_cpu|use_mps_device|"
     r"lora_on_cpu)$", "device placement, not modelled"),
    (r"^(torch_compile.*|torchdynamo)$", "torch.compile: not modelled (it can lower the activation peak)"),
    (r"^(use_liger_kernel|liger_.*|plugins|cut_cross_entropy|flash_attn_cross_entropy|flash_attn_rms_norm|"
     r"flash_attn_fuse_qkv|flash_attn_fuse_mlp|unsloth_.*|lora_mlp_kernel|lora_qkv_kernel|lora_o_kernel|"
     r"use_liger)$",
     "fused kernels (cross-entropy / norm / LoRA) are " + MEMORY_NOT_MODELLED + ": the estimate is high"),
    (r"^(torch_empty_cache_steps)$",
     "empties the CUDA caching allocator every N steps: reserved memory, not the allocated peak"),
    (r"^(fp16_opt_level|half_precision_backend|fp16_backend|tf32)$",
     "numerics backend / TF32 matmuls: no effect on memory"),
)


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _generic_reason(key: str, value: Any) -> str:
    for pattern, reason in _GENERIC_REASONS:
        if re.match(pattern, key):
            return reason if not _is_empty(value) else f"not set ({reason})"
    if _is_empty(value):
        return "not set"
    return "not a setting peftplan reads"


def _optim_args(value: Any) -> dict[str, str]:
    """`optim_args` as transformers parses it ("k1=v1,k2=v2", trainer_optimizer._parse_optim_args), or a dict."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip():
        out = {}
        for item in value.replace(" ", "").split(","):
            if "=" in item:
                k, v = item.split("=", 1)
                out[k] = v
        return out
    return {}


def _map_optimizer(r: _Reader, key: str, name: Any) -> None:
    if name is None or name == "":
        return
    if not isinstance(name, str):
        raise r.error(key, f"must be an optimizer name, got {name!r}")
    opt = OPTIMIZER_MAP.get(name)
    if opt is None:
        known = ", ".join(sorted(OPTIMIZER_MAP))
        r.ignore(key, f"optimizer {name!r} is not modelled (peftplan reads: {known}); peftplan's default used")
        return
    optimizer, impl = opt
    if optimizer == "sgd":
        # transformers 5 passes optim_args momentum/dampening/weight_decay/nesterov to torch.optim.SGD
        args = _optim_args(r.peek("optim_args"))
        try:
            momentum = float(args.get("momentum", 0))
        except ValueError:
            raise r.error("optim_args", f"momentum must be a number, got {args.get('momentum')!r}") from None
        if momentum:
            optimizer = "sgd-momentum"
            r.mapped("optim_args", f"{r.peek('optim_args')} -> momentum {momentum}: optimizer=sgd-momentum")
    r.training["optimizer"] = optimizer
    if impl is not None:
        r.training["optimizer_impl"] = impl
    r.mapped(key, f"{name} -> optimizer={optimizer}" + (f", optimizer_impl={impl}" if impl else ""))


_ATTN_IMPL = {"flash_attention_2": "flash", "flash_attention_3": "flash", "kernels-community/flash-attn": "flash",
              "kernels-community/flash-attn3": "flash", "sdpa": "sdpa", "eager": "eager"}


def _map_attn_implementation(r: _Reader, key: str, value: Any) -> None:
    if _is_empty(value):
        r.ignore(key, "not set (transformers picks sdpa)")
        return
    att = _ATTN_IMPL.get(str(value))
    if att is None:
        r.ignore(key, f"attention {value!r} is not modelled (peftplan models eager, sdpa, flash)")
        return
    r.training["attention"] = att
    r.mapped(key, f"{value} -> attention={att}")


_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32"}

TRAINS_BASE_WEIGHTS = ("full", "lisa", "bitfit")


def _precision(amp: str | None, load: str | None, method: str | None) -> str:
    """Peftplan precision from the autocast flag (bf16/fp16/None) and the dtype the model is loaded in.

    The Trainer's bf16/fp16 flags autocast the matmuls; what the trained weights are stored in is the load
    dtype. Methods that train base weights loaded in half precision therefore train in pure half precision
    (no fp32 master copy); adapter methods keep their adapters in fp32 (peft autocast_adapter_dtype).
    """
    if amp is None:
        if load in ("bf16", "fp16"):
            return load
        return "fp32"
    if method in TRAINS_BASE_WEIGHTS and load == amp:
        return amp
    return f"{amp}-mixed"


# --------------------------------------------------------------------------------------------- peft

_PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix",
                 "P_TUNING": "ptuning"}

_PEFT_INIT = "initialisation only, no effect on memory"


def _map_peft(r: _Reader) -> None:
    peft_type = r.take("peft_type")
    r.set_model("base_model_name_or_path", r.take("base_model_name_or_path"))
    if not isinstance(peft_type, str):
        raise r.error("peft_type", f"must be a string, got {peft_type!r}")
    method = _PEFT_METHODS.get(peft_type.upper())
    if method is None:
        r.ignore("peft_type", f"{peft_type} has no peftplan method (peftplan models LORA, IA3, PROMPT_TUNING, "
                              "PREFIX_TUNING, P_TUNING); pass --method")
        return
    if method == "lora" and r.flag("use_dora", r.take("use_dora")):
        method = "dora"
        r.mapped("use_dora", "true -> method dora")
    elif r.has("use_dora"):
        r.mapped("use_dora", "false")
    r.method = method
    r.mapped("peft_type", f"{peft_type} -> method {method}")
    r.note("adapter_config.json does not record whether the base model was quantized: "
           "for a QLoRA adapter use method qlora")
    if r.has("inference_mode"):
        r.ignore("inference_mode", "saved adapters set it true; peftplan estimates the training step")
    if r.has("task_type"):
        r.ignore("task_type", "the model head comes from the model's config.json")

    if method in ("lora", "dora"):
        _map_peft_lora(r)
    elif method == "ia3":
        _map_peft_ia3(r)
    else:
        _map_peft_prompting(r, method)


def _default_or_ignore(r: _Reader, key: str, expected: tuple[Any, ...], modelled: str, reason: str) -> None:
    """A key whose only modelled value(s) are `expected`: read when it matches, ignored with `reason` if not."""
    if not r.has(key):
        return
    value = r.take(key)
    if value in expected or _is_empty(value) and any(_is_empty(e) for e in expected):
        r.mapped(key, f"{json.dumps(value)} ({modelled})")
    else:
        r.ignore(key, f"{json.dumps(value)}: {reason}")


def _map_peft_lora(r: _Reader) -> None:
    if r.has("r"):
        r.options["rank"] = r.positive_int("r", r.take("r"))
        r.mapped("r", f"{r.options['rank']} -> rank")
    if r.has("lora_alpha"):
        r.options["alpha"] = r.number("lora_alpha", r.take("lora_alpha"))
        r.mapped("lora_alpha", f"{r.options['alpha']} -> alpha")
    if r.has("lora_dropout"):
        r.options["dropout"] = r.dropout("lora_dropout", r.take("lora_dropout"))
        r.mapped("lora_dropout", f"{r.options['dropout']} -> dropout")
    if r.has("target_modules"):
        raw = r.take("target_modules")
        targets = r.set_targets("target_modules", raw)
        if targets is not None:
            r.options["targets"] = targets
            r.mapped("target_modules", f"{json.dumps(raw)} -> targets={targets}")
        elif _is_empty(raw):
            r.mapped("target_modules", "null -> peft's per-model default targets")
    _default_or_ignore(r, "bias", ("none",), "no trainable bias, as modelled",
                       "trainable biases are " + MEMORY_NOT_MODELLED + " (estimate low)")
    _default_or_ignore(r, "modules_to_save", (None,), "no extra trained modules",
                       "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)")
    _default_or_ignore(r, "layers_to_transform", (None,), "every layer, as modelled",
                       "LoRA on a subset of layers is " + MEMORY_NOT_MODELLED + " (estimate high)")
    _default_or_ignore(r, "layers_pattern", (None,), "unused", "only used with layers_to_transform")
    _default_or_ignore(r, "rank_pattern", ({}, None), "one rank everywhere, as modelled",
                       "per-module ranks are " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "alpha_pattern", ({}, None), "no per-module alpha", "scaling only, no memory effect")
    _default_or_ignore(r, "exclude_modules", (None,), "nothing excluded",
                       "excluded modules are " + MEMORY_NOT_MODELLED + " (estimate high)")
    _default_or_ignore(r, "layer_replication", (None,), "no replication",
                       "replicated layers are " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "trainable_token_indices", (None,), "none",
                       "trainable token rows are " + MEMORY_NOT_MODELLED + " (small)")
    _default_or_ignore(r, "target_parameters", (None, []), "none",
                       "LoRA on raw parameters (MoE experts) is " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "lora_bias", (False,), "no bias on lora_B",
                       "a bias on lora_B is " + MEMORY_NOT_MODELLED + " (negligible)")
    _default_or_ignore(r, "use_qalora", (False,), "plain LoRA", "QA-LoRA is " + MEMORY_NOT_MODELLED)
    _default_or_ignore(r, "megatron_config", (None,), "no Megatron layers", "Megatron tensor parallelism: not modelled")
    for key, reason in (
        ("fan_in_fan_out", "weight layout of Conv1D models (GPT-2): no memory effect"),
        ("enable_lora", "old peft MergedLinear option: no memory effect"),
        ("use_rslora", "rank-stabilised scaling alpha/sqrt(r): no memory effect"),
        ("init_lora_weights", _PEFT_INIT), ("loftq_config", _PEFT_INIT), ("eva_config", _PEFT_INIT),
        ("corda_config", _PEFT_INIT), ("megatron_core", "Megatron module name: not used"),
        ("runtime_config", "runtime options (ephemeral offload for DoRA init): not modelled"),
        ("qalora_group_size", "only used with use_qalora"),
        ("ensure_weight_tying", "ties adapters of tied embeddings: not modelled"),
    ):
        if r.has(key):
            r.ignore(key, reason)


def _map_peft_ia3(r: _Reader) -> None:
    if r.has("target_modules"):
        raw = r.take("target_modules")
        targets = r.set_targets("target_modules", raw)
        if targets is not None:
            r.options["targets"] = targets
            r.mapped("target_modules", f"{json.dumps(raw)} -> targets={targets}")
        elif _is_empty(raw):
            r.mapped("target_modules", "null -> peft's per-model default targets")
    if r.has("feedforward_modules"):
        r.ignore("feedforward_modules", "peftplan takes the feed-forward (input-scaled) modules from peft's "
                                        "per-model list; a custom list is not modelled (a vector of in_ vs "
                                        "out_features per module)")
    _default_or_ignore(r, "modules_to_save", (None,), "no extra trained modules",
                       "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)")
    _default_or_ignore(r, "exclude_modules", (None,), "nothing excluded", MEMORY_NOT_MODELLED)
    for key, reason in (("fan_in_fan_out", "weight layout of Conv1D models: no memory effect"),
                        ("init_ia3_weights", _PEFT_INIT)):
        if r.has(key):
            r.ignore(key, reason)


def _map_peft_prompting(r: _Reader, method: str) -> None:
    if r.has("num_virtual_tokens"):
        r.options["virtual_tokens"] = r.positive_int("num_virtual_tokens", r.take("num_virtual_tokens"))
        r.mapped("num_virtual_tokens", f"{r.options['virtual_tokens']} -> virtual_tokens")
    for key in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
        if r.has(key):
            r.ignore(key, "peft fills it from the model's config.json; peftplan derives it the same way")
    for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
        if r.has(key):
            r.ignore(key, _PEFT_INIT)
    if method == "prefix":
        _default_or_ignore(r, "prefix_projection", (False, None), "no projection MLP, as modelled",
                           "the prefix projection MLP is " + MEMORY_NOT_MODELLED + " (estimate low)")
        if r.has("encoder_hidden_size"):
            r.ignore("encoder_hidden_size", "only used with prefix_projection")
    if method == "ptuning":
        _default_or_ignore(r, "encoder_reparameterization_type", ("MLP", None), "MLP prompt encoder, as modelled",
                           "an LSTM prompt encoder is " + MEMORY_NOT_MODELLED)
        _default_or_ignore(r, "encoder_hidden_size", (None,), "token_dim, as modelled",
                           "peftplan sizes the prompt-encoder MLP at token_dim (peft's default when unset); "
                           "another width is " + MEMORY_NOT_MODELLED)
        for key in ("encoder_num_layers", "encoder_dropout"):
            if r.has(key):
                r.ignore(key, "used by the LSTM encoder only")
    _default_or_ignore(r, "modules_to_save", (None,), "no extra trained modules",
                       "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)")


# --------------------------------------------------------------------------------------------- axolotl

def _map_axolotl(r: _Reader) -> None:
    r.fallback_reason = _axolotl_reason
    base = r.take("base_model")
    cfg_source = r.take("base_model_config")
    if not _is_empty(cfg_source):
        r.set_model("base_model_config", cfg_source)
        if not _is_empty(base):
            r.mapped("base_model", f"{base} (weights; the config comes from base_model_config)")
    else:
        if r.has("base_model_config"):
            r.ignore("base_model_config", "not set (the config comes from base_model)")
        if r.has("base_model") or base is not None:
            r.set_model("base_model", base)

    _axolotl_method(r)
    _axolotl_training(r)


def _axolotl_method(r: _Reader) -> None:
    adapter = r.take("adapter")
    in4 = r.flag("load_in_4bit", r.take("load_in_4bit"))
    in8 = r.flag("load_in_8bit", r.take("load_in_8bit"))
    lisa = r.take("lisa_n_layers")
    if in4 and in8:
        raise r.error("load_in_4bit", "and load_in_8bit are both true")
    lora_keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                 "lora_fan_in_fan_out", "lora_model_dir", "lora_modules_to_save", "peft_use_dora", "peft_use_rslora",
                 "lora_target_parameters", "lora_exclude_modules", "peft_layers_to_transform", "peft_layers_pattern",
                 "lora_rank_pattern", "lora_alpha_pattern", "peft_init_lora_weights", "peft_layer_replication",
                 "peft_trainable_token_indices", "peft_ensure_weight_tying")

    if _is_empty(adapter):
        if r.has("adapter"):
            r.mapped("adapter", "not set -> no adapter")
        for key in lora_keys:
            if r.has(key):
                value = r.peek(key)
                r.ignore(key, "not set" if _is_empty(value) else "no adapter is set, so axolotl does not use it")
        if not _is_empty(lisa):
            r.method = "lisa"
            r.options["lisa_layers"] = r.positive_int("lisa_n_layers", lisa)
            r.mapped("lisa_n_layers", f"{lisa} -> method lisa, lisa_layers={lisa}")
            for key in ("lisa_step_interval", "lisa_layers_attribute"):
                if r.has(key):
                    r.ignore(key, "when / where layers are resampled: one step's peak is the same")
        else:
            if r.has("lisa_n_layers"):
                r.ignore("lisa_n_layers", "not set")
            r.method = "full"
            r.note("no adapter and no lisa_n_layers: full fine-tuning")
            unfrozen = r.take("unfrozen_parameters")
            if not _is_empty(unfrozen):
                r.ignore("unfrozen_parameters", "training only some parameters is " + MEMORY_NOT_MODELLED
                         + ": estimated as full fine-tuning (high)")
        if in4 or in8:
            r.note("load_in_4bit/8bit without an adapter: axolotl cannot train a quantized model in full; "
                   "quantization not applied")
        _mark_quant_flags(r, None)
        return

    if not isinstance(adapter, str):
        raise r.error("adapter", f"must be a string, got {adapter!r}")
    if adapter not in ("lora", "qlora"):
        r.ignore("adapter", f"{adapter!r} has no peftplan method (peftplan reads lora and qlora); pass --method")
        _mark_quant_flags(r, None)
        return
    if not _is_empty(lisa):
        r.ignore("lisa_n_layers", "axolotl's LISA is for full fine-tuning; with an adapter it is not modelled")

    bnb = r.take("bnb_config_kwargs") or {}
    if not isinstance(bnb, dict):
        raise r.error("bnb_config_kwargs", f"must be a mapping, got {bnb!r}")
    dora = r.flag("peft_use_dora", r.take("peft_use_dora"))

    if adapter == "qlora" or in4 or in8:
        r.method = "qlora"
        if in8:
            r.options["quant"] = "int8"
            what = "LoRA on an 8-bit (LLM.int8) base -> method qlora, quant=int8"
            if adapter == "qlora":
                r.note("adapter: qlora with load_in_8bit: axolotl builds its 4-bit BitsAndBytesConfig only with "
                       "load_in_4bit; read as an 8-bit base")
        elif adapter == "qlora":
            quant = bnb.get("bnb_4bit_quant_type", "nf4")
            double = bnb.get("bnb_4bit_use_double_quant", True)
            if quant not in ("nf4", "fp4"):
                raise r.error("bnb_config_kwargs", f"bnb_4bit_quant_type must be nf4 or fp4, got {quant!r}")
            r.options["quant"] = quant
            r.options["double_quant"] = bool(double)
            what = f"-> method qlora, quant={quant}, double_quant={bool(double)}"
            if "bnb_4bit_quant_type" not in bnb or "bnb_4bit_use_double_quant" not in bnb:
                r.note("axolotl's qlora BitsAndBytesConfig: bnb_4bit_quant_type nf4, bnb_4bit_use_double_quant "
                       "true (unless bnb_config_kwargs says otherwise)")
            if not in4:
                r.note("adapter: qlora without load_in_4bit: axolotl requires load_in_4bit: true; read as 4-bit")
        else:  # lora + load_in_4bit
            r.options["quant"] = "fp4"
            r.options["double_quant"] = False
            what = "LoRA with load_in_4bit -> method qlora, quant=fp4, double_quant=false"
            r.note("adapter: lora with load_in_4bit: axolotl builds no BitsAndBytesConfig for this pair and "
                   "transformers' load_in_4bit defaults apply (fp4, no double quant); use adapter: qlora for NF4")
        # axolotl runs prepare_model_for_kbit_training(use_gradient_checkpointing=cfg.gradient_checkpointing) and
        # then casts norms, embeddings and lm_head back to torch_dtype (loaders/model.py
        # _configure_embedding_dtypes): nothing stays upcast to fp32 and checkpointing follows the config.
        r.options["kbit_prep"] = False
        r.note("axolotl casts norms, embeddings and lm_head back to the load dtype after "
               "prepare_model_for_kbit_training and enables gradient checkpointing only when "
               "gradient_checkpointing is set: kbit_prep=False")
        r.mapped("adapter", f"{adapter} {what}")
        for key, val in bnb.items():
            if key not in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
                r.note(f"bnb_config_kwargs.{key}={val!r} not modelled")
        if bnb:
            r.mapped("bnb_config_kwargs", json.dumps(bnb, default=str))
        if dora:
            r.ignore("peft_use_dora", "DoRA on a quantized base (QDoRA) is " + MEMORY_NOT_MODELLED
                     + ": estimated as QLoRA (low)")
    else:
        r.method = "dora" if dora else "lora"
        if r.has("bnb_config_kwargs"):
            r.ignore("bnb_config_kwargs", "no quantized base")
        r.mapped("adapter", f"lora -> method {r.method}")
        if r.has("peft_use_dora"):
            r.mapped("peft_use_dora", f"{dora}" + (" -> method dora" if dora else ""))
    _mark_quant_flags(r, r.options.get("quant"))
    _axolotl_lora_options(r)


def _mark_quant_flags(r: _Reader, quant: str | None) -> None:
    for key in ("load_in_4bit", "load_in_8bit"):
        if r.has(key):
            value = r.peek(key)
            if quant is None:
                r.mapped(key, f"{json.dumps(value)}" + (" (not applied)" if r.flag(key, value) else ""))
            else:
                r.mapped(key, f"{json.dumps(value)}" + (f" -> quant={quant}" if r.flag(key, value) else ""))


def _axolotl_lora_options(r: _Reader) -> None:
    if not _is_empty(r.peek("lora_r")):
        r.options["rank"] = r.positive_int("lora_r", r.take("lora_r"))
        r.mapped("lora_r", f"{r.options['rank']} -> rank")
    if not _is_empty(r.peek("lora_alpha")):
        r.options["alpha"] = r.number("lora_alpha", r.take("lora_alpha"))
        r.mapped("lora_alpha", f"{r.options['alpha']} -> alpha")
    if not _is_empty(r.peek("lora_dropout")):
        r.options["dropout"] = r.dropout("lora_dropout", r.take("lora_dropout"))
        r.mapped("lora_dropout", f"{r.options['dropout']} -> dropout")
    linear = r.flag("lora_target_linear", r.take("lora_target_linear"))
    modules = r.take("lora_target_modules")
    if linear:
        r.options["targets"] = "all-linear"
        r.mapped("lora_target_linear", "true -> targets=all-linear (every linear but the output head)")
        if not _is_empty(modules):
            r.ignore("lora_target_modules", "axolotl adds these to every linear (lora_target_linear); "
                                            "non-linear targets (embeddings) are " + MEMORY_NOT_MODELLED)
        elif r.has("lora_target_modules"):
            r.ignore("lora_target_modules", "not set")
    else:
        if r.has("lora_target_linear"):
            r.mapped("lora_target_linear", f"{json.dumps(r.peek('lora_target_linear'))}")
        targets = r.set_targets("lora_target_modules", modules)
        if targets is not None:
            r.options["targets"] = targets
            r.mapped("lora_target_modules", f"{json.dumps(modules)} -> targets={targets}")
        elif r.has("lora_target_modules") and _is_empty(modules):
            r.ignore("lora_target_modules", "not set (peft's per-model default targets)")
    for key, reason in (
        ("lora_modules_to_save", "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)"),
        ("lora_target_parameters", "LoRA on raw parameters (MoE experts) is " + MEMORY_NOT_MODELLED),
        ("lora_exclude_modules", "excluded modules are " + MEMORY_NOT_MODELLED + " (estimate high)"),
        ("peft_layers_to_transform", "LoRA on a subset of layers is " + MEMORY_NOT_MODELLED + " (estimate high)"),
        ("peft_layers_pattern", "only used with peft_layers_to_transform"),
        ("lora_rank_pattern", "per-module ranks are " + MEMORY_NOT_MODELLED),
        ("lora_alpha_pattern", "scaling only, no memory effect"),
        ("peft_layer_replication", "replicated layers are " + MEMORY_NOT_MODELLED),
        ("peft_trainable_token_indices", "trainable token rows are " + MEMORY_NOT_MODELLED + " (small)"),
        ("lora_fan_in_fan_out", "weight layout of Conv1D models (GPT-2): no memory effect"),
        ("lora_model_dir", "resumes a saved adapter whose adapter_config.json governs rank and targets: "
                           "read that file for its shapes"),
        ("peft_use_rslora", "rank-stabilised scaling alpha/sqrt(r): no memory effect"),
        ("peft_init_lora_weights", _PEFT_INIT),
        ("peft_ensure_weight_tying", "ties adapters of tied embeddings: not modelled"),
    ):
        if r.has(key) and key not in r.used:
            value = r.peek(key)
            r.ignore(key, "not set" if _is_empty(value) else reason)


def _axolotl_training(r: _Reader) -> None:
    def integer(key: str, field_name: str, default: int) -> None:
        value = r.take(key)
        if _is_empty(value):
            r.training[field_name] = default
            r.defaulted(key, f"axolotl default {default} -> {field_name}={default}")
        else:
            r.training[field_name] = r.positive_int(key, value)
            r.mapped(key, f"{value} -> {field_name}={value}")

    integer("micro_batch_size", "micro_batch", 1)
    integer("sequence_len", "seq_len", 512)
    integer("gradient_accumulation_steps", "grad_accum", 1)
    if r.has("batch_size") and not _is_empty(r.peek("batch_size")):
        r.ignore("batch_size", "total batch across GPUs and accumulation: micro_batch_size sets one step's shapes")
    if r.has("eval_batch_size"):
        r.ignore("eval_batch_size", "evaluation, not the training step peftplan estimates")
    for key, reason in (
        ("sample_packing", "packing changes tokens per sequence, not the per-step shapes peftplan models "
                           "(each micro-batch is still micro_batch_size x sequence_len tokens)"),
        ("pad_to_sequence_len", "peftplan already assumes every sequence is sequence_len tokens"),
        ("eval_sample_packing", "evaluation only"),
        ("sample_packing_eff_est", "packing efficiency: data, not per-step shapes"),
        ("sample_packing_group_size", "packing: data, not per-step shapes"),
        ("sample_packing_bin_size", "packing: data, not per-step shapes"),
        ("sample_packing_sequentially", "packing: data, not per-step shapes"),
        ("multipack_real_batches", "packing: data, not per-step shapes"),
        ("batch_flattening", "padding-free batching: fewer real tokens, not modelled (estimate high)"),
        ("max_packed_sequence_len", "packing: data, not per-step shapes"),
    ):
        if r.has(key):
            r.ignore(key, reason if not _is_empty(r.peek(key)) else "not set")

    # gradient checkpointing: true / false / "offload" / "offload_disk" (config reference)
    gc = r.take("gradient_checkpointing")
    if isinstance(gc, str) and gc.lower() in ("offload", "offload_disk"):
        r.training["grad_ckpt"] = True
        r.mapped("gradient_checkpointing", f"{gc} -> grad_ckpt=True")
        r.note(f"gradient_checkpointing: {gc} keeps the checkpointed activations off the GPU: not modelled "
               "(estimate high by one hidden state per layer)")
    else:
        on = r.flag("gradient_checkpointing", gc)
        r.training["grad_ckpt"] = on
        if r.has("gradient_checkpointing"):
            r.mapped("gradient_checkpointing", f"{json.dumps(gc)} -> grad_ckpt={on}")
        else:
            r.defaulted("gradient_checkpointing", "axolotl default false -> grad_ckpt=False")
    if r.has("gradient_checkpointing_kwargs"):
        kwargs = r.peek("gradient_checkpointing_kwargs")
        r.ignore("gradient_checkpointing_kwargs", "not set" if _is_empty(kwargs) else
                 "use_reentrant and other checkpointing options: not modelled")

    # attention: flex > flash > sdp > eager (loaders/model.py _set_attention_config); newer axolotl also takes
    # attn_implementation directly
    attention = None
    for key, att in (("flex_attention", None), ("flash_attention", "flash"), ("sdp_attention", "sdpa"),
                     ("xformers_attention", "sdpa"), ("eager_attention", "eager")):
        if not r.has(key):
            continue
        on = r.flag(key, r.take(key))
        if not on:
            r.mapped(key, f"{json.dumps(r.peek(key))}")
            continue
        if attention is not None:
            r.ignore(key, f"attention already set by {attention[0]}")
            continue
        if att is None:
            r.ignore(key, "flex attention is not modelled (peftplan models eager, sdpa, flash)")
            attention = (key, None)
            continue
        attention = (key, att)
        r.training["attention"] = att
        extra = " (xformers memory-efficient attention keeps no T x T scores, like SDPA's kernels)" \
            if key == "xformers_attention" else ""
        r.mapped(key, f"true -> attention={att}{extra}")
    if r.has("attn_implementation"):
        if attention is None:
            _map_attn_implementation(r, "attn_implementation", r.take("attn_implementation"))
        else:
            r.ignore("attn_implementation", f"attention already set by {attention[0]}")
    for key in ("s2_attention",):
        if r.has(key):
            r.ignore(key, "not set" if not r.peek(key) else "shifted-sparse attention is " + MEMORY_NOT_MODELLED)

    _axolotl_precision(r)

    opt = r.take("optimizer")
    if _is_empty(opt):
        r.training["optimizer"], r.training["optimizer_impl"] = "adamw", "fused"
        r.defaulted("optimizer", "axolotl default adamw_torch_fused -> optimizer=adamw, optimizer_impl=fused")
    else:
        _map_optimizer(r, "optimizer", opt)
    if r.has("optim_target_modules"):
        r.ignore("optim_target_modules", "GaLore-style optimizer targets: not modelled")


def _axolotl_precision(r: _Reader) -> None:
    """axolotl: torch_dtype = bf16 if bf16/bfloat16, fp16 if fp16/float16/load_in_8bit, else fp32; the Trainer
    autocasts with bf16/fp16; `bfloat16`/`float16` ("no AMP") load in half precision without autocast."""
    pure = None
    for key, dt in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")):
        if r.has(key):
            if r.flag(key, r.take(key)) and pure is None:
                pure = (key, dt)
                r.mapped(key, f"true -> precision={dt} (no autocast)")
            else:
                r.mapped(key, f"{json.dumps(r.peek(key))}")
    bf16 = r.take("bf16", "auto")
    fp16 = r.take("fp16")
    if pure is not None:
        for key in ("bf16", "fp16"):
            if r.has(key):
                r.ignore(key, f"precision already set by {pure[0]}")
        r.training["precision"] = pure[1]
        return
    auto = isinstance(bf16, str) and bf16.lower() == "auto"
    if auto or isinstance(bf16, str) and bf16.lower() == "full":
        amp: str | None = "bf16"
    else:
        amp = "bf16" if r.flag("bf16", bf16) else None
    if amp is None and r.flag("fp16", fp16):
        amp = "fp16"
    precision = "fp32" if amp is None else _precision(amp, amp, r.method)
    why = ""
    if r.method in TRAINS_BASE_WEIGHTS and amp is not None:
        why = f" (axolotl loads the model in {amp}: trained weights have no fp32 copy)"
    if auto and precision == "bf16-mixed":
        # axolotl's auto is bf16 where the GPU has it, fp16 otherwise: peftplan's own GPU-dependent default
        result = ("precision left to peftplan's GPU default (bf16-mixed; fp16-mixed on GPUs without bf16), "
                  "as axolotl's auto does")
    else:
        r.training["precision"] = precision
        result = f"precision={precision}{why}"
        if auto:
            r.note("bf16: auto is fp16 on GPUs without bf16 (pre-Ampere): pass --precision fp16 there")
    shown = bf16 if isinstance(bf16, str) else json.dumps(bf16)
    if r.has("bf16"):
        r.mapped("bf16", f"{shown} -> {result}" if amp == "bf16" else shown)
    else:
        r.read.append(f"bf16: (not set) axolotl default auto -> {result}")
    if r.has("fp16"):
        r.mapped("fp16", json.dumps(fp16) + (f" -> {result}" if amp == "fp16" else ""))
    if amp is None:
        r.read.append("precision: neither bf16 nor fp16 -> precision=fp32 (axolotl loads in float32)")


def _axolotl_reason(key: str, value: Any) -> str:
    specific = {
        "dataset_prepared_path": "data, not memory",
        "fp8": "FP8 training is " + MEMORY_NOT_MODELLED,
        "gptq": "GPTQ-quantized bases are " + MEMORY_NOT_MODELLED,
        "relora_steps": "ReLoRA restarts: one step's memory is LoRA's",
        "embeddings_skip_upcast": "embedding dtype detail: not modelled",
        "qlora_sharded_model_loading": "loading strategy, not the training step",
        "rl": "preference / RL training (reference model, paired sequences) is " + MEMORY_NOT_MODELLED,
        "reward_model": "reward-model head: not modelled",
        "process_reward_model": "reward-model head: not modelled",
        "peft": "nested peft options (loftq): initialisation only",
        "overrides_of_model_kwargs": "extra from_pretrained kwargs: not modelled",
        "model_kwargs": "extra from_pretrained kwargs: not modelled",
        "rope_scaling": "RoPE scaling: no memory effect",
        "max_prompt_len": "RL prompt length: not used for SFT",
    }
    if key.startswith("relora_"):
        return "ReLoRA restarts: one step's memory is LoRA's" if not _is_empty(value) else "not set"
    if key in specific:
        return specific[key] if not _is_empty(value) else "not set"
    return _generic_reason(key, value)


# --------------------------------------------------------------------------------------------- TrainingArguments

def _map_training_args(r: _Reader) -> None:
    r.fallback_reason = _generic_reason
    if r.has("model_name_or_path"):
        r.set_model("model_name_or_path", r.take("model_name_or_path"))

    # model_init_kwargs (TRL SFTConfig) and TRL ModelConfig keys: load dtype and attention
    load_dtype: str | None = None
    init = r.take("model_init_kwargs")
    if init is not None and not isinstance(init, dict):
        raise r.error("model_init_kwargs", f"must be a mapping, got {init!r}")
    init = init or {}
    dtype_raw = None
    for key in ("torch_dtype", "dtype"):
        if r.has(key) and not _is_empty(r.peek(key)):
            dtype_raw = (key, r.take(key))
        elif key in init and not _is_empty(init[key]):
            dtype_raw = (f"model_init_kwargs.{key}", init[key])
    if dtype_raw is not None:
        load_dtype = _DTYPES.get(str(dtype_raw[1]))
        if load_dtype is None:
            r.note(f"{dtype_raw[0]}={dtype_raw[1]!r}: load dtype not known here (auto = the checkpoint's dtype)")
        elif not dtype_raw[0].startswith("model_init_kwargs"):
            r.mapped(dtype_raw[0], f"{dtype_raw[1]} (load dtype {load_dtype})")
    attn = r.take("attn_implementation") if r.has("attn_implementation") else init.get("attn_implementation")
    if attn is not None or r.has("attn_implementation"):
        _map_attn_implementation(r, "attn_implementation", attn)
    if init:
        extra = {k: v for k, v in init.items() if k not in ("torch_dtype", "dtype", "attn_implementation")}
        shown = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        r.mapped("model_init_kwargs", json.dumps(init, default=str)
                 + (f" (load dtype {load_dtype})" if load_dtype else "")
                 + (f"; not modelled: {shown}" if shown else ""))

    _training_args_method(r)

    if r.has("per_device_train_batch_size"):
        v = r.positive_int("per_device_train_batch_size", r.take("per_device_train_batch_size"))
        r.training["micro_batch"] = v
        r.mapped("per_device_train_batch_size", f"{v} -> micro_batch={v}")
    if r.has("per_gpu_train_batch_size"):
        value = r.take("per_gpu_train_batch_size")
        if not _is_empty(value) and "micro_batch" not in r.training:
            r.training["micro_batch"] = r.positive_int("per_gpu_train_batch_size", value)
            r.mapped("per_gpu_train_batch_size", f"{value} -> micro_batch={value} (deprecated name)")
        else:
            r.ignore("per_gpu_train_batch_size", "deprecated; per_device_train_batch_size is used")
    if r.has("gradient_accumulation_steps"):
        v = r.positive_int("gradient_accumulation_steps", r.take("gradient_accumulation_steps"))
        r.training["grad_accum"] = v
        r.mapped("gradient_accumulation_steps", f"{v} -> grad_accum={v}")
    seq_keys = [k for k in ("max_length", "max_seq_length") if r.has(k) and not _is_empty(r.peek(k))]
    if seq_keys:
        key = seq_keys[0]
        v = r.positive_int(key, r.take(key))
        r.training["seq_len"] = v
        r.mapped(key, f"{v} -> seq_len={v}")
        for other in seq_keys[1:]:
            r.ignore(other, f"{key} is used")
    for key in ("max_length", "max_seq_length"):
        if r.has(key) and key not in r.used:
            r.ignore(key, "not set (peftplan's default sequence length is TRL's max_length default, 1024)")
    # transformers 5: activation_checkpointing(_kwargs); gradient_checkpointing(_kwargs) are deprecated aliases,
    # used only when the new name is unset, and mirror it in a to_json_string() dump (training_args.py)
    ckpt_key = next((k for k in ("activation_checkpointing", "gradient_checkpointing")
                     if r.has(k) and r.peek(k) is not None), None)
    if ckpt_key is not None:
        gc = r.take(ckpt_key)
        on = r.flag(ckpt_key, gc)
        r.training["grad_ckpt"] = on
        r.mapped(ckpt_key, f"{json.dumps(gc)} -> grad_ckpt={on}")
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if r.has(key) and key != ckpt_key:
            r.ignore(key, "not set" if r.peek(key) is None else f"alias of {ckpt_key}, which is used")
    for key in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        if not r.has(key):
            continue
        kwargs = r.peek(key) or {}
        if isinstance(kwargs, dict) and kwargs.get("offload"):
            r.ignore(key, "offload=True keeps checkpointed activations in host memory: "
                     + MEMORY_NOT_MODELLED + " (estimate high)")
        else:
            r.ignore(key, "not set" if _is_empty(kwargs) else
                     "use_reentrant and other checkpointing options: not modelled")
    if r.has("use_cache"):
        r.ignore("use_cache", "false: no KV cache in training, as modelled" if not r.peek("use_cache") else
                 "a KV cache kept during training is " + MEMORY_NOT_MODELLED + " (transformers drops it under "
                 "gradient checkpointing)")
    if r.has("activation_offloading"):
        value = r.take("activation_offloading")
        r.ignore("activation_offloading", "activations offloaded to the CPU are " + MEMORY_NOT_MODELLED
                 + " (estimate high)" if r.flag("activation_offloading", value) else "false")
    for key, reason in (("packing", "packing changes tokens per sequence, not the per-step shapes peftplan "
                                    "models (each micro-batch is still micro_batch x max_length tokens)"),
                        ("padding_free", "padding-free batching: fewer real tokens, not modelled (estimate high)"),
                        ("packing_strategy", "packing: data, not per-step shapes"),
                        ("pad_to_multiple_of", "padding: data, not per-step shapes"),
                        ("eval_packing", "evaluation only")):
        if r.has(key):
            r.ignore(key, reason if r.peek(key) else f"{json.dumps(r.peek(key))} (off)")

    # precision: bf16 / fp16 flags autocast; the load dtype decides what trained weights are stored in
    bf16 = r.take("bf16")
    fp16 = r.take("fp16")
    amp = "bf16" if r.flag("bf16", bf16) else ("fp16" if r.flag("fp16", fp16) else None)
    if amp is None and bf16 is None and fp16 is None:
        if r.has("bf16") or r.has("fp16"):
            r.note("bf16 and fp16 are null: TRL's SFTConfig then uses bf16; peftplan's default precision used")
        for key in ("bf16", "fp16"):
            if r.has(key):
                r.mapped(key, "null")
        if load_dtype in ("bf16", "fp16") and r.method in TRAINS_BASE_WEIGHTS:
            r.training["precision"] = load_dtype
            r.note(f"model loaded in {load_dtype}: trained weights have no fp32 copy")
    elif r.has("bf16") or r.has("fp16"):
        load = load_dtype if load_dtype is not None else amp
        if load_dtype is None and r.method in TRAINS_BASE_WEIGHTS:
            load = None  # unknown load dtype: keep fp32 master weights (peftplan's mixed-precision reading)
        precision = _precision(amp, load, r.method)
        r.training["precision"] = precision
        for key, val in (("bf16", bf16), ("fp16", fp16)):
            if r.has(key):
                hit = (key == "bf16" and amp == "bf16") or (key == "fp16" and amp == "fp16")
                r.mapped(key, f"{json.dumps(val)}" + (f" -> precision={precision}" if hit or amp is None else ""))
        if amp is not None and r.method in TRAINS_BASE_WEIGHTS and precision == amp:
            r.note(f"model loaded in {load_dtype} and trained with {amp} autocast: no fp32 master weights")

    if r.has("optim"):
        _map_optimizer(r, "optim", r.take("optim"))
    if r.has("optim_target_modules"):
        r.ignore("optim_target_modules", "not set" if _is_empty(r.peek("optim_target_modules"))
                 else "GaLore-style optimizer targets: not modelled")
    if r.has("auto_find_batch_size") and r.peek("auto_find_batch_size"):
        r.ignore("auto_find_batch_size", "the Trainer halves the batch on OOM: peftplan estimates the batch given")


def _training_args_method(r: _Reader) -> None:
    """TRL ModelConfig: use_peft + lora_* + load_in_4bit/8bit (+ bnb_4bit_quant_type, use_bnb_nested_quant)."""
    peft_keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "use_rslora",
                 "lora_modules_to_save", "lora_target_parameters", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                 "load_in_4bit", "load_in_8bit")
    if not r.has("use_peft"):
        for key in peft_keys:
            if r.has(key):
                r.ignore(key, "not set" if _is_empty(r.peek(key)) else
                         "use_peft is not set (TRL's default is false), so TRL does not use it")
        if r.model is not None:
            r.method = "full"
            r.note("use_peft is not set: TRL's ModelConfig default is false, full fine-tuning")
        else:
            r.note("the file does not say which method is trained (no use_peft): pass --method")
        return
    use_peft = r.flag("use_peft", r.take("use_peft"))
    in4 = r.flag("load_in_4bit", r.take("load_in_4bit"))
    in8 = r.flag("load_in_8bit", r.take("load_in_8bit"))
    if in4 and in8:
        raise r.error("load_in_4bit", "and load_in_8bit are both true")
    if not use_peft:
        r.method = "full"
        r.mapped("use_peft", "false -> method full")
        for key in peft_keys:
            if r.has(key) and key not in r.used:
                r.ignore(key, "use_peft is false")
        for key in ("load_in_4bit", "load_in_8bit"):
            if r.has(key):
                r.mapped(key, json.dumps(r.peek(key)))
        return
    dora = r.flag("use_dora", r.take("use_dora"))
    if in4 or in8:
        r.method = "qlora"
        if in8:
            r.options["quant"] = "int8"
        else:
            quant = r.take("bnb_4bit_quant_type", "nf4")
            if quant not in ("nf4", "fp4"):
                raise r.error("bnb_4bit_quant_type", f"must be nf4 or fp4, got {quant!r}")
            r.options["quant"] = quant
            r.options["double_quant"] = r.flag("use_bnb_nested_quant", r.take("use_bnb_nested_quant", False))
        r.note("TRL's SFTTrainer runs prepare_model_for_kbit_training with use_gradient_checkpointing="
               "gradient_checkpointing; peftplan's kbit_prep also turns gradient checkpointing on")
        if dora:
            r.ignore("use_dora", "DoRA on a quantized base (QDoRA) is " + MEMORY_NOT_MODELLED
                     + ": estimated as QLoRA (low)")
    else:
        r.method = "dora" if dora else "lora"
    r.mapped("use_peft", f"true -> method {r.method}")
    for key in ("load_in_4bit", "load_in_8bit"):
        if r.has(key):
            on = r.flag(key, r.peek(key))
            r.mapped(key, json.dumps(r.peek(key)) + (f" -> quant={r.options['quant']}" if on else ""))
    for key, option in (("bnb_4bit_quant_type", "quant"), ("use_bnb_nested_quant", "double_quant")):
        if r.has(key):
            if "double_quant" in r.options:
                r.mapped(key, f"{json.dumps(r.peek(key))} -> {option}={r.options[option]}")
            else:
                r.ignore(key, "no 4-bit base (load_in_4bit is not set)")
    if r.has("use_dora") and "use_dora" not in r.ignored:
        r.mapped("use_dora", json.dumps(r.peek("use_dora")) + (" -> method dora" if dora else ""))
    # TRL ModelConfig defaults: lora_r 16, lora_alpha 32, lora_dropout 0.05, lora_target_modules None
    for key, option, default, conv in (("lora_r", "rank", 16, r.positive_int), ("lora_alpha", "alpha", 32, r.number),
                                       ("lora_dropout", "dropout", 0.05, r.dropout)):
        value = r.take(key)
        if _is_empty(value):
            r.options[option] = default
            r.defaulted(key, f"TRL ModelConfig default {default} -> {option}={default}")
        else:
            r.options[option] = conv(key, value)
            r.mapped(key, f"{value} -> {option}={r.options[option]}")
    if r.has("lora_target_modules"):
        raw = r.take("lora_target_modules")
        targets = r.set_targets("lora_target_modules", raw)
        if targets is not None:
            r.options["targets"] = targets
            r.mapped("lora_target_modules", f"{json.dumps(raw)} -> targets={targets}")
        elif _is_empty(raw):
            r.mapped("lora_target_modules", "null -> peft's per-model default targets")
    for key, reason in (
        ("lora_modules_to_save", "fully trained module copies are " + MEMORY_NOT_MODELLED + " (estimate low)"),
        ("lora_target_parameters", "LoRA on raw parameters (MoE experts) is " + MEMORY_NOT_MODELLED),
        ("use_rslora", "rank-stabilised scaling alpha/sqrt(r): no memory effect"),
    ):
        if r.has(key):
            r.ignore(key, "not set" if _is_empty(r.peek(key)) or r.peek(key) is False else reason)
