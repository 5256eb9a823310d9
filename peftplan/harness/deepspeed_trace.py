"""Trace the real DeepSpeed ZeRO step: a DeepSpeed engine on N CPU ranks (gloo), rank 0's live bytes.

`trace_deepspeed(arch, configs)` starts `n_gpus` processes on 127.0.0.1 (torch.multiprocessing, gloo; DeepSpeed
0.19's CPU accelerator), and in each one, for every (method, Training) configuration in turn: builds the HF +
peft model with real CPU tensors (`build.build_model`, dtypes as the TunedModel says), makes the optimizer the
HF Trainer makes (torch AdamW, `build.make_optimizer`), and hands both to `deepspeed.initialize` with the
config the HF Trainer writes for `--bf16` / `--fp16` and a ZeRO stage (`ds_config`): DeepSpeed casts the
module's parameters to the compute dtype (engine.py `_configure_distributed_model`), the ZeRO optimizer keeps
fp32 master partitions, and no autocast runs (accelerate does not enable native AMP under DeepSpeed). Then it
runs `steps` optimizer steps as the Trainer does: `engine(**batch).loss`, `engine.backward(loss)`,
`engine.step()` (which zeroes the gradients).

Rank 0 runs under `trace.MemoryTracker` from `deepspeed.initialize` on: every storage an op allocates (real
tensors, rounded to 512 B), freed by weakref finalizers, so DeepSpeed's flat buffers (bit16 groups, fp32
partitions, gradient partitions, reduce buckets, all-gather outputs) are all counted. Categories at the peak
come from where the tensor lives after the step (`_roles`): module parameters (stage 3: `param.ds_tensor`,
the rank's partition), the ZeRO optimizer's fp32 partitions and the base optimizer's state
(`optimizer_state`: DeepSpeed's own estimator counts the fp32 master copy among the optimizer states,
12 B/param), gradient partitions (`grads`), reduce buckets (`comm_buffers`), stage 3's gathered parameters
(`unsharded_params`); the rest is the tracer's usual categories.

The build (fp32 weights before DeepSpeed casts them) is outside the comparison: the result's training peak is
the maximum over forward / backward / optimizer phases.

Where CPU differs from CUDA (stated, not hidden): DeepSpeed's shared-memory all-reduce op (a C++ extension
built on first use) is not built, collectives go through gloo, which allocates no device memory that the
tracker would see; CUDA streams and events are no-ops on the CPU accelerator (`is_synchronized_device()`),
so there is no overlap of communication with compute and no `record_stream` (on CUDA that delays the reuse
of a freed block, i.e. reserved memory, not allocated); overlap_comm keeps its buffers regardless. The code
paths that allocate (engine.py casts, stage_1_and_2.py / stage3.py buffers, partition_parameters.py
all-gathers) are the accelerator-independent ones, so the engine models them as measured here. gloo's worker
thread would keep a collective's tensors alive past DeepSpeed's last reference for a time of the OS's choosing
(the traced peak moved by up to 4 MB between launches); `_deterministic_collectives` makes every collective
complete before it returns, so the trace is the same in every launch (ZeRO-1 test configuration: 7 of 7
launches equal, two of them beside two busy-looping processes).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import ModelArch
from ..training import Training
from . import HarnessError, NotTraceable
from .build import build_model, coerce_options, make_optimizer
from .trace import BLOCK, MemoryTracker, _inputs, _module_hooks, _phase_label, environment, peak_summary

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def ds_config(training: Training) -> dict[str, Any]:
    """The DeepSpeed config the HF Trainer's integration fills for this Training (transformers
    integrations/deepspeed.py `trainer_config_process`: bf16/fp16 from --bf16/--fp16, micro-batch,
    gradient accumulation, `zero_allow_untested_optimizer` when the Trainer makes the optimizer); ZeRO
    bucket and persistence settings stay at DeepSpeed's defaults (runtime/zero/config.py)."""
    if training.shard not in STAGES:
        raise NotTraceable(f"the DeepSpeed trace covers zero1/2/3, not {training.shard}")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch,
        "gradient_accumulation_steps": training.grad_accum,
        "zero_optimization": {"stage": STAGES[training.shard]},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 1.0,  # TrainingArguments.max_grad_norm default
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if training.precision != "fp32":
        cfg["bf16" if training.compute_dtype.name == "bf16" else "fp16"] = {"enabled": True}
    if training.offload != "none":
        raise NotTraceable("CPU offload is not traced (DeepSpeed's CPUAdam is a C++ extension)")
    return cfg


