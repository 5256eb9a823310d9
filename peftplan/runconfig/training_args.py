"""Read a transformers `TrainingArguments` / TRL `SFTConfig` dump (`to_json_string()`, JSON or YAML), optionally
with TRL's `ModelConfig` keys (`model_name_or_path`, `use_peft`, `lora_r`, `load_in_4bit`, ...) as TRL recipes
write them. Optimizer names are transformers' `OptimizerNames` values.

A file with any key only TRL has (`SFTCONFIG_KEYS`: SFTConfig's own fields, or ModelConfig's as `trl sft --config`
takes them) is read as TRL's (format "trl-sftconfig", trainer "trl"); a plain TrainingArguments dump is the bare
transformers Trainer (format "training-args", trainer "hf"). SFTConfig's defaults that differ from
TrainingArguments (gradient_checkpointing, bf16) are the trl trainer's defaults (peftplan/trainers/trl.py) and
apply to what the file leaves unset.
"""

from __future__ import annotations

import json

from .reader import _Reader
from .shared import (MEMORY_NOT_MODELLED, TRAINS_BASE_WEIGHTS, _DTYPES, _generic_reason, _is_empty,
                     _map_attn_implementation, _map_optimizer, _precision)

# trl 1.16 sft_config.py SFTConfig fields (not in TrainingArguments) and model_config.py ModelConfig fields
SFTCONFIG_KEYS = ("max_length", "max_seq_length", "packing", "padding_free", "packing_strategy", "eval_packing",
                  "completion_only_loss", "assistant_only_loss", "dataset_text_field", "dataset_kwargs",
                  "dataset_num_proc", "model_init_kwargs", "activation_offloading", "pad_to_multiple_of",
                  "use_peft", "model_name_or_path", "chat_template_path", "loss_type", "shuffle_dataset")


def is_sft_config(data: dict) -> bool:
    return any(k in data for k in SFTCONFIG_KEYS)


def _map_training_args(r: _Reader, trl: bool = False) -> None:
    r.fallback_reason = _generic_reason
    r.training["trainer"] = "trl" if trl else "hf"
    r.read.append("format: " + ("TRL SFTConfig keys present -> trainer=trl" if trl else
                                "plain TrainingArguments -> trainer=hf (the bare transformers Trainer)"))
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
    on = []
    if r.has("activation_offloading"):
        value = r.take("activation_offloading")
        if not trl:
            r.ignore("activation_offloading", "an SFTConfig option: not read for trainer hf")
        elif r.flag("activation_offloading", value):
            on.append("activation_offloading")
            r.mapped("activation_offloading", "true -> trainer option activation_offloading (saved activations in "
                     "host memory, engine/offload.py, modelled from source)")
        else:
            r.mapped("activation_offloading", "false")
    if r.has("use_liger_kernel") and trl:
        if r.flag("use_liger_kernel", r.take("use_liger_kernel")):
            on.append("liger")
            r.mapped("use_liger_kernel", "true -> trainer option liger (Liger layer kernels; SFTTrainer forces "
                     "fused_linear_cross_entropy off), modelled from source")
        else:
            r.mapped("use_liger_kernel", "false")
    for key in ("packing", "padding_free"):
        if r.has(key) and trl:
            if r.flag(key, r.take(key)):
                on.append(key)
                r.mapped(key, f"true -> trainer option {key} (same per-step shapes)")
            else:
                r.mapped(key, json.dumps(r.peek(key)) + " (off)")
    if on:
        r.training["trainer_options"] = tuple(dict.fromkeys((*r.training.get("trainer_options", ()), *on)))
    for key, reason in (("packing", "packing changes tokens per sequence, not the per-step shapes peftplan "
                                    "models (each micro-batch is still micro_batch x max_length tokens)"),
                        ("padding_free", "padding-free batching: fewer real tokens, not modelled (estimate high)"),
                        ("packing_strategy", "packing: data, not per-step shapes"),
                        ("pad_to_multiple_of", "padding: data, not per-step shapes"),
                        ("eval_packing", "evaluation only")):
        if r.has(key) and key not in r.mapped_keys:
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
        r.note("TRL 1.16's SFTTrainer does not call prepare_model_for_kbit_training (sft_trainer.py): the trl "
               "trainer estimates QLoRA without it (kbit_prep=false) and with its adapters cast to bf16")
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
