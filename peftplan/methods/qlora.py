"""QLoRA (Dettmers et al. 2023): LoRA over a bitsandbytes-quantized frozen base.

What `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` does
(transformers quantizers/quantizer_bnb_4bit.py, quantizers/base.py `get_keys_to_not_convert`):
every block nn.Linear becomes `bnb.nn.Linear4bit` except the output embedding (lm_head) and
`_keep_in_fp32_modules`; embeddings, norms and the head stay in the load dtype.
`peft.prepare_model_for_kbit_training` (peft utils/other.py) then casts every fp16/bf16 parameter
that is not Params4bit to fp32, and enables gradient checkpointing and input gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..arch import ModelArch
from ..dtypes import FP32, INT8, NF4, FP4
from ..training import Training
from ..tuned import Quant, TunedModel
from .lora import LORA_DEFAULT_TARGETS
from .base import MethodError, MethodSpec, register
from .common import frozen_base_dtype, replace_blocks, uniform_model
from .lora import LoraOptions, lora_model, validate_lora


@dataclass(frozen=True)
class QLoraOptions(LoraOptions):
    quant: Literal["nf4", "fp4", "int8"] = field(default="nf4", metadata={
        "help": "base quantization: nf4 / fp4 (bnb 4-bit, block 64) or int8 (LLM.int8)"})
    double_quant: bool = field(default=True, metadata={
        "help": "bnb_4bit_use_double_quant: absmax as uint8 in blocks of 256 (QLoRA paper; BitsAndBytesConfig default is False)"})
    kbit_prep: bool = field(default=True, metadata={
        "help": "run peft.prepare_model_for_kbit_training: fp32 upcast of non-4-bit params + gradient checkpointing"})
    kbit_grad_ckpt: bool = field(default=True, metadata={
        "help": "prepare_model_for_kbit_training(use_gradient_checkpointing=...): peft's default True turns "
                "checkpointing on (reentrant, with input grads); an explicit --no-grad-ckpt sets it False"})


def build(arch: ModelArch, options: QLoraOptions, training: Training) -> TunedModel:
    targets = validate_lora(arch, options)
    if options.quant not in ("nf4", "fp4", "int8"):
        raise MethodError(f"unknown quantization {options.quant!r} (choose nf4, fp4 or int8)")
    if options.quant == "int8" and options.double_quant:
        # double quantization is a 4-bit option (bnb_4bit_use_double_quant); it means nothing for LLM.int8
        options = replace(options, double_quant=False)
    load = frozen_base_dtype(training)
    keep = FP32 if options.kbit_prep else load  # prepare_model_for_kbit_training upcasts non-quantized params
    base = uniform_model(arch, "qlora", keep, trainable=False)
    storage = {"nf4": NF4, "fp4": FP4, "int8": INT8}[options.quant]
    quant = Quant(kind=options.quant, double_quant=options.double_quant, compute_dtype=load)

    def quantize(_: int, tb):  # type: ignore[no-untyped-def]
        linears = tuple(
            t if any(t.linear.matches(k) for k in arch.keep_in_fp32)
            else replace(t, weight_dtype=storage, quant=quant, bias_dtype=keep)
            for t in tb.linears
        )
        return replace(tb, linears=linears)

    quantized = replace_blocks(base, quantize)
    notes = ["bitsandbytes quantizes block linears only; embeddings, norms and lm_head stay unquantized"]
    if options.kbit_prep and options.kbit_grad_ckpt:
        # peft utils/other.py prepare_model_for_kbit_training: with use_gradient_checkpointing=True it calls
        # enable_input_require_grads() and gradient_checkpointing_enable(use_reentrant=True by default)
        quantized = replace(quantized, forces_grad_ckpt=True, reentrant_ckpt=True, input_requires_grad=True)
        notes.append("prepare_model_for_kbit_training: non-quantized params upcast to fp32, gradient checkpointing on (reentrant)")
    elif options.kbit_prep:
        notes.append("prepare_model_for_kbit_training(use_gradient_checkpointing=False): non-quantized params "
                     "upcast to fp32, no gradient checkpointing")
    return replace(lora_model(quantized, options, targets, "qlora", training=training), notes=tuple(notes))


SPEC = register(MethodSpec(
    name="qlora", summary="QLoRA: LoRA on a 4-bit NF4 (or FP4 / int8) bitsandbytes base",
    options_cls=QLoraOptions, build=build, peft_type="LORA", source="Dettmers et al. 2023, arXiv:2305.14314",
    default_targets=LORA_DEFAULT_TARGETS,
))
