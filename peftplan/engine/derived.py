"""A traced step's timeline, extended over depth: the pure half of the generic (trace-derived) path.

The schedule (harness/derive.py) is the timeline of one real training step traced at depth 4: every
storage allocation (bytes, rounded to 512 B; its category; the decoder layer that owns it, or None) and
every free, each event tagged with the layer it happens in (None outside the layers: embeddings, head,
loss, optimizer bookkeeping of non-layer tensors). Layer 0 is the first layer, 1 and 2 are middle layers,
3 is the last. An N-layer step (N > 4) is that timeline with each run of layer-2 events repeated for
layers 2 .. N-2 (in the run's direction: ascending in the forward, descending in the backward), and a
repeated event that frees a tensor of a neighbouring layer freeing the copy's neighbour:

- the layer before a copy is layer 1 (for the first copy) or the previous copy, both middle layers whose
  tensors correspond one to one (checked: same sizes and categories in the same order);
- the layer after a copy is the last layer (for the last copy, as traced) or the next copy, in which case
  the matching event of the layer-1 run (which frees a middle layer's tensor) gives the tensor.

Anything else (a layer freeing a tensor two layers away, runs whose direction is ambiguous) raises
DeriveError: the derivation is refused rather than guessed. harness/derive.py checks the expansion to
depth 5 against a trace at depth 5, event for event. The result is the same timeline the engine builds
(sim.Allocator.events: n > 0 allocate n bytes; ~i free allocation i), so the peak, its breakdown and the
caching-allocator replay (engine/allocator.py) work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DeriveError(ValueError):
    """A traced step peftplan cannot extend over depth (one line, for the user)."""


@dataclass
class Expanded:
    """An N-layer step: its allocator timeline and peak (bytes), the peak's phase and breakdown."""

    events: list[int]
    peak: int
    peak_phase: str
    components: dict[str, int]
    phase_peaks: dict[str, int]
    category_bytes_end: dict[str, int] = field(default_factory=dict)


def _runs(events: list[list[Any]]) -> list[tuple[Any, int, int]]:
    """Maximal runs of equal tag: (tag, start, end)."""
    out: list[tuple[Any, int, int]] = []
    start = 0
    for i in range(1, len(events) + 1):
        if i == len(events) or events[i][2] != events[start][2]:
            out.append((events[start][2], start, i))
            start = i
    return out


def _sig(recs: list[list[Any]], ev: list[Any]) -> tuple[int, int, str]:
    return ev[0], recs[ev[1]][0], recs[ev[1]][1]


