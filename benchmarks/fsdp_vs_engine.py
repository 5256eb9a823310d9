"""Engine vs the FSDP2 trace at full scale: per-rank (rank 0) peak allocated memory of one step.

Runs `peftplan.harness.fsdp_trace.trace_fsdp` (the real HF transformers + peft step under
`fully_shard` per decoder layer + root, a fake process group of N ranks, fake tensors) and the
engine (`engine.step.simulate_step`, the same path `estimate` takes) on the same configuration, and
prints config, N, engine GiB, trace GiB and the signed error (engine - trace) / trace.

tests/test_sharding.py checks the same configurations with the real llama3-70b widths but 3 layers
(seconds instead of minutes); this is the once-in-a-while check of the whole 80-layer model.

    .venv/bin/python benchmarks/fsdp_vs_engine.py [--quick] [--layers N] [--out reports/fsdp_vs_engine.json]

--quick: only llama3-70b LoRA N=8 with gradient checkpointing (about 4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from peftplan.arch import ModelArch, from_hf_config  # noqa: E402
from peftplan.catalog import load_model  # noqa: E402
from peftplan.engine.step import simulate_step  # noqa: E402
from peftplan.estimate import build_tuned  # noqa: E402
from peftplan.training import Training  # noqa: E402

GiB = 2**30

# (model, method, n_gpus, grad_ckpt); micro-batch 1, seq 512, fsdp-full, bf16 mixed precision
CONFIGS = [
    ("llama3-70b", "lora", 8, True),
    ("llama3-70b", "lora", 2, True),
    ("llama3-70b", "lora", 8, False),
    ("llama3-70b", "full", 8, True),
]


def arch_of(name: str, layers: int | None) -> ModelArch:
    arch = load_model(name)
    if layers is None:
        return arch
    cfg = dict(arch.config)
    cfg["num_hidden_layers"] = layers
    return from_hf_config(cfg, f"{name}-L{layers}")


def compare(arch: ModelArch, method: str, n: int, ckpt: bool) -> dict:
    from peftplan.harness.fsdp_trace import trace_fsdp

    tr = Training(micro_batch=1, seq_len=512, n_gpus=n, shard="fsdp-full", grad_ckpt=ckpt)
    model, _ = build_tuned(arch, method, {}, tr)
    eng = simulate_step(model, tr).peak
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace_fsdp(arch, method, {}, tr)
    return {"model": arch.name, "method": method, "n_gpus": n, "grad_ckpt": ckpt,
            "engine_bytes": eng.bytes, "engine_phase": eng.phase, "trace_bytes": traced.peak_allocated_bytes,
            "trace_phase": traced.peak_phase["phase"], "error": eng.bytes / traced.peak_allocated_bytes - 1,
            "engine_components": eng.components, "trace_components": traced.components,
            "trace_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the model's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    rows = []
    print(f"{'config':<44} {'N':>2} {'engine GiB':>11} {'trace GiB':>10} {'error %':>8}  trace s", flush=True)
    for name, method, n, ckpt in CONFIGS[:1] if args.quick else CONFIGS:
        arch = arch_of(name, args.layers)
        row = compare(arch, method, n, ckpt)
        rows.append(row)
        cfg = f"{arch.name} {method} b1 s512 {'ckpt' if ckpt else 'no-ckpt'} fsdp-full"
        print(f"{cfg:<44} {n:>2} {row['engine_bytes'] / GiB:>11.3f} {row['trace_bytes'] / GiB:>10.3f} "
              f"{100 * row['error']:>+8.3f}  {row['trace_seconds']:>6.1f}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    # fail when the engine is below the trace (beyond the 5 KiB of rotary inv_freq buffers and cache_position
    # the engine does not model) or more than 1% above it
    return 1 if any(r["engine_bytes"] < r["trace_bytes"] - 16 * 1024 or r["error"] > 0.01 for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
