"""DeepSpeed ZeRO-1/2/3 (engine/deepspeed.py) against the real DeepSpeed engine, and the llama3-70b example of
issue 11 (ZeRO-3 was 236 GiB per GPU against fsdp-full's 142 GiB: the ZeRO path kept HF autocast's bf16 copy
of every full weight, 131 GiB of "temporaries", although its parameters were partitioned).

The real run (harness/deepspeed_trace.py): deepspeed 0.19 on 2 CPU ranks over gloo, HF + peft model with
real tensors, the HF Trainer's DeepSpeed config (bf16, torch AdamW), two optimizer steps; rank 0's live
storages are counted. DeepSpeed allocates its reduce bucket at its default size (5e8 elements, 1e9 bytes in
bf16) whatever the model, so the totals are compared both with and without it, and the categories the
engine models structurally (parameters, fp32 master + optimizer states, gradient partitions, buckets)
must agree to the rounding of one allocation per tensor.

Measured (small llama, hidden 512, 2 layers, batch 2 x 128, N=2), engine vs trace: zero1/2 full +0.45/+0.57%,
LoRA +0.38%; zero3 full -0.87%, LoRA -1.0% (total, bucket included). Without the bucket the stage-3 gap is
-11.6%: on the CPU DeepSpeed's coalesced all-gather in step 2 holds a flat buffer of the whole (small)
model beside the gathered parameters (an extra 11.5 MB here) which the engine does not model; whether
CUDA's path (all_gather_into_tensor into the flat buffer, parameters as views) holds it too is not
validated here.
"""

from __future__ import annotations

import pytest

from peftplan.arch import from_hf_config
from peftplan.catalog import load_gpu, load_model
from peftplan.engine.step import simulate_step
from peftplan.estimate import build_tuned, estimate
from peftplan.training import Training

GiB = 2**30
SMALL = dict(model_type="llama", vocab_size=1000, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=1024, num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False)
BUCKET = 500_000_000 * 2  # reduce_bucket_size elements in bf16 (data/interconnect.json)


def test_zero3_70b_is_within_10pct_of_fsdp_full():
    """Issue 11's example: before the fix ZeRO-3 gave 236.2 GiB against fsdp-full's 142.4 GiB."""
    arch, gpu = load_model("llama3-70b"), load_gpu("h100")
    kw = dict(micro_batch=1, seq_len=2048, grad_ckpt=True, n_gpus=8)
    z3 = estimate(arch, "full", Training(shard="zero3", **kw), gpu).memory.peak_allocated_bytes
    fsdp = estimate(arch, "full", Training(shard="fsdp-full", **kw), gpu).memory.peak_allocated_bytes
    assert abs(z3 / fsdp - 1) < 0.10, (z3 / GiB, fsdp / GiB)
    # model states: 2 (bf16 partition) + 2 (bf16 gradient partition) + 12 (fp32 master + Adam) B per param / N
    m = simulate_step(build_tuned(arch, "full", {}, Training(shard="zero3", **kw))[0], Training(shard="zero3", **kw))
    states = sum(m.peak.components.get(c, 0) for c in ("trainable_params", "grads", "optimizer_state"))
    assert abs(states / (16 * 70_553_706_496 / 8) - 1) < 0.01


def test_zero_stages_order_and_no_autocast_copies():
    arch = load_model("llama3-8b")
    kw = dict(micro_batch=1, seq_len=1024, n_gpus=8)
    mem = {s: simulate_step(build_tuned(arch, "full", {}, Training(shard=s, **kw))[0], Training(shard=s, **kw))
           for s in ("zero1", "zero2", "zero3", "fsdp-full")}
    assert mem["zero3"].peak.bytes < mem["zero2"].peak.bytes <= mem["zero1"].peak.bytes
    # the module itself is bf16 under DeepSpeed: no autocast copy of the weights in forward (before the fix
    # zero3's forward held a bf16 copy of all 8B weights, 15 GiB, on top of the partitions: 1.7x fsdp-full's).
    # ZeRO-3 holds more than FSDP2 here by its design: the persistent bf16 gradient partition (2 B/param/N)
    # and the 1e9-byte reduce bucket (26.2 vs 22.2 GB)
    assert mem["zero3"].phase_peaks["forward"] < 1.25 * mem["fsdp-full"].phase_peaks["forward"]


torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def traced():
    from peftplan.harness.deepspeed_trace import trace_deepspeed

    arch = from_hf_config(SMALL, "small-llama")
    kw = dict(micro_batch=2, seq_len=128, n_gpus=2)
    # one launch (two processes) for both: ~30-60 s on two CPU cores; ZeRO-1, ZeRO-2 full and ZeRO-3 LoRA are
    # in benchmarks/deepspeed_vs_engine.py
    configs = [("lora", {}, Training(shard="zero2", **kw)), ("full", {}, Training(shard="zero3", **kw))]
    return arch, configs, trace_deepspeed(arch, configs)


@pytest.mark.parametrize("i", [0, 1])
def test_engine_matches_real_deepspeed(traced, i):
    arch, configs, results = traced
    method, _, tr = configs[i]
    r = results[i]
    assert not isinstance(r, str), r
    e = simulate_step(build_tuned(arch, method, {}, tr)[0], tr).peak
    t = r.peak_allocated_bytes
    assert abs(e.bytes - t) / t < 0.02, (e.bytes, t)
    assert abs((e.bytes - BUCKET) - (t - BUCKET)) / (t - BUCKET) < 0.15, (e.bytes - BUCKET, t - BUCKET)
    tc, ec = r.components, e.components
    if tr.shard == "zero3":  # the persistent reduce bucket (the engine adds the in-flight prefetch buffer)
        assert tc.get("comm_buffers", 0) == BUCKET <= ec.get("comm_buffers", 0) < BUCKET * 1.02
    params = lambda c: c.get("frozen_params", 0) + c.get("trainable_params", 0)  # noqa: E731
    assert abs(params(ec) - params(tc)) <= 512 * 64, (params(ec), params(tc))  # one 512-B block per tensor
    # DeepSpeed's states are flat (one tensor per group and state); the engine rounds each tensor's state to
    # 512 B: at most 2 x 512 B per trainable tensor apart (here <= 10 KB; on llama3-70b full < 1 MB)
    assert abs(ec.get("optimizer_state", 0) - tc.get("optimizer_state", 0)) <= 64 * 1024
    if tr.shard == "zero3":
        assert abs(ec.get("grads", 0) - tc.get("grads", 0)) <= 1024
    # what DeepSpeed holds after the step: master partition + Adam states in fp32, 12 B per trainable / N
    trainable_local = sum(v for k, v in r.persistent.items() if k.startswith("fp32") or k.startswith("single"))
    assert r.persistent.get("optimizer.state.exp_avg") == trainable_local
