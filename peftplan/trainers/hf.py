"""`hf`: the bare step, `model(**batch, labels=labels)` under transformers' `Trainer` with peft, no trainer kernels.

The loss is transformers' `ForCausalLMLoss` (loss/loss_utils.py): the full (tokens x vocab) logits, upcast to fp32,
cross-entropy over them. Every default is peftplan's `Training` default (training.py, HF TrainingArguments).

Option `liger` (`TrainingArguments(use_liger_kernel=True)`, LLaMA-Factory's `enable_liger_kernel`):
`apply_liger_kernel_to_<model>()` with its defaults (liger-kernel 0.8.2 transformers/monkey_patch.py 221-227):
the fused linear cross-entropy replaces the head and the loss, and the RMSNorm, SwiGLU/GeGLU and RoPE kernels
replace the HF ops (engine/liger.py, all modelled from source: Triton does not run on the CPU tracer).
Options `liger_rms_norm`, `liger_glu`, `liger_rope`: one layer kernel each (axolotl's LigerPlugin switches).
Option `chunked_ce`: axolotl's `chunked_cross_entropy` (engine/chunked_ce.py, modelled from axolotl 0.19's source).
"""

from __future__ import annotations

from typing import Any

from .base import TrainerSpec, register


def _assumptions(model: Any, training: Any) -> list[str]:
    from ..engine.liger import kernel_assumptions

    out = []
    if {"liger", "liger_flce"} & set(training.trainer_options):
        out.append("Liger fused linear cross-entropy: modelled from source (liger-kernel 0.8.2 "
                   "ops/fused_linear_cross_entropy.py), not yet confirmed by a GPU record; a trainable head on a "
                   "pre-Ampere GPU adds two vocab x hidden temporaries (not modelled)")
    out += kernel_assumptions(model.arch, training)
    if "chunked_ce" in training.trainer_options:
        from ..engine.chunked_ce import assumption

        out.append(assumption(model.arch, training))
    return out


SPEC = register(TrainerSpec(
    name="hf", library="transformers", version="5.23.0",
    summary="bare transformers Trainer + peft step: full fp32 logits, cross-entropy",
    source="transformers 5.23 trainer.py compute_loss, loss/loss_utils.py ForCausalLMLoss",
    loss="full_logits",
    options={"liger": "Liger kernels (TrainingArguments.use_liger_kernel): fused linear cross-entropy, RMSNorm, "
                      "SwiGLU/GeGLU and RoPE kernels, modelled from source",
             "liger_flce": "Liger fused linear cross-entropy only (axolotl liger_fused_linear_cross_entropy), "
                           "modelled from source",
             "liger_rms_norm": "Liger RMSNorm kernel only (axolotl liger_rms_norm), modelled from source",
             "liger_glu": "Liger SwiGLU/GeGLU kernel only (axolotl liger_glu_activation), modelled from source",
             "liger_rope": "Liger RoPE kernel only (axolotl liger_rope), modelled from source",
             "chunked_ce": "axolotl chunked_cross_entropy: the logits upcast chunk by chunk, modelled from source"},
    option_losses={"liger": "liger_flce", "liger_flce": "liger_flce", "chunked_ce": "chunked_ce"},
    option_kernels={"liger": ("rms_norm", "glu", "rope"), "liger_rms_norm": ("rms_norm",),
                    "liger_glu": ("glu",), "liger_rope": ("rope",)},
    checked="traced: every CPU record in profiles/cpu (CI matrix); Liger option modelled from source",
    assumptions=lambda model, training: _assumptions(model, training),
))