def expand(sched: dict[str, Any], n_layers: int) -> Expanded:
    """The step of an `n_layers` model from `sched` (traced at sched["layers"] layers)."""
    recs: list[list[Any]] = sched["recs"]
    events: list[list[Any]] = sched["events"]
    L = int(sched["layers"])
    if n_layers == L:
        out = [(ev[0], ("t", ev[1]), ev[3], recs[ev[1]]) for ev in events]
        return _summarize(out, sched["phases"])
    if L != 4 or n_layers < L:
        raise DeriveError(f"a schedule traced at depth {L} extends to depth >= 4 only from depth 4")
    # recs of each layer, in allocation order (their ordinal identifies the tensor within the layer)
    ordinal: dict[int, tuple[Any, int]] = {}
    by_owner: dict[Any, list[int]] = {}
    for ev in events:
        if ev[0] > 0:
            owner = recs[ev[1]][2]
            lst = by_owner.setdefault(owner, [])
            ordinal[ev[1]] = (owner, len(lst))
            lst.append(ev[1])
    mid1, mid2 = by_owner.get(1, []), by_owner.get(2, [])
    if [recs[r][:2] for r in mid1] != [recs[r][:2] for r in mid2]:
        raise DeriveError("layers 1 and 2 of the traced step allocate different tensors")
    runs = _runs(events)
    tag_runs = {t: [r for r in runs if r[0] == t] for t in (1, 2)}
    if len(tag_runs[1]) != len(tag_runs[2]):
        raise DeriveError("layers 1 and 2 run in a different number of stretches")
    partner: dict[int, tuple[int, int]] = {}  # start of a layer-2 run -> the matching layer-1 run
    for r1, r2 in zip(tag_runs[1], tag_runs[2]):
        if [_sig(recs, e) for e in events[r1[1]:r1[2]]] != [_sig(recs, e) for e in events[r2[1]:r2[2]]]:
            raise DeriveError("a stretch of layer 1 differs from the same stretch of layer 2")
        partner[r2[1]] = (r1[1], r1[2])
    out_layer = {None: None, 0: 0, 1: 1, 3: n_layers - 1}

    def template(layer: int) -> int:
        return 0 if layer == 0 else 1 if layer == 1 else 3 if layer == n_layers - 1 else 2

    def target(ev: list[Any], at: int | None, tag: Any) -> tuple[Any, ...]:
        """The output tensor an event of layer `at` (template `tag`) refers to."""
        owner, k = ordinal[ev[1]]
        if owner is None:
            return ("g", ev[1])
        if tag is None:
            raise DeriveError("an event outside the layers refers to a layer's tensor")
        layer = at + (owner - tag)  # type: ignore[operator]
        want = template(layer)
        if want != owner and {want, owner} != {1, 2}:
            raise DeriveError(f"layer {tag}'s stretch refers to layer {owner}'s tensor, which does not extend")
        return ("l", layer, k)

    out: list[tuple[int, tuple[Any, ...], int, list[Any]]] = []
    for i, (tag, start, end) in enumerate(runs):
        if tag != 2:
            at = out_layer[tag]
            for ev in events[start:end]:
                out.append((ev[0], target(ev, at, tag), ev[3], recs[ev[1]]))
            continue
        prev = next((r[0] for r in reversed(runs[:i]) if r[0] is not None), None)
        nxt = next((r[0] for r in runs[i + 1:] if r[0] is not None), None)
        up, down = prev == 1 or nxt == 3, prev == 3 or nxt == 1
        if up == down:
            raise DeriveError("the direction of a stretch of layer 2 is ambiguous")
        order = range(2, n_layers - 1) if up else range(n_layers - 2, 1, -1)
        p_start, _ = partner[start]
        for layer in order:
            for j, ev in enumerate(events[start:end]):
                use, tag_used = ev, 2
                owner = recs[ev[1]][2]
                if owner == 3 and layer + 1 < n_layers - 1:  # the next layer is a middle one: layer 1's event
                    use, tag_used = events[p_start + j], 1
                    if recs[use[1]][2] != 2:
                        raise DeriveError("layer 1 does not refer to its next layer where layer 2 does")
                out.append((ev[0], target(use, layer, tag_used), ev[3], recs[ev[1]]))
    return _summarize(out, sched["phases"])


def _phase_label(ph: list[Any]) -> str:
    kind, step, mb = ph
    if kind == "load":
        return "load"
    if kind in ("optimizer", "zero_grad"):
        return f"{kind}:step{step}"
    return f"{kind}:step{step}.mb{mb}"


def _summarize(out: list[tuple[int, tuple[Any, ...], int, list[Any]]], phases: list[list[Any]]) -> Expanded:
    handle: dict[tuple[Any, ...], int] = {}
    cat_of: dict[tuple[Any, ...], str] = {}
    by_cat: dict[str, int] = {}
    timeline: list[int] = []
    total = peak = 0
    peak_phase = "load"
    comps: dict[str, int] = {}
    phase_peaks: dict[str, int] = {}
    for sign, key, ph, rec in out:
        nbytes, cat = int(rec[0]), str(rec[1])
        if sign > 0:
            if key in handle:
                raise DeriveError("a tensor is allocated twice in the extended step")
            handle[key] = len(timeline)
            cat_of[key] = cat
            timeline.append(nbytes)
            total += nbytes
            by_cat[cat] = by_cat.get(cat, 0) + nbytes
        else:
            h = handle.pop(key, None)
            if h is None:
                raise DeriveError("the extended step frees a tensor it never allocated")
            timeline.append(~h)
            total -= timeline[h]
            by_cat[cat_of[key]] -= timeline[h]
        kind = phases[ph][0]
        if total > phase_peaks.get(kind, -1):
            phase_peaks[kind] = total
        if total > peak:
            peak, peak_phase, comps = total, _phase_label(phases[ph]), {k: v for k, v in by_cat.items() if v}
    return Expanded(timeline, peak, peak_phase, comps, phase_peaks, dict(by_cat))


def extrapolate_flops(at4: list[int], at5: list[int] | None, n_layers: int) -> list[int]:
    """FLOPs (forward, backward, recompute) of an n-layer step from traces at depth 4 and 5 (affine in depth)."""
    if at5 is None or n_layers == 4:
        return list(at4)
    return [a + (n_layers - 4) * (b - a) for a, b in zip(at4, at5)]
