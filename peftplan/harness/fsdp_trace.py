"""Trace the real sharded step: PyTorch FSDP2 (`fully_shard`) on N fake ranks, rank 0's live bytes.

One process stands for rank 0 of `n_gpus` ranks: `dist.init_process_group("fake", ...)` with
`torch.testing._internal.distributed.fake_pg.FakeStore` gives a process group whose collectives are
no-ops (every buffer they need is still allocated by FSDP2 itself, which is what we measure). The
model is built as `trace.trace` builds it (transformers + peft, dtypes from the TunedModel), as
FakeTensors on the fake CPU device, then wrapped the way accelerate's FSDP2 path wraps it:
`fully_shard` on every decoder layer, then on the root, with
`MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=compute, output_dtype=compute)` for mixed
precision (accelerate `FullyShardedDataParallelPlugin.set_mixed_precision`) and
`reshard_after_forward=True` (fsdp-full) or False (fsdp-grad-op).

The tracker is `trace.MemoryTracker` with the additions PyTorch's own
`torch/distributed/_tools/fsdp2_mem_tracker.py` needs: ops on DTensors return NotImplemented so the
tracker sees the local ops; `wait_tensor` under fake tensors returns its input (as eager does);
DTensor's shape propagation (a nested fake mode) is not counted; `UntypedStorage.resize_` (how FSDP2
frees and re-allocates unsharded parameters) is tracked as free/alloc.

Categories at the peak: the trace's usual ones, plus
  unsharded_params  FSDP2's all-gather outputs (a layer's unsharded parameters, compute dtype)
  comm_buffers      flat all-gather / reduce-scatter buffers (`_allgather_base_`, `_reduce_scatter_base_`)
Sharded parameters (`DTensor._local_tensor`, padded to a multiple of N rows), sharded grads and
optimizer states are the usual frozen_params / trainable_params / grads / optimizer_state.
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import ModelArch
from ..training import Training
from . import HarnessError, NotTraceable
from .build import build_model, coerce_options, find_blocks, make_optimizer
from .trace import (_GEMM_4BIT, BLOCK, MemoryTracker, _inputs, forward_loss, _module_hooks, _patched, peak_summary,
                    environment)

FSDP_CATEGORIES = ("frozen_params", "trainable_params", "buffers", "quant_constants", "inputs", "grads",
                   "optimizer_state", "unsharded_params", "comm_buffers", "loss_logits", "saved_activations",
                   "temporaries")


class FSDPMemoryTracker(MemoryTracker):
    """MemoryTracker that looks through DTensors and follows FSDP2's storage resizes."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.entry_fake = None
        self.propagating = 0  # inside DTensor's sharding propagation (global-shape metadata tensors)

    def __enter__(self):  # noqa: D105
        from torch._guards import active_fake_mode

        self.entry_fake = active_fake_mode()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._guards import active_fake_mode
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into local ops, then see those
        kwargs = kwargs or {}
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode() is not None:
            return args[0]  # the fake impl returns a new tensor; eager returns the input
        if self.propagating or active_fake_mode() is not self.entry_fake:
            return func(*args, **kwargs)  # DTensor sharding propagation: metadata only
        out = super().__torch_dispatch__(func, types, args, kwargs)
        c10d = torch.ops.c10d
        if func is c10d._allgather_base_.default:
            self.set_role(args[0], "comm_buffers", "fsdp.all_gather_output")
        elif func is c10d._reduce_scatter_base_.default:
            self.set_role(args[1], "comm_buffers", "fsdp.reduce_scatter_input")
        return out

    def on_resize(self, st: torch.UntypedStorage, size: int) -> None:
        """`storage.resize_(n)`: FSDP2 frees (n=0) and re-allocates unsharded parameters in place."""
        key = id(st)
        old = self.live.pop(key, None)
        if old is not None:
            old.free = len(self.events)
            self.events.append((old, -1, self.phase_idx))
        if size > 0:
            rec = self._alloc(st, "resize_", (size,), torch.uint8)
            if old is not None:
                rec.fixed, rec.role, rec.saved, rec.held = old.fixed, old.role, old.saved, old.held


