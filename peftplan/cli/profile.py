"""`peftplan profile`: the GPU profiler. Runs a sweep file's configurations (peftplan/harness/sweep.py),
each in its own process, and writes one record per run under `<out>/<gpu-slug>/`. torch is imported only by
the children.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import _guard


def _probe_device(device: str) -> dict:
    """The GPU the children will see (a child of its own, so this process never creates a CUDA context)."""
    if device == "cpu":
        return {"device": "cpu", "gpu": None}
    out = subprocess.run([sys.executable, "-m", "peftplan.harness.profile", "--probe"], capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"cannot probe the GPU: {tail}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info.get("device") != "cuda":
        raise RuntimeError("--device cuda: torch sees no CUDA device here (use --device cpu to test the profiler, "
                           "or --dry-run to see the plan)")
    return info


def profile(
    sweep: str = typer.Argument("default", help="sweep file (YAML/JSON) or a bundled sweep name (default, smoke)"),
    device: str = typer.Option("cuda", "--device", help="cuda (the GPU profiler) or cpu (same code path, real CPU "
                               "tensors counted by the tracer's MemoryTracker: tests, small models)"),
    out: Path = typer.Option(Path("profiles"), "--out", "-o", help="records go to OUT/<gpu-slug>/ (OUT/cpu/ on the CPU)"),
    resume: bool = typer.Option(False, "--resume", help="skip configurations already measured in the output directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (order, engine prediction, estimated time); run nothing"),
    capacity: Optional[str] = typer.Option(None, "--capacity", help="memory limit, e.g. 16GiB: on CUDA the allocator's "
                                           "per-process fraction (a smaller GPU), on the CPU an emulated capacity; "
                                           "past it the run is recorded as an OOM"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="catalog GPU for the engine's predictions and the dry run's "
                                      "time estimate (default: the detected GPU, else h100)"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="start no new configuration after this many minutes"),
    timeout: float = typer.Option(900.0, "--timeout", help="seconds before a configuration's process is killed"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="untimed steps first (default: the sweep's, else 2)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="timed steps (default: the sweep's, else 3)"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="run only configurations whose label contains this (repeatable)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="run at most this many configurations"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads in each child (CPU runs)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
    torchrun: Optional[int] = typer.Option(None, "--torchrun", "--gpus", help="run every configuration on N ranks "
                                           "under torchrun with FSDP2 (NCCL on CUDA, gloo on the CPU); entries with "
                                           "`gpus: N` do so without this flag"),
    shard: str = typer.Option("fsdp-full", "--shard", help="with --torchrun: fsdp-full, fsdp-grad-op or fsdp-hybrid"),
) -> None:
    """Measure real training steps on the GPU (one process per configuration) and record them.

    Each configuration is built as the CPU tracer builds it (random weights, no downloads, no remote code), runs warm-up and timed steps, and leaves one JSON record (peak allocated / reserved per phase, memory after load, median step time, tokens/s, versions) under OUT/<gpu-slug>/, written atomically and never over an existing file.

    An out-of-memory is a recorded outcome; a crashed configuration is reported and the sweep goes on. Exit code 1 if any configuration crashed or timed out.
    """

    def run() -> None:
        from rich.console import Console

        from ..harness.sweep import gpu_slug, load_sweep, run_sweep, summary_counts
        from ..units import parse_bytes

        if device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {device!r}")
        overrides = None
        if torchrun is not None:
            from ..harness.sweep import TORCHRUN_SHARDS

            if torchrun < 2:
                raise ValueError("--torchrun needs N >= 2 ranks (one rank is the ordinary profiler)")
            if shard not in TORCHRUN_SHARDS:
                raise ValueError(f"--shard must be one of {', '.join(TORCHRUN_SHARDS)} under --torchrun, got {shard!r}")
            overrides = {"n_gpus": torchrun, "shard": shard}
        if limit is not None and limit < 1:
            raise ValueError("--limit must be >= 1")
        cap = parse_bytes(capacity) if capacity else None
        console = Console(stderr=True)
        info = {"device": device, "gpu": None} if dry_run else _probe_device(device)
        gpu_info = info.get("gpu") or {}
        gpu_name = gpu or gpu_info.get("catalog_name") or "h100"
        sw = load_sweep(sweep, gpu=gpu_name, device=device, warmup=warmup, steps=steps, training_overrides=overrides)
        configs = sw.configs
        if only:
            configs = [c for c in configs if any(o in c.label for o in only)]
            if not configs:
                raise ValueError(f"--only {' '.join(only)}: no configuration of {sw.name} matches")
        if limit is not None:
            runnable = [c for c in configs if c.skip_reason is None][:limit]
            keep = {id(c) for c in runnable}
            configs = [c for c in configs if id(c) in keep]
        sw.configs = configs
        if dry_run:
            _print_plan(sw, gpu_name, device, cap, console)
            return
        slug = "cpu" if device == "cpu" else gpu_info.get("slug") or gpu_slug(gpu_info.get("name", "gpu"))
        out_dir = out / slug
        where = gpu_info.get("name") or "the CPU"
        console.print(f"profiling {sw.name}: {len(sw.runnable)} configurations on {where} "
                      f"({sw.warmup} warm-up + {sw.steps} timed steps each) -> {out_dir}/", highlight=False)
        outcomes = run_sweep(sw, out_dir, device=device, resume=resume, capacity_bytes=cap, timeout_s=timeout,
                             max_minutes=max_minutes, threads=threads, console=console, progress=progress,
                             n_devices=gpu_info.get("count"))
        counts = summary_counts(outcomes)
        console.print("done: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), highlight=False)
        if counts.get("crashed") or counts.get("timeout"):
            raise typer.Exit(code=1)

    _guard(run)


def _print_plan(sw, gpu_name: str, device: str, cap: Optional[int], console) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    from ..catalog import load_gpu
    from ..harness.sweep import _fmt_gib

    capacity = cap or load_gpu(gpu_name).memory_bytes
    table = Table(title=f"{sw.name}: {len(sw.runnable)} runs, {len(sw.configs) - len(sw.runnable)} skipped "
                        f"({sw.warmup} warm-up + {sw.steps} timed steps each)")
    for col in ("#", "configuration", "engine peak", "fits", "est. s"):
        table.add_column(col, justify="right" if col in ("#", "engine peak", "est. s") else "left")
    total = 0.0
    n = 0
    for c in sw.configs:
        if c.skip_reason is not None:
            table.add_row("", f"[dim]{c.label}: {c.skip_reason}[/dim]", "", "skip", "")
            continue
        n += 1
        peak = c.prediction.get("peak_allocated_bytes") or 0
        total_needed = c.prediction.get("device_total_bytes") or peak
        total += c.estimated_s or 0.0
        table.add_row(str(n), c.label, _fmt_gib(peak), "yes" if total_needed <= capacity else "[yellow]OOM?[/yellow]",
                      f"{c.estimated_s or 0:,.0f}")
    Console = type(console)
    Console(width=max(console.width, 140), stderr=False).print(table)
    note = "" if device == "cuda" else " (times are for the GPU; a CPU run is much slower)"
    print(f"estimated time on {gpu_name}: {total / 60:,.1f} min{note}: per run {sw.steps + sw.warmup} steps at the "
          f"engine's step time x 1.5, plus about 12 s to start the process, import the stack and create the weights")
