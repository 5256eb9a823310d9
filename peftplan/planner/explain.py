"""The plain-words explanation of a plan: why the first row wins, or what would make something fit."""

from __future__ import annotations

from dataclasses import replace

from ..arch import ModelArch
from ..catalog import GPU, gpu_catalog
from ..methods import MethodError
from ..training import TrainingError
from ..units import fmt_count, fmt_gib
from .evaluator import Evaluator, sharding_modelled
from .ranking import quality_tolerance, speed_of, speed_tolerance
from .space import MethodLimit, PlanConfig, PlanRow, Variant


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"



def _what_would_fit(ev: Evaluator, arch: ModelArch, gpu: GPU, closest: list[PlanRow], limits: list[MethodLimit],
                    seq: int, chosen: list[str], precision: str, n_gpus: int = 1, modelled: bool = False) -> str:
    parts: list[str] = []
    if closest:
        cheapest = closest[0]
        need = (f"a GPU with at least {fmt_gib(cheapest.device_total_bytes)} for the least memory-hungry "
                f"configuration ({cheapest.config.label})")
        bigger = sorted((g for g in gpu_catalog().values() if g.memory_bytes > gpu.memory_bytes),
                        key=lambda g: (g.memory_bytes, g.name))
        for g in bigger:
            row = ev.fits_on(cheapest.config, g)
            if row.fits:
                parts.append(f"{need}: it fits on the {g.name} ({fmt_gib(g.memory_bytes)}, "
                             f"{fmt_gib(row.device_total_bytes)} needed there)")
                break
        else:
            parts.append(f"{need}, more than any single GPU in the catalog")
    shorter = [lim for lim in limits if lim.max_seq_len is not None and lim.max_seq_len < seq]
    if shorter:
        top = max(shorter, key=lambda lim: (lim.max_seq_len or 0, lim.max_seq_row.headroom_bytes if lim.max_seq_row else 0))
        assert top.max_seq_row is not None
        parts.append(f"a shorter sequence fits: {top.max_seq_row.config.label} "
                     f"({fmt_gib(top.max_seq_row.device_total_bytes)} of {fmt_gib(gpu.memory_bytes)})")
    if "qlora" not in chosen:
        try:
            v = Variant("qlora", (("double_quant", True), ("quant", "nf4"), ("rank", ev.ranks[0])))
            cfg = PlanConfig(v, 1, seq, True, "sdpa", "paged-adamw-8bit", precision,
                             n_gpus, closest[0].config.shard if closest else ("ddp" if n_gpus > 1 else "none"))
            row = ev.evaluate(cfg, gpu)
            parts.append(f"QLoRA ({row.config.label}) would need {fmt_gib(row.device_total_bytes)}"
                         + (" and fits" if row.fits else ""))
        except MethodError:
            pass
    if closest:
        cheapest = closest[0]
        # estimate() models ZeRO/FSDP (engine/sharding.py, engine/deepspeed.py): try more GPUs with ZeRO-3
        if modelled or sharding_modelled(arch, gpu, max(2, 2 * n_gpus)):
            for n in (2, 4, 8, 16, 32, 64):
                if n <= n_gpus:
                    continue
                try:
                    row = ev.evaluate(replace(cheapest.config, n_gpus=n, shard="zero3"), gpu)
                except (MethodError, TrainingError):
                    break
                if row.fits:
                    parts.append(f"{n} x {gpu.name} with ZeRO-3 fit {cheapest.config.variant.label} "
                                 f"({fmt_gib(row.device_total_bytes)} per GPU)")
                    break
        else:
            parts.append("sharding over more GPUs (ZeRO-3/FSDP) saves nothing per GPU for this model in the "
                         "estimate")
    return "; ".join(parts) if parts else "nothing in the searched space fits"


def _setting_words(c: PlanConfig) -> str:
    accum = f" x {c.grad_accum} accumulated" if c.grad_accum > 1 else ""
    return (f"micro-batch {c.micro_batch}{accum}, checkpointing {'on' if c.grad_ckpt else 'off'}, "
            f"{c.attention} attention, {c.optimizer}")


def _speed_words(a: PlanRow, b: PlanRow) -> str:
    """How much faster `a` is than `b`, or that the step-time model cannot tell them apart."""
    if not (a.tokens_per_s and b.tokens_per_s):
        return "at a throughput the catalog cannot give"
    gain = a.tokens_per_s / b.tokens_per_s - 1
    if abs(gain) <= speed_tolerance():
        return f"about as fast ({gain:+.0%}, within the step-time model's {speed_tolerance():.0%} error)"
    return f"{gain:+.0%} tokens/s" if gain < 0 else f"{gain:.0%} faster"


