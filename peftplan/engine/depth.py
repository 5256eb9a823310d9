"""The step of a deep model from two shallow ones: identical blocks simulated once, extrapolated exactly.

A model's blocks are split into a first block, a repeating unit of P blocks (P = 1 for a uniform
decoder, 6 for gemma3's 5 sliding + 1 global layers, ...) repeated k times, and the blocks left
after the last whole unit. `engine/step.py` runs the step on the same model with the unit repeated
m = 1 and m = 2 times, on a `MarkingAllocator` that cuts the timeline into segments: one per block
and region (its parameters' load, its forward, its backward, its cached autocast copies, its
optimizer state, scratch and gradients), one per phase and region outside the blocks. Each segment
keeps its own peak (total, phase, breakdown by category: `Allocator._note` restarted per segment)
and its own phase peaks.

Why it is exact. Every copy of the unit runs the same code on the same shapes, so its segments hold
the same allocations and frees. The frees are written canonically (a free of a tensor allocated in
another block's segment as the distance in blocks; outside the blocks, as the first or the last
copy), and the canonical segments of the copies must be equal to each other at m = 1 and m = 2, and
the segments outside the copies equal between m = 1 and m = 2: otherwise the configuration is not
periodic and the full simulation runs. With equal segments, the running total at any point of
segment (copy c of k) is the total at its start plus the same local walk, and the start is a sum of
whole segments before it: an affine function of (k, c) (a third point, m = 2's second copy, fixes
its coefficient of c). The peak of the step is the first segment maximum that reaches the largest
value (Allocator._note's strict `>`), evaluated for every segment of the full depth (a few hundred
affine evaluations); phase peaks the same. The allocation timeline (sim.Allocator.events, for the
caching-allocator replay) is rebuilt segment by segment from the canonical templates, with each
free pointing at its allocation's index in the full timeline. Kernel counts and FLOPs are affine in
m as well (each copy adds the same kernels).

Not extrapolated (the full simulation runs): several GPUs (FSDP / DeepSpeed hooks per block),
per-parameter optimizers (for-loop, Adafactor: their scratch sequence crosses the blocks), models
whose blocks do not repeat (T5's encoder and decoder stacks, LISA's active layers, methods that
target some layers), and models too shallow to gain (the two runs would simulate as many blocks).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import replace
from typing import Any

from ..training import Training
from ..tuned import TunedModel
from .sim import CATEGORIES, Allocator, Peak

_NO_PEAK = Peak(-1, "", {})


class NotPeriodic(Exception):
    """The two shallow runs do not have the structure the extrapolation needs."""


class MarkingAllocator(Allocator):
    """An Allocator whose timeline is cut into segments by `mark()` (engine/step.py, autograd.py)."""

    def __init__(self, roles: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.roles = roles  # shallow block index -> ("P", i) / ("C", copy, position) / ("S", j)
        self.segs: list[tuple[tuple[Any, ...], int, Peak, dict[str, int]]] = []
        self._key: tuple[Any, ...] = ("", "start", None)
        self._start = 0
        self.peak = _NO_PEAK
        self.phase_peaks = {}

    def mark(self, kind: str, block: int | None = None) -> None:
        self.segs.append((self._key, self._start, self.peak, self.phase_peaks))
        self._key = (self.phase, kind, self.roles[block] if block is not None else None)
        self._start = len(self.events)
        self.peak = _NO_PEAK
        self.phase_peaks = {}

    def set_phase(self, phase: str) -> None:
        super().set_phase(phase)
        self.mark("phase")

    def finish(self) -> None:
        self.mark("end")


def decompose(blocks: tuple[Any, ...]) -> tuple[int, int, int] | None:
    """(P, k, suffix length): blocks = [first] + unit(P) * k + suffix, with the smallest P, or None
    when two shallow runs would not simulate fewer blocks than the model has."""
    n = len(blocks)
    mid = blocks[1:]
    for p in range(1, (n - 1) // 3 + 1):
        k = len(mid) // p
        # the unit repeats k times from block 1; what is left (< P blocks) is the suffix; at least one
        # block after the copies, so the last block (the one the loss follows) is never a copy
        while k >= 1 and len(mid) - k * p < 1:
            k -= 1
        if k < 5:
            continue
        unit = mid[:p]
        if all(mid[c * p:(c + 1) * p] == unit for c in range(k)):
            s = len(mid) - k * p
            if (1 + 3 * p + s) + (1 + 4 * p + s) < n:
                return p, k, s
            return None
    return None


def _roles(p: int, mid: int, s: int) -> list[tuple[Any, ...]]:
    """Shallow block index -> role: the first block ("P", 0), the first copy of the unit ("F", u), `mid`
    middle copies ("C", copy, u), the last copy ("L", u), the blocks after it ("S", j). The first and
    last copies are kept out of the repeated family: their neighbours (the first block, the blocks
    after) are not copies."""
    return ([("P", 0)] + [("F", u) for u in range(p)] + [("C", c, u) for c in range(mid) for u in range(p)]
            + [("L", u) for u in range(p)] + [("S", j) for j in range(s)])


def _index(role: tuple[Any, ...], p: int, m: int) -> int:
    """The block index of `role` with `m` middle copies."""
    kind = role[0]
    if kind == "P":
        return role[1]
    if kind == "F":
        return 1 + role[1]
    if kind == "C":
        return 1 + p + role[1] * p + role[2]
    if kind == "L":
        return 1 + (m + 1) * p + role[1]
    return 1 + (m + 2) * p + role[1]


class _Run:
    """One shallow run's segments: keys (with an occurrence number), event slices, peaks."""

    def __init__(self, alloc: MarkingAllocator, p: int, m: int) -> None:
        self.p, self.m = p, m
        seen: dict[tuple[Any, ...], int] = {}
        self.keys: list[tuple[Any, ...]] = []
        self.starts: list[int] = []
        self.peaks: list[Peak] = []
        self.phase_peaks: list[dict[str, int]] = []
        for key, start, peak, pp in alloc.segs:
            occ = seen.get(key, 0)
            seen[key] = occ + 1
            self.keys.append((*key, occ))
            self.starts.append(start)
            self.peaks.append(peak)
            self.phase_peaks.append(pp)
        self.events = alloc.events
        self.ends = self.starts[1:] + [len(self.events)]
        self.by_key = {k: i for i, k in enumerate(self.keys)}

    def canonical(self, i: int, first_last: bool = True) -> tuple[Any, ...]:
        """Segment i's events with every free written relative to the block structure."""
        key = self.keys[i]
        role = key[2]
        src = _index(role, self.p, self.m) if role is not None else None
        out: list[Any] = []
        starts, ends = self.starts, self.ends
        labels: dict[int, tuple[Any, ...]] = {}  # target segment -> the free's label without its offset
        for ev in self.events[self.starts[i]:self.ends[i]]:
            if ev >= 0:
                out.append(ev)
                continue
            j = bisect_right(starts, ~ev) - 1
            while ends[j] <= ~ev:  # empty segments share a start
                j += 1
            label = labels.get(j)
            if label is None:
                label = labels[j] = self._label(j, src, first_last)
            out.append((*label, ~ev - starts[j]))
        return tuple(out)

    def _label(self, j: int, src: int | None, first_last: bool) -> tuple[Any, ...]:
        """How a free into segment j is written in a segment of block `src` (None: outside the blocks)."""
        tphase, tkind, trole, tocc = self.keys[j]
        if trole is None:
            return ("F", self.keys[j])
        if src is not None:
            return ("B", tphase, tkind, _index(trole, self.p, self.m) - src, tocc)
        if trole[0] != "C":
            pos: tuple[Any, ...] = trole
        elif not first_last:
            pos = ("X", trole[2])
        elif trole[1] == 0:
            pos = ("first", trole[2])
        elif trole[1] == self.m - 1:
            pos = ("last", trole[2])
        else:
            raise NotPeriodic("a segment outside the blocks frees a middle copy's tensor")
        return ("A", tphase, tkind, pos, tocc)


