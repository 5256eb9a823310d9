"""`estimate(arch, method, training, gpu) -> Estimate`: the pure core (no I/O beyond bundled data, no torch).

The peak allocated memory comes from the symbolic step (engine/step.py); peak reserved from
replaying the step's allocations and frees through the CUDA caching allocator (engine/allocator.py);
the device total adds the CUDA context and NCCL buffers held as data with provenance
(data/overheads.json), and fit.py decides whether it fits; FLOPs from the matmuls
(engine/flops.py); time from FLOPs over the GPU's dense peak at an assumed utilization.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .arch import ModelArch, resolve_attention
from .catalog import GPU
from .engine.flops import StepFlops, step_flops
from .engine.ops import FlopCount
from .engine.step import StepMemory, simulate_step
from .methods import get_method
from .training import Training
from .tuned import TunedModel


@lru_cache(maxsize=1)
def overheads() -> dict[str, Any]:
    text = (resources.files("peftplan") / "data" / "overheads.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class Params:
    total: int
    trainable: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def legacy_peft_line(self) -> str:
        """The line peft < 0.7 printed (the seed's format): raw integers and the full float."""
        return f"trainable params: {self.trainable} || all params: {self.total} || trainable%: {100 * self.trainable / self.total}"

    def peft_line(self) -> str:
        """The line peft's `print_trainable_parameters()` prints."""
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {self.trainable_percent:.4f}")


@dataclass(frozen=True)
class Memory:
    """Bytes. peak_allocated ~ torch.cuda.max_memory_allocated; reserved ~ max_memory_reserved
    (the caching-allocator replay, `allocator`); device_total ~ what nvidia-smi shows (reserved +
    CUDA context + NCCL buffers under multi-GPU)."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    envelope_low_bytes: int
    envelope_high_bytes: int
    peak_phase: str
    components: dict[str, int]  # category -> bytes alive at the peak
    phase_peaks: dict[str, int]
    weights_bytes: int
    quant_constants_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    paged_optimizer_bytes: int
    cuda_context_bytes: int
    # what widens [envelope_low, envelope_high]: {"name", "bytes", "source"} each (engine/envelope.py)
    envelope_terms: tuple[dict[str, Any], ...] = ()
    nccl_buffers_bytes: int = 0  # NCCL's own device buffers per rank (multi-GPU), outside reserved
    allocator: dict[str, Any] = field(default_factory=dict)  # engine/allocator.py ReplayResult.to_dict()


@dataclass(frozen=True)
class Compute:
    flops_forward: int
    flops_backward_input: int
    flops_backward_weight: int
    flops_recompute: int
    flops_per_step: int
    step_time_s: float | None
    tokens_per_s: float | None
    utilization: float  # model FLOPs / (step time x dense peak): what the roofline step time achieves
    matmul_dtype: str
    time_breakdown: dict[str, float] = field(default_factory=dict)  # seconds per "<phase> <kind>" (roofline)
    time_bound: str = ""  # "gpu", "host launches" or "communication"


@dataclass(frozen=True)
class Estimate:
    model: str
    method: str
    gpu: str
    options: dict[str, Any]
    training: Training
    params: Params
    memory: Memory
    compute: Compute
    gpu_memory_bytes: int
    fits: bool
    headroom_bytes: int
    assumptions: tuple[str, ...] = field(default=())
    parallel: dict[str, Any] = field(default_factory=dict)  # n_gpus, shard, offload, host_bytes, comm
    verdict: str = ""  # fit.py fit_verdict: "fits with 0.4 GiB: tight", "does not fit: ..."

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model, "method": self.method, "gpu": self.gpu, "options": self.options,
            "training": asdict(self.training),
            "params": {**asdict(self.params), "trainable_percent": self.params.trainable_percent},
            "memory": asdict(self.memory), "compute": asdict(self.compute),
            "gpu_memory_bytes": self.gpu_memory_bytes, "fits": self.fits, "headroom_bytes": self.headroom_bytes,
            "assumptions": list(self.assumptions),
            "parallel": self.parallel, "verdict": self.verdict,
            "trainer": _trainer_block(self.training),
        }
        return out

    def to_frame(self):  # type: ignore[no-untyped-def]
        """Components as a pandas DataFrame (pandas imported only here)."""
        import pandas as pd

        rows = [{"component": k, "bytes": v} for k, v in self.memory.components.items()]
        return pd.DataFrame(rows)


def _trainer_block(training: Training) -> dict[str, Any]:
    """`--json`'s trainer: {name, version} (and the library whose version it is)."""
    from .trainers import get_trainer

    spec = get_trainer(training.trainer)
    return {"name": spec.name, "library": spec.library, "version": spec.version,
            "options": list(training.trainer_options)}


def count_params(model: TunedModel) -> Params:
    """Exact parameter counts as peft's `get_nb_trainable_parameters` reports them."""
    arch = model.arch
    total = arch.total_params
    trainable = 0
    if model.embedding_trainable:
        trainable += arch.embedding_numel
    for tb in model.blocks:
        total += sum(t.lora_numel + t.ia3_numel for t in tb.linears) + sum(a.numel for a in tb.adapters)
        total += tb.expert_lora_numel  # LoRA on MoE router / fused experts (methods/moe_lora.py)
        trainable += tb.expert_lora_numel
        for t in tb.linears:
            if t.weight_trainable:
                trainable += t.linear.weight_numel
            if t.bias_trainable and t.linear.bias:
                trainable += t.linear.out_features
            trainable += t.lora_numel + t.ia3_numel
        for n in tb.block.norms:
            if tb.norms_trainable:
                trainable += n.numel
            elif tb.norm_bias_trainable and n.bias:
                trainable += n.dim
        if tb.norms_trainable:
            trainable += sum(n for _, n in tb.block.extra_params)
        trainable += sum(a.numel for a in tb.adapters)
    for n in arch.final_norms:
        if model.final_norms_trainable:
            trainable += n.numel
        elif model.head_bias_trainable and n.bias:
            trainable += n.dim
    for lin in arch.head_linears:
        if model.head_trainable:
            trainable += lin.numel
        elif model.head_bias_trainable and lin.bias:
            trainable += lin.out_features
    if model.head_trainable or model.head_bias_trainable:
        trainable += sum(n for _, n in arch.head_extra)
    if model.head_trainable and not arch.tie_word_embeddings:
        trainable += arch.lm_head_numel
    for e in model.extra_params:
        total += e.numel
        if e.trainable:
            trainable += e.numel
    return Params(total, trainable)


def build_tuned(arch: ModelArch, method: str, options: dict[str, Any] | None, training: Training) -> tuple[TunedModel, Any]:
    """The method's model as the trainer runs it: the trainer's method-option defaults (options the user did not
    set), then the method's build, then the trainer's casts (peftplan/trainers/)."""
    from .trainers import get_trainer

    spec = get_method(method)
    trainer = get_trainer(training.trainer)
    values = trainer.method_options(method, options)
    note = None
    from .methods.moe_lora import peft_drops_default_targets

    if spec.default_targets is not None and values.get("targets") is None \
            and (not spec.default_targets.get(arch.model_type) or peft_drops_default_targets(arch)):
        # peft has no default target modules for this model_type (peft utils/constants.py): a config
        # without target_modules raises there. Rather than refuse, estimate what practice sets (axolotl
        # `lora_target_linear`, Unsloth's default, the QLoRA paper's recommendation) and say so.
        values = {**values, "targets": "all-linear"}
        note = (f"peft has no default {spec.name} target modules for model_type {arch.model_type!r} (a config "
                f"without target_modules raises there): estimated with --targets all-linear; pass --targets to choose")
    opts = spec.make_options(values)
    model = spec.build(arch, opts, training)
    if trainer.adapt is not None:
        model = trainer.adapt(model, training)
    if note is not None:
        from dataclasses import replace as _replace

        model = _replace(model, notes=(note, *model.notes))
    return model, opts


def estimate(arch: ModelArch, method: str, training: Training, gpu: GPU,
             options: dict[str, Any] | None = None) -> Estimate:
    """Peak memory, FLOPs and time of one optimizer step of `method` on `arch` on `gpu`."""
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
    verdict = fit_verdict(memory.device_total_bytes, capacity, env_high - env_low, mem.events, effective,
                          context + nccl)
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
