"""Users' CI API: `peftplan.envelope(estimate)` and the `peftplan_envelope` pytest fixture.

A real tiny model's training steps run on the CPU (real tensors) inside the envelope; an estimate
that is off must raise EnvelopeError with a readable message. The engine's envelope terms (the
GPU-only allocations that widen it) are checked against their sources' formulas.
"""

from __future__ import annotations

import dataclasses

import pytest

import peftplan
from peftplan.arch import from_hf_config
from peftplan.catalog import load_gpu, load_model
from peftplan.estimate import estimate, overheads
from peftplan.training import Training

TINY = dict(model_type="llama", vocab_size=1000, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False)


# ---- the envelope's terms (pure) ------------------------------------------------------------------


def _terms(est):
    return {t["name"]: t["bytes"] for t in est.memory.envelope_terms}


def test_envelope_terms_follow_their_sources():
    arch = load_model("llama3-8b")
    tr = Training(micro_batch=2, seq_len=1000)
    a100 = estimate(arch, "lora", tr, load_gpu("a100-80g"))
    h100 = estimate(arch, "lora", tr, load_gpu("h100"))
    t, th = _terms(a100), _terms(h100)
    data = overheads()["envelope"]
    assert t["cublas_workspace"] == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)  # ':4096:2:16:8', 2 threads
    assert th["cublas_workspace"] == 2 * 4096 * 8 * 1024  # sm90: 32 MiB
    assert t["cublaslt_workspace"] == 2 * 1024 * 1024
    # flash backward: softmax_d + dq_accum (fp32, Sq rounded to 128, D to 32) + GQA dk/dv expanded (bf16)
    b, h, d, s = 2, 32, 128, 1000
    sq = 1024
    assert t["attention_backward_scratch"] == b * h * sq * 4 + b * sq * h * d * 4 + 2 * b * s * h * d * 2
    m = a100.memory
    assert m.envelope_low_bytes == m.peak_allocated_bytes
    assert m.envelope_high_bytes == m.peak_allocated_bytes + sum(t.values())
    for term in a100.memory.envelope_terms:
        assert term["source"] and term["name"] in data
    eager = estimate(arch, "lora", tr.with_(attention="eager"), load_gpu("a100-80g"))
    assert "attention_backward_scratch" not in _terms(eager)
    fp16 = estimate(arch, "lora", tr.with_(precision="fp16-mixed"), load_gpu("t4"))
    assert _terms(fp16)["grad_scaler"] == 4 * 512


def test_envelope_is_no_blanket_percentage():
    arch = load_model("llama3-8b")
    small = estimate(arch, "qlora", Training(micro_batch=1, seq_len=256), load_gpu("a100-80g"))
    big = estimate(arch, "full", Training(micro_batch=1, seq_len=256), load_gpu("a100-80g"))
    width = lambda e: e.memory.envelope_high_bytes - e.memory.envelope_low_bytes  # noqa: E731
    assert width(small) == width(big)  # same shapes, same GPU: same terms whatever the peak


# ---- the context manager on a real CPU step -------------------------------------------------------


def _real_step(method, precision):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peftplan.harness.build import build_model

    arch = from_hf_config(TINY, "tiny-llama")
    tr = Training(micro_batch=2, seq_len=64, precision=precision)
    est = estimate(arch, method, tr, load_gpu("a100-80g"))
    built = build_model(arch, method, {}, est.training, device="cpu")
    ids = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.endswith("-mixed"))
        for _ in range(2):  # the second step runs with the optimizer state allocated
            with amp:
                loss = built.model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            built.optimizer.step()
            built.optimizer.zero_grad(set_to_none=True)

    return est, built, step


@pytest.mark.parametrize("method,precision", [("lora", "bf16-mixed"), ("full", "fp32")])
def test_real_cpu_step_inside_the_envelope(peftplan_envelope, method, precision):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        est, built, step = _real_step(method, precision)
        with peftplan_envelope(est, model=built.model, optimizer=built.optimizer, device="cpu") as m:
            step()
    finally:
        torch.set_num_threads(threads)
    assert m.measured_bytes is not None and m.low_bytes <= m.measured_bytes <= m.high_bytes
    assert abs(m.error_pct) <= 1.0
    assert peftplan_envelope.measurements == [m]
    assert m.measured_bytes > est.memory.weights_bytes  # the block's activations were counted


def test_an_estimate_that_is_off_raises_a_readable_error():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    est, built, step = _real_step("lora", "fp32")
    wrong = dataclasses.replace(est, memory=dataclasses.replace(
        est.memory, peak_allocated_bytes=est.memory.peak_allocated_bytes // 2))
    with pytest.raises(peftplan.EnvelopeError) as info:
        with peftplan.envelope(wrong, model=built.model, optimizer=built.optimizer, device="cpu") as m:
            step()
    assert isinstance(info.value, AssertionError)
    text = str(info.value)
    for word in ("above the peftplan envelope", "predicted:", "measured:", "envelope:", "biggest predicted component"):
        assert word in text
    assert len(text.splitlines()) >= 5
    assert m.measured_bytes > wrong.memory.peak_allocated_bytes


def test_fixture_is_registered_as_a_pytest_plugin():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="pytest11") if ep.value == "peftplan.pytest_plugin"]
    assert eps, "pyproject [project.entry-points.pytest11] not installed (pip install -e .)"
