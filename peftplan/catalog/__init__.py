"""The bundled catalogs: model config.json files and GPUs, validated on load.

`models/index.json` maps short names (and hub-id aliases) to the real HF config.json files beside
it; `gpus.json` lists GPUs with their sources. Both are read with the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..arch import ArchError, ModelArch, from_hf_config
from ..suggest import did_you_mean


class CatalogError(ValueError):
    """Unknown name or malformed catalog/config file (one line, for the user)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str
    hub_id: str
    aliases: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class GPU:
    """A GPU: capacity in bytes, dense peak throughput per dtype in FLOP/s, bandwidth in bytes/s."""

    name: str
    full_name: str
    memory_bytes: int
    bf16_supported: bool
    peak_flops: Mapping[str, float]  # dtype name -> dense FLOP/s
    memory_bandwidth_bytes_per_s: int
    architecture: str
    compute_capability: str
    price_per_hour_usd: float | None
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def peak_for(self, dtype_name: str) -> float:
        """Dense FLOP/s for matmuls in `dtype_name` (fp32 matmuls use TF32 where the GPU has it,
        as PyTorch does only when allowed; peftplan assumes plain fp32)."""
        if dtype_name in self.peak_flops:
            return self.peak_flops[dtype_name]
        if dtype_name == "bf16" and "fp16" in self.peak_flops and self.bf16_supported:
            return self.peak_flops["fp16"]
        return self.peak_flops.get("fp32", 0.0)


def custom_gpu(memory_bytes: int, base: GPU | None = None) -> GPU:
    """A GPU given only by its capacity (--gpu-memory); throughput from `base` if any."""
    if base is None:
        return GPU(name="custom", full_name="custom GPU", memory_bytes=memory_bytes, bf16_supported=True,
                   peak_flops={}, memory_bandwidth_bytes_per_s=0, architecture="unknown",
                   compute_capability="", price_per_hour_usd=None)
    return GPU(**{**base.__dict__, "name": f"{base.name}@{memory_bytes}", "memory_bytes": memory_bytes})


def _data_dir() -> Path:
    return Path(str(resources.files(__package__)))


@lru_cache(maxsize=1)
def model_index() -> dict[str, ModelEntry]:
    path = _data_dir() / "models" / "index.json"
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: expected a JSON object of models")
    out: dict[str, ModelEntry] = {}
    for name, entry in raw.items():
        try:
            out[name] = ModelEntry(name=name, file=entry["file"], hub_id=entry["hub_id"],
                                   aliases=tuple(entry.get("aliases", ())), source=entry.get("source", ""))
        except (KeyError, TypeError) as exc:
            raise CatalogError(f"{path}: model {name!r} lacks field {exc}") from None
    return out


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for name, entry in model_index().items():
        table[name.lower()] = name
        table[entry.hub_id.lower()] = name
        for alias in entry.aliases:
            table[alias.lower()] = name
    return table


def model_names() -> tuple[str, ...]:
    return tuple(sorted(model_index()))


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"no such file: {path}") from None
    except OSError as exc:
        raise CatalogError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def resolve_model_name(name: str) -> str | None:
    """Catalog short name for a short name or hub id (case-insensitive), or None."""
    return _aliases().get(name.strip().lower())


def load_config(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(display name, config dict) for a catalog name, hub-id alias, or a path to a config.json."""
    short = resolve_model_name(name_or_path)
    if short is not None:
        entry = model_index()[short]
        return short, _read_json(_data_dir() / "models" / entry.file)
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if path.is_dir():
            path = path / "config.json"
        cfg = _read_json(path)
        if not isinstance(cfg, dict):
            raise CatalogError(f"{path}: a config.json must hold a JSON object")
        return path.stem if path.name != "config.json" else path.parent.name or "model", cfg
    if "/" in name_or_path:
        from ..hub import fetch_config, looks_like_hub_id

        if looks_like_hub_id(name_or_path):  # org/name not in the catalog: its config.json from the hub or cache
            cfg = fetch_config(name_or_path)
            return name_or_path.rsplit("/", 1)[-1], cfg
    raise CatalogError(f"unknown model {name_or_path!r}{did_you_mean(name_or_path, model_index())}; "
                       "or pass a path to a config.json or an HF hub id (org/name)")


def load_model(name_or_path: str) -> ModelArch:
    """The architecture of a catalog model or of a config.json on disk."""
    name, cfg = load_config(name_or_path)
    try:
        return from_hf_config(cfg, name=name)
    except ArchError as exc:  # no explicit family: transformers' own class, read by the harness (peftplan/generic.py)
        from ..generic import generic_arch_or_raise

        return generic_arch_or_raise(cfg, name, exc)
    except (TypeError, ValueError, KeyError) as exc:
        raise ArchError(f"{name}: malformed config.json ({exc})") from None


@lru_cache(maxsize=1)
def gpu_catalog() -> dict[str, GPU]:
    path = _data_dir() / "gpus.json"
    raw = _read_json(path)
    if not isinstance(raw, list):
        raise CatalogError(f"{path}: expected a JSON list of GPUs")
    out: dict[str, GPU] = {}
    for i, item in enumerate(raw):
        try:
            tflops = item["peak_dense_tflops"] or {}
            gpu = GPU(
                name=item["name"], full_name=item["full_name"], memory_bytes=int(item["memory_bytes"]),
                bf16_supported=bool(item["bf16_supported"]),
                peak_flops={k: float(v) * 1e12 for k, v in tflops.items() if v is not None},
                memory_bandwidth_bytes_per_s=int(item.get("memory_bandwidth_bytes_per_s") or 0),
                architecture=item.get("architecture") or "", compute_capability=str(item.get("compute_capability") or ""),
                price_per_hour_usd=item.get("typical_price_per_hour_usd"),
                aliases=tuple(item.get("aliases") or ()), sources=tuple(item.get("sources") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"{path}: GPU entry {i} is malformed ({exc})") from None
        if gpu.memory_bytes <= 0:
            raise CatalogError(f"{path}: GPU {gpu.name!r} has no memory size")
        out[gpu.name] = gpu
    return out


def load_gpu(name: str) -> GPU:
    catalog = gpu_catalog()
    key = name.strip().lower()
    for gpu in catalog.values():
        if key == gpu.name or key in (a.lower() for a in gpu.aliases):
            return gpu
    raise CatalogError(f"unknown GPU {name!r}{did_you_mean(key, catalog)}")
