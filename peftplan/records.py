"""Measured records: one JSON file per run (a CPU trace or a GPU profile), validated on load.

A record holds the full configuration of the run (the model's config.json, method, method options,
training setup, GPU), so the engine can re-predict it later, plus what was measured. It is written
atomically (a temporary file in the same directory, then `os.replace`), so a half-written record can
never appear, and never over an existing file unless the caller asks for it.

Schema (version 1), the fields `check` reads; writers may add more (events, env, notes):

    schema_version   1
    kind             "cpu-trace" | "gpu-profile"
    model            {"name": str, "config": {HF config.json}}
    method           str (a registered method)
    options          {method option: value}
    training         {Training field: value}
    params           {"total": int, "trainable": int}
    outcome          "ok" (default when absent) | "oom"
    memory           {"peak_allocated_bytes": int, "peak_reserved_bytes": int (GPU only),
                      "capacity_bytes": int (GPU only), "components": {category: bytes}, "peak_phase": str}
    timing           {"step_time_s_median": float} (GPU only, optional)
    gpu              {"name": str, "memory_bytes": int, "catalog_name": str | null} (GPU only)

No torch and no pandas here: `check` runs in the CLI's fast path.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

SCHEMA_VERSION = 1
KINDS = ("cpu-trace", "gpu-profile")
Kind = Literal["cpu-trace", "gpu-profile"]


class RecordError(ValueError):
    """A record file that cannot be trusted: names the file and the field."""


@dataclass(frozen=True)
class Record:
    """One measured run, validated. Bytes are integers; times in seconds."""

    path: str
    kind: Kind
    model_name: str
    config: Mapping[str, Any]
    method: str
    options: Mapping[str, Any]
    training: Mapping[str, Any]
    outcome: Literal["ok", "oom"]
    params_total: int | None
    params_trainable: int | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None = None
    capacity_bytes: int | None = None
    step_time_s: float | None = None
    gpu_name: str | None = None
    gpu_catalog_name: str | None = None
    peak_phase: str | None = None
    components: Mapping[str, int] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        """Short human description: model/method b×s, where it ran."""
        t = self.training
        where = self.gpu_name or "cpu"
        return f"{self.model_name} {self.method} b{t.get('micro_batch')} s{t.get('seq_len')} on {where}"


def _get(data: Mapping[str, Any], dotted: str, path: str, types: type | tuple[type, ...], *,
         required: bool = True) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            if required:
                raise RecordError(f"{path}: missing field '{dotted}'")
            return None
        cur = cur[part]
    if cur is None and not required:
        return None
    if isinstance(cur, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecordError(f"{path}: field '{dotted}' must be {_type_name(types)}, got {cur!r}")
    if not isinstance(cur, types):
        raise RecordError(f"{path}: field '{dotted}' must be {_type_name(types)}, got {type(cur).__name__}")
    return cur


def _type_name(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in ts)


def _non_negative(value: int | None, dotted: str, path: str) -> int | None:
    if value is not None and value < 0:
        raise RecordError(f"{path}: field '{dotted}' must be >= 0, got {value}")
    return value


def parse_record(data: Any, path: str = "<record>") -> Record:
    """Validate a decoded record; raise RecordError naming `path` and the offending field."""
    if not isinstance(data, Mapping):
        raise RecordError(f"{path}: a record must be a JSON object")
    version = _get(data, "schema_version", path, int)
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: field 'schema_version' is {version}, this peftplan reads {SCHEMA_VERSION}")
    kind = _get(data, "kind", path, str)
    if kind not in KINDS:
        raise RecordError(f"{path}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    outcome = _get(data, "outcome", path, str, required=False) or "ok"
    if outcome not in ("ok", "oom"):
        raise RecordError(f"{path}: field 'outcome' must be 'ok' or 'oom', got {outcome!r}")
    model_name = _get(data, "model.name", path, str)
    config = _get(data, "model.config", path, dict)
    if "model_type" not in config:
        raise RecordError(f"{path}: field 'model.config' has no 'model_type'")
    method = _get(data, "method", path, str)
    options = _get(data, "options", path, dict)
    training = _get(data, "training", path, dict)
    for key in ("micro_batch", "seq_len"):
        _get(data, f"training.{key}", path, int)
    ok = outcome == "ok"
    peak = _non_negative(_get(data, "memory.peak_allocated_bytes", path, int, required=ok),
                         "memory.peak_allocated_bytes", path)
    reserved = _non_negative(_get(data, "memory.peak_reserved_bytes", path, int, required=False),
                             "memory.peak_reserved_bytes", path)
    capacity = _non_negative(_get(data, "memory.capacity_bytes", path, int, required=kind == "gpu-profile"),
                             "memory.capacity_bytes", path)
    components = _get(data, "memory.components", path, dict, required=False) or {}
    for name, value in components.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{path}: field 'memory.components.{name}' must be int")
    step_time = _get(data, "timing.step_time_s_median", path, (int, float), required=False)
    gpu_name = _get(data, "gpu.name", path, str, required=kind == "gpu-profile")
    gpu_catalog = _get(data, "gpu.catalog_name", path, str, required=False)
    total = _get(data, "params.total", path, int, required=ok)
    trainable = _get(data, "params.trainable", path, int, required=ok)
    return Record(
        path=path, kind=kind, model_name=model_name, config=config, method=method, options=options,
        training=training, outcome=outcome, params_total=total, params_trainable=trainable,  # type: ignore[arg-type]
        peak_allocated_bytes=peak, peak_reserved_bytes=reserved, capacity_bytes=capacity,
        step_time_s=float(step_time) if step_time is not None else None, gpu_name=gpu_name,
        gpu_catalog_name=gpu_catalog, peak_phase=_phase_name(_get(data, "memory.peak_phase", path, (str, dict),
                                                                     required=False)),
        components=components, raw=data,
    )


def _phase_name(value: Any) -> str | None:
    """`memory.peak_phase` as a string: the tracer writes {"phase": ..., "step": ..., "op": ...}."""
    if isinstance(value, Mapping):
        return str(value.get("phase")) if value.get("phase") is not None else None
    return value


def load_record(path: str | os.PathLike[str]) -> Record:
    """Read and validate one record file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return parse_record(data, str(p))


def iter_record_paths(paths: list[str | os.PathLike[str]]) -> Iterator[Path]:
    """Every *.json under the given files/directories, sorted, skipping hidden and temp files."""
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise RecordError(f"{p}: no such file or directory")
        if p.is_file():
            yield p
            continue
        for f in sorted(p.rglob("*.json")):
            if not any(part.startswith(".") for part in f.relative_to(p).parts):
                yield f


def write_record(path: str | os.PathLike[str], data: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Validate `data`, then write it atomically to `path` (directories created).

    Refuses to replace an existing file unless `overwrite`; with `overwrite=False` the final
    `os.link` is atomic too, so two writers racing for the same name cannot both win.
    """
    p = Path(path)
    parse_record(dict(data), str(p))  # never write what we could not read back
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() and not overwrite:
        raise RecordError(f"{p}: exists; refusing to overwrite a measured record")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if p appeared meanwhile
            except FileExistsError:
                raise RecordError(f"{p}: exists; refusing to overwrite a measured record") from None
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def unique_path(directory: str | os.PathLike[str], stem: str) -> Path:
    """`directory/stem.json`, or `stem-2.json`, `stem-3.json`, ... if taken (never overwrite)."""
    d = Path(directory)
    candidate = d / f"{stem}.json"
    n = 2
    while candidate.exists():
        candidate = d / f"{stem}-{n}.json"
        n += 1
    return candidate
