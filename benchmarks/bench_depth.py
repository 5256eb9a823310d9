"""In-process estimate() time, full simulation vs depth-extrapolated (engine/depth.py); a benchmark, not a test.

For each model: the median of N calls of `estimate()` after two warm-up calls, once with the
extrapolated step (the default) and once with `simulate_step(..., extrapolate=False)`, and the
median of N `simulate_step` calls alone on each path (the part this change touches).
Usage: python benchmarks/bench_depth.py [N] [model:method ...]
"""

import statistics
import sys
import time

import peftplan.estimate as estimate_mod
from peftplan.catalog import load_gpu, load_model
from peftplan.engine.ops import FlopCount
from peftplan.engine.step import simulate_step
from peftplan.estimate import build_tuned, estimate
from peftplan.training import Training

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
CASES = sys.argv[2:] or ["llama3.2-1b:lora", "llama3-8b:qlora", "llama3-70b:lora"]


def med(f):
    f()
    f()
    ts = []
    for _ in range(N):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def full(*a, **k):
    k["extrapolate"] = False
    return simulate_step(*a, **k)


gpu = load_gpu("rtx4090")
tr = Training(micro_batch=1, seq_len=2048)
for case in CASES:
    name, method = case.split(":")
    arch = load_model(name)
    e_fast = med(lambda: estimate(arch, method, tr, gpu))
    real = estimate_mod.simulate_step
    estimate_mod.simulate_step = full
    try:
        e_full = med(lambda: estimate(arch, method, tr, gpu))
    finally:
        estimate_mod.simulate_step = real
    eff = estimate(arch, method, tr, gpu).training
    model, _ = build_tuned(arch, method, None, eff)
    s_fast = med(lambda: simulate_step(model, eff, FlopCount()))
    s_full = med(lambda: simulate_step(model, eff, FlopCount(), extrapolate=False))
    print(f"{name} {method} ({arch.num_layers} layers), median of {N}: estimate {e_full:.1f} -> {e_fast:.1f} ms; "
          f"simulate_step {s_full:.1f} -> {s_fast:.1f} ms")
