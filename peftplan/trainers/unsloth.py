"""`unsloth`: Unsloth's `FastLanguageModel` + TRL SFTTrainer run (unsloth 2026.10.9, unsloth_zoo 2026.10.9), modelled
from their source (pip download unsloth unsloth_zoo --no-deps; not traced: Triton kernels and Unsloth's patched
forward do not run on the CPU tracer). What changes the step's memory:

- Loading (models/loader.py 1243-1256 `from_pretrained`): `load_in_4bit=True` (a QLoRA base: `--method qlora`; with
  `--method lora` load_in_4bit=False is assumed and said), `dtype=None` -> bf16 on Ampere+ (fp16 before),
  `max_seq_length=2048`.
- `get_peft_model` (models/llama.py 4571-4579): r=16, lora_alpha=16, lora_dropout=0, target_modules q,k,v,o,gate,
  up,down (3209, every block linear), `use_gradient_checkpointing="unsloth"`; then its own
  `prepare_model_for_kbit_training(use_reentrant=True)` (llama.py 5276, _utils.py 4683 -> unsloth_zoo
  training_utils.py `prepare_model_for_training`): LoRA weights fp32, the frozen base kept in its dtype (no fp32
  upcast of embedding / head as peft's kbit prep does), reentrant checkpointing.
- Offloaded gradient checkpointing (engine/offload.py policy `unsloth`): layer inputs in host memory, a GPU staging
  buffer; only from max_seq_length >= 512 (_utils.py 502-515), standard reentrant checkpointing below.
- Fused cross-entropy (engine/unsloth.py): chunked, no full fp32 logits.
- Kernels on llama / mistral / qwen2 / qwen3 (engine/liger.py layer kernels, same saving rules): Fast_RMS_Layernorm
  (kernels/rms_layernorm.py 952-987: saves X, W, r fp32 per row), the SwiGLU inside LoRA_MLP (kernels/fast_lora.py
  448: saves X, e, g; swiglu.py 119-135 writes h, df, de into DW, e, g), Fast_RoPE_Embedding_QK (rope_embedding.py
  423-459: out of place on the transposed q / k, dQ / dK allocated in backward).
- LoRA autograd Functions on those types (engine/unsloth_lora.py): LoRA_QKV / LoRA_W / LoRA_MLP (fast_lora.py
  346-1129) save the layer input once per projection group, write dX into it, recompute the MLP hidden in
  backward and decode a 4-bit base into one persistent scratch buffer; applied where models/llama.py 5234-5436
  `patch_peft_model` applies them (every projection of the group adapted, no base bias, no DoRA), peft's ops
  elsewhere (lora_dropout > 0, which Unsloth fuses with saved masks, is not modelled: peft's ops, said).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..tuned import TunedModel
from .base import Default, TrainerSpec, register

VERSION = "2026.10.9"
UNSLOTH_KERNEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # models/llama.py, mistral.py, qwen2/3.py
UNSLOTH_GC_MIN_SEQ = 512  # models/_utils.py 504: below it, "unsloth" checkpointing becomes standard (no offload)


def adapt(model: TunedModel, training: Any) -> TunedModel:
    """prepare_model_for_kbit_training(use_reentrant=True): reentrant checkpointing, the input made to require grad;
    LoRA weights fp32 (already the method's default)."""
    if not training.grad_ckpt:
        return model
    return replace(model, reentrant_ckpt=True, input_requires_grad=True)


def assumptions(model: TunedModel, training: Any) -> list[str]:
    from ..engine.liger import kernel_assumptions
    from ..engine.offload import assumption

    quantized = any(t.quant is not None for tb in model.blocks for t in tb.linears)
    out = ["Unsloth modelled from its source (unsloth / unsloth_zoo 2026.10.9), not traced: reentrant checkpointing "
           "(its own prepare_model_for_kbit_training: no fp32 upcast of the frozen embedding / head), fused chunked "
           "cross-entropy (chunk count at its 4 GiB target cap)"]
    if not quantized:
        out.append("FastLanguageModel.from_pretrained defaults to load_in_4bit=True (QLoRA): this estimate assumes "
                   "load_in_4bit=False; --method qlora for Unsloth's default")
    if training.grad_ckpt and training.seq_len >= UNSLOTH_GC_MIN_SEQ:
        out.append(assumption("unsloth"))
    elif training.grad_ckpt:
        out.append(f"max_seq_length < {UNSLOTH_GC_MIN_SEQ}: Unsloth uses standard (reentrant) checkpointing, no "
                   "offload (models/_utils.py 502-515)")
    out += kernel_assumptions(model.arch, training)
    if model.arch.model_type in UNSLOTH_KERNEL_TYPES:
        from ..engine.unsloth_lora import assumptions as lora_assumptions

        out += lora_assumptions(model, training)
    if model.arch.model_type not in UNSLOTH_KERNEL_TYPES:
        out.append(f"{model.arch.model_type}: Unsloth's fast llama-family forward does not apply; its generic path "
                   "(FastModel, compiled) is modelled as the HF ops")
    return out


SPEC = register(TrainerSpec(
    name="unsloth", library="unsloth", version=VERSION,
    summary="Unsloth FastLanguageModel + SFTTrainer: offloaded reentrant checkpointing, fused chunked CE, kernels",
    source="unsloth 2026.10.9 models/loader.py, models/llama.py, kernels/; unsloth_zoo 2026.10.9 "
           "gradient_checkpointing.py, fused_losses/cross_entropy_loss.py, training_utils.py",
    loss="unsloth_fused_ce",
    defaults=(
        Default("grad_ckpt", True, 'get_peft_model use_gradient_checkpointing="unsloth" (models/llama.py 4579)'),
        Default("seq_len", 2048, "from_pretrained max_seq_length=2048 (models/loader.py 1243)"),
    ),
    method_defaults={m: {"rank": 16, "alpha": 16, "targets": "all-linear"} for m in ("lora", "dora")}
    | {"qlora": {"rank": 16, "alpha": 16, "targets": "all-linear", "kbit_prep": False}},
    kernels=("rms_norm", "glu", "rope_copy", "unsloth_lora"), kernel_types=UNSLOTH_KERNEL_TYPES,
    offload="unsloth",
    adapt=adapt, assumptions=assumptions,
))
