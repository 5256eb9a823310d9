"""Does it fit: reserved (the caching-allocator replay) + CUDA context + NCCL buffers vs the GPU.

Pure (no torch, no I/O beyond bundled data). `estimate()` and the planner both decide with
`fit_verdict`, so `estimate`, `compare` and `plan` say the same thing about the same run.

An out-of-memory error happens when the caching allocator cannot find a cached block nor create
a segment (c10/cuda/CUDACachingAllocator.cpp `malloc`), so the device-side quantity that matters is
what the allocator has *reserved*, plus what lives outside it on the device: the CUDA context and,
under multi-GPU, NCCL's own buffers (cudaMalloc'd by NCCL, not through the allocator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .engine.alloc_conf import parse_alloc_conf
from .engine.allocator import ReplayResult, replay
from .training import Training
from .units import fmt_gib


def cuda_context_bytes(overheads: dict[str, Any], compute_capability: str) -> tuple[int, str]:
    """(bytes, provenance) of the CUDA context on a GPU of this compute capability
    (data/overheads.json `cuda_context_bytes`: a measured value per capability when one is on
    record, else the documented estimate)."""
    o = overheads["cuda_context_bytes"]
    measured = (o.get("by_compute_capability") or {}).get(compute_capability)
    if measured:
        return int(measured["value"]), str(measured["source"])
    return int(o["value"]), "estimate (not measured): " + str(o["status"])


def nccl_buffer_bytes(overheads: dict[str, Any], training: Training) -> int:
    """NCCL's device buffers per rank under multi-GPU (0 on one GPU): data/overheads.json
    `nccl_buffers` (channels x 2 directions x NCCL_BUFFSIZE, an estimate)."""
    if training.n_gpus <= 1:
        return 0
    o = overheads["nccl_buffers"]
    return int(o["channels"]) * 2 * int(o["buffsize_bytes"])


def replay_reserved(events: Sequence[int], training: Training, limit_bytes: int = 0) -> ReplayResult:
    """The step's timeline through the caching allocator under the run's PYTORCH_CUDA_ALLOC_CONF."""
    return replay(events, parse_alloc_conf(training.alloc_conf), limit_bytes)


def _peak_requested(events: Sequence[int]) -> int:
    """The largest sum of live allocations (each rounded to 512 bytes, as round_size does) on the timeline."""
    from .engine.allocator import K_MIN_BLOCK

    sizes = [((ev + 511) & ~511 if ev >= K_MIN_BLOCK else K_MIN_BLOCK) if ev > 0 else 0 for ev in events]
    cur = peak = 0
    for i, ev in enumerate(events):
        if ev > 0:
            cur += sizes[i]
            if cur > peak:
                peak = cur
        elif ev < 0:
            cur -= sizes[~ev]
    return peak


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    headroom_bytes: int  # capacity - device total (negative: over)
    tight: bool  # fits, by less than the estimate's own uncertainty
    flushes: int  # cache flushes the allocator needs to fit (0: none)
    text: str


def fit_verdict(device_total_bytes: int, capacity_bytes: int, uncertainty_bytes: int,
                events: Sequence[int] | None = None, training: Training | None = None,
                outside_reserved_bytes: int = 0) -> FitVerdict:
    """Whether a run whose device total (reserved + context + NCCL) is `device_total_bytes` fits
    in `capacity_bytes`.

    `uncertainty_bytes`: what the estimate may miss (the envelope's spread, engine/envelope.py);
    a run that fits by less is "tight". When the device total does not fit and the timeline is
    given, it is replayed again under the limit capacity - `outside_reserved_bytes`: the
    allocator then frees its cached segments and retries before giving up (`release_cached_blocks`
    in `malloc`), so a run whose *cache* does not fit may still run, with slower steps."""
    headroom = capacity_bytes - device_total_bytes
    if headroom >= 0:
        tight = headroom < uncertainty_bytes
        text = f"fits with {fmt_gib(headroom)}" + (
            f": tight (less than the {fmt_gib(uncertainty_bytes)} the estimate may miss)" if tight else "")
        return FitVerdict(True, headroom, tight, 0, text)
    if (events is not None and training is not None and capacity_bytes > outside_reserved_bytes
            and _peak_requested(events) <= capacity_bytes - outside_reserved_bytes):
        # (reserved >= allocated >= requested at every moment: a timeline whose requested peak is over the
        # limit runs out of memory whatever the cache does, so only the others are replayed again)
        limited = replay_reserved(events, training, capacity_bytes - outside_reserved_bytes)
        if not limited.out_of_memory:
            return FitVerdict(True, headroom, True, limited.alloc_retries,
                              f"fits only by flushing the allocator's cache ({limited.alloc_retries} "
                              f"release_cached_blocks retries per run): its cache needs {fmt_gib(-headroom)} "
                              "more than the GPU has; steps slow down at each flush")
    return FitVerdict(False, headroom, False, 0, f"does not fit: {fmt_gib(-headroom)} over")
