"""Dropout as transformers applies it (a mask saved for backward, or nothing at p = 0), and the dropout
probabilities each family's config sets for hidden states and attention weights."""

from __future__ import annotations

from ..arch import ModelArch
from ..dtypes import BOOL
from .ops import Ctx
from .sim import Tensor


def _dropout(ctx: Ctx, x: Tensor, p: float) -> Tensor:
    """nn.Dropout(p) in training: a new tensor and a saved bool mask (native_dropout); p=0 is identity."""
    if p <= 0:
        return ctx.tape.alloc.retain(x)
    mask = ctx.tape.new(x.numel, BOOL, False, "dropout_mask")
    out = ctx.tape.new(x.numel, x.dtype, x.requires_grad, "dropout")
    ctx.tape.record("dropout", [x], [out], [mask])
    ctx.tape.drop(mask)
    return out


def hidden_dropout(arch: ModelArch) -> float:
    """The residual-stream dropout probability (gpt2 resid_pdrop, bert hidden_dropout_prob, t5
    dropout_rate, opt dropout); Llama-like families have none in training."""
    if arch.family in ("llama", "gemma2", "gemma3", "olmo2", "gpt_oss", "phi3"):
        return 0.0
    return float(arch.config.get("resid_pdrop", arch.config.get("hidden_dropout_prob",
                 arch.config.get("dropout_rate", arch.config.get("dropout", 0.0)))) or 0.0)


def attention_dropout(arch: ModelArch) -> float:
    """Dropout on the attention probabilities (eager attention; SDPA applies it inside its kernel):
    gpt2 attn_pdrop, bert/roberta attention_probs_dropout_prob, t5 dropout_rate (T5Attention), the
    others' attention_dropout (modeling_*.py eager_attention_forward `dropout(attn_weights, p=...)`)."""
    keys = {"gpt2": "attn_pdrop", "bert": "attention_probs_dropout_prob", "t5": "dropout_rate"}
    key = keys.get(arch.family, "attention_dropout")
    return float(arch.config.get(key, 0.0) or 0.0)
