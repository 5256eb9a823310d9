"""QLoRA's bitsandbytes side: block linears swapped for `Linear4bit` / `Linear8bitLt` on the meta device, as
transformers' bnb quantizer does at load time, and each weight created and quantized by bitsandbytes
(`functional.quantize_4bit` / `int8_vectorwise_quant`) when the model is materialized."""

from __future__ import annotations

import torch
from torch import nn

from ..methods.common import frozen_base_dtype
from ..training import Training
from ..tuned import TunedModel
from . import HarnessError
from .hf_model import find_blocks, torch_dtype


def _quantize_linears(model: nn.Module, tuned: TunedModel, training: Training) -> list[nn.Module]:
    """Replace quantized block linears by bitsandbytes Linear4bit / Linear8bitLt (on meta), as
    transformers' bnb quantizer does at load time; the weights are quantized in `materialize`."""
    import bitsandbytes as bnb

    arch = tuned.arch
    out = []
    for (prefix, bmod), tb in zip(find_blocks(model, arch), tuned.blocks):
        for t in tb.linears:
            if t.quant is None:
                continue
            parent_path, _, child = t.linear.path.rpartition(".")
            parent = bmod.get_submodule(parent_path) if parent_path else bmod
            old = getattr(parent, child)
            if isinstance(old, nn.Linear):
                in_f, out_f = old.in_features, old.out_features
            elif type(old).__name__ == "Conv1D":  # GPT-2: transformers' bnb integration swaps it too (weight transposed)
                in_f, out_f = old.weight.shape
            else:
                raise HarnessError(f"{arch.name}: {prefix}.{t.linear.path} is a {type(old).__name__}, "
                                   "bitsandbytes quantizes nn.Linear / Conv1D only")
            # bitsandbytes quantizes the weight as loaded (torch_dtype): QuantState.dtype is what
            # dequantize_4bit returns in backward. The TunedModel records only the storage (nf4).
            load_dtype = torch_dtype(frozen_base_dtype(training))
            bias = old.bias is not None
            if t.quant.kind in ("nf4", "fp4"):
                new = bnb.nn.Linear4bit(in_f, out_f, bias=bias,
                                        compute_dtype=torch_dtype(training.compute_dtype),
                                        compress_statistics=t.quant.double_quant, quant_type=t.quant.kind,
                                        quant_storage=torch.uint8, device="meta")
                new._peftplan_quant = (t.quant.kind, t.quant.double_quant, t.quant.blocksize)
            else:
                new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new._peftplan_quant = ("int8", False, 0)
            new._peftplan_load_dtype = load_dtype
            if bias:
                new.bias = nn.Parameter(torch.empty(out_f, dtype=old.bias.dtype, device="meta"), requires_grad=False)
            new.train(old.training)
            setattr(parent, child, new)
            out.append(new)
    model.is_loaded_in_4bit = any(m._peftplan_quant[0] != "int8" for m in out)
    model.is_loaded_in_8bit = any(m._peftplan_quant[0] == "int8" for m in out)
    model.is_quantized = True
    return out


def _quantize_weight(mod: nn.Module, device: str, real_init: bool) -> None:
    """Create the module's weight on `device` and quantize it as bitsandbytes does at load time."""
    import bitsandbytes.functional as bnbf

    kind, dq, blocksize = mod._peftplan_quant
    w = torch.empty(mod.out_features, mod.in_features, dtype=mod._peftplan_load_dtype, device=device)
    if real_init:
        w.normal_(0.0, 0.02)
    if kind in ("nf4", "fp4"):
        packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=kind,
                                        quant_storage=torch.uint8)
        # A plain Parameter holding the packed bytes with the QuantState attached: Params4bit cannot wrap
        # a FakeTensor, and Linear4bit.forward / peft's lora.Linear4bit only read these attributes.
        p = nn.Parameter(packed, requires_grad=False)
        p.quant_state = qs
        p.quant_type = kind
        p.compress_statistics = dq
        p.blocksize = blocksize
        p.quant_storage = torch.uint8
        p.bnb_quantized = True
        p._peftplan_4bit = True
        mod.weight = p
        mod.quant_state = qs
    else:
        cb, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w)
        p = nn.Parameter(cb, requires_grad=False)
        p.CB = cb
        p.SCB = scb
        p.has_fp16_weights = False
        p._peftplan_int8 = True
        mod.weight = p
    del w
