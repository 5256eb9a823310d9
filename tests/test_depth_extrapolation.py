"""The depth-extrapolated step (engine/depth.py) against the full simulation, byte for byte.

Seeded random configurations over the catalog's models at their full depth, every method and its
options, both trainers, checkpointing, precisions, optimizers and their implementations, gradient
accumulation, attention, allocator settings and sharding: `estimate()` runs once with the default
(extrapolated where the blocks repeat) and once with `simulate_step(..., extrapolate=False)`, and
every field of the two Estimates must be equal (`to_dict()`: peak allocated and its breakdown by
category and phase, phase peaks, the caching-allocator replay, device total, FLOPs, step time and its
breakdown). Configurations that depth.py does not extrapolate (several GPUs, per-parameter
optimizers, blocks that do not repeat) are compared as well; the test also requires that most of
the configurations took the extrapolated path, so it cannot pass by falling back everywhere.
"""

from __future__ import annotations

import os
import random

import pytest

import peftplan.engine.depth as depth
import peftplan.estimate as estimate_mod
from peftplan.catalog import load_gpu, load_model, model_names
from peftplan.engine.ops import FlopCount
from peftplan.engine.step import StepMemory, _simulate, simulate_step
from peftplan.estimate import build_tuned, estimate
from peftplan.methods import get_method, method_names
from peftplan.trainers import get_trainer, registry as trainer_registry
from peftplan.training import OPTIMIZER_IMPLS, OPTIMIZERS, PRECISIONS, Training

N_CONFIGS = int(os.environ.get("PEFTPLAN_DEPTH_CONFIGS", "520"))
SEED = 20261215
GPU = load_gpu("h100")
# Catalog models under 2 B parameters (the comparison runs both simulations); larger ones below
MODELS = tuple(n for n in model_names() if load_model(n).total_params < 2e9)


def _config(rng: random.Random):
    model = rng.choice(MODELS)
    method = rng.choice(method_names())
    names = set(get_method(method).option_names())
    arch = load_model(model)
    options = {}
    if "rank" in names:
        options["rank"] = rng.choice((4, 8, 16))
        t = rng.choice((None, None, "all-linear", "attn"))
        if t:
            options["targets"] = t
    if "quant" in names:
        options["quant"] = rng.choice(("nf4", "fp4", "int8"))
        options["double_quant"] = rng.random() < 0.5
        options["kbit_prep"] = rng.random() < 0.5
    if "virtual_tokens" in names:
        options["virtual_tokens"] = rng.choice((4, 16))
    if "lisa_layers" in names:
        options["lisa_layers"] = rng.randint(1, arch.num_layers)
    shard = "none"
    n_gpus = 1
    if rng.random() < 0.05:
        n_gpus, shard = 2, rng.choice(("fsdp-full", "zero2", "zero3"))
    # every registered trainer and a random subset of its switches (Liger kernels, chunked CE, offloading)
    trainer = rng.choice(tuple(trainer_registry()))
    trainer_options = tuple(o for o in get_trainer(trainer).options if rng.random() < 0.3)
    training = Training(
        micro_batch=rng.choice((1, 1, 2, 3)), seq_len=rng.choice((16, 64, 100, 256, 512)),
        grad_accum=rng.choice((1, 1, 2, 3)), grad_ckpt=rng.random() < 0.5,
        attention=rng.choice(("eager", "sdpa", "sdpa")), precision=rng.choice(PRECISIONS),
        optimizer=rng.choice(OPTIMIZERS), optimizer_impl=rng.choice(OPTIMIZER_IMPLS),
        trainer=trainer, trainer_options=trainer_options, n_gpus=n_gpus, shard=shard,
        alloc_conf=rng.choice(("",) * 8 + ("expandable_segments:True", "max_split_size_mb:64")))
    return model, method, options, training


def _full(*args, **kwargs):
    kwargs["extrapolate"] = False
    return simulate_step(*args, **kwargs)


def test_extrapolated_estimates_equal_the_full_simulation(monkeypatch):
    rng = random.Random(SEED)
    used = {"fast": 0}
    real = depth.extrapolated_step

    def counting(*a, **k):
        got = real(*a, **k)
        used["fast"] += got is not None
        return got

    monkeypatch.setattr(depth, "extrapolated_step", counting)
    compared = 0
    tried = 0
    while compared < N_CONFIGS:
        tried += 1
        assert tried < 4 * N_CONFIGS, "too many configurations refused"
        model, method, options, training = _config(rng)
        arch = load_model(model)
        try:
            fast = estimate(arch, method, training, GPU, dict(options))
        except ValueError:
            continue  # a refused configuration (one-line error): refused by both paths alike
        with monkeypatch.context() as m:
            m.setattr(estimate_mod, "simulate_step", _full)
            full = estimate(arch, method, training, GPU, dict(options))
        assert fast.to_dict() == full.to_dict(), (model, method, options, training)
        compared += 1
    assert compared >= min(500, N_CONFIGS)
    # the common configurations take the extrapolated path (not a test that passes by falling back)
    # ~1 in 5 drawn is eligible (few layers, T5, LISA, Adafactor / for-loop, offloading trainers fall back)
    assert used["fast"] >= compared // 6, used


@pytest.mark.parametrize("model,method,kw", [
    ("llama3-8b", "qlora", {}), ("llama3-8b", "lora", {"grad_ckpt": True}), ("mistral-7b", "full", {}),
    ("qwen2.5-7b", "dora", {"grad_accum": 2}), ("gemma3-27b", "lora", {}),
    ("llama3-70b", "lora", {"grad_ckpt": True}),
])
def test_large_models_take_the_fast_path_exactly(model, method, kw):
    """Catalog models at full depth: the extrapolated step is used and equals the full one."""
    names = set(model_names())
    if model not in names:
        pytest.skip(f"{model} not in the catalog")
    arch = load_model(model)
    training = Training(micro_batch=1, seq_len=256, **kw)
    tuned, _ = build_tuned(arch, method, None, training)
    fa, fb = FlopCount(), FlopCount()
    got = depth.extrapolated_step(tuned, training, fa, simulate=_simulate, step_memory=StepMemory)
    assert got is not None, "the common case must take the extrapolated path"
    ref = simulate_step(tuned, training, fb, extrapolate=False)
    assert (got.peak, got.phase_peaks, list(got.phase_peaks), got.events, got.weights_bytes, got.grad_bytes,
            got.optimizer_state_bytes, got.trainable_bytes, got.quant_constant_bytes) == \
           (ref.peak, ref.phase_peaks, list(ref.phase_peaks), ref.events, ref.weights_bytes, ref.grad_bytes,
            ref.optimizer_state_bytes, ref.trainable_bytes, ref.quant_constant_bytes)
    from peftplan.engine.roofline import kernel_table

    assert fa.table == kernel_table(fb.kernels)
    assert (fa.forward, fa.backward_input, fa.backward_weight, fa.recompute) == \
           (fb.forward, fb.backward_input, fb.backward_weight, fb.recompute)


def test_decompose():
    a, b, c = "a", "b", "c"
    assert depth.decompose((a,) + (b,) * 20) == (1, 19, 1)
    assert depth.decompose((a,) + (b, b, c) * 8 + (b,)) == (3, 8, 1)
    assert depth.decompose((a,) + (b,) * 5) is None  # too shallow to gain
    assert depth.decompose(tuple(range(20))) is None  # nothing repeats
