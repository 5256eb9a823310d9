"""`plan()`: the search over methods and settings, the per-method limits, and the result."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Iterable, Sequence

from ..arch import ModelArch
from ..catalog import GPU
from ..estimate import Estimate
from ..methods import MethodError, get_method, method_names
from ..training import DEFAULT_SEQ_LEN, SHARDS, TrainingError
from .evaluator import Evaluator, precision_for, row_from_estimate, sharding_modelled
from .explain import _explain, _what_would_fit
from .ranking import _with_cost, rank_rows, speed_of
from .space import (ATTENTIONS, DEFAULT_METHODS, GRAD_CKPT, MAX_MICRO_BATCH_SEARCH, MICRO_BATCHES, OBJECTIVES,
                    OPTIMIZERS, RANKS, SEQ_SWEEP, SHARD_SEARCH, TARGETS, MethodLimit, PlanConfig, PlanResult, PlanRow,
                    variants_for)


def _unique_list(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out



def plan(arch: ModelArch, gpu: GPU, n_gpus: int = 1, seq_len: int | None = None, tokens: int | None = None,
         price_per_hour: float | None = None, methods: Iterable[str] | None = None, *,
         ranks: Sequence[int] = RANKS, micro_batches: Sequence[int] = MICRO_BATCHES,
         grad_ckpt: Sequence[bool] = GRAD_CKPT, attentions: Sequence[str] = ATTENTIONS,
         optimizers: Sequence[str] = OPTIMIZERS, seq_sweep: Sequence[int] = SEQ_SWEEP,
         shard: str | None = None, shards: Sequence[str] | None = None,
         targets: Sequence[str | None] = TARGETS, objective: str = "quality", global_batch: int | None = None,
         fast: bool = True, verify: bool = True, alloc_conf: str = "", trainer: str = "hf",
         trainer_options: tuple[str, ...] = ()) -> PlanResult:
    """Every searched configuration of `arch` on `n_gpus` x `gpu`; those that fit ranked by `objective`
    (ranking.py: "quality" (default), "speed" or "cost").

    Each LoRA-family method is searched over `targets` (peft's default, attention, all-linear) and
    `ranks`; for every setting that fits at the largest searched micro-batch, the largest
    micro-batch that fits is searched too (fast path) and added. `global_batch` fixes the sequences
    per optimizer step: each micro-batch that divides it (per GPU) runs with the gradient
    accumulation that fills it.

    With `n_gpus` > 1, every configuration carries `n_gpus` and a sharding strategy (`shard`, or
    each of `shards`; default "ddp", and also ZeRO-2/3 when estimate() models sharding) into
    estimate(). The fast path records one GPU's step: when estimate() models sharding (probed on
    this model), sharded configurations are estimated directly (slower, exact); while it does not,
    they are exactly the one-GPU numbers and the plan says so.

    `trainer` (with its switches `trainer_options`) runs every configuration as estimate() does under it;
    "hf", the bare transformers Trainer step, is recorded once per method setting, any other trainer once per
    micro-batch, sequence length and rank (planner/replay_point.py), which is slower.
    """
    started = time.perf_counter()
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n-gpus must be a positive integer, got {n_gpus!r}")
    seq = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
        raise TrainingError(f"seq-len must be a positive integer, got {seq!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    from ..trainers import get_trainer

    get_trainer(trainer).check_options(tuple(trainer_options))  # an unknown trainer or switch: one line
    per_gpu_batch = None
    if global_batch is not None:
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1 \
                or global_batch % n_gpus:
            raise ValueError(f"global-batch must be a positive multiple of the number of GPUs ({n_gpus}), "
                             f"got {global_batch!r}")
        per_gpu_batch = global_batch // n_gpus
        micro_batches = tuple(d for d in range(1, per_gpu_batch + 1) if per_gpu_batch % d == 0)
    chosen = list(methods) if methods is not None else [m for m in DEFAULT_METHODS if m in method_names()]
    for m in chosen:
        get_method(m)  # unknown names raise MethodError with a suggestion
    precision = precision_for(gpu)
    price = price_per_hour if price_per_hour is not None else gpu.price_per_hour_usd
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    for s_ in ([shard] if shard is not None else []) + list(shards or []):
        if s_ not in SHARDS:
            from ..suggest import did_you_mean

            raise TrainingError(f"unknown sharding {s_!r}{did_you_mean(s_, {k: k for k in SHARDS})} "
                                f"(choose from {', '.join(SHARDS)})")
    modelled = False
    if n_gpus == 1:
        shard_list: list[str] = ["none"]
    else:
        wanted = list(shards) if shards else ([shard] if shard not in (None, "none") else [])
        modelled = sharding_modelled(arch, gpu, n_gpus, tuple(wanted) or ("zero3",))
        if not wanted:
            wanted = list(SHARD_SEARCH) if modelled else ["ddp"]
        shard_list = _unique_list(wanted)
        if modelled:
            notes.append(f"{n_gpus} GPUs ({', '.join(shard_list)}): estimate() models sharding; the fast path records "
                         "one GPU's step, so these configurations are estimated directly (exact, slower). Time and "
                         f"cost are for all {n_gpus} GPUs, each paid for; the step time includes the collectives, "
                         "assumed to overlap compute")
            # Direct estimates cost tens of ms each: searching the one-GPU defaults would take minutes.
            # Narrow what the caller left at its default (sdpa never loses to eager here: same FLOPs
            # or fewer, less memory) and say so.
            narrowed = []
            if ranks is RANKS:
                ranks, narrowed = (16,), narrowed + ["rank 16"]
            if attentions is ATTENTIONS:
                attentions, narrowed = ("sdpa",), narrowed + ["sdpa attention"]
            if optimizers is OPTIMIZERS:
                optimizers, narrowed = ("adamw", "adamw-8bit"), narrowed + ["adamw / adamw-8bit"]
            if narrowed:
                notes.append("multi-GPU search narrowed to " + ", ".join(narrowed) + " (estimate() is called for each)")
        else:
            notes.append(f"{n_gpus} GPUs: multi-GPU sharding (DDP/FSDP/DeepSpeed) is not modelled yet by estimate(); "
                         "this plan is for one GPU, each of the others would hold the same. Time and cost assume "
                         f"{n_gpus} data-parallel GPUs scaling linearly")
    point_wise = trainer != "hf" or bool(trainer_options)
    if point_wise:
        # replay_point.py: one symbolic step per micro-batch, sequence length and rank (the optimizers share it)
        narrowed = ""
        if ranks is RANKS:
            ranks, narrowed = (16,), "; the search is narrowed to LoRA rank 16 (pass --ranks for more)"
        switches = f" ({', '.join(trainer_options)})" if trainer_options else ""
        notes.append(f"planned for trainer {trainer!r}{switches} as estimate() runs it: its loss is not a polynomial of the "
                     "batch (tiles of a fixed number of tokens), so each micro-batch, sequence length and rank is "
                     f"one symbolic step (slower than the bare step's one per method setting){narrowed}")
    ev = Evaluator(arch, ranks=ranks, fast=fast, sharded_fast=not modelled)
    ev.alloc_conf = alloc_conf
    ev.trainer, ev.trainer_options = trainer, tuple(trainer_options)

    settings = [(ck, at, opt, sh) for sh in shard_list for ck in grad_ckpt for at in attentions for opt in optimizers]

    variants = [v for m in chosen for v in variants_for(m, ranks, targets)]

    def accum_for(mb: int) -> int:
        return per_gpu_batch // mb if per_gpu_batch else 1

    def largest_micro_batch(cfg: PlanConfig) -> int | None:
        """The largest micro-batch that fits beyond the grid: exact fit verdicts, on the fast path (or
        with fast=False, the reference mode that estimates everything); not for configurations the
        fast path cannot take (sharded ones estimated directly: a dozen estimate() calls each)."""
        if per_gpu_batch is not None or (ev.fast and not ev.searchable(cfg)) or not ev.fits(cfg, gpu):
            return None
        lo, hi = cfg.micro_batch, MAX_MICRO_BATCH_SEARCH
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ev.fits(replace(cfg, micro_batch=mid), gpu):
                lo = mid
            else:
                hi = mid - 1
        return lo if lo > cfg.micro_batch else None

    # ---- the grid at the plan's sequence length ------------------------------------------
    def grid() -> dict[PlanConfig, PlanRow]:
        rows: dict[PlanConfig, PlanRow] = {}
        for v in variants:
            for ck, at, opt, sh in settings:
                extra = None
                for mb in list(micro_batches) + [None]:
                    if mb is None:  # after the grid: the largest micro-batch that fits, if beyond it
                        last = PlanConfig(v, max(micro_batches), seq, ck, at, opt, precision, n_gpus, sh,
                                          accum_for(max(micro_batches)))
                        if ev.error(last) is not None:
                            break
                        extra = largest_micro_batch(ev.effective(last))
                        if extra is None:
                            break
                        mb = extra
                    cfg = PlanConfig(v, mb, seq, ck, at, opt, precision, n_gpus, sh, accum_for(mb))
                    why = ev.error(cfg)
                    if why is not None:
                        alone = ck and any(ev.error(replace(cfg, grad_ckpt=c2)) is None for c2 in grad_ckpt)
                        entry = (f"{v.label} with grad-ckpt on" if alone else v.label, why)
                        if entry not in skipped:
                            skipped.append(entry)
                        continue
                    eff = ev.effective(cfg)
                    if eff not in rows:  # QLoRA with checkpointing off runs with it on (kbit prep)
                        try:
                            rows[eff] = _with_cost(ev.evaluate(cfg, gpu), tokens, price, n_gpus)
                        except MethodError as exc:  # estimate() refuses this combination
                            entry = (f"{v.label} with {opt}" + (f", {sh}" if cfg.sharded else ""),
                                     str(exc).splitlines()[0])
                            if entry not in skipped:
                                skipped.append(entry)
        return rows

    # The first row shown is re-estimated with estimate(): should the fast path ever disagree (an
    # engine change it does not cover), that structure is evaluated directly from then on.
    # the symbolic steps the grid needs, recorded on every core first (a no-op with one core or a warm cache)
    ev.prefetch(PlanConfig(v, mb, seq, ck, at, opt, precision, n_gpus, sh, accum_for(mb))
                for v in variants for ck, at, opt, sh in settings for mb in micro_batches)
    best_estimate = None
    for _attempt in range(8):
        rows = grid()
        fitting = rank_rows([r for r in rows.values() if r.fits], objective)
        closest = sorted((r for r in rows.values() if not r.fits), key=lambda r: (r.device_total_bytes, r.config.label))
        first = fitting[0] if fitting else (closest[0] if closest else None)
        if not verify or first is None or first.path == "direct":
            break
        best_estimate = ev.estimate(first.config, gpu)
        direct = row_from_estimate(first.config, best_estimate)
        if (direct.peak_allocated_bytes, direct.flops_per_step, direct.trainable_params) == \
                (first.peak_allocated_bytes, first.flops_per_step, first.trainable_params):
            break
        ev.distrust(first.config)
        notes.append(f"the fast path disagreed with estimate() on {first.config.variant.label} "
                     f"({'ckpt' if first.config.grad_ckpt else 'no ckpt'}, {first.config.attention}): "
                     "estimated directly")
    fitting, closest, first_estimate = _exact_rows(ev, gpu, fitting, closest, objective)
    if first_estimate is not None:
        best_estimate = first_estimate
    if not fitting:
        best_estimate = None
    forced = _unique_list(v.method for v in variants for c in [PlanConfig(v, 1, seq, False, attentions[0],
                                                                         optimizers[0], precision, n_gpus,
                                                                         shard_list[0])]
                          if ev.error(c) is None and ev.effective(c).grad_ckpt)
    if forced and False in grad_ckpt:
        notes.append(f"{', '.join(forced)}: prepare_model_for_kbit_training turns gradient checkpointing on, "
                     "so only checkpointed configurations exist")

    # ---- per method: largest sequence length (batch 1) and micro-batch (plan seq) --------
    context = arch.max_position_embeddings
    sweep = [x for x in seq_sweep if context is None or x <= context]
    limits: list[MethodLimit] = []
    for m in chosen:
        bases: dict[PlanConfig, PlanConfig] = {}
        for v in (v for v in variants if v.method == m):
            for ck, at, opt, sh in settings:
                if (modelled or point_wise) and (ck != max(grad_ckpt) or opt != optimizers[-1]):
                    continue  # a symbolic step per point: the limits only from the least memory-hungry settings
                b = PlanConfig(v, 1, seq, ck, at, opt, precision, n_gpus, sh)
                if ev.error(b) is None:
                    bases.setdefault(ev.effective(b), b)
        if not bases:
            continue
        # largest power-of-two sequence that fits at micro-batch 1 (the peak only grows with T)
        by_seq: dict[int, list[PlanConfig]] = {}
        for b in bases.values():
            lo, hi, found = 0, len(sweep) - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                if ev.fits(replace(b, seq_len=sweep[mid]), gpu):
                    found, lo = sweep[mid], mid + 1
                else:
                    hi = mid - 1
            if found is not None:
                by_seq.setdefault(found, []).append(b)
        seq_row = None
        if by_seq:
            top = max(by_seq)
            seq_row = max((ev.evaluate(replace(b, seq_len=top), gpu) for b in by_seq[top]),
                          key=lambda r: (r.headroom_bytes, speed_of(r)))  # most headroom, then fastest
        # largest micro-batch at the plan's sequence length (the peak only grows with B)
        by_mb: dict[int, list[PlanConfig]] = {}
        searched_to = max(micro_batches)
        for b in bases.values():
            if not ev.fits(b, gpu):
                continue
            if ev.searchable(b):
                searched_to = MAX_MICRO_BATCH_SEARCH
                lo, hi = 1, MAX_MICRO_BATCH_SEARCH
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if ev.fits(replace(b, micro_batch=mid), gpu):
                        lo = mid
                    else:
                        hi = mid - 1
                found_mb = lo
            else:
                found_mb = max([1] + [x for x in micro_batches if x > 1 and ev.fits(replace(b, micro_batch=x), gpu)])
            by_mb.setdefault(found_mb, []).append(b)
        mb_row = None
        if by_mb:
            top = max(by_mb)
            mb_row = max((ev.evaluate(replace(b, micro_batch=top), gpu) for b in by_mb[top]),
                         key=lambda r: (r.headroom_bytes, speed_of(r)))
        limited = bool(seq_row is not None and context is not None and sweep and seq_sweep
                       and seq_row.config.seq_len == sweep[-1] and sweep[-1] < seq_sweep[-1])
        limits.append(MethodLimit(m, seq_row.config.seq_len if seq_row else None, seq_row,
                                  mb_row.config.micro_batch if mb_row else None, mb_row, searched_to, limited))

    if limits and fast:
        notes.append("largest sequence / micro-batch per method: searched on allocated + CUDA context, a lower "
                     "bound of the device total (the caching-allocator replay needs each configuration's own "
                     f"timeline); the first {EXACT_ROWS} configurations that fit are re-estimated with it")
    if tokens is not None and price is None:
        notes.append("no price per hour for this GPU in the catalog: pass price_per_hour for costs")
    suggestion = None if fitting else _what_would_fit(ev, arch, gpu, closest, limits, seq, chosen, precision,
                                                      n_gpus, modelled)
    explanation = _explain(fitting, closest, gpu, tokens, price, suggestion, objective)
    ev.persist()
    stats = ev.stats
    stats.seconds = time.perf_counter() - started
    return PlanResult(model=arch.name, gpu=gpu, n_gpus=n_gpus, seq_len=seq, tokens=tokens, price_per_hour=price,
                      precision=precision, rows=fitting, closest=closest, limits=limits, skipped=skipped,
                      explanation=explanation, notes=notes, suggestion=suggestion, stats=stats,
                      best_estimate=best_estimate, objective=objective, global_batch=global_batch, trainer=trainer)



EXACT_ROWS = 20  # rows re-estimated with the allocator replay (the table shows 15 by default)


def _exact_rows(ev: Evaluator, gpu: GPU, fitting: list[PlanRow], closest: list[PlanRow], objective: str
                ) -> tuple[list[PlanRow], list[PlanRow], Estimate | None]:
    """Rows with estimate()'s own numbers and fit verdict (fit.py: reserved from the caching-allocator
    replay) for what plan_table shows: the first EXACT_ROWS fitting rows, and the first fitting row of
    each method variant / checkpointing / attention / shard up to EXACT_ROWS of them; the closest misses
    when nothing fits. A fast row's device total is a lower bound, so a row can only move from fitting
    to not; the ones that do join `closest`."""
    estimates: dict[PlanConfig, Estimate] = {}
    out: list[PlanRow] = []
    missed: list[PlanRow] = []
    exact_keys: set[tuple[str, bool, str, str]] = set()
    # the rows the loop below re-estimates (a few more where a row drops out), on every core first
    wanted: list[PlanConfig] = []
    for row in fitting:
        key = (row.config.variant.label, row.config.grad_ckpt, row.config.attention, row.config.shard)
        if row.path != "direct" and (len(wanted) < EXACT_ROWS or (key not in exact_keys
                                                                   and len(exact_keys) < EXACT_ROWS)):
            wanted.append(row.config)
            exact_keys.add(key)
    if not fitting:
        wanted = [r.config for r in closest[:EXACT_ROWS] if r.path != "direct"]
    ev.prefetch_estimates(wanted, gpu)
    exact_keys.clear()
    for row in fitting:
        key = (row.config.variant.label, row.config.grad_ckpt, row.config.attention, row.config.shard)
        if row.path != "direct" and (len(out) < EXACT_ROWS or (key not in exact_keys
                                                                and len(exact_keys) < EXACT_ROWS)):
            try:
                est = ev.estimate(row.config, gpu)
            except MethodError:
                continue
            row = replace(row_from_estimate(row.config, est), train_time_s=row.train_time_s,
                          train_cost_usd=row.train_cost_usd)
        else:
            est = None
        if (not row.fits or row.headroom_bytes < 0) and est is not None:
            # a fast row's micro-batch was searched on the lower bound: the largest one that fits exactly
            # may be a little smaller (at most a few steps: reserved exceeds allocated by a few percent)
            smaller = _largest_exact_below(ev, gpu, row, taken={r.config for r in fitting})
            if smaller is not None:
                missed.append(row)
                row, est = smaller
        if not row.fits or row.headroom_bytes < 0:
            # not fitting, or fitting only because the caching allocator flushes its cache and retries
            # (fit.py: every flush synchronizes the step): not a configuration to recommend
            missed.append(row)
            continue
        if est is not None:
            estimates[row.config] = est
        if row.path == "direct":
            exact_keys.add(key)
        out.append(row)
    if not fitting:
        closest = [row_from_estimate(r.config, ev.estimate(r.config, gpu)) if r.path != "direct" else r
                   for r in closest[:EXACT_ROWS]] + closest[EXACT_ROWS:]
    closest = sorted(missed + closest, key=lambda r: (r.device_total_bytes, r.config.label))
    ranked = rank_rows(out, objective)
    first = estimates.get(ranked[0].config) if ranked else None  # the winner's own estimate, when it has one
    return ranked, closest, first


def _largest_exact_below(ev: Evaluator, gpu: GPU, row: PlanRow, taken: set[PlanConfig], tries: int = 4
                         ) -> tuple[PlanRow, Estimate] | None:
    """The largest micro-batch below `row`'s that fits by estimate()'s own verdict (with headroom), within
    `tries` estimates and not already a row: the fast search's lower bound (allocated + context) can
    overshoot by several steps at large micro-batches. The first probe is the largest micro-batch whose lower
    bound plus `row`'s own reserved-over-allocated gap fits (the caching allocator's slack changes little
    between neighbouring micro-batches); the probes then step down one at a time."""
    mb = row.config.micro_batch
    start = mb - 1
    bound = ev.lower_bound(row.config)
    if bound is not None and start > 1:
        gap = max(0, row.device_total_bytes - bound)
        lo, hi = 1, start
        while lo < hi:  # the lower bound grows with the micro-batch
            mid = (lo + hi + 1) // 2
            b = ev.lower_bound(replace(row.config, micro_batch=mid))
            if b is not None and b + gap <= gpu.memory_bytes:
                lo = mid
            else:
                hi = mid - 1
        start = lo

    def probe(micro_batch: int) -> tuple[PlanRow, Estimate] | None:
        cfg = replace(row.config, micro_batch=micro_batch)
        est = ev.estimate(cfg, gpu, flush_check=False)  # a probe that does not fit is dropped either way
        candidate = row_from_estimate(cfg, est)
        if row.train_time_s and row.tokens_per_s and candidate.tokens_per_s:
            # the same tokens at this configuration's speed (ranking._with_cost): time and cost scale alike
            scale = row.tokens_per_s / candidate.tokens_per_s
            candidate = replace(candidate, train_time_s=row.train_time_s * scale,
                                train_cost_usd=None if row.train_cost_usd is None else row.train_cost_usd * scale)
        return (candidate, est) if candidate.fits and candidate.headroom_bytes >= 0 else None

    left = tries
    for smaller in range(start, max(start - tries, 0), -1):
        if replace(row.config, micro_batch=smaller) in taken:
            return None
        try:
            found = probe(smaller)
            left -= 1
            if found is None:
                continue
            # the gap may be smaller at smaller micro-batches: the ones above the first that fits, while they fit
            for larger in range(smaller + 1, mb):
                if left <= 0 or replace(row.config, micro_batch=larger) in taken:
                    break
                better = probe(larger)
                left -= 1
                if better is None:
                    break
                found = better
            return found
        except MethodError:
            return None
    return None
