"""Read an axolotl YAML (`base_model`, `adapter`, `lora_r`, `micro_batch_size`, `sequence_len`, ...).

Key names and defaults follow axolotl's config reference (docs/config-reference.qmd) and its model loader
(src/axolotl/loaders/model.py, adapter.py): `adapter: qlora` + `load_in_4bit` builds
`BitsAndBytesConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` (overridable through
`bnb_config_kwargs`); `lora_target_linear` adds every linear but the output head; absent keys take axolotl's
defaults (micro_batch_size 1, sequence_len 512, gradient_accumulation_steps 1, optimizer adamw_torch_fused,
bf16 auto, gradient_checkpointing off).
"""

from __future__ import annotations

import json
from typing import Any

from .reader import _Reader
from .axolotl_runtime import _axolotl_kernels, _axolotl_sharding
from .peft_adapter import _PEFT_INIT
from .shared import (MEMORY_NOT_MODELLED, TRAINS_BASE_WEIGHTS, _generic_reason, _is_empty, _map_attn_implementation,
                     _map_optimizer, _precision)

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
    _axolotl_kernels(r)
    _axolotl_sharding(r)


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
    for key, meaning in (
        ("sample_packing", "packing fills each sequence to sequence_len: the per-step shapes peftplan models "
                           "(micro_batch_size x sequence_len tokens), fewer padding tokens"),
        ("pad_to_sequence_len", "every sequence sequence_len tokens, as peftplan models"),
        ("batch_flattening", "padding-free batching: the same tokens per step in one row (same memory as modelled)"),
    ):
        if r.has(key):
            value = r.take(key)
            r.mapped(key, json.dumps(value) + (f": {meaning}" if not _is_empty(value) and value is not False else ""))
    for key, reason in (
        ("eval_sample_packing", "evaluation only"),
        ("sample_packing_eff_est", "packing efficiency: data, not per-step shapes"),
        ("sample_packing_group_size", "packing: data, not per-step shapes"),
        ("sample_packing_bin_size", "packing: data, not per-step shapes"),
        ("sample_packing_sequentially", "packing: data, not per-step shapes"),
        ("multipack_real_batches", "packing: data, not per-step shapes"),
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
        "unfrozen_parameters": "training only the parameters matching these patterns is " + MEMORY_NOT_MODELLED,
    }
    if key.startswith("relora_"):
        return "ReLoRA restarts: one step's memory is LoRA's" if not _is_empty(value) else "not set"
    if key in specific:
        return specific[key] if not _is_empty(value) else "not set"
    return _generic_reason(key, value)

