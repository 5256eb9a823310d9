"""`peftplan compare`: methods x models x GPUs x sequence lengths as a terminal table, a self-contained HTML
report, CSV or JSON (the numbers come from peftplan/report.py). pandas and plotly are imported inside the
command only, so `peftplan estimate` does not pay for them at startup."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from .common import (ALLOC_CONF_OPTION, OPTIMIZER_IMPL_OPTION, OPTIMIZER_OPTION, QUANT_OPTION, TRAINER_OPTION,
                     _fail, _guard, _ints, _output_path, _split)


def _options_by_method(methods: list[str], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method gets the options it has a field for (--rank goes to lora/qlora/dora, not to full);
    an option no chosen method takes is refused."""
    import dataclasses

    from ..methods import get_method

    given = {k: v for k, v in given.items() if v is not None}
    out: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for m in methods:
        fields = {f.name for f in dataclasses.fields(get_method(m).options_cls)}
        mine = {k: v for k, v in given.items() if k in fields}
        used |= set(mine)
        out[m] = mine
    unused = sorted(set(given) - used)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{flags} applies to none of the methods {', '.join(methods)}")
    for m in methods:
        get_method(m).make_options(dict(out[m]))  # refuse bad values before any work
    return out


def compare(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a model: catalog name, HF hub id or config.json path"),
    models: Optional[str] = typer.Option(None, "--models", help="several models, comma-separated"),
    methods: str = typer.Option("full,lora,qlora", "--methods", help="methods, comma-separated (see `peftplan methods`)"),
    gpus: str = typer.Option("a100-80g", "--gpus", "-g", help="GPUs, comma-separated (see `peftplan gpus`); each is "
                             "estimated in its own precision (fp16-mixed where the GPU has no bf16, e.g. t4)"),
    seq: Optional[str] = typer.Option(None, "--seq", "-s", help="sequence length(s), comma-separated, e.g. 512,2048,8192 (default 1024)"),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="micro-batch per GPU (HF default 8)"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="gradient accumulation steps (default 1)"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing (default off; QLoRA turns it on)"),
    attn: Optional[str] = typer.Option(None, "--attn", help="eager, sdpa (default) or flash"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16-mixed, bf16-mixed (default; fp16-mixed on GPUs without bf16), fp16, bf16"),
    optimizer: Optional[str] = OPTIMIZER_OPTION,
    optimizer_impl: Optional[str] = OPTIMIZER_IMPL_OPTION,
    trainer: Optional[str] = TRAINER_OPTION,
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="lora/qlora/dora rank (peft default 8)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="lora_alpha"),
    targets: Optional[str] = typer.Option(None, "--targets", help="lora/qlora/dora/ia3 target modules (q_proj,v_proj / qv / attn / all-linear)"),
    quant: Optional[str] = QUANT_OPTION,
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="qlora double quantization (default on)"),
    lisa_layers: Optional[int] = typer.Option(None, "--lisa-layers", help="lisa: sampled trainable layers (default 2)"),
    adapter_size: Optional[int] = typer.Option(None, "--adapter-size", help="adapter bottleneck width (default 64)"),
    virtual_tokens: Optional[int] = typer.Option(None, "--virtual-tokens", help="prompt/prefix/ptuning virtual tokens (default 20)"),
    html: Optional[str] = typer.Option(None, "--html", help="write a self-contained HTML report (plotly inlined, opens offline)"),
    csv: Optional[str] = typer.Option(None, "--csv", help="write every number as CSV (one row per estimate)"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON on stdout instead of the table"),
    title: Optional[str] = typer.Option(None, "--title", help="report title"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite --html/--csv files that exist"),
    alloc_conf: Optional[str] = ALLOC_CONF_OPTION,
) -> None:
    """Compare methods x models x GPUs x sequence lengths: table, HTML report, CSV, JSON."""

    def run() -> None:
        from ..catalog import load_gpu, load_model
        from ..methods import explicit_grad_ckpt_options, get_method
        from ..training import Training

        names = ([model] if model else []) + _split(models, "--models")
        if not names:
            _fail("--model or --models is required")
        method_list = _split(methods, "--methods")
        for m in method_list:
            get_method(m)  # did-you-mean before anything else
        gpu_list = [load_gpu(g) for g in _split(gpus, "--gpus")]
        seqs = _ints(seq, "--seq") or None
        html_path = _output_path(html, force, "--html")
        csv_path = _output_path(csv, force, "--csv")
        if html_path is not None and csv_path is not None and html_path.resolve() == csv_path.resolve():
            _fail("--html and --csv name the same file")
        archs = [load_model(n) for n in names]
        options = _options_by_method(method_list, dict(
            rank=rank, alpha=alpha, targets=targets, quant=quant, double_quant=double_quant,
            lisa_layers=lisa_layers, adapter_size=adapter_size, virtual_tokens=virtual_tokens))
        for m in method_list:
            options[m].update(explicit_grad_ckpt_options(m, grad_ckpt))
        fields = {"micro_batch": batch, "grad_accum": grad_accum, "grad_ckpt": grad_ckpt, "attention": attn,
                  "precision": precision, "optimizer": optimizer, "optimizer_impl": optimizer_impl,
                  "alloc_conf": alloc_conf}
        from ..trainers import CLI_DEFAULT_TRAINER, get_trainer

        spec = get_trainer(trainer or CLI_DEFAULT_TRAINER)
        fields = spec.apply_defaults(fields)  # the trainer's defaults for what the user did not set
        training = Training(**fields, trainer=spec.name)
        if attn is not None:
            from ..arch import resolve_attention
            for a in archs:
                resolve_attention(a, attn, explicit=True)  # an explicit unsupported kernel is refused
        if precision is not None and precision.startswith("bf16") and not all(g.bf16_supported for g in gpu_list):
            no_bf16 = [g.name for g in gpu_list if not g.bf16_supported]
            sys.stderr.write(f"peftplan: note: {', '.join(no_bf16)} has no bf16: {precision} runs as "
                             f"{precision.replace('bf16', 'fp16')} there\n")

        from ..report import compare as run_compare, comparison_table, to_rows, write_html

        comparison = run_compare(archs, method_list, gpu_list, seqs=seqs, training=training,
                                 options_by_method=options, title=title)
        wrote: list[str] = []
        if html_path is not None:
            write_html(comparison, html_path)
            wrote.append(f"wrote {html_path} ({html_path.stat().st_size / 1e6:.1f} MB, self-contained)")
        if csv_path is not None:
            from ..report import to_frame

            csv_path.parent.mkdir(parents=True, exist_ok=True)
            to_frame(comparison).to_csv(csv_path, index=False)
            wrote.append(f"wrote {csv_path}")
        if as_json:
            print(json.dumps({"title": comparison.title, "notes": comparison.notes, "rows": to_rows(comparison)},
                             indent=2, default=str))
            for line in wrote:
                sys.stderr.write(line + "\n")
            return
        from rich.console import Console

        console = Console(highlight=False)
        if not console.is_terminal and console.width < 150:
            console = Console(highlight=False, width=150)  # piped: do not squeeze the columns to 80
        console.print(comparison_table(comparison))
        for n in comparison.notes:
            console.print(f"note: {n}", markup=False, style="dim")
        for line in wrote:
            console.print(line, markup=False)

    _guard(run)
