"""Gradient checkpointing's recompute on the symbolic tape (autograd.py): non-reentrant with early stop, and reentrant.

`recompute(tape, group)`, called by `Tape.backward`: the first backward node that unpacks a checkpointed layer's saved
tensor replays the layer on a fresh tape until its last saving node is recorded again (torch 2.13
`_StopRecomputationError`, raised here as `StopRecompute`), unwinds the replay's frame and hands the saved
tensors to the main tape's nodes. `reentrant_backward(tape, node)` is the backward of a CheckpointFunction node
(use_reentrant=True): the layer rerun whole, its backward run on that graph. Both count the replay's forward as
"recompute" FLOPs. This module does not import autograd.py (which imports it): the tape arrives as an argument.
"""

from __future__ import annotations

from typing import Any

from .sim import Allocator


class StopRecompute(Exception):
    """torch/utils/checkpoint.py `_StopRecomputationError`: the recompute has every saved tensor."""


class _Recorder:
    """Instance-level wrappers on the allocator during a recompute: every tensor created and every
    reference taken or dropped, so the frame's locals can be unwound when the recompute stops."""

    def __init__(self, alloc: Allocator) -> None:
        self.alloc = alloc
        self.net: dict[int, list] = {}  # id -> [tensor, net refs taken, peak snapshot before creation]

    def __enter__(self) -> "_Recorder":
        a = self.alloc
        new, retain, release = a.new, a.retain, a.release
        import copy

        def snap():  # type: ignore[no-untyped-def]
            from . import counter as ops
            c = ops.COUNTER[0]
            return (copy.copy(a.peak), dict(a.phase_peaks),
                    (c.forward, c.causal_forward, len(c.kernels)) if c else None)

        def new_(*args, **kw):  # type: ignore[no-untyped-def]
            s = snap()
            t = new(*args, **kw)
            self.net[id(t)] = [t, 1, s]
            return t

        def retain_(t):  # type: ignore[no-untyped-def]
            self.net.setdefault(id(t), [t, 0, None])[1] += 1
            return retain(t)

        def release_(t):  # type: ignore[no-untyped-def]
            if t is not None and t.alive:
                self.net.setdefault(id(t), [t, 0, None])[1] -= 1
            release(t)

        a.new, a.retain, a.release = new_, retain_, release_  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        del self.alloc.new, self.alloc.retain, self.alloc.release


def recompute(self: Any, g: Any) -> None:
    """Run the layer's recompute (a CheckpointGroup `g`) on a fresh tape of the same class and hand
    the recomputed saved tensors to the main tape's nodes."""
    from . import counter as ops

    g.done = True
    sub = type(self)(self.alloc)
    sub.leaf_params = self.leaf_params
    sub.stop_after = len(g.saving_nodes)
    counter = ops.COUNTER[0]
    temp = ops.FlopCount() if counter is not None else None
    ops.COUNTER[0] = temp
    stopped = False
    try:
        with _Recorder(self.alloc) as rec:
            try:
                g.replay(sub)
            except StopRecompute:
                stopped = True
    finally:
        ops.COUNTER[0] = counter
    if stopped:
        last = sub.saving_nodes[-1]
        # a node packs its inputs before its kernel runs (generated VariableType: `SavedVariable(self)`
        # precedes the redispatch): an output it does not save was never computed
        unsaved = [o for o in last.outputs if all(o is not t for t in last.saved)]
        snaps = [rec.net[id(o)][2] for o in unsaved if id(o) in rec.net and rec.net[id(o)][2] is not None]
        if snaps:
            peak, phase_peaks, fl = snaps[0]
            self.alloc.peak, self.alloc.phase_peaks = peak, phase_peaks
            for o in unsaved:  # never allocated either: off the allocator timeline (sim.Allocator.events)
                if o.event >= 0:
                    self.alloc.events[o.event] = 0
            if temp is not None and fl is not None:
                temp.forward, temp.causal_forward, n_kernels = fl
                del temp.kernels[n_kernels:]  # the kernels of the op that was never run
    # unwind the frame: only the references the saved lists hold survive
    held: dict[int, int] = {}
    for n in sub.saving_nodes:
        for t in n.saved:
            held[id(t)] = held.get(id(t), 0) + 1
    for t, net, _ in rec.net.values():
        if not t.alive:
            continue
        pre = t.refs - net
        target = pre + held.get(id(t), 0)
        if target <= 0:
            t.refs = 1
            self.alloc.release(t)
        else:
            t.refs = target
    for main, rn in zip(g.saving_nodes, sub.saving_nodes):
        main.saved = rn.saved
    if counter is not None and temp is not None:
        counter.recompute += temp.forward
        counter.causal_recompute += temp.causal_forward
        _merge_recompute(counter, temp)


def _merge_recompute(counter, temp) -> None:  # type: ignore[no-untyped-def]
    """A recompute's forward kernels join the step as "recompute"; the backward kernels its replay
    noted are dropped (they were noted at the original forward, as the FLOPs are)."""
    counter.kernels.extend((k[0], "recompute", *k[2:]) for k in temp.kernels if k[1] == "forward")



def reentrant_backward(self: Any, node: Any) -> None:
    """torch/utils/checkpoint.py `CheckpointFunction.backward` (use_reentrant=True): the whole layer
    is rerun from its saved input under enable_grad (no early stop: the output is recomputed and
    held as `outputs` until the function returns), `torch.autograd.backward(outputs, grads)` runs the
    layer's backward on that fresh graph, and the input's gradient is returned to the outer graph."""
    from . import counter as ops

    g = node.group
    assert g is not None
    h, out = node.saved[0], node.outputs[0]
    grad_out = self.grads.get(id(out))
    sub = type(self)(self.alloc)
    sub.leaf_params = self.leaf_params
    counter = ops.COUNTER[0]
    temp = ops.FlopCount() if counter is not None else None
    ops.COUNTER[0] = temp
    try:
        rout = g.replay(sub)
    finally:
        ops.COUNTER[0] = counter
    if counter is not None and temp is not None:
        counter.recompute += temp.forward
        counter.causal_recompute += temp.causal_forward
        _merge_recompute(counter, temp)
    grad_h = None
    if grad_out is not None:
        grad_h = sub.backward(rout, seed=grad_out, keep=h)
    self.alloc.release(rout)
    if grad_h is not None:
        existing = self.grads.get(id(h))
        if existing is not None and existing.alive:
            total = self.alloc.new(h.numel, h.dtype, "temporaries")
            self.alloc.release(existing)
            self.alloc.release(grad_h)
            grad_h = total
        self.grads[id(h)] = grad_h
    for t in node.saved:
        self.alloc.release(t)
    gr = self.grads.pop(id(out), None)
    if gr is not None:
        self.alloc.release(gr)
