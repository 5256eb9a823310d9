"""Step time from a roofline over the kernels of the simulated step (pure: no torch).

The symbolic step (engine/step.py) notes every kernel it runs in its FlopCount (engine/ops.py,
autograd.py, program.py): GEMMs with their shapes and dtype, SDPA's fused attention, 4-bit
dequantization, DoRA's weight norm, and every other op as the bytes it reads and writes. Each
kernel costs

    max(FLOPs / achievable FLOP rate, bytes / achievable bandwidth)

on the chosen GPU. The achievable GEMM rate is the GPU's measured maximum (MAMF, data/roofline.json)
times the tile and wave quantization of the shape (NVIDIA's "Matrix Multiplication Background"
guide): an output of m x n is cut into 128 x 128 tiles (narrower, down to 16, along a narrower
dimension) run one per SM per wave, and a partial tile or a partial last wave costs a whole one. Skinny GEMMs (LoRA's rank-r factors) fall to the
bandwidth side by themselves. Attention kernels run at FlashAttention-2's published fraction of the
peak; eager attention is its two batched GEMMs plus the memory-bound mask, softmax and casts over
the T x S scores. A checkpointed layer's recompute is its forward noted again ("recompute").

One optimizer step adds its update, memory-bound over parameters, gradients and states (passes per
implementation in data/roofline.json); a paged optimizer whose state does not fit beside the step
pages it over the host link; offloaded state crosses it every step. The step is the larger of the
GPU's time and the host's time to launch the kernels (a floor that makes tiny micro-batches
inefficient), and collectives (engine/sharding.py) overlap it. Units: seconds, bytes, FLOPs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping

PHASES = ("forward", "backward", "recompute")


@lru_cache(maxsize=1)
def constants() -> dict[str, Any]:
    """data/roofline.json (every value with its source)."""
    return json.loads((resources.files("peftplan") / "data" / "roofline.json").read_text(encoding="utf-8"))


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per GPU (_rates is cached)
class Rates:
    """What one GPU achieves: FLOP/s per dtype name at the measured maximum, bytes/s, and the shape terms."""

    peak_flops: Mapping[str, float]  # dense datasheet FLOP/s per dtype name
    matmul_fraction: float  # MAMF / peak
    sm_count: int
    tile: int
    bandwidth: float  # achievable bytes/s of device memory
    attention_fraction: float
    launch_s: float
    host_link: float  # bytes/s per direction between host and GPU

    def peak(self, dtype: str) -> float:
        got = self.peak_flops.get(dtype)
        if got is None:
            got = self.peak_flops.get("fp16", 0.0) if dtype == "bf16" else self.peak_flops.get("fp32", 0.0)
        return got


def rates_for(gpu: Any) -> Rates:
    """The achievable rates of a catalog GPU (engine-side: `gpu` is a catalog.GPU)."""
    return _rates(gpu.name, tuple(sorted(gpu.peak_flops.items())), gpu.memory_bandwidth_bytes_per_s)


@lru_cache(maxsize=64)
def _rates(name: str, peaks: tuple[tuple[str, float], ...], bandwidth: int) -> Rates:
    c = constants()
    frac = c["matmul_achievable_fraction"]
    peak = dict(peaks)
    if "bf16" not in peak and "fp16" in peak:
        peak["bf16"] = peak["fp16"]
    return Rates(
        peak_flops=peak,
        matmul_fraction=float(frac["by_gpu"].get(name, frac["default"])["value"]),
        sm_count=int(c["sm_count"]["by_gpu"].get(name, c["sm_count"]["default"])),
        tile=int(c["matmul_tile"]["value"]),
        bandwidth=bandwidth * float(c["bandwidth_achievable_fraction"]["value"]),
        attention_fraction=float(c["flash_attention_fraction"]["value"]),
        launch_s=float(c["kernel_launch_s"]["value"]),
        host_link=float(c["host_link_bytes_per_s"]["by_gpu"].get(name, c["host_link_bytes_per_s"]["default"])),
    )


def matmul_efficiency(m: int, n: int, batch: int, rates: Rates) -> float:
    """Fraction of the datasheet peak a GEMM with an m x n output (batch of them) reaches: the MAMF
    fraction times tile quantization (useful share of the 128 x 128 tiles) times wave quantization
    (useful share of the last wave of one tile per SM)."""
    sm, sn = _tile_side(m, rates.tile), _tile_side(n, rates.tile)
    tm, tn = -(-m // sm), -(-n // sn)
    tiles = batch * tm * tn
    waves = -(-tiles // rates.sm_count)
    return rates.matmul_fraction * (m * n / (tm * tn * sm * sn)) * (tiles / (waves * rates.sm_count))


def _tile_side(dim: int, tile: int) -> int:
    """cuBLAS picks narrower tiles for a narrow output dimension (its kernels go down to 16-wide
    tiles): the tile side is the power of two at or above `dim`, between 16 and `tile`."""
    side = 16
    while side < dim and side < tile:
        side *= 2
    return side


@lru_cache(maxsize=1 << 16)
def matmul_seconds(m: int, n: int, k: int, dtype: str, batch: int, rates: Rates) -> float:
    """One (batched) GEMM (m x k) @ (k x n): max(compute time, time to read both operands and write the output)."""
    peak = rates.peak(dtype)
    width = 4 if dtype == "fp32" else 2 if dtype in ("bf16", "fp16") else 1
    memory = batch * (m * k + k * n + m * n) * width / rates.bandwidth
    if m == 0 or n == 0 or k == 0:
        return 0.0
    compute = 2 * m * n * k * batch / (peak * matmul_efficiency(m, n, batch, rates)) if peak > 0 else float("inf")
    return max(compute, memory)


@dataclass(frozen=True)
class KernelTable:
    """One micro-batch's kernels, aggregated: GEMMs (phase, m, n, k, dtype, batch) -> count; fused
    attention (phase, flops, bytes, dtype) -> count; memory-bound bytes per (phase, kind); kernel launches."""

    matmuls: Mapping[tuple[Any, ...], int]
    attention: Mapping[tuple[Any, ...], int]
    streams: Mapping[tuple[str, str], int]
    launches: int


def kernel_table(kernels: Iterable[tuple[Any, ...]]) -> KernelTable:
    """Aggregate the kernels a FlopCount noted (engine/ops.py) into a KernelTable."""
    mm: dict[tuple[Any, ...], int] = {}
    attn: dict[tuple[Any, ...], int] = {}
    streams: dict[tuple[str, str], int] = {}
    launches = 0
    for k in kernels:
        launches += 1
        kind = k[0]
        if kind == "mm":
            mm[k[1:]] = mm.get(k[1:], 0) + 1
        elif kind == "attn":
            attn[k[1:]] = attn.get(k[1:], 0) + 1
        else:
            key = (k[1], kind)
            streams[key] = streams.get(key, 0) + k[2]
    return KernelTable(mm, attn, streams, launches)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step and where they go (`breakdown`: "<phase> <kind>" -> seconds,
    summed over the step's micro-batches, plus "optimizer", "paged optimizer" / "offload")."""

    step_time_s: float
    gpu_s: float
    host_launch_s: float
    communication_s: float | None
    bound: str  # "gpu", "host launches" or "communication"
    breakdown: dict[str, float] = field(default_factory=dict)


