"""Trace the real training step: every storage the HF + peft + bitsandbytes step allocates.

`trace()` builds the model (`build.build_model`), then runs `steps` optimizer steps of
min(grad_accum, 2) micro-batches each — forward with labels, `loss.backward()`, `optimizer.step()`,
`optimizer.zero_grad(set_to_none=True)` — under `FakeTensorMode` on the fake "cpu" device (no
memory, no compute), or with real CPU tensors (`real=True`, small models, for testing).

A `TorchDispatchMode` (`MemoryTracker`) sees every op below autograd and records each output's
untyped storage once (rounded up to 512 B, the CUDA caching allocator's block size); a weakref
finalizer on the storage records its free. Parameters, buffers and quantization constants are
registered up front. From the event list the tracker computes the running total, its peak, the
phase of the peak and, at the peak, bytes by category. A storage's category is its final role:

  frozen_params, trainable_params, buffers, quant_constants  registered up front (re-scanned at the end)
  inputs             the micro-batch tensors (input ids, labels)
  grads              `param.grad` (post-accumulate-grad hooks)
  optimizer_state    tensors in `optimizer.state` (step-post hook)
  loss_logits        vocabulary-wide tensors: head output, fp32 upcast, log-softmax, their grads
  saved_activations  packed by `saved_tensors_hooks` (also during checkpoint recomputation), or
                     allocated in the forward and still referenced when the forward returns
                     (e.g. a checkpointed layer's input, held by the checkpoint)
  temporaries        everything else
AdamW's `step` scalars (non-fused, non-capturable) live on the host on a GPU: they are not counted.

Emulating CUDA (`emulate_cuda=True`, the default; the trace runs on a CPU but stands for a GPU run):
- CPU autocast follows CUDA autocast's fp32 policies (layer_norm, softmax, pow, exp, sum, ... run in
  fp32 on a GPU; CPU autocast would run them in bf16), see `cuda_autocast_policy`;
- `torch.is_autocast_enabled()` (no device: CUDA's state) reports the CPU autocast state, so peft's
  bitsandbytes LoRA layers skip their fp32 input cast under autocast as they do on a GPU;
- attention dropout in SDPA runs as CUDA's flash / memory-efficient kernels do (no saved mask or
  probabilities; CPU SDPA would fall back to the math path and keep S x S tensors);
- `F.dropout` (nn.Dropout, eager attention, LoRA's lora_dropout) in training with 0 < p < 1 runs
  `native_dropout` as CUDA's fused kernel does: the output plus a saved bool mask (1 B/element; CPU's
  `at::dropout` would save a mask in the input's dtype), `native_dropout_backward` one grad-sized output;
- `bitsandbytes::gemm_4bit` accounts the temporaries of its CUDA dequantize + F.linear fallback
  (used above 1536 rows): the dequantized weight and the fp32 absmax, alive with the output.

Not visible to any CPU trace (calibrate on a GPU): cuBLAS workspaces, kernel scratch buffers, the
caching allocator's reserved-but-unallocated memory, the CUDA context.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..arch import ModelArch, resolve_attention
from ..training import Training
from . import HarnessError, NotTraceable
from .build import BNB_GEMM_4BIT_CUSTOM_MAX_M, BuiltModel, build_model, coerce_options, options_dict

SCHEMA_VERSION = 1
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


# ---- patches that make the fake step equal the real one (and the CPU step stand for a GPU one) -------


def _find_packed_sequence_indices(position_ids: torch.Tensor):
    """transformers.masking_utils.find_packed_sequence_indices without its data-dependent early exit.

    The same ops run (so the same temporaries exist); it returns None, the answer for the unpacked
    sequences the tracer feeds. transformers treats FakeTensors as tracing and would otherwise return
    the mask and build a (b, 1, s, s) attention mask a real run never builds."""
    first_dummy_value = position_ids[:, :1] - 1
    position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
    packed_sequence_mask = (position_diff != 1).cumsum(-1)
    (packed_sequence_mask[:, -1] == 0).all()
    return None


# CUDA autocast policy (aten/src/ATen/autocast_mode.cpp, torch 2.13) for ops CPU autocast leaves alone:
# "fp32" casts half-precision floating inputs to fp32; "fp32_set_opt_dtype" runs the op with dtype=fp32
# when its first input is half precision and no dtype was given. CPU autocast has none of these (it
# runs layer_norm, softmax, pow, sum ... in bf16), so an LN model's activations would differ.
_CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "frobenius_norm.dim", "cosine_similarity", "dist", "renorm", "logsumexp",
)
_CUDA_FP32_SET_DTYPE_OPS = ("softmax.int", "log_softmax.int", "cumsum", "cumprod", "sum", "sum.dim_IntList",
                            "linalg_vector_norm")
_HALF = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def cuda_autocast_policy():
    """While active, CPU autocast follows CUDA autocast's fp32 policies (registered as AutocastCPU kernels)."""
    from torch._C import DispatchKey, DispatchKeySet

    lib = torch.library.Library("aten", "IMPL")
    exclude = DispatchKeySet(DispatchKey.AutocastCPU)

    def f32(x):
        if isinstance(x, torch.Tensor) and x.dtype in _HALF:
            return x.to(torch.float32)
        return x

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            args = tuple(f32(a) if not isinstance(a, (list, tuple)) else type(a)(f32(x) for x in a) for a in args)
            kwargs = {k: f32(v) for k, v in kwargs.items()}
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)
        return kernel

    def set_dtype_kernel(op):
        names = [a.name for a in op._schema.arguments]
        pos = names.index("dtype")

        def kernel(*args, **kwargs):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            given = args[pos] if len(args) > pos else kwargs.get("dtype")
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                if first is not None and first.dtype in _HALF and given is None:
                    if len(args) > pos:
                        args = args[:pos] + (torch.float32,) + args[pos + 1:]
                    else:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
        return kernel

    registered = []
    try:
        for name in _CUDA_FP32_OPS + _CUDA_FP32_SET_DTYPE_OPS:
            base, _, overload = name.partition(".")
            packet = getattr(torch.ops.aten, base, None)
            if packet is None:
                continue
            op = getattr(packet, overload or "default", None)
            if op is None:
                continue
            qual = f"aten::{base}" + (f".{overload}" if overload else "")
            if torch._C._dispatch_has_kernel_for_dispatch_key(qual, "AutocastCPU"):
                continue
            kernel = set_dtype_kernel(op) if name in _CUDA_FP32_SET_DTYPE_OPS else fp32_kernel(op)
            lib.impl(base + (f".{overload}" if overload else ""), kernel, "AutocastCPU")
            registered.append(name)
        yield registered
    finally:
        lib._destroy()


