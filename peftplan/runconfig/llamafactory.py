"""Read a LLaMA-Factory training YAML (`llamafactory-cli train x.yaml`: `stage`, `finetuning_type`, `lora_rank`,
`lora_target`, `quantization_bit`, `cutoff_len`, `flash_attn`, `enable_liger_kernel`, ... plus the
TrainingArguments keys it passes on). Names and defaults follow LLaMA-Factory main ff6d4d1 (0.9.6.dev0):
src/llamafactory/hparams/model_args.py, finetuning_args.py, data_args.py. The run is the `llamafactory` trainer
(peftplan/trainers/llamafactory.py), whose defaults (checkpointing on, cutoff_len 2048, LoRA on all linears) apply to
what the file leaves unset.
"""

from __future__ import annotations

import json

from .reader import _Reader
from .shared import MEMORY_NOT_MODELLED, _generic_reason, _is_empty, _map_optimizer

LLAMAFACTORY_MARKERS = ("finetuning_type", "stage", "cutoff_len", "lora_target", "quantization_bit", "template",
                        "flash_attn", "enable_liger_kernel", "use_unsloth")

# model_args.py `AttentionFunction`: auto leaves transformers' choice (SDPA), disabled is eager
_FLASH_ATTN = {"auto": "sdpa", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash", "fa3": "flash"}


_LF_REASONS = {
    **{k: "data, not memory" for k in ("dataset", "eval_dataset", "dataset_dir", "template", "max_samples",
                                       "overwrite_cache", "mix_strategy", "interleave_probs", "streaming",
                                       "buffer_size", "val_size", "tokenized_path", "default_system",
                                       "enable_thinking", "train_on_prompt", "mask_history", "packing",
                                       "neat_packing")},
    "plot_loss": "logging, not memory", "ddp_timeout": "run control (a timeout), not memory",
    "infer_backend": "inference only", "export_dir": "export, not training",
}


def _reason(key: str, value: object) -> str:
    if key in _LF_REASONS:
        return _LF_REASONS[key] if not _is_empty(value) else "not set"
    return _generic_reason(key, value)


def is_llamafactory(data: dict) -> bool:
    return any(k in data for k in LLAMAFACTORY_MARKERS)


def map_llamafactory(r: _Reader) -> None:
    r.fallback_reason = _reason
    r.training["trainer"] = "llamafactory"
    r.read.append("format: LLaMA-Factory keys present -> trainer=llamafactory")
    if r.has("model_name_or_path"):
        r.set_model("model_name_or_path", r.take("model_name_or_path"))
    stage = r.take("stage", "sft")
    if stage not in ("sft", "pt"):
        r.ignore("stage", f"{stage!r}: preference / reward training (reference models, paired sequences) is "
                          + MEMORY_NOT_MODELLED + " (estimate low); estimated as one SFT step")
    elif r.has("stage"):
        r.mapped("stage", f"{stage} (next-token loss, as modelled)")
    _method(r)
    _training(r)


def _method(r: _Reader) -> None:
    ftype = r.take("finetuning_type", "lora")
    bits = r.take("quantization_bit")
    if ftype == "full":
        r.method = "full"
        r.mapped("finetuning_type", "full -> method full")
        if not _is_empty(bits):
            r.ignore("quantization_bit", "full fine-tuning of a quantized model is not possible: not applied")
        return
    if ftype != "lora":
        r.ignore("finetuning_type", f"{ftype!r} (freeze: the last freeze_trainable_layers layers; oft) is "
                                    + MEMORY_NOT_MODELLED + ": pass --method")
        return
    dora = r.flag("use_dora", r.take("use_dora"))
    if not _is_empty(bits):
        if bits not in (4, 8):
            raise r.error("quantization_bit", f"must be 4 or 8 for bitsandbytes, got {bits!r}")
        if dora:
            r.ignore("use_dora", "DoRA on a quantized base is " + MEMORY_NOT_MODELLED + ": estimated as QLoRA")
        r.method = "qlora"
        if bits == 8:
            r.options["quant"] = "int8"
        else:
            qtype = r.take("quantization_type", "nf4")
            if qtype not in ("nf4", "fp4"):
                raise r.error("quantization_type", f"must be nf4 or fp4, got {qtype!r}")
            r.options["quant"] = qtype
            r.options["double_quant"] = r.flag("double_quantization", r.take("double_quantization", True))
        r.mapped("quantization_bit", f"{bits} -> method qlora, quant={r.options['quant']}")
        for key in ("quantization_type", "double_quantization"):
            if r.has(key) and key not in r.mapped_keys:
                r.mapped(key, json.dumps(r.peek(key)))
        if r.has("quantization_method") and r.peek("quantization_method") not in (None, "bnb", "bitsandbytes"):
            r.ignore("quantization_method", f"{r.peek('quantization_method')!r}: only bitsandbytes is modelled")
    else:
        r.method = "dora" if dora else "lora"
    r.mapped("finetuning_type", f"{ftype} -> method {r.method}")
    if r.has("use_dora") and "use_dora" not in r.ignored:
        r.mapped("use_dora", json.dumps(r.peek("use_dora")))
    rank = r.take("lora_rank")
    r.options["rank"] = 8 if _is_empty(rank) else r.positive_int("lora_rank", rank)
    r.defaulted("lora_rank", "LLaMA-Factory default 8 -> rank=8") if _is_empty(rank) else \
        r.mapped("lora_rank", f"{rank} -> rank")
    alpha = r.take("lora_alpha")
    r.options["alpha"] = r.options["rank"] * 2 if _is_empty(alpha) else r.number("lora_alpha", alpha)
    if not _is_empty(alpha):
        r.mapped("lora_alpha", f"{alpha} -> alpha")
    if r.has("lora_dropout"):
        r.options["dropout"] = r.dropout("lora_dropout", r.take("lora_dropout"))
        r.mapped("lora_dropout", f"{r.options['dropout']} -> dropout")
    target = r.take("lora_target", "all")
    if target == "all" or _is_empty(target):
        r.options["targets"] = "all-linear"
    elif isinstance(target, str):
        r.options["targets"] = ",".join(t.strip() for t in target.split(",") if t.strip())
    else:
        raise r.error("lora_target", f"must be 'all' or comma-separated module names, got {target!r}")
    line = f"{json.dumps(target)} -> targets={r.options['targets']}"
    r.mapped("lora_target", line) if r.has("lora_target") else r.defaulted("lora_target", "default all -> all-linear")
    if r.has("additional_target") and not _is_empty(r.peek("additional_target")):
        r.ignore("additional_target", "fully trained extra modules are " + MEMORY_NOT_MODELLED + " (estimate low)")


def _training(r: _Reader) -> None:
    for key, field_name in (("per_device_train_batch_size", "micro_batch"),
                            ("gradient_accumulation_steps", "grad_accum"), ("cutoff_len", "seq_len")):
        if r.has(key):
            v = r.positive_int(key, r.take(key))
            r.training[field_name] = v
            r.mapped(key, f"{v} -> {field_name}={v}")
    if r.has("disable_gradient_checkpointing"):
        off = r.flag("disable_gradient_checkpointing", r.take("disable_gradient_checkpointing"))
        r.training["grad_ckpt"] = not off
        r.mapped("disable_gradient_checkpointing", f"{json.dumps(off)} -> grad_ckpt={not off}")
    if r.has("use_reentrant_gc"):
        on = r.flag("use_reentrant_gc", r.take("use_reentrant_gc"))
        if on:
            r.mapped("use_reentrant_gc", "true (reentrant checkpointing, as modelled)")
        else:
            r.ignore("use_reentrant_gc", "false: non-reentrant checkpointing under LLaMA-Factory is "
                     + MEMORY_NOT_MODELLED + " (reentrant modelled)")
    if r.has("flash_attn"):
        value = str(r.take("flash_attn"))
        att = _FLASH_ATTN.get(value)
        if att is None:
            r.ignore("flash_attn", f"{value!r} is not a LLaMA-Factory attention choice peftplan reads")
        else:
            r.training["attention"] = att
            r.mapped("flash_attn", f"{value} -> attention={att}")
    if r.has("enable_liger_kernel"):
        on = r.flag("enable_liger_kernel", r.take("enable_liger_kernel"))
        if on:
            r.training["trainer_options"] = ("liger",)
        r.mapped("enable_liger_kernel", "true -> trainer option liger (fused linear cross-entropy, modelled from "
                 "source; RMSNorm/SwiGLU/RoPE kernels not modelled)" if on else "false")
    if r.has("use_unsloth") and r.flag("use_unsloth", r.peek("use_unsloth")):
        r.ignore("use_unsloth", "Unsloth's patched model (its LoRA kernels, fused loss, offloaded checkpointing) is "
                 + MEMORY_NOT_MODELLED + ": estimated as LLaMA-Factory without it")
    for key in ("upcast_layernorm", "upcast_lmhead_output"):
        if r.has(key) and r.flag(key, r.peek(key)):
            r.ignore(key, "fp32 upcast is " + MEMORY_NOT_MODELLED + " (estimate low)")
    bf16 = r.flag("bf16", r.take("bf16")) if r.has("bf16") else False
    fp16 = r.flag("fp16", r.take("fp16")) if r.has("fp16") else False
    pure = r.flag("pure_bf16", r.take("pure_bf16")) if r.has("pure_bf16") else False
    if pure:
        r.training["precision"] = "bf16"
        r.mapped("pure_bf16", "true -> precision=bf16 (no autocast, trainable weights in bf16)")
    elif bf16 or fp16:
        r.training["precision"] = "bf16-mixed" if bf16 else "fp16-mixed"
    for key, val in (("bf16", bf16), ("fp16", fp16)):
        if r.has(key) and key not in r.mapped_keys:
            r.mapped(key, json.dumps(val) + (f" -> precision={r.training['precision']}" if val and not pure else ""))
    if r.has("optim"):
        _map_optimizer(r, "optim", r.take("optim"))
