"""The sweep file: read it, validate it and expand it into `RunConfig`s, each with the engine's prediction
or the reason the engine refuses it (`load_sweep`).

A sweep file (YAML or JSON; bundled ones in `peftplan/sweeps/`, e.g. `default`, `smoke`):

    name: default
    warmup: 2                     # steps run before timing (default 2)
    steps: 3                      # timed steps (default 3)
    defaults: {micro_batch: 1, seq_len: 2048}     # Training fields for every entry
    configs:                      # optional: config.json dicts by name (else catalog names / paths)
      tiny-llama: {model_type: llama, hidden_size: 64, ...}
    entries:                      # run in this order: put the most informative first
      - name: core methods
        models: [llama3.2-1b]     # catalog name, hub alias, a name under `configs`, or a config.json path
        methods: [full, lora, {method: qlora, options: {double_quant: false}, label: qlora-nodq}]
        options: {}               # method options for every method of the entry (each must accept them)
        batch: [1]                # the axes (scalar or list): batch, seq, grad_ckpt, attention,
        seq: [512, 2048]          #   optimizer, precision, gpus, shard; their product is run
        training: {optimizer_impl: foreach}   # other Training fields for this entry

Every configuration is validated up front (one-line `SweepError` naming the file and entry); one that
the engine refuses as a combination (BitFit on a model without biases, prefix tuning with gradient
checkpointing, ...) is skipped with the engine's reason. Configs whose config.json has `auto_map`
(custom modelling code) are refused: peftplan never runs remote code. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .. import __version__

AXES = {"batch": "micro_batch", "seq": "seq_len", "grad_ckpt": "grad_ckpt", "attention": "attention",
        "optimizer": "optimizer", "precision": "precision", "gpus": "n_gpus", "shard": "shard"}
TORCHRUN_SHARDS = ("fsdp-full", "fsdp-grad-op", "fsdp-hybrid")  # what the profiler launches under torchrun
ENTRY_KEYS = {"name", "models", "methods", "options", "training", *AXES}
TOP_KEYS = {"name", "description", "warmup", "steps", "defaults", "configs", "entries"}
METHOD_KEYS = {"method", "options", "label"}
CUDA_ONLY_OPTIMIZERS = ("adamw-8bit", "paged-adamw", "paged-adamw-8bit", "lion")
# Planning: a child's fixed cost (interpreter, torch/transformers/peft imports, CUDA context) and the
# rate at which it creates and randomly initialises weights on the GPU. Rough; the dry run says so.
CHILD_OVERHEAD_S = 12.0
LOAD_BYTES_PER_S = 20e9


class SweepError(ValueError):
    """A sweep file that cannot be run: one line naming the file, the entry and the field."""


@dataclass
class RunConfig:
    """One configuration of a sweep, validated (pure data; what the child process gets)."""

    index: int
    entry: str
    label: str
    model_name: str
    config: dict[str, Any]
    method: str
    method_label: str
    options: dict[str, Any]
    training: dict[str, Any]
    skip_reason: str | None = None
    prediction: dict[str, Any] = field(default_factory=dict)
    estimated_s: float | None = None

    @property
    def stem(self) -> str:
        t = self.training
        parts = [self.model_name, self.method_label, f"b{t['micro_batch']}", f"s{t['seq_len']}", t["precision"],
                 t["attention"]]
        if t.get("grad_ckpt"):
            parts.append("gc")
        if t["optimizer"] != "adamw" or t.get("optimizer_impl", "fused") != "fused":
            parts.append(f"{t['optimizer']}-{t.get('optimizer_impl', 'fused')}")
        if t.get("grad_accum", 1) != 1:
            parts.append(f"ga{t['grad_accum']}")
        if t.get("n_gpus", 1) > 1:
            parts.append(f"{t['shard']}-x{t['n_gpus']}")
        if t.get("trainer", "hf") != "hf":
            parts.append(str(t["trainer"]))
        if t.get("alloc_conf"):  # PYTORCH_CUDA_ALLOC_CONF of the run (sweep.py passes it to the child)
            parts.append(str(t["alloc_conf"]))
        return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(str(p) for p in parts)).strip("-")

    def key(self, device: str, capacity_bytes: int | None = None) -> str:
        """What was measured, canonically: equal keys mean the same measurement (for --resume)."""
        blob = json.dumps({"model": self.model_name, "config": self.config, "method": self.method,
                           "options": self.options, "training": self.training, "device": device,
                           "capacity_bytes": capacity_bytes}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Sweep:
    name: str
    path: str
    warmup: int
    steps: int
    configs: list[RunConfig]
    description: str = ""

    @property
    def runnable(self) -> list[RunConfig]:
        return [c for c in self.configs if c.skip_reason is None]


# ---- loading and validation ------------------------------------------------------------------


def bundled_sweeps() -> list[str]:
    d = Path(str(resources.files("peftplan"))) / "sweeps"
    return sorted(p.stem for p in d.glob("*.y*ml")) + sorted(p.stem for p in d.glob("*.json"))


def resolve_sweep_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    d = Path(str(resources.files("peftplan"))) / "sweeps"
    for ext in (".yaml", ".yml", ".json"):
        if (d / f"{name_or_path}{ext}").exists():
            return d / f"{name_or_path}{ext}"
    raise SweepError(f"no sweep file {name_or_path!r} (bundled: {', '.join(bundled_sweeps())}; or give a path)")


def read_sweep_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SweepError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    try:
        import yaml
    except ImportError:
        raise SweepError(f"{path}: reading YAML needs pyyaml (pip install 'peftplan[harness]'), or use a .json sweep") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SweepError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def refuse_remote_code(config: Mapping[str, Any], name: str) -> None:
    """A config.json with `auto_map` needs the model repository's own Python code: never run it."""
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise SweepError(f"model {name!r}: its config.json has auto_map (custom modelling code that needs "
                         "trust_remote_code); peftplan never runs remote code")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_sweep(name_or_path: str, *, gpu: str = "h100", device: str = "cuda",
               warmup: int | None = None, steps: int | None = None,
               training_overrides: Mapping[str, Any] | None = None) -> Sweep:
    """Read, validate and expand a sweep; each config carries the engine's prediction (on `gpu`) or
    the reason the engine refuses it. `training_overrides` (e.g. {"n_gpus": 2, "shard": "fsdp-full"}
    from `--torchrun 2`) replace those Training fields in every configuration."""
    path = resolve_sweep_path(name_or_path)
    data = read_sweep_file(path)
    where = str(path)
    if not isinstance(data, dict):
        raise SweepError(f"{where}: a sweep must be a mapping with 'entries'")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown top-level key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    w = warmup if warmup is not None else data.get("warmup", 2)
    s = steps if steps is not None else data.get("steps", 3)
    for key, value, low in (("warmup", w, 0), ("steps", s, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SweepError(f"{where}: '{key}' must be an integer >= {low}, got {value!r}")
    inline = data.get("configs") or {}
    if not isinstance(inline, dict) or not all(isinstance(v, dict) for v in inline.values()):
        raise SweepError(f"{where}: 'configs' must map names to config.json objects")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise SweepError(f"{where}: 'defaults' must be a mapping of Training fields")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise SweepError(f"{where}: 'entries' must be a non-empty list")
    from ..catalog import load_gpu

    try:
        gpu_obj = load_gpu(gpu)
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    configs: list[RunConfig] = []
    model_cache: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, entry in enumerate(entries):
        configs.extend(_expand_entry(entry, i, where, path.parent, inline, defaults, model_cache, len(configs),
                                     device, gpu_obj, w + s, dict(training_overrides or {})))
    return Sweep(name=str(data.get("name") or path.stem), path=where, warmup=w, steps=s, configs=configs,
                 description=str(data.get("description") or ""))


def _model(ref: Any, ctx: str, base_dir: Path, inline: dict[str, Any],
           cache: dict[str, tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    from ..arch import from_hf_config
    from ..catalog import load_config

    if not isinstance(ref, str) or not ref:
        raise SweepError(f"{ctx}: a model must be a name or a path, got {ref!r}")
    if ref in cache:
        return cache[ref]
    if ref in inline:
        name, cfg = ref, dict(inline[ref])
    else:
        from ..catalog import resolve_model_name

        local = base_dir / ref
        target = str(local) if local.suffix == ".json" and local.exists() else ref
        if resolve_model_name(ref) is None and not Path(target).exists():
            raise SweepError(f"{ctx}: model {ref!r} is neither in the catalog, nor under 'configs', nor a config.json "
                             "path (the profiler downloads nothing)")
        try:
            name, cfg = load_config(target)
        except ValueError as exc:
            raise SweepError(f"{ctx}: {str(exc).splitlines()[0]}") from None
    try:
        refuse_remote_code(cfg, name)
        from_hf_config(cfg, name)
    except ValueError as exc:
        raise SweepError(f"{ctx}: {str(exc).splitlines()[0]}") from None
    cache[ref] = (name, cfg)
    return name, cfg


def _methods(value: Any, ctx: str, shared_options: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    from ..methods import get_method, method_names

    out = []
    for j, item in enumerate(_as_list(value)):
        mctx = f"{ctx}: methods[{j}]"
        if isinstance(item, str):
            method, options, label = item, {}, None
        elif isinstance(item, dict):
            unknown = sorted(set(item) - METHOD_KEYS)
            if unknown:
                raise SweepError(f"{mctx}: unknown key {unknown[0]!r} (known: {', '.join(sorted(METHOD_KEYS))})")
            method, options, label = item.get("method"), item.get("options") or {}, item.get("label")
            if not isinstance(options, dict):
                raise SweepError(f"{mctx}: 'options' must be a mapping")
        else:
            raise SweepError(f"{mctx}: a method must be a name or a mapping with 'method', got {item!r}")
        if method not in method_names():
            raise SweepError(f"{mctx}: unknown method {method!r} (known: {', '.join(method_names())})")
        opts = {**shared_options, **options}
        try:
            spec = get_method(method)
            coerced = spec.make_options(dict(opts))
        except (ValueError, TypeError) as exc:
            raise SweepError(f"{mctx} ({method}): {str(exc).splitlines()[0]}") from None
        full = {f.name: getattr(coerced, f.name) for f in dataclasses.fields(coerced)}
        out.append((method, str(label or method), full, opts))
    return out


def _expand_entry(entry: Any, i: int, where: str, base_dir: Path, inline: dict[str, Any], defaults: dict[str, Any],
                  cache: dict[str, tuple[str, dict[str, Any]]], start: int, device: str, gpu_obj: Any,
                  n_steps: int, overrides: dict[str, Any] | None = None) -> list[RunConfig]:
    from ..training import Training

    if not isinstance(entry, dict):
        raise SweepError(f"{where}: entries[{i}] must be a mapping")
    name = str(entry.get("name") or f"entry{i}")
    ctx = f"{where}: entries[{i}] ({name})"
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise SweepError(f"{ctx}: unknown key {unknown[0]!r} (known: {', '.join(sorted(ENTRY_KEYS))})")
    for required in ("models", "methods"):
        if not entry.get(required):
            raise SweepError(f"{ctx}: needs '{required}'")
    shared = entry.get("options") or {}
    extra = entry.get("training") or {}
    if not isinstance(shared, dict) or not isinstance(extra, dict):
        raise SweepError(f"{ctx}: 'options' and 'training' must be mappings")
    models = [_model(m, ctx, base_dir, inline, cache) for m in _as_list(entry["models"])]
    methods = _methods(entry["methods"], ctx, shared)
    axes = {axis: _as_list(entry[axis]) for axis in AXES if axis in entry}
    for axis, values in axes.items():
        if not values:
            raise SweepError(f"{ctx}: '{axis}' is empty")
    combos: list[dict[str, Any]] = [{}]
    for axis, values in axes.items():
        combos = [{**c, AXES[axis]: v} for c in combos for v in values]
    known = set(Training.__dataclass_fields__)
    out: list[RunConfig] = []
    for model_name, cfg in models:
        for method, mlabel, options, given_options in methods:
            for combo in combos:
                fields = {**defaults, **extra, **combo, **(overrides or {})}
                bad = sorted(set(fields) - known)
                if bad:
                    raise SweepError(f"{ctx}: unknown training field {bad[0]!r}")
                try:
                    training = Training(**fields)
                except (ValueError, TypeError) as exc:
                    raise SweepError(f"{ctx}: {str(exc).splitlines()[0]}") from None
                rc = RunConfig(index=start + len(out), entry=name, label="", model_name=model_name, config=cfg,
                               method=method, method_label=mlabel, options=options,
                               training=dataclasses.asdict(training))
                rc.label = _label(rc)
                _predict(rc, training, given_options, device, gpu_obj, n_steps)
                out.append(rc)
    return out


def _label(rc: RunConfig) -> str:
    t = rc.training
    bits = [rc.model_name, rc.method_label, f"b{t['micro_batch']}", f"s{t['seq_len']}", t["precision"]]
    if t["attention"] != "sdpa":
        bits.append(t["attention"])
    if t["grad_ckpt"]:
        bits.append("ckpt")
    if t["optimizer"] != "adamw" or t["optimizer_impl"] != "fused":
        bits.append(f"{t['optimizer']}/{t['optimizer_impl']}")
    if t["grad_accum"] != 1:
        bits.append(f"ga{t['grad_accum']}")
    if t.get("n_gpus", 1) > 1:
        bits.append(f"{t['shard']} x{t['n_gpus']}")
    if t.get("trainer", "hf") != "hf":
        bits.append(f"trainer {t['trainer']}")
    if t.get("alloc_conf"):
        bits.append(f"alloc {t['alloc_conf']}")
    return " ".join(str(b) for b in bits)


def _predict(rc: RunConfig, training: Any, options: dict[str, Any], device: str, gpu_obj: Any, n_steps: int) -> None:
    """The engine's prediction for this config, or the engine's reason for refusing it (skip)."""
    from ..arch import from_hf_config
    from ..estimate import estimate

    if training.n_gpus > 1 and training.shard not in TORCHRUN_SHARDS:
        rc.skip_reason = (f"--shard {training.shard}: the profiler launches FSDP2 under torchrun "
                          f"({', '.join(TORCHRUN_SHARDS)}), not DDP / DeepSpeed")
        return
    if training.n_gpus > 1 and rc.method == "qlora":
        rc.skip_reason = "QLoRA under FSDP2: fully_shard would shard bitsandbytes' packed uint8 weights (not profiled)"
        return
    if device == "cpu" and training.optimizer in CUDA_ONLY_OPTIMIZERS:
        rc.skip_reason = f"optimizer {training.optimizer} runs its update on CUDA only (profile it on a GPU)"
        return
    try:
        est = estimate(from_hf_config(rc.config, rc.model_name), rc.method, training, gpu_obj, options)
    except ValueError as exc:
        rc.skip_reason = str(exc).splitlines()[0]
        return
    m = est.memory
    rc.prediction = {"peak_allocated_bytes": m.peak_allocated_bytes, "peak_reserved_bytes": m.peak_reserved_bytes,
                     "device_total_bytes": m.device_total_bytes, "peak_phase": m.peak_phase,
                     "phase_peaks": dict(m.phase_peaks), "step_time_s": est.compute.step_time_s,
                     "flops_per_step": est.compute.flops_per_step, "gpu": gpu_obj.name,
                     "params_total": est.params.total, "params_trainable": est.params.trainable,
                     "peftplan": __version__}
    weight_bytes = m.weights_bytes + m.quant_constants_bytes
    step = est.compute.step_time_s or 0.0
    rc.estimated_s = CHILD_OVERHEAD_S + weight_bytes / LOAD_BYTES_PER_S + n_steps * step * 1.5
