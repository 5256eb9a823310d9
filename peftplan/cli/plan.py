"""`peftplan plan`: which configurations fit, ranked (the search is peftplan/planner/). pandas and plotly
are imported inside the command only."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from .common import (ACTIVATION_OFFLOADING_OPTION, ALLOC_CONF_OPTION, AS_JSON_OPTION, GPU_OPTION, LIGER_OPTION,
                     TRAINER_OPTION, _fail, _guard, _ints, _output_path, _split, _trainer_options, parse_count)


def _alloc_conf(text: str | None) -> str:
    """--alloc-conf checked (a ValueError: one line, exit 2) and passed on as the string."""
    if not text:
        return ""
    from ..engine.alloc_conf import parse_alloc_conf

    parse_alloc_conf(text)
    return text


def plan(
    model: str = typer.Option(..., "--model", "-m", help="catalog name, HF hub id or config.json path"),
    gpu: str = GPU_OPTION,
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
    as_json: bool = AS_JSON_OPTION,
    alloc_conf: Optional[str] = ALLOC_CONF_OPTION,
    trainer: Optional[str] = TRAINER_OPTION,
    liger: Optional[bool] = LIGER_OPTION,
    activation_offloading: Optional[bool] = ACTIVATION_OFFLOADING_OPTION,
) -> None:
    """Search methods x quantization x rank x targets x micro-batch x checkpointing x attention x optimizer: what fits, ranked by --objective."""

    def run() -> None:
        from ..catalog import custom_gpu, load_gpu, load_model
        from ..planner import MICRO_BATCHES, OBJECTIVES, RANKS, TARGETS, plan as run_plan, print_plan
        from ..units import parse_bytes

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
        from ..trainers import CLI_DEFAULT_TRAINER, default_trainer_for

        result = run_plan(arch, g, n_gpus=n_gpus, seq_len=seq, tokens=n_tokens, price_per_hour=price,
                          methods=method_list, ranks=rank_list, micro_batches=batch_list, shard=shard,
                          alloc_conf=_alloc_conf(alloc_conf),
                          trainer=default_trainer_for(arch, trainer) or CLI_DEFAULT_TRAINER,
                          trainer_options=_trainer_options(liger=liger, activation_offloading=activation_offloading),
                          targets=target_list, objective=objective, global_batch=global_batch)
        if html_path is not None:
            from ..planner.report import write_plan_html

            write_plan_html(result, html_path)
        if as_json:
            print(json.dumps(result.to_dict(), indent=2, default=str))
            return
        print_plan(result, limit=top, distinct=not all_rows)
        if html_path is not None:
            print(f"wrote {html_path} ({html_path.stat().st_size / 1e6:.1f} MB, self-contained)")

    _guard(run)
