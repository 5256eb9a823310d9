"""The CPU tracer: the fake-tensor trace of the real HF + peft step equals a real-tensor run.

Every method of the registry is built with the real libraries on tiny models (llama, gpt2, t5,
bert) and one training step pair is traced twice with the same tracker: under FakeTensorMode and
with real CPU tensors. Peaks, per-category bytes, parameter counts and FLOPs must be identical.
"""

from __future__ import annotations

import json
import math
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from peftplan.arch import from_hf_config  # noqa: E402
from peftplan.harness import NotTraceable  # noqa: E402
from peftplan.harness.build import build_model  # noqa: E402
from peftplan.harness.trace import count_flops, saved_tensor_table, trace  # noqa: E402
from peftplan.methods import MethodError, method_names  # noqa: E402
from peftplan.training import Training  # noqa: E402

TINY = {
    "llama": dict(model_type="llama", vocab_size=1000, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=1000, n_embd=128, n_head=4, n_layer=2, n_positions=256),
    "t5": dict(model_type="t5", vocab_size=1000, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
               num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "bert": dict(model_type="bert", vocab_size=1000, hidden_size=128, num_attention_heads=4, num_hidden_layers=2,
                 intermediate_size=256, max_position_embeddings=256, type_vocab_size=2),
}
STEP = dict(micro_batch=2, seq_len=32)
PROMPT_LEARNING = ("prompt", "prefix", "ptuning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The real-tensor runs are tiny: one intra-op thread avoids OpenMP spinning on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(family: str):
    return from_hf_config(TINY[family], f"tiny-{family}")


def assert_fake_equals_real(arch, method, options=None, **training):
    tr = Training(**{**STEP, **training})
    fake = trace(arch, method, options or {}, tr)
    real = trace(arch, method, options or {}, tr, real=True)
    assert fake.peak_allocated_bytes == real.peak_allocated_bytes
    assert fake.components == real.components
    assert fake.phase_peaks == real.phase_peaks
    assert (fake.params_total, fake.params_trainable) == (real.params_total, real.params_trainable)
    assert (fake.flops_forward, fake.flops_backward) == (real.flops_forward, real.flops_backward)
    assert fake.peak_allocated_bytes > 0 and fake.flops_forward > 0
    assert sum(fake.components.values()) == fake.peak_allocated_bytes
    return fake


def _applies(family: str, method: str) -> bool:
    if method == "bitfit" and family in ("llama", "t5"):
        return False  # no biases: BitFit raises MethodError (tested below)
    if method in PROMPT_LEARNING and family == "bert":
        return False  # peft has no masked-LM prompt-learning model (tested below)
    return True


MATRIX = [(f, m) for f in TINY for m in method_names() if _applies(f, m)]


@pytest.mark.parametrize("family,method", MATRIX)
def test_every_method_fake_equals_real(family, method):
    res = assert_fake_equals_real(tiny(family), method)
    assert res.params_trainable > 0


def test_params_match_the_engine():
    """The real stack's parameter counts equal peftplan's own count for every method."""
    estimate = pytest.importorskip("peftplan.estimate")
    if not hasattr(estimate, "count_params") or not hasattr(estimate, "build_tuned"):
        pytest.skip("peftplan.estimate has no count_params")
    tr = Training(**STEP)
    for family, method in MATRIX:
        arch = tiny(family)
        built = build_model(arch, method, {}, tr, device="meta")
        tuned, _ = estimate.build_tuned(arch, method, {}, tr)
        want = estimate.count_params(tuned)
        assert built.params() == (want.total, want.trainable), (family, method)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("variant", [
    dict(grad_ckpt=True),
    dict(attention="eager"),
    dict(precision="fp32"),
    dict(precision="bf16"),
    dict(grad_ckpt=True, attention="eager", precision="fp32"),
])
def test_llama_variants_fake_equals_real(method, variant):
    assert_fake_equals_real(tiny("llama"), method, **variant)


@pytest.mark.parametrize("method,options,variant", [
    ("dora", {"targets": "all-linear"}, dict(grad_ckpt=True)),
    ("ia3", {}, dict(attention="eager")),
    ("lisa", {"lisa_layers": 1}, dict(precision="bf16")),
    ("adapter", {"adapter_kind": "parallel"}, dict(precision="bf16")),
    ("adapter", {"adapter_kind": "pfeiffer"}, dict(grad_ckpt=True)),
    ("prompt", {}, dict(precision="fp32")),
    ("ptuning", {}, dict(grad_ckpt=True)),
    ("lora", {"dropout": 0.1, "rank": 4}, dict(grad_accum=2)),
    ("qlora", {"quant": "fp4", "double_quant": False}, {}),
    ("qlora", {"quant": "int8"}, {}),
    ("qlora", {"kbit_prep": False}, dict(attention="eager")),
])
def test_more_options_fake_equals_real(method, options, variant):
    assert_fake_equals_real(tiny("llama"), method, options, **variant)


@pytest.mark.parametrize("family", ["gpt2", "t5", "bert"])
@pytest.mark.parametrize("variant", [dict(grad_ckpt=True), dict(attention="eager", precision="fp32")])
def test_other_families_variants(family, variant):
    assert_fake_equals_real(tiny(family), "lora", **variant)


@pytest.mark.parametrize("optimizer,impl", [
    ("adamw", "foreach"), ("adamw", "for-loop"), ("sgd", "fused"), ("sgd-momentum", "foreach"),
    ("sgd-momentum", "fused"),  # fake: _fused_sgd_ skipped (trace.py _FAKE_NOOP_INPLACE); real: the CPU kernel
    ("adafactor", "fused"),
])
def test_optimizers_fake_equals_real(optimizer, impl):
    res = assert_fake_equals_real(tiny("llama"), "full", optimizer=optimizer, optimizer_impl=impl)
    if optimizer == "sgd":
        assert res.components["optimizer_state"] == 0


def test_optimizer_state_sizes():
    """AdamW keeps two states of each trainable parameter; foreach adds step temporaries."""
    arch = tiny("llama")
    fused = trace(arch, "full", {}, Training(**STEP, optimizer_impl="fused"))
    foreach = trace(arch, "full", {}, Training(**STEP, optimizer_impl="foreach"))
    params_bytes = fused.components["trainable_params"]
    assert params_bytes > 0
    assert foreach.peak_allocated_bytes > fused.peak_allocated_bytes
    assert foreach.peak_phase["phase"] == "optimizer"
    # two fp32 states per fp32 parameter, each storage rounded to 512 B (fused adds 512 B step tensors)
    assert 2 * params_bytes <= foreach.components["optimizer_state"] + 2 * 512 * 64


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw", "paged-adamw-8bit", "lion"])
def test_cuda_only_optimizers_are_not_traceable_on_cpu(optimizer):
    with pytest.raises(NotTraceable, match="CUDA|cuda"):
        trace(tiny("llama"), "lora", {}, Training(**STEP, optimizer=optimizer))


def test_method_errors():
    with pytest.raises(MethodError):
        trace(tiny("llama"), "bitfit", {}, Training(**STEP))
    with pytest.raises(MethodError):
        trace(tiny("llama"), "prefix", {}, Training(**STEP, grad_ckpt=True))
    with pytest.raises(MethodError, match="masked-LM"):  # the engine and the tracer refuse alike
        trace(tiny("bert"), "prompt", {}, Training(**STEP))


def test_checkpointing_reduces_activations_and_records_reentrancy():
    arch = tiny("llama")
    plain = trace(arch, "full", {}, Training(**STEP))
    ckpt = trace(arch, "full", {}, Training(**STEP, grad_ckpt=True))
    assert ckpt.info["grad_ckpt"] and ckpt.info["reentrant"] is False  # transformers default
    assert plain.phase_peaks["forward"] > ckpt.phase_peaks["forward"]
    assert ckpt.flops_recompute > 0 and plain.flops_recompute == 0
    qlora = trace(arch, "qlora", {}, Training(**STEP))
    # prepare_model_for_kbit_training passes no use_reentrant: torch falls back to the reentrant variant
    assert qlora.info["grad_ckpt"] and qlora.info["reentrant"] is True and qlora.info["input_requires_grad"]


def test_inline_flops_equal_flop_counter_mode():
    arch = tiny("llama")
    for method, variant in [("full", {}), ("lora", dict(grad_ckpt=True)), ("qlora", {}), ("full", dict(attention="eager"))]:
        tr = Training(**STEP, **variant)
        res = trace(arch, method, {}, tr)
        assert (res.flops_forward, res.flops_backward) == count_flops(arch, method, {}, tr)


def test_full_ft_flops_close_to_6nt():
    cfg = dict(TINY["llama"], hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    arch = from_hf_config(cfg, "small")
    tr = Training(micro_batch=1, seq_len=64)
    res = trace(arch, "full", {}, tr)
    n = res.params_total - arch.vocab_size * arch.hidden_size  # embedding lookup is not a matmul
    six_nt = 6 * n * tr.tokens
    assert 0.95 < (res.flops_forward + res.flops_backward) / six_nt < 1.15


def test_result_dict_and_events():
    arch = tiny("llama")
    res = trace(arch, "lora", {"rank": 8, "targets": "q_proj,v_proj"}, Training(**STEP), record_events=True)
    d = res.to_dict()
    json.dumps(d)
    assert d["schema_version"] == 1 and d["kind"] == "cpu-trace"
    assert d["params"]["total"] == res.params_total and d["params"]["trainable"] == 2 * 8 * (128 + 128 + 128 + 64)
    assert d["memory"]["peak_allocated_bytes"] == res.peak_allocated_bytes
    assert set(d["memory"]["components"]) >= {"frozen_params", "trainable_params", "grads", "optimizer_state",
                                             "saved_activations", "temporaries", "inputs", "loss_logits"}
    assert d["memory"]["peak_phase"]["phase"] in ("forward", "backward", "optimizer")
    assert d["compute"]["flops_forward"] > 0 and d["compute"]["flops_backward"] > 0
    assert d["trace"]["seconds"] > 0
    assert d["method"] == "lora" and d["options"]["rank"] == 8 and d["training"]["seq_len"] == STEP["seq_len"]
    for mod in ("torch", "transformers", "peft", "bitsandbytes"):
        assert d["env"][mod]
    assert d["events"] and d["events"][-1]["total"] == res.to_dict()["events"][-1]["total"]
    lines, total = saved_tensor_table(res, "model.layers.1")
    text = "\n".join(lines)
    assert "_scaled_dot_product_flash_attention_for_cpu" in text and "lora_A" in text
    assert total > 0


def test_emulation_off_still_exact():
    assert_fake_equals_real(tiny("gpt2"), "lora")  # autocast policy, SDPA dropout emulated
    arch = tiny("gpt2")
    tr = Training(**STEP)
    off_fake = trace(arch, "lora", {}, tr, emulate_cuda=False)
    off_real = trace(arch, "lora", {}, tr, emulate_cuda=False, real=True)
    assert off_fake.peak_allocated_bytes == off_real.peak_allocated_bytes


def test_dropout_saves_cuda_bool_masks():
    """Emulating CUDA, F.dropout runs the fused native_dropout kernel: a bool mask (1 B/element) is saved,
    not the CPU path's mask in the input's dtype; native_dropout_backward allocates one grad-sized output."""
    arch = tiny("gpt2")  # GPT2Config defaults: attn / resid / embd dropout 0.1
    tr = Training(**STEP, attention="eager")
    opts = {"dropout": 0.1}
    assert_fake_equals_real(arch, "lora", opts, attention="eager")
    res = trace(arch, "lora", opts, tr, record_events=True)
    masks = [s for s in res.saved if s["op"] == "aten.native_dropout" and s["dtype"] == "bool"]
    # per layer: attention probs, resid_dropout, mlp.dropout; LoRA's dropout on layer 1's c_attn (layer 0's
    # input needs no grad: nothing saved)
    b, s, h, d = STEP["micro_batch"], STEP["seq_len"], 4, 128
    want = sorted([b * h * s * s] * 2 + [b * s * d] * 5)
    assert sorted(math.prod(m["shape"]) for m in masks) == want
    assert all(m["storage_bytes"] == -(-math.prod(m["shape"]) // 512) * 512 for m in masks)
    assert sum(m["storage_bytes"] for m in masks) == sum(want)  # 1 byte per element (all multiples of 512)
    assert not [x for x in res.saved if x["op"] in ("aten.empty_like", "aten.bernoulli_.float")]
    bwd = [e for e in res.events if e["op"] == "aten.native_dropout_backward" and e["event"] == "alloc"]
    assert len(bwd) == 2 * len(masks)  # one output per dropout per step (two steps, one micro-batch each)
    assert all(e["dtype"] != "bool" for e in bwd)
    # without emulation: CPU's _dropout_impl saves masks in the input's dtype (bf16 / fp32), more bytes
    off = trace(arch, "lora", opts, tr, record_events=True, emulate_cuda=False)
    off_masks = [x for x in off.saved if x["op"] == "aten.empty_like"]
    assert len(off_masks) == len(masks) and all(x["dtype"] in ("bfloat16", "float32") for x in off_masks)
    assert sum(x["storage_bytes"] for x in off_masks) >= 2 * sum(want)


def test_build_rejects_nothing_on_meta_and_counts_like_peft():
    import peft

    arch = tiny("llama")
    built = build_model(arch, "lora", {"rank": 8, "targets": "q_proj,v_proj"}, Training(**STEP), device="meta")
    assert isinstance(built.model, peft.PeftModel)
    assert built.params() == tuple(reversed(built.model.get_nb_trainable_parameters()))


LLAMA3_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
}


def test_llama3_8b_lora_traces_under_a_minute():
    try:
        from peftplan.catalog import load_model
        arch = load_model("llama3-8b")
    except Exception:
        arch = from_hf_config(LLAMA3_8B, "llama3-8b")
    t0 = time.perf_counter()
    res = trace(arch, "lora", {"rank": 8, "targets": "q_proj,v_proj"}, Training(micro_batch=1, seq_len=2048))
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, elapsed
    assert res.params_total == 8_030_261_248 + 3_407_872 and res.params_trainable == 3_407_872
    gib = res.peak_allocated_bytes / 2**30
    assert 20 < gib < 40, gib  # ~15 GiB of bf16 weights + activations and fp32 logits at the peak
    assert res.peak_phase["phase"] == "backward"
    assert 6.5e13 < res.flops_forward + res.flops_backward < 7.5e13
