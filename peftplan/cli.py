"""The `peftplan` command: a thin typer + rich shell over the pure core.

Every command catches the core's user errors (ValueError subclasses: unknown names, bad sizes,
options that do not apply) and prints one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional, TypeVar

import typer

from .methods import method_names

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Will this fine-tuning run fit on my GPU, how long will it take, which method should I use?")

F = TypeVar("F", bound=Callable[..., Any])


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
    from .trainers import CLI_DEFAULT_TRAINER, registry

    parts = [f"{s.name} ({s.label}: {s.summary}; defaults: {s.defaults_line()})" for s in registry().values()]
    return f"who runs the step (default {CLI_DEFAULT_TRAINER}, what the HF docs teach for SFT): " + "; ".join(parts)


TRAINER_HELP = _trainer_help()


def _training(gpu_bf16: bool, batch: int | None, seq: int | None, grad_accum: int | None, grad_ckpt: bool | None,
              attn: str | None, precision: str | None, optimizer: str | None, optimizer_impl: str | None,
              n_gpus: int | None = None, shard: str | None = None, offload: str | None = None,
              base: dict[str, Any] | None = None, trainer: str | None = None,
              trainer_options: tuple[str, ...] = (), alloc_conf: str | None = None):  # type: ignore[no-untyped-def]
    """A Training from the command line; flags not given fall back to `base` (a run config), then to the
    trainer's defaults (peftplan/trainers/), then to peftplan's."""
    from .trainers import CLI_DEFAULT_TRAINER, get_trainer
    from .training import Training, TrainingError

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


@app.command()
def estimate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="catalog name (see `peftplan models`), HF hub id (org/name; catalog aliases resolve offline), or path to a config.json"),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP + " (default lora)"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="read model, method and training from an axolotl YAML, a peft adapter_config.json or a TrainingArguments/SFTConfig JSON; flags given override it"),
    gpu: str = typer.Option("a100-80g", "--gpu", "-g", help="GPU from `peftplan gpus`"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="capacity of a GPU not in the catalog, e.g. 12GiB or 16GB"),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="LoRA rank r (peft default 8)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="lora_alpha (peft default 8)"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="lora_dropout (peft default 0.0)"),
    targets: Optional[str] = typer.Option(None, "--targets", help="modules as the model names them (q_proj,v_proj; q,v for T5) or qv / attn / all-linear; default: peft's per-model list"),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="micro-batch per GPU (HF TrainingArguments default 8)"),
    seq: Optional[int] = typer.Option(None, "--seq", "-s", help="sequence length in tokens (default 1024, TRL SFTConfig.max_length)"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="gradient accumulation steps (HF default 1)"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing (HF default off; QLoRA's kbit prep turns it on)"),
    attn: Optional[str] = typer.Option(None, "--attn", help="eager, sdpa (transformers default) or flash"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16-mixed, bf16-mixed (default; fp16-mixed on GPUs without bf16), fp16, bf16 (pure half)"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw (default), adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, sgd-momentum, adafactor, lion"),
    optimizer_impl: Optional[str] = typer.Option(None, "--optimizer-impl", help="fused (HF default adamw_torch_fused), foreach, for-loop"),
    n_gpus: Optional[int] = typer.Option(None, "--gpus", help="number of GPUs (data-parallel ranks; default 1)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="with --gpus N: ddp (default), zero1, zero2, zero3, fsdp-full, fsdp-grad-op, fsdp-hybrid"),
    offload: Optional[str] = typer.Option(None, "--offload", help="with ZeRO/FSDP: none (default), optimizer, optimizer+params"),
    quant: Optional[str] = typer.Option(None, "--quant", help="qlora base: nf4 (default), fp4, int8"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="qlora: quantize the absmax constants (default on)"),
    kbit_prep: Optional[bool] = typer.Option(None, "--kbit-prep/--no-kbit-prep", help="qlora: peft.prepare_model_for_kbit_training (default on)"),
    lisa_layers: Optional[int] = typer.Option(None, "--lisa-layers", help="lisa: number of sampled trainable layers gamma (default 2)"),
    adapter_size: Optional[int] = typer.Option(None, "--adapter-size", help="adapter: bottleneck width (default 64)"),
    adapter_kind: Optional[str] = typer.Option(None, "--adapter-kind", help="adapter: houlsby (default), pfeiffer, parallel"),
    virtual_tokens: Optional[int] = typer.Option(None, "--virtual-tokens", help="prompt/prefix/ptuning: number of virtual tokens (default 20)"),
    trainer: Optional[str] = typer.Option(None, "--trainer", "-t", help=TRAINER_HELP),
    packing: Optional[bool] = typer.Option(None, "--packing", help="trl: SFTConfig.packing (same per-step shapes)"),
    padding_free: Optional[bool] = typer.Option(None, "--padding-free", help="trl: SFTConfig.padding_free (same tokens per step)"),
    liger: Optional[bool] = typer.Option(None, "--liger", help="hf / llamafactory: Liger kernels (use_liger_kernel: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE); trl: the layer kernels only; modelled from source"),
    activation_offloading: Optional[bool] = typer.Option(None, "--activation-offloading", help="trl: SFTConfig.activation_offloading (saved activations in host memory), modelled from source"),
    chunked_ce: Optional[bool] = typer.Option(None, "--chunked-ce", help="hf: axolotl chunked_cross_entropy, modelled from source"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    explain: bool = typer.Option(False, "--explain", help="show each term's formula with the numbers substituted"),
    trace: bool = typer.Option(False, "--trace", help="also run the CPU tracer (needs the harness extra) and show its peak"),
    alloc_conf: Optional[str] = typer.Option(None, "--alloc-conf", help=ALLOC_CONF_HELP),
) -> None:
    """Estimate peak GPU memory, FLOPs and step time of one fine-tuning step."""

    def run() -> None:
        from .catalog import custom_gpu, load_gpu, load_model
        from .estimate import estimate as core_estimate
        from .arch import resolve_attention
        from .methods import explicit_grad_ckpt_options, get_method
        from .trainers import default_trainer_for
        from .units import parse_bytes

        run_config = None
        base_training: dict[str, Any] = {}
        config_options: dict[str, Any] = {}
        model_name, method_name = model, method
        if config is not None:
            from .runconfig import load_run_config

            run_config = load_run_config(config)
            model_name = model_name or run_config.model
            if method_name is None and run_config.method is not None:
                method_name = run_config.method
                config_options = dict(run_config.options)
            base_training = dict(run_config.training)
        if model_name is None:
            _fail("--model is required (or --config with a base model)")
        method_name = method_name or "lora"
        spec = get_method(method_name)
        arch = load_model(model_name)
        g = load_gpu(gpu)
        if gpu_memory is not None:
            g = custom_gpu(parse_bytes(gpu_memory), g)
        training = _training(g.bf16_supported, batch, seq, grad_accum, grad_ckpt, attn, precision, optimizer,
                             optimizer_impl, n_gpus, shard, offload, base=base_training, trainer=default_trainer_for(arch, trainer),
                             trainer_options=_trainer_options(packing=packing, padding_free=padding_free,
                                                              liger=liger, activation_offloading=activation_offloading,
                                                              chunked_ce=chunked_ce), alloc_conf=alloc_conf)
        if attn is not None:
            resolve_attention(arch, attn, explicit=True)  # an explicit unsupported kernel is refused
        options = {**config_options, **_method_options(
            rank=rank, alpha=alpha, dropout=dropout, targets=targets, quant=quant,
            double_quant=double_quant, kbit_prep=kbit_prep, lisa_layers=lisa_layers,
            adapter_size=adapter_size, adapter_kind=adapter_kind, virtual_tokens=virtual_tokens),
            **explicit_grad_ckpt_options(method_name, grad_ckpt)}
        spec.make_options(options)  # refuse inapplicable options before any work
        est = core_estimate(arch, method_name, training, g, options)
        traced = None
        if trace:
            from .harness.trace import trace as run_trace  # torch only here

            traced = run_trace(arch, method_name, dict(est.options), est.training)
        if as_json:
            out = est.to_dict()
            if traced is not None:
                out["trace"] = traced.to_dict()
            if run_config is not None:
                out["run_config"] = {"path": config, "format": run_config.source_format,
                                     "read": list(run_config.read), "ignored": list(run_config.ignored),
                                     "notes": list(run_config.notes)}
            print(json.dumps(out, indent=2, default=str))
            return
        from .display import print_estimate

        if run_config is not None:
            from rich.console import Console

            Console(highlight=False).print("\n".join(run_config.describe()), markup=False)

        advice = None
        if not est.fits:
            from .advice import what_to_change

            advice = what_to_change(arch, est, g, options)
        print_estimate(est, explain=explain, traced=traced, advice=advice)

    _guard(run)


@app.command()
def models(
    filter_text: Optional[str] = typer.Argument(None, metavar="[FILTER]",
                                                help="show only names, hub ids or model_types containing this"),
    hub: bool = typer.Option(False, "--hub", help="list each model's hub id (they resolve offline)"),
) -> None:
    """List the bundled model catalog (MoE: total and active parameters)."""

    def run() -> None:
        from rich.console import Console

        from .cli_models import models_table

        Console().print(models_table(filter_text, hub))

    _guard(run)


@app.command()
def gpus() -> None:
    """List the GPU catalog."""

    def run() -> None:
        from rich.console import Console
        from rich.table import Table

        from .catalog import gpu_catalog
        from .units import fmt_gib

        table = Table(title="GPUs (dense peak throughput; sources in peftplan/catalog/gpus.json)")
        for col in ("name", "GPU", "memory", "bf16", "bf16/fp16 TFLOPS", "fp32 TFLOPS", "bandwidth GB/s"):
            table.add_column(col)
        for g in gpu_catalog().values():
            half = g.peak_flops.get("bf16") or g.peak_flops.get("fp16")
            table.add_row(g.name, g.full_name, fmt_gib(g.memory_bytes), "yes" if g.bf16_supported else "no",
                          f"{half / 1e12:.0f}" if half else "n/a",
                          f"{g.peak_flops['fp32'] / 1e12:.1f}" if g.peak_flops.get("fp32") else "n/a",
                          f"{g.memory_bandwidth_bytes_per_s / 1e9:.0f}")
        Console().print(table)

    _guard(run)


@app.command()
def methods() -> None:
    """List the registered fine-tuning methods and their options."""

    def run() -> None:
        import dataclasses

        from rich.console import Console
        from rich.table import Table

        from .methods import registry

        table = Table(title="methods")
        for col in ("name", "what", "options", "peft", "source"):
            table.add_column(col)
        for spec in registry().values():
            opts = ", ".join(f"--{f.name.replace('_', '-')}={f.default}" for f in dataclasses.fields(spec.options_cls))
            table.add_row(spec.name, spec.summary, opts or "-", spec.peft_type or "-", spec.source)
        Console().print(table)

    _guard(run)


@app.command()
def trainers() -> None:
    """List the registered trainers: library version modelled, loss, defaults and options."""

    def run() -> None:
        from rich.console import Console
        from rich.table import Table

        from .trainers import CLI_DEFAULT_TRAINER, registry

        table = Table(title=f"trainers (--trainer; default {CLI_DEFAULT_TRAINER})")
        for col in ("name", "models", "what", "defaults", "options", "checked", "source"):
            table.add_column(col, overflow="fold")
        for spec in registry().values():
            opts = ", ".join("--" + o.replace("_", "-") for o in spec.options) or "-"
            table.add_row(spec.name, spec.label, spec.summary, spec.defaults_line(), opts, spec.checked, spec.source)
        Console().print(table)

    _guard(run)


@app.command()
def claims(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The lecture notes' arithmetic reproduced, beside what a real run allocates."""

    def run() -> None:
        from .claims import all_claims

        items = all_claims()
        if as_json:
            print(json.dumps([c.__dict__ for c in items], indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="seed claims: their arithmetic, and what a real HF + peft step allocates", show_lines=True)
        for col in ("claim", "the seed says", "its arithmetic", "engine (real run)", "why they differ"):
            table.add_column(col, overflow="fold")
        for c in items:
            table.add_row(f"{c.key}\n[dim]{c.seed}[/dim]", f"{c.statement}: [bold]{c.quoted}[/bold]",
                          f"{c.reproduced:,.4g} {c.unit}", c.engine, c.why)
        Console(width=200).print(table)

    _guard(run)


# Commands that live in their own modules register on `app` when imported (each keeps torch, pandas
# and plotly inside its command functions, so `peftplan estimate` stays fast).
from . import cli_check, cli_profile, cli_report, cli_trace  # noqa: E402,F401


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # python -m peftplan.cli: run the module-level app that the cli_* modules registered on
    from peftplan.cli import app as _registered_app

    _registered_app()
