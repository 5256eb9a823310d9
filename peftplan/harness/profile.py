"""Measure one configuration's real training step, in this process: the GPU profiler's child.

    python -m peftplan.harness.profile --one SPEC.json     # what `peftplan profile` runs per config
    python -m peftplan.harness.profile --probe             # the device and library versions, as JSON

The model and method are built exactly as the CPU tracer builds them (`build.build_model`, random
weights, nothing downloaded, no remote code), then `warmup + steps` optimizer steps run as the tracer
runs them: per micro-batch a forward with labels under autocast and `loss.backward()`, then
`optimizer.step()` and `optimizer.zero_grad(set_to_none=True)`.

Memory is read through a `MemoryMeter`, the only thing that differs between devices:
- `CudaMeter`: `torch.cuda.reset_peak_memory_stats()` at the start of each phase, then
  `max_memory_allocated()` / `max_memory_reserved()` at its end (after a synchronize), so each phase
  (load, inputs, forward, backward, optimizer, zero_grad) has its own peak; the step's peak is their
  maximum. Step time is the median over the timed steps, with the GPU synchronized.
- `CpuMeter`: real CPU tensors under the tracer's `MemoryTracker` (every storage, rounded to 512 B,
  CUDA emulated as in the tracer), so a CPU profile of a small model equals `trace(real=True)`. A
  `capacity_bytes` limit is enforced by raising `torch.OutOfMemoryError` from the allocation that
  crosses it: the same exception, caught by the same code, as a CUDA out-of-memory.

Under torchrun (`training.n_gpus` > 1; `peftplan profile` launches `torchrun --standalone --nproc_per_node
N -m peftplan.harness.profile --one SPEC`), each rank initializes NCCL (CUDA) or gloo (CPU), builds the
model as above, wraps it with `fsdp_wrap.wrap_fsdp` (the FSDP2 trace's wrapping), measures its own
peak (CudaMeter per rank; on the CPU `FsdpCpuMeter`, the FSDP2 trace's tracker on real tensors), and
rank 0 writes one record with every rank's peak (`run_one_distributed`).

An out-of-memory is a recorded outcome ("oom"), not a crash. The record (kind "gpu-profile" on CUDA,
"cpu-trace" with `trace.device` "cpu" and `trace.fake_tensors` false on the CPU) is written with
`records.write_record`, which validates it and never overwrites. The last stdout line is
`PEFTPLAN_PROFILE_RESULT {json}` for the parent; exit code 3 means the configuration cannot be run on
this device (a refusal, with the reason), anything else non-zero is a crash.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from ..records import SCHEMA_VERSION, write_record
from .sweep import EXIT_RANK_OOM, EXIT_REFUSED, RESULT_PREFIX, gpu_slug, refuse_remote_code

FAULT_ENV = "PEFTPLAN_PROFILE_FAULT"  # "<label substring>=abort|exit|hang[,...]": fault injection for tests


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


# ---- the step loop (the same on every device) --------------------------------------------------------


def _inputs(arch: Any, training: Any, gen: Any, device: str) -> dict[str, Any]:
    from .trace import _inputs as trace_inputs

    batch = trace_inputs(arch, training, gen)
    return {k: v.to(device) for k, v in batch.items()} if device != "cpu" else batch


def run_steps(built: Any, meter: MemoryMeter, training: Any, warmup: int, steps: int, seed: int = 0) -> list[float]:
    """`warmup + steps` optimizer steps; returns the wall time of every step (seconds)."""
    import torch

    from .trace import forward_loss

    model, opt, arch = built.model, built.optimizer, built.arch
    amp = (torch.autocast(meter.device, dtype=torch.bfloat16 if training.compute_dtype.name == "bf16" else torch.float16)
           if training.mixed else contextlib.nullcontext())
    gen = torch.Generator().manual_seed(seed)
    times: list[float] = []
    with warnings.catch_warnings(), meter.running(built):
        # prepare_model_for_kbit_training calls checkpoint without use_reentrant (torch warns, uses reentrant)
        warnings.filterwarnings("ignore", message=".*use_reentrant parameter should be passed explicitly.*")
        for step in range(1, warmup + steps + 1):
            meter.sync()
            t0 = time.perf_counter()
            for mb in range(1, training.grad_accum + 1):
                meter.begin("inputs", step, mb)
                batch = _inputs(arch, training, gen, meter.device)
                meter.inputs(batch)
                meter.begin("forward", step, mb)
                with meter.saving():
                    loss = forward_loss(model, batch, amp, training.grad_accum, training.trainer)
                    meter.end_forward()
                    meter.begin("backward", step, mb)
                    loss.backward()
                del loss, batch
                meter.collect()
            meter.begin("optimizer", step, 0)
            opt.step()
            meter.collect()
            meter.begin("zero_grad", step, 0)
            opt.zero_grad(set_to_none=True)
            meter.collect()
            meter.sync()
            times.append(time.perf_counter() - t0)
    return times


# ---- environment -------------------------------------------------------------------------------------


def _driver_version() -> str:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        pass
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:
        pass
    return "unknown"


def catalog_gpu_name(name: str) -> str | None:
    """The peftplan catalog name of a GPU torch reports ('NVIDIA H100 80GB HBM3' -> 'h100'), or None."""
    from ..catalog import load_gpu

    for candidate in (name, name.replace("NVIDIA ", "", 1)):
        try:
            return load_gpu(candidate).name
        except ValueError:
            continue
    return None


def environment(device: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(library versions, GPU description or None)."""
    import platform
    from importlib import metadata

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:  # the installed distribution's version, without importing it (bitsandbytes alone takes seconds)
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "missing"
    env["platform"] = platform.platform()
    env["peftplan"] = __import__("peftplan").__version__
    if device != "cuda":
        env["cpu_threads"] = torch.get_num_threads()
        return env, None
    env["cuda"] = torch.version.cuda or "unknown"
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):  # check.py replays the allocator with it
        env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    env["cudnn"] = str(torch.backends.cudnn.version())
    env["driver"] = _driver_version()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpu = {"name": props.name, "memory_bytes": int(props.total_memory), "catalog_name": catalog_gpu_name(props.name),
           "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
           "slug": gpu_slug(props.name), "count": torch.cuda.device_count()}
    return env, gpu