def _family(key: tuple[Any, ...]) -> tuple[tuple[Any, ...], int | None]:
    """(the key without the copy number, the copy number or None)."""
    phase, kind, role, occ = key
    if role is not None and role[0] == "C":
        return (phase, kind, ("C", role[2]), occ), role[1]
    return key, None


def _expand(run: _Run, k: int) -> list[tuple[Any, ...]]:
    """The full sequence of segment keys with the unit repeated k times, from the m = 2 run: every
    maximal stretch of copy segments holds copy 0 then copy 1 (or 1 then 0) with the same families."""
    out: list[tuple[Any, ...]] = []
    keys = run.keys
    i = 0
    while i < len(keys):
        fam, c = _family(keys[i])
        if c is None:
            out.append(keys[i])
            i += 1
            continue
        j = i
        stretch = []
        while j < len(keys) and _family(keys[j])[1] is not None:
            stretch.append(_family(keys[j]))
            j += 1
        copies = [c for _, c in stretch]
        half = len(stretch) // 2
        first, second = stretch[:half], stretch[half:]
        if (len(stretch) % 2 or [f for f, _ in first] != [f for f, _ in second]
                or len(set(copies[:half])) != 1 or len(set(copies[half:])) != 1
                or {copies[0], copies[-1]} != {0, 1}):
            raise NotPeriodic("the copies' segments do not repeat")
        order = range(k) if copies[0] == 0 else range(k - 1, -1, -1)
        for cc in order:
            for (phase, kind, role, occ), _ in first:
                out.append((phase, kind, ("C", cc, role[1]), occ))
        i = j
    return out


