"""The engine's timeline and the CPU trace's, both replayed through the same caching-allocator model.

The tracer (harness/trace.py) sees every storage the real HF + peft step allocates and frees;
`allocator_events` hands that order to engine/allocator.py, as `Allocator.events` does for the
engine. Same allocator, two timelines: where the engine records the same tensors in the same order,
peak reserved and the segment count are identical; elsewhere the engine leaves out sub-MiB tensors
the trace sees (loss scalars, small views), which can cost one more 2 MiB small-pool segment (or one
2 MiB page with expandable segments) on these small CI configurations.
"""

import warnings
from functools import lru_cache

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from peftplan.engine.alloc_conf import parse_alloc_conf  # noqa: E402
from peftplan.engine.allocator import replay  # noqa: E402
from peftplan.engine.step import simulate_step  # noqa: E402
from peftplan.estimate import build_tuned  # noqa: E402
from peftplan.methods import method_names  # noqa: E402
from peftplan.training import Training  # noqa: E402

from test_engine_vs_trace import _arch  # noqa: E402  (the CI matrix's small synthetic configs)

SMALL_SEGMENT = 2 * 2**20  # kSmallBuffer; also the small pool's expandable page
# P-tuning's PromptEncoder is modelled as its separate tensors since 2026-12-02: the strict xfail on 'small'
# (engine reserved 8-10 MiB below the trace's) is gone.


@lru_cache(maxsize=None)
def _timelines(method: str, size: str, grad_ckpt: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from peftplan.harness.trace import trace

    arch = _arch(size, method)
    training = Training(micro_batch=2, seq_len=64, grad_ckpt=grad_ckpt)
    tuned, _ = build_tuned(arch, method, None, training)
    effective = training.with_(grad_ckpt=True) if tuned.forces_grad_ckpt else training
    engine = simulate_step(tuned, effective).events
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(arch, method, None, effective, flops=False).alloc_events
    assert traced
    return tuple(engine), tuple(traced)


@pytest.mark.parametrize("method, size, grad_ckpt", [
    ("lora", "tiny", False), ("lora", "small", True), ("full", "small", False), ("full", "tiny", True),
    ("qlora", "tiny", True), ("ia3", "small", False), ("lisa", "small", True), ("adapter", "tiny", True),
])
def test_engine_replay_equals_trace_replay(method, size, grad_ckpt):
    engine, traced = _timelines(method, size, grad_ckpt)
    a, b = replay(engine), replay(traced)
    assert (a.peak_reserved_bytes, a.segments_at_peak) == (b.peak_reserved_bytes, b.segments_at_peak)
    assert abs(a.peak_requested_bytes - b.peak_requested_bytes) <= 0.01 * b.peak_requested_bytes


@pytest.mark.parametrize("conf", ["", "expandable_segments:True"])
@pytest.mark.parametrize("grad_ckpt", [False, True])
@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("method", method_names())
def test_engine_replay_within_one_small_segment_of_trace_replay(method, size, grad_ckpt, conf, request):
    if method == "prefix" and grad_ckpt:
        pytest.skip("peft refuses prefix tuning with gradient checkpointing (test_engine_vs_trace checks the error)")
    engine, traced = _timelines(method, size, grad_ckpt)
    c = parse_alloc_conf(conf)
    a, b = replay(engine, c), replay(traced, c)
    gap = a.peak_reserved_bytes - b.peak_reserved_bytes
    assert abs(gap) <= SMALL_SEGMENT, f"engine reserved {a.peak_reserved_bytes:,} vs trace {b.peak_reserved_bytes:,}"


def _matrix_ids():
    from peftplan.harness.matrix import matrix

    return [(e.id, e) for e in matrix("tiny")]


@pytest.mark.parametrize("entry", [e for _, e in _matrix_ids()], ids=[i for i, _ in _matrix_ids()])
def test_ci_matrix_tiny_engine_replay_matches_trace_replay(entry):
    """The `peftplan trace --matrix tiny` entries (the tiny half of the CI matrix): 46 of 49 replay to
    the same reserved and segments; the others within one 2 MiB small-pool segment."""
    from peftplan.harness.trace import trace

    arch, training = entry.arch(), Training(**entry.training)
    tuned, _ = build_tuned(arch, entry.method, entry.options, training)
    effective = training.with_(grad_ckpt=True) if tuned.forces_grad_ckpt else training
    engine = simulate_step(tuned, effective).events
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(arch, entry.method, entry.options or None, effective, flops=False).alloc_events
    a, b = replay(engine), replay(traced)
    assert abs(a.peak_reserved_bytes - b.peak_reserved_bytes) <= SMALL_SEGMENT
    assert abs(a.segments_at_peak - b.segments_at_peak) <= 1
