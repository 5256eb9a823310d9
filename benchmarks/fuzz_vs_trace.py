"""Differential fuzzing at scale: engine vs the CPU trace on thousands of random configurations.

Draws `--examples` configurations with the same hypothesis strategy as tests/test_fuzz.py
(peftplan/harness/fuzz.py: every method and its options, precision, optimizer and implementation,
attention, checkpointing, gradient accumulation, quantization, batch and sequence, over every catalog
family at real width and 1-3 layers), runs engine and trace on each in `--jobs` worker processes, and
writes the error distribution per method and per option value (markdown + json):

    .venv/bin/python benchmarks/fuzz_vs_trace.py --examples 2000 --seed 7 --jobs 2 \\
        --out benchmarks/fuzz_vs_trace

The seed makes the draw reproducible; every deviation is listed with the case that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from peftplan.harness import fuzz  # noqa: E402


def draw_cases(n: int, seed: int) -> list[fuzz.FuzzCase]:
    """`n` cases from the fuzz strategy (generation only: nothing runs while drawing)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    drawn: list[fuzz.FuzzCase] = []

    @hyp_seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz.cases())
    def collect(case: fuzz.FuzzCase) -> None:
        drawn.append(case)

    collect()
    unique: dict[str, fuzz.FuzzCase] = {}
    for c in drawn:
        unique.setdefault(c.label(), c)
    return list(unique.values())


CASE_TIMEOUT_S = 300  # a case still running after this is recorded as a tracer error (a hung worker dies)


def _run(case: fuzz.FuzzCase) -> dict:
    import faulthandler

    import torch

    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)  # a deadlocked trace kills its worker
    t0 = time.perf_counter()
    out = fuzz.run_case(case).to_dict()
    faulthandler.cancel_dump_traceback_later()
    out["seconds"] = time.perf_counter() - t0
    return out