@dataclass
class DeepSpeedTraceResult:
    model: str
    method: str
    n_gpus: int
    shard: str
    training: dict[str, Any]
    peak_allocated_bytes: int  # max over forward / backward / optimizer phases (the build excluded)
    components: dict[str, int]
    peak_phase: dict[str, Any]
    phase_peaks: dict[str, int]
    phase_peaks_detail: dict[str, int]
    persistent: dict[str, int]  # DeepSpeed attributes holding tensors after the last step -> bytes
    largest_at_peak: list[dict[str, Any]]  # the biggest live storages at the peak (category, op, module, ...)
    optimizer: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cpu-trace-deepspeed", "model": self.model, "method": self.method, "rank": 0,
                "n_gpus": self.n_gpus, "shard": self.shard, "training": self.training,
                "memory": {"peak_allocated_bytes": self.peak_allocated_bytes, "components": self.components,
                           "peak_phase": self.peak_phase, "phase_peaks": self.phase_peaks,
                           "phase_peaks_detail": self.phase_peaks_detail, "persistent": self.persistent,
                           "largest_at_peak": self.largest_at_peak,
                           "allocation_rounding_bytes": BLOCK},
                "optimizer": self.optimizer,
                "trace": {"seconds": round(self.seconds, 3), "fake_tensors": False, "device": "cpu",
                          "backend": "gloo"},
                "notes": self.notes, "env": self.env}


CATEGORIES = ("frozen_params", "trainable_params", "buffers", "inputs", "grads", "optimizer_state",
              "unsharded_params", "comm_buffers", "loss_logits", "saved_activations", "temporaries")


def _summary(tr: MemoryTracker) -> dict[str, Any]:
    """Peak over the training phases (everything after the build and deepspeed.initialize)."""
    total = 0
    peak, peak_i = -1, -1
    phase_peak: dict[int, int] = {}
    for i, (rec, sign, ph) in enumerate(tr.events):
        total += sign * rec.nbytes
        if total > phase_peak.get(ph, -1):
            phase_peak[ph] = total
        if tr.phases[ph][0] != "load" and total > peak:
            peak, peak_i = total, i
    components = {c: 0 for c in CATEGORIES}
    seen: set[int] = set()
    live = []
    for rec, sign, _ in tr.events[: peak_i + 1]:
        if sign < 0 or id(rec) in seen:
            continue
        seen.add(id(rec))
        if rec.free is None or rec.free > peak_i:
            components[rec.category()] = components.get(rec.category(), 0) + rec.nbytes
            live.append(rec)
    largest = [{"category": r.category(), "op": r.op, "module": r.module, "shape": list(r.shape),
                "dtype": str(r.dtype).replace("torch.", ""), "bytes": r.nbytes, "phase": _phase_label(tr.phases[r.phase])}
               for r in sorted(live, key=lambda r: -r.nbytes)[:40]]
    return {**peak_summary(tr, peak, peak_i, phase_peak, components), "largest_at_peak": largest}


