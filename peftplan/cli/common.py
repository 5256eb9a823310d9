"""What the `peftplan` subcommands share: the one-line error exit, the guard that turns the core's user
errors into it, the help texts and the parsing of training flags, method options and lists.

Every command catches the core's user errors (ValueError subclasses: unknown names, bad sizes,
options that do not apply) and prints one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import typer

from ..methods import method_names


def _fail(message: str) -> None:
    sys.stderr.write(f"peftplan: error: {message}\n")
    raise typer.Exit(code=2)


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except typer.Exit:
        raise
    except (ValueError, KeyError, OSError) as exc:  # the core's user errors are ValueError subclasses
        _fail(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)


METHOD_HELP = "fine-tuning method: " + ", ".join(method_names())
ALLOC_CONF_HELP = ("the run's PYTORCH_CUDA_ALLOC_CONF, e.g. 'expandable_segments:True,max_split_size_mb:128' "
                   "(default: torch's defaults); the caching allocator is replayed with it for peak reserved")


def _trainer_help() -> str:
    from ..trainers import CLI_DEFAULT_TRAINER, registry

    parts = [f"{s.name} ({s.label}: {s.summary}; defaults: {s.defaults_line()})" for s in registry().values()]
    return f"who runs the step (default {CLI_DEFAULT_TRAINER}, what the HF docs teach for SFT): " + "; ".join(parts)


TRAINER_HELP = _trainer_help()


# Options that several commands take with the same meaning and help (typer copies an option's settings
# into each command it builds, so one object serves all of them).
ADAPTER_KIND_OPTION = typer.Option(None, "--adapter-kind", help="adapter: houlsby (default), pfeiffer, parallel")
ADAPTER_SIZE_OPTION = typer.Option(None, "--adapter-size", help="adapter: bottleneck width (default 64)")
ALLOC_CONF_OPTION = typer.Option(None, "--alloc-conf", help=ALLOC_CONF_HELP)
ALPHA_OPTION = typer.Option(None, "--alpha", help="lora_alpha (peft default 8)")
AS_JSON_OPTION = typer.Option(False, "--json", help="print one JSON object")
DOUBLE_QUANT_OPTION = typer.Option(None, "--double-quant/--no-double-quant", help="qlora: quantize the absmax constants (default on)")
DROPOUT_OPTION = typer.Option(None, "--dropout", help="lora_dropout (peft default 0.0)")
GPU_OPTION = typer.Option("a100-80g", "--gpu", "-g", help="GPU from `peftplan gpus`")
GRAD_ACCUM_OPTION = typer.Option(None, "--grad-accum", help="gradient accumulation steps (HF default 1)")
KBIT_PREP_OPTION = typer.Option(None, "--kbit-prep/--no-kbit-prep", help="qlora: peft.prepare_model_for_kbit_training (default on)")
METHOD_OPTION = typer.Option(None, "--method", help=METHOD_HELP + " (default lora)")
OPTIMIZER_OPTION = typer.Option(None, "--optimizer", help="adamw (default), adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, sgd-momentum, adafactor, lion")
OPTIMIZER_IMPL_OPTION = typer.Option(None, "--optimizer-impl", help="fused (default), foreach, for-loop")
LIGER_OPTION = typer.Option(None, "--liger", help="hf / llamafactory: Liger kernels (use_liger_kernel: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE); trl: the layer kernels only; modelled from source")
ACTIVATION_OFFLOADING_OPTION = typer.Option(None, "--activation-offloading", help="trl: SFTConfig.activation_offloading (saved activations in host memory), modelled from source")
PACKING_OPTION = typer.Option(None, "--packing", help="trl: SFTConfig.packing (same per-step shapes)")
PADDING_FREE_OPTION = typer.Option(None, "--padding-free", help="trl: SFTConfig.padding_free (same tokens per step)")
QUANT_OPTION = typer.Option(None, "--quant", help="qlora base: nf4 (default), fp4, int8")
RANK_OPTION = typer.Option(None, "--rank", "-r", help="LoRA rank r (peft default 8)")
TRAINER_OPTION = typer.Option(None, "--trainer", "-t", help=TRAINER_HELP)


def _training(gpu_bf16: bool, batch: int | None, seq: int | None, grad_accum: int | None, grad_ckpt: bool | None,
              attn: str | None, precision: str | None, optimizer: str | None, optimizer_impl: str | None,
              n_gpus: int | None = None, shard: str | None = None, offload: str | None = None,
              base: dict[str, Any] | None = None, trainer: str | None = None,
              trainer_options: tuple[str, ...] = (), alloc_conf: str | None = None):  # type: ignore[no-untyped-def]
    """A Training from the command line; flags not given fall back to `base` (a run config), then to the
    trainer's defaults (peftplan/trainers/), then to peftplan's."""
    from ..trainers import CLI_DEFAULT_TRAINER, get_trainer
    from ..training import Training, TrainingError

    given = {"micro_batch": batch, "seq_len": seq, "grad_accum": grad_accum, "grad_ckpt": grad_ckpt,
             "attention": attn, "precision": precision, "optimizer": optimizer, "optimizer_impl": optimizer_impl,
             "n_gpus": n_gpus, "shard": shard, "offload": offload, "alloc_conf": alloc_conf}
    fields = dict(base or {})
    if fields.get("shard", "none") != "none" and shard is None and (n_gpus or fields.get("n_gpus", 1)) == 1:
        fields.pop("shard")  # a run config's sharding without --gpus N: one GPU (the run config's notes say so)
        fields.pop("offload", None)
    fields.update({k: v for k, v in given.items() if v is not None})
    spec = get_trainer(trainer or fields.get("trainer") or CLI_DEFAULT_TRAINER)
    switches = tuple(dict.fromkeys((*fields.get("trainer_options", ()), *trainer_options)))
    spec.check_options(switches)
    fields = spec.apply_defaults(fields)
    fields["trainer"] = spec.name
    fields["trainer_options"] = switches
    if fields.get("precision") is None:
        fields["precision"] = "bf16-mixed" if gpu_bf16 else "fp16-mixed"
    elif str(fields["precision"]).startswith("bf16") and not gpu_bf16:
        raise TrainingError("this GPU has no bf16 support: use --precision fp16-mixed (or fp16, fp32)")
    if fields.get("n_gpus", 1) > 1 and fields.get("shard", "none") == "none":
        fields["shard"] = "ddp"  # several GPUs without a sharding choice: plain data parallel
    known = {f for f in Training.__dataclass_fields__}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TrainingError(f"unknown training field(s): {', '.join(unknown)}")
    return Training(**fields)


def _trainer_options(**flags: bool | None) -> tuple[str, ...]:
    """Trainer switches the user turned on (`--packing` -> "packing")."""
    return tuple(name for name, on in flags.items() if on)


def _method_options(**given: Any) -> dict[str, Any]:
    """Only the options the user actually set (None = not given), so inapplicable ones can be refused."""
    return {k: v for k, v in given.items() if v is not None}


def _split(text: str | None, what: str) -> list[str]:
    """A comma-separated list (blank items dropped), or an error naming the flag."""
    if text is None:
        return []
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        _fail(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def _ints(text: str | None, what: str) -> list[int]:
    out = []
    for item in _split(text, what):
        try:
            value = int(item.replace("_", ""))
        except ValueError:
            value = 0
        if value <= 0:
            _fail(f"{what}: {item!r} is not a positive integer")
        out.append(value)
    return out


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str, what: str = "--tokens") -> int:
    """A positive count: 100000000, 1e8, 1.5e9, 100M, 2B (k/M/B/T = 1e3/1e6/1e9/1e12)."""
    m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text or "")
    if not m:
        raise ValueError(f"{what}: cannot read {text!r} as a number of tokens (e.g. 1e8, 100M, 2B)")
    value = float(m.group(1).replace("_", "")) * _SUFFIX[m.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{what}: must be at least 1, got {text!r}")
    return int(round(value))


def _output_path(path: str | None, force: bool, flag: str) -> Path | None:
    """Refuse to overwrite an existing file without --force (checked before any work)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        _fail(f"{flag} {path}: is a directory, give a file name")
    if p.exists() and not force:
        _fail(f"{flag} {path}: file exists (use --force to overwrite)")
    return p
