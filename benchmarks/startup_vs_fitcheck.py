"""Start-up and wall time of `peftplan estimate` beside fitcheck (fitcheck-llm, the closest peer tool), same
question: llama3-8b (Meta-Llama-3-8B), QLoRA, a T4, micro-batch 1 x 2048 tokens. A benchmark, not a test.

Each round runs every command once in a fresh process, interleaved (peftplan, fitcheck, [peftplan before]),
so that the machine's load falls on all of them alike; the table gives min / median / max over the rounds of
- wall: the whole command, process start to exit (time.perf_counter around subprocess.run);
- imports: the sum of the top-level cumulative times of `python -X importtime` (every import the command
  runs, lazy ones included, site included), measured in separate runs of the same command.

fitcheck reads config.json from the Hugging Face cache; this script writes peftplan's bundled llama3-8b
config (the same file) into a private cache under a temporary HF_HOME as meta-llama/Meta-Llama-3-8B and
runs fitcheck with HF_HUB_OFFLINE=1 (no network: it warns that it cannot read the Hub's parameter count
and uses the count it derives from config.json).

Usage: python benchmarks/startup_vs_fitcheck.py [--runs 15] [--fitcheck /path/to/venv/bin/fitcheck]
       [--before /path/to/an/older/peftplan/tree]
(run with the Python that has peftplan's dependencies; PYTHONPATH chooses the peftplan tree)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFTPLAN_ARGS = ["estimate", "--model", "llama3-8b", "--method", "qlora", "--gpu", "t4", "--batch", "1",
                 "--seq", "2048"]
FITCHECK_ARGS = ["meta-llama/Meta-Llama-3-8B", "--qlora", "--gpu", "t4", "--batch-size", "1", "--seq-len", "2048"]


def _hf_home(tmp: Path) -> Path:
    snap = tmp / "hub" / "models--meta-llama--Meta-Llama-3-8B" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    shutil.copy(ROOT / "peftplan" / "catalog" / "models" / "llama3-8b.json", snap / "config.json")
    return tmp


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: fitcheck's "does not fit" verdict
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr[-500:]}")
    return dt


def _imports(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds of imports: top-level entries of -X importtime (cumulative column)."""
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = 0
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cum, name = line.split("|", 2)
            if not name.startswith("  "):  # one space after "|": imported by the command itself
                total += int(cum)
    return total / 1e6


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--fitcheck", default=shutil.which("fitcheck") or "/tmp/fitcheck-venv/bin/fitcheck")
    ap.add_argument("--before", default=None, help="another peftplan tree, timed the same way (PYTHONPATH)")
    a = ap.parse_args()
    fitcheck_py = str(Path(a.fitcheck).with_name("python"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package runs from its .pyc files
    with tempfile.TemporaryDirectory() as tmp:
        fenv = {**env, "HF_HOME": str(_hf_home(Path(tmp))), "HF_HUB_OFFLINE": "1"}
        fenv.pop("PYTHONPATH", None)
        benv = {**env, "PYTHONPATH": a.before} if a.before else None
        tools = {"peftplan estimate": ([sys.executable, "-m", "peftplan", *PEFTPLAN_ARGS], env),
                 "fitcheck": ([a.fitcheck, *FITCHECK_ARGS], fenv)}
        imp_cmds = {"peftplan estimate": [sys.executable, "-X", "importtime", "-m", "peftplan", *PEFTPLAN_ARGS],
                    "fitcheck": [fitcheck_py, "-X", "importtime", "-m", "fitcheck", *FITCHECK_ARGS]}
        if benv is not None:
            tools["peftplan estimate (before)"] = (tools["peftplan estimate"][0], benv)
            imp_cmds["peftplan estimate (before)"] = imp_cmds["peftplan estimate"]
        for name, (cmd, e) in tools.items():  # warm-up: .pyc files written, caches filled
            _wall(cmd, e)
        wall: dict[str, list[float]] = {k: [] for k in tools}
        imports: dict[str, list[float]] = {k: [] for k in tools}
        for _ in range(a.runs):
            for name, (cmd, e) in tools.items():
                wall[name].append(_wall(cmd, e))
            for name, (cmd, e) in tools.items():
                imports[name].append(_imports(imp_cmds[name], e))
    out = {k: {"wall_s": _stats(wall[k]), "imports_s": _stats(imports[k])} for k in tools}
    out["runs"] = a.runs
    out["ratio_median_wall_peftplan_over_fitcheck"] = (out["peftplan estimate"]["wall_s"]["median"]
                                                       / out["fitcheck"]["wall_s"]["median"])
    print(json.dumps(out, indent=2))
    print(f"\n| command | wall median (min-max) | imports median (min-max) |\n|---|---|---|", file=sys.stderr)
    for k in tools:
        w, i = out[k]["wall_s"], out[k]["imports_s"]
        print(f"| {k} | {w['median']:.3f} s ({w['min']:.3f}-{w['max']:.3f}) | {i['median']:.3f} s "
              f"({i['min']:.3f}-{i['max']:.3f}) |", file=sys.stderr)


if __name__ == "__main__":
    main()
