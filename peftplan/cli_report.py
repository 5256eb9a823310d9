"""`peftplan compare` (methods x models x GPUs x sequence lengths: terminal table, HTML, CSV, JSON)
and `peftplan plan` (which configurations fit, ranked). They register on the shared typer app.

pandas and plotly are imported inside the command functions only, so `peftplan estimate` does not
pay for them at startup.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .cli import ALLOC_CONF_HELP, TRAINER_HELP, _fail, _guard, app


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


def _options_by_method(methods: list[str], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method gets the options it has a field for (--rank goes to lora/qlora/dora, not to full);
    an option no chosen method takes is refused."""
    import dataclasses

    from .methods import get_method

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


@app.command()
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
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw (default), adamw-8bit, paged-adamw, paged-adamw-8bit, sgd, sgd-momentum, adafactor, lion"),
    optimizer_impl: Optional[str] = typer.Option(None, "--optimizer-impl", help="fused (default), foreach, for-loop"),
    trainer: Optional[str] = typer.Option(None, "--trainer", "-t", help=TRAINER_HELP),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="lora/qlora/dora rank (peft default 8)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="lora_alpha"),
    targets: Optional[str] = typer.Option(None, "--targets", help="lora/qlora/dora/ia3 target modules (q_proj,v_proj / qv / attn / all-linear)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="qlora base: nf4 (default), fp4, int8"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="qlora double quantization (default on)"),
    lisa_layers: Optional[int] = typer.Option(None, "--lisa-layers", help="lisa: sampled trainable layers (default 2)"),
    adapter_size: Optional[int] = typer.Option(None, "--adapter-size", help="adapter bottleneck width (default 64)"),
    virtual_tokens: Optional[int] = typer.Option(None, "--virtual-tokens", help="prompt/prefix/ptuning virtual tokens (default 20)"),
    html: Optional[str] = typer.Option(None, "--html", help="write a self-contained HTML report (plotly inlined, opens offline)"),
    csv: Optional[str] = typer.Option(None, "--csv", help="write every number as CSV (one row per estimate)"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON on stdout instead of the table"),
    title: Optional[str] = typer.Option(None, "--title", help="report title"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite --html/--csv files that exist"),
    alloc_conf: Optional[str] = typer.Option(None, "--alloc-conf", help=ALLOC_CONF_HELP),
) -> None:
    """Compare methods x models x GPUs x sequence lengths: table, HTML report, CSV, JSON."""

    def run() -> None:
        from .catalog import load_gpu, load_model
        from .methods import explicit_grad_ckpt_options, get_method
        from .training import Training

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
        from .trainers import CLI_DEFAULT_TRAINER, get_trainer

        spec = get_trainer(trainer or CLI_DEFAULT_TRAINER)
        fields = spec.apply_defaults(fields)  # the trainer's defaults for what the user did not set
        training = Training(**fields, trainer=spec.name)
        if attn is not None:
            from .arch import resolve_attention
            for a in archs:
                resolve_attention(a, attn, explicit=True)  # an explicit unsupported kernel is refused
        if precision is not None and precision.startswith("bf16") and not all(g.bf16_supported for g in gpu_list):
            no_bf16 = [g.name for g in gpu_list if not g.bf16_supported]
            sys.stderr.write(f"peftplan: note: {', '.join(no_bf16)} has no bf16: {precision} runs as "
                             f"{precision.replace('bf16', 'fp16')} there\n")

        from .report import compare as run_compare, comparison_table, to_rows, write_html

        comparison = run_compare(archs, method_list, gpu_list, seqs=seqs, training=training,
                                 options_by_method=options, title=title)
        wrote: list[str] = []
        if html_path is not None:
            write_html(comparison, html_path)
            wrote.append(f"wrote {html_path} ({html_path.stat().st_size / 1e6:.1f} MB, self-contained)")
        if csv_path is not None:
            from .report import to_frame

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


def _alloc_conf(text: str | None) -> str:
    """--alloc-conf checked (a ValueError: one line, exit 2) and passed on as the string."""
    if not text:
        return ""
    from .engine.alloc_conf import parse_alloc_conf

    parse_alloc_conf(text)
    return text


@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m", help="catalog name, HF hub id or config.json path"),
    gpu: str = typer.Option("a100-80g", "--gpu", "-g", help="GPU from `peftplan gpus`"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="capacity of a GPU not in the catalog, e.g. 12GiB"),
    n_gpus: int = typer.Option(1, "--gpus", help="number of GPUs (data parallel; sharding as estimate() models it)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="with --gpus N: ddp (default), zero1, zero2, zero3, fsdp-full, ..."),
    seq: Optional[int] = typer.Option(None, "--seq", "-s", help="sequence length (default 1024)"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="tokens to train on, for time and cost: 1e8, 100M, 2B"),
    price: Optional[float] = typer.Option(None, "--price", help="USD per GPU-hour (for the cost column)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="restrict to these methods, comma-separated (default: all)"),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="LoRA ranks searched (default 8,16,64)"),
    batches: Optional[str] = typer.Option(None, "--batches", help="micro-batches searched (default 1,2,4,8,16)"),
    objective: str = typer.Option("quality", "--objective", help="rank by quality (the method family's published "
                                  "prior, then speed), speed (tokens/s) or cost (money for --tokens at --price)"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="sequences per optimizer step: each "
                                               "micro-batch that divides it runs with the accumulation that fills it"),
    targets: Optional[str] = typer.Option(None, "--targets", help="LoRA target sets searched, comma-separated from "
                                          "default (peft's), attn, all-linear (default: all three)"),
    html: Optional[str] = typer.Option(None, "--html", help="write the quality-vs-speed front and fit boundary as a "
                                       "self-contained HTML report"),
    force: bool = typer.Option(False, "--force", "-f", help="overwrite an existing --html file"),
    top: int = typer.Option(15, "--top", help="rows shown (the best of each method, checkpointing and attention)"),
    all_rows: bool = typer.Option(False, "--all", help="show every fitting row, not only the best per method setting"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    alloc_conf: Optional[str] = typer.Option(None, "--alloc-conf", help=ALLOC_CONF_HELP),
) -> None:
    """Search methods x quantization x rank x targets x micro-batch x checkpointing x attention x optimizer: what fits, ranked by --objective."""

    def run() -> None:
        from .catalog import custom_gpu, load_gpu, load_model
        from .planner import MICRO_BATCHES, OBJECTIVES, RANKS, TARGETS, plan as run_plan, print_plan
        from .units import parse_bytes

        if objective not in OBJECTIVES:
            _fail(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if global_batch is not None and (global_batch < 1 or global_batch % max(n_gpus, 1)):
            _fail(f"--global-batch must be a positive multiple of --gpus ({n_gpus}), got {global_batch}")
        target_list: tuple[str | None, ...] = TARGETS
        if targets is not None:
            names = _split(targets, "--targets")
            bad = [t for t in names if t not in ("default", "attn", "all-linear")]
            if bad or not names:
                _fail(f"--targets takes default, attn, all-linear; got {targets!r}")
            target_list = tuple(None if t == "default" else t for t in names)
        html_path = _output_path(html, force, "--html")

        if price is not None and (not math.isfinite(price) or price < 0):
            _fail(f"--price must be a non-negative number, got {price}")
        if top < 1:
            _fail(f"--top must be a positive integer, got {top}")
        n_tokens = parse_count(tokens) if tokens is not None else None
        method_list = _split(methods, "--methods") if methods is not None else None
        rank_list = tuple(_ints(ranks, "--ranks")) or RANKS
        batch_list = tuple(sorted(set(_ints(batches, "--batches")))) or MICRO_BATCHES
        g = load_gpu(gpu)
        if gpu_memory is not None:
            g = custom_gpu(parse_bytes(gpu_memory), g)
        arch = load_model(model)
        result = run_plan(arch, g, n_gpus=n_gpus, seq_len=seq, tokens=n_tokens, price_per_hour=price,
                          methods=method_list, ranks=rank_list, micro_batches=batch_list, shard=shard,
                          alloc_conf=_alloc_conf(alloc_conf),
                          targets=target_list, objective=objective, global_batch=global_batch)
        if html_path is not None:
            from .planner.report import write_plan_html

            write_plan_html(result, html_path)
        if as_json:
            print(json.dumps(result.to_dict(), indent=2, default=str))
            return
        print_plan(result, limit=top, distinct=not all_rows)
        if html_path is not None:
            print(f"wrote {html_path} ({html_path.stat().st_size / 1e6:.1f} MB, self-contained)")

    _guard(run)
