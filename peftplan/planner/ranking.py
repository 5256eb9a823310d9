"""How rows are ordered: by the user's objective (quality, speed or cost), with ties within the models' error.

quality: the method family's prior (data/quality_prior.json: PEFT's MetaMathQA comparison, the
QLoRA and LoRA papers), grouped into tiers whose members differ by less than the prior's tie
tolerance; within a tier the faster row first. speed: tokens/s (the roofline step time). cost:
money for the training tokens at the price per GPU-hour (on one GPU the same order as speed).
Rows whose quality and tokens/s both differ from the row above by less than the tolerances
(the quality prior's, and the step-time model's data/roofline.json `step_time_tolerance`) are
marked as ties: the order among them is not a claim the models can support.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from functools import lru_cache
from typing import Any, Sequence

from ..engine.roofline import constants as roofline_constants
from .quality import quality_prior, quality_source_for
from .space import _OPTIMIZER_PREFERENCE, LORA_LIKE, PlanRow, Variant


def quality_tolerance() -> float:
    return float(quality_prior()["tie_tolerance"]["value"])


def speed_tolerance() -> float:
    return float(roofline_constants()["step_time_tolerance"]["value"])


@lru_cache(maxsize=None)
def quality_of(variant: Variant) -> float | None:
    """The prior for a variant: its family's value, plus the target set's for LoRA-family methods."""
    prior = quality_prior()
    fam = prior["families"].get(variant.method)
    if fam is None or fam["value"] is None:
        return None
    value = float(fam["value"])
    if variant.method in LORA_LIKE:
        value += float(prior["targets"].get(variant.targets, prior["targets"]["default"])["value"])
    return round(value, 6)


def quality_source(variant: Variant) -> str:
    return quality_source_for(variant.method, variant.targets, variant.method in LORA_LIKE)


def _fast_key(row: PlanRow) -> tuple[Any, ...]:
    """Fastest first (FLOPs per token where the GPU has no throughput figures); then the larger
    micro-batch, the exact optimizer over quantized states, the larger headroom, the label."""
    c = row.config
    speed: Any = -row.tokens_per_s if row.tokens_per_s else Fraction(row.flops_per_step, c.micro_batch * c.seq_len)
    return (speed, -c.micro_batch, _OPTIMIZER_PREFERENCE.get(c.optimizer, 9), -row.headroom_bytes, c.label)


def _tiers(values: Sequence[float | None], tol: float) -> dict[float | None, int]:
    """Quality tiers, best first: each tier holds the values within `tol` of its best; unknown last."""
    known = sorted({v for v in values if v is not None}, reverse=True)
    out: dict[float | None, int] = {}
    tier, top = -1, None
    for v in known:
        if top is None or top - v > tol + 1e-12:
            tier, top = tier + 1, v
        out[v] = tier
    out[None] = tier + 1
    return out


def ties_with(a: PlanRow, b: PlanRow, objective: str) -> bool:
    """Whether `b` is indistinguishable from `a` within the models' error: tokens/s within the step-time
    tolerance and, for the quality objective, quality priors within the prior's tie tolerance."""
    if not (a.tokens_per_s and b.tokens_per_s):
        return False
    if abs(a.tokens_per_s - b.tokens_per_s) > speed_tolerance() * max(a.tokens_per_s, b.tokens_per_s):
        return False
    if objective != "quality":
        return True
    if a.quality is None or b.quality is None:
        return a.quality is None and b.quality is None
    return abs(a.quality - b.quality) <= quality_tolerance() + 1e-12


def rank_rows(rows: Sequence[PlanRow], objective: str) -> list[PlanRow]:
    """Rows ordered by `objective`, each with its quality prior and whether it ties with the row above."""
    quality = {id(r): quality_of(r.config.variant) for r in rows}
    tiers = _tiers(list(quality.values()), quality_tolerance())
    if objective == "quality":
        ordered = sorted(rows, key=lambda r: (tiers[quality[id(r)]], _fast_key(r)))
    elif objective == "cost":
        ordered = sorted(rows, key=lambda r: (r.train_cost_usd if r.train_cost_usd is not None else float("inf"),
                                               _fast_key(r)))
    elif objective == "speed":
        ordered = sorted(rows, key=_fast_key)
    else:
        raise ValueError(f"unknown objective {objective!r} (choose from quality, speed, cost)")
    out: list[PlanRow] = []
    for r in ordered:
        row = replace(r, quality=quality[id(r)], tie=False)  # a row ranked before (search.py ranks twice) loses its old tie
        if out and ties_with(out[-1], row, objective):
            row = replace(row, tie=True)
        out.append(row)
    return out


def speed_of(row: PlanRow) -> float:
    """Tokens/s, or minus FLOPs per token where the GPU has no throughput figures (larger is faster)."""
    c = row.config
    return row.tokens_per_s if row.tokens_per_s else -row.flops_per_step / (c.micro_batch * c.seq_len)


def _with_cost(row: PlanRow, tokens: int | None, price: float | None, n_gpus: int = 1) -> PlanRow:
    """Time to train `tokens` and its cost: `tokens_per_s` counts every GPU (estimate()), each GPU is paid for."""
    if tokens is None or not row.tokens_per_s:
        return row
    secs = tokens / row.tokens_per_s
    cost = secs / 3600 * price * n_gpus if price is not None else None
    return replace(row, train_time_s=secs, train_cost_usd=cost)
