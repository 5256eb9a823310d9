"""The planner: what fits on a GPU, ranked; and its fast path is exactly estimate()."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from peftplan.catalog import custom_gpu, gpu_catalog, load_gpu, load_model
from peftplan.methods import MethodError
from peftplan.planner import (DEFAULT_METHODS, EXACT_ROWS, OPTIMIZERS, Evaluator, PlanConfig, plan, plan_table,
                              row_from_estimate, variants_for)
from peftplan.units import BYTES_PER_GIB


def _same(fast, direct) -> None:  # type: ignore[no-untyped-def]
    assert fast.path == "fast", fast.config.label
    what = fast.config.label
    assert fast.peak_allocated_bytes == direct.peak_allocated_bytes, what
    # the fast path's device total is a lower bound (allocated + CUDA context): reserved >= allocated, and
    # reserved needs the configuration's own caching-allocator replay, which only estimate() runs
    assert fast.device_total_bytes <= direct.device_total_bytes, what
    assert fast.headroom_bytes == fast.gpu_memory_bytes - fast.device_total_bytes, what
    assert fast.fits or not direct.fits, what
    assert fast.flops_per_step == direct.flops_per_step, what
    assert fast.tokens_per_s == direct.tokens_per_s, what  # the same float arithmetic, bit for bit
    assert fast.step_time_s == direct.step_time_s, what
    assert (fast.trainable_params, fast.total_params) == (direct.trainable_params, direct.total_params), what
    assert fast.config.grad_ckpt == direct.config.grad_ckpt, what


@pytest.mark.parametrize("model,seed", [("llama3.2-1b", 1), ("gpt2", 2), ("bert-large", 3), ("gemma2-2b", 4),
                                        ("opt-350m", 5), ("qwen2.5-0.5b", 6), ("bloomz-560m", 7)])
def test_fast_path_equals_estimate(model: str, seed: int) -> None:
    """Random configurations, including sequence lengths and batches where the allocator's 512-byte
    rounding acts (odd lengths, prompt tuning's virtual tokens): peak bytes equal, not just close."""
    rng = random.Random(seed)
    arch = load_model(model)
    gpus = [load_gpu("a100-80g"), load_gpu("t4"), load_gpu("rtx4090")]
    ev = Evaluator(arch)
    variants = [v for m in DEFAULT_METHODS for v in variants_for(m)]
    compared = 0
    for _ in range(40):
        gpu = rng.choice(gpus)
        cfg = PlanConfig(rng.choice(variants), rng.choice([1, 2, 3, 4, 8, 16]),
                         rng.choice([64, 77, 256, 333, 512, 1000, 1024, 2048]), rng.choice([False, True]),
                         rng.choice(["sdpa", "eager"]), rng.choice(OPTIMIZERS),
                         "bf16-mixed" if gpu.bf16_supported else "fp16-mixed")
        try:
            fast = ev.evaluate(cfg, gpu)
        except MethodError:
            continue  # e.g. BitFit without biases, prefix tuning with checkpointing
        _same(fast, row_from_estimate(cfg, ev.estimate(cfg, gpu)))
        assert ev.fits(cfg, gpu) == fast.fits
        compared += 1
    assert compared >= 25
    assert ev.stats.direct == 0  # everything above went through the fast path


def test_fast_path_large_batch_and_long_sequences() -> None:
    arch = load_model("llama3-8b")
    gpu = load_gpu("h100")
    ev = Evaluator(arch)
    for v, mb, seq, ck, at, opt in [
        (variants_for("qlora")[1], 37, 4096, True, "sdpa", "paged-adamw-8bit"),
        (variants_for("lora")[2], 5, 8192, False, "eager", "adamw-8bit"),
        (variants_for("full")[0], 1, 8192, True, "sdpa", "adamw"),
        (variants_for("prompt")[0], 3, 1000, True, "sdpa", "adamw"),
    ]:
        cfg = PlanConfig(v, mb, seq, ck, at, opt, "bf16-mixed")
        _same(ev.evaluate(cfg, gpu), row_from_estimate(cfg, ev.estimate(cfg, gpu)))


def test_plan_fast_equals_plan_direct() -> None:
    """The whole plan (grid, ranking, per-method limits) is the same with estimate() for every config."""
    arch = load_model("gpt2")
    gpu = load_gpu("t4")
    kw = dict(methods=["lora", "full"], ranks=(8, 16), micro_batches=(1, 4), attentions=("sdpa",),
              seq_sweep=(256, 512, 1024))
    fast = plan(arch, gpu, **kw)
    direct = plan(arch, gpu, fast=False, **kw)
    assert fast.stats.direct == 0 and direct.stats.fast == 0
    key = lambda r: (r.config, r.peak_allocated_bytes, r.device_total_bytes, r.fits, r.tokens_per_s)  # noqa: E731
    # the first EXACT_ROWS rows are re-estimated (allocator replay); below them fast rows keep a lower bound.
    # The fast path also searches micro-batches beyond the grid (the largest that fits, stepped down to what
    # fits exactly); direct stays on the grid: the re-estimated grid rows are direct's first grid rows, in order
    grid = kw["micro_batches"]
    exact = [key(r) for r in fast.rows if r.path == "direct" and r.config.micro_batch in grid]
    direct_grid = [key(r) for r in direct.rows if r.config.micro_batch in grid]
    assert len(exact) >= EXACT_ROWS // 2 and exact[0] == direct_grid[0]
    assert set(exact) <= set(direct_grid)  # same configurations, same numbers
    # on the micro-batch grid every directly fitting configuration is a fast row; the extra "largest that fits"
    # micro-batch is searched on the fast path's lower bound, so it can be larger there than direct
    assert {r.config for r in direct.rows if r.config.micro_batch in grid} <= {r.config for r in fast.rows}
    assert {r.config for r in fast.closest if r.config.micro_batch in grid} <= {r.config for r in direct.closest}
    for a, b in zip(fast.limits, direct.limits):
        assert a.method == b.method and (a.max_seq_len or 0) >= (b.max_seq_len or 0)
        # the fast path searches micro-batches beyond the grid; direct stays on the grid
        if b.max_micro_batch is not None:
            assert a.max_micro_batch is not None and a.max_micro_batch >= b.max_micro_batch


def test_llama3_70b_on_rtx4090_only_qlora_comes_close() -> None:
    arch = load_model("llama3-70b")
    gpu = load_gpu("rtx4090")
    result = plan(arch, gpu, methods=["full", "lora", "qlora"], ranks=(8, 16), attentions=("sdpa",))
    assert not any(r.config.variant.method == "full" for r in result.rows)
    ordered = result.rows if result.rows else result.closest
    # checkpointed QLoRA comes closest (QLoRA without checkpointing, searched too, keeps 80 layers of
    # activations and can need more than checkpointed LoRA)
    n_qlora = sum(1 for r in ordered if r.config.variant.method == "qlora" and r.config.grad_ckpt)
    assert n_qlora > 0
    assert all(r.config.variant.method == "qlora" for r in ordered[:n_qlora])  # qlora variants first
    full = [r for r in result.closest if r.config.variant.method == "full"]
    assert full and all(r.device_total_bytes > 10 * gpu.memory_bytes for r in full)  # nowhere near
    if not result.rows:
        assert result.explanation.startswith("Nothing fits on rtx4090")
        assert result.suggestion and "fits on the" in result.suggestion
        bigger = result.suggestion.split("fits on the ")[1].split(" ")[0]
        assert gpu_catalog()[bigger].memory_bytes > gpu.memory_bytes
    # QLoRA without checkpointing is searched too (kbit prep's use_gradient_checkpointing=False), so no note
    # says that only checkpointed QLoRA exists
    assert not any("only checkpointed configurations exist" in n for n in result.notes)
    assert any(r.config.variant.method == "qlora" and not r.config.grad_ckpt for r in result.closest)


def test_llama32_1b_on_a100_full_fits_and_winner_is_verified() -> None:
    arch = load_model("llama3.2-1b")
    gpu = load_gpu("a100-80g")
    result = plan(arch, gpu, methods=["full", "lora", "qlora", "bitfit"], tokens=10**9, price_per_hour=2.0,
                  objective="speed")
    assert any(r.config.variant.method == "full" for r in result.rows)
    assert any(s[0] == "bitfit" and "no bias" in s[1] for s in result.skipped)
    best = result.best
    assert best is not None and result.best_estimate is not None
    assert result.best_estimate.memory.peak_allocated_bytes == best.peak_allocated_bytes
    assert result.best_estimate.compute.tokens_per_s == best.tokens_per_s
    # ranked by tokens/s
    tps = [r.tokens_per_s for r in result.rows]
    assert all(a >= b * (1 - 1e-9) for a, b in zip(tps, tps[1:]))
    # time and cost to train the tokens
    assert best.train_time_s == pytest.approx(10**9 / best.tokens_per_s)
    assert best.train_cost_usd == pytest.approx(best.train_time_s / 3600 * 2.0)
    # the explanation gives the numbers
    assert "tokens/s" in result.explanation and "headroom" in result.explanation
    assert "trains" in result.explanation and "ranks first by speed" in result.explanation
    # per-method limits: the largest micro-batch really is the largest
    full = next(lim for lim in result.limits if lim.method == "full")
    assert full.max_micro_batch is not None and full.max_micro_batch_row is not None
    assert full.max_micro_batch_row.fits
    ev = Evaluator(arch)
    above = replace(full.max_micro_batch_row.config, micro_batch=full.max_micro_batch + 1)
    assert not ev.estimate(above, gpu).fits
    assert full.max_seq_len is not None and full.max_seq_row is not None and full.max_seq_row.fits
    # rendering
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(plan_table(result, limit=100))
    text = console.export_text()
    assert "lora r8" in text and "full" in text


def test_nothing_fits_says_what_would() -> None:
    arch = load_model("llama3-8b")
    tiny = custom_gpu(2 * BYTES_PER_GIB, load_gpu("a100-80g"))
    result = plan(arch, tiny, methods=["lora", "qlora"], ranks=(8,), micro_batches=(1, 2), attentions=("sdpa",),
                  optimizers=("paged-adamw-8bit",))
    assert result.rows == [] and result.best is None
    assert result.explanation.startswith("Nothing fits")
    assert result.suggestion is not None and "fits on the" in result.suggestion
    assert result.closest[0].config.variant.method == "qlora"
    assert all(lim.max_seq_len is None for lim in result.limits)


def test_multi_gpu_is_noted_and_errors_are_user_errors() -> None:
    arch = load_model("gpt2")
    result = plan(arch, load_gpu("t4"), n_gpus=4, methods=["lora"], ranks=(8,), micro_batches=(1,),
                  attentions=("sdpa",), seq_sweep=(256,))
    from peftplan.planner import sharding_modelled

    expected = "estimated directly" if sharding_modelled(arch, load_gpu("t4"), 4) else "not modelled"
    assert any(expected in n for n in result.notes)
    assert result.rows and all(r.config.n_gpus == 4 and r.config.shard != "none" for r in result.rows)
    with pytest.raises(MethodError):
        plan(arch, load_gpu("t4"), methods=["lorra"])
    with pytest.raises(ValueError):
        plan(arch, load_gpu("t4"), n_gpus=0)


def test_sharded_configs_fall_back_to_estimate_once_the_engine_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """n_gpus and shard reach estimate(); when estimate() models sharding (simulated here), the fast
    path, which records one GPU's step, is not used for those configurations."""
    import peftplan.planner.evaluator as planner
    import peftplan.planner.search as search
    from peftplan.training import Training

    seen: list[Training] = []
    real = planner.estimate

    def spy(arch, method, training, gpu, options=None, **kw):  # type: ignore[no-untyped-def]
        seen.append(training)
        return real(arch, method, training, gpu, options, **kw)

    monkeypatch.setattr(planner, "estimate", spy)
    monkeypatch.setattr(search, "sharding_modelled", lambda *a, **k: True)
    arch = load_model("gpt2")
    kw = dict(methods=["lora"], ranks=(8,), micro_batches=(1, 2), attentions=("sdpa",), optimizers=("adamw",),
              seq_sweep=(256, 512))
    result = plan(arch, load_gpu("t4"), n_gpus=2, seq_len=256, shards=("ddp", "zero3"), **kw)
    assert result.stats.fast == 0 and result.stats.direct > 0
    assert {(r.config.n_gpus, r.config.shard) for r in result.rows} == {(2, "ddp"), (2, "zero3")}
    assert seen and all(t.n_gpus == 2 and t.shard in ("ddp", "zero3") for t in seen)
    assert any("estimated directly" in n for n in result.notes)
    # one GPU: the fast path as before, nothing sharded reaches estimate()
    seen.clear()
    single = plan(arch, load_gpu("t4"), seq_len=256, **kw)
    assert single.stats.fast > 0 and all(t.n_gpus == 1 and t.shard == "none" for t in seen)


def test_sharding_probe_matches_the_engine() -> None:
    """While estimate() ignores n_gpus/shard the probe says so (and the plan keeps its note)."""
    from peftplan.estimate import estimate
    from peftplan.planner import sharding_modelled
    from peftplan.training import Training

    arch, gpu = load_model("gpt2"), load_gpu("a100-80g")
    t = Training(micro_batch=1, seq_len=64)
    same = (estimate(arch, "full", t, gpu).memory.peak_allocated_bytes
            == estimate(arch, "full", t.with_(n_gpus=8, shard="zero3"), gpu).memory.peak_allocated_bytes)
    assert sharding_modelled(arch, gpu, 8) is (not same)
    assert sharding_modelled(arch, gpu, 1) is False


def test_disk_cache_gives_the_same_plan(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from peftplan.planner import clear_cache

    monkeypatch.setenv("PEFTPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFTPLAN_CACHE", raising=False)
    arch, gpu = load_model("gpt2"), load_gpu("t4")
    kw = dict(methods=["lora", "full"], ranks=(8,), micro_batches=(1, 4), attentions=("sdpa",), seq_sweep=(256, 512))
    clear_cache()
    cold = plan(arch, gpu, **kw)
    clear_cache()  # a new process: only the disk cache is left
    warm = plan(arch, gpu, **kw)
    assert cold.stats.structures_recorded > 0 and warm.stats.structures_recorded == 0
    assert warm.stats.structures_loaded == cold.stats.structures_recorded
    assert [r.to_dict() for r in warm.rows] == [r.to_dict() for r in cold.rows]
    assert [r.to_dict() for r in warm.closest] == [r.to_dict() for r in cold.closest]
    clear_cache()


@pytest.mark.parametrize("model,seed", [("llama3.2-1b", 11), ("gpt2", 12), ("qwen2.5-0.5b", 13)])
def test_fast_path_equals_estimate_with_targets_and_accumulation(model: str, seed: int) -> None:
    """LoRA target sets and gradient accumulation (recorded as a separate structure) are exact too,
    step time included (the roofline over the replayed kernels)."""
    rng = random.Random(seed)
    arch = load_model(model)
    gpus = [load_gpu("a100-80g"), load_gpu("t4"), load_gpu("rtx4090")]
    ev = Evaluator(arch)
    variants = [v for m in ("lora", "qlora", "dora", "full") for v in variants_for(m, (8, 16), ("attn", "all-linear"))]
    compared = 0
    for _ in range(16):
        gpu = rng.choice(gpus)
        cfg = PlanConfig(rng.choice(variants), rng.choice([1, 2, 3, 8]), rng.choice([77, 256, 1000]),
                         rng.choice([False, True]), rng.choice(["sdpa", "eager"]), rng.choice(OPTIMIZERS),
                         "bf16-mixed" if gpu.bf16_supported else "fp16-mixed", grad_accum=rng.choice([1, 2, 5]))
        try:
            fast = ev.evaluate(cfg, gpu)
        except MethodError:
            continue
        _same(fast, row_from_estimate(cfg, ev.estimate(cfg, gpu)))
        compared += 1
    assert compared >= 10 and ev.stats.direct == 0


def test_done_when_llama3_8b_on_rtx4090_first_row_is_lora_family_all_linear() -> None:
    """Issue 16: with the default objective the first row is LoRA or QLoRA (family) on all linear layers."""
    arch, gpu = load_model("llama3-8b"), load_gpu("rtx4090")
    result = plan(arch, gpu, seq_len=2048, ranks=(8, 16), attentions=("sdpa",))
    best = result.best
    assert best is not None and result.objective == "quality"
    assert best.config.variant.method in ("lora", "qlora") and best.config.variant.targets == "all-linear"
    assert best.quality is not None and all(r.quality is None or r.quality <= best.quality + 1e-9 for r in result.rows)
    assert "ranks first by quality" in result.explanation and "faster" in result.explanation
    # by speed, a faster (lower-prior) configuration may win, and the order is by tokens/s
    fast = plan(arch, gpu, seq_len=2048, ranks=(8, 16), attentions=("sdpa",), objective="speed")
    tps = [r.tokens_per_s for r in fast.rows]
    assert tps == sorted(tps, reverse=True)
    assert fast.best is not None and fast.best.tokens_per_s >= best.tokens_per_s


def test_ties_and_objectives_on_a_small_model() -> None:
    arch, gpu = load_model("gpt2"), load_gpu("a100-80g")
    kw = dict(methods=["lora", "ia3", "full"], ranks=(8, 16), attentions=("sdpa",), micro_batches=(1, 4),
              seq_sweep=(256, 512))
    q = plan(arch, gpu, seq_len=256, tokens=10**7, price_per_hour=2.0, **kw)
    # quality: tiers of the prior first (ranking.py), then speed within a tier
    quals = [r.quality for r in q.rows]
    assert all(a is not None for a in quals)
    assert q.rows[0].quality == max(quals)  # type: ignore[type-var]
    # a row marked as a tie is within the step-time tolerance of the one above
    from peftplan.planner.ranking import speed_tolerance

    for a, b in zip(q.rows, q.rows[1:]):
        if b.tie:
            assert abs(a.tokens_per_s - b.tokens_per_s) <= speed_tolerance() * max(a.tokens_per_s, b.tokens_per_s)
    cost = plan(arch, gpu, seq_len=256, tokens=10**7, price_per_hour=2.0, objective="cost", **kw)
    costs = [r.train_cost_usd for r in cost.rows]
    assert costs == sorted(costs)  # type: ignore[type-var]
    with pytest.raises(ValueError):
        plan(arch, gpu, seq_len=256, objective="fastest", **kw)


def test_global_batch_is_filled_with_accumulation() -> None:
    arch, gpu = load_model("gpt2"), load_gpu("a100-80g")
    result = plan(arch, gpu, seq_len=256, methods=["lora"], ranks=(8,), attentions=("sdpa",), targets=(None,),
                  global_batch=12, seq_sweep=(256,))
    assert result.rows and {r.config.micro_batch * r.config.grad_accum for r in result.rows} == {12}
    assert {r.config.micro_batch for r in result.rows} <= {1, 2, 3, 4, 6, 12}
    best = result.best
    assert best is not None and result.best_estimate is not None
    assert result.best_estimate.training.grad_accum == best.config.grad_accum
    assert result.best_estimate.compute.tokens_per_s == best.tokens_per_s


def test_plan_html_has_the_front_and_the_fit_boundary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("plotly")
    from peftplan.planner.report import quality_speed_front, write_plan_html

    arch, gpu = load_model("gpt2"), load_gpu("t4")
    result = plan(arch, gpu, seq_len=512, methods=["lora", "ia3", "full"], ranks=(8,), attentions=("sdpa",),
                  seq_sweep=(512,))
    front = quality_speed_front(result.rows)
    assert front and all(a.tokens_per_s >= b.tokens_per_s and a.quality < b.quality for a, b in zip(front, front[1:]))
    path = write_plan_html(result, tmp_path / "plan.html")
    text = path.read_text(encoding="utf-8")
    assert "Quality vs speed" in text and "fit boundary" in text and "front of what fits" in text
    assert text.count("Plotly.newPlot") == 2
