"""What the planner searches and what it returns: variants, configurations, rows, limits, results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

from ..catalog import GPU
from ..estimate import Estimate
from ..training import Training

DEFAULT_METHODS: tuple[str, ...] = (
    "full", "lora", "qlora", "dora", "lisa", "adapter", "prompt", "prefix", "ptuning", "ia3", "bitfit",
)
RANKS: tuple[int, ...] = (8, 16, 64)
MICRO_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
GRAD_CKPT: tuple[bool, ...] = (False, True)
# eager attention is searched only on request: it never beats SDPA here (more memory: it saves the
# T x S scores; more time: the full square plus memory-bound mask, softmax and casts over the scores)
ATTENTIONS: tuple[str, ...] = ("sdpa",)
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-8bit", "paged-adamw-8bit")
SHARD_SEARCH: tuple[str, ...] = ("ddp", "zero2", "zero3")  # searched with n_gpus > 1 once estimate() shards
SEQ_SWEEP: tuple[int, ...] = tuple(2 ** k for k in range(8, 18))  # 256 .. 131072
MAX_MICRO_BATCH_SEARCH = 4096  # upper end of the exact largest-micro-batch search
LORA_LIKE = ("lora", "qlora", "dora")
# LoRA target sets searched: peft's per-model default (q_proj, v_proj for Llama), every attention
# projection, every linear layer of the blocks (methods/common.py resolve_targets presets)
TARGETS: tuple[str | None, ...] = (None, "attn", "all-linear")
OBJECTIVES: tuple[str, ...] = ("quality", "speed", "cost")
# Among configurations with the same tokens/s, prefer the exact optimizer over quantized states.
_OPTIMIZER_PREFERENCE = {"adamw": 0, "adamw-8bit": 1, "paged-adamw-8bit": 2}


@dataclass(frozen=True)
class Variant:
    """A method with the options the planner sets (rank, double quantization)."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @cached_property
    def rank(self) -> int | None:
        return self.opts().get("rank")

    @property
    def label(self) -> str:
        """"qlora r16 all-linear nf4+dq": the method and its options as labels.py reads them."""
        from ..labels import config_label

        return config_label(self.method, self.opts())

    @property
    def targets(self) -> str:
        """The target set's name for the quality prior: "default" (peft's), "attn" or "all-linear"."""
        return str(self.opts().get("targets") or "default")

    @cached_property
    def base(self) -> "Variant":
        """The variant without its rank (what a recorded structure stands for)."""
        return Variant(self.method, tuple((k, v) for k, v in self.options if k != "rank"))


def variants_for(method: str, ranks: Sequence[int] = RANKS, targets: Sequence[str | None] = (None,)) -> list[Variant]:
    """The searched variants of `method`: LoRA-family ranks x target sets (x double quantization)."""
    def tgt(t: str | None) -> tuple[tuple[str, Any], ...]:
        return (("targets", t),) if t else ()

    if method in ("lora", "dora"):
        return [Variant(method, (("rank", r),) + tgt(t)) for t in targets for r in ranks]
    if method == "qlora":
        return [Variant(method, (("double_quant", dq), ("quant", "nf4"), ("rank", r)) + tgt(t))
                for t in targets for dq in (True, False) for r in ranks]
    return [Variant(method)]


@dataclass(frozen=True)
class PlanConfig:
    variant: Variant
    micro_batch: int
    seq_len: int
    grad_ckpt: bool
    attention: str
    optimizer: str
    precision: str
    n_gpus: int = 1
    shard: str = "none"  # training.SHARDS; "ddp" or a ZeRO/FSDP stage when n_gpus > 1
    grad_accum: int = 1  # micro-batches per optimizer step (--global-batch)

    @property
    def sharded(self) -> bool:
        return self.n_gpus > 1 or self.shard != "none"

    def training(self) -> Training:
        return Training(micro_batch=self.micro_batch, seq_len=self.seq_len, grad_accum=self.grad_accum,
                        grad_ckpt=self.grad_ckpt,
                        attention=self.attention, precision=self.precision,  # type: ignore[arg-type]
                        optimizer=self.optimizer, optimizer_impl="fused",  # type: ignore[arg-type]
                        n_gpus=self.n_gpus, shard=self.shard)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return (f"{self.variant.label} · batch {self.micro_batch}"
                + (f" x{self.grad_accum} accum" if self.grad_accum > 1 else "") + f" · seq {self.seq_len} · "
                f"ckpt {'on' if self.grad_ckpt else 'off'} · {self.attention} · {self.optimizer}"
                + (f" · {self.n_gpus} GPUs {self.shard}" if self.sharded else ""))

    def flags(self) -> str:
        """The `peftplan estimate` flags that reproduce this configuration."""
        o = self.variant.opts()
        out = [f"--method {self.variant.method}"]
        if "rank" in o:
            out.append(f"--rank {o['rank']}")
        if self.variant.method == "qlora":
            out.append(f"--quant {o.get('quant', 'nf4')}")
            out.append("--double-quant" if o.get("double_quant", True) else "--no-double-quant")
        if o.get("targets"):
            out.append(f"--targets {o['targets']}")
        if self.grad_accum > 1:
            out.append(f"--grad-accum {self.grad_accum}")
        out += [f"--batch {self.micro_batch}", f"--seq {self.seq_len}",
                "--grad-ckpt" if self.grad_ckpt else "--no-grad-ckpt", f"--attn {self.attention}",
                f"--precision {self.precision}", f"--optimizer {self.optimizer}"]
        if self.sharded:
            out += [f"--gpus {self.n_gpus}", f"--shard {self.shard}"]
        return " ".join(out)