# ---- one configuration ---------------------------------------------------------------------------------


class Refused(Exception):
    """This configuration cannot be built or run on this device (exit code 3, not a crash)."""


def measure(spec: dict[str, Any], dist_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build, run and measure the configuration in `spec`; returns the record (not yet written).

    With `dist_info` (one rank of a torchrun launch, the process group initialized), the model is
    wrapped with FSDP2 exactly as the FSDP2 trace wraps it (`fsdp_wrap.wrap_fsdp`) before the optimizer
    is made, and the record is this rank's."""
    import torch

    from ..arch import ArchError, from_hf_config
    from ..methods import MethodError
    from ..training import Training, TrainingError
    from . import HarnessError
    from .build import build_model, coerce_options, options_dict

    _fault(spec)
    device = spec.get("device", "cuda")
    if device not in ("cuda", "cpu"):
        raise Refused(f"unknown device {device!r} (cuda or cpu)")
    name, config, method = spec["model_name"], dict(spec["config"]), spec["method"]
    try:
        refuse_remote_code(config, name)
        arch = from_hf_config(config, name)
        training = Training(**spec["training"])
        opts = coerce_options(method, spec.get("options") or {})
    except (ValueError, HarnessError) as exc:
        raise Refused(str(exc).splitlines()[0]) from None
    mesh = None
    if training.n_gpus > 1 and dist_info is None:
        raise Refused(f"{training.n_gpus} GPUs ({training.shard}): run under torchrun (`peftplan profile` launches it)")
    if dist_info is not None:
        from .fsdp_wrap import fsdp_mesh

        if training.n_gpus != dist_info["world_size"]:
            raise Refused(f"training.n_gpus is {training.n_gpus} but torchrun started {dist_info['world_size']} ranks")
        if method == "qlora":
            raise Refused("QLoRA under FSDP2: bitsandbytes 4-bit weights are uint8 Parameters with a quant_state; "
                          "fully_shard would shard the packed bytes (not profiled)")
        try:
            mesh = fsdp_mesh(training, device)
        except HarnessError as exc:
            raise Refused(str(exc).splitlines()[0]) from None
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    warmup, steps = int(spec.get("warmup", 2)), int(spec.get("steps", 3))
    capacity = spec.get("capacity_bytes")
    meter: MemoryMeter = (CudaMeter(capacity) if device == "cuda" else
                          FsdpCpuMeter(arch, training, capacity) if mesh is not None else
                          CpuMeter(arch, training, capacity, quantized=method == "qlora"))
    env, gpu = environment(device)
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": meter.kind,
        "model": {"name": name, "config": config}, "method": method, "options": options_dict(opts),
        "training": asdict(training), "outcome": "ok",
    }
    built = None
    notes: list[str] = []
    try:
        try:
            with meter.build_context():
                built = build_model(arch, method, opts, training, device=device, with_optimizer=mesh is None)
                total, trainable = built.params()  # before sharding: the model's counts, not a rank's
                if mesh is not None:
                    from .build import make_optimizer
                    from .fsdp_wrap import wrap_fsdp

                    wrap_fsdp(built, arch, training, mesh)  # the same wrapping as the FSDP2 trace
                    built.optimizer, built.optimizer_error = make_optimizer(built.model, training, device)
        except (MethodError, TrainingError, ArchError, HarnessError) as exc:
            raise Refused(str(exc).splitlines()[0]) from None
        if built.optimizer is None:
            raise Refused(built.optimizer_error or "no optimizer")
        record["params"] = {"total": total, "trainable": trainable}
        times = run_steps(built, meter, training, warmup, steps, seed)
        s = meter.summary()
    except torch.OutOfMemoryError as exc:
        record["outcome"] = "oom"
        record["oom"] = {"phase": meter.label, "message": str(exc).strip().splitlines()[0][:500]}
        peak = meter.peak_so_far()
        mem: dict[str, Any] = {"capacity_bytes": meter.capacity_bytes}
        if peak is not None:
            mem["peak_before_oom_bytes"] = peak
        if meter.capacity_bytes is None:
            del mem["capacity_bytes"]
        record["memory"] = mem
        times, s = [], None
    seconds = time.perf_counter() - t0
    if s is not None:
        measured = times[warmup:] or times
        median = statistics.median(measured)
        tokens = training.micro_batch * training.seq_len * training.grad_accum
        phase_med = _phase_medians(s.pop("phase_times"), warmup)
        memory = {"peak_allocated_bytes": s["peak_allocated_bytes"], "peak_phase": s["peak_phase"],
                  "phase_peaks": s["phase_peaks"], "phase_peaks_detail": s["phase_peaks_detail"],
                  "step_peaks": s["step_peaks"], "after_load_allocated_bytes": meter.after_load.get("allocated_bytes")}
        if meter.capacity_bytes is not None:
            memory["capacity_bytes"] = meter.capacity_bytes
        timing = {"step_time_s_median": median, "step_times_s": times, "warmup_steps": warmup,
                  "measured_steps": len(measured), "tokens_per_step": tokens, "tokens_per_s": tokens / median if median > 0 else None,
                  "phase_time_s_median": phase_med}
        if device == "cuda":
            memory["peak_reserved_bytes"] = s["peak_reserved_bytes"]
            memory["phase_peaks_reserved"] = s["phase_peaks_reserved"]
            memory["after_load_reserved_bytes"] = meter.after_load.get("reserved_bytes")
            memory["allocator"] = meter.allocator_state()
            record["timing"] = timing
        else:
            memory["components"] = s["components"]
            memory["peak_op"] = s.get("peak_op")
            memory["allocation_rounding_bytes"] = 512
        record["memory"] = memory
    else:
        timing = None
    if gpu is not None:
        record["gpu"] = gpu
    info = dict(built.info) if built is not None else {}
    notes.extend((built.notes + list(built.tuned.notes)) if built is not None else [])
    if training.precision == "fp16-mixed":
        notes.append("fp16-mixed run without GradScaler (as the CPU tracer): its scale/found_inf scalars are not counted")
    profile = {"config_key": spec.get("config_key"), "label": spec.get("label"), "method_label": spec.get("method_label"),
               "device": device, "warmup": warmup, "steps": steps, "seed": seed, "seconds": round(seconds, 3),
               "sweep": spec.get("sweep"), "build": info, "capacity_emulated": bool(capacity)}
    record["profile"] = profile
    if dist_info is not None:
        from .fsdp_wrap import mesh_shape, reshard_after_forward

        record["distributed"] = {"launcher": "torchrun", "rank": dist_info["rank"],
                                 "world_size": dist_info["world_size"], "backend": dist_info["backend"],
                                 "wrapping": "fully_shard per decoder layer + root (harness/fsdp_wrap.py)",
                                 "mesh_shape": list(mesh_shape(training)),
                                 "reshard_after_forward": reshard_after_forward(training),
                                 "mixed_precision": training.compute_dtype.name if training.mixed else None}
        notes.append(f"rank {dist_info['rank']} of {dist_info['world_size']} real FSDP2 ranks "
                     f"({dist_info['backend']}); memory figures are this rank's"
                     + ("; NCCL's own buffers are outside the caching allocator, not counted" if device == "cuda" else ""))
    if device == "cpu":
        trace_info = {"device": "cpu", "fake_tensors": False, "emulate_cuda": True, "profiler": True,
                      "seconds": round(seconds, 3), "steps": warmup + steps, **info}
        if timing is not None:
            trace_info["step_time_s_median"] = timing["step_time_s_median"]  # CPU wall time: not a GPU timing
        record["trace"] = trace_info
        notes.append("measured on the CPU with real tensors (the GPU profiler's code path, MemoryTracker meter); "
                     "no CUDA allocator, workspaces or context" + (": capacity emulated" if capacity else ""))
    record["notes"] = notes
    record["env"] = env
    if spec.get("prediction"):
        record["prediction"] = spec["prediction"]
    return record


