"""What to change when a run does not fit: each candidate change re-estimated, not guessed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .arch import ModelArch
from .catalog import GPU
from .estimate import Estimate, estimate


@dataclass(frozen=True)
class Advice:
    change: str  # the CLI flags that make the change
    device_total_bytes: int
    fits: bool


def _candidates(est: Estimate) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(flags, method, training changes, option changes) worth trying, cheapest in quality first."""
    t = est.training
    out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    if not t.grad_ckpt:
        out.append(("--grad-ckpt", est.method, {"grad_ckpt": True}, {}))
    if t.micro_batch > 1:
        out.append((f"--batch 1 --grad-accum {t.micro_batch * t.grad_accum}", est.method,
                    {"micro_batch": 1, "grad_accum": t.micro_batch * t.grad_accum}, {}))
        if not t.grad_ckpt:
            out.append((f"--batch 1 --grad-accum {t.micro_batch * t.grad_accum} --grad-ckpt", est.method,
                        {"micro_batch": 1, "grad_accum": t.micro_batch * t.grad_accum, "grad_ckpt": True}, {}))
    if est.method in ("full", "lisa") and t.optimizer == "adamw":
        out.append(("--optimizer paged-adamw-8bit", est.method, {"optimizer": "paged-adamw-8bit"}, {}))
    if est.method in ("full", "lora", "dora", "lisa", "adapter", "ia3"):
        out.append(("--method qlora", "qlora", {}, {}))
        out.append(("--method qlora --batch 1", "qlora", {"micro_batch": 1, "grad_accum": t.micro_batch * t.grad_accum}, {}))
    if t.seq_len > 512:
        out.append((f"--seq {t.seq_len // 2}", est.method, {"seq_len": t.seq_len // 2}, {}))
    return out


def what_to_change(arch: ModelArch, est: Estimate, gpu: GPU, options: dict[str, Any]) -> list[Advice]:
    """Candidate changes with their re-estimated device totals; those that fit first, smallest change first."""
    advice: list[Advice] = []
    for flags, method, tchanges, ochanges in _candidates(est):
        opts = dict(options) if method == est.method else {}
        opts.update(ochanges)
        try:
            alt = estimate(arch, method, est.training.with_(**tchanges), gpu, opts)
        except ValueError:
            continue
        advice.append(Advice(flags, alt.memory.device_total_bytes, alt.fits))
    return sorted(advice, key=lambda a: (not a.fits,))
