"""Profiling sweeps: a data file of models x methods x shapes, expanded, planned and run one process each.

A sweep file is read, validated and expanded by `sweep_spec.py` (its format is described there and in
`peftplan/sweeps/default.yaml`); records are placed by `sweep_records.py`.

An entry with `gpus: N` (N > 1) and `shard: fsdp-full | fsdp-grad-op | fsdp-hybrid` runs under torchrun
with FSDP2 (`torchrun --standalone --nproc_per_node N -m peftplan.harness.profile --one SPEC`, NCCL on
CUDA, gloo on the CPU); on CUDA it is skipped, with the reason, when fewer than N GPUs are present.

`run_sweep` runs each configuration in its own process (`python -m peftplan.harness.profile --one
SPEC`), so one run's peak or OOM cannot leak into the next; a child that crashes or hangs is
reported and the sweep goes on. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..records import RecordError, unique_path
from .sweep_records import gpu_slug, measured_keys, merge_rank_oom  # noqa: F401  (re-exported)
from .sweep_spec import (AXES, CHILD_OVERHEAD_S, CUDA_ONLY_OPTIMIZERS, ENTRY_KEYS,  # noqa: F401  (re-exported)
                         LOAD_BYTES_PER_S, METHOD_KEYS, TOP_KEYS, TORCHRUN_SHARDS, RunConfig, Sweep, SweepError,
                         bundled_sweeps, load_sweep, read_sweep_file, refuse_remote_code, resolve_sweep_path)

RESULT_PREFIX = "PEFTPLAN_PROFILE_RESULT "
EXIT_REFUSED = 3  # the child could not build / run this configuration on this device (not a crash)
EXIT_RANK_OOM = 4  # a torchrun rank ran out of memory (its record is in the rank directory)


@dataclass
class Outcome:
    config: RunConfig
    status: str  # ok | oom | skipped | refused | crashed | timeout | not-run
    path: str | None = None
    reason: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _fmt_gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def _delta(measured: int | None, predicted: int | None) -> str:
    if not measured or not predicted:
        return ""
    return f" (engine {_fmt_gib(predicted)}, {100.0 * (predicted - measured) / measured:+.1f}%)"


def describe(o: Outcome) -> str:
    """One line per configuration for the sweep log."""
    c, r = o.config, o.result
    if o.status == "ok":
        peak = r.get("peak_allocated_bytes")
        line = f"[green]ok[/green]      {c.label}: peak {_fmt_gib(peak)}{_delta(peak, c.prediction.get('peak_allocated_bytes'))}"
        if r.get("step_time_s_median") is not None:
            line += f", {r['step_time_s_median'] * 1e3:,.1f} ms/step"
        if r.get("tokens_per_s"):
            line += f", {r['tokens_per_s']:,.0f} tok/s"
        return line
    if o.status == "oom":
        return (f"[yellow]oom[/yellow]     {c.label}: out of memory at {r.get('phase', '?')} "
                f"(capacity {_fmt_gib(r.get('capacity_bytes'))}; engine predicted "
                f"{_fmt_gib(c.prediction.get('peak_allocated_bytes'))})")
    if o.status in ("skipped", "refused", "not-run"):
        return f"[dim]{o.status:<8}{c.label}: {o.reason}[/dim]"
    return f"[red]{o.status:<8}[/red]{c.label}: {o.reason}"


def torchrun_command(nproc: int, spec_path: str) -> list[str]:
    """The launch line of an N-rank configuration (torchrun, as the interpreter running peftplan)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "peftplan.harness.profile", "--one", spec_path]


def _kill_ranks(rank_dir: str | None) -> None:
    """torchrun starts each rank in a session of its own: end the ranks by the pids they wrote."""
    if not rank_dir:
        return
    for f in Path(rank_dir).glob("rank*.pid"):
        try:
            os.kill(int(f.read_text()), signal.SIGKILL)
        except (ValueError, OSError):
            pass


def run_child(spec: dict[str, Any], timeout_s: float, env: Mapping[str, str] | None = None,
              nproc: int = 1) -> tuple[int | None, str, str, bool]:
    """Run one configuration in a fresh interpreter, or under torchrun with `nproc` ranks:
    (returncode, stdout, stderr, timed_out). A process that outlives `timeout_s` is killed (torchrun,
    its ranks, and their process groups)."""
    fd, spec_path = tempfile.mkstemp(prefix="peftplan-profile-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    cmd = ([sys.executable, "-m", "peftplan.harness.profile", "--one", spec_path] if nproc <= 1 else
           torchrun_command(nproc, spec_path))
    child_env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[2])
    child_env["PYTHONPATH"] = root + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, err, False
    except subprocess.TimeoutExpired:
        _kill_ranks(spec.get("rank_dir"))  # torchrun's ranks (own sessions): by the pids they wrote
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (it started it)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return proc.returncode, out, err, True
    finally:
        os.unlink(spec_path)


def parse_child_output(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                return None
    return None


def _tail(text: str, n: int = 1) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:300] if lines else "(no output)"


