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
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..arch import ModelArch, resolve_attention
from ..training import Training
from . import HarnessError, NotTraceable
from .build import BuiltModel, build_model, coerce_options, options_dict
from .emulate import _module_hooks, _patched, cuda_autocast_policy
from .tracker import (BLOCK, FIXED, MemoryTracker, _GEMM_4BIT, _phase_label, allocator_events,
                      compute_summary, cpu_sdpa_custom_mapping, event_log, peak_summary)  # noqa: F401  (re-exported: importers use them from here)

SCHEMA_VERSION = 1


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
