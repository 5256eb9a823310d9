"""The roofline step time (engine/roofline.py): hand-computed kernels, and the orderings practice knows."""

from __future__ import annotations

import math

import pytest

from peftplan.arch import from_hf_config
from peftplan.catalog import load_gpu, load_model
from peftplan.engine import roofline
from peftplan.engine.flops import micro_batch_flops
from peftplan.estimate import build_tuned, estimate
from peftplan.training import Training

TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 256, "num_hidden_layers": 2}


def _rates(name: str) -> roofline.Rates:
    return roofline.rates_for(load_gpu(name))


def test_square_gemm_on_a100_is_compute_bound_at_its_mamf_and_wave_quantization() -> None:
    r = _rates("a100-80g")
    # 4096^3 bf16: 32 x 32 = 1024 output tiles of 128 x 128 on 108 SMs -> 10 waves, the last one
    # 52/108 full: wave efficiency 1024 / 1080; MAMF fraction 0.859 (ml-engineering table)
    flops = 2 * 4096 ** 3
    expected_compute = flops / (312e12 * 0.859 * (1024 / 1080))
    expected_memory = 3 * 4096 * 4096 * 2 / (2039e9 * 0.9)
    assert expected_compute > expected_memory
    assert roofline.matmul_seconds(4096, 4096, 4096, "bf16", 1, r) == pytest.approx(expected_compute, rel=1e-12)


def test_lora_rank_8_factor_is_bandwidth_bound() -> None:
    r = _rates("a100-80g")
    # lora_A forward: (4096 tokens x 4096) @ (4096 x 8): reads x and A, writes 4096 x 8, bf16
    nbytes = (4096 * 4096 + 4096 * 8 + 4096 * 8) * 2
    assert roofline.matmul_seconds(4096, 8, 4096, "bf16", 1, r) == pytest.approx(nbytes / (2039e9 * 0.9), rel=1e-12)


def test_small_gemm_loses_to_tile_quantization() -> None:
    r = _rates("h100")
    # m = 200 rows fill 200/256 of two tile rows: the efficiency falls by that share
    big = roofline.matmul_efficiency(1280, 4096, 1, r)
    small = roofline.matmul_efficiency(200, 4096, 1, r)
    assert small < big
    tiles = 2 * 32  # 2 x 32 tiles on 132 SMs: one partial wave
    assert small == pytest.approx(0.801 * (200 / 256) * (tiles / 132))
    # a narrow dimension takes a narrower tile: m = 100 runs in 128-row tiles, n = 40 in 64-wide ones
    assert roofline.matmul_efficiency(100, 40, 1, r) == pytest.approx(0.801 * (100 * 40 / (128 * 64)) / 132)


def test_optimizer_traffic_fused_vs_foreach() -> None:
    # torch AdamW: fused reads p, g, m, v and writes p, m, v (7 passes); foreach's separate kernels 20
    assert roofline.optimizer_bytes("adamw", "fused", 4_000, 1_000) == 7 * 4_000
    assert roofline.optimizer_bytes("adamw", "foreach", 4_000, 1_000) == 20 * 4_000
    # bitsandbytes 8-bit: p r/w + g r (3 passes) and two uint8 states read and written (4 B per element)
    assert roofline.optimizer_bytes("adamw-8bit", "fused", 4_000, 1_000) == 3 * 4_000 + 4 * 1_000
    arch, gpu = load_model("llama3.2-1b"), load_gpu("a100-80g")
    t = Training(micro_batch=1, seq_len=256)
    fused = estimate(arch, "full", t, gpu).compute.time_breakdown["optimizer update"]
    foreach = estimate(arch, "full", t.with_(optimizer_impl="foreach"), gpu).compute.time_breakdown["optimizer update"]
    assert foreach == pytest.approx(fused * 20 / 7)