def _fit(v1: Any, v2: Any, k: int, v21: Any = None, c: int = 0) -> int:
    """The affine extrapolation: v(m) from m = 1, 2 at m = k, plus c x (copy 1 - copy 0) at m = 2."""
    out = v2 + (k - 2) * (v2 - v1)
    if c:
        out += c * (v21 - v2)
    return out


def depth_shape(model: TunedModel, training: Training) -> tuple[int, int, int] | None:
    """(P, k, suffix) of `model` when its step can be extrapolated in depth (`decompose`), else None:
    several GPUs, per-parameter optimizers, activation offloading, blocks that do not repeat."""
    if training.n_gpus != 1 or training.shard != "none" or training.offload != "none":
        return None
    if training.optimizer == "adafactor" or training.optimizer_impl == "for-loop":
        return None
    from ..trainers import get_trainer

    if get_trainer(training.trainer).offload_for(training.trainer_options) is not None:
        return None  # activation offloading (engine/offload.py): a pinned-slot budget, not periodic in depth
    return decompose(model.blocks)


def shallow_model(model: TunedModel, shape: tuple[int, int, int], m: int) -> TunedModel:
    """`model` with its repeating unit `m + 2` times (the first and last copies and m middle ones)."""
    p, k, s = shape
    blocks = model.blocks[:1] + model.blocks[1:1 + p] * (m + 2) + model.blocks[1 + k * p:]
    arch = replace(model.arch, blocks=tuple(b.block for b in blocks))
    return replace(model, arch=arch, blocks=blocks)


def extrapolated_step(model: TunedModel, training: Training, flop_counter: Any = None, *,
                      simulate: Any, step_memory: Any) -> Any:
    """engine/step.py simulate_step's StepMemory from two shallow runs, or None: not periodic.
    `simulate`: step.py's `_simulate` (one run on a given allocator); `step_memory`: its StepMemory class
    (passed in, so this module does not import step.py back)."""
    from . import ops, roofline

    _simulate, StepMemory = simulate, step_memory
    shape = depth_shape(model, training)
    if shape is None:
        return None
    p, k, s = shape
    runs = []
    counters = []
    for m in (1, 2):  # middle copies: the unit 3 and 4 times
        alloc = MarkingAllocator(_roles(p, m, s))
        counter = ops.FlopCount() if flop_counter is not None else None
        mem = _simulate(shallow_model(model, shape, m), training, counter, alloc)
        alloc.finish()
        runs.append((_Run(alloc, p, m), mem))
        counters.append(counter)
    try:
        return _combine(runs, counters, k - 2, flop_counter, StepMemory, roofline)
    except NotPeriodic:
        return None


