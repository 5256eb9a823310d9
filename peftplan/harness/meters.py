"""How the GPU profiler measures memory: `MemoryMeter` and its devices: `CudaMeter` (torch.cuda's allocator
statistics per phase), `CpuMeter` (the tracer's MemoryTracker counting real CPU tensors, with an emulated
capacity) and `FsdpCpuMeter` (the same on FSDP2 ranks). Used by profile.py's step loop.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import time
from typing import Any, Iterator


def _label(kind: str, step: int, mb: int) -> str:
    if kind == "load":
        return "load"
    if kind in ("optimizer", "zero_grad"):
        return f"step{step}.{kind}"
    return f"step{step}.mb{mb}.{kind}"


# ---- meters ----------------------------------------------------------------------------------------


class MemoryMeter:
    """How one device reports memory. The step loop calls the same methods on every device."""

    device = "cpu"
    kind = "cpu-trace"

    def __init__(self) -> None:
        self.phase: tuple[str, int, int] = ("load", 0, 0)
        self.capacity_bytes: int | None = None
        self.after_load: dict[str, int] = {}

    @property
    def label(self) -> str:
        return _label(*self.phase)

    def build_context(self) -> Any:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def running(self, built: Any) -> Iterator[None]:
        yield

    def begin(self, kind: str, step: int = 0, mb: int = 0) -> None:
        self.phase = (kind, step, mb)

    def inputs(self, batch: dict[str, Any]) -> None:
        pass

    def saving(self) -> Any:
        return contextlib.nullcontext()

    def end_forward(self) -> None:
        pass

    def collect(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def peak_so_far(self) -> int | None:
        return None

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError


class CudaMeter(MemoryMeter):
    """torch.cuda's caching-allocator statistics, phase by phase."""

    device = "cuda"
    kind = "gpu-profile"

    def __init__(self, capacity_bytes: int | None = None) -> None:
        super().__init__()
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        self.torch = torch
        torch.cuda.init()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        self.props = props
        self.total_bytes = int(props.total_memory)
        self.capacity_bytes = self.total_bytes
        if capacity_bytes and capacity_bytes < self.total_bytes:
            # a smaller GPU on this one: the caching allocator raises OutOfMemoryError past the fraction
            torch.cuda.set_per_process_memory_fraction(capacity_bytes / self.total_bytes)
            self.capacity_bytes = int(capacity_bytes)
        self.phase_peaks: dict[str, int] = {}
        self.phase_reserved: dict[str, int] = {}
        self.detail: dict[str, int] = {}
        self.step_peaks: dict[str, int] = {}
        self.peak = (0, "load")
        self.peak_reserved = 0
        self._t = time.perf_counter()
        self.phase_times: list[tuple[str, int, int, float]] = []
        # the CUDA context (and anything else outside the caching allocator) before the model loads:
        # device used (cudaMemGetInfo) - reserved; data/overheads.json cuda_context_bytes.by_compute_capability
        free, total = torch.cuda.mem_get_info()
        self.outside_allocator_bytes = int(total - free - torch.cuda.memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    def _close(self) -> None:
        cuda = self.torch.cuda
        cuda.synchronize()
        now = time.perf_counter()
        alloc, res = int(cuda.max_memory_allocated()), int(cuda.max_memory_reserved())
        kind, step, _ = self.phase
        label = self.label
        if kind == "ready":  # between the load and the first step: nothing runs
            self._t = now
            return
        self.phase_peaks[kind] = max(self.phase_peaks.get(kind, 0), alloc)
        self.phase_reserved[kind] = max(self.phase_reserved.get(kind, 0), res)
        self.detail[label] = max(self.detail.get(label, 0), alloc)
        if step > 0:
            self.step_peaks[f"step{step}"] = max(self.step_peaks.get(f"step{step}", 0), alloc)
        if alloc > self.peak[0]:
            self.peak = (alloc, label)
        self.peak_reserved = max(self.peak_reserved, res)
        self.phase_times.append((*self.phase, now - self._t))
        self._t = now

    def begin(self, kind: str, step: int = 0, mb: int = 0) -> None:
        self._close()
        super().begin(kind, step, mb)
        self.torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def running(self, built: Any) -> Iterator[None]:
        self.begin("ready", 0, 0)  # closes "load": parameters, quantization constants, the optimizer object
        self.after_load = {"allocated_bytes": int(self.torch.cuda.memory_allocated()),
                           "reserved_bytes": int(self.torch.cuda.memory_reserved())}
        yield

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def peak_so_far(self) -> int | None:
        return max(self.peak[0], int(self.torch.cuda.max_memory_allocated()))

    def allocator_state(self) -> dict[str, Any]:
        """What the caching allocator says at the end of the run, for the replay (engine/allocator.py):
        memory_stats() counters over the run (peaks: since the last phase's reset) and a snapshot's
        segments (torch.cuda.memory._snapshot())."""
        cuda = self.torch.cuda
        stats = cuda.memory_stats()
        keys = ("num_alloc_retries", "num_ooms", "num_device_alloc", "segment.all.current", "segment.all.peak",
                "reserved_bytes.all.current", "allocated_bytes.all.current", "inactive_split_bytes.all.current",
                "reserved_bytes.small_pool.current", "reserved_bytes.large_pool.current",
                "oversize_segments.current")
        out: dict[str, Any] = {"memory_stats": {k: int(stats[k]) for k in keys if k in stats},
                               "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                               "outside_allocator_bytes_at_start": self.outside_allocator_bytes}
        try:
            segments = cuda.memory._snapshot()["segments"]
            free = [b["size"] for seg in segments for b in seg["blocks"] if b["state"] == "inactive"]
            out["snapshot"] = {"segments": len(segments), "reserved_bytes": sum(seg["total_size"] for seg in segments),
                               "largest_free_block_bytes": max(free, default=0),
                               "segment_sizes": sorted(seg["total_size"] for seg in segments)}
        except Exception as exc:  # pragma: no cover - the snapshot API is private
            out["snapshot_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return out

    def summary(self) -> dict[str, Any]:
        self._close()
        return {"peak_allocated_bytes": self.peak[0], "peak_reserved_bytes": self.peak_reserved,
                "peak_phase": self.peak[1], "phase_peaks": self.phase_peaks,
                "phase_peaks_reserved": self.phase_reserved, "phase_peaks_detail": self.detail,
                "step_peaks": self.step_peaks, "phase_times": self.phase_times}


class _Ledger(list):
    """The tracker's event list, keeping a running total so a capacity can be enforced as it grows."""

    def __init__(self, meter: "CpuMeter") -> None:
        super().__init__()
        self.meter = meter

    def append(self, event: Any) -> None:  # type: ignore[override]
        rec, sign, _ = event
        m = self.meter
        if sign > 0 and m.capacity_bytes is not None and m.total + rec.nbytes > m.capacity_bytes:
            import torch

            raise torch.OutOfMemoryError(
                f"CPU-emulated out of memory: tried to allocate {rec.nbytes} bytes ({rec.op}) with {m.total} bytes "
                f"allocated of a {m.capacity_bytes}-byte capacity")
        super().append(event)
        m.total += sign * rec.nbytes
        m.max = max(m.max, m.total)


class CpuMeter(MemoryMeter):
    """Real CPU tensors counted by the CPU tracer's MemoryTracker (CUDA emulated as in the tracer)."""

    device = "cpu"
    kind = "cpu-trace"

    def __init__(self, arch: Any, training: Any, capacity_bytes: int | None = None, quantized: bool = True) -> None:
        super().__init__()
        import torch

        from . import trace as tr

        tr._GEMM_4BIT[0] = None
        if quantized:  # the tracer's CUDA emulation of bitsandbytes gemm_4bit's temporaries
            try:
                import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
                tr._GEMM_4BIT[0] = torch.ops.bitsandbytes.gemm_4bit.default
            except Exception:  # pragma: no cover
                pass
        self.tr = tr
        self.tracker = tr.MemoryTracker(vocab_size=arch.vocab_size, min_logit_rows=training.micro_batch,
                                        count_flops=False, emulate_cuda=True)
        self.total = 0
        self.max = 0
        self.capacity_bytes = capacity_bytes
        self.tracker.events = _Ledger(self)
        self._times: list[tuple[str, int, int, float]] = []
        self._t = time.perf_counter()

    def build_context(self) -> Any:
        return self.tr._patched(None, True)

    @contextlib.contextmanager
    def running(self, built: Any) -> Iterator[None]:
        tr, tracker, model, opt = self.tr, self.tracker, built.model, built.optimizer

        def grad_hook(p: Any) -> None:
            if p.grad is not None:
                tracker.set_role(p.grad, "grads", "grad")

        def opt_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            for group in optimizer.param_groups:
                host_step = not (group.get("fused") or group.get("capturable"))
                for p in group["params"]:
                    for k, v in optimizer.state.get(p, {}).items():
                        if hasattr(v, "untyped_storage"):
                            if k == "step" and host_step and v.dim() == 0:
                                tracker.set_role(v, "host", "optimizer.state.step")  # a host scalar on a GPU
                            else:
                                tracker.set_role(v, "optimizer_state", f"optimizer.state.{k}")

        gc_enabled = gc.isenabled()
        gc.disable()  # frees happen where the tracer's do (collect() at phase ends)
        handles = []
        try:
            with tr._patched(tracker, True), tr._module_hooks(tracker, model), tracker:
                tr._register_model(tracker, built)
                self.after_load = {"allocated_bytes": self.total}
                handles = [p.register_post_accumulate_grad_hook(grad_hook) for p in model.parameters() if p.requires_grad]
                handles.append(opt.register_step_post_hook(opt_hook))
                yield
                tr._rescan_params(tracker, built)
        finally:
            for h in handles:
                h.remove()
            tracker.closed = True
            if gc_enabled:
                gc.enable()

    def begin(self, kind: str, step: int = 0, mb: int = 0) -> None:
        now = time.perf_counter()
        self._times.append((*self.phase, now - self._t))
        self._t = now
        super().begin(kind, step, mb)
        self.tracker.set_phase(kind, step, mb)

    def inputs(self, batch: dict[str, Any]) -> None:
        for t in batch.values():
            self.tracker.track(t, "input", fixed="inputs")

    def saving(self) -> Any:
        import torch

        tracker = self.tracker

        def pack(x: Any) -> Any:
            tracker.note_saved(x)
            return x.detach() if x.requires_grad else x

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)

    def end_forward(self) -> None:
        self.tracker.end_forward()

    def collect(self) -> None:
        gc.collect(1)

    def peak_so_far(self) -> int | None:
        return self.max

    def summary(self) -> dict[str, Any]:
        self.begin("end")
        s = self.tr.compute_summary(self.tracker)
        pp = s["peak_phase"]
        return {"peak_allocated_bytes": s["peak_allocated_bytes"], "peak_phase": _label(pp["phase"], pp["step"], pp["micro_batch"]),
                "peak_op": pp.get("op"), "phase_peaks": {k: v for k, v in s["phase_peaks"].items() if k != "end"},
                "phase_peaks_detail": {k: v for k, v in s["phase_peaks_detail"].items() if not k.endswith(".end")},
                "step_peaks": s["step_peaks"], "components": s["components"], "phase_times": self._times}


class FsdpCpuMeter(CpuMeter):
    """CpuMeter for one rank of a real FSDP2 run on the CPU (gloo): the FSDP2 trace's tracker
    (`fsdp_trace.FSDPMemoryTracker`: looks through DTensors, follows FSDP2's `storage.resize_`), the
    same roles (unsharded parameters, flat all-gather / reduce-scatter buffers), real tensors."""

    def __init__(self, arch: Any, training: Any, capacity_bytes: int | None = None) -> None:
        super().__init__(arch, training, capacity_bytes, quantized=False)
        from . import fsdp_trace as ft

        self.ft = ft
        self.tracker = ft.FSDPMemoryTracker(vocab_size=arch.vocab_size, min_logit_rows=training.micro_batch,
                                            count_flops=False, emulate_cuda=True)
        self.tracker.events = _Ledger(self)

    @contextlib.contextmanager
    def running(self, built: Any) -> Iterator[None]:
        import torch
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        tr, ft, tracker, model, opt = self.tr, self.ft, self.tracker, built.model, built.optimizer
        local = ft._local
        orig_wait = FSDPParamGroup.wait_for_unshard

        def wait_for_unshard(group: Any) -> Any:
            out = orig_wait(group)
            for fp in group.fsdp_params:
                for t in getattr(fp, "all_gather_outputs", []) or []:
                    tracker.set_role(t, "unsharded_params", "fsdp.unsharded_param")
            return out

        def roles(*_: Any) -> None:  # as fsdp_trace._run: sharded grads and states, seen through DTensors
            for p in model.parameters():
                if p.grad is not None:
                    tracker.set_role(local(p.grad), "grads", "grad")
            for st in opt.state.values():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        v = local(v)
                        if k == "step" and v.dim() == 0 and not any(g.get("fused") for g in opt.param_groups):
                            tracker.set_role(v, "host", "optimizer.state.step")
                        else:
                            tracker.set_role(v, "optimizer_state", f"optimizer.state.{k}")

        gc_enabled = gc.isenabled()
        gc.disable()
        handles = []
        FSDPParamGroup.wait_for_unshard = wait_for_unshard  # type: ignore[method-assign]
        try:
            with tr._patched(tracker, True), tr._module_hooks(tracker, model), tracker, ft._track_resize(tracker):
                for p in model.parameters():
                    tracker.track(local(p), "param", fixed="trainable_params" if p.requires_grad else "frozen_params")
                for b in model.buffers():
                    tracker.track(local(b), "buffer", fixed="buffers")
                self.after_load = {"allocated_bytes": self.total}
                handles = [opt.register_step_pre_hook(roles), opt.register_step_post_hook(roles)]
                yield
        finally:
            for h in handles:
                h.remove()
            FSDPParamGroup.wait_for_unshard = orig_wait  # type: ignore[method-assign]
            tracker.closed = True
            if gc_enabled:
                gc.enable()

    def summary(self) -> dict[str, Any]:
        self.begin("end")
        s = self.ft._summary(self.tracker)
        pp = s["peak_phase"]
        detail = {k: v for k, v in s["phase_peaks_detail"].items() if not k.endswith(".end") and k != "end"}
        steps: dict[str, int] = {}
        for label, b in detail.items():
            if label.startswith("step"):
                key = label.split(".")[0]
                steps[key] = max(steps.get(key, 0), b)
        return {"peak_allocated_bytes": s["peak_allocated_bytes"],
                "peak_phase": _label(pp["phase"], pp["step"], pp["micro_batch"]), "peak_op": pp.get("op"),
                "phase_peaks": {k: v for k, v in s["phase_peaks"].items() if k != "end"},
                "phase_peaks_detail": detail, "step_peaks": steps, "components": s["components"],
                "phase_times": self._times}
