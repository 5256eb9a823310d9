"""`peftplan.envelope(estimate)`: assert, in your own tests or CI, that a real step stays inside the estimate.

    import peftplan
    with peftplan.envelope(est, model=model, optimizer=opt) as m:
        train_step()
    print(m.measured_bytes)

On exit the block's peak memory is measured and compared with the estimate; outside the bounds an
`EnvelopeError` (an AssertionError, so pytest shows it as a test failure) says predicted, measured,
the bounds and the biggest component of the prediction.

- CUDA (`torch.cuda.is_available()` and `device` not "cpu"): `torch.cuda.reset_peak_memory_stats()` on
  entry, `torch.cuda.max_memory_allocated()` on exit, which must lie in the estimate's envelope
  [envelope_low_bytes, envelope_high_bytes] (engine/envelope.py lists the GPU-only terms that widen it).
- CPU: the tracer's `MemoryTracker` (harness/trace.py) records every storage the block's ops allocate
  and free (real tensors, rounded to 512 B as the CUDA allocator does), on top of the tensors alive at
  entry (the model's parameters, buffers, gradients and optimizer state when `model` / `optimizer` are
  given, and any `tensors` passed; not other tensors of the process). CUDA's numerics are emulated as
  the tracer does (CUDA autocast's fp32 op policy, SDPA dropout inside the kernel), so the CPU step
  allocates what the GPU step would, minus the GPU-only terms: the bounds are the engine's peak
  ±`cpu_trace_tolerance` (1%, data/overheads.json), as `peftplan check` holds CPU traces.

Needs torch (the harness extra); `import peftplan` does not import it.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any, Iterator

from .estimate import Estimate, overheads


class EnvelopeError(AssertionError):
    """The measured peak left the estimate's envelope (a readable, multi-line message)."""


@dataclass
class EnvelopeMeasurement:
    estimate: Estimate
    device: str = "cpu"
    low_bytes: int = 0
    high_bytes: int = 0
    measured_bytes: int | None = None
    measured_components: dict[str, int] = field(default_factory=dict)

    @property
    def predicted_bytes(self) -> int:
        return self.estimate.memory.peak_allocated_bytes

    @property
    def error_pct(self) -> float | None:
        if not self.measured_bytes:
            return None
        return 100.0 * (self.predicted_bytes - self.measured_bytes) / self.measured_bytes

    @property
    def inside(self) -> bool:
        return self.measured_bytes is not None and self.low_bytes <= self.measured_bytes <= self.high_bytes

    def message(self) -> str:
        est = self.estimate
        mib = 2**20
        comps = sorted(est.memory.components.items(), key=lambda kv: -kv[1])
        biggest = f"{comps[0][0]} {comps[0][1] / mib:,.1f} MiB" if comps else "-"
        measured = self.measured_bytes or 0
        side = "above" if measured > self.high_bytes else "below"
        lines = [
            f"peak memory {side} the peftplan envelope ({est.model}, {est.method}, {self.device})",
            f"  predicted: {self.predicted_bytes:,} B ({self.predicted_bytes / mib:,.1f} MiB) at {est.memory.peak_phase}",
            f"  measured:  {measured:,} B ({measured / mib:,.1f} MiB), error {self.error_pct:+.3f}%"
            if self.error_pct is not None else f"  measured:  {measured:,} B",
            f"  envelope:  [{self.low_bytes:,}, {self.high_bytes:,}] B",
            f"  biggest predicted component: {biggest}",
        ]
        if self.measured_components:
            mc = sorted(self.measured_components.items(), key=lambda kv: -kv[1])
            lines.append("  measured at the peak: " + ", ".join(f"{k} {v / mib:,.1f} MiB" for k, v in mc[:4] if v))
        return "\n".join(lines)


def _register_live(tracker: Any, model: Any, optimizer: Any, tensors: Any) -> None:
    """Tensors alive at entry that belong to the step: the model's parameters, buffers and gradients,
    the optimizer's state, and any `tensors` given (e.g. a batch made before the block). Other live
    tensors of the process (other models, caches) are not the step's and are not counted."""
    import torch

    def cpu(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta

    if model is not None:
        for p in model.parameters():
            tracker.track(p, "param", fixed="trainable_params" if p.requires_grad else "frozen_params")
            if cpu(p.grad):
                tracker.track(p.grad, "grad")
        for b in model.buffers():
            if cpu(b):
                tracker.track(b, "buffer", fixed="buffers")
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if cpu(v) and v.dim() > 0:  # AdamW's step scalars live on the host on a GPU
                    tracker.track(v, "optimizer.state")
    for t in tensors or ():
        if cpu(t):
            tracker.track(t, "input", fixed="inputs")


@contextlib.contextmanager
def envelope(est: Estimate, *, model: Any = None, optimizer: Any = None, tensors: Any = None,
             device: str | None = None, tolerance: float | None = None) -> Iterator[EnvelopeMeasurement]:
    """Measure the block's peak memory; raise EnvelopeError on exit if it is outside the estimate.

    On the CPU, pass the `model` (and the `optimizer` once it has state): the tensors alive at entry
    are counted from them (plus `tensors`); everything the block allocates is counted as it happens."""
    import torch

    use_cuda = device != "cpu" and (device == "cuda" or torch.cuda.is_available())
    m = EnvelopeMeasurement(est, device="cuda" if use_cuda else "cpu")
    if use_cuda:
        m.low_bytes, m.high_bytes = est.memory.envelope_low_bytes, est.memory.envelope_high_bytes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield m
        torch.cuda.synchronize()
        m.measured_bytes = int(torch.cuda.max_memory_allocated())
    else:
        from .harness.trace import _patched, compute_summary, MemoryTracker

        tol = float(overheads()["cpu_trace_tolerance"]["value"]) if tolerance is None else tolerance
        peak = est.memory.peak_allocated_bytes
        m.low_bytes, m.high_bytes = int(peak * (1 - tol)), int(peak * (1 + tol))
        tracker = MemoryTracker(vocab_size=-1, min_logit_rows=1, count_flops=False)
        _register_live(tracker, model, optimizer, tensors)
        tracker.set_phase("block")
        try:
            with _patched(tracker, True), tracker:
                yield m
        finally:
            gc.collect()
            tracker.closed = True
        summary = compute_summary(tracker)
        m.measured_bytes = int(summary["peak_allocated_bytes"])
        m.measured_components = {k: v for k, v in summary["components"].items() if v}
    if not m.inside:
        raise EnvelopeError(m.message())


class _CallableModule(__import__("types").ModuleType):
    """`peftplan.envelope` names both this module and the function: importing the submodule binds the
    module as the package attribute, so the module itself is callable and forwards to `envelope()`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return envelope(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
