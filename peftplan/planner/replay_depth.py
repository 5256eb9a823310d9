"""The planner's recording of a deep model from two shallow ones (engine/depth.py's extrapolation, symbolic).

`replay._Structure` needs, for one structure, every running total of the step that can be its peak
(as polynomials in B, T, r), the optimizer state, the trainable tensors and the kernels. Recorded on
every block, that costs the full symbolic step plus a Pareto pass over all its totals (~1 s per
structure for an 8B model, most of a cold `peftplan plan`). Blocks repeat, so this module records
the step as engine/depth.py simulates it: the repeating unit 3 and 4 times, on a MarkingAllocator
that cuts the timeline into segments (per block and region), and builds the candidates of the full
depth from the segments' local walks.

Why it is exact. depth.py's checks (`periodic_samples`: the canonical events of every copy equal, the
segments outside the copies equal between the runs) hold, and so do this module's own: each segment's
local summary (its candidates relative to its start, its change of the total, its trainables, its
optimizer-state adds) is equal in every copy and between the runs, with the encoded, unrounded sizes.
Then at full depth the running total at any point of a copy segment is its start total plus the same
local walk, and the start total is affine in the copy index c; each candidate's value at a concrete
(B, T, r) is affine in c, so its largest is at the first or the last copy: those two instances of
each copy segment give every candidate that can be the peak (the others are never larger). Every
emitted value is a real running total of the full step, so the set is exact, not a bound.
Candidates are taken at every free after a rise, at spikes, at segment starts and at the end:
a superset of `timeline_candidates`' (the walk of a recording of every block, also here), which
changes no maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.depth import (MarkingAllocator, NotPeriodic, _expand, _family, _flops, _roles, _Run,
                            depth_shape, periodic_samples, shallow_model)
from ..training import Training
from .encoding import _ADD, _FREE, _NEW



def timeline_candidates(events: list[tuple[Any, ...]], timeline: list[int], not_exact: type):  # type: ignore[no-untyped-def]
    """Candidates for the peak before / after the optimizer state appears, the state, the trainables.

    Allocations only add and frees only subtract, so the running total can only peak at the last
    event before a free, at a spike, or at the end: those are the candidates (`_local`'s walk). The
    optimizer state's own add is left out of the running total (the caller adds the state of the
    optimizer it evaluates). The recording of every block (record._record_step's fallback) takes this;
    `not_exact`: encoding._NotExact.
    """
    adds = [i for i, ev in enumerate(events) if ev[0] == _ADD and ev[2] == "optimizer_state"]
    if not adds:
        raise not_exact("no optimizer state was recorded")
    if len(adds) > 1:
        raise not_exact("optimizer state added twice")
    before, after = _local(events[:adds[0]], timeline), _local(events[adds[0] + 1:], timeline)
    if before.optimizer_scratch or after.optimizer_scratch:
        raise not_exact("the optimizer step allocates scratch")
    return list(before.cands), [before.delta + c for c in after.cands], events[adds[0]][1], list(before.trainables)


@dataclass(frozen=True)
class _Local:
    """One segment's walk, relative to the total at its start (encoded sizes)."""

    cands: tuple[int, ...]
    delta: int
    trainables: tuple[tuple[int, Any], ...]
    state: int  # optimizer-state bytes added here (kept out of the running total)
    optimizer_scratch: bool  # a spike with bytes in an optimizer phase


def _local(events: list[tuple[Any, ...]], timeline: list[int]) -> _Local:
    """The walk over `events`; a tensor whose allocation engine/autograd.py took off `timeline` (sim's
    Allocator.events: an output of the op a checkpoint recompute stops at, never computed, whose peak the
    engine restores) is left out, as the engine leaves it out of the peak."""
    cur = 0
    rising = True  # the segment's start total is a real total: a candidate if a free comes first
    cands: list[int] = []
    trainables: list[tuple[int, Any]] = []
    state = 0
    scratch = False
    for ev in events:
        kind = ev[0]
        if kind == _NEW:
            t = ev[1]
            if t.event >= 0 and not timeline[t.event]:
                continue
            if ev[2] == "trainable_params":
                trainables.append((t.numel, t.dtype))
            cur += t.nbytes
            rising = True
        elif kind == _FREE:
            if ev[1].event >= 0 and not timeline[ev[1].event]:
                continue
            if rising:
                cands.append(cur)
            cur -= ev[1].nbytes
            rising = False
        elif kind == _ADD:
            if ev[2] == "optimizer_state":
                state += ev[1]
                continue
            cur += ev[1]
            rising = True
        else:
            _, nbytes, phase = ev
            if phase.startswith("optimizer") and nbytes:
                scratch = True
            cands.append(cur + nbytes)
    if rising:
        cands.append(cur)
    return _Local(tuple(cands), cur, tuple(trainables), state, scratch)


def record_extrapolated(model: Any, training: Training, recorder_mixin: type, events: list[tuple[Any, ...]],
                        flop_counter: Any, simulate: Any, not_exact: type) -> tuple[Any, ...] | None:
    """(pre, post, state, trainables) as timeline_candidates gives them for the full step, from two shallow
    runs, and (the depth shape, the one-copy run's FlopCount) for replay.py's FLOP check; None when the model's depth cannot be extrapolated (the caller records every block).

    `recorder_mixin`: replay.py's recording allocator methods (appending to `events`); `simulate`:
    engine/step.py `_simulate`; `flop_counter` gets the full depth's counts and `table` (KernelTable
    with encoded sizes); `not_exact`: the exception that sends the planner to estimate()."""
    from ..engine import ops, roofline

    shape = depth_shape(model, training)
    if shape is None:
        return None
    p, k, s = shape

    class _MarkingRecorder(recorder_mixin, MarkingAllocator):  # type: ignore[misc, valid-type]
        def __init__(self, roles: list[tuple[Any, ...]]) -> None:
            MarkingAllocator.__init__(self, roles)
            self._in_spike = False
            self.bounds = [0]  # index in `events` where each segment starts (one more than segs at the end)
            self.totals = [0]  # the (encoded) running total there

        def mark(self, kind: str, block: int | None = None) -> None:
            MarkingAllocator.mark(self, kind, block)
            self.bounds.append(len(events))
            self.totals.append(self.total)

    runs: list[tuple[_Run, list[_Local]]] = []
    counters = []
    for m in (1, 2):
        del events[:]
        alloc = _MarkingRecorder(_roles(p, m, s))
        counter = ops.FlopCount() if flop_counter is not None else None
        simulate(shallow_model(model, shape, m), training, counter, alloc)
        alloc.finish()
        run = _Run(alloc, p, m)
        # MarkingAllocator.mark appends the segment that ends there: segment i spans bounds[i]..bounds[i + 1]
        b, tot = alloc.bounds, alloc.totals
        walks = [_local(events[b[i]:b[i + 1]], alloc.events) for i in range(len(run.keys))]
        for i, w in enumerate(walks):  # a change of the total the recorder did not see (e.g. frees written
            if w.delta + w.state != tot[i + 1] - tot[i]:  # straight into the timeline) breaks the walk
                raise not_exact("a segment's total changes outside the recorded events")
        runs.append((run, walks))
        counters.append(counter)
    del events[:]
    (r1, l1), (r2, l2) = runs
    kmid = k - 2
    try:
        samples, _ = periodic_samples(r1, r2)
        full = _expand(r2, kmid)
        if flop_counter is not None:
            _flops(counters[0], counters[1], kmid, flop_counter, roofline)
    except NotPeriodic:
        return None
    local: dict[tuple[Any, ...], _Local] = {}
    for fam, (i1, i2, i21) in samples.items():
        if l1[i1] != l2[i2] or (i21 >= 0 and l2[i21] != l2[i2]):
            raise not_exact("a segment's encoded walk differs between copies or runs")
        local[fam] = l2[i2]
    pre: list[int] = []
    post: list[int] = []
    trainables: list[tuple[int, Any]] = []
    state_val = 0
    state_run = "before"  # the optimizer-state adds form one run of segments: before, in, after
    cur = 0
    for key in full:
        fam, c = _family(key)
        seg = local[fam]
        if seg.optimizer_scratch:
            raise not_exact("the optimizer step allocates scratch")
        if seg.state:
            if state_run == "after" or seg.cands != (0,) * len(seg.cands) or seg.delta:
                raise not_exact("the optimizer state is added in more than one run")
            state_run = "in"
            state_val += seg.state
            continue
        if state_run == "in" and (seg.cands or seg.delta or seg.trainables):
            state_run = "after"
        if state_run == "before":
            trainables.extend(seg.trainables)
        if c is None or c == 0 or c == kmid - 1:
            (post if state_run != "before" else pre).extend(cur + v for v in seg.cands)
        cur += seg.delta
    (post if state_run != "before" else pre).append(cur)
    if state_run == "before":
        raise not_exact("no optimizer state was recorded")
    return pre, post, state_val, trainables, (shape, counters[0])
