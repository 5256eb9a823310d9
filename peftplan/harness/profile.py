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
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..records import SCHEMA_VERSION, write_record
from .sweep import EXIT_RANK_OOM, EXIT_REFUSED, RESULT_PREFIX, gpu_slug, refuse_remote_code
from .meters import CpuMeter, CudaMeter, FsdpCpuMeter, MemoryMeter, _Ledger, _label  # noqa: F401  (re-exported: importers use them from here)

FAULT_ENV = "PEFTPLAN_PROFILE_FAULT"  # "<label substring>=abort|exit|hang[,...]": fault injection for tests


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
