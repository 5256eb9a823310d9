"""BitFit (Ben Zaken et al. 2022): only the bias terms are trained.

Every bias of the model is trainable: linear biases, LayerNorm biases and the MLM output bias.
Models without biases (Llama, T5) have nothing to train; peftplan says so instead of estimating.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..arch import ModelArch
from ..training import Training
from ..tuned import TunedModel
from .base import MethodError, MethodSpec, register
from .common import uniform_model


@dataclass(frozen=True)
class BitFitOptions:
    """BitFit has no options."""


def build(arch: ModelArch, options: BitFitOptions, training: Training) -> TunedModel:
    # Trainable biases live in the same modules as frozen weights: the model is loaded in the trainable
    # dtype (fp32 master weights under mixed precision), as for full fine-tuning.
    if any(b.moe is not None and b.moe.bias for b in arch.blocks):
        # gpt-oss: the router and expert biases are MoE parameters (arch_moe.py) that the engine trains only
        # together with the other non-linear block tensors; refusing beats estimating the wrong trainable set
        raise MethodError(f"{arch.name}: BitFit on MoE expert/router biases is not modelled (gpt-oss)")
    base = uniform_model(arch, "bitfit", training.trainable_dtype, trainable=False)
    blocks = tuple(
        replace(b, linears=tuple(replace(t, bias_trainable=t.linear.bias) for t in b.linears),
                norm_bias_trainable=any(n.bias for n in b.block.norms))
        for b in base.blocks
    )
    model = replace(base, blocks=blocks, head_bias_trainable=True)
    has_bias = any(t.bias_trainable for b in blocks for t in b.linears) or any(b.norm_bias_trainable for b in blocks)
    if not has_bias:
        raise MethodError(f"{arch.name} has no bias terms: BitFit would train nothing")
    return model


SPEC = register(MethodSpec(
    name="bitfit", summary="BitFit: train only the bias terms", options_cls=BitFitOptions,
    build=build, peft_type=None, source="Ben Zaken et al. 2022, arXiv:2106.10199",
))