def test_qlora_is_slower_than_lora_by_its_dequantization() -> None:
    arch = from_hf_config(TINY, "tiny")
    gpu = load_gpu("a100-80g")
    t = Training(micro_batch=2, seq_len=512, grad_ckpt=True)  # kbit prep checkpoints QLoRA anyway
    lora = estimate(arch, "lora", t, gpu, {"targets": "all-linear"})
    qlora = estimate(arch, "qlora", t, gpu, {"targets": "all-linear"})
    assert qlora.compute.step_time_s > lora.compute.step_time_s
    # every block linear is NF4 with double quantization: the dequant kernel reads numel/2 packed bytes
    # and numel/64 uint8 absmax, writes numel bf16; forward, the reentrant checkpoint's recompute and
    # MatMul4Bit.backward each dequantize once
    per_block = [128 * 128, 128 * 64, 128 * 64, 128 * 128, 128 * 256, 128 * 256, 256 * 128]  # q k v o gate up down
    per_pass = sum(n // 2 + math.ceil(n / 64) + 2 * n for n in per_block) * 2  # 2 layers
    bw = 2039e9 * 0.9
    bd = qlora.compute.time_breakdown
    for phase in ("forward", "recompute", "backward"):
        assert bd[f"{phase} 4-bit dequantize"] == pytest.approx(per_pass / bw, rel=1e-12)
    assert not any("dequantize" in k for k in lora.compute.time_breakdown)


def test_eager_attention_pays_for_the_scores_at_long_sequences() -> None:
    arch = from_hf_config(TINY, "tiny")
    B, T, H, K, hd = 1, 4096, 4, 2, 32
    tables = {}
    for attn in ("sdpa", "eager"):
        training = Training(micro_batch=B, seq_len=T, attention=attn, precision="bf16-mixed")
        model, _ = build_tuned(arch, "lora", {}, training)
        tables[attn] = roofline.kernel_table(micro_batch_flops(model, training).kernels)
    # per layer, eager adds memory-bound kernels over the B x H x T x T scores: mask add (bf16 in, out),
    # fp32 softmax (bf16 in, fp32 out), cast back (fp32 in, bf16 out) = 16 bytes per score, and repeat_kv
    # copies of k and v (read B T K hd, write B T H hd, bf16)
    per_layer = 16 * B * H * T * T + 2 * 2 * (B * T * K * hd + B * T * H * hd)
    extra = tables["eager"].streams[("forward", "mem")] - tables["sdpa"].streams[("forward", "mem")]
    assert extra == 2 * per_layer
    gpu = load_gpu("a100-80g")
    times = {a: estimate(arch, "lora", Training(micro_batch=B, seq_len=T, attention=a), gpu).compute.step_time_s
             for a in ("sdpa", "eager")}
    assert times["eager"] > 1.5 * times["sdpa"]
    short = {a: estimate(arch, "lora", Training(micro_batch=B, seq_len=128, attention=a), gpu).compute.step_time_s
             for a in ("sdpa", "eager")}
    assert short["eager"] / short["sdpa"] < times["eager"] / times["sdpa"]  # the gap grows with T


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_costs_about_a_third_more(method: str) -> None:
    arch, gpu = load_model("llama3-8b"), load_gpu("h100")
    t = Training(micro_batch=4, seq_len=2048)
    off = estimate(arch, method, t, gpu).compute
    on = estimate(arch, method, t.with_(grad_ckpt=True), gpu).compute
    ratio = on.step_time_s / off.step_time_s
    assert 1.2 <= ratio <= 1.45, ratio
    recompute = sum(v for k, v in on.time_breakdown.items() if k.startswith("recompute"))
    assert recompute > 0 and not any(k.startswith("recompute") for k in off.time_breakdown)
    # the added time is the recompute (the forward of every layer up to its last saved tensor)
    assert on.step_time_s - off.step_time_s == pytest.approx(recompute, rel=0.1)


def test_tiny_micro_batches_are_less_efficient() -> None:
    arch, gpu = load_model("llama3.2-1b"), load_gpu("a100-80g")
    tps = [estimate(arch, "lora", Training(micro_batch=b, seq_len=128), gpu).compute.tokens_per_s for b in (1, 2, 8, 32)]
    assert tps == sorted(tps) and tps[-1] > 2 * tps[0]


def test_a_tiny_step_is_bound_by_kernel_launches() -> None:
    arch = from_hf_config(TINY, "tiny")
    gpu = load_gpu("h100")
    training = Training(micro_batch=1, seq_len=16)
    est = estimate(arch, "lora", training, gpu)
    model, _ = build_tuned(arch, "lora", {}, training)
    launches = len(micro_batch_flops(model, training).kernels)
    assert est.compute.time_bound == "host launches"
    assert est.compute.step_time_s == pytest.approx(launches * 4e-6, rel=1e-12)  # data/roofline.json


def test_paged_optimizer_pays_the_host_link_only_when_it_does_not_fit() -> None:
    arch = load_model("llama3.2-1b")
    t = Training(micro_batch=1, seq_len=256, optimizer="paged-adamw")
    roomy = estimate(arch, "full", t, load_gpu("a100-80g"))
    assert "paged optimizer over PCIe" not in roomy.compute.time_breakdown
    from peftplan.catalog import custom_gpu

    tight_gpu = custom_gpu(roomy.memory.device_total_bytes + 2**30, load_gpu("a100-80g"))  # state does not fit beside
    tight = estimate(arch, "full", t, tight_gpu)
    # the paging decision uses allocated + CUDA context (+ NCCL), the same lower bound the planner's fast path has
    m = tight.memory
    resident = m.peak_allocated_bytes + m.cuda_context_bytes + m.nccl_buffers_bytes
    over = min(m.paged_optimizer_bytes, resident + m.paged_optimizer_bytes - tight_gpu.memory_bytes)
    assert tight.compute.time_breakdown["paged optimizer over PCIe"] == pytest.approx(2 * over / 31.5e9)
    assert tight.compute.step_time_s > roomy.compute.step_time_s
