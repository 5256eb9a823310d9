"""Engine vs tracer: peak allocated memory, parameter counts and FLOPs over methods, families, sizes.

Runs `peftplan.harness.trace.trace` (the real HF transformers + peft step under FakeTensorMode) and
`peftplan.estimate.estimate` on the same configuration and reports the signed error of the engine's
peak ((engine - trace) / trace), whether the parameter counts agree exactly, and the FLOP ratios
(engine counted with `causal_skip=False`, the flop counter's full-square convention).

    .venv/bin/python benchmarks/accuracy_vs_trace.py [--quick [--with-8b]] [--only-8b] [--methods a,b]
        [--shard i/n] [--out reports/accuracy_vs_trace.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from peftplan.arch import ModelArch, from_hf_config  # noqa: E402
from peftplan.catalog import load_gpu, load_model  # noqa: E402
from peftplan.engine.flops import step_flops  # noqa: E402
from peftplan.estimate import build_tuned, estimate  # noqa: E402
from peftplan.methods import method_names  # noqa: E402
from peftplan.training import Training  # noqa: E402

GPU = load_gpu("h200")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
FAMILIES = ("llama3.2-1b", "qwen2.5-0.5b", "gpt2", "opt-350m", "bloomz-560m", "roberta-base", "mt0-large",
            "gemma2-2b", "phi3-mini")


def tiny(name: str, layers: int = 2) -> ModelArch:
    """The catalog model with `layers` layers (all widths real)."""
    cfg = dict(load_model(name).config)
    for k in LAYER_KEYS:
        if k in cfg:
            cfg[k] = layers
    return from_hf_config(cfg, f"{name}-L{layers}")


def variants() -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = [(m, {}) for m in method_names()]
    out += [("qlora", {"quant": "fp4"}), ("qlora", {"double_quant": False}), ("qlora", {"kbit_prep": False}),
            ("qlora", {"quant": "fp4", "double_quant": False, "kbit_prep": False}),
            ("adapter", {"adapter_kind": "pfeiffer"}), ("adapter", {"adapter_kind": "parallel"}),
            ("lora", {"dropout": 0.1}), ("lora", {"targets": "all-linear", "rank": 16})]
    return out


def compare(arch: ModelArch, method: str, opts: dict, training: Training) -> dict:
    from peftplan.harness import NotTraceable
    from peftplan.harness.trace import trace

    row = {"model": arch.name, "method": method, "options": opts, "training": asdict(training)}
    try:
        e = estimate(arch, method, training, GPU, opts)
    except ValueError as exc:
        return {**row, "skipped": f"engine: {exc}"}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = trace(arch, method, opts, training)
    except (NotTraceable, ValueError) as exc:
        return {**row, "skipped": f"trace: {exc}"}
    except Exception as exc:  # a trace the harness cannot run: report, do not hide
        return {**row, "skipped": f"trace error: {type(exc).__name__}: {str(exc)[:160]}"}
    tuned, _ = build_tuned(arch, method, opts, training)
    f = step_flops(tuned, e.training, causal_skip=False)
    k = training.grad_accum
    eng, tr = e.memory.peak_allocated_bytes, r.peak_allocated_bytes
    return {**row, "engine_peak": eng, "trace_peak": tr, "error_pct": 100.0 * (eng - tr) / tr,
            "params_exact": (e.params.total, e.params.trainable) == (r.params_total, r.params_trainable),
            "engine_phase": e.memory.peak_phase, "trace_phase": r.peak_phase,
            "flops_fwd_ratio": (f.forward / k) / r.flops_forward if r.flops_forward else None,
            "flops_bwd_ratio": ((f.backward_input + f.backward_weight + f.recompute) / k) / r.flops_backward
            if r.flops_backward else None,
            "trace_seconds": round(time.perf_counter() - t0, 2)}


def big_configs() -> list[tuple[ModelArch, str, dict, Training]]:
    big = load_model("llama3-8b")
    return [(big, m, o, Training(micro_batch=1, seq_len=2048))
            for m, o in [(m, {}) for m in method_names()] + [("qlora", {"kbit_prep": False})]]


def configs(quick: bool, with_8b: bool = False) -> list[tuple[ModelArch, str, dict, Training]]:
    out = []
    t = Training(micro_batch=2, seq_len=128)
    fams = FAMILIES[:4] if quick else FAMILIES
    for fam in fams:
        arch = tiny(fam)
        for m, o in variants():
            out.append((arch, m, o, t))
        if not quick:
            for m, o in [(m, {}) for m in method_names()]:
                out.append((tiny(fam, 4), m, o, Training(micro_batch=1, seq_len=512)))
    axes = [dict(grad_ckpt=True), dict(attention="eager"), dict(precision="fp16-mixed"), dict(precision="bf16"),
            dict(precision="fp32"), dict(optimizer_impl="foreach"), dict(optimizer="sgd"), dict(optimizer="adafactor"),
            dict(grad_accum=2)]
    for fam in ("llama3.2-1b", "gpt2") if not quick else ("llama3.2-1b",):
        arch = tiny(fam)
        for ax in axes:
            for m in method_names():
                out.append((arch, m, {}, t.with_(**ax)))
    if not quick or with_8b:
        out += big_configs()
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<10} {'n':>4} {'median %':>9} {'worst %':>9}  worst config"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "error_pct" in r:
            by.setdefault(r["method"], []).append(r)
    for m, rs in sorted(by.items()):
        errs = [r["error_pct"] for r in rs]
        worst = max(rs, key=lambda r: abs(r["error_pct"]))
        tr = {k: v for k, v in worst["training"].items()
              if k in ("micro_batch", "seq_len", "grad_ckpt", "attention", "precision", "optimizer", "optimizer_impl", "grad_accum")}
        lines.append(f"{m:<10} {len(rs):>4} {statistics.median(errs):>+9.3f} {worst['error_pct']:>+9.3f}  "
                     f"{worst['model']} {worst['options']} {tr}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th config starting at i")
    ap.add_argument("--with-8b", action="store_true", help="add the llama3-8b b1 s2048 rows to --quick")
    ap.add_argument("--only-8b", action="store_true", help="only the llama3-8b b1 s2048 rows")
    ap.add_argument("--methods", default="", help="comma-separated: only these methods")
    args = ap.parse_args()
    i, n = map(int, args.shard.split("/"))
    rows = []
    cfgs = big_configs() if args.only_8b else configs(args.quick, args.with_8b)
    keep = set(args.methods.split(",")) if args.methods else None
    for j, (arch, m, o, t) in enumerate(cfgs):
        if j % n != i or (keep is not None and m not in keep):
            continue
        row = compare(arch, m, o, t)
        rows.append(row)
        if "error_pct" in row:
            print(f"{row['model']:<18} {m:<8} {str(o):<44} {row['error_pct']:+8.3f}% params={row['params_exact']} "
                  f"fl={row['flops_fwd_ratio']:.4f}/{row['flops_bwd_ratio']:.4f} {row['trace_seconds']}s "
                  f"{ {k: v for k, v in row['training'].items() if v != getattr(Training(), k, None)} }", flush=True)
        else:
            print(f"{row['model']:<18} {m:<8} {str(o):<44} SKIP {row['skipped'][:120]}", flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