@contextlib.contextmanager
def _patched(tracker: MemoryTracker | None, emulate_cuda: bool):
    import torch.utils.checkpoint as ckpt
    import transformers.masking_utils as mu

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    patch(mu, "find_packed_sequence_indices", _find_packed_sequence_indices)
    if emulate_cuda:
        orig_is_autocast = torch.is_autocast_enabled

        def is_autocast_enabled(device_type=None):
            if device_type is None:
                return orig_is_autocast("cpu") or orig_is_autocast("cuda")
            return orig_is_autocast(device_type)

        patch(torch, "is_autocast_enabled", is_autocast_enabled)
        orig_sdpa = torch.nn.functional.scaled_dot_product_attention

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
            # CUDA's flash / memory-efficient kernels apply dropout inside the kernel (Philox RNG), saving
            # no mask; CPU SDPA has no dropout kernel and falls back to the math path (S x S saved).
            return orig_sdpa(query, key, value, attn_mask, 0.0, *args, **kwargs)

        patch(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        orig_dropout = torch.nn.functional.dropout

        def dropout(input, p=0.5, training=True, inplace=False):
            # CUDA's at::dropout takes the fused native_dropout kernel when training with 0 < p < 1 (not
            # in-place): an output and a bool mask (1 B/element), the mask saved for backward. CPU's
            # at::dropout takes _dropout_impl (mask in the input's dtype, multiplied and saved).
            # torch.native_dropout on CPU returns the same bool mask, so call it as CUDA does.
            if (training and not inplace and isinstance(p, (int, float)) and 0.0 < p < 1.0
                    and isinstance(input, torch.Tensor) and input.numel() > 0):
                return torch.native_dropout(input, float(p), True)[0]
            return orig_dropout(input, p, training, inplace)

        patch(torch.nn.functional, "dropout", dropout)
    stack = contextlib.ExitStack()
    if emulate_cuda and tracker is not None:
        stack.enter_context(cuda_autocast_policy())
    if tracker is not None:
        orig_hook = ckpt._recomputation_hook

        class _RecomputationHook(orig_hook):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                inner = self.pack_hook

                def pack_hook(x):
                    tracker.note_saved(x)
                    return inner(x)

                self.pack_hook = pack_hook

            def __enter__(self):
                tracker.in_recompute += 1
                return super().__enter__()

            def __exit__(self, *exc):
                tracker.in_recompute -= 1
                tracker.module_stack.clear()
                return super().__exit__(*exc)

        patch(ckpt, "_recomputation_hook", _RecomputationHook)
    try:
        with stack:
            yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def _module_hooks(tracker: MemoryTracker, model: torch.nn.Module):
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    names = {id(m): n for n, m in model.named_modules()}
    stack = tracker.module_stack

    def pre(mod, args):
        name = names.get(id(mod))
        if name is None:
            return
        while stack and not (name.startswith(stack[-1] + ".") or stack[-1] == ""):
            stack.pop()
        stack.append(name)

    def post(mod, args, out):
        name = names.get(id(mod))
        if name is None:
            return
        while stack:
            if stack.pop() == name:
                break

    h1 = register_module_forward_pre_hook(pre)
    h2 = register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


# ---- result --------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    model: str
    config: dict[str, Any]
    method: str
    options: dict[str, Any]
    training: dict[str, Any]
    params_total: int
    params_trainable: int
    peak_allocated_bytes: int
    components: dict[str, int]
    peak_phase: dict[str, Any]
    phase_peaks: dict[str, int]
    phase_peaks_detail: dict[str, int]
    step_peaks: dict[str, int]
    flops_forward: int | None
    flops_backward: int | None
    flops_recompute: int | None
    seconds: float
    fake: bool
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] | None = None
    saved: list[dict[str, Any]] | None = None
    held: list[dict[str, Any]] | None = None
    # the timeline for the caching-allocator replay (allocator_events); not written to records
    alloc_events: list[int] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": "cpu-trace",
            "model": {"name": self.model, "config": self.config},
            "method": self.method,
            "options": self.options,
            "training": self.training,
            "params": {"total": self.params_total, "trainable": self.params_trainable},
            "memory": {
                "peak_allocated_bytes": self.peak_allocated_bytes,
                "components": self.components,
                "peak_phase": self.peak_phase,
                "phase_peaks": self.phase_peaks,
                "phase_peaks_detail": self.phase_peaks_detail,
                "step_peaks": self.step_peaks,
                "allocation_rounding_bytes": BLOCK,
            },
            "compute": {"flops_forward": self.flops_forward, "flops_backward": self.flops_backward,
                        "flops_recompute": self.flops_recompute, "per": "micro-batch",
                        "tokens": self.training.get("micro_batch", 0) * self.training.get("seq_len", 0)},
            "trace": {"seconds": round(self.seconds, 3), "fake_tensors": self.fake, "device": "cpu",
                      **self.info},
            "notes": list(self.notes),
            "env": self.env,
        }
        if self.events is not None:
            d["events"] = self.events
        if self.saved is not None:
            d["saved_tensors"] = self.saved
        if self.held is not None:
            d["held_at_forward_end"] = self.held
        return d