@contextlib.contextmanager
def _track_resize(tracker: FSDPMemoryTracker):
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    orig = torch.UntypedStorage.resize_
    orig_meta = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate_meta(self, *a, **k):  # DTensor builds global-shape fake tensors here: no device memory
        tracker.propagating += 1
        try:
            return orig_meta(self, *a, **k)
        finally:
            tracker.propagating -= 1

    def resize_(st, size):
        out = orig(st, size)
        tracker.on_resize(st, int(size))
        return out

    torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
    ShardingPropagator._propagate_tensor_meta_non_cached = propagate_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = orig  # type: ignore[method-assign]
        ShardingPropagator._propagate_tensor_meta_non_cached = orig_meta  # type: ignore[method-assign]


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake process group of `world_size` ranks in this process (rank 0)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise HarnessError("a process group is already initialized in this process")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class FSDPTraceResult:
    model: str
    method: str
    n_gpus: int
    shard: str
    training: dict[str, Any]
    peak_allocated_bytes: int
    components: dict[str, int]
    peak_phase: dict[str, Any]
    phase_peaks: dict[str, int]
    phase_peaks_detail: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cpu-trace-fsdp2", "model": self.model, "method": self.method, "rank": 0,
                "n_gpus": self.n_gpus, "shard": self.shard, "training": self.training,
                "memory": {"peak_allocated_bytes": self.peak_allocated_bytes, "components": self.components,
                           "peak_phase": self.peak_phase, "phase_peaks": self.phase_peaks,
                           "phase_peaks_detail": self.phase_peaks_detail, "allocation_rounding_bytes": BLOCK},
                "trace": {"seconds": round(self.seconds, 3), "fake_tensors": True, "device": "cpu"},
                "notes": self.notes, "env": self.env}


def _summary(tr: FSDPMemoryTracker) -> dict[str, Any]:
    total = 0
    peak, peak_i = -1, -1
    phase_peak: dict[int, int] = {}
    for i, (rec, sign, ph) in enumerate(tr.events):
        if rec.role == "host":
            continue
        total += sign * rec.nbytes
        if total > phase_peak.get(ph, -1):
            phase_peak[ph] = total
        if total > peak:
            peak, peak_i = total, i
    components = {c: 0 for c in FSDP_CATEGORIES}
    seen: set[int] = set()
    for rec, sign, _ in tr.events[: peak_i + 1]:
        if sign < 0 or id(rec) in seen or rec.role == "host":
            continue
        seen.add(id(rec))
        if rec.free is None or rec.free > peak_i:
            components[rec.category()] = components.get(rec.category(), 0) + rec.nbytes
    return peak_summary(tr, peak, peak_i, phase_peak, components)


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