def _run_all(cases: list[fuzz.FuzzCase], jobs: int, sink: Path) -> list[dict]:
    """Every case in worker processes; each row is appended to `sink` (JSON lines) as it completes, and a
    case whose worker dies (timeout, crash) is recorded as a tracer error."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    rows: list[dict] = []
    pending = list(cases)
    with sink.open("a", encoding="utf-8") as out:
        while pending:
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_run, c): c for c in pending}
                done: set[str] = set()
                try:
                    for fut in as_completed(futures):
                        row = fut.result()
                        rows.append(row)
                        done.add(futures[fut].label())
                        out.write(json.dumps(row, default=str) + "\n")
                        out.flush()
                        i = len(rows)
                        if row["verdict"] not in ("pass", "both-refuse") or i % 100 == 0:
                            err = f"{100 * row['error']:+.3f}%" if row["error"] is not None else ""
                            print(f"[{i}/{len(cases)}] {row['verdict']} {err} {row['model']} L{row['layers']} "
                                  f"{row['method']} {row['options']} {row['training']}", flush=True)
                except BrokenProcessPool:
                    pass
            # a worker died (a case hung past CASE_TIMEOUT_S, or crashed): the earliest unfinished case was the
            # one running; record it as a tracer error and resubmit the rest
            lost = [c for c in pending if c.label() not in done]
            for c in lost[:1]:
                row = fuzz.FuzzOutcome(c, trace_error=f"worker died (timeout {CASE_TIMEOUT_S} s or crash)").to_dict()
                row["seconds"] = None
                rows.append(row)
                out.write(json.dumps(row, default=str) + "\n")
                print(f"[{len(rows)}/{len(cases)}] trace-error (worker died) {c.label()}", flush=True)
            recorded = {json.dumps({k: r[k] for k in ("model", "layers", "method", "options", "training")},
                                   sort_keys=True) for r in rows}
            pending = [c for c in pending if c.label() not in recorded]
    return rows


def _family(model: str) -> str:
    from peftplan.catalog import load_model

    return load_model(model).model_type


def summarize(rows: list[dict]) -> dict:
    """Counts and error quantiles overall, per method and per option value."""
    def stats(group: list[dict]) -> dict:
        errs = [abs(r["error"]) * 100 for r in group if r["error"] is not None]
        compared = [r for r in group if r["error"] is not None]
        return {
            "n": len(group), "compared": len(compared),
            "within_1pct": sum(1 for r in compared if abs(r["error"]) <= fuzz.TOLERANCE),
            "both_refuse": sum(1 for r in group if r["verdict"] == "both-refuse"),
            "mismatched_refusals": sum(1 for r in group if r["verdict"] in ("engine-refuses", "trace-refuses")),
            "trace_errors": sum(1 for r in group if r["verdict"] == "trace-error"),
            "known_deviation": sum(1 for r in group if r["known_deviation"]),
            "median_abs_pct": statistics.median(errs) if errs else None,
            "p99_abs_pct": sorted(errs)[max(0, int(0.99 * len(errs)) - 1)] if errs else None,
            "worst_pct": max((r["error"] * 100 for r in compared), key=abs, default=None),
        }

    dims: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        t = r["training"]
        dims["method"][r["method"]].append(r)
        dims["family"][_family(r["model"])].append(r)
        for k in ("precision", "attention", "optimizer", "optimizer_impl"):
            dims[k][str(t.get(k))].append(r)
        dims["grad_ckpt"][str(t.get("grad_ckpt"))].append(r)
        dims["grad_accum"][str(t.get("grad_accum"))].append(r)
        for k, v in r["options"].items():
            if k in ("quant", "double_quant", "kbit_prep", "kbit_grad_ckpt", "adapter_kind", "dropout"):
                dims[f"{r['method']}.{k}"][str(v)].append(r)
    return {"overall": stats(rows),
            "by": {d: {v: stats(g) for v, g in sorted(groups.items())} for d, groups in sorted(dims.items())}}


def to_markdown(summary: dict, rows: list[dict], seed: int, seconds: float) -> str:
    o = summary["overall"]
    lines = [
        "# Engine vs CPU trace: differential fuzzing",
        "",
        f"Generated by `benchmarks/fuzz_vs_trace.py --examples {o['n']} --seed {seed}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} min). "
        "Error = (engine - trace) / trace of the peak allocated bytes; the trace is the real HF transformers + "
        "peft step under fake tensors (peftplan/harness/trace.py). Pass = within 1%, or both refuse.",
        "",
        f"**{o['n']} cases**: {o['compared']} compared, {o['within_1pct']} within 1% "
        f"({100 * o['within_1pct'] / max(1, o['compared']):.2f}%), {o['both_refuse']} refused by both, "
        f"{o['mismatched_refusals']} refused by one side only, {o['trace_errors']} tracer errors, "
        f"{o['known_deviation']} in a named known-deviation class; median |error| "
        f"{o['median_abs_pct']:.4f}%, p99 {o['p99_abs_pct']:.3f}%, worst {o['worst_pct']:+.3f}%."
        if o["compared"] else f"**{o['n']} cases**, none compared.",
        "",
        "## Known deviation classes",
        "",
    ]
    for d in fuzz.KNOWN_DEVIATIONS:
        lines.append(f"- `{d.name}` ({d.measured}): {d.reason}")
    for dim, groups in summary["by"].items():
        lines += ["", f"## By {dim}", "", "| value | n | compared | within 1% | median abs % | p99 abs % | worst % | "
                  "refused by both | one-sided refusals | tracer errors | known class |", "|---|" + "---|" * 10]
        for v, s in groups.items():
            def f(x, spec):
                return "" if x is None else format(x, spec)
            lines.append(f"| {v} | {s['n']} | {s['compared']} | {s['within_1pct']} | {f(s['median_abs_pct'], '.4f')} | "
                         f"{f(s['p99_abs_pct'], '.3f')} | {f(s['worst_pct'], '+.3f')} | {s['both_refuse']} | "
                         f"{s['mismatched_refusals']} | {s['trace_errors']} | {s['known_deviation']} |")
    bad = [r for r in rows if r["verdict"] not in ("pass", "both-refuse")]
    lines += ["", f"## Every case outside 1% or refused by one side only ({len(bad)})", ""]
    for r in sorted(bad, key=lambda r: -abs(r["error"] or 0)):
        err = f"{100 * r['error']:+.3f}%" if r["error"] is not None else r["verdict"]
        why = r.get("known_deviation") or r.get("engine_refusal") or r.get("trace_refusal") or r.get("trace_error") or ""
        case = {k: r[k] for k in ("model", "layers", "method", "options", "training")}
        lines.append(f"- {err} {('[' + why + ']') if why else ''} `{json.dumps(case, sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/fuzz_vs_trace", help="path stem: writes STEM.md and STEM.json")
    ap.add_argument("--resummarize", action="store_true",
                    help="re-read STEM.json and rewrite both files with the current known-deviation classes "
                         "(no case is re-run; the measured bytes stay as they were)")
    args = ap.parse_args()
    if args.resummarize:
        _resummarize(Path(args.out))
        return
    t0 = time.perf_counter()
    cases = draw_cases(args.examples, args.seed)
    print(f"{len(cases)} distinct cases drawn (seed {args.seed})", flush=True)
    sink = Path(args.out).with_suffix(".jsonl")
    sink.parent.mkdir(parents=True, exist_ok=True)
    sink.write_text("", encoding="utf-8")
    rows = _run_all(cases, args.jobs, sink)
    seconds = time.perf_counter() - t0
    summary = summarize(rows)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"seed": args.seed, "seconds": seconds, "summary": summary,
                                                     "rows": rows}, indent=1, default=str), encoding="utf-8")
    stem.with_suffix(".md").write_text(to_markdown(summary, rows, args.seed, seconds), encoding="utf-8")
    o = summary["overall"]
    print(f"{o['n']} cases, {o['within_1pct']}/{o['compared']} within 1%; wrote {stem}.md and {stem}.json")


def _resummarize(stem: Path) -> None:
    data = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    rows = data["rows"]
    for r in rows:
        case = fuzz.FuzzCase(r["model"], r["layers"], r["method"], r["options"], r["training"])
        out = fuzz.FuzzOutcome(case, r["engine_bytes"], r["trace_bytes"], r["engine_refusal"], r["trace_refusal"],
                               r["trace_error"])
        r["known_deviation"] = fuzz.known_deviation(out)
        r["verdict"] = out.verdict
    summary = summarize(rows)
    data["summary"] = summary
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    stem.with_suffix(".md").write_text(to_markdown(summary, rows, data["seed"], data["seconds"]), encoding="utf-8")
    o = summary["overall"]
    print(f"{o['n']} cases, {o['within_1pct']}/{o['compared']} within 1%, {o['known_deviation']} in known classes")


if __name__ == "__main__":
    main()
