"""The common ground of every run-config reader: the `RunConfig` result, its error, file parsing, and the `_Reader`
that consumes one file's keys so that each ends up either mapped (`read`) or `ignored` with a reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .shared import _generic_reason

FORMATS = ("axolotl", "peft", "training-args", "trl-sftconfig", "llamafactory")


class RunConfigError(ValueError):
    """A run config that cannot be read (one line, naming the file and, where relevant, the key)."""


@dataclass(frozen=True)
class RunConfig:
    """What a run config says, in peftplan's terms.

    `model`: catalog short name when the base model resolves through the catalog, else the raw hub id / path.
    `method`: a peftplan method name, or None when the file does not say (peft-less training arguments).
    `options`: method option field names -> values. `training`: `Training` field names -> values.
    `ignored`: "key: reason" for every key read but not mapped.
    """

    model: str | None
    method: str | None
    options: dict[str, Any]
    training: dict[str, Any]
    ignored: tuple[str, ...]
    source_format: str
    path: str = ""
    model_id: str | None = None  # the base model exactly as the file names it
    read: tuple[str, ...] = ()  # "key: value -> field=value" for every key mapped
    notes: tuple[str, ...] = ()  # assumptions made while mapping

    def describe(self) -> list[str]:
        """Human-readable lines: what was read, what it became, what was ignored and why."""
        name = Path(self.path).name if self.path else "run config"
        lines = [f"{name}: {self.source_format} config"]
        if self.model is not None:
            via = f" (from {self.model_id})" if self.model_id and self.model_id != self.model else ""
            lines.append(f"  model: {self.model}{via}")
        lines.append(f"  method: {self.method if self.method else '(not given by the file)'}")
        if self.options:
            lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in self.options.items()))
        if self.training:
            lines.append("  training: " + ", ".join(f"{k}={v}" for k, v in self.training.items()))
        if self.read:
            lines.append(f"  read ({len(self.read)}):")
            lines.extend(f"    {r}" for r in self.read)
        if self.notes:
            lines.append(f"  assumptions ({len(self.notes)}):")
            lines.extend(f"    {n}" for n in self.notes)
        if self.ignored:
            lines.append(f"  ignored ({len(self.ignored)}):")
            lines.extend(f"    {i}" for i in self.ignored)
        return lines

    def ignored_keys(self) -> tuple[str, ...]:
        """The keys in `ignored` (without their reasons)."""
        return tuple(i.split(":", 1)[0] for i in self.ignored)



def _parse(p: Path, text: str) -> dict[str, Any]:
    suffix = p.suffix.lower()
    if suffix == ".json":
        data = _parse_json(p, text)
    elif suffix in (".yml", ".yaml"):
        data = _parse_yaml(p, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _parse_yaml(p, text)
    if data is None:
        raise RunConfigError(f"{p}: the file is empty")
    if not isinstance(data, dict):
        raise RunConfigError(f"{p}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RunConfigError(f"{p}: key {bad[0]!r} is not a string")
    return data


def _parse_json(p: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunConfigError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _parse_yaml(p: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise RunConfigError(f"{p}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunConfigError(f"{p}: not valid YAML ({problem}{where})") from None



class _Reader:
    """Consumes keys of one config; every key ends up in `read` or `ignored`."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.used: set[str] = set()
        self.mapped_keys: set[str] = set()
        self.read: list[str] = []
        self.ignored: dict[str, str] = {}
        self.notes: list[str] = []
        self.options: dict[str, Any] = {}
        self.training: dict[str, Any] = {}
        self.model: str | None = None
        self.model_id: str | None = None
        self.method: str | None = None
        self.fallback_reason: Callable[[str, Any], str] = _generic_reason

    # --- access
    def has(self, key: str) -> bool:
        return key in self.data

    def peek(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def take(self, key: str, default: Any = None) -> Any:
        if key in self.data:
            self.used.add(key)
            return self.data[key]
        return default

    def mapped(self, key: str, line: str) -> None:
        self.used.add(key)
        self.mapped_keys.add(key)
        self.read.append(f"{key}: {line}")

    def defaulted(self, key: str, line: str) -> None:
        """A key absent (or empty) whose tool default peftplan applies."""
        if key in self.data:
            self.mapped(key, f"(not set) {line}")
        else:
            self.read.append(f"{key}: (not set) {line}")

    def ignore(self, key: str, reason: str) -> None:
        self.used.add(key)
        self.ignored[key] = reason

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def error(self, key: str, message: str) -> RunConfigError:
        return RunConfigError(f"{self.path}: {key} {message}")

    # --- typed values
    def positive_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(key, f"must be a positive integer, got {value!r}")
        return value

    def number(self, key: str, value: Any) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        return value

    def dropout(self, key: str, value: Any) -> float:
        v = self.number(key, value)
        if not 0.0 <= v < 1.0:
            raise self.error(key, f"must be in [0, 1), got {value!r}")
        return float(v)

    def flag(self, key: str, value: Any) -> bool:
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise self.error(key, f"must be true or false, got {value!r}")

    # --- shared mappings
    def set_model(self, key: str, raw: Any) -> None:
        if raw is None or raw == "":
            self.ignore(key, "not set")
            return
        if not isinstance(raw, str):
            raise self.error(key, f"must be a model id or path, got {raw!r}")
        from ..catalog import resolve_model_name

        short = resolve_model_name(raw)
        self.model_id = raw
        self.model = short or raw
        where = f"catalog model {short}" if short else "not in the catalog (a hub id or path)"
        self.mapped(key, f"{raw} -> model={self.model} ({where})")

    def set_targets(self, key: str, value: Any) -> str | None:
        """peft target_modules (list, or a string that peft treats as a regex, or 'all-linear')."""
        if value is None or value == [] or value == "":
            return None
        if isinstance(value, str):
            if value == "all-linear":
                return "all-linear"
            self.ignore(key, f"{value!r} is a regular expression to peft (re.fullmatch on module paths): "
                             "not modelled, peft's per-model default targets used instead; pass --targets")
            return None
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = list(dict.fromkeys(value))
            if names == ["all-linear"]:
                return "all-linear"
            return ",".join(names)
        raise self.error(key, f"must be a list of module names or 'all-linear', got {value!r}")

    def finish(self, fmt: str) -> RunConfig:
        for key, value in self.data.items():
            if key in self.ignored or key in self.mapped_keys:
                continue
            if key in self.used:  # consumed into a decision without a line of its own
                self.read.append(f"{key}: {json.dumps(value, default=str)}")
            else:
                self.ignored[key] = self.fallback_reason(key, value)
        if self.method is not None:
            self._check_options()
        self._check_training()
        return RunConfig(
            model=self.model, method=self.method, options=dict(self.options), training=dict(self.training),
            ignored=tuple(f"{k}: {r}" for k, r in self.ignored.items()), source_format=fmt, path=self.path,
            model_id=self.model_id, read=tuple(self.read), notes=tuple(self.notes),
        )

    def _check_options(self) -> None:
        from ..methods import MethodError, get_method

        try:
            get_method(self.method).make_options(self.options)  # type: ignore[arg-type]
        except MethodError as exc:
            raise RunConfigError(f"{self.path}: {exc}") from None
        except TypeError as exc:  # pragma: no cover - defensive
            raise RunConfigError(f"{self.path}: options do not fit method {self.method!r} ({exc})") from None

    def _check_training(self) -> None:
        from ..training import Training, TrainingError

        try:
            Training(**self.training)
        except TrainingError as exc:
            raise RunConfigError(f"{self.path}: {exc}") from None