def environment() -> dict[str, str]:
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            env[mod] = "missing"
    return env


# ---- the step --------------------------------------------------------------------------------------


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], amp: Any, grad_accum: int,
                 trainer: str = "hf") -> torch.Tensor:
    """Forward with labels under `amp`; the loss divided by `grad_accum` as the HF Trainer does.

    The model output (logits) goes out of scope on return, before the caller marks the forward's end,
    exactly as the Trainer drops it. Shared by the CPU tracer, the FSDP2 tracer and the GPU profiler.
    `trainer="trl"`: TRL's own `SFTTrainer.compute_loss` (harness/trl_step.py) instead of `model(**batch).loss`."""
    with amp:
        if trainer == "trl":
            from .trl_step import compute_loss

            loss = compute_loss(model, batch)
        else:
            out = model(**batch)
            loss = out.loss if hasattr(out, "loss") else out["loss"]
        if grad_accum > 1:
            loss = loss / grad_accum
    return loss


def _inputs(arch: ModelArch, training: Training, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
    shape = (training.micro_batch, training.seq_len)
    ids = torch.randint(0, arch.vocab_size, shape, generator=gen) if gen is not None else \
        torch.randint(0, arch.vocab_size, shape)
    return {"input_ids": ids, "labels": ids.clone()}


def trace(arch: ModelArch, method: str, options: Any = None, training: Training | None = None, *,
          real: bool = False, flops: bool = True, record_events: bool = False, steps: int = 2,
          emulate_cuda: bool = True, model_name: str | None = None, seed: int = 0) -> TraceResult:
    """Trace `steps` optimizer steps of `method` on `arch` (see the module docstring).

    `real=True` runs real CPU tensors (small models only); the tracker is the same, so fake and real
    peaks are directly comparable. `record_events` keeps every allocation/free and the ordered list
    of tensors saved for backward (with the producing op, module, shape and dtype)."""
    training = training or Training()
    attention, _ = resolve_attention(arch, training.attention, explicit=False)  # as estimate() resolves it
    training = training.with_(attention=attention)
    if steps < 1:
        raise HarnessError("steps must be >= 1")
    from ..trainers import get_trainer

    if options is None or isinstance(options, dict):  # the trainer's method-option defaults (TRL: no kbit prep)
        options = get_trainer(training.trainer).method_options(method, options)
    opts = coerce_options(method, options)
    if training.trainer == "trl" and arch.task != "causal-lm":
        # SFTTrainer's loss (chunked LM-head log-probs of shifted labels) is next-token prediction; peftplan
        # models and traces it for causal LMs only, and the engine refuses the same (engine/losses.py)
        raise NotTraceable(f"TRL's SFTTrainer loss is modelled for causal LMs; {arch.name} is {arch.task}")
    if "liger" in training.trainer_options:
        raise NotTraceable("Liger's kernels are Triton-only and cannot run on the CPU tracer: the estimate models "
                           "them from source")
    t0 = time.perf_counter()
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
        _GEMM_4BIT[0] = torch.ops.bitsandbytes.gemm_4bit.default
    except Exception:  # pragma: no cover
        _GEMM_4BIT[0] = None

    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = None if real else FakeTensorMode(allow_non_fake_inputs=True)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _patched(None, emulate_cuda):
            built = build_model(arch, method, opts, training, device="cpu", fake_mode=fake_mode)
        if built.optimizer is None:
            raise NotTraceable(built.optimizer_error or "no optimizer")
        extra = built.tuned.virtual_tokens
        widths: tuple[int, ...] = ()
        rewrite = None
        if training.trainer == "trl":
            from ..engine.losses import TRL_VOCAB_TILE
            from .trl_step import BoolIndexRewrite

            widths = (TRL_VOCAB_TILE,)
            rewrite = BoolIndexRewrite(skip=max(extra - 1, 0))
        tracker = MemoryTracker(vocab_size=arch.vocab_size, min_logit_rows=training.micro_batch,
                                count_flops=flops, emulate_cuda=emulate_cuda, record_events=record_events,
                                logit_widths=widths, rewrite=rewrite)
        result_summary = _run(built, tracker, fake_mode, training, steps, emulate_cuda, record_events, seed)
    finally:
        if gc_was_enabled:
            gc.enable()
    seconds = time.perf_counter() - t0
    total, trainable = built.params()
    s = result_summary
    notes = list(built.notes) + list(built.tuned.notes)
    if emulate_cuda:
        notes.append("CUDA emulated on the CPU trace: CUDA autocast's fp32 op policy, torch.is_autocast_enabled() "
                     "for peft's bitsandbytes layers, SDPA dropout inside the kernel, fused dropout (bool mask), "
                     "bitsandbytes gemm_4bit "
                     "dequantize+linear temporaries above 1536 rows")
    if any(t.quant is not None and t.quant.kind == "int8" for tb in built.tuned.blocks for t in tb.linears):
        notes.append("int8 (LLM.int8) traced through bitsandbytes' CPU training path (MatMul8bitFp: weight "
                     "dequantized to the compute dtype); CUDA runs MatMul8bitLt (int8 matmul, outlier "
                     "decomposition at threshold 6.0), whose data-dependent activations a trace cannot follow")
    if training.precision == "fp16-mixed":
        notes.append("fp16-mixed: GradScaler's scale/found_inf scalars and in-place unscale are not traced")
    notes.append("FLOPs are per micro-batch (B x T tokens), matmul/attention ops only, attention counted over "
                 "the full S x S score matrix (torch.utils.flop_counter formulas, causal mask not halved)")
    info = dict(built.info)
    info["emulate_cuda"] = emulate_cuda
    info["micro_batches_per_step"] = min(training.grad_accum, 2)
    info["steps"] = steps
    info["virtual_tokens"] = extra
    res = TraceResult(
        model=model_name or arch.name, config=dict(arch.config), method=method, options=options_dict(opts),
        training=asdict(training), params_total=total, params_trainable=trainable,
        peak_allocated_bytes=s["peak_allocated_bytes"], components=s["components"], peak_phase=s["peak_phase"],
        phase_peaks=s["phase_peaks"], phase_peaks_detail=s["phase_peaks_detail"], step_peaks=s["step_peaks"],
        flops_forward=tracker.flops["forward"] if flops else None,
        flops_backward=(tracker.flops["backward"] + tracker.flops["recompute"]) if flops else None,
        flops_recompute=tracker.flops["recompute"] if flops else None,
        seconds=seconds, fake=not real, info=info, notes=notes, env=environment(),
        events=event_log(tracker) if record_events else None,
        saved=tracker.saved_log if record_events else None,
        held=tracker.held_log if record_events else None,
        alloc_events=allocator_events(tracker),
    )
    return res


def _run(built: BuiltModel, tracker: MemoryTracker, fake_mode, training: Training, steps: int,
         emulate_cuda: bool, record_events: bool, seed: int) -> dict[str, Any]:
    amp = (torch.autocast("cpu", dtype=torch.bfloat16 if training.compute_dtype.name == "bf16" else torch.float16)
           if training.mixed else contextlib.nullcontext())
    gen = torch.Generator().manual_seed(seed) if fake_mode is None else None

    def pack(x):
        tracker.note_saved(x)
        return x.detach() if x.requires_grad else x

    def unpack(x):
        return x

    grad_handles = []

    def grad_hook(p):
        if p.grad is not None:
            tracker.set_role(p.grad, "grads", "grad")

    def opt_hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            host_step = not (group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        if k == "step" and host_step and v.dim() == 0:
                            tracker.set_role(v, "host", "optimizer.state.step")  # a CPU scalar on a GPU run
                        else:
                            tracker.set_role(v, "optimizer_state", f"optimizer.state.{k}")

    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with warnings.catch_warnings():
        # prepare_model_for_kbit_training calls checkpoint without use_reentrant (torch warns, uses reentrant)
        warnings.filterwarnings("ignore", message=".*use_reentrant parameter should be passed explicitly.*")
        try:
            return _steps(built, tracker, ctx, training, steps, emulate_cuda, amp, gen, grad_handles,
                          grad_hook, opt_hook, pack, unpack)
        finally:
            tracker.closed = True


def _steps(built, tracker, ctx, training, steps, emulate_cuda, amp, gen, grad_handles, grad_hook, opt_hook,
           pack, unpack) -> dict[str, Any]:
    model, opt, arch = built.model, built.optimizer, built.arch
    mbs = min(training.grad_accum, 2)
    trl_path = contextlib.nullcontext()
    if training.trainer == "trl" and emulate_cuda:
        from .trl_step import cuda_triton_path

        trl_path = cuda_triton_path()
    with ctx, _patched(tracker, emulate_cuda), trl_path, _module_hooks(tracker, model), tracker:
        _register_model(tracker, built)
        for p in model.parameters():
            if p.requires_grad:
                grad_handles.append(p.register_post_accumulate_grad_hook(grad_hook))
        opt_handle = opt.register_step_post_hook(opt_hook)
        try:
            for step in range(1, steps + 1):
                for mb in range(1, mbs + 1):
                    tracker.set_phase("inputs", step, mb)
                    batch = _inputs(arch, training, gen)
                    for t in batch.values():
                        tracker.track(t, "input", fixed="inputs")
                    tracker.set_phase("forward", step, mb)
                    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                        loss = forward_loss(model, batch, amp, training.grad_accum, training.trainer)
                        tracker.end_forward()
                        tracker.set_phase("backward", step, mb)
                        loss.backward()
                    del loss, batch
                    gc.collect(1)
                tracker.set_phase("optimizer", step, 0)
                opt.step()
                gc.collect(1)
                tracker.set_phase("zero_grad", step, 0)
                opt.zero_grad(set_to_none=True)
                gc.collect(1)
        finally:
            for h in grad_handles:
                h.remove()
            opt_handle.remove()
        _rescan_params(tracker, built)
        return tracker.summary()


def _register_model(tracker: MemoryTracker, built: BuiltModel) -> None:
    model = built.model
    for t in built.quant_tensors():
        tracker.track(t, "quant_state", fixed="quant_constants")
    for p in model.parameters():
        tracker.track(p, "param", fixed="trainable_params" if p.requires_grad else "frozen_params")
    for b in model.buffers():
        tracker.track(b, "buffer", fixed="buffers")


def _rescan_params(tracker: MemoryTracker, built: BuiltModel) -> None:
    """Parameters whose storage was replaced during the step (bitsandbytes casts a Linear4bit bias to
    the compute dtype in place: `bias.data = bias.data.to(x.dtype)`) keep their parameter category."""
    for p in built.model.parameters():
        rec = tracker.rec_of(p)
        if rec is not None and rec.fixed is None:
            rec.fixed = "trainable_params" if p.requires_grad else "frozen_params"
            rec.role = None


# ---- reading a trace -------------------------------------------------------------------------------


def saved_tensor_table(result: TraceResult, module_prefix: str, *, include_params: bool = False,
                       recompute: bool | None = None) -> tuple[list[str], int]:
    """Lines describing the tensors saved for backward inside `module_prefix` (e.g. "model.layers.1"),
    in the order autograd saved them, and the bytes of distinct activation storages among them.

    Needs `trace(..., record_events=True)`. `recompute`: only saves made during checkpoint
    recomputation (True), only forward saves (False), or both (None)."""
    if result.saved is None:
        raise HarnessError("trace was run without record_events=True")
    lines = []
    seen: set[int] = set()
    total = 0
    for e in result.saved:
        mod = e["module"]
        if not (mod == module_prefix or mod.startswith(module_prefix + ".") or mod.endswith("." + module_prefix)
                or ("." + module_prefix + ".") in mod):
            continue
        if recompute is not None and e["recompute"] != recompute:
            continue
        is_param = e["kind"] in FIXED
        if is_param and not include_params:
            continue
        new = e["first_save"] and not is_param
        if is_param:
            tag = "param"
        elif e["storage"] in seen:
            tag = "same-storage"
        elif new or e["recompute"]:
            tag = "new"
        else:
            tag = "saved-earlier"  # first saved outside this module (e.g. rotary cos/sin shared by all layers)
        if tag == "new":
            total += e["storage_bytes"]
        seen.add(e["storage"])
        i = mod.find(module_prefix)
        rel = mod[i + len(module_prefix):].lstrip(".") if i >= 0 else mod
        lines.append(f"{rel or '(block)':<34} {e['op']:<48} {str(tuple(e['shape'])):<18} {e['dtype']:<9} "
                     f"{e['storage_bytes']:>9} {tag}"
                     + ("  [recompute]" if e["recompute"] else ""))
    return lines, total


def count_flops(arch: ModelArch, method: str, options: Any = None, training: Training | None = None,
                emulate_cuda: bool = True) -> tuple[int, int]:
    """(forward, backward) FLOPs of one micro-batch by `torch.utils.flop_counter.FlopCounterMode`
    in a pass of its own, on fake tensors (CPU SDPA and bitsandbytes gemm_4bit added through
    `custom_mapping`). `trace()` counts inline with the same formulas; this is the cross-check."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    training = training or Training()
    opts = coerce_options(method, options)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _patched(None, emulate_cuda):
        built = build_model(arch, method, opts, training, device="cpu", fake_mode=fake_mode, with_optimizer=False)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16 if training.compute_dtype.name == "bf16" else torch.float16)
           if training.mixed else contextlib.nullcontext())
    mapping = cpu_sdpa_custom_mapping()
    with warnings.catch_warnings(), fake_mode, _patched(None, emulate_cuda), \
            (cuda_autocast_policy() if emulate_cuda else contextlib.nullcontext()):
        warnings.filterwarnings("ignore", message=".*use_reentrant parameter should be passed explicitly.*")
        batch = _inputs(arch, training, None)
        fwd = FlopCounterMode(display=False, custom_mapping=mapping)
        with fwd, amp:
            loss = built.model(**batch).loss
        bwd = FlopCounterMode(display=False, custom_mapping=mapping)
        with bwd:
            loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()
