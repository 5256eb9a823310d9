"""The tracer's memory accounting: `MemoryTracker`, a TorchDispatchMode that records every storage the real step
allocates and frees (rounded to the CUDA caching allocator's 512-byte blocks), its categories, and the summaries
read from its events (peak, phase of the peak, bytes by category, allocator events, op log). Used by the CPU
tracer (trace.py), the FSDP2 and DeepSpeed tracers and the GPU profiler.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .build import BNB_GEMM_4BIT_CUSTOM_MAX_M


BLOCK = 512  # CUDA caching allocator: every allocation is rounded up to a multiple of 512 bytes

CATEGORIES = ("frozen_params", "trainable_params", "buffers", "quant_constants", "inputs", "grads",
              "optimizer_state", "loss_logits", "saved_activations", "temporaries")
FIXED = {"frozen_params", "trainable_params", "buffers", "quant_constants", "inputs"}


def round_block(n: int) -> int:
    return ((n + BLOCK - 1) // BLOCK) * BLOCK if n > 0 else 0


# ---- the tracker ---------------------------------------------------------------------------------


class _Rec:
    __slots__ = ("key", "nbytes", "raw", "fixed", "role", "alloc", "free", "phase", "op", "shape", "dtype",
                 "module", "saved", "held", "logits", "recompute")

    def __init__(self, key, nbytes, raw, phase, op, shape, dtype, module, recompute):
        self.key = key
        self.nbytes = nbytes
        self.raw = raw
        self.fixed = None  # category fixed at registration
        self.role = None  # grads / optimizer_state / host, from hooks
        self.alloc = -1
        self.free = None
        self.phase = phase
        self.op = op
        self.shape = shape
        self.dtype = dtype
        self.module = module
        self.saved = None  # "packed" | "recompute"
        self.held = False
        self.logits = False
        self.recompute = recompute

    def category(self) -> str:
        if self.fixed is not None:
            return self.fixed
        if self.role is not None:
            return self.role
        if self.logits:
            return "loss_logits"
        if self.saved or self.held:
            return "saved_activations"
        return "temporaries"


class MemoryTracker(TorchDispatchMode):
    """Records every storage allocated by ops run under it, and frees via weakref finalizers."""

    def __init__(self, *, vocab_size: int, min_logit_rows: int, count_flops: bool = True,
                 emulate_cuda: bool = True, record_events: bool = False, logit_widths: tuple[int, ...] = (),
                 rewrite: Any = None):
        super().__init__()
        self.vocab = vocab_size
        # last dims filed under loss_logits besides the vocabulary (TRL's fused head: its 32768-wide tiles)
        self.logit_widths = {vocab_size, *logit_widths}
        self.rewrite = rewrite  # (func, args, kwargs) -> output or NotImplemented (trl_step.BoolIndexRewrite)
        self.min_logit_rows = min_logit_rows
        self.emulate_cuda = emulate_cuda
        self.record_events = record_events
        self.live: dict[int, _Rec] = {}
        self.events: list[tuple[_Rec, int, int]] = []  # (rec, +1/-1, phase index)
        self.phases: list[tuple[str, int, int]] = [("load", 0, 0)]
        self.phase_idx = 0
        self.closed = False
        self.module_stack: list[str] = []
        self.module_names: dict[int, str] = {}
        self.in_recompute = 0
        self.saved_log: list[dict[str, Any]] = []
        self.held_log: list[dict[str, Any]] = []
        self._saved_keys: set[int] = set()
        self.flops: dict[str, int] = {"forward": 0, "backward": 0, "recompute": 0, "optimizer": 0}
        self.count_flops = count_flops
        self._registry = _flop_registry() if count_flops else {}
        self.forward_start = 0

    # -- phases --
    def set_phase(self, kind: str, step: int = 0, mb: int = 0) -> None:
        self.phases.append((kind, step, mb))
        self.phase_idx = len(self.phases) - 1
        if kind == "forward":
            self.forward_start = len(self.events)

    @property
    def phase_kind(self) -> str:
        return self.phases[self.phase_idx][0]

    def end_forward(self) -> None:
        """Everything allocated in this forward and still alive is kept for backward."""
        first = self.phases[self.phase_idx][1:] == (1, 1)
        for rec in sorted(self.live.values(), key=lambda r: r.alloc):
            if rec.alloc >= self.forward_start and rec.fixed is None and rec.role is None:
                rec.held = True
                if self.record_events and first:
                    self.held_log.append({"module": rec.module, "op": rec.op, "shape": list(rec.shape),
                                          "dtype": _dt(rec.dtype), "bytes": rec.nbytes, "saved": rec.saved,
                                          "logits": rec.logits, "storage": rec.alloc})

    # -- storages --
    def _current_module(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def _alloc(self, st, op: str, shape, dtype, fixed: str | None = None) -> _Rec:
        key = id(st)
        raw = st.nbytes()
        rec = _Rec(key, round_block(raw), raw, self.phase_idx, op, shape, dtype, self._current_module(),
                   bool(self.in_recompute) or (self.phase_kind == "backward" and bool(self.module_stack)))
        rec.fixed = fixed
        if fixed is None and len(shape) >= 2 and shape[-1] in self.logit_widths:
            rows = math.prod(shape[:-1])
            rec.logits = rows >= self.min_logit_rows
        rec.alloc = len(self.events)
        self.events.append((rec, 1, self.phase_idx))
        self.live[key] = rec
        weakref.finalize(st, self._on_free, key)
        return rec

    def _on_free(self, key: int) -> None:
        if self.closed:
            return
        rec = self.live.pop(key, None)
        if rec is None:
            return
        rec.free = len(self.events)
        self.events.append((rec, -1, self.phase_idx))

    def _hidden(self, nbytes: int, op: str, shape, dtype) -> _Rec:
        """A temporary allocated inside a kernel (not an op output), freed with `_hidden_free`."""
        rec = _Rec(-len(self.events) - 1, round_block(nbytes), nbytes, self.phase_idx, op, shape, dtype,
                   self._current_module(), bool(self.in_recompute))
        rec.alloc = len(self.events)
        self.events.append((rec, 1, self.phase_idx))
        return rec

    def _hidden_free(self, rec: _Rec) -> None:
        rec.free = len(self.events)
        self.events.append((rec, -1, self.phase_idx))

    def track(self, t: torch.Tensor, op: str, fixed: str | None = None) -> _Rec | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        st = t.untyped_storage()
        rec = self.live.get(id(st))
        if rec is not None:
            if fixed is not None and rec.fixed is None:
                rec.fixed = fixed
            nb = round_block(st.nbytes())
            if nb != rec.nbytes:  # resized in place: free the old size, allocate the new one
                self.live.pop(id(st))
                rec.free = len(self.events)
                self.events.append((rec, -1, self.phase_idx))
                new = _Rec(id(st), nb, st.nbytes(), self.phase_idx, op, tuple(t.shape), t.dtype,
                           self._current_module(), rec.recompute)
                new.fixed, new.role, new.saved, new.held = rec.fixed, rec.role, rec.saved, rec.held
                new.alloc = len(self.events)
                self.events.append((new, 1, self.phase_idx))
                self.live[id(st)] = new
                return new
            return rec
        return self._alloc(st, op, tuple(t.shape), t.dtype, fixed)

    def note_saved(self, x: torch.Tensor) -> None:
        """A tensor packed for backward (by autograd, or by checkpoint recomputation)."""
        rec = self.rec_of(x)
        if rec is None:
            return
        backward = self.phase_kind == "backward"
        if rec.saved is None:
            rec.saved = "recompute" if backward else "packed"
        if self.record_events and self.phases[self.phase_idx][1:] == (1, 1):
            key = id(rec)
            self.saved_log.append({
                "phase": self.phase_kind, "module": self._current_module(), "op": rec.op,
                "shape": list(x.shape), "dtype": _dt(x.dtype), "storage_shape": list(rec.shape),
                "storage_bytes": rec.nbytes, "storage_dtype": _dt(rec.dtype), "storage": rec.alloc,
                "kind": rec.fixed or ("logits" if rec.logits else "activation"),
                "first_save": key not in self._saved_keys, "recompute": backward})
            self._saved_keys.add(key)

    def rec_of(self, t: torch.Tensor) -> _Rec | None:
        if not isinstance(t, torch.Tensor):
            return None
        return self.live.get(id(t.untyped_storage()))

    def set_role(self, t: torch.Tensor, role: str, op: str = "") -> None:
        rec = self.rec_of(t) or self.track(t, op or role)
        if rec is not None and rec.fixed is None:
            rec.role = role

    # -- dispatch --
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hidden = self._kernel_temporaries(func, args, kwargs)
        out = NotImplemented if self.rewrite is None else self.rewrite(func, args, kwargs)
        if out is NotImplemented and func in _FAKE_NOOP_INPLACE and _any_fake(args):
            out = None  # see _FAKE_NOOP_INPLACE
        if out is NotImplemented:
            out = func(*args, **kwargs)
        name = _op_name(func)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, name)
        for rec in hidden:
            self._hidden_free(rec)
        if self.count_flops and self.phases[self.phase_idx][1] <= 1 and self.phases[self.phase_idx][2] <= 1:
            f = self._registry.get(func._overloadpacket)
            if f is not None:
                # aten.addmm.dtype_out (TRL's fused head: `addmm(acc, a, b, out_dtype=fp32, out=acc)`) passes
                # out_dtype, beta, alpha, out: the formula takes the three operands' shapes
                fargs, kw = args, kwargs
                if func._overloadpacket is torch.ops.aten.addmm and ("out_dtype" in kwargs or len(args) > 3):
                    fargs, kw = args[:3], {}
                n = int(f(*fargs, **kw, out_val=out))
                kind = self.phase_kind
                if kind == "backward" and (self.in_recompute or self.module_stack):
                    self.flops["recompute"] += n
                elif kind in self.flops:
                    self.flops[kind] += n
        return out

    def _kernel_temporaries(self, func, args, kwargs) -> list[_Rec]:
        if func is not _GEMM_4BIT[0]:
            return []
        A, shapeB = args[0], args[2]
        absmax_8bit = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None)
        rows = A.numel() // A.shape[-1]
        if self.emulate_cuda and rows <= BNB_GEMM_4BIT_CUSTOM_MAX_M:
            return []  # fused kernel, no temporaries
        n, k = shapeB
        out = []
        if absmax_8bit is not None:  # absmax_dq and absmax_dq + offset, both fp32, both alive
            out.append(self._hidden(absmax_8bit.numel() * 4, "bnb.gemm_4bit:absmax_dq", (absmax_8bit.numel(),), torch.float32))
            out.append(self._hidden(absmax_8bit.numel() * 4, "bnb.gemm_4bit:absmax", (absmax_8bit.numel(),), torch.float32))
        out.append(self._hidden(n * k * A.element_size(), "bnb.gemm_4bit:dequantized_weight", (n, k), A.dtype))
        return out

    # -- flops of custom ops --
    def summary(self) -> dict[str, Any]:
        return compute_summary(self)


_GEMM_4BIT: list[Any] = [None]
# In-place foreach kernels with no meta kernel, which FakeTensorMode runs through its "unsafe fallback": real
# zero-filled copies of every parameter, gradient and buffer on the host and the real CPU kernel (torch
# _subclasses/fake_tensor.py `run_fallback_kernel`). They allocate nothing the tracker sees (the fallback runs
# below it) and return nothing (`_fused_sgd_(...) -> ()`, native_functions.yaml), so on fake tensors the
# tracer skips them: a 2-layer full fp32 olmo2-7b step with fused SGD took 322 s (past the fuzz benchmark's
# 300 s per case) for the same peak
_FAKE_NOOP_INPLACE = frozenset({torch.ops.aten._fused_sgd_.default, torch.ops.aten._fused_sgd_.tensor_lr})


def _any_fake(args: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in tree_leaves(args))


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _op_name(func) -> str:
    try:
        return f"{func.namespace}.{func._schema.name.split('::')[-1]}" + (
            f".{func._overloadname}" if func._overloadname not in ("default", "") else "")
    except Exception:
        return str(func)


def _shape_formulas() -> dict:
    """FLOP formulas (on shapes, as torch.utils.flop_counter's) for ops its registry lacks."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_sdpa(query_shape, key_shape, value_shape, *a, out_shape=None, **k):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *a, out_shape=None, **k):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    out = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_bwd}
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
        gemm = torch.ops.bitsandbytes.gemm_4bit
    except (ImportError, AttributeError, RuntimeError):
        return out

    def gemm_4bit(a_shape, b_shape, shape_b, *a, out_shape=None, **k):
        n, kk = shape_b
        return 2 * math.prod(a_shape[:-1]) * n * kk

    out[gemm] = gemm_4bit
    return out


def _flop_registry() -> dict:
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    reg = dict(flop_registry)
    reg.update({k: shape_wrapper(f) for k, f in _shape_formulas().items()})
    return reg


def cpu_sdpa_custom_mapping() -> dict:
    """FlopCounterMode(custom_mapping=...) entries for CPU SDPA and bitsandbytes' gemm_4bit."""
    return _shape_formulas()


# ---- summary -----------------------------------------------------------------------------------


def _phase_label(ph: tuple[str, int, int]) -> str:
    kind, step, mb = ph
    if kind in ("load",):
        return kind
    if kind in ("optimizer", "zero_grad"):
        return f"step{step}.{kind}"
    return f"step{step}.mb{mb}.{kind}"


def compute_summary(tr: MemoryTracker) -> dict[str, Any]:
    total = 0
    peak, peak_i = -1, -1
    phase_peak: dict[int, tuple[int, int]] = {}
    step_peak: dict[int, int] = {}
    for i, (rec, sign, ph) in enumerate(tr.events):
        if rec.role == "host":
            continue
        total += sign * rec.nbytes
        cur = phase_peak.get(ph)
        if cur is None or total > cur[0]:
            phase_peak[ph] = (total, i)
        if total > peak:
            peak, peak_i = total, i
        st = tr.phases[ph][1]
        if total > step_peak.get(st, -1):
            step_peak[st] = total
    components = {c: 0 for c in CATEGORIES}
    if peak_i >= 0:
        seen = set()
        for rec, sign, _ in tr.events[: peak_i + 1]:
            if sign < 0 or id(rec) in seen or rec.role == "host":
                continue
            seen.add(id(rec))
            if rec.free is None or rec.free > peak_i:
                components[rec.category()] += rec.nbytes
    peak_rec, _, peak_ph = tr.events[peak_i] if peak_i >= 0 else (None, 0, 0)
    kind, step, mb = tr.phases[peak_ph]
    by_kind: dict[str, int] = {}
    detail: dict[str, int] = {}
    for ph, (b, _) in phase_peak.items():
        label = _phase_label(tr.phases[ph])
        detail[label] = max(detail.get(label, 0), b)
        k = tr.phases[ph][0]
        by_kind[k] = max(by_kind.get(k, 0), b)
    return {
        "peak_allocated_bytes": peak,
        "components": components,
        "peak_phase": {"phase": kind, "step": step, "micro_batch": mb,
                       "op": peak_rec.op if peak_rec is not None else None,
                       "module": peak_rec.module if peak_rec is not None else None},
        "phase_peaks": by_kind,
        "phase_peaks_detail": detail,
        "step_peaks": {f"step{k}": v for k, v in sorted(step_peak.items()) if k > 0},
        "final_allocated_bytes": total,
    }


def allocator_events(tr: MemoryTracker) -> list[int]:
    """The traced timeline in engine/allocator.py's form (n >= 0: allocate n bytes; ~i: free the
    allocation of event i), every storage the CUDA caching allocator would serve; host-side
    scalars (AdamW's non-fused step counters) are left out, as in the peak."""
    out: list[int] = []
    handle: dict[int, int] = {}
    for rec, sign, _ in tr.events:
        if rec.role == "host" or not rec.nbytes:
            continue
        if sign > 0:
            handle[id(rec)] = len(out)
            out.append(rec.nbytes)
        else:
            h = handle.pop(id(rec), None)
            if h is not None:
                out.append(~h)
    return out


def peak_summary(tr: MemoryTracker, peak: int, peak_i: int, phase_peak: dict[int, int],
                 components: dict[str, int]) -> dict[str, Any]:
    """The record fields of a trace's peak (bytes, components, where, per-phase peaks) from the peak found
    by a tracer's own walk over `tr.events` (the FSDP2 and DeepSpeed tracers count host memory and the
    load phase their own way)."""
    peak_rec, _, peak_ph = tr.events[peak_i]
    kind, step, mb = tr.phases[peak_ph]
    by_kind: dict[str, int] = {}
    detail: dict[str, int] = {}
    for ph, b in phase_peak.items():
        label = _phase_label(tr.phases[ph])
        detail[label] = max(detail.get(label, 0), b)
        by_kind[tr.phases[ph][0]] = max(by_kind.get(tr.phases[ph][0], 0), b)
    return {"peak_allocated_bytes": peak, "components": {k: v for k, v in components.items() if v},
            "peak_phase": {"phase": kind, "step": step, "micro_batch": mb, "op": peak_rec.op,
                           "module": peak_rec.module},
            "phase_peaks": by_kind, "phase_peaks_detail": detail}


def event_log(tr: MemoryTracker) -> list[dict[str, Any]]:
    out = []
    total = 0
    for i, (rec, sign, ph) in enumerate(tr.events):
        if rec.role != "host":
            total += sign * rec.nbytes
        out.append({"i": i, "event": "alloc" if sign > 0 else "free", "op": rec.op, "bytes": rec.nbytes,
                    "category": rec.category(), "total": total, "phase": _phase_label(tr.phases[ph]),
                    "module": rec.module, "shape": list(rec.shape), "dtype": str(rec.dtype).replace("torch.", ""),
                    "saved": rec.saved, "recompute": rec.recompute})
    return out