def trace_fsdp(arch: ModelArch, method: str, options: Any = None, training: Training | None = None, *,
               steps: int = 2, model_name: str | None = None) -> FSDPTraceResult:
    """Trace `steps` optimizer steps of rank 0 of `training.n_gpus` FSDP2 ranks (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    training = training or Training(n_gpus=2, shard="fsdp-full")
    if training.shard not in ("fsdp-full", "fsdp-grad-op"):
        raise NotTraceable(f"the FSDP2 trace covers fsdp-full and fsdp-grad-op, not {training.shard}")
    if training.offload != "none":
        raise NotTraceable("CPU offload is not traced (FSDP2 CPUOffloadPolicy needs pinned host memory)")
    if training.trainer != "hf":
        raise NotTraceable(f"the FSDP2 trace runs the bare step (trainer hf), not trainer {training.trainer}")
    n = training.n_gpus
    opts = coerce_options(method, options)
    try:
        import bitsandbytes  # noqa: F401
        _GEMM_4BIT[0] = torch.ops.bitsandbytes.gemm_4bit.default
    except Exception:  # pragma: no cover
        _GEMM_4BIT[0] = None
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        with fake_process_group(n), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _patched(None, True):
                built = build_model(arch, method, opts, training, device="cpu", fake_mode=fake_mode,
                                    with_optimizer=False)
            if any(t.quant is not None for tb in built.tuned.blocks for t in tb.linears):
                raise NotTraceable("4-bit/8-bit bitsandbytes weights are plain uint8 Parameters with a quant_state "
                                   "here; FSDP2 would shard the packed bytes and lose the quant_state")
            from .fsdp_wrap import fsdp_mesh, reshard_after_forward, wrap_fsdp  # shared with the profiler
            reshard = reshard_after_forward(training)
            model = built.model
            mesh = fsdp_mesh(training, "cpu")  # outside the fake mode: the mesh holds real rank ids
            with fake_mode:
                wrap_fsdp(built, arch, training, mesh)
                opt, err = make_optimizer(model, training, "cpu")
            if opt is None:
                raise NotTraceable(err or "no optimizer")
            tracker = FSDPMemoryTracker(vocab_size=arch.vocab_size, min_logit_rows=training.micro_batch,
                                        count_flops=False, emulate_cuda=True)
            summary = _run(model, opt, arch, tracker, fake_mode, training, steps)
    finally:
        if gc_was:
            gc.enable()
    notes = [f"rank 0 of {n} FSDP2 ranks (fake process group), fully_shard per decoder layer + root, "
             f"reshard_after_forward={reshard}, mixed precision param/reduce dtype {training.compute_dtype.name}"
             if training.mixed else f"rank 0 of {n} FSDP2 ranks, no mixed-precision policy"]
    return FSDPTraceResult(model=model_name or arch.name, method=method, n_gpus=n, shard=training.shard,
                           training={k: getattr(training, k) for k in ("micro_batch", "seq_len", "grad_accum",
                                                                       "grad_ckpt", "precision", "optimizer",
                                                                       "optimizer_impl")},
                           peak_allocated_bytes=summary["peak_allocated_bytes"], components=summary["components"],
                           peak_phase=summary["peak_phase"], phase_peaks=summary["phase_peaks"],
                           phase_peaks_detail=summary["phase_peaks_detail"], seconds=time.perf_counter() - t0,
                           notes=notes, env=environment())


def _run(model, opt, arch, tracker: FSDPMemoryTracker, fake_mode, training: Training, steps: int) -> dict[str, Any]:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    amp = (torch.autocast("cpu", dtype=torch.bfloat16 if training.compute_dtype.name == "bf16" else torch.float16)
           if training.mixed else contextlib.nullcontext())

    def pack(x):
        tracker.note_saved(x)
        return x.detach() if x.requires_grad else x

    orig_wait = FSDPParamGroup.wait_for_unshard

    def wait_for_unshard(self):
        out = orig_wait(self)
        for fp in self.fsdp_params:
            for t in getattr(fp, "all_gather_outputs", []) or []:
                tracker.set_role(t, "unsharded_params", "fsdp.unsharded_param")
        return out

    def roles():
        for p in model.parameters():
            if p.grad is not None:
                tracker.set_role(_local(p.grad), "grads", "grad")
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    v = _local(v)
                    if k == "step" and v.dim() == 0 and not any(g.get("fused") for g in opt.param_groups):
                        tracker.set_role(v, "host", "optimizer.state.step")
                    else:
                        tracker.set_role(v, "optimizer_state", f"optimizer.state.{k}")

    mbs = min(training.grad_accum, 2)
    FSDPParamGroup.wait_for_unshard = wait_for_unshard  # type: ignore[method-assign]
    try:
        with fake_mode, _patched(tracker, True), _module_hooks(tracker, model), tracker, _track_resize(tracker):
            for p in model.parameters():
                tracker.track(_local(p), "param", fixed="trainable_params" if p.requires_grad else "frozen_params")
            for b in model.buffers():
                tracker.track(_local(b), "buffer", fixed="buffers")
            for step in range(1, steps + 1):
                for mb in range(1, mbs + 1):
                    tracker.set_phase("inputs", step, mb)
                    batch = _inputs(arch, training, None)
                    for t in batch.values():
                        tracker.track(t, "input", fixed="inputs")
                    tracker.set_phase("forward", step, mb)
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                        loss = forward_loss(model, batch, amp, training.grad_accum)
                        tracker.end_forward()
                        tracker.set_phase("backward", step, mb)
                        loss.backward()
                    del loss, batch
                    gc.collect(1)
                roles()
                tracker.set_phase("optimizer", step, 0)
                opt.step()
                roles()
                gc.collect(1)
                tracker.set_phase("zero_grad", step, 0)
                opt.zero_grad(set_to_none=True)
                gc.collect(1)
            return _summary(tracker)
    finally:
        tracker.closed = True
        FSDPParamGroup.wait_for_unshard = orig_wait  # type: ignore[method-assign]