def _combine(runs, counters, k, flop_counter, StepMemory, roofline):  # type: ignore[no-untyped-def]
    (r1, mem1), (r2, mem2) = runs
    full = _expand(r2, k)
    samples, templates = periodic_samples(r1, r2)
    peak, phase_peaks = _peaks(r1, r2, full, samples, k)
    events = _events(full, templates, r2.p, k)
    scalars = [_fit(a, b, k) for a, b in zip(
        (mem1.weights_bytes, mem1.quant_constant_bytes, mem1.trainable_bytes, mem1.grad_bytes,
         mem1.optimizer_state_bytes, mem1.paged_optimizer_bytes, mem1.host_bytes),
        (mem2.weights_bytes, mem2.quant_constant_bytes, mem2.trainable_bytes, mem2.grad_bytes,
         mem2.optimizer_state_bytes, mem2.paged_optimizer_bytes, mem2.host_bytes))]
    if flop_counter is not None:
        _flops(counters[0], counters[1], k, flop_counter, roofline)
    return StepMemory(peak, phase_peaks, *scalars, events=events)


def periodic_samples(r1: _Run, r2: _Run) -> tuple[dict[tuple[Any, ...], list[int]], dict[tuple[Any, ...], Any]]:
    """Check that the one- and two-copy runs have the periodic structure the extrapolation needs
    (NotPeriodic otherwise) and return, per segment family, its segment indices [m = 1 copy 0,
    m = 2 copy 0, m = 2 copy 1 (-1 outside the copies)] and its canonical events (the template).
    Every copy family comes from m = 2's copy 0, checked against its copy 1 and m = 1's copy 0;
    every other segment from m = 2, checked against m = 1."""
    if _expand(r2, 1) != r1.keys:
        raise NotPeriodic("the one-copy run's segments differ")
    templates: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    samples: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(r2.keys):
        fam, c = _family(key)
        samples.setdefault(fam, [-1, -1, -1])[1 + (c or 0)] = i
    for i, key in enumerate(r1.keys):
        samples[_family(key)[0]][0] = i
    for fam, (i1, i2, i21) in samples.items():
        if i1 < 0 or i2 < 0:
            raise NotPeriodic("a segment is missing from one run")
        t = r2.canonical(i2)
        if i21 >= 0:
            if r2.canonical(i21) != t or r1.canonical(i1) != t:
                raise NotPeriodic("the copies' allocations differ")
        elif r1.canonical(i1, first_last=False) != r2.canonical(i2, first_last=False):
            raise NotPeriodic("a segment outside the copies differs between the runs")
        templates[fam] = t
    return samples, templates


def _peaks(r1: _Run, r2: _Run, full: list[tuple[Any, ...]], samples: dict, k: int):  # type: ignore[no-untyped-def]
    """The step's Peak and phase peaks over the full sequence of segments (strict `>`, in order)."""
    best = Peak()
    phase_peaks: dict[str, int] = {}
    for key in full:
        fam, c = _family(key)
        i1, i2, i21 = samples[fam]
        p1, p2 = r1.peaks[i1], r2.peaks[i2]
        p21 = r2.peaks[i21] if c is not None else None
        if p1.bytes < 0 or p2.bytes < 0 or (p21 is not None and p21.bytes < 0):
            if not (p1.bytes < 0 and p2.bytes < 0 and (p21 is None or p21.bytes < 0)):
                raise NotPeriodic("a segment notes a total in one run only")
        else:
            if p1.phase != p2.phase or (p21 is not None and p21.phase != p2.phase):
                raise NotPeriodic("a segment's phase differs")
            value = _fit(p1.bytes, p2.bytes, k, p21.bytes if p21 else 0, c or 0)
            if value > best.bytes:
                comps = {cat: _fit(p1.components[cat], p2.components[cat], k,
                                   p21.components[cat] if p21 else 0, c or 0) for cat in CATEGORIES}
                best = Peak(value, p2.phase, comps)
        q1, q2 = r1.phase_peaks[i1], r2.phase_peaks[i2]
        q21 = r2.phase_peaks[i21] if c is not None else None
        if list(q1) != list(q2) or (q21 is not None and list(q21) != list(q2)):
            raise NotPeriodic("a segment's phases differ")
        for name, v2 in q2.items():
            v = _fit(q1[name], v2, k, q21[name] if q21 else 0, c or 0)
            if v > phase_peaks.get(name, -1):
                phase_peaks[name] = v
    return best, phase_peaks


