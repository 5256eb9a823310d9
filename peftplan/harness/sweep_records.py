"""Where a sweep's records go and what is already there: the per-GPU directory name (`gpu_slug`), the
configurations already measured (`measured_keys`, for --resume), and the out-of-memory record a torchrun
run's launcher writes from its ranks' own records (`merge_rank_oom`). This module imports no torch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..records import RecordError, iter_record_paths, load_record


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (the profiles/<slug>/ directory)."""
    s = name.strip().lower()
    s = re.sub(r"^(nvidia|amd)\s+", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "gpu"


def measured_keys(directory: Path) -> dict[str, Path]:
    """config_key -> record path, for every readable record in `directory` (for --resume)."""
    out: dict[str, Path] = {}
    if not directory.exists():
        return out
    for p in iter_record_paths([directory]):
        try:
            rec = load_record(p)
        except RecordError:
            continue
        key = (rec.raw.get("profile") or {}).get("config_key")
        if isinstance(key, str):
            out[key] = p
    return out


def merge_rank_oom(rank_dir: str, out_path: Path) -> dict[str, Any] | None:
    """A torchrun run in which some rank ran out of memory: write its record (rank 0's own record when
    rank 0 left one, else the lowest rank's) with outcome "oom", naming every rank that ran out, and
    return the result line. None when no rank recorded an out-of-memory."""
    from ..records import write_record

    recs: dict[int, dict[str, Any]] = {}
    for f in Path(rank_dir).glob("rank*.json"):
        try:
            rank = int(f.name[4:-5])
            recs[rank] = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
    ooms = sorted(r for r, rec in recs.items() if rec.get("outcome") == "oom")
    if not ooms:
        return None
    base = dict(recs[0] if 0 in recs else recs[min(recs)])
    first = recs[ooms[0]]
    world = int((base.get("distributed") or {}).get("world_size") or 0)
    base["outcome"] = "oom"
    base.pop("timing", None)
    base["oom"] = {**(first.get("oom") or {}), "rank": ooms[0], "ranks": ooms}
    mem = dict(base.get("memory") or {})
    mem.pop("peak_allocated_bytes", None)  # an OOM record has the peak before the OOM, per rank
    per = [((recs.get(r) or {}).get("memory") or {}) for r in range(world)]
    mem["per_rank_peak_before_oom_bytes"] = [m.get("peak_before_oom_bytes", m.get("peak_allocated_bytes")) for m in per]
    if "peak_before_oom_bytes" not in mem:
        mem["peak_before_oom_bytes"] = (first.get("memory") or {}).get("peak_before_oom_bytes")
    base["memory"] = {k: v for k, v in mem.items() if v is not None}
    base["notes"] = list(base.get("notes") or []) + [
        f"out of memory on rank(s) {', '.join(map(str, ooms))} of {world}; ranks still running were ended by torchrun; "
        "record written by the launcher from the ranks' own records"]
    path = write_record(out_path, base)
    return {"outcome": "oom", "path": str(path), "phase": base["oom"].get("phase"),
            "capacity_bytes": base["memory"].get("capacity_bytes"), "ranks": ooms}
