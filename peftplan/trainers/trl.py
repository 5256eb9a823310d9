"""`trl`: TRL 1.16's `SFTTrainer` (what the HF docs teach for supervised fine-tuning).

From its source (trl 1.16.0, trl/trainer/):
- sft_config.py: `SFTConfig` defaults differ from `TrainingArguments`: `gradient_checkpointing=True` (lines 132,
  ~300), `bf16=True` unless `fp16` is set (line 133), `max_length=1024` (line 202; peftplan's default already).
  Checkpointing is non-reentrant under transformers >= 5 (sft_trainer.py 1079-1081 only pins it before 5.0; the
  transformers 5.23 default is `use_reentrant=False`).
- sft_trainer.py 1144: `add_fused_lm_head(...)`; `compute_loss` (1560-1650) calls `model(**inputs,
  fused_lm_head=True)`: per-token log-probabilities in tiles, the full logits never built (engine/losses.py).
- sft_trainer.py 899-900: peft + checkpointing -> `enable_input_require_grads()`.
- sft_trainer.py 908-911: a quantized base -> every trainable adapter parameter cast to bf16 (DoRA's magnitude
  excepted). SFTTrainer never calls `prepare_model_for_kbit_training`, so QLoRA runs without it (no fp32 upcast
  of the non-quantized weights, no reentrant checkpointing): the method option `kbit_prep` defaults to false here.
- trainer/utils.py 1332: a model given by name is loaded with `dtype=float32` unless `model_init_kwargs["dtype"]`
  says otherwise. peftplan models the model as loaded in the half dtype (`model_init_kwargs={"dtype":
  "bfloat16"}`, what TRL's examples pass and what a 7B+ model on one GPU needs) and prints that assumption.
- use_liger_kernel (sft_trainer.py 1127-1140): the Liger layer kernels only (`fused_linear_cross_entropy` forced
  off: it would replace the fused LM head): option `liger` (engine/liger.py).
- activation_offloading (sft_config.py 291, sft_trainer.py 1190): `get_act_offloading_ctx_manager(model)`
  (trl/models/activation_offloading.py) around the forward: option `activation_offloading` (engine/offload.py).
- padding_free / packing (sft_config.py 222-250): packing fills each sequence to max_length and padding-free
  flattens the batch into one row with position_ids; neither changes the tokens per micro-batch that peftplan
  models (B x max_length), so the per-step shapes and memory are the same; what changes is the number of real
  (non-padding) tokens per step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..dtypes import BF16
from ..tuned import TunedModel
from .base import Default, TrainerSpec, register

VERSION = "1.16.0"


def _is_quantized(model: TunedModel) -> bool:
    return any(t.quant is not None for tb in model.blocks for t in tb.linears)


def adapt(model: TunedModel, training: Any) -> TunedModel:
    """sft_trainer.py 908-911: on a quantized base, trainable adapter weights become bf16."""
    if not _is_quantized(model):
        return model
    blocks = tuple(
        replace(tb, linears=tuple(replace(t, lora_dtype=BF16) if t.lora_rank and t.lora_dtype is not None else t
                                  for t in tb.linears))
        for tb in model.blocks
    )
    notes = model.notes + ("TRL SFTTrainer: adapter weights of a quantized base cast to bf16 "
                           "(sft_trainer.py 908-911; DoRA magnitude kept)",)
    return replace(model, blocks=blocks, notes=notes)


def assumptions(model: TunedModel, training: Any) -> list[str]:
    out = [
        "TRL fused LM head (trl/trainer/utils.py add_fused_lm_head, kernels/chunked_logprob.py): per-token "
        "log-probs over 32768-wide vocabulary tiles of at most 4096 tokens, GPU (Triton) path; the full logits are "
        "never built",
        "model loaded in the half dtype (model_init_kwargs dtype=bfloat16 assumed; TRL loads a model given by name "
        "in float32 otherwise)",
    ]
    from ..engine.liger import kernel_assumptions

    out += kernel_assumptions(model.arch, training)
    if "activation_offloading" in training.trainer_options:
        from ..engine.offload import assumption

        out.append(assumption("trl"))
    for name in training.trainer_options:
        if name in ("packing", "padding_free"):
            out.append(f"{name}: same per-step shapes (micro-batch x max_length tokens); fewer padding tokens, "
                       "not less memory per step")
    return out


SPEC = register(TrainerSpec(
    name="trl", library="trl", version=VERSION,
    summary="TRL SFTTrainer: fused chunked LM-head loss, checkpointing on, bf16",
    source="trl 1.16.0 trainer/sft_trainer.py, sft_config.py, trainer/utils.py, kernels/chunked_logprob.py",
    loss="trl_chunked_logprob",
    defaults=(
        Default("grad_ckpt", True, "SFTConfig.gradient_checkpointing default True (sft_config.py)"),
        Default("seq_len", 1024, "SFTConfig.max_length default 1024 (sft_config.py:202)"),
    ),
    options={"packing": "SFTConfig.packing: pack sequences to max_length (same per-step shapes)",
             "padding_free": "SFTConfig.padding_free: one flattened row per batch (same tokens per step)",
             "liger": "SFTConfig.use_liger_kernel: Liger's RMSNorm, SwiGLU/GeGLU and RoPE kernels (its fused "
                      "cross-entropy is refused by SFTTrainer, sft_trainer.py 1127-1140), modelled from source",
             "activation_offloading": "SFTConfig.activation_offloading: saved activations in host memory "
                                      "(trl/models/activation_offloading.py), modelled from source"},
    option_kernels={"liger": ("rms_norm", "glu", "rope")},
    option_offload={"activation_offloading": "trl"},
    method_defaults={"qlora": {"kbit_prep": False}},  # SFTTrainer never calls prepare_model_for_kbit_training
    adapt=adapt, assumptions=assumptions,
    checked="traced: TRL's own compute_loss on its Triton path under fake tensors, every method in the CI matrix",
))