def _phase_medians(phase_times: list[tuple[str, int, int, float]], warmup: int) -> dict[str, float]:
    per: dict[str, dict[int, float]] = {}
    for kind, step, _, dt in phase_times:
        if step > warmup and kind in ("inputs", "forward", "backward", "optimizer", "zero_grad"):
            per.setdefault(kind, {})
            per[kind][step] = per[kind].get(step, 0.0) + dt
    return {k: statistics.median(v.values()) for k, v in per.items()}


def _fault(spec: dict[str, Any]) -> None:
    """Fault injection for the sweep's own tests: PEFTPLAN_PROFILE_FAULT='<label substring>=abort|exit|hang'."""
    for item in (os.environ.get(FAULT_ENV) or "").split(","):
        needle, _, what = item.rpartition("=")
        if not needle or needle not in str(spec.get("label", "")):
            continue
        if what == "abort":
            os.abort()
        if what == "exit":
            os._exit(7)
        if what == "hang":
            time.sleep(3600)


def _emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def _write_rank_file(spec: dict[str, Any], rank: int, suffix: str, data: Any) -> None:
    d = spec.get("rank_dir")
    if d:
        tmp = Path(d) / f".rank{rank}.{suffix}.tmp"
        tmp.write_text(json.dumps(data, default=str), encoding="utf-8")
        os.replace(tmp, Path(d) / f"rank{rank}.{suffix}")


