"""The disk cache of recorded structures (~/.cache/peftplan), keyed by a hash of peftplan's code and data."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..arch import ModelArch
from .encoding import _DIGIT, _NPOLY
from .replay import _Structure


# A recorded structure depends only on the model's architecture, the structure key and the code
# that simulates the step, so it is kept on disk between processes (a second `peftplan plan` for the
# model is warm), keyed by a hash of all of peftplan's source and data files: any change to the
# engine, the methods or the planner makes a new key. PEFTPLAN_CACHE=0 turns it off;
# PEFTPLAN_CACHE_DIR moves it (default $XDG_CACHE_HOME/peftplan or ~/.cache/peftplan).

def _cache_dir():  # type: ignore[no-untyped-def]
    from ..cachedir import cache_dir

    return cache_dir()


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """The package's code fingerprint (cachedir.py) salted with the replay's polynomial constants."""
    import hashlib

    from ..cachedir import code_fingerprint

    return hashlib.sha256(f"{code_fingerprint()} {_DIGIT} {_NPOLY}".encode()).hexdigest()


def _disk_path(arch: ModelArch, key: tuple[Any, ...]):  # type: ignore[no-untyped-def]
    import hashlib

    where = _cache_dir()
    if where is None:
        return None
    digest = hashlib.sha256(repr((_code_fingerprint(), arch, key)).encode()).hexdigest()
    return where / "plan" / _code_fingerprint()[:16] / f"{digest}.pickle"


def _point_class() -> type:
    from .replay_point import _PointStructure

    return _PointStructure


def _disk_load(arch: ModelArch, key: tuple[Any, ...]) -> "_Structure | None":
    import pickle

    try:
        path = _disk_path(arch, key)
        if path is None or not path.is_file():
            return None
        with open(path, "rb") as fh:
            stored_key, s = pickle.load(fh)
        if stored_key != repr((arch, key)) or not isinstance(s, (_Structure, _point_class())):
            return None
        s.arch = arch
        return s
    except Exception:  # a corrupt or foreign file: record again
        return None


def _disk_save(arch: ModelArch, key: tuple[Any, ...], s: "_Structure") -> None:
    import os
    import pickle
    import tempfile

    try:
        path = _disk_path(arch, key)
        if path is None:
            return
        if not path.parent.is_dir():  # a new code version: drop the structures of the old ones
            import shutil

            for old in path.parent.parent.glob("*"):
                if old.is_dir() and old.name != path.parent.name:
                    shutil.rmtree(old, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump((repr((arch, key)), s), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except Exception:
        pass  # read-only home, full disk: the cache is an optimisation only

