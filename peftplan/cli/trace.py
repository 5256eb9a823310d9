"""`peftplan trace`: run the real HF + peft step on the CPU tracer, beside the engine's prediction.

torch is imported only inside the command (the tracer is peftplan/harness/trace.py).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from .common import (ADAPTER_KIND_OPTION, ADAPTER_SIZE_OPTION, ALPHA_OPTION, DOUBLE_QUANT_OPTION, DROPOUT_OPTION,
                     GRAD_ACCUM_OPTION, KBIT_PREP_OPTION, METHOD_OPTION, OPTIMIZER_IMPL_OPTION, PACKING_OPTION,
                     PADDING_FREE_OPTION, QUANT_OPTION, RANK_OPTION, TRAINER_OPTION, _fail, _guard,
                     _method_options, _trainer_options, _training)


def _harness_errors() -> tuple[type[BaseException], ...]:
    from ..harness import HarnessError

    return (HarnessError,)


def _fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f}"


def _print_single(res: Any, est: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..display import COMPONENT_LABELS

    console = Console()
    t = est.training
    console.print(f"[bold]{res.model}[/bold] · {res.method} · trainer {t.trainer} · batch {t.micro_batch} × seq {t.seq_len} · "
                  f"{t.precision} · {t.attention} · grad-ckpt {'on' if t.grad_ckpt else 'off'} · "
                  f"traced in {res.seconds:.1f} s ({'fake' if res.fake else 'real'} tensors)")
    same = (res.params_total, res.params_trainable) == (est.params.total, est.params.trainable)
    console.print(f"params: {res.params_total:,} total, {res.params_trainable:,} trainable "
                  f"({'= engine' if same else f'engine: {est.params.total:,} / {est.params.trainable:,}'})")
    phase = res.peak_phase
    where = phase.get("phase") if isinstance(phase, dict) else phase
    if isinstance(phase, dict) and phase.get("op"):
        where = f"{where} (step {phase.get('step')}, {phase.get('op')})"
    table = Table(title=f"peak allocated: traced at {where}; engine at {est.memory.peak_phase}")
    for col in ("component", "traced MiB", "engine MiB", "engine − traced MiB"):
        table.add_column(col, justify="right" if col != "component" else "left")
    keys = sorted(set(res.components) | set(est.memory.components),
                  key=lambda k: -max(res.components.get(k, 0), est.memory.components.get(k, 0)))
    for k in keys:
        a, b = res.components.get(k, 0), est.memory.components.get(k, 0)
        if a == 0 and b == 0:
            continue
        table.add_row(COMPONENT_LABELS.get(k, k), _fmt_mib(a), _fmt_mib(b), f"{(b - a) / 2**20:+,.2f}")
    peak, pred = res.peak_allocated_bytes, est.memory.peak_allocated_bytes
    err = 100.0 * (pred - peak) / peak if peak else 0.0
    table.add_row("[bold]peak allocated[/bold]", f"[bold]{_fmt_mib(peak)}[/bold]", f"[bold]{_fmt_mib(pred)}[/bold]",
                  f"[bold]{(pred - peak) / 2**20:+,.2f} ({err:+.3f}%)[/bold]")
    console.print(table)


def trace(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="catalog name, HF hub id (catalog aliases resolve offline), or path to a config.json (read as JSON only)"),
    method: Optional[str] = METHOD_OPTION,
    gpu: str = typer.Option("a100-80g", "--gpu", "-g", help="GPU the engine's prediction is made for (the trace itself runs on the CPU)"),
    rank: Optional[int] = RANK_OPTION,
    alpha: Optional[float] = ALPHA_OPTION,
    dropout: Optional[float] = DROPOUT_OPTION,
    targets: Optional[str] = typer.Option(None, "--targets", help="modules as the model names them, or qv / attn / all-linear"),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="micro-batch (HF default 8)"),
    seq: Optional[int] = typer.Option(None, "--seq", "-s", help="sequence length in tokens (default 1024)"),
    grad_accum: Optional[int] = GRAD_ACCUM_OPTION,
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing (HF default off)"),
    attn: Optional[str] = typer.Option(None, "--attn", help="eager or sdpa (flash cannot run on the CPU tracer)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16-mixed, bf16-mixed (default), fp16, bf16"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw (default), sgd, sgd-momentum, adafactor (CUDA-only optimizers cannot be traced)"),
    optimizer_impl: Optional[str] = OPTIMIZER_IMPL_OPTION,
    quant: Optional[str] = QUANT_OPTION,
    double_quant: Optional[bool] = DOUBLE_QUANT_OPTION,
    kbit_prep: Optional[bool] = KBIT_PREP_OPTION,
    lisa_layers: Optional[int] = typer.Option(None, "--lisa-layers", help="lisa: number of trainable layers (default 2)"),
    adapter_size: Optional[int] = ADAPTER_SIZE_OPTION,
    adapter_kind: Optional[str] = ADAPTER_KIND_OPTION,
    virtual_tokens: Optional[int] = typer.Option(None, "--virtual-tokens", help="prompt/prefix/ptuning: virtual tokens (default 20)"),
    trainer: Optional[str] = TRAINER_OPTION,
    packing: Optional[bool] = PACKING_OPTION,
    padding_free: Optional[bool] = PADDING_FREE_OPTION,
    steps: int = typer.Option(2, "--steps", help="optimizer steps to trace (2: the first creates the optimizer state)"),
    real: bool = typer.Option(False, "--real", help="real CPU tensors instead of fake ones (small models only)"),
    as_json: bool = typer.Option(False, "--json", help="print the trace record (TraceResult.to_dict()) as JSON"),
    out: Optional[str] = typer.Option(None, "--out", help="write the trace as a record file (refuses to overwrite)"),
    matrix: Optional[str] = typer.Option(None, "--matrix", help="trace a whole matrix instead (ci or tiny; peftplan/harness/matrix.py) into --out-dir"),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="with --matrix: directory for the records (e.g. profiles/cpu)"),
    jobs: int = typer.Option(2, "--jobs", "-j", help="with --matrix: worker processes"),
    force: bool = typer.Option(False, "--force", help="overwrite existing record files"),
) -> None:
    """Trace one real training step (transformers + peft under FakeTensorMode on the CPU) and compare it
    with the engine's prediction: peak allocated, its phase, the components at the peak, parameters.

    Needs the harness extra (torch, transformers, peft, bitsandbytes). Model configs are only read as
    JSON and built from transformers' own classes: there is no trust_remote_code, and nothing is
    downloaded."""

    def run() -> None:
        if matrix is not None:
            _run_matrix(matrix, out_dir, jobs, force)
            return
        if out_dir is not None:
            _fail("--out-dir needs --matrix (a single trace is written with --out)")
        from pathlib import Path

        from ..catalog import load_gpu, load_model
        from ..estimate import estimate as core_estimate
        from ..methods import explicit_grad_ckpt_options, get_method
        from ..trainers import default_trainer_for

        if model is None:
            _fail("--model is required")
        method_name = method or "lora"
        spec = get_method(method_name)
        arch = load_model(model)
        g = load_gpu(gpu)
        training = _training(g.bf16_supported, batch, seq, grad_accum, grad_ckpt, attn, precision, optimizer,
                             optimizer_impl, trainer=default_trainer_for(arch, trainer),
                             trainer_options=_trainer_options(packing=packing, padding_free=padding_free))
        if attn is not None:
            from ..arch import resolve_attention
            resolve_attention(arch, attn, explicit=True)  # an explicit unsupported kernel is refused
        options = _method_options(rank=rank, alpha=alpha, dropout=dropout, targets=targets, quant=quant,
                                  double_quant=double_quant, kbit_prep=kbit_prep, lisa_layers=lisa_layers,
                                  adapter_size=adapter_size, adapter_kind=adapter_kind, virtual_tokens=virtual_tokens)
        options.update(explicit_grad_ckpt_options(method_name, grad_ckpt))
        spec.make_options(options)  # refuse inapplicable options before any work
        if out is not None and Path(out).exists() and not force:
            _fail(f"{out}: exists; use --force to overwrite")
        est = core_estimate(arch, method_name, training, g, options)
        try:
            from ..harness.trace import trace as run_trace  # torch only here
        except ImportError as exc:
            _fail(f"the tracer needs the harness extra (pip install 'peftplan[harness]'): {exc}")
        try:
            res = run_trace(arch, method_name, dict(est.options), est.training, steps=steps, real=real,
                            model_name=arch.name)
        except _harness_errors() as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        record = res.to_dict()
        if out is not None:
            from ..records import write_record

            write_record(out, record, overwrite=force)
        if as_json:
            print(json.dumps(record, indent=2, default=str))
            return
        _print_single(res, est)
        if out is not None:
            from rich.console import Console

            Console(stderr=True).print(f"wrote {out}")

    _guard(run)


def _run_matrix(name: str, out_dir: str | None, jobs: int, force: bool) -> None:
    import sys

    from ..harness.matrix import matrix as get_matrix, run_matrix

    if out_dir is None:
        _fail("--matrix needs --out-dir (e.g. profiles/cpu)")
    entries = get_matrix(name)
    n = len(entries)
    counter = [0]

    def progress(eid: str, err: str | None, seconds: float) -> None:
        counter[0] += 1
        status = f"ERROR {err}" if err else "ok"
        sys.stderr.write(f"[{counter[0]}/{n}] {eid} {seconds:.1f}s {status}\n")

    results = run_matrix(entries, out_dir, force=force, jobs=max(1, jobs), progress=progress)
    errors = [(eid, err) for eid, err in results if err]
    sys.stderr.write(f"traced {n - len(errors)}/{n} configurations into {out_dir}\n")
    if errors:
        _fail(f"{len(errors)} configuration(s) could not be traced, first: {errors[0][0]}: {errors[0][1]}")
