"""`plan` under a trainer (TRL, Unsloth, LLaMA-Factory): one symbolic step per point
(planner/replay_point.py), every number equal to estimate()'s under that trainer."""

from __future__ import annotations

import random

import pytest

from peftplan.catalog import load_gpu, load_model
from peftplan.methods import MethodError
from peftplan.planner import DEFAULT_METHODS, OPTIMIZERS, Evaluator, PlanConfig, plan, row_from_estimate, variants_for
from peftplan.trainers import TrainerError


@pytest.mark.parametrize("model,trainer,switches,seed", [
    ("llama3.2-1b", "trl", (), 1), ("qwen2.5-0.5b", "unsloth", (), 2), ("llama3.2-1b", "llamafactory", (), 3),
    ("gpt2", "trl", (), 4), ("llama3.2-1b", "hf", ("liger",), 5), ("qwen2.5-0.5b", "trl", ("activation_offloading",), 6)])
def test_point_rows_equal_estimate_under_the_trainer(model: str, trainer: str, switches: tuple[str, ...],
                                                     seed: int) -> None:
    rng = random.Random(seed)
    arch = load_model(model)
    gpus = [load_gpu("a100-80g"), load_gpu("t4")]
    ev = Evaluator(arch, ranks=(8, 16))
    ev.trainer, ev.trainer_options = trainer, switches
    variants = [v for m in DEFAULT_METHODS for v in variants_for(m, (8, 16))]
    compared = 0
    for _ in range(14):
        gpu = rng.choice(gpus)
        cfg = PlanConfig(rng.choice(variants), rng.choice([1, 2, 3]), rng.choice([64, 333, 1024, 4500]),
                         rng.choice([False, True]), "sdpa", rng.choice(OPTIMIZERS),
                         "bf16-mixed" if gpu.bf16_supported else "fp16-mixed")
        try:
            fast = ev.evaluate(cfg, gpu)
        except MethodError:
            continue
        direct = row_from_estimate(cfg, ev.estimate(cfg, gpu))
        assert fast.path == "fast", cfg.label
        assert (fast.peak_allocated_bytes, fast.flops_per_step, fast.step_time_s, fast.trainable_params) == \
            (direct.peak_allocated_bytes, direct.flops_per_step, direct.step_time_s, direct.trainable_params), cfg.label
        assert fast.config.grad_ckpt == direct.config.grad_ckpt
        assert ev.fits(cfg, gpu) == fast.fits and (fast.fits or not direct.fits)
        compared += 1
    assert compared >= 8
    assert ev.stats.direct == 0


def test_plan_under_trl_differs_from_the_bare_step_and_says_so() -> None:
    """TRL's fused LM head never builds the fp32 logits: at 4096 tokens the same configuration needs less."""
    arch, gpu = load_model("llama3.2-1b"), load_gpu("t4")
    kw = dict(seq_len=4096, methods=["lora"], ranks=(16,), micro_batches=(1,), grad_ckpt=(True,), targets=(None,),
              optimizers=("adamw",))
    bare = plan(arch, gpu, **kw)  # type: ignore[arg-type]
    trl = plan(arch, gpu, trainer="trl", **kw)  # type: ignore[arg-type]
    assert trl.trainer == "trl" and bare.trainer == "hf"
    row = lambda r: (r.rows or r.closest)[0]  # noqa: E731
    assert row(trl).peak_allocated_bytes < row(bare).peak_allocated_bytes
    assert any("trainer 'trl'" in n for n in trl.notes)
    with pytest.raises(TrainerError):
        plan(arch, gpu, trainer="deepspeed-chat")
