"""The engine's peak allocated memory against the real HF + peft step traced under FakeTensorMode.

Every method, two sizes, checkpointing on/off, eager/SDPA: the engine's peak must be within 1% of the
trace's and the parameter counts exact. Small synthetic configs keep the traces at ~1 s each.
benchmarks/accuracy_vs_trace.py runs the full sweep (families, precisions, optimizers, llama3-8b).
"""

import warnings

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from peftplan.arch import from_hf_config  # noqa: E402
from peftplan.catalog import load_gpu, load_model  # noqa: E402
from peftplan.estimate import estimate  # noqa: E402
from peftplan.methods import method_names  # noqa: E402
from peftplan.training import Training  # noqa: E402

GPU = load_gpu("h200")
SIZES = {
    "tiny": ("llama3.2-1b", dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)),
    "small": ("llama3.2-1b", dict(num_hidden_layers=2, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                  num_key_value_heads=2, vocab_size=8000)),
}
GPT2 = ("gpt2", dict(n_layer=2, n_embd=256, n_head=4, vocab_size=1000))  # BitFit needs biases

# (method, size, grad_ckpt[, attention]) combinations whose engine/trace gap is known: kept visible as
# non-strict xfail with the measured error (seq 64, this file's configs) and its cause. size None = both.
# Fixed and removed in this change: non-reentrant checkpoint early stop / per-op recompute (adapter, dora,
# full, lisa, prompt, ptuning), reentrant checkpointing under kbit prep (qlora), full/lisa tiny +1.06%.
# gpt2 dropout masks: fixed in the tracer (harness/trace.py emulates CUDA's fused native_dropout, bool mask).
# Fixed by the differential fuzzer's findings (2026-12-02): eager attention + checkpointing (+1.7..2.3%: the
# eager path's repeat_kv copies had no backward node, so their gradients lived to the end of backward) and
# IA3 + checkpointing (+3.0..3.7%: peft's IA3 casts its product back to the activation dtype; the broadcast
# vector's gradient builds a full-size product before sum_to_size). No known gap is left on this grid.
KNOWN: dict = {}


def _arch(size, method):
    name, over = GPT2 if method == "bitfit" else SIZES[size]
    cfg = dict(load_model(name).config)
    cfg.update(over)
    return from_hf_config(cfg, f"{name}-{size}")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("grad_ckpt", [False, True])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", method_names())
def test_engine_peak_matches_trace(method, size, grad_ckpt, attention, request):
    from peftplan.harness.trace import trace

    if method == "prefix" and grad_ckpt:  # peft refuses it; the engine must say so rather than print a number
        from peftplan.methods.base import MethodError

        with pytest.raises(MethodError):
            estimate(_arch(size, method), method, Training(micro_batch=2, seq_len=64, grad_ckpt=True),
                     load_gpu("a100-80g"))
        return
    for key in ((method, size, grad_ckpt, attention), (method, size, grad_ckpt), (method, None, grad_ckpt),
                (method, size, None), (method, None, None)):
        if key in KNOWN:
            request.node.add_marker(pytest.mark.xfail(reason=KNOWN[key], strict=False))
            break
    arch = _arch(size, method)
    training = Training(micro_batch=2, seq_len=64, grad_ckpt=grad_ckpt, attention=attention)
    e = estimate(arch, method, training, GPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trace(arch, method, None, training, flops=False)
    assert (e.params.total, e.params.trainable) == (r.params_total, r.params_trainable)
    err = (e.memory.peak_allocated_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
    assert abs(err) < 0.01, f"engine {e.memory.peak_allocated_bytes:,} vs trace {r.peak_allocated_bytes:,} ({err:+.2%})"


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_grad_accum_and_recompute_flops_match_trace(method):
    """Gradient accumulation (the second micro-batch adds into live .grad: AccumulateGrad's incoming
    buffer, the tied embedding/lm_head sum) and checkpoint recompute FLOPs (non-reentrant early stop;
    qlora's kbit prep: reentrant, full recompute)."""
    from peftplan.engine.flops import step_flops
    from peftplan.estimate import build_tuned
    from peftplan.harness.trace import trace

    arch = _arch("small", method)
    training = Training(micro_batch=2, seq_len=64, grad_accum=2, grad_ckpt=True)
    e = estimate(arch, method, training, GPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trace(arch, method, None, training)
    err = (e.memory.peak_allocated_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
    assert abs(err) < 0.01, f"engine {e.memory.peak_allocated_bytes:,} vs trace {r.peak_allocated_bytes:,} ({err:+.2%})"
    tuned, _ = build_tuned(arch, method, {}, training)
    f = step_flops(tuned, e.training, causal_skip=False)
    assert f.forward // 2 == r.flops_forward
    assert (f.backward_input + f.backward_weight + f.recompute) // 2 == r.flops_backward
