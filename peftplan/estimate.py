"""`estimate(arch, method, training, gpu) -> Estimate`: the pure core (no I/O beyond bundled data, no torch).

The peak allocated memory comes from the symbolic step (engine/step.py); peak reserved from
replaying the step's allocations and frees through the CUDA caching allocator (engine/allocator.py);
the device total adds the CUDA context and NCCL buffers held as data with provenance
(data/overheads.json), and fit.py decides whether it fits; FLOPs from the matmuls
(engine/flops.py); time from FLOPs over the GPU's dense peak at an assumed utilization.
"""

from __future__ import annotations

from typing import Any

from .arch import ModelArch, resolve_attention
from .catalog import GPU
from .engine.flops import StepFlops, step_flops
from .engine.ops import FlopCount
from .engine.step import StepMemory, simulate_step
from .training import Training
from .tuned import TunedModel
from .result import (Compute, Estimate, Memory, Params, build_tuned,  # noqa: F401  (Params re-exported)
                     count_params, overheads)


def estimate(arch: ModelArch, method: str, training: Training, gpu: GPU,
             options: dict[str, Any] | None = None, *, flush_check: bool = True) -> Estimate:
    """Peak memory, FLOPs and time of one optimizer step of `method` on `arch` on `gpu`.

    `flush_check=False` skips the second allocator replay that asks whether a run whose cache does not fit
    would still run by flushing it (fit.py): the verdict is then "does not fit" for such a run (the
    planner, which never recommends one, saves the replay)."""
    from dataclasses import asdict as _asdict

    if arch.family == "generic":  # a model_type without an explicit family: trace-derived (peftplan/generic.py)
        from .generic import estimate_generic

        return estimate_generic(arch, method, training, gpu, options)
    model, opts = build_tuned(arch, method, options, training)
    effective = training
    assumptions = list(model.notes)
    from .methods.moe_lora import moe_notes

    assumptions += moe_notes(model)  # MoE models: experts, router, what LoRA/QLoRA reach (arch_moe.py)
    attention, attention_note = resolve_attention(arch, training.attention, explicit=False)
    if attention_note is not None:
        effective = effective.with_(attention=attention)
        assumptions.append(attention_note)
    if model.forces_grad_ckpt and not training.grad_ckpt:
        effective = effective.with_(grad_ckpt=True)
    from .trainers import get_trainer

    trainer = get_trainer(training.trainer)
    if trainer.assumptions is not None:
        assumptions.extend(trainer.assumptions(model, training))
    if training.attention == "flash":
        assumptions.append("flash attention memory modelled as SDPA's flash kernel (saves q, k, v, out, logsumexp)")
    counted = FlopCount()
    mem: StepMemory = simulate_step(model, effective, flop_counter=counted)
    o = overheads()
    peak = mem.peak.bytes
    from .fit import cuda_context_bytes, fit_verdict, nccl_buffer_bytes, replay_reserved

    replayed = replay_reserved(mem.events, effective)
    reserved = replayed.peak_reserved_bytes
    context, context_source = cuda_context_bytes(o, gpu.compute_capability)
    nccl = nccl_buffer_bytes(o, effective)
    from .engine.envelope import envelope as _envelope
    env_low, env_high, env_terms = _envelope(peak, model, effective, gpu.compute_capability, o["envelope"])
    if training.optimizer.startswith("paged"):
        assumptions.append(
            "paged optimizer: bitsandbytes pages the states of tensors with >= 1e5 elements (optim/optimizer.py "
            "get_state_buffer; smaller ones are ordinary device tensors) into CUDA unified memory "
            "(cudaMallocManaged, functional.py get_paged): outside the caching allocator, so outside both "
            "max_memory_allocated and reserved; their pages move to the GPU when the step touches them and count "
            "in nvidia-smi while resident; under memory pressure the driver evicts them to host RAM instead of "
            "failing, so they never cause an OOM but cost PCIe traffic each step. The fit verdict leaves them out.")
    assumptions.append(f"CUDA context {context / 2**20:,.0f} MiB: {context_source}")
    if nccl:
        assumptions.append(f"NCCL buffers {nccl / 2**20:,.0f} MiB per rank (data/overheads.json nccl_buffers): "
                           "an estimate, not measured")
    if mem.events and replayed.peak_requested_bytes != peak:
        raise AssertionError(f"the allocator replay disagrees with the engine's allocated peak: "
                             f"{replayed.peak_requested_bytes} vs {peak} ({arch.name} {method} {effective})")
    memory = Memory(
        peak_allocated_bytes=peak, peak_reserved_bytes=reserved, device_total_bytes=reserved + context + nccl,
        envelope_low_bytes=env_low, envelope_high_bytes=env_high, peak_phase=mem.peak.phase,
        components={k: v for k, v in mem.peak.components.items() if v},
        phase_peaks=mem.phase_peaks, weights_bytes=mem.weights_bytes,
        quant_constants_bytes=mem.quant_constant_bytes, gradients_bytes=mem.grad_bytes,
        optimizer_state_bytes=mem.optimizer_state_bytes, paged_optimizer_bytes=mem.paged_optimizer_bytes,
        cuda_context_bytes=context, envelope_terms=tuple(t.to_dict() for t in env_terms),
        nccl_buffers_bytes=nccl, allocator=replayed.to_dict(),
    )
    flops: StepFlops = step_flops(model, effective, counted=counted)
    dtype = effective.compute_dtype.name
    peak_flops = gpu.peak_for(dtype)
    step_time = tokens_per_s = None
    util = 0.0
    parallel, comm_s = _parallel(model, effective, gpu, mem, assumptions)
    timing = None
    if peak_flops > 0:
        # paging decisions on allocated + context (not the replayed reserved): the planner's fast path, which has
        # no allocator replay, then gives the same step time bit for bit
        timing = _roofline_time(model, effective, gpu, counted, mem, peak + context + nccl, comm_s)
        step_time = timing.step_time_s
        tokens_per_s = effective.n_gpus * effective.tokens * effective.grad_accum / step_time
        util = flops.total / (step_time * peak_flops)
    compute = Compute(flops.forward, flops.backward_input, flops.backward_weight, flops.recompute,
                      flops.total, step_time, tokens_per_s, util, dtype,
                      dict(timing.breakdown) if timing else {}, timing.bound if timing else "")
    capacity = gpu.memory_bytes
    verdict = fit_verdict(memory.device_total_bytes, capacity, env_high - env_low,
                          mem.events if flush_check else None, effective, context + nccl)
    if timing is not None:
        assumptions.append(f"step time: a roofline over the step's kernels on {gpu.name} ({timing.bound}-bound; "
                           f"{util:.0%} of the dense {dtype} peak in model FLOPs), constants in data/roofline.json")
    return Estimate(
        model=arch.name, method=method, gpu=gpu.name, options=_asdict(opts), training=effective,
        params=count_params(model), memory=memory, compute=compute, gpu_memory_bytes=capacity,
        fits=verdict.fits, headroom_bytes=verdict.headroom_bytes, assumptions=tuple(assumptions),
        parallel=parallel, verdict=verdict.text,
    )