_KIND_LABEL = {"mem": "memory-bound ops", "dequant": "4-bit dequantize", "dora": "DoRA weight norm"}


def micro_batch_seconds(table: KernelTable, rates: Rates) -> tuple[float, dict[str, float]]:
    """GPU seconds of one micro-batch's kernels and their breakdown. Keys are summed in sorted order,
    so equal tables give bit-identical times whichever path built them (estimate() or the planner)."""
    out: dict[str, float] = {}
    for key in sorted(table.matmuls):
        phase, m, n, k, dtype, batch = key
        label = f"{phase} matmul"
        out[label] = out.get(label, 0.0) + table.matmuls[key] * matmul_seconds(m, n, k, dtype, batch, rates)
    for key in sorted(table.attention):
        phase, flops, nbytes, dtype = key
        dtype_peak = rates.peak(dtype)
        t = max(flops / (dtype_peak * rates.attention_fraction) if dtype_peak > 0 else float("inf"),
                nbytes / rates.bandwidth)
        label = f"{phase} attention"
        out[label] = out.get(label, 0.0) + table.attention[key] * t
    for key in sorted(table.streams):
        phase, kind = key
        label = f"{phase} {_KIND_LABEL.get(kind, kind)}"
        out[label] = out.get(label, 0.0) + table.streams[key] / rates.bandwidth
    total = 0.0
    for label in sorted(out):
        total += out[label]
    return total, out


def optimizer_bytes(optimizer: str, impl: str, trainable_bytes: int, trainable_elements: int) -> int:
    """Bytes one optimizer step moves: passes over the trainable parameters' bytes (parameter, gradient and
    full-width states read and written) plus 8-bit states (data/roofline.json optimizer_passes)."""
    spec = constants()["optimizer_passes"].get(optimizer)
    if spec is None:
        raise ValueError(f"no optimizer traffic on record for {optimizer!r}")
    passes = spec[impl] if impl in spec else spec["passes"] if "passes" in spec else spec["fused"]
    return int(passes) * trainable_bytes + int(spec.get("state_bytes_per_element", 0)) * trainable_elements


def step_time(table: KernelTable, rates: Rates, *, grad_accum: int, optimizer: str, optimizer_impl: str,
              trainable_bytes: int, trainable_elements: int, paged_bytes_over: int = 0, offload_bytes: int = 0,
              communication_s: float | None = None,
              micro: tuple[float, dict[str, float]] | None = None) -> StepTime:
    """One optimizer step: `grad_accum` micro-batches of `table`, the optimizer update, host-link
    transfers (`paged_bytes_over`: paged state that does not fit and is paged out and back;
    `offload_bytes`: bytes each way for offloaded state), the kernel-launch floor and communication.
    `micro`: `micro_batch_seconds(table, rates)` when the caller already has it (the planner's memo)."""
    micro_s, parts = micro if micro is not None else micro_batch_seconds(table, rates)
    breakdown = {k: v * grad_accum for k, v in parts.items()}
    opt = optimizer_bytes(optimizer, optimizer_impl, trainable_bytes, trainable_elements) / rates.bandwidth
    breakdown["optimizer update"] = opt
    transfers = 0.0
    if paged_bytes_over:
        transfers += 2 * paged_bytes_over / rates.host_link
        breakdown["paged optimizer over PCIe"] = 2 * paged_bytes_over / rates.host_link
    if offload_bytes:
        transfers += 2 * offload_bytes / rates.host_link
        breakdown["offload over PCIe"] = 2 * offload_bytes / rates.host_link
    gpu_s = micro_s * grad_accum + opt + transfers
    host_s = table.launches * grad_accum * rates.launch_s
    total, bound = (gpu_s, "gpu") if gpu_s >= host_s else (host_s, "host launches")
    if communication_s is not None and communication_s > total:
        total, bound = communication_s, "communication"
    return StepTime(total, gpu_s, host_s, communication_s, bound, breakdown)