def _tensors(obj: Any, depth: int = 0):
    """Tensors directly in `obj` (a tensor, or lists / tuples / dicts of them, two levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)
    elif depth < 2 and "Bucket" in type(obj).__name__:  # stage3.py IPGBucketZ3 / stage_1_and_2.py buckets
        for x in vars(obj).values():
            yield from _tensors(x, depth + 1)


# attribute of the ZeRO optimizer (stage_1_and_2.py DeepSpeedZeroOptimizer, stage3.py
# DeepSpeedZeroOptimizer_Stage3) -> category; first match by substring, in this order
_ATTR_ROLES = (
    ("fp32", "optimizer_state"),  # single_partition_of_fp32_groups, fp32_partitioned_groups_flat
    ("grad", "grads"),  # averaged_gradients, grads_in_partition, grad_partitions_flat_buffer
    ("ipg", "comm_buffers"),  # reduce buckets (ipg: independent partition gradients)
    ("bucket", "comm_buffers"),
    ("bit16", "trainable_params"),  # bit16_groups_flat: the module's parameters, flattened
    ("fp16", "trainable_params"),  # fp16_partitioned_groups_flat (stage 3)
)


def _roles(tracker: MemoryTracker, engine: Any, persistent: dict[str, int] | None = None) -> None:
    """Give DeepSpeed's long-lived tensors their category (see the module docstring)."""
    module = engine.module
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = t if t is not None else p.data
        if t.numel():
            tracker.set_role(t, "trainable_params" if p.requires_grad else "frozen_params")
    opt = engine.optimizer
    seen: set[int] = set()
    for name, val in list(vars(opt).items()):
        lname = name.lower()
        role = next((r for key, r in _ATTR_ROLES if key in lname), None)
        if role is None:
            continue
        for t in _tensors(val):
            if t.numel() == 0 or id(t.untyped_storage()) in seen:
                continue
            seen.add(id(t.untyped_storage()))
            tracker.set_role(t, role, name)
            if persistent is not None:
                rec = tracker.rec_of(t)
                if rec is not None:
                    persistent[name] = persistent.get(name, 0) + rec.nbytes
    base = getattr(opt, "optimizer", None)
    for st in (getattr(base, "state", {}) or {}).values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.numel():
                tracker.set_role(v, "optimizer_state", f"optimizer.state.{k}")
                if persistent is not None and id(v.untyped_storage()) not in seen:
                    seen.add(id(v.untyped_storage()))
                    rec = tracker.rec_of(v)
                    if rec is not None:
                        persistent[f"optimizer.state.{k}"] = persistent.get(f"optimizer.state.{k}", 0) + rec.nbytes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_one(arch: ModelArch, method: str, options: Any, training: Training, steps: int, rank: int) -> dict | None:
    import deepspeed

    opts = coerce_options(method, options)
    tracker = MemoryTracker(vocab_size=arch.vocab_size, min_logit_rows=training.micro_batch, count_flops=False,
                            emulate_cuda=True) if rank == 0 else None
    t0 = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        built = build_model(arch, method, opts, training, device="cpu", with_optimizer=False, real_init=True)
        model = built.model
        basic, err = make_optimizer(model, training, "cpu")
        if basic is None:
            raise NotTraceable(err or "no optimizer")
        ctx = tracker if tracker is not None else contextlib.nullcontext()
        hooks = _module_hooks(tracker, model) if tracker is not None else contextlib.nullcontext()
        with ctx, hooks:
            if tracker is not None:
                for p in model.parameters():
                    tracker.track(p, "param", None)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=basic, config=ds_config(training))
            del basic
            mbs = min(training.grad_accum, 2)
            gen = torch.Generator().manual_seed(rank)
            persistent: dict[str, int] = {}
            for step in range(1, steps + 1):
                for mb in range(1, mbs + 1):
                    if tracker is not None:
                        tracker.set_phase("inputs", step, mb)
                    batch = _inputs(arch, training, gen)
                    if tracker is not None:
                        for t in batch.values():
                            tracker.track(t, "input", fixed="inputs")
                        tracker.set_phase("forward", step, mb)
                    out = engine(**batch)
                    loss = out.loss
                    del out
                    if tracker is not None:
                        tracker.end_forward()
                        tracker.set_phase("backward", step, mb)
                    engine.backward(loss)
                    del loss, batch
                    gc.collect(1)
                    if tracker is not None:
                        tracker.set_phase("optimizer", step, 0)
                    engine.step()  # the optimizer step runs on the last micro-batch (gradient accumulation boundary)
                    gc.collect(1)
                if tracker is not None:
                    _roles(tracker, engine, persistent if step == steps else None)
            summary = _summary(tracker) if tracker is not None else None
            optimizer_name = type(engine.optimizer).__name__
            engine.destroy()
            del engine
            gc.collect()
    finally:
        if tracker is not None:
            tracker.closed = True
        if gc_was:
            gc.enable()
    if summary is None:
        return None
    return {"summary": summary, "persistent": persistent, "optimizer": optimizer_name,
            "seconds": time.perf_counter() - t0}


_COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                "_reduce_scatter_base", "all_gather", "all_gather_into_tensor", "_all_gather_base", "broadcast",
                "all_to_all_single")