def _explain(fitting: list[PlanRow], closest: list[PlanRow], gpu: GPU, tokens: int | None, price: float | None,
             suggestion: str | None, objective: str = "quality") -> str:
    """Why the first row wins, in plain words: its quality prior, speed and memory against the
    alternatives an expert would weigh (the fastest row, the best-quality row, full fine-tuning)."""
    cap = fmt_gib(gpu.memory_bytes)
    if not fitting:
        if not closest:
            return f"Nothing could be evaluated on {gpu.name}."
        c = closest[0]
        return (f"Nothing fits on {gpu.name} ({cap}): the least memory-hungry configuration, {c.config.label}, "
                f"needs {fmt_gib(c.device_total_bytes)} on the device ({fmt_gib(c.peak_allocated_bytes)} allocated "
                f"at the peak plus the CUDA context). To make it fit: {suggestion}.")
    best = fitting[0]
    b = best.config
    text = f"{b.variant.label} ({_setting_words(b)}) ranks first by {objective}"
    if objective == "quality":
        if best.quality is not None:
            text += (f": its method and targets have the highest quality prior of what fits ({best.quality:.3f}, "
                     "GSM8K accuracy after MetaMathQA fine-tuning in PEFT's method comparison"
                     + ("; LoRA on all linear layers, which the QLoRA paper finds needed to match full fine-tuning"
                        if b.variant.targets == "all-linear" else "") + ")")
        text += ", and it is the fastest configuration of that quality tier"
    if best.tokens_per_s is not None:
        text += f" at {best.tokens_per_s:,.0f} tokens/s"
    text += (f". It needs {fmt_gib(best.device_total_bytes)} of {gpu.name}'s {cap} ({fmt_gib(best.headroom_bytes)} "
             "headroom)")
    pct = 100.0 * best.trainable_params / best.total_params if best.total_params else 0.0
    text += f" and trains {fmt_count(best.trainable_params)} parameters ({pct:.3g}% of {fmt_count(best.total_params)})."
    if fitting[1:2] and fitting[1].tie:
        names = []
        for r in fitting[1:]:
            if not r.tie:
                break
            if r.config.variant.label not in names and r.config.variant.label != b.variant.label:
                names.append(r.config.variant.label)
        if names:
            text += (" Within the models' error it ties with " + ", ".join(names[:4])
                     + (" and others" if len(names) > 4 else "") + ": the order among them is not a claim.")
    fastest = max(fitting, key=lambda r: speed_of(r))
    if fastest is not best and objective != "speed":
        text += (f" The fastest configuration, {fastest.config.variant.label} ({_setting_words(fastest.config)}), "
                 f"is {_speed_words(fastest, best)}")
        if fastest.quality is not None and best.quality is not None and fastest.quality < best.quality:
            text += f" but its quality prior is lower ({fastest.quality:.3f} vs {best.quality:.3f})"
        text += "."
    if objective != "quality":
        known = [r for r in fitting if r.quality is not None]
        top = max(known, key=lambda r: (r.quality, speed_of(r))) if known else None
        if top is not None and best.quality is not None and top.quality is not None \
                and top.quality - best.quality > quality_tolerance():
            text += (f" For quality, {top.config.variant.label} has a higher prior ({top.quality:.3f} vs "
                     f"{best.quality:.3f}) and is {_speed_words(top, best)}.")
    if b.variant.method != "full" and not any(r.config.variant.method == "full" for r in fitting):
        text += " Full fine-tuning does not fit with any searched optimizer (8-bit and paged included)."
    if b.grad_ckpt is False and any(r.config.grad_ckpt and r.config.variant == b.variant for r in fitting):
        text += " It skips gradient checkpointing, which would recompute every layer's forward (about a third more time)."
    if tokens is not None and best.train_time_s is not None:
        text += f" Training on {tokens:,} tokens takes about {_fmt_duration(best.train_time_s)}"
        text += f" (${best.train_cost_usd:,.2f} at ${price:.2f}/h)." if best.train_cost_usd is not None and price else "."
    if best.tokens_per_s is None:
        text += (f" {gpu.name} has no throughput figures in the catalog: configurations are ranked by FLOPs per "
                 f"token ({best.flops_per_step / (b.micro_batch * b.seq_len) / 1e9:,.1f} GFLOP per token here).")
    else:
        text += (" Step time is a roofline over the step's kernels (data/roofline.json); `peftplan estimate "
                 f"{b.flags()} --explain` shows where it goes.")
    return text
