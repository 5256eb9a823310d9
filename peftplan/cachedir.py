"""Where peftplan caches derived data on disk, and the fingerprint of its code that keys the caches.

`PEFTPLAN_CACHE=0` turns caching off; `PEFTPLAN_CACHE_DIR` sets the directory (else $XDG_CACHE_HOME/peftplan
or ~/.cache/peftplan). The planner's structure cache (planner/cache.py) and the trace-derived schedules of
models without an explicit family (harness/derive.py) both live here.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path


def cache_dir() -> Path | None:
    """The cache directory, or None when caching is off."""
    import os

    if os.environ.get("PEFTPLAN_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    where = os.environ.get("PEFTPLAN_CACHE_DIR")
    if where:
        return Path(where)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftplan"


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over every .py and .json file of the installed peftplan package (and the Python version): a
    cache entry written by other code is never read back."""
    import hashlib

    root = Path(__file__).resolve().parent  # the peftplan package
    h = hashlib.sha256(f"{sys.version_info[:3]} {sys.byteorder}".encode())
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".json") and f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()