def _orphan_watchdog(poll_s: float = 0.5) -> None:
    """torchrun starts every rank in a session of its own, so killing torchrun's process group does not
    reach the ranks: each rank exits as soon as its parent (torchrun's agent) is gone."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="peftplan-orphan-watchdog", daemon=True).start()


EXIT_ORPHANED = 5


def run_one_distributed(spec: dict[str, Any]) -> int:
    """One rank of `torchrun --nproc_per_node N -m peftplan.harness.profile --one SPEC`.

    Every rank measures itself; the ranks' peaks are gathered to rank 0 (`all_gather_object`), which
    writes the one record (its own peak as `memory.peak_allocated_bytes`, every rank's in
    `memory.per_rank_peak_allocated_bytes`) and prints the result line. Each rank also leaves its own
    record in `spec["rank_dir"]`: on an out-of-memory the rank exits at once with EXIT_RANK_OOM (its
    peers may be blocked in a collective; torchrun ends them) and the launcher writes the OOM record
    from those files."""
    _orphan_watchdog()  # before torch is imported: a rank never outlives its torchrun
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    _write_rank_file(spec, rank, "pid", os.getpid())
    device = spec.get("device", "cuda")
    if device == "cuda":
        if torch.cuda.device_count() <= local:
            _emit({"outcome": "refused", "reason": f"rank {rank}: no CUDA device {local}"})
            return EXIT_REFUSED
        torch.cuda.set_device(local)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=float(spec.get("pg_timeout_s") or 600)))
    info = {"rank": rank, "world_size": world, "backend": backend}
    try:
        record = measure(spec, info)
    except Refused as exc:  # every rank refuses the same way, before any collective
        _write_rank_file(spec, rank, "json", {"outcome": "refused", "reason": str(exc)})
        if rank == 0:
            _emit({"outcome": "refused", "reason": str(exc)})
        dist.destroy_process_group()
        return EXIT_REFUSED
    _write_rank_file(spec, rank, "json", record)
    mem = record.get("memory", {})
    if record["outcome"] == "oom":
        sys.stdout.flush()
        sys.stderr.write(f"rank {rank}: out of memory at {record['oom']['phase']}\n")
        sys.stderr.flush()
        os._exit(EXIT_RANK_OOM)
    mine = {"rank": rank, "peak_allocated_bytes": mem.get("peak_allocated_bytes"), "peak_phase": mem.get("peak_phase"),
            "peak_reserved_bytes": mem.get("peak_reserved_bytes")}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    code = 0
    if rank == 0:
        mem["per_rank_peak_allocated_bytes"] = [g["peak_allocated_bytes"] for g in gathered]
        mem["per_rank_peak_phase"] = [g["peak_phase"] for g in gathered]
        if device == "cuda":
            mem["per_rank_peak_reserved_bytes"] = [g["peak_reserved_bytes"] for g in gathered]
        record["distributed"]["gathered"] = True
        out = spec.get("out_path")
        path = str(write_record(out, record)) if out else None
        timing = record.get("timing") or {}
        _emit({"outcome": "ok", "path": path, "peak_allocated_bytes": mem.get("peak_allocated_bytes"),
               "per_rank_peak_allocated_bytes": mem["per_rank_peak_allocated_bytes"],
               "peak_reserved_bytes": mem.get("peak_reserved_bytes"), "capacity_bytes": mem.get("capacity_bytes"),
               "phase": mem.get("peak_phase"), "step_time_s_median": timing.get("step_time_s_median"),
               "tokens_per_s": timing.get("tokens_per_s")})
    dist.barrier()
    dist.destroy_process_group()
    return code


def run_one(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_one_distributed(spec)
    try:
        record = measure(spec)
    except Refused as exc:
        _emit({"outcome": "refused", "reason": str(exc)})
        return EXIT_REFUSED
    out = spec.get("out_path")
    path = str(write_record(out, record)) if out else None
    mem = record.get("memory", {})
    timing = record.get("timing") or {}
    _emit({"outcome": record["outcome"], "path": path, "peak_allocated_bytes": mem.get("peak_allocated_bytes"),
           "peak_reserved_bytes": mem.get("peak_reserved_bytes"), "capacity_bytes": mem.get("capacity_bytes"),
           "phase": (record.get("oom") or {}).get("phase") or mem.get("peak_phase"),
           "step_time_s_median": timing.get("step_time_s_median"), "tokens_per_s": timing.get("tokens_per_s")})
    return 0


def probe() -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env, gpu = environment(device)
    return {"device": device, "env": env, "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m peftplan.harness.profile", description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--one", metavar="SPEC.json", help="measure the configuration in this spec file")
    g.add_argument("--probe", action="store_true", help="print the device and library versions as JSON")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(), default=str))
        return 0
    return run_one(args.one)


if __name__ == "__main__":
    sys.exit(main())
