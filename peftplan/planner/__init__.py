"""`plan(arch, gpu)`: which fine-tuning setups fit on this GPU, ranked by throughput.

The search space is every method that applies (full, LoRA, QLoRA NF4 with and without double
quantization, DoRA, LISA, adapters, prompt / prefix / P-tuning, IA3, BitFit) x LoRA rank
{8, 16, 64} x LoRA targets {peft's default, attention, all-linear} x micro-batch {1, 2, 4, 8, 16
and the largest that fits} (or the divisors of --global-batch, with gradient accumulation filling
it) x gradient checkpointing {on, off} x SDPA attention (eager on request: it never beats
SDPA) x optimizer {adamw, adamw-8bit, paged-adamw-8bit}, in the GPU's mixed precision
(bf16-mixed, or fp16-mixed where the GPU has no bf16). Configurations that fit
(`Estimate.fits`) are ranked by the user's objective: quality (a sourced prior per method
family and target set, then speed), speed (tokens/s from the roofline step time) or cost.

One concern per module: `space` (what is searched and what is returned), `replay` (the exact fast
path: one symbolic step recorded per structure and replayed for every batch, sequence and rank;
its docstring says why it is exact), `cache` (recorded structures on disk), `evaluator` (rows
through the fast path or estimate()), `ranking` (order and cost), `search` (`plan()`), `explain`
(the plain-words why), `display` (the terminal), `report` (`plan --html`), `replay_time` (the
roofline step time on the fast path).
"""

from __future__ import annotations

from .display import plan_table, print_plan
from .evaluator import (Evaluator, clear_cache, precision_for, row_from_estimate, sharding_modelled)
from .search import EXACT_ROWS, plan
from .space import (ATTENTIONS, DEFAULT_METHODS, GRAD_CKPT, LORA_LIKE, MAX_MICRO_BATCH_SEARCH, MICRO_BATCHES,
                    OBJECTIVES, OPTIMIZERS, RANKS, SEQ_SWEEP, SHARD_SEARCH, TARGETS, MethodLimit, PlanConfig,
                    PlanResult, PlanRow, PlanStats, Variant, variants_for)

__all__ = ["EXACT_ROWS", "OBJECTIVES", "TARGETS", "ATTENTIONS", "DEFAULT_METHODS", "Evaluator", "GRAD_CKPT", "LORA_LIKE", "MAX_MICRO_BATCH_SEARCH",
           "MICRO_BATCHES", "MethodLimit", "OPTIMIZERS", "PlanConfig", "PlanResult", "PlanRow", "PlanStats",
           "RANKS", "SEQ_SWEEP", "SHARD_SEARCH", "Variant", "clear_cache", "plan", "plan_table", "precision_for",
           "print_plan", "row_from_estimate", "sharding_modelled", "variants_for"]
