"""The generic path: a causal LM whose `model_type` has no explicit family, estimated from a trace.

`generic_arch_or_raise` (called by catalog.load_model when from_hf_config refuses a model_type) reads the
architecture from transformers' own class when the harness extra is installed (harness/derive.py), and
otherwise says in one line how to enable it. `estimate_generic` is `estimate()` for such a model: the
step's timeline comes from a fake-tensor trace of the real transformers + peft step at depth 4 (checked
at depth 5), extended over depth by engine/derived.py; the peak, its breakdown, the caching-allocator
replay, the envelope and the fit verdict are the engine's own (estimate.py, fit.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from .arch import BUILDERS, ArchError, ModelArch

GENERIC_METHODS = ("lora", "qlora", "full")  # methods the generic path is checked on (tests/test_generic_model.py)
HARNESS_HINT = "pip install 'peftplan[harness]'"


def generic_arch_or_raise(cfg: Mapping[str, Any], name: str, error: ArchError) -> ModelArch:
    """The generic ModelArch of `cfg`, or `error` (an explicit family's refusal, or no harness: one line)."""
    model_type = cfg.get("model_type") if isinstance(cfg, Mapping) else None
    if not model_type or str(model_type) in BUILDERS:
        raise error
    try:
        from .harness.derive import generic_arch
    except ImportError:
        raise ArchError(f"{name}: model_type {model_type!r} has no explicit family in peftplan (supported: "
                        f"{', '.join(sorted(BUILDERS))}); install the harness extra ({HARNESS_HINT}) to derive "
                        "it from a trace of transformers' own class") from None
    return generic_arch(cfg, name)


def estimate_generic(arch: ModelArch, method: str, training, gpu, options: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    """estimate() for a family-"generic" arch (see the module docstring). Needs the harness extra."""
    from .arch import resolve_attention
    from .engine.derived import expand, extrapolate_flops
    from .engine.envelope import envelope as _envelope
    from .result import Compute, Estimate, Memory, build_tuned, count_params, overheads
    from .fit import cuda_context_bytes, fit_verdict, replay_reserved
    from .methods.base import MethodError

    if method not in GENERIC_METHODS:
        raise MethodError(f"{arch.name}: {method} is not supported on a trace-derived model "
                          f"({arch.model_type}); supported: {', '.join(GENERIC_METHODS)}")
    if training.n_gpus != 1:
        raise MethodError(f"{arch.name}: a trace-derived model ({arch.model_type}) is estimated on one GPU only")
    try:
        from .harness import HarnessError
        from .harness.derive import derive_schedule
    except ImportError:
        raise ArchError(f"{arch.name}: estimating model_type {arch.model_type!r} needs the harness extra "
                        f"({HARNESS_HINT})") from None
    model, opts = build_tuned(arch, method, options, training)
    effective = training
    assumptions = list(model.notes)
    attention, note = resolve_attention(arch, training.attention, explicit=False)
    if note is not None:
        effective = effective.with_(attention=attention)
        assumptions.append(note)
    if model.forces_grad_ckpt and not training.grad_ckpt:
        effective = effective.with_(grad_ckpt=True)
    try:
        sched = derive_schedule(arch, method, asdict(opts), effective)
    except HarnessError as exc:
        raise ArchError(f"{arch.name}: cannot derive the step of {arch.model_type!r} from its trace ({str(exc).splitlines()[0]})") from None
    exp = expand(sched, arch.num_layers)
    check = sched.get("check") or {}
    flops = extrapolate_flops(sched["flops"], check.get("flops"), arch.num_layers)
    version = sched["versions"]["transformers"]
    assumptions.insert(0, f"derived from a trace of transformers {version} ({arch.model_type} has no explicit family "
                          f"in peftplan): the real step traced on fake tensors at the real width, "
                          f"{sched['layers']} layers" + (f", checked at {check['depth']}" if check else "")
                       + f", extended to {arch.num_layers} layers" + (" (cached)" if sched.get("cached") else ""))
    assumptions.append("FLOPs of a trace-derived model: the traced matmul/attention ops (torch.utils.flop_counter "
                       "formulas), affine in depth; backward not split into input and weight gradients; no "
                       "roofline step time")
    o = overheads()
    replayed = replay_reserved(exp.events, effective)
    context, context_source = cuda_context_bytes(o, gpu.compute_capability)
    env_low, env_high, env_terms = _envelope(exp.peak, model, effective, gpu.compute_capability, o["envelope"])
    assumptions.append(f"CUDA context {context / 2**20:,.0f} MiB: {context_source}")
    states = exp.category_bytes_end.get("optimizer_state", 0)
    memory = Memory(
        peak_allocated_bytes=exp.peak, peak_reserved_bytes=replayed.peak_reserved_bytes,
        device_total_bytes=replayed.peak_reserved_bytes + context, envelope_low_bytes=env_low,
        envelope_high_bytes=env_high, peak_phase=exp.peak_phase, components=exp.components,
        phase_peaks=exp.phase_peaks,
        weights_bytes=exp.category_bytes_end.get("frozen_params", 0) + exp.category_bytes_end.get("trainable_params", 0),
        quant_constants_bytes=exp.category_bytes_end.get("quant_constants", 0), gradients_bytes=0,
        optimizer_state_bytes=states, paged_optimizer_bytes=0, cuda_context_bytes=context,
        envelope_terms=tuple(t.to_dict() for t in env_terms), allocator=replayed.to_dict(),
    )
    fwd, bwd, rec = flops
    per_micro = fwd + bwd
    total = per_micro * effective.grad_accum
    compute = Compute(fwd * effective.grad_accum, bwd * effective.grad_accum, 0, rec * effective.grad_accum, total,
                      None, None, 0.0, effective.compute_dtype.name, {}, "")
    verdict = fit_verdict(memory.device_total_bytes, gpu.memory_bytes, env_high - env_low, exp.events, effective, context)
    return Estimate(
        model=arch.name, method=method, gpu=gpu.name, options=asdict(opts), training=effective,
        params=count_params(model), memory=memory, compute=compute, gpu_memory_bytes=gpu.memory_bytes,
        fits=verdict.fits, headroom_bytes=verdict.headroom_bytes, assumptions=tuple(assumptions),
        parallel={"n_gpus": 1, "shard": training.shard, "offload": training.offload, "host_bytes": 0},
        verdict=verdict.text,
    )