def run_sweep(sweep: Sweep, out_dir: Path, *, device: str = "cuda", resume: bool = False,
              capacity_bytes: int | None = None, timeout_s: float = 900.0, max_minutes: float | None = None,
              threads: int | None = None, console: Any = None, progress: bool = True,
              on_outcome: Callable[[Outcome], None] | None = None, n_devices: int | None = None) -> list[Outcome]:
    """Run every configuration of `sweep` in its own process (an N-GPU one under torchrun); records go
    to `out_dir` (already the per-GPU directory). `n_devices`: the GPUs present (CUDA; an N-GPU
    configuration is skipped when fewer are). Returns one Outcome per configuration, in sweep order."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = measured_keys(out_dir) if resume else {}
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("profiling", total=len(sweep.configs))
        for cfg in sweep.configs:
            key = cfg.key(device, capacity_bytes)
            bar.update(task, description=f"{cfg.label}")
            ranks = int(cfg.training.get("n_gpus", 1))
            if cfg.skip_reason is not None:
                o = Outcome(cfg, "skipped", reason=cfg.skip_reason)
            elif ranks > 1 and device == "cuda" and (n_devices or 1) < ranks:
                o = Outcome(cfg, "skipped", reason=f"needs {ranks} GPUs (torchrun, {cfg.training['shard']}); "
                                                   f"{n_devices or 1} present")
            elif key in done:
                o = Outcome(cfg, "skipped", path=str(done[key]), reason=f"already measured: {done[key].name} (--resume)")
            elif max_minutes is not None and time.monotonic() - t0 > max_minutes * 60:
                o = Outcome(cfg, "not-run", reason=f"time budget of {max_minutes:g} min spent")
            else:
                o = _run_one(cfg, key, sweep, out_dir, device, capacity_bytes, timeout_s, threads)
            outcomes.append(o)
            bar.console.print(describe(o), highlight=False)
            if on_outcome is not None:
                on_outcome(o)
            bar.advance(task)
        bar.update(task, description="done")
    return outcomes


def _run_one(cfg: RunConfig, key: str, sweep: Sweep, out_dir: Path, device: str, capacity_bytes: int | None,
             timeout_s: float, threads: int | None) -> Outcome:
    path = unique_path(out_dir, cfg.stem)
    spec = {"model_name": cfg.model_name, "config": cfg.config, "method": cfg.method, "options": cfg.options,
            "training": cfg.training, "device": device, "warmup": sweep.warmup, "steps": sweep.steps,
            "capacity_bytes": capacity_bytes, "out_path": str(path), "label": cfg.label, "config_key": key,
            "method_label": cfg.method_label, "sweep": {"name": sweep.name, "entry": cfg.entry, "index": cfg.index},
            "prediction": cfg.prediction, "threads": threads, "seed": 0}
    ranks = int(cfg.training.get("n_gpus", 1))
    rank_dir = tempfile.mkdtemp(prefix="peftplan-ranks-") if ranks > 1 else None
    if rank_dir:
        spec["rank_dir"] = rank_dir
        spec["pg_timeout_s"] = max(30.0, min(600.0, timeout_s / 2))
    t = time.monotonic()
    try:
        env = None
        if cfg.training.get("alloc_conf"):  # the configuration's own PYTORCH_CUDA_ALLOC_CONF (engine/alloc_conf.py)
            env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=str(cfg.training["alloc_conf"]))
        rc, out, err, timed_out = run_child(spec, timeout_s, env=env, nproc=ranks)
        seconds = time.monotonic() - t
        result = parse_child_output(out) or {}
        status = result.get("outcome")
        if not timed_out and rc == 0 and status in ("ok", "oom"):
            return Outcome(cfg, status, path=result.get("path"), result=result, seconds=seconds)
        if not timed_out and (rc == EXIT_REFUSED or (rank_dir and status == "refused")):
            return Outcome(cfg, "refused", reason=result.get("reason") or _tail(err), seconds=seconds)
        if rank_dir and not timed_out:
            try:
                oom = merge_rank_oom(rank_dir, path)
            except (RecordError, OSError, KeyError, ValueError) as exc:  # reported below as a crash
                err += f"\nmerging the ranks' out-of-memory records failed: {exc}"
                oom = None
            if oom is not None:
                return Outcome(cfg, "oom", path=oom["path"], result=oom, seconds=seconds)
    finally:
        if rank_dir:
            shutil.rmtree(rank_dir, ignore_errors=True)
    log = out_dir / "logs" / f"{path.stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"# {cfg.label}\n# exit code {rc}{' (timed out)' if timed_out else ''}\n"
                   f"# spec\n{json.dumps(spec, indent=1, default=str)}\n# stdout\n{out}\n# stderr\n{err}\n",
                   encoding="utf-8")
    if timed_out:
        return Outcome(cfg, "timeout", reason=f"killed after {timeout_s:g} s; log {log}", seconds=seconds)
    why = f"exit code {rc}" if rc is None or rc >= 0 else f"killed by signal {-rc}"
    return Outcome(cfg, "crashed", reason=f"{why}: {_tail(err)}; log {log}", seconds=seconds)


def summary_counts(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    return counts
