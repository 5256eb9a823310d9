"""The fit verdict (fit.py) on reserved from the allocator replay, and its wiring: estimate, --alloc-conf
on estimate / compare / plan, --explain."""

import json

import pytest
from typer.testing import CliRunner

from peftplan.catalog import custom_gpu, load_gpu, load_model
from peftplan.cli import app
from peftplan.engine.allocator import replay
from peftplan.estimate import build_tuned, estimate, overheads
from peftplan.engine.step import simulate_step
from peftplan.fit import cuda_context_bytes, fit_verdict, nccl_buffer_bytes
from peftplan.training import Training, TrainingError

runner = CliRunner()
GiB = 2**30
TR = Training(micro_batch=2, seq_len=512)


def test_reserved_and_device_total_come_from_the_replay():
    arch, gpu = load_model("llama3.2-1b"), load_gpu("a100-80g")
    e = estimate(arch, "lora", TR, gpu)
    tuned, _ = build_tuned(arch, "lora", None, TR)
    r = replay(simulate_step(tuned, TR).events)
    m = e.memory
    assert m.peak_reserved_bytes == r.peak_reserved_bytes == m.allocator["peak_reserved_bytes"]
    assert m.peak_reserved_bytes > m.peak_allocated_bytes  # segment slack: not zero any more
    context, _ = cuda_context_bytes(overheads(), gpu.compute_capability)
    assert m.device_total_bytes == m.peak_reserved_bytes + context and m.nccl_buffers_bytes == 0
    assert e.headroom_bytes == gpu.memory_bytes - m.device_total_bytes and e.fits
    assert e.verdict.startswith("fits with")


def test_expandable_segments_change_reserved_not_allocated():
    arch, gpu = load_model("llama3.2-1b"), load_gpu("a100-80g")
    d = estimate(arch, "full", TR, gpu).memory
    x = estimate(arch, "full", TR.with_(alloc_conf="expandable_segments:True"), gpu).memory
    assert x.peak_allocated_bytes == d.peak_allocated_bytes
    assert d.peak_reserved_bytes > x.peak_reserved_bytes >= x.peak_allocated_bytes
    assert x.allocator["conf"] == "expandable_segments:True" and x.allocator["segments_at_peak"] <= 2


def test_nccl_buffers_only_under_multi_gpu():
    o = overheads()
    assert nccl_buffer_bytes(o, TR) == 0
    n = nccl_buffer_bytes(o, TR.with_(n_gpus=4, shard="ddp"))
    assert n == o["nccl_buffers"]["channels"] * 2 * o["nccl_buffers"]["buffsize_bytes"] > 0
    e = estimate(load_model("llama3.2-1b"), "lora", TR.with_(n_gpus=4, shard="ddp"), load_gpu("a100-80g"))
    assert e.memory.device_total_bytes == e.memory.peak_reserved_bytes + e.memory.cuda_context_bytes + n


def test_verdict_says_how_close():
    assert fit_verdict(10 * GiB, 12 * GiB, GiB).text == "fits with 2.00 GiB"
    tight = fit_verdict(int(11.6 * GiB), 12 * GiB, GiB)
    assert tight.fits and tight.tight and tight.text.startswith("fits with 0.40 GiB: tight")
    over = fit_verdict(13 * GiB, 12 * GiB, GiB)
    assert not over.fits and over.text == "does not fit: 1.00 GiB over"


def test_a_cache_that_does_not_fit_can_still_run_after_flushes():
    """Capacity between what the replay reserves with and without release_cached_blocks."""
    arch = load_model("llama3.2-1b")
    e = estimate(arch, "full", TR, load_gpu("a100-80g"))
    m = e.memory
    outside = m.cuda_context_bytes
    tuned, _ = build_tuned(arch, "full", None, TR)
    events = simulate_step(tuned, TR).events
    # the smallest limit the flushing allocator survives lies between allocated and the free-running reserved
    lo, hi = m.peak_allocated_bytes, m.peak_reserved_bytes
    assert not replay(events, limit_bytes=hi).out_of_memory
    while hi - lo > 2**20:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if not replay(events, limit_bytes=mid).out_of_memory else (mid, hi)
    if hi >= m.peak_reserved_bytes:
        pytest.skip("no flush saves this timeline")
    gpu = custom_gpu(hi + outside, load_gpu("a100-80g"))
    flushed = estimate(arch, "full", TR, gpu)
    assert flushed.fits and flushed.headroom_bytes < 0 and "flushing" in flushed.verdict
    smaller = estimate(arch, "full", TR, custom_gpu(lo + outside - 2**20, load_gpu("a100-80g")))
    assert not smaller.fits and smaller.verdict.startswith("does not fit")


