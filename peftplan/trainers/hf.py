"""`hf`: the bare step, `model(**batch, labels=labels)` under transformers' `Trainer` with peft, no trainer kernels.

The loss is transformers' `ForCausalLMLoss` (loss/loss_utils.py): the full (tokens x vocab) logits, upcast to fp32,
cross-entropy over them. Every default is peftplan's `Training` default (training.py, HF TrainingArguments).

Option `liger` (`TrainingArguments(use_liger_kernel=True)`, axolotl's LigerPlugin with
`liger_fused_linear_cross_entropy`): Liger's fused linear cross-entropy replaces the head and the loss
(engine/liger.py, modelled from liger-kernel 0.8.2's source: Triton does not run on the CPU tracer). Its RMSNorm,
SwiGLU and RoPE kernels, switched on with it, are not modelled: the HF ops are, which save more (estimate high).
"""

from __future__ import annotations

from .base import TrainerSpec, register

SPEC = register(TrainerSpec(
    name="hf", library="transformers", version="5.23.0",
    summary="bare transformers Trainer + peft step: full fp32 logits, cross-entropy",
    source="transformers 5.23 trainer.py compute_loss, loss/loss_utils.py ForCausalLMLoss",
    loss="full_logits",
    options={"liger": "Liger kernels (TrainingArguments.use_liger_kernel): fused linear cross-entropy modelled "
                      "from source; RMSNorm/SwiGLU/RoPE kernels not modelled (estimate high)"},
    option_losses={"liger": "liger_flce"},
    checked="traced: every CPU record in profiles/cpu (CI matrix); Liger option modelled from source",
    assumptions=lambda model, training: [
        "Liger fused linear cross-entropy: modelled from source (liger-kernel 0.8.2 "
        "ops/fused_linear_cross_entropy.py), not yet confirmed by a GPU record; its RMSNorm/SwiGLU/RoPE kernels "
        "are not modelled (the HF ops are: estimate high); a trainable head on a pre-Ampere GPU adds two "
        "vocab x hidden temporaries (not modelled)"] if "liger" in training.trainer_options else [],
))