@dataclass(frozen=True)
class PlanRow:
    config: PlanConfig
    peak_allocated_bytes: int
    device_total_bytes: int
    gpu_memory_bytes: int
    fits: bool
    headroom_bytes: int
    flops_per_step: int
    step_time_s: float | None
    tokens_per_s: float | None
    trainable_params: int
    total_params: int
    train_time_s: float | None = None
    train_cost_usd: float | None = None
    path: str = "fast"  # "fast" (exact polynomial path) or "direct" (estimate() call)
    quality: float | None = None  # the method family's quality prior (data/quality_prior.json), None: unknown
    tie: bool = False  # ties with the row above within the models' error (ranking.py)
    # estimate()'s numbers, on rows it re-estimated (path "direct"); None on the fast path, which does not
    # replay the caching allocator: the reserved peak, and the envelope's spread (what the estimate may miss,
    # fit.py: a run that fits by less is "tight")
    peak_reserved_bytes: int | None = None
    envelope_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": c.variant.method, "variant": c.variant.label, "options": c.variant.opts(),
            "micro_batch": c.micro_batch, "seq_len": c.seq_len, "grad_ckpt": c.grad_ckpt,
            "attention": c.attention, "optimizer": c.optimizer, "precision": c.precision,
            "n_gpus": c.n_gpus, "shard": c.shard,
            "peak_allocated_bytes": self.peak_allocated_bytes, "device_total_bytes": self.device_total_bytes,
            "gpu_memory_bytes": self.gpu_memory_bytes, "fits": self.fits, "headroom_bytes": self.headroom_bytes,
            "flops_per_step": self.flops_per_step, "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s, "trainable_params": self.trainable_params,
            "total_params": self.total_params, "train_time_s": self.train_time_s,
            "train_cost_usd": self.train_cost_usd, "path": self.path, "flags": c.flags(),
            "grad_accum": c.grad_accum, "targets": c.variant.targets, "quality_prior": self.quality,
            "quality_source": _quality_source(c.variant),
            "tie_with_previous": self.tie,
        }


def _quality_source(variant: Variant) -> str:
    from .quality import quality_source_for

    return quality_source_for(variant.method, variant.targets, variant.method in LORA_LIKE)


@dataclass(frozen=True)
class MethodLimit:
    """For one method: the largest sequence length (micro-batch 1) and micro-batch (at the plan's
    sequence length) that fit with any searched setting, and the setting that achieves each."""

    method: str
    max_seq_len: int | None
    max_seq_row: PlanRow | None
    max_micro_batch: int | None
    max_micro_batch_row: PlanRow | None
    micro_batch_searched_to: int
    seq_limited_by_context: bool = False


@dataclass
class PlanStats:
    configs_evaluated: int = 0
    fast: int = 0
    direct: int = 0
    fit_checks: int = 0  # exact fits / does-not-fit verdicts (the searches for the largest seq and batch)
    structures_recorded: int = 0
    structures_loaded: int = 0  # from the disk cache
    seconds: float = 0.0

    @property
    def configs_per_s(self) -> float:
        """Configurations with every number exact (rows) per second of plan()."""
        return self.configs_evaluated / self.seconds if self.seconds > 0 else float("inf")

    @property
    def checks_per_s(self) -> float:
        """Rows and fit verdicts together per second of plan()."""
        return (self.configs_evaluated + self.fit_checks) / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class PlanResult:
    model: str
    gpu: GPU
    n_gpus: int
    seq_len: int
    tokens: int | None
    price_per_hour: float | None
    precision: str
    rows: list[PlanRow]  # fitting configurations, best first
    closest: list[PlanRow]  # configurations that do not fit, smallest device memory first
    limits: list[MethodLimit]
    skipped: list[tuple[str, str]]  # (what, why)
    explanation: str
    notes: list[str]
    suggestion: str | None
    stats: PlanStats
    best_estimate: Estimate | None = None
    objective: str = "quality"
    global_batch: int | None = None
    trainer: str = "hf"  # who runs every configuration's step (peftplan/trainers/)

    @property
    def best(self) -> PlanRow | None:
        return self.rows[0] if self.rows else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "gpu": self.gpu.name, "gpu_memory_bytes": self.gpu.memory_bytes,
            "n_gpus": self.n_gpus, "seq_len": self.seq_len, "tokens": self.tokens,
            "objective": self.objective, "global_batch": self.global_batch, "trainer": self.trainer,
            "price_per_hour": self.price_per_hour, "precision": self.precision,
            "fits": [r.to_dict() for r in self.rows], "closest": [r.to_dict() for r in self.closest[:20]],
            "limits": [{
                "method": lim.method, "max_seq_len": lim.max_seq_len,
                "max_seq_config": lim.max_seq_row.to_dict() if lim.max_seq_row else None,
                "max_micro_batch": lim.max_micro_batch,
                "max_micro_batch_config": lim.max_micro_batch_row.to_dict() if lim.max_micro_batch_row else None,
                "micro_batch_searched_to": lim.micro_batch_searched_to,
                "seq_limited_by_context": lim.seq_limited_by_context,
            } for lim in self.limits],
            "skipped": [{"what": w, "why": y} for w, y in self.skipped],
            "explanation": self.explanation, "notes": self.notes, "suggestion": self.suggestion,
            "stats": dataclasses.asdict(self.stats) | {"configs_per_s": self.stats.configs_per_s,
                                                       "checks_per_s": self.stats.checks_per_s},
        }
