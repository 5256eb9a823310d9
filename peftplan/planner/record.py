"""Recording one symbolic step on encoded sizes: every allocation, free, add and spike, with exact sizes.

`_record_step(model, training)` runs engine/step.py's simulation with an Allocator that appends each event to a
list (`_recorder_mixin`), the sizes made exact (unrounded) and tagged with their rounding class (encoding.py);
a model whose blocks repeat is recorded at two shallow depths (replay_depth.py), any other on every block.
replay.py's `_Structure` turns the recording into candidates for the peak; replay_point.py records one
concrete point the same way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..training import Training
from .encoding import _ADD, _DIGIT, _FREE, _NEW, _NPOLY, _Q, _SPIKE, _NotExact

_record_lock = threading.Lock()


@dataclass
class _Recording:
    pre: list[int]  # candidate running totals before the optimizer state exists (encoded)
    post: list[int]  # and after it (without it)
    state: int  # the optimizer state (encoded)
    trainables: list[tuple[int, Any]]  # (encoded numel, dtype) of every trainable tensor, in order
    classes: dict[tuple[int, int], int]  # (encoded numel, bits) -> rounding class index
    shallow: tuple[Any, Any] | None = None  # recorded from shallow runs: (depth shape, the one-copy run's FlopCount)
    activation_offload_bytes: int = 0  # StepMemory's: saved activations copied to the host (engine/offload.py)


def _recorder_mixin(events: list[tuple[Any, ...]], classes: dict[tuple[int, int], int]) -> type:
    """Allocator methods that append every allocation, free, add and spike to `events`, with the
    encoded sizes made exact (see _record_step); mixed into engine/sim.py's Allocator classes."""

    class _Recorder:
        _in_spike = False
        _depth = 0  # inside one of the methods below (their own totals are recorded as their events)
        _expect = 0  # the running total the recorded events account for

        def _note(self) -> None:
            # Peaks of encoded sizes mean nothing (the planner computes its own); a total changed by code that
            # bypasses the methods below (engine/offload.py `_revive` brings a host copy back) is recorded here.
            if not self._depth and self.total != self._expect:  # type: ignore[attr-defined]
                events.append((_ADD, self.total - self._expect, "untracked"))  # type: ignore[attr-defined]
                self._expect = self.total  # type: ignore[attr-defined]

        def new(self, numel, dtype, category, requires_grad=False, label="", count=1):  # type: ignore[no-untyped-def]
            self._depth += 1
            try:
                t = super().new(numel, dtype, category, requires_grad, label, count)  # type: ignore[misc]
                if numel >= _Q:
                    bits = dtype.bits
                    if bits % 8:
                        raise _NotExact("a sub-byte tensor's size depends on the batch")
                    key = (numel, bits)
                    cls = classes.get(key)
                    if cls is None:
                        cls = classes[key] = len(classes)
                    exact = numel * bits // 8 * count + (count << (_DIGIT * (_NPOLY + cls)))
                    delta = exact - t.nbytes
                    t.nbytes = exact
                    self.total += delta  # type: ignore[attr-defined]
                    self.by_category[category] += delta  # type: ignore[attr-defined]
                events.append((_NEW, t, category))
            finally:
                self._depth -= 1
                self._expect = self.total  # type: ignore[attr-defined]
            return t

        def release(self, t):  # type: ignore[no-untyped-def]
            if t is None or not t.alive:
                return
            self._depth += 1
            try:
                super().release(t)  # type: ignore[misc]
                if not t.alive:
                    events.append((_FREE, t))
            finally:
                self._depth -= 1
                self._expect = self.total  # type: ignore[attr-defined]

        def add_bytes(self, nbytes, category):  # type: ignore[no-untyped-def]
            self._depth += 1
            try:
                super().add_bytes(nbytes, category)  # type: ignore[misc]
                if not self._in_spike:
                    events.append((_ADD, nbytes, category))
            finally:
                self._depth -= 1
                self._expect = self.total  # type: ignore[attr-defined]

        def spike(self, nbytes, category="temporaries"):  # type: ignore[no-untyped-def]
            self._in_spike = True
            self._depth += 1
            try:
                super().spike(nbytes, category)  # type: ignore[misc]
            finally:
                self._in_spike = False
                self._depth -= 1
                self._expect = self.total  # type: ignore[attr-defined]
            events.append((_SPIKE, nbytes, self.phase))  # type: ignore[attr-defined]

    return _Recorder


def _record_step(model: Any, training: Training, flop_counter: Any = None) -> _Recording:
    """Run engine.step.simulate_step on encoded sizes with an allocator that records every event.

    A size-dependent tensor is given its exact (unrounded) encoded byte count plus a 1 in the digit
    of its *rounding class* (its numel polynomial and width): every total the engine computes from
    allocator totals (e.g. a checkpointed layer's recompute spike) then also counts how many
    tensors of each class it holds, which is what the 512-byte rounding at concrete sizes needs.
    A model whose blocks repeat is recorded at two shallow depths (replay_depth.py); `flop_counter`
    then holds the full depth's counts and a KernelTable (`table`) instead of the kernel list.
    """
    import peftplan.engine.step as step_mod
    from ..engine.sim import Allocator
    from .replay_depth import record_extrapolated, timeline_candidates

    events: list[tuple[Any, ...]] = []
    classes: dict[tuple[int, int], int] = {}
    owner = threading.get_ident()
    mixin = _recorder_mixin(events, classes)
    with _record_lock:
        got = record_extrapolated(model, training, mixin, events, flop_counter, step_mod._simulate, _NotExact)
    if got is not None:
        *timeline, shallow = got
        return _Recording(*timeline, classes, shallow)
    if flop_counter is not None and hasattr(flop_counter, "table"):  # a failed extrapolation's partial counts
        raise _NotExact("the depth extrapolation of the FLOPs failed half-way")

    class _Recorder(mixin, Allocator):  # type: ignore[misc, valid-type]
        pass

    def factory() -> Allocator:
        # Only this thread's simulation records; any other thread keeps the plain allocator.
        return _Recorder() if threading.get_ident() == owner else Allocator()

    if not isinstance(getattr(step_mod, "Allocator", None), type):
        raise _NotExact("engine/step.py no longer builds its allocator as `Allocator()`")
    with _record_lock:
        saved = step_mod.Allocator
        step_mod.Allocator = factory  # type: ignore[assignment]
        try:
            mem = step_mod.simulate_step(model, training, flop_counter=flop_counter, extrapolate=False)
        finally:
            step_mod.Allocator = saved  # type: ignore[assignment]
    return _Recording(*timeline_candidates(events, mem.events, _NotExact), classes,
                      activation_offload_bytes=mem.activation_offload_bytes)

