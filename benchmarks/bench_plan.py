"""Configurations evaluated per second by `peftplan.planner.plan` (a benchmark, not a test).

For each model: a cold plan (no recorded structure in the process: every symbolic step is
recorded), then warm plans on other GPUs of the same precision (the recorded structures are
reused; only the polynomial evaluation runs), and for reference the rate of direct `estimate()`
calls on a sample of the same configurations. Two rates are printed:

- rows/s: configurations with every number computed (peak, device total, fits, FLOPs, tokens/s),
  i.e. the grid at the plan's sequence length and the rows the searches report;
- evaluated/s: rows plus exact fit verdicts (the searches for the largest sequence length and
  micro-batch per method need only fits / does not fit, which the fast path gives from the peak
  alone).

Usage: python benchmarks/bench_plan.py [--models llama3-8b llama3.2-1b] [--gpus a100-80g h100 rtx4090 l4]
       [--trainer hf|trl|unsloth|llamafactory] [--seq N]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from peftplan.catalog import load_gpu, load_model
from peftplan.methods import MethodError
from peftplan.planner import DEFAULT_METHODS, OPTIMIZERS, Evaluator, PlanConfig, clear_cache, plan, variants_for


def run(model: str, gpus: list[str], direct_samples: int, trainer: str = "hf", seq: int | None = None) -> None:
    arch = load_model(model)
    print(f"\n== {model} ({arch.num_layers} layers), trainer {trainer}, seq {seq or 'default'}")
    clear_cache()
    # cold: empty disk cache, nothing in memory; disk: a new process with the disk cache filled
    # (clear_cache() forgets what this process holds); warm: same process, other GPUs
    for i, name in enumerate([gpus[0], gpus[0]] + gpus[1:]):
        gpu = load_gpu(name)
        if i == 1:
            clear_cache()
        t0 = time.perf_counter()
        result = plan(arch, gpu, seq_len=seq, trainer=trainer)
        wall = time.perf_counter() - t0
        st = result.stats
        kind = "cold" if i == 0 else ("disk" if i == 1 else "warm")
        print(f"{kind} {name:10s} {wall:6.2f} s  rows {st.configs_evaluated:5d}  fit checks {st.fit_checks:5d}  "
              f"recorded {st.structures_recorded:3d}  loaded {st.structures_loaded:3d}  direct {st.direct:3d}  "
              f"rows/s {st.configs_evaluated / wall:9,.0f}  evaluated/s {(st.configs_evaluated + st.fit_checks) / wall:9,.0f}")
    # reference: estimate() per configuration
    rng = random.Random(0)
    gpu = load_gpu(gpus[0])
    ev = Evaluator(arch, fast=False)
    variants = [v for m in DEFAULT_METHODS for v in variants_for(m)]
    done = 0
    t0 = time.perf_counter()
    while done < direct_samples:
        cfg = PlanConfig(rng.choice(variants), rng.choice([1, 2, 4, 8, 16]), 1024, rng.choice([False, True]),
                         rng.choice(["sdpa", "eager"]), rng.choice(OPTIMIZERS), "bf16-mixed")
        try:
            ev.estimate(cfg, gpu)
        except MethodError:
            continue
        done += 1
    wall = time.perf_counter() - t0
    print(f"direct estimate() on {done} sampled configurations: {wall / done * 1e3:.1f} ms each, "
          f"{done / wall:,.1f} configs/s")


def main() -> None:
    import os
    import tempfile

    os.environ["PEFTPLAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftplan-bench-")  # truly cold first run
    os.environ.pop("PEFTPLAN_CACHE", None)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama3-8b", "llama3.2-1b"])
    p.add_argument("--gpus", nargs="+", default=["a100-80g", "h100", "rtx4090", "l4"],
                   help="the first is planned cold, the others warm (use GPUs of the same precision)")
    p.add_argument("--direct-samples", type=int, default=20)
    p.add_argument("--trainer", default="hf", help="plan under this trainer (hf: the bare step, recorded per "
                   "method setting; others: one symbolic step per point, planner/replay_point.py)")
    p.add_argument("--seq", type=int, default=None, help="the plan's sequence length (default 1024)")
    args = p.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.processor() or 'cpu'})")
    for m in args.models:
        run(m, args.gpus, args.direct_samples, args.trainer, args.seq)


if __name__ == "__main__":
    main()