def _deterministic_collectives() -> None:
    """Make a collective's tensors die when DeepSpeed drops them, as they do on CUDA.

    gloo runs each collective on a worker thread (ProcessGroupGloo::runLoop), which holds the work, and with it
    the input and output tensors, until a little after the waiting thread has woken: when DeepSpeed dropped
    its last reference first, the storage was freed by the worker at a time of the OS's choosing, and rank 0's
    peak read 2.76 MB (4%) higher in 3 of 4 launches of the ZeRO-1 test configuration (backward, the op
    after a gradient all-reduce). On CUDA the caching allocator counts the free when Python drops the tensor
    (record_stream only delays the block's reuse). So each rank's gloo group gets one worker thread, and
    every collective completes and is followed by a barrier (queued behind it on that thread) before it
    returns: the worker has let go of the tensors by then, and their lifetime is DeepSpeed's references
    alone. On a CPU accelerator nothing overlaps anyway (streams are no-ops)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    gloo = c10d.ProcessGroupGloo

    class _OneThreadGloo(gloo):  # type: ignore[misc, valid-type]
        def __init__(self, store: Any, rank: int, size: int, timeout: Any = None) -> None:
            opts = gloo._Options()
            if timeout is not None:
                opts._timeout = timeout
            opts._threads = 1
            opts._devices = [gloo.create_default_device()]
            super().__init__(store, rank, size, opts)

    c10d.ProcessGroupGloo = _OneThreadGloo
    barrier = c10d.barrier

    def synchronous(collective: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            work = collective(*args, **kwargs)
            if c10d._world.pg_coalesce_state:  # inside a coalescing manager: issued (and waited) at its exit
                return work
            if work is not None:
                work.wait()
            barrier()
            return work

        return run

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, synchronous(getattr(dist, name)))


def _worker(rank: int, world: int, port: int, arch_json: str, jobs: list[dict], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import logging

    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    from deepspeed.utils import logger as ds_logger

    from ..arch import from_hf_config

    ds_logger.setLevel(logging.ERROR)
    # DeepSpeed's CPU shared-memory all-reduce is a C++ extension compiled on first use (minutes on a
    # CI runner); it only speeds up all-reduce, so collectives go through gloo instead
    # (`deepspeed.comm.torch` as an attribute is the torch package deepspeed/comm/__init__.py imports)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    spec = json.loads(arch_json)
    arch = from_hf_config(spec["config"], spec["name"])
    _deterministic_collectives()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    results = []
    try:
        for job in jobs:
            training = Training(**job["training"])
            try:
                r = _run_one(arch, job["method"], job.get("options") or {}, training, job["steps"], rank)
            except NotTraceable as e:
                r = {"error": str(e)}
            results.append(r)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(results, f)


def trace_deepspeed(arch: ModelArch, configs: list[tuple[str, Any, Training]], *, steps: int = 2,
                    model_name: str | None = None) -> list[DeepSpeedTraceResult | str]:
    """Trace each (method, options, training) of `configs` (all with the same n_gpus) on real DeepSpeed
    ZeRO ranks; one launch for all of them. A configuration DeepSpeed or the tracer cannot run comes
    back as its one-line reason."""
    import torch.multiprocessing as mp

    if not configs:
        return []
    world = configs[0][2].n_gpus
    if any(t.n_gpus != world for _, _, t in configs):
        raise HarnessError("one launch runs one world size")
    if world < 2:
        raise HarnessError("DeepSpeed ZeRO needs --gpus >= 2")
    jobs = []
    for method, options, training in configs:
        ds_config(training)  # refuse early
        jobs.append({"method": method, "options": options if isinstance(options, dict) else {},
                     "training": {k: getattr(training, k) for k in training.__dataclass_fields__},
                     "steps": steps})
    arch_json = json.dumps({"config": dict(arch.config), "name": arch.name})
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.json")
        mp.spawn(_worker, args=(world, _free_port(), arch_json, jobs, out), nprocs=world, join=True)
        with open(out, encoding="utf-8") as f:
            raw = json.load(f)
    results: list[DeepSpeedTraceResult | str] = []
    env = environment()
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception:  # pragma: no cover
        env["deepspeed"] = "missing"
    for (method, _, training), r in zip(configs, raw):
        if "error" in r:
            results.append(r["error"])
            continue
        s = r["summary"]
        results.append(DeepSpeedTraceResult(
            model=model_name or arch.name, method=method, n_gpus=world, shard=training.shard,
            training={k: getattr(training, k) for k in ("micro_batch", "seq_len", "grad_accum", "grad_ckpt",
                                                       "precision", "optimizer", "optimizer_impl")},
            peak_allocated_bytes=s["peak_allocated_bytes"], components=s["components"],
            peak_phase=s["peak_phase"], phase_peaks=s["phase_peaks"], phase_peaks_detail=s["phase_peaks_detail"],
            persistent=r["persistent"], largest_at_peak=s["largest_at_peak"], optimizer=r["optimizer"], seconds=r["seconds"],
            notes=[f"rank 0 of {world} DeepSpeed ZeRO-{STAGES[training.shard]} ranks (CPU accelerator, gloo, "
                   "real tensors), HF Trainer's config and torch AdamW"],
            env=env))
    return results
