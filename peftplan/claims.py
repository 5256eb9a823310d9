"""The lecture notes' arithmetic (shared/seeds), reproduced under each claim's own assumptions,
beside what the engine predicts for a real HF + peft run, and why the two differ.

Each claim computes its number from the seed's own formula (no hard-coded answer): the test suite
checks the reproduced value against the figure quoted in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import load_gpu, load_model
from .estimate import estimate
from .training import Training
from .units import BYTES_PER_GB

GB = BYTES_PER_GB


@dataclass(frozen=True)
class Claim:
    key: str
    seed: str  # which lecture note says it
    statement: str  # the claim in the seed's words
    quoted: str  # the figure as the seed quotes it
    reproduced: float  # the seed's own arithmetic, recomputed
    unit: str
    engine: str  # what the engine predicts for the real run
    why: str  # why they differ


def _peak_gb(model: str, method: str, training: Training, options: dict | None = None) -> float:
    est = estimate(load_model(model), method, training, load_gpu("h200"), options)
    return est.memory.peak_allocated_bytes / GB


def all_claims() -> list[Claim]:
    claims: list[Claim] = []
    n7 = 7e9
    seven_b = 2 * n7 + 2 * n7 + 4 * n7 + 2 * GB  # weights + grads + Adam (2 states x 2 B) + 2 GB activations
    e = _peak_gb("llama2-7b", "full", Training(micro_batch=1, seq_len=512, precision="bf16", optimizer_impl="fused"))
    claims.append(Claim(
        "full-7b-58gb", "004 (Yuan, PKU)", "Full fine-tuning of a 7B model: 14 + 14 + 28 + 2 GB", "58 GB",
        seven_b / GB, "GB",
        f"llama2-7b (6.74B), pure bf16, AdamW fused, b1 s512: {e:.1f} GB peak allocated",
        "the seed rounds to 7B parameters and takes 2 GB of activations from Zhao et al.; the engine counts "
        "6.74B parameters, the fp32 log-softmax of a 32k vocabulary and the step's transient gradients",
    ))
    fp32 = (4 + 4 + 8) * n7
    e = _peak_gb("llama2-7b", "full", Training(micro_batch=1, seq_len=512, precision="fp32", optimizer_impl="fused"))
    claims.append(Claim(
        "full-7b-fp32", "002 (ChatGPT from Scratch, lecture 11)", "7B x 4 B + gradients + 2 Adam values: >100 GB",
        ">100 GB (28 + 28 + 56)", fp32 / GB, "GB",
        f"llama2-7b fp32, AdamW fused, b1 s512: {e:.1f} GB",
        "the seed leaves activations out ('can be significant'); the engine adds them and the loss",
    ))
    n8 = load_model("llama3-8b").total_params
    mixed = 16 * n8
    e = _peak_gb("llama3-8b", "full", Training(micro_batch=1, seq_len=2048, precision="bf16-mixed"))
    claims.append(Claim(
        "mixed-16-bytes", "003 (PEFT lecture)", "Half-precision model with Adam: 2 + 2 + 12 bytes per parameter",
        "16 bytes/param, >120 GB (128 GB) for LLaMA3-8B", mixed / GB, "GB",
        f"llama3-8b bf16-mixed (fp32 master weights, autocast), AdamW fused, b1 s2048: {e:.1f} GB",
        "HF Trainer's mixed precision keeps fp32 weights (4 B) and fp32 grads (4 B) plus Adam's 8 B = 16 B, "
        "and autocast keeps a bf16 copy of every weight for backward (+2 B) plus activations",
    ))
    nf4_weights = n8 * 0.5
    claims.append(Claim(
        "qlora-4gb-weights", "003 (PEFT lecture)", "8B parameters x 0.5 bytes", "4 GB",
        nf4_weights / GB, "GB",
        _qlora_weights_text(),
        "bitsandbytes quantizes only block linears: embeddings and lm_head (1.05B params) stay in 16 bits "
        "(fp32 after prepare_model_for_kbit_training), and the absmax constants add 0.127-0.5 bits/param",
    ))
    per_param = 0.5 + 2 + 2 + 4
    claims.append(Claim(
        "qlora-8.5-bytes", "003 (PEFT lecture)", "weight 0.5 + LoRA 2 + AdamW 2 + gradient 4 bytes",
        "8.5 bytes per trainable parameter", per_param, "bytes/param",
        "peft keeps LoRA weights in fp32 (autocast_adapter_dtype): 4 B weight + 4 B grad + 8 B AdamW = 16 B "
        "per trainable parameter; the 0.5 B base weight belongs to the frozen parameters",
        "the seed mixes a frozen-weight byte into a per-trainable-parameter sum and assumes 16-bit adapters "
        "and 1-byte Adam states",
    ))
    e = _peak_gb("llama3-8b", "qlora", Training(micro_batch=1, seq_len=2048),
                 {"rank": 16, "targets": "all-linear"})
    total = (nf4_weights + 0.006 * n8 * per_param) / GB
    claims.append(Claim(
        "qlora-14gb", "003 (PEFT lecture)", "LLaMA3-8B QLoRA at sequence length 2048", "~14 GB (4.1 GB + activations)",
        total, "GB (weights + 0.6% trainable x 8.5 B)",
        f"llama3-8b QLoRA NF4+DQ r16 all-linear, kbit prep (checkpointing), b1 s2048: {e:.1f} GB",
        "the seed's 14 GB is a guess for activations; the engine counts the fp32 upcast of embeddings and head, "
        "one layer's recomputed activations and the fp32 logits and their gradients (128k vocabulary)",
    ))
    no_dq = 32 / 64
    dq = 8 / 64 + 32 / (64 * 256)
    claims.append(Claim(
        "double-quant", "003 (PEFT lecture)", "absmax overhead per parameter, before and after double quantization",
        "0.5 -> 0.127 bits", dq, "bits/param (before: %.3f)" % no_dq,
        _dq_engine_text(),
        "bitsandbytes also stores a 256-entry fp32 code and an offset per tensor; negligible for large tensors",
    ))
    adapter = 1024 * 24 + 24 * 1024
    claims.append(Claim(
        "adapter-49152", "003 (PEFT lecture)", "bottleneck adapter 1024 -> 24 -> 1024", "49,152 weights",
        adapter, "params",
        f"with biases (as peftplan's adapters have): {adapter + 24 + 1024:,}",
        "the seed counts weight matrices only",
    ))
    t5 = load_model("t5-xxl")
    prompt = 5 * t5.hidden_size
    claims.append(Claim(
        "prompt-20k", "001 (prompt tuning paper notes)", "T5-XXL soft prompt of 5 tokens", "20K parameters",
        prompt, "params",
        f"peft prompt tuning on a seq2seq model: {2 * prompt:,} (a prompt for encoder and decoder)",
        "peft's SEQ_2_SEQ_LM task uses num_transformer_submodules = 2",
    ))
    p = q = 4096
    r = 8
    claims.append(Claim(
        "lora-pq", "000/004 (LoRA notes)", "LoRA saves models/grads/optimizer from O(pq) to O((p+q)r)",
        "O(pq) -> O((p+q)r)", (p + q) * r, f"params for a {p}x{q} matrix at r={r} (full: {p * q:,})",
        "the engine counts exactly r*(in+out) per targeted linear",
        "activations are not saved by LoRA (the seed says so too); peft adds per-adapter input casts",
    ))
    mt0 = estimate(load_model("mt0-large"), "lora", Training(micro_batch=1, seq_len=128), load_gpu("a100-80g"),
                   {"rank": 8, "alpha": 32, "dropout": 0.1, "targets": "q,v"})
    claims.append(Claim(
        "mt0-print", "003 (PEFT lecture)", "print_trainable_parameters() for mt0-large, LoRA r=8 on q,v",
        "trainable params: 2359296 || all params: 1231940608 || trainable%: 0.19151053100118282",
        mt0.params.trainable, "trainable params",
        mt0.params.legacy_peft_line() + "  (peft 0.21 prints: " + mt0.params.peft_line() + ")",
        "exact; transformers 5.23 ties mt5's lm_head to the embedding at load (T5Config forces "
        "tie_word_embeddings), so a model built by it counts 256,114,688 fewer parameters than the checkpoint",
    ))
    return claims


def _qlora_weights_text() -> str:
    est = estimate(load_model("llama3-8b"), "qlora", Training(micro_batch=1, seq_len=2048), load_gpu("h200"),
                   {"rank": 16, "targets": "all-linear"})
    return (f"llama3-8b NF4+DQ: {est.memory.weights_bytes / GB:.2f} GB of weights as loaded "
            f"(+{est.memory.quant_constants_bytes / GB:.2f} GB quantization constants)")


def _dq_engine_text() -> str:
    from .engine.load import _quant_constant_bytes
    from .tuned import Quant

    n = 4096 * 14336
    dq = _quant_constant_bytes(n, Quant("nf4", True)) * 8 / n
    nodq = _quant_constant_bytes(n, Quant("nf4", False)) * 8 / n
    return f"bitsandbytes state bytes for a 4096x14336 weight: {nodq:.3f} bits/param without DQ, {dq:.3f} with"
