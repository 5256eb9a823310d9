"""How rows are ordered and what a run costs."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from typing import Any

from .space import _OPTIMIZER_PREFERENCE, PlanRow


def _rank_key(row: PlanRow) -> tuple[Any, ...]:
    """Fastest first. On one GPU, tokens/s = tokens x peak x utilization / FLOPs, so the exact
    FLOPs per token order the rows the same way (without float ties, and also on a GPU without
    throughput figures). The model's throughput is linear in micro-batch, so equal FLOPs per token
    are broken by the larger micro-batch (fewer optimizer steps), the exact optimizer over
    quantized states, then the larger headroom."""
    c = row.config
    return (Fraction(row.flops_per_step, c.micro_batch * c.seq_len), -c.micro_batch,
            _OPTIMIZER_PREFERENCE.get(c.optimizer, 9), -row.headroom_bytes, c.label)


def _with_cost(row: PlanRow, tokens: int | None, price: float | None, n_gpus: int = 1) -> PlanRow:
    """Time to train `tokens` and its cost: `tokens_per_s` is one GPU's (estimate()); N data-parallel
    GPUs are assumed to scale linearly (no communication time) and each is paid for."""
    if tokens is None or not row.tokens_per_s:
        return row
    secs = tokens / (row.tokens_per_s * n_gpus)
    cost = secs / 3600 * price * n_gpus if price is not None else None
    return replace(row, train_time_s=secs, train_cost_usd=cost)

