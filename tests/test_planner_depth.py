"""The planner's recording from two shallow depths (planner/replay_depth.py) equals the recording of every block."""

from __future__ import annotations

import random

import pytest

import peftplan.planner.replay_depth as replay_depth
from peftplan.catalog import load_model
from peftplan.planner.replay import _Structure
from peftplan.planner.space import Variant

_CASES = [("lora", ()), ("lora", (("targets", "all-linear"),)), ("qlora", ()), ("dora", ()), ("full", ()),
          ("ia3", ()), ("adapter", ()), ("prompt", ())]


def _record(arch, variant, ranks, ckpt, precision, accumulate, extrapolate, monkeypatch):  # type: ignore[no-untyped-def]
    calls = []
    real = replay_depth.record_extrapolated

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        got = real(*args, **kwargs) if extrapolate else None
        calls.append(got is not None)
        return got

    monkeypatch.setattr(replay_depth, "record_extrapolated", spy)
    s = _Structure(arch, variant, ranks, ckpt, "sdpa", precision, accumulate)
    monkeypatch.setattr(replay_depth, "record_extrapolated", real)
    return s, calls


@pytest.mark.parametrize("model,seed", [("llama3.2-1b", 11), ("gemma2-2b", 12), ("qwen2.5-0.5b", 13)])
def test_extrapolated_recording_equals_the_full_one(model: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random structures: every peak, FLOP count and kernel table at random (B, T, r, optimizer) equal,
    and the shallow recording really ran (the test would pass vacuously on a fallback)."""
    rng = random.Random(seed)
    arch = load_model(model)
    for _ in range(4):
        method, opts = rng.choice(_CASES)
        ranks = (8, 16, 64) if method in ("lora", "qlora", "dora") else (None,)
        ckpt, accumulate = rng.choice([False, True]), rng.choice([False, True])
        precision = rng.choice(["bf16-mixed", "fp16-mixed", "fp32"])
        args = (arch, Variant(method, opts), ranks, ckpt, precision, accumulate)
        fast, calls = _record(*args, True, monkeypatch)
        full, _ = _record(*args, False, monkeypatch)
        assert fast.exact == full.exact, (method, fast.reason, full.reason)
        if not fast.exact:
            continue
        assert calls[0], f"{model} {method}: the shallow recording fell back to every block"
        assert fast.trainables == full.trainables and fast.state_poly == full.state_poly
        for _ in range(60):
            B, T, r = rng.randint(1, 16), rng.choice([1, 7, 64, 333, 1024, 2049, 8192]), rng.choice(ranks) or 0
            for optimizer in ("adamw", "adamw-8bit", "paged-adamw-8bit"):
                assert fast.peak_at(B, T, r, optimizer) == full.peak_at(B, T, r, optimizer), (method, B, T, r)
            assert fast.flops_at(B, T, r) == full.flops_at(B, T, r)
            assert fast.kernels.table_at(B, T, r) == full.kernels.table_at(B, T, r)
