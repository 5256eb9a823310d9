"""`hf`: the bare step, `model(**batch, labels=labels)` under transformers' `Trainer` with peft, no trainer kernels.

The loss is transformers' `ForCausalLMLoss` (loss/loss_utils.py): the full (tokens x vocab) logits, upcast to fp32,
cross-entropy over them. Every default is peftplan's `Training` default (training.py, HF TrainingArguments).
"""

from __future__ import annotations

from .base import TrainerSpec, register

SPEC = register(TrainerSpec(
    name="hf", library="transformers", version="5.23.0",
    summary="bare transformers Trainer + peft step: full fp32 logits, cross-entropy",
    source="transformers 5.23 trainer.py compute_loss, loss/loss_utils.py ForCausalLMLoss",
    loss="full_logits",
))
