"""How the step is run: batch, sequence, precision, optimizer, attention kernel, checkpointing.

Defaults are what a user of HF transformers 5.23 + peft 0.21 gets without setting anything, except
where HF has no default (sequence length) or where the default depends on the GPU (bf16 vs fp16):
- micro-batch 8: `TrainingArguments.per_device_train_batch_size` default (training_args.py).
- optimizer AdamW, fused: `TrainingArguments.optim` defaults to "adamw_torch_fused" on torch >= 2.8.
- attention "sdpa": transformers picks SDPA when torch provides it (`_check_and_adjust_attn_implementation`).
- gradient checkpointing off: `TrainingArguments.gradient_checkpointing` default False; QLoRA's
  `prepare_model_for_kbit_training` turns it on (peft utils/other.py, use_gradient_checkpointing=True).
- precision "bf16-mixed" (fp16-mixed on GPUs without bf16, e.g. T4/V100): the Trainer's `bf16=True`/`fp16=True`
  autocast with trainable weights in fp32, which is what peft's examples and the QLoRA recipe run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from .dtypes import BF16, FP16, FP32, DType

Precision = Literal["fp32", "fp16-mixed", "bf16-mixed", "fp16", "bf16"]
OptimizerName = Literal[
    "adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit", "sgd", "sgd-momentum", "adafactor", "lion"
]
OptimizerImpl = Literal["fused", "foreach", "for-loop"]
Attention = Literal["eager", "sdpa", "flash"]
# How the step is spread over `n_gpus` data-parallel ranks. "none": one GPU (or plain replicas).
# ddp: torch DistributedDataParallel; zero1/2/3: DeepSpeed ZeRO stages; fsdp-*: PyTorch FSDP
# sharding strategies (FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD).
Shard = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp-full", "fsdp-grad-op", "fsdp-hybrid"]
# What lives in host memory instead of the GPU (DeepSpeed offload_optimizer / offload_param,
# FSDP CPUOffload(offload_params=True) which offloads both).
Offload = Literal["none", "optimizer", "optimizer+params"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
OPTIMIZER_IMPLS: tuple[str, ...] = get_args(OptimizerImpl)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
SHARDS: tuple[str, ...] = get_args(Shard)
OFFLOADS: tuple[str, ...] = get_args(Offload)

DEFAULT_MICRO_BATCH = 8  # TrainingArguments.per_device_train_batch_size
DEFAULT_SEQ_LEN = 1024  # TRL SFTConfig.max_length default; HF itself has none


class TrainingError(ValueError):
    """An impossible training setup (one line, for the user)."""


@dataclass(frozen=True)
class Training:
    """One optimizer step's setup. Sizes are tokens; `micro_batch` sequences of `seq_len` tokens."""

    micro_batch: int = DEFAULT_MICRO_BATCH
    seq_len: int = DEFAULT_SEQ_LEN
    grad_accum: int = 1
    grad_ckpt: bool = False
    attention: Attention = "sdpa"
    precision: Precision = "bf16-mixed"
    optimizer: OptimizerName = "adamw"
    optimizer_impl: OptimizerImpl = "fused"
    # The first optimizer step creates the states lazily; steady state (step >= 2) starts with
    # them allocated and with last step's gradients freed (Trainer zero_grad(set_to_none=True)).
    steady_state: bool = True
    n_gpus: int = 1
    shard: Shard = "none"
    offload: Offload = "none"
    gpus_per_node: int = 8  # HYBRID_SHARD shards within a node and replicates across nodes
    # Who runs the step (peftplan/trainers/): "hf" is the bare transformers Trainer + peft step that every
    # committed record was made with (a record without this field is that step); the CLI defaults to "trl".
    trainer: str = "hf"
    trainer_options: tuple[str, ...] = ()  # the trainer's switches that are on (e.g. "packing" for trl)
    # PYTORCH_CUDA_ALLOC_CONF of the run ("" = torch's defaults): the caching allocator's settings,
    # replayed for the reserved peak (engine/alloc_conf.py, engine/allocator.py)
    alloc_conf: str = ""

    def __post_init__(self) -> None:
        for name in ("micro_batch", "seq_len", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainingError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise TrainingError(f"unknown optimizer implementation {self.optimizer_impl!r}")
        if isinstance(self.n_gpus, bool) or not isinstance(self.n_gpus, int) or self.n_gpus <= 0:
            raise TrainingError(f"gpus must be a positive integer, got {self.n_gpus!r}")
        if self.shard not in SHARDS:
            raise TrainingError(f"unknown sharding {self.shard!r} (choose from {', '.join(SHARDS)})")
        if self.offload not in OFFLOADS:
            raise TrainingError(f"unknown offload {self.offload!r} (choose from {', '.join(OFFLOADS)})")
        if self.offload != "none" and self.shard in ("none", "ddp"):
            raise TrainingError("offload needs a sharded setup (--shard zero1/zero2/zero3 or fsdp-*)")
        if self.attention not in ATTENTIONS:
            raise TrainingError(f"unknown attention {self.attention!r} (choose from {', '.join(ATTENTIONS)})")
        from .trainers import get_trainer

        if isinstance(self.trainer_options, list):  # a record's JSON list
            object.__setattr__(self, "trainer_options", tuple(self.trainer_options))
        get_trainer(self.trainer).check_options(self.trainer_options)
        if self.alloc_conf:
            from .engine.alloc_conf import AllocConfError, parse_alloc_conf

            try:
                parse_alloc_conf(self.alloc_conf)
            except AllocConfError as exc:
                raise TrainingError(str(exc)) from None

    def with_(self, **changes: object) -> "Training":
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch (B*T)."""
        return self.micro_batch * self.seq_len

    @property
    def mixed(self) -> bool:
        """Autocast on: trainable weights stay fp32, matmuls run in half precision."""
        return self.precision.endswith("-mixed")

    @property
    def compute_dtype(self) -> DType:
        """Dtype of matmul outputs and activations."""
        if self.precision == "fp32":
            return FP32
        return BF16 if self.precision.startswith("bf16") else FP16

    @property
    def half_dtype(self) -> DType:
        """The 16-bit type of this setup (what a frozen base is loaded in)."""
        return FP16 if self.precision.startswith("fp16") else BF16

    @property
    def trainable_dtype(self) -> DType:
        """Storage dtype of trainable base weights: fp32 master weights unless pure half precision."""
        return self.compute_dtype if self.precision in ("fp16", "bf16") else FP32