def test_bad_alloc_conf_is_a_training_error():
    with pytest.raises(TrainingError, match="alloc conf"):
        Training(alloc_conf="max_split_size_mb:1")


@pytest.mark.parametrize("cmd", [
    ["estimate", "--model", "llama3.2-1b"],
    ["compare", "--model", "llama3.2-1b", "--methods", "lora"],
    ["plan", "--model", "llama3.2-1b", "--methods", "lora"],
])
def test_alloc_conf_flag_errors_are_one_line(cmd):
    r = runner.invoke(app, cmd + ["--alloc-conf", "expandable_segments:perhaps"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "expandable_segments takes True or False" in r.output


def test_estimate_json_carries_the_replay_and_the_verdict():
    r = runner.invoke(app, ["estimate", "--model", "llama3.2-1b", "--method", "full", "--batch", "2", "--seq", "512",
                            "--alloc-conf", "expandable_segments:True", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["training"]["alloc_conf"] == "expandable_segments:True"
    a = d["memory"]["allocator"]
    assert a["conf"] == "expandable_segments:True" and a["peak_reserved_bytes"] == d["memory"]["peak_reserved_bytes"]
    assert d["verdict"].startswith("fits with")


def test_explain_shows_where_fragmentation_comes_from():
    r = runner.invoke(app, ["estimate", "--model", "llama3.2-1b", "--method", "lora", "--explain"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "replayed through the CUDA caching allocator" in text and "fragmentation" in text
    assert "cached segments with no live block" in text and "largest free block" in text


def test_compare_and_plan_take_alloc_conf():
    r = runner.invoke(app, ["compare", "--model", "llama3.2-1b", "--methods", "lora", "--seq", "256", "--batch", "1",
                            "--alloc-conf", "expandable_segments:True", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert rows and all(row["fits"] for row in rows)
    assert all(row["verdict"].startswith("fits with") for row in rows)


def test_paged_optimizer_pages_only_tensors_of_1e5_elements_or_more():
    """bitsandbytes optim/optimizer.py get_state_buffer: `if not self.is_paged or p.numel() < 1e5`: zeros_like."""
    from peftplan.dtypes import FP32
    from peftplan.engine.optimizers import BNB_PAGED_MIN_NUMEL, tensor_cost

    for opt in ("paged-adamw", "paged-adamw-8bit"):
        small = tensor_cost(opt, "fused", BNB_PAGED_MIN_NUMEL - 1, FP32, None)
        large = tensor_cost(opt, "fused", BNB_PAGED_MIN_NUMEL, FP32, None)
        assert small.paged_bytes == 0 and small.state_bytes > 0 and sum(small.parts) == small.state_bytes
        assert large.paged_bytes > 0 and large.state_bytes < small.state_bytes


def test_a_requested_peak_over_the_limit_is_out_of_memory_without_the_second_replay():
    """fit_verdict skips its limited replay when the timeline's requested peak (round_size's sizes) is over the
    limit: the replay under that limit must indeed run out of memory, and just above the peak it need not."""
    from peftplan.fit import _peak_requested

    arch = load_model("llama3.2-1b")
    for method in ("full", "lora", "qlora"):
        tuned, _ = build_tuned(arch, method, None, TR)
        events = simulate_step(tuned, TR).events
        peak = _peak_requested(events)
        assert peak == replay(events).peak_requested_bytes
        assert replay(events, limit_bytes=peak - 2**20).out_of_memory
        assert not fit_verdict(peak - 2**20 + 1, peak - 2**20, 0, events, TR).fits
