"""The estimate's result types (Params, Memory, Compute, Estimate) and what every estimator shares: the
bundled overhead data, exact parameter counts, and the tuned model as the trainer builds it. estimate.py
(the engine's estimate) and generic.py (the trace-derived estimate) both build their Estimate from these."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .arch import ModelArch
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
