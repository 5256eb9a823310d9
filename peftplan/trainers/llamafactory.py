"""`llamafactory`: LLaMA-Factory's SFT run (its `CustomSeq2SeqTrainer` subclasses transformers' Trainer), modelled
from its source (github hiyouga/LLaMA-Factory main at ff6d4d1, version 0.9.6.dev0; not traced: its checkpointing
wrapper is its own code, which the CPU tracer does not run).

- model_args.py:145 `disable_gradient_checkpointing=False`: checkpointing is on unless disabled; model_args.py:149
  `use_reentrant_gc=True` and model_utils/checkpointing.py 126-155: `torch.utils.checkpoint.checkpoint(...,
  use_reentrant=True)` wrapped so that the hidden states entering a trainable layer require grad (100-123).
- data_args.py:46 `cutoff_len=2048`: the sequence length.
- finetuning_args.py 77-90: `lora_rank=8`, `lora_target="all"` (every linear but the head); QLoRA through
  `quantization_bit` without peft's `prepare_model_for_kbit_training` (never called in src/): no fp32 upcast of the
  non-quantized weights; trainable parameters cast to fp32 (adapter.py, unless `pure_bf16`).
- model/loader.py:142 `apply_liger_kernel(..., require_logits=stage not in ["pt", "sft"])`: with
  `enable_liger_kernel` an SFT run gets Liger's fused linear cross-entropy and its RMSNorm / SwiGLU / RoPE kernels
  (option `liger`, engine/liger.py).
- The loss is the model's own (full logits, fp32 upcast) as under `hf`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..tuned import TunedModel
from .base import Default, TrainerSpec, register


def adapt(model: TunedModel, training: Any) -> TunedModel:
    """Reentrant checkpointing with the layer input made to require grad (checkpointing.py 100-155)."""
    if not training.grad_ckpt:
        return model
    return replace(model, reentrant_ckpt=True, input_requires_grad=True)


def assumptions(model: TunedModel, training: Any) -> list[str]:
    out = ["LLaMA-Factory modelled from its source (main ff6d4d1), not traced: reentrant gradient checkpointing "
           "(use_reentrant_gc=True), no kbit prep for quantization_bit, the loss on the full logits"]
    if "liger" in training.trainer_options:
        from ..engine.liger import kernel_assumptions

        out.append("enable_liger_kernel: Liger's fused linear cross-entropy modelled from source (liger-kernel "
                   "0.8.2)")
        out += kernel_assumptions(model.arch, training)
    return out


SPEC = register(TrainerSpec(
    name="llamafactory", library="LLaMA-Factory", version="0.9.6.dev0",
    summary="LLaMA-Factory SFT: reentrant checkpointing on, cutoff_len 2048, LoRA on all linears",
    source="hiyouga/LLaMA-Factory ff6d4d1: hparams/model_args.py, data_args.py, finetuning_args.py, "
           "model/model_utils/checkpointing.py, model/loader.py",
    loss="full_logits",
    defaults=(
        Default("grad_ckpt", True, "model_args.py:145 disable_gradient_checkpointing=False"),
        Default("seq_len", 2048, "data_args.py:46 cutoff_len=2048"),
    ),
    options={"liger": "enable_liger_kernel: Liger fused linear cross-entropy, RMSNorm, SwiGLU/GeGLU and RoPE "
                      "kernels (modelled from source)"},
    option_losses={"liger": "liger_flce"},
    option_kernels={"liger": ("rms_norm", "glu", "rope")},
    method_defaults={m: {"targets": "all-linear"} for m in ("lora", "dora")}
    | {"qlora": {"targets": "all-linear", "kbit_prep": False}},
    adapt=adapt, assumptions=assumptions,
))
