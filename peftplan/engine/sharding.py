"""Data parallelism on N GPUs: what one rank (rank 0) holds, on the step's timeline.

`plan_for(model, training)` returns None for one GPU (the single-GPU timeline runs unchanged) or a
`ShardPlan`, whose `ShardedAllocator` stands in for the Allocator of engine/step.py:
- parameters (load phase) are allocated at their per-rank size: for fsdp-*, FSDP2's dim-0 shard
  (torch 2.13 _fsdp_param.py `_init_sharded_param`: `torch.chunk(param, N, dim=0)`, every rank's
  storage padded to chunk 0's size, ceil(rows/N) rows x the other dims; rank 0's chunk is always the
  full one); for zero3, DeepSpeed's flat partition of ceil(numel/N) elements; whole for ddp / zero1 /
  zero2; 0 on the GPU when offloaded (host bytes instead);
- FSDP2 (torch.distributed.fsdp.fully_shard per decoder layer + root, as accelerate wraps a model;
  checked against the FSDP2 trace in harness/fsdp_trace.py): a layer's parameters are all-gathered
  into a flat buffer in the compute dtype (MixedPrecisionPolicy param_dtype), copied out into
  per-parameter unsharded tensors, freed after the layer's forward (reshard_after_forward) and
  gathered again in backward; forward keeps the previous layer's flat buffer until the next copy-out
  (implicit prefetch), backward prefetches the next layer's flat buffer; gradients are produced
  unsharded in the compute dtype, copied into a flat reduce-scatter buffer (kept until the next
  reduce-scatter) and land sharded in the parameter's dtype;
- DDP (torch DistributedDataParallel, gradient_as_bucket_view=False, the HF Trainer default):
  gradient buckets hold a second copy of every trainable gradient, allocated at construction
  (bucket_cap_mb=25, torch/nn/parallel/distributed.py);
- DeepSpeed ZeRO-1/2/3: engine/deepspeed.py (pure half-precision module, fp32 master partitions, reduce
  buckets, stage 3 gathers), checked against the real DeepSpeed engine (harness/deepspeed_trace.py);
  data/interconnect.json holds the bucket defaults with their source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..dtypes import FP32, DType
from ..training import Training, TrainingError
from .autograd import Param, Tape
from .sim import Allocator, Tensor, rounded
from .shard_common import _block_params, interconnect, marker  # noqa: F401  (re-exported)


class _DeepSpeed:
    """engine/deepspeed.py, imported on first use: a one-GPU estimate (the CLI's common case) never needs it."""

    def __getattr__(self, name: str) -> Any:
        from . import deepspeed

        return getattr(deepspeed, name)


zero = _DeepSpeed()


def zero_view(model: Any, training: Training) -> tuple[Any, Training]:
    """engine/deepspeed.py zero_view (the step DeepSpeed runs); any other setup is its own step."""
    if not training.shard.startswith("zero"):  # deepspeed.ZERO's stages: zero1, zero2, zero3
        return model, training
    return zero.zero_view(model, training)

FSDP = ("fsdp-full", "fsdp-grad-op", "fsdp-hybrid")
EXTRA_CATEGORIES = ("unsharded_params", "comm_buffers")


def check(training: Training) -> None:
    """One-line errors for combinations no framework runs."""
    n, s, o = training.n_gpus, training.shard, training.offload
    if n > 1 and s == "none":
        raise TrainingError(f"{n} GPUs need a parallel setup: --shard ddp, zero1/2/3 or fsdp-full/grad-op/hybrid")
    if n == 1 and s != "none":
        raise TrainingError(f"--shard {s} needs --gpus > 1")
    if o == "optimizer+params" and s in ("zero1", "zero2"):
        raise TrainingError("parameter offload needs sharded parameters (--shard zero3 or fsdp-*)")
    if s == "fsdp-grad-op" and o == "optimizer+params":
        raise TrainingError("FSDP CPU offload with shard-grad-op keeps unsharded parameters on the GPU; use fsdp-full")
    if o == "optimizer" and s in FSDP:
        raise TrainingError("FSDP offloads optimizer state only together with parameters (--offload optimizer+params)")
    if training.optimizer.startswith("paged") and s != "none":
        raise TrainingError("paged optimizers are single-process bitsandbytes features; not with --shard")


@dataclass
class ShardPlan:
    training: Training
    n: int  # ranks that shard (hybrid: GPUs per node)
    params_sharded: bool
    grads_sharded: bool
    states_sharded: bool
    fsdp: bool
    reshard: bool
    compute: DType
    stage: int = 0  # DeepSpeed ZeRO stage (0: not DeepSpeed)
    host_bytes: int = 0
    sharded_grads: dict[int, Tensor] = field(default_factory=dict)
    flat_state: Tensor | None = None  # forward: last group's all-gather buffer (implicit prefetch)
    prefetched: dict[int, Tensor] = field(default_factory=dict)
    rs_state: Tensor | None = None  # last reduce-scatter input, kept until the next one
    unsharded: dict[int, list[Tensor]] = field(default_factory=dict)
    orig_dtype: dict[int, DType] = field(default_factory=dict)  # FSDP mixed: parameters seen as compute dtype
    rows: dict[int, int] = field(default_factory=dict)  # id(Param) -> dim 0 (absent: one-dimensional)
    zero_gathered: dict[int, Any] = field(default_factory=dict)  # ZeRO-3: {0: deepspeed.GatherState}
    zero_bucket: Tensor | None = None  # ZeRO-1/2: the reduce bucket of the running backward
    zero_micro_batches: int = 0  # ZeRO-3: micro-batches run (DeepSpeed's module trace completes after the first)

    # ---- sizes ------------------------------------------------------------------------------------
    def local_numel(self, numel: int) -> int:
        """A flat partition (DeepSpeed ZeRO): ceil(numel / N) elements."""
        return -(-numel // self.n)

    def local(self, p: Param) -> int:
        """Elements of rank 0's padded shard of `p`: FSDP2 chunks dim 0 (ceil(rows/N) rows, padded, x the
        other dims; torch 2.13 _fsdp_param.py `_init_sharded_param`), ZeRO flat partitions."""
        if not self.fsdp:
            return self.local_numel(p.numel)
        rows = self.rows.get(id(p), p.numel) or p.numel
        return -(-rows // self.n) * (p.numel // rows)

    def padded(self, p: Param) -> int:
        """Elements of `p`'s all-gather output / reduce-scatter input: N padded shards."""
        return self.local(p) * self.n

    def param_bytes(self, numel: int, dtype: DType) -> int:
        if not self.params_sharded:
            return rounded(dtype.bytes_for(numel))
        return rounded(dtype.bytes_for(self.local_numel(numel)))

    def ag_dtype(self, p: Param) -> DType:
        """MixedPrecisionPolicy(param_dtype=compute) casts floating parameters; 4-bit weights (stored in
        the compute dtype, bnb_4bit_quant_storage) are gathered as they are."""
        return self.compute if self.training.mixed and p.dtype.name in ("fp32", "bf16", "fp16") else p.dtype

    # ---- FSDP2 timeline events (all on the ShardedAllocator) ----------------------------------------
    def _unshard(self, alloc: Allocator, group: list[Param]) -> Tensor:
        """foreach_all_gather: cast copy-in (params not already in the compute dtype) + the flat buffer."""
        cast = sum(self.ag_dtype(p).bytes_for(self.local(p)) for p in group
                   if self.ag_dtype(p) != self.orig_dtype.get(id(p), p.dtype))
        flat = sum(self.ag_dtype(p).bytes_for(self.padded(p)) for p in group)
        tmp = alloc.new_bytes(rounded(cast), "temporaries")
        buf = alloc.new_bytes(rounded(flat), "comm_buffers")
        alloc.free(tmp)
        return buf

    def _copy_out(self, alloc: Allocator, key: int, group: list[Param]) -> None:
        self.unsharded[key] = [alloc.new_bytes(rounded(self.ag_dtype(p).bytes_for(self.padded(p))), "unsharded_params")
                               for p in group]

    def _reshard(self, alloc: Allocator, key: int) -> None:
        for t in self.unsharded.pop(key, []):
            alloc.free(t)

    def pre_forward(self, alloc: Allocator, key: int, group: list[Param]) -> None:
        if not group:
            return
        if key in self.unsharded:  # not resharded after forward (shard-grad-op) / root kept
            return
        buf = self._unshard(alloc, group)
        # FSDPParamGroup.wait_for_unshard (torch 2.13 _fsdp_param_group.py): `if prev_all_gather_state :=
        # self.comm_ctx.all_gather_state: ...; self.comm_ctx.all_gather_state = None` drops the attribute
        # before the copy-out, but the walrus local still references the previous group's flat buffer
        # until the method returns, i.e. after this group's copy-out: both flat buffers and this
        # group's unsharded parameters are alive together (the forward peak under FSDP2).
        self._copy_out(alloc, key, group)
        if self.flat_state is not None:
            alloc.free(self.flat_state)
        self.flat_state = buf

    def post_forward(self, alloc: Allocator, key: int) -> None:
        if self.reshard:
            self._reshard(alloc, key)

    def end_forward(self, alloc: Allocator, root_key: int) -> None:
        """Root post-forward: the root reshards too (FSDP2 2.13), and drops the held all-gather buffer."""
        self.post_forward(alloc, root_key)
        if self.flat_state is not None:
            alloc.free(self.flat_state)
            self.flat_state = None

    def pre_backward(self, alloc: Allocator, key: int, group: list[Param], next_key: int | None,
                     next_group: list[Param] | None) -> None:
        if group and key not in self.unsharded:
            buf = self.prefetched.pop(key, None) or self._unshard(alloc, group)
            self._copy_out(alloc, key, group)
            alloc.free(buf)
        if next_key is not None and next_group and next_key not in self.unsharded and self.reshard:
            self.prefetched[next_key] = self._unshard(alloc, next_group)

    def post_backward(self, alloc: Allocator, key: int, group: list[Param]) -> None:
        self._reshard(alloc, key) if self.reshard else None
        trainable = [p for p in group if p.trainable and p.grad is not None and p.grad.alive]
        if not trainable:
            return
        if self.rs_state is not None:
            alloc.free(self.rs_state)
        rs = sum(self.ag_dtype(p).bytes_for(self.padded(p)) for p in trainable)
        self.rs_state = alloc.new_bytes(rounded(rs), "comm_buffers")
        for p in trainable:
            alloc.free(p.grad)
            p.grad = None
        out = alloc.new_bytes(rounded(sum(self.ag_dtype(p).bytes_for(self.local(p)) for p in trainable)),
                              "temporaries")
        for p in trainable:
            if id(p) not in self.sharded_grads:
                dt = self.orig_dtype.get(id(p), p.dtype)
                self.sharded_grads[id(p)] = alloc.new_bytes(rounded(dt.bytes_for(self.local(p))), "grads")
        alloc.free(out)

    def finalize_backward(self, alloc: Allocator) -> None:
        if self.rs_state is not None:
            alloc.free(self.rs_state)
            self.rs_state = None

    def zero_grad(self, alloc: Allocator) -> None:
        for t in self.sharded_grads.values():
            alloc.free(t)
        self.sharded_grads.clear()


class ShardedAllocator(Allocator):
    """The step's Allocator with per-rank sizes for parameters and gradients (see the module docstring)."""

    def __init__(self, plan: ShardPlan) -> None:
        super().__init__()
        self.plan = plan
        for c in EXTRA_CATEGORIES:
            self.by_category[c] = 0

    def new_bytes(self, nbytes: int, category: str) -> Tensor:
        t = Tensor(0, self.plan.compute, category, False, nbytes, 1, True)  # type: ignore[arg-type]
        self.add_bytes(nbytes, category)  # type: ignore[arg-type]
        t.event = self.last_event  # its free goes on the timeline (engine/allocator.py)
        return t

    def free(self, t: Tensor | None) -> None:
        self.release(t)

    def new(self, numel, dtype, category, requires_grad=False, label="", count=1):  # type: ignore[override]
        plan = self.plan
        if self.phase == "load" and category in ("frozen_params", "trainable_params"):
            nbytes = plan.param_bytes(numel, dtype) * count
            if plan.training.offload == "optimizer+params":
                plan.host_bytes += nbytes
                nbytes = 0
            t = Tensor(numel, dtype, category, requires_grad, nbytes, 1, True, label)
            self.add_bytes(nbytes, category)
            t.event = self.last_event
            return t
        if category == "grads" and (plan.fsdp or plan.stage):
            # unsharded gradient (the unpadded parameter's shape) in the reduce dtype until the group's
            # reduce-scatter (FSDP) / the reduce bucket copy (ZeRO, engine/deepspeed.py) takes it
            nbytes = rounded(plan.compute.bytes_for(numel)) * count
            t = Tensor(numel, dtype, "temporaries", requires_grad, nbytes, 1, True, label)
            self.add_bytes(nbytes, "temporaries")
            t.event = self.last_event
            if plan.stage:
                zero.on_gradient(self, plan)  # may allocate the reduce bucket: after this tensor's event
            return t
        if category == "grads" and plan.grads_sharded:
            nbytes = rounded(dtype.bytes_for(plan.local_numel(numel))) * count
            t = Tensor(numel, dtype, category, requires_grad, nbytes, 1, True, label)
            self.add_bytes(nbytes, category)
            t.event = self.last_event
            return t
        return super().new(numel, dtype, category, requires_grad, label, count)


def load_param(alloc: Allocator, p: Param, rows: int = 0) -> Tensor:
    """Allocate parameter `p` in the load phase; `rows` is its dim 0 (0: one-dimensional)."""
    category = "trainable_params" if p.trainable else "frozen_params"
    if not isinstance(alloc, ShardedAllocator):
        return alloc.new(p.numel, p.dtype, category, p.trainable)  # type: ignore[arg-type]
    plan = alloc.plan
    if rows and rows != p.numel:
        plan.rows[id(p)] = rows
    nbytes = rounded(p.dtype.bytes_for(plan.local(p))) if plan.params_sharded else rounded(p.dtype.bytes_for(p.numel))
    if zero.persistent(plan, p.numel):  # ZeRO-3 keeps small parameters gathered next to their partition
        nbytes += rounded(p.dtype.bytes_for(p.numel))
    if plan.training.offload == "optimizer+params":
        plan.host_bytes += nbytes
        nbytes = 0
    t = Tensor(p.numel, p.dtype, category, p.trainable, nbytes, 1, True)  # type: ignore[arg-type]
    alloc.add_bytes(nbytes, category)  # type: ignore[arg-type]
    t.event = alloc.last_event
    return t


def plan_for(training: Training) -> ShardPlan | None:
    check(training)
    if training.n_gpus == 1:
        return None
    s = training.shard
    n = training.n_gpus
    ds = interconnect()["deepspeed_defaults"]
    if s == "fsdp-hybrid":
        n = min(n, training.gpus_per_node)
    plan = ShardPlan(
        training=training, n=n,
        params_sharded=s in ("zero3",) + FSDP,
        grads_sharded=s in ("zero2", "zero3") + FSDP,
        states_sharded=s != "ddp",
        fsdp=s in FSDP, reshard=s in ("fsdp-full", "fsdp-hybrid"),
        compute=training.compute_dtype, stage=zero.stage(training),
    )
    _ = ds
    return plan


def persistent_buffers(alloc: ShardedAllocator, trainables: list[Param]) -> None:
    """Buffers a framework allocates at setup and keeps (after the parameters are loaded)."""
    plan = alloc.plan
    if plan.training.shard == "ddp":
        alloc.add_bytes(rounded(sum(rounded(p.dtype.bytes_for(p.numel)) for p in trainables)), "comm_buffers")  # type: ignore[arg-type]
    elif plan.stage:
        zero.setup_buffers(alloc, plan, trainables)


def step_scratch(alloc: Allocator, trainables: list[Param]) -> int:
    """Transient bytes of the sharded optimizer step beyond the optimizer's own (ZeRO: engine/deepspeed.py)."""
    plan = getattr(alloc, "plan", None)
    return zero.step_scratch(plan, trainables) if plan is not None and plan.stage else 0


class FSDPHooks:
    """The FSDP2 events of one micro-batch, called from engine/step.py's forward/backward."""

    def __init__(self, plan: ShardPlan, params) -> None:  # type: ignore[no-untyped-def]
        self.plan = plan
        self.root = [params.embedding, *params.other_embeddings, *params.final_norms, *params.head_linears,
                     *params.extra] + ([params.head] if params.head is not None else [])
        self.blocks = [_block_params(bp) for bp in params.blocks]
        self.ROOT = -1
        if plan.training.mixed:
            # MixedPrecisionPolicy(param_dtype=compute): forward and backward see the unsharded parameters
            # in the compute dtype, so autocast / peft's adapter-input casts have nothing to cast
            for p in self.root + [q for b in self.blocks for q in b]:
                if p.tensor is not None and p.dtype.name in ("fp32", "bf16", "fp16"):
                    plan.orig_dtype.setdefault(id(p), p.dtype)
                    p.tensor.dtype = plan.compute
                    p.dtype = plan.compute

    def forward_start(self, alloc: Allocator) -> None:
        self.plan.pre_forward(alloc, self.ROOT, self.root)

    def block_start(self, alloc: Allocator, tape: Tape, i: int) -> None:
        plan = self.plan
        plan.pre_forward(alloc, i, self.blocks[i])
        marker(tape, lambda: plan.post_backward(alloc, i, self.blocks[i]))

    def block_end(self, alloc: Allocator, tape: Tape, i: int) -> None:
        plan = self.plan
        plan.post_forward(alloc, i)
        prev = i - 1 if i > 0 else None
        marker(tape, lambda: plan.pre_backward(alloc, i, self.blocks[i], prev,
                                               self.blocks[prev] if prev is not None else None))

    def forward_end(self, alloc: Allocator) -> None:
        self.plan.end_forward(alloc, self.ROOT)

    def backward_start(self, alloc: Allocator) -> None:
        last = len(self.blocks) - 1 if self.blocks else None
        self.plan.pre_backward(alloc, self.ROOT, self.root, last, self.blocks[last] if last is not None else None)

    def backward_end(self, alloc: Allocator) -> None:
        self.plan.post_backward(alloc, self.ROOT, self.root)
        self.plan.finalize_backward(alloc)


def hooks_for(alloc: Allocator, params) -> FSDPHooks | zero.ZeroHooks | None:  # type: ignore[no-untyped-def]
    plan = getattr(alloc, "plan", None)
    if plan is not None and plan.stage:
        return zero.ZeroHooks(plan, params)
    if plan is None or not plan.fsdp:
        return None
    return FSDPHooks(plan, params)


def optimizer_costs(plan: ShardPlan, trainables: list[Param], shapes: dict[int, tuple[int, int]]) -> list:  # type: ignore[type-arg]
    """Per-rank optimizer cost of each trainable tensor: states of the rank's 1/N shard (ZeRO >= 1, FSDP),
    none on the GPU when offloaded (DeepSpeed's CPU Adam / FSDP CPUOffload step on the host). ZeRO's
    optimizer steps the fp32 master partition: its states are fp32 whatever the module's dtype."""
    from dataclasses import replace

    from .optimizers import tensor_cost

    t = plan.training
    out = []
    for p in trainables:
        numel, shape = p.numel, shapes.get(id(p))
        if plan.states_sharded:
            numel = plan.local(p) if plan.params_sharded else plan.local_numel(p.numel)
            shape = (-(-shape[0] // plan.n), shape[1]) if shape is not None else None
        c = tensor_cost(t.optimizer, t.optimizer_impl, numel, FP32 if plan.stage else p.dtype, shape)
        if t.offload != "none":
            plan.host_bytes += c.state_bytes
            c = replace(c, state_bytes=0, scratch_bytes=0, parts=(), loop_parts=(), leftover_bytes=0)
        out.append(c)
    return out


def quantized_weights(model) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(elements, bytes) of the bitsandbytes-quantized base weights of a TunedModel: what FSDP / ZeRO-3
    all-gather for them is the packed storage (4-bit: 0.5 B/param, int8: 1 B/param, flat-sharded as
    bnb_4bit_quant_storage elements), not the compute dtype. Their QuantState (absmax, code tables) is
    module metadata that every rank holds whole (engine/step.py counts it unsharded): not gathered."""
    numel = nbytes = 0
    for tb in model.blocks:
        for t in tb.linears:
            if t.quant is not None:
                numel += t.linear.weight_numel
                nbytes += t.weight_dtype.bytes_for(t.linear.weight_numel)
    return numel, nbytes


def communication(training: Training, gpu_name: str, param_numel: int, trainable_numel: int,
                  quantized: tuple[int, int] = (0, 0)) -> tuple[int, float | None, str]:
    """(bytes each rank sends per optimizer step, seconds at the interconnect's bandwidth, note).

    `quantized`: (elements, bytes) of quantized frozen weights among `param_numel` (quantized_weights):
    gathered at their packed size; every other parameter at the compute dtype (MixedPrecisionPolicy).

    Ring collectives: all-reduce 2(N-1)/N x buffer, all-gather / reduce-scatter (N-1)/N x buffer.
    DDP / ZeRO-1/2: one gradient all-reduce (or reduce-scatter + all-gather) per optimizer step
    (gradient accumulation syncs on the last micro-batch only). FSDP full / ZeRO-3: per micro-batch an
    all-gather of all parameters in forward and again in backward, a reduce-scatter of trainable
    gradients; shard-grad-op skips the backward all-gather. Hybrid adds a cross-node all-reduce."""
    n = training.n_gpus
    if n == 1:
        return 0, 0.0, ""
    s = training.shard
    cb = training.compute_dtype.bytes_for(1)
    mbs = training.grad_accum
    shard_n = min(n, training.gpus_per_node) if s == "fsdp-hybrid" else n
    f = (shard_n - 1) / shard_n
    if s in ("ddp", "zero1", "zero2"):
        volume = 2 * (n - 1) / n * trainable_numel * cb
    else:
        gathers = 1 if s == "fsdp-grad-op" else 2
        q_numel, q_bytes = quantized
        gathered = (param_numel - q_numel) * cb + q_bytes
        volume = mbs * (gathers * f * gathered + f * trainable_numel * cb)
    data = interconnect()
    link = data["intra_node"].get(gpu_name.split("@")[0])
    secs = None
    note = ""
    if link is not None:
        bw = link["bytes_per_s"]
        if n > training.gpus_per_node:
            bw = min(bw, data["inter_node"]["bytes_per_s"])
            note = f"{data['inter_node']['link']} across nodes"
        else:
            note = link["link"]
        secs = volume / bw
        if s == "fsdp-hybrid" and n > shard_n:
            secs += 2 * (n // shard_n - 1) / (n // shard_n) * trainable_numel * cb / shard_n / data["inter_node"]["bytes_per_s"]
    return int(volume), secs, note
