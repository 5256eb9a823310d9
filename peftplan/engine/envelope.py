"""The envelope around the engine's peak: what a GPU allocates that the engine knowingly does not model.

The engine's peak (engine/step.py) is the peak of live tensor bytes of the real HF + peft step, each
rounded to the caching allocator's 512-byte blocks; a CPU trace of the same step sees exactly that
(`peftplan check` holds CPU traces to 1%). On a GPU, `torch.cuda.max_memory_allocated()` also counts
allocations no CPU trace can see. Each such term is listed here with its size, as data with the
source it was read from (`data/overheads.json`, section "envelope"); the envelope is

    low  = peak - (what the engine may count that a GPU does not allocate)   [nothing known: = peak]
    high = peak + sum(terms that may be alive at the peak)

Every term is an upper bound of what may coincide with the peak (a kernel's scratch is alive only
inside that kernel), so `high` is conservative; none is a blanket percentage. What the terms do not
cover (and no GPU profile has yet measured): bitsandbytes / flash-attn package kernels' own
workspaces, NCCL buffers (multi-GPU), CUDA graphs, torch.compile. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..tuned import TunedModel
from ..training import Training

MIB = 1 << 20


@dataclass(frozen=True)
class EnvelopeTerm:
    """One allocation outside the engine's model: bytes it may add at the peak, and where that comes from."""

    name: str
    bytes: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "source": self.source}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _block(n: int) -> int:
    return _round_up(n, 512) if n > 0 else 0


def _is_sm90(compute_capability: str) -> bool:
    return compute_capability.strip() == "9.0"


def cublas_workspace_bytes(data: Mapping[str, Any], compute_capability: str) -> int:
    """PyTorch's per-(handle, stream) cuBLAS workspace, allocated through the caching allocator."""
    c = data["cublas_workspace"]
    size = int(c["bytes_sm90"] if _is_sm90(compute_capability) else c["bytes_default"])
    return int(c["handles"]) * _block(size)


def cublaslt_workspace_bytes(data: Mapping[str, Any]) -> int:
    c = data["cublaslt_workspace"]
    return int(c["handles"]) * _block(int(c["bytes"]))


def attention_backward_scratch_bytes(model: TunedModel, training: Training) -> int:
    """Scratch of the fused SDPA / flash-attention backward kernel for one attention call (the largest).

    PyTorch's flash backward (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp,
    `mha_bwd`, non-deterministic) allocates `softmax_d` (B x H x round128(Sq), fp32) and `dq_accum`
    (B x round128(Sq) x H x round32(D), fp32), and for GQA/MQA `dk_expanded`, `dv_expanded`
    (B x Sk x H x D, compute dtype each) before summing them into dk, dv. The memory-efficient kernel's
    fp32 grad-q accumulator is of the same B x H x S x D x 4 order. Eager attention runs plain
    matmuls (covered by the cuBLAS workspaces): 0."""
    if training.attention == "eager":
        return 0
    arch = model.arch
    b = training.micro_batch
    h = arch.num_heads
    d = arch.head_dim
    s = training.seq_len + model.virtual_tokens
    sq = _round_up(s, 128)
    d32 = _round_up(d, 32)
    total = _block(b * h * sq * 4) + _block(b * sq * h * d32 * 4)
    if arch.num_kv_heads < h:
        total += 2 * _block(training.compute_dtype.bytes_for(b * s * h * d))
    return total


def grad_scaler_bytes(training: Training) -> int:
    """fp16-mixed: torch.amp.GradScaler's device scalars (scale fp32, growth tracker int32, found_inf
    fp32 per device, inv_scale in unscale_), one 512-byte block each (torch/amp/grad_scaler.py)."""
    return 4 * 512 if training.precision == "fp16-mixed" else 0


def envelope_terms(model: TunedModel, training: Training, compute_capability: str,
                   data: Mapping[str, Any]) -> tuple[EnvelopeTerm, ...]:
    """The GPU-only allocations that may be alive at the peak, each with its source."""
    terms = [
        EnvelopeTerm("cublas_workspace", cublas_workspace_bytes(data, compute_capability),
                     data["cublas_workspace"]["source"]),
        EnvelopeTerm("cublaslt_workspace", cublaslt_workspace_bytes(data), data["cublaslt_workspace"]["source"]),
        EnvelopeTerm("attention_backward_scratch", attention_backward_scratch_bytes(model, training),
                     data["attention_backward_scratch"]["source"]),
        EnvelopeTerm("grad_scaler", grad_scaler_bytes(training), data["grad_scaler"]["source"]),
    ]
    return tuple(t for t in terms if t.bytes > 0)


def over_counted_terms(model: TunedModel, training: Training, data: Mapping[str, Any]) -> tuple[EnvelopeTerm, ...]:
    """What the engine counts that a GPU run may not allocate. None is known: the CPU trace (which the
    engine matches) counts nothing a CUDA run would not (host-side AdamW step scalars are excluded)."""
    return ()


def envelope(peak: int, model: TunedModel, training: Training, compute_capability: str,
             data: Mapping[str, Any]) -> tuple[int, int, tuple[EnvelopeTerm, ...]]:
    """(low, high, terms) of max_memory_allocated around the engine's `peak`."""
    add = envelope_terms(model, training, compute_capability, data)
    sub = over_counted_terms(model, training, data)
    low = peak - sum(t.bytes for t in sub)
    high = peak + sum(t.bytes for t in add)
    return low, high, add + tuple(EnvelopeTerm(t.name, -t.bytes, t.source) for t in sub)