def _events(full: list[tuple[Any, ...]], templates: dict, p: int, k: int) -> list[int]:
    """The full timeline, segment by segment from the canonical templates."""
    starts: dict[tuple[Any, ...], int] = {}
    n = 0
    fams = []
    for key in full:
        fam, c = _family(key)
        fams.append((fam, c))
        starts[key] = n
        n += len(templates[fam])

    def role_at(idx: int) -> tuple[Any, ...]:
        if idx < 1:
            return ("P", idx)
        if idx < 1 + p:
            return ("F", idx - 1)
        if idx < 1 + (k + 1) * p:
            return ("C", (idx - 1 - p) // p, (idx - 1 - p) % p)
        if idx < 1 + (k + 2) * p:
            return ("L", idx - 1 - (k + 1) * p)
        return ("S", idx - 1 - (k + 2) * p)

    def index_of(role: tuple[Any, ...]) -> int:
        return _index(role, p, k)

    compiled = {fam: _compile(t) for fam, t in templates.items()}
    out: list[int] = []
    for key, (fam, c) in zip(full, fams):
        role = key[2]
        src = index_of(role) if role is not None else None
        ints, frees = compiled[fam]
        n0 = len(out)
        out.extend(ints)
        for spec, items in frees:
            tag = spec[0]
            if tag == "F":
                base = starts[spec[1]]
            elif tag == "B":
                _, tphase, tkind, delta, tocc = spec
                base = starts[(tphase, tkind, role_at(src + delta), tocc)]  # type: ignore[operator]
            else:
                _, tphase, tkind, pos, tocc = spec
                if pos[0] == "first":
                    pos = ("C", 0, pos[1])
                elif pos[0] == "last":
                    pos = ("C", k - 1, pos[1])
                base = starts[(tphase, tkind, pos, tocc)]
            nb = ~base  # a free of event base + off is written ~(base + off) = ~base - off
            for at, off in items:
                out[n0 + at] = nb - off
    return out


def _compile(template: tuple[Any, ...]) -> tuple[list[int], list[tuple[tuple[Any, ...], list[tuple[int, int]]]]]:
    """A template as (its events with 0 in place of each free, its frees grouped by the segment they point
    into: [(target, [(position, offset in the target)])]): each segment instance resolves a target once."""
    ints: list[int] = []
    groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for at, ev in enumerate(template):
        if type(ev) is int:
            ints.append(ev)
            continue
        ints.append(0)
        spec, off = (ev[:2], ev[2]) if ev[0] == "F" else (ev[:5], ev[5])
        groups.setdefault(spec, []).append((at, off))
    return ints, list(groups.items())


def _flops(c1: Any, c2: Any, k: int, into: Any, roofline: Any) -> None:
    """FlopCount fields and the kernel table (roofline.KernelTable, as `into.table`) at k copies."""
    for name in ("forward", "backward_input", "backward_weight", "causal_forward", "causal_backward",
                 "block_forward", "recompute", "causal_recompute"):
        setattr(into, name, getattr(into, name) + _fit(getattr(c1, name), getattr(c2, name), k))
    t1, t2 = roofline.kernel_table(c1.kernels), roofline.kernel_table(c2.kernels)

    def fit(a: dict, b: dict) -> dict:
        out = {}
        for key in {**a, **b}:
            v = _fit(a.get(key, 0), b.get(key, 0), k)
            if v < 0:
                raise NotPeriodic("a kernel count is not affine")
            if v or key in b:  # a key the step notes with no bytes still names a (zero) time
                out[key] = v
        return out

    into.table = roofline.KernelTable(fit(t1.matmuls, t2.matmuls), fit(t1.attention, t2.attention),
                                      fit(t1.streams, t2.streams), _fit(t1.launches, t2.launches, k))
