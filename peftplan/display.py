"""Rich rendering of an Estimate for the terminal (GiB = 2**30 throughout)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .estimate import Estimate
from .units import fmt_count, fmt_gib

COMPONENT_LABELS = {
    "frozen_params": "frozen weights",
    "trainable_params": "trainable weights",
    "quant_constants": "quantization constants",
    "grads": "gradients",
    "optimizer_state": "optimizer state",
    "saved_activations": "saved activations",
    "loss_logits": "logits + loss (fp32)",
    "temporaries": "temporaries / activation grads",
    "inputs": "input ids / labels",
    "unsharded_params": "unsharded params (FSDP all-gather)",
    "comm_buffers": "communication buffers",
}


def suggestions(est: Estimate) -> list[str]:
    """What to change when it does not fit, largest saving first (each re-estimated by the caller's rules)."""
    tips: list[str] = []
    c = est.memory.components
    t = est.training
    if c.get("saved_activations", 0) > 0.2 * est.memory.peak_allocated_bytes and not t.grad_ckpt:
        tips.append("turn on --grad-ckpt (keeps one layer's activations instead of all)")
    if t.micro_batch > 1:
        tips.append(f"lower --batch (now {t.micro_batch}) and raise --grad-accum to keep the effective batch")
    if c.get("loss_logits", 0) > 0.1 * est.memory.peak_allocated_bytes:
        tips.append("shorter --seq: the fp32 logits grow with seq x vocabulary")
    if est.method in ("full", "lisa") and c.get("optimizer_state", 0) > 0.2 * est.memory.peak_allocated_bytes:
        tips.append("--optimizer adamw-8bit or paged-adamw-8bit, or a PEFT method (lora/qlora)")
    if est.method in ("lora", "dora", "ia3", "prompt", "prefix", "ptuning", "adapter", "full"):
        tips.append("--method qlora: 4-bit base weights")
    return tips


def print_estimate(est: Estimate, explain: bool = False, traced: Any = None, advice: Any = None) -> None:
    console = Console()
    t = est.training
    from .trainers import get_trainer

    trainer = get_trainer(t.trainer)
    console.print(f"trainer: [bold]{trainer.name}[/bold] (models {trainer.label}: {trainer.summary})"
                  + (f" · {', '.join(t.trainer_options)}" if t.trainer_options else ""))
    console.print(
        f"[bold]{est.model}[/bold] · {est.method} · {est.gpu} ({fmt_gib(est.gpu_memory_bytes)}) · "
        f"batch {t.micro_batch} × seq {t.seq_len} × accum {t.grad_accum} · {t.precision} · {t.attention} · "
        f"{t.optimizer} ({t.optimizer_impl}) · grad-ckpt {'on' if t.grad_ckpt else 'off'}"
        + (f" · {t.shard} on {t.n_gpus} GPUs" + (f", offload {t.offload}" if t.offload != "none" else "")
           if t.n_gpus > 1 else "")
    )
    console.print(f"params: {est.params.total:,} total, {est.params.trainable:,} trainable "
                  f"({est.params.trainable_percent:.4f}%)")
    per_gpu = f"per GPU (rank 0) of {t.n_gpus}, " if t.n_gpus > 1 else ""
    table = Table(title=f"memory at the peak ({per_gpu}{est.memory.peak_phase})")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    peak = est.memory.peak_allocated_bytes
    labels = {**COMPONENT_LABELS, **({"loss_logits": "LM-head tiles (fused loss)"} if trainer.loss != "full_logits" else {})}
    for key, value in sorted(est.memory.components.items(), key=lambda kv: -kv[1]):
        table.add_row(labels.get(key, key), f"{value / 2**30:,.2f}", f"{100 * value / peak:.1f}%")
    table.add_section()
    table.add_row("[bold]peak allocated[/bold] (torch.cuda.max_memory_allocated)", f"[bold]{peak / 2**30:,.2f}[/bold]", "")
    table.add_row("peak reserved (caching allocator)", f"{est.memory.peak_reserved_bytes / 2**30:,.2f}", "")
    table.add_row("device total (reserved + CUDA context" + (" + NCCL" if est.memory.nccl_buffers_bytes else "") + ")",
                  f"{est.memory.device_total_bytes / 2**30:,.2f}", "")
    table.add_row("envelope (allocated)", f"{est.memory.envelope_low_bytes / 2**30:,.2f} – "
                  f"{est.memory.envelope_high_bytes / 2**30:,.2f}", "")
    if est.memory.paged_optimizer_bytes:
        table.add_row("paged optimizer state (unified memory, not allocated)",
                      f"{est.memory.paged_optimizer_bytes / 2**30:,.2f}", "")
    if est.parallel.get("host_bytes"):
        table.add_row("offloaded to host memory (per rank)", f"{est.parallel['host_bytes'] / 2**30:,.2f}", "")
    if traced is not None:
        table.add_row("CPU trace of the real step (peak live bytes)",
                      f"{traced.peak_bytes / 2**30:,.2f}", f"{100 * (peak - traced.peak_bytes) / traced.peak_bytes:+.2f}%")
    console.print(table)
    comp = est.compute
    if comp.step_time_s is not None:
        console.print(f"compute: {comp.flops_per_step:.3e} FLOP/step (forward {comp.flops_forward:.2e}, backward "
                      f"input {comp.flops_backward_input:.2e}, weight {comp.flops_backward_weight:.2e}, recompute "
                      f"{comp.flops_recompute:.2e}) → {comp.step_time_s:.3f} s/step, {comp.tokens_per_s:,.0f} tokens/s "
                      f"at {comp.utilization:.0%} of dense {comp.matmul_dtype} peak")
    else:
        console.print(f"compute: {comp.flops_per_step:.3e} FLOP/step (no throughput figure for this GPU)")
    if est.fits:
        console.print(f"[green]{est.verdict}[/green] on {est.gpu}" if est.verdict else
                      f"[green]fits[/green]: {fmt_gib(est.headroom_bytes)} headroom on {est.gpu}", markup=True)
    else:
        console.print(f"[red]does not fit[/red]: needs {fmt_gib(est.memory.device_total_bytes)}, "
                      f"{fmt_gib(-est.headroom_bytes)} over {est.gpu}'s {fmt_gib(est.gpu_memory_bytes)}")
        if advice:
            console.print("what to change (each re-estimated):")
            for a in advice[:5]:
                verdict = "[green]fits[/green]" if a.fits else "[red]still over[/red]"
                console.print(f"  • {a.change}: {fmt_gib(a.device_total_bytes)} → {verdict}")
        else:
            for tip in suggestions(est):
                console.print(f"  • {tip}")
    if explain:
        from .explain import explain_lines

        console.print("[bold]how each term is computed[/bold]")
        for line in explain_lines(est):
            console.print("  " + line, highlight=False)
    for note in est.assumptions:
        console.print(f"[dim]assumption: {note}[/dim]")
    _ = fmt_count