def _roofline_time(model: TunedModel, training: Training, gpu: GPU, counted: FlopCount, mem: StepMemory,
                   device_total: int, comm_s: float | None):  # type: ignore[no-untyped-def]
    """The roofline step time (engine/roofline.py) over the kernels the memory simulation noted."""
    from .engine import roofline

    paged_over = 0
    if mem.paged_optimizer_bytes:  # unified memory pages out only what does not fit beside the step
        paged_over = min(mem.paged_optimizer_bytes, max(0, device_total + mem.paged_optimizer_bytes - gpu.memory_bytes))
    return roofline.step_time(
        getattr(counted, "table", None) or roofline.kernel_table(counted.kernels), roofline.rates_for(gpu), grad_accum=training.grad_accum,
        optimizer=training.optimizer, optimizer_impl=training.optimizer_impl, trainable_bytes=mem.trainable_bytes,
        trainable_elements=count_params(model).trainable, paged_bytes_over=paged_over,
        offload_bytes=(mem.trainable_bytes if training.offload != "none" else 0)
        + mem.activation_offload_bytes * training.grad_accum, communication_s=comm_s)


def _parallel(model: TunedModel, training: Training, gpu: GPU, mem: StepMemory,
              assumptions: list[str]) -> tuple[dict[str, Any], float | None]:
    """The `parallel` block of the estimate and the communication seconds per step (engine/sharding.py)."""
    from .engine.sharding import communication, quantized_weights

    out: dict[str, Any] = {"n_gpus": training.n_gpus, "shard": training.shard, "offload": training.offload,
                           "host_bytes": mem.host_bytes}
    if training.n_gpus == 1:
        return out, None
    p = count_params(model)
    volume, secs, link = communication(training, gpu.name, p.total, p.trainable, quantized_weights(model))
    out.update({"comm_bytes_per_step": volume, "comm_time_s": secs, "link": link})
    assumptions.append(f"memory is per GPU (rank 0) of {training.n_gpus}; each rank runs micro-batch "
                       f"{training.micro_batch}; tokens/s counts all ranks; step time = max(compute, "
                       "communication): collectives assumed to overlap compute")
    if training.shard.startswith("zero"):
        assumptions.append("DeepSpeed ZeRO as the HF Trainer runs it: module cast to the compute dtype (no autocast), "
                           "fp32 master partition + optimizer states per rank, reduce bucket and stage-3 thresholds "
                           "at DeepSpeed's defaults (data/interconnect.json); checked against a real DeepSpeed "
                           "0.19 engine on 2 CPU ranks (harness/deepspeed_trace.py); stage-3 gathers per decoder "
                           "layer, not per module")
    if training.shard.startswith("fsdp"):
        assumptions.append("FSDP2 fully_shard per decoder layer + root, MixedPrecisionPolicy(param_dtype=reduce_dtype="
                           "compute dtype) as accelerate sets it; per-rank peak checked against an FSDP2 trace "
                           "(harness/fsdp_trace.py)")
        if any(t.quant is not None for tb in model.blocks for t in tb.linears):
            assumptions.append("QLoRA under FSDP needs bnb_4bit_quant_storage = the compute dtype so the packed "
                               "4-bit weights can be flat-sharded; modelled as 0.5 B/param sharded 1/N and "
                               "all-gathered at that size, quantization constants whole on every rank; not "
                               "checked against an FSDP2 trace (the tracer's 4-bit weights are uint8 Parameters "
                               "whose quant_state FSDP2 would not carry)")
    if training.offload != "none":
        assumptions.append("offloaded optimizer state (and parameters) live in host memory: parallel.host_bytes")
    if secs is None:
        assumptions.append(f"no interconnect bandwidth on record for {gpu.name}: communication time not included")
    return out, secs
