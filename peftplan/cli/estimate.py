"""`peftplan estimate`: one configuration's peak memory, FLOPs and step time, with the verdict and
what to change when it does not fit (the core is peftplan.estimate; the table is peftplan.display)."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from .common import (ACTIVATION_OFFLOADING_OPTION, ADAPTER_KIND_OPTION, ADAPTER_SIZE_OPTION, ALLOC_CONF_OPTION,
                     ALPHA_OPTION, AS_JSON_OPTION, DOUBLE_QUANT_OPTION, LIGER_OPTION, DROPOUT_OPTION, GPU_OPTION, GRAD_ACCUM_OPTION, KBIT_PREP_OPTION,
                     METHOD_OPTION, OPTIMIZER_OPTION, PACKING_OPTION, PADDING_FREE_OPTION, QUANT_OPTION,
                     RANK_OPTION, TRAINER_OPTION, _fail, _guard, _method_options, _trainer_options, _training)


def estimate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="catalog name (see `peftplan models`), HF hub id (org/name; catalog aliases resolve offline), or path to a config.json"),
    method: Optional[str] = METHOD_OPTION,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="read model, method and training from an axolotl YAML, a peft adapter_config.json or a TrainingArguments/SFTConfig JSON; flags given override it"),
    gpu: str = GPU_OPTION,
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="capacity of a GPU not in the catalog, e.g. 12GiB or 16GB"),
    rank: Optional[int] = RANK_OPTION,
    alpha: Optional[float] = ALPHA_OPTION,
    dropout: Optional[float] = DROPOUT_OPTION,
    targets: Optional[str] = typer.Option(None, "--targets", help="modules as the model names them (q_proj,v_proj; q,v for T5) or qv / attn / all-linear; default: peft's per-model list"),
    batch: Optional[int] = typer.Option(None, "--batch", "-b", help="micro-batch per GPU (HF TrainingArguments default 8)"),
    seq: Optional[int] = typer.Option(None, "--seq", "-s", help="sequence length in tokens (default 1024, TRL SFTConfig.max_length)"),
    grad_accum: Optional[int] = GRAD_ACCUM_OPTION,
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing (HF default off; QLoRA's kbit prep turns it on)"),
    attn: Optional[str] = typer.Option(None, "--attn", help="eager, sdpa (transformers default) or flash"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16-mixed, bf16-mixed (default; fp16-mixed on GPUs without bf16), fp16, bf16 (pure half)"),
    optimizer: Optional[str] = OPTIMIZER_OPTION,
    optimizer_impl: Optional[str] = typer.Option(None, "--optimizer-impl", help="fused (HF default adamw_torch_fused), foreach, for-loop"),
    n_gpus: Optional[int] = typer.Option(None, "--gpus", help="number of GPUs (data-parallel ranks; default 1)"),
    shard: Optional[str] = typer.Option(None, "--shard", help="with --gpus N: ddp (default), zero1, zero2, zero3, fsdp-full, fsdp-grad-op, fsdp-hybrid"),
    offload: Optional[str] = typer.Option(None, "--offload", help="with ZeRO/FSDP: none (default), optimizer, optimizer+params"),
    quant: Optional[str] = QUANT_OPTION,
    double_quant: Optional[bool] = DOUBLE_QUANT_OPTION,
    kbit_prep: Optional[bool] = KBIT_PREP_OPTION,
    lisa_layers: Optional[int] = typer.Option(None, "--lisa-layers", help="lisa: number of sampled trainable layers gamma (default 2)"),
    adapter_size: Optional[int] = ADAPTER_SIZE_OPTION,
    adapter_kind: Optional[str] = ADAPTER_KIND_OPTION,
    virtual_tokens: Optional[int] = typer.Option(None, "--virtual-tokens", help="prompt/prefix/ptuning: number of virtual tokens (default 20)"),
    trainer: Optional[str] = TRAINER_OPTION,
    packing: Optional[bool] = PACKING_OPTION,
    padding_free: Optional[bool] = PADDING_FREE_OPTION,
    liger: Optional[bool] = LIGER_OPTION,
    activation_offloading: Optional[bool] = ACTIVATION_OFFLOADING_OPTION,
    chunked_ce: Optional[bool] = typer.Option(None, "--chunked-ce", help="hf: axolotl chunked_cross_entropy, modelled from source"),
    as_json: bool = AS_JSON_OPTION,
    explain: bool = typer.Option(False, "--explain", help="show each term's formula with the numbers substituted"),
    trace: bool = typer.Option(False, "--trace", help="also run the CPU tracer (needs the harness extra) and show its peak"),
    alloc_conf: Optional[str] = ALLOC_CONF_OPTION,
) -> None:
    """Estimate peak GPU memory, FLOPs and step time of one fine-tuning step."""

    def run() -> None:
        from ..catalog import custom_gpu, load_gpu, load_model
        from ..estimate import estimate as core_estimate
        from ..arch import resolve_attention
        from ..methods import explicit_grad_ckpt_options, get_method
        from ..trainers import default_trainer_for
        from ..units import parse_bytes

        run_config = None
        base_training: dict[str, Any] = {}
        config_options: dict[str, Any] = {}
        model_name, method_name = model, method
        if config is not None:
            from ..runconfig import load_run_config

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
            from ..harness.trace import trace as run_trace  # torch only here

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
        from ..display import print_estimate

        if run_config is not None:
            from rich.console import Console

            Console(highlight=False).print("\n".join(run_config.describe()), markup=False)

        advice = None
        if not est.fits:
            from ..advice import what_to_change

            advice = what_to_change(arch, est, g, options)
        print_estimate(est, explain=explain, traced=traced, advice=advice)

    _guard(run)

