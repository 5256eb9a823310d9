"""DeepSpeed ZeRO-1/2/3 (deepspeed 0.19) on rank 0, on the step's timeline (used by engine/sharding.py).

Checked against the real DeepSpeed engine on 2 CPU ranks (harness/deepspeed_trace.py, tests/test_deepspeed.py).
What the HF Trainer + DeepSpeed step holds, with its source:

- Precision: with `bf16`/`fp16` enabled, DeepSpeed casts the module's parameters to that dtype
  (runtime/engine.py `_configure_distributed_model` -> `_cast_module_mixed_precision`) and accelerate runs no
  autocast under DeepSpeed: forward and backward are pure half precision (`zero_view`). The fp32 copy is the
  ZeRO optimizer's master partition: stage_1_and_2.py `single_partition_of_fp32_groups` (a clone of the
  rank's partition, `.to(master_weights_and_grads_dtype)`), stage3.py `fp32_partitioned_groups_flat`;
  counted with the optimizer state (as DeepSpeed's own estimators and the ZeRO paper's K=12 do).
  Optimizer states are on the fp32 partition: ceil(numel / N) elements, fp32.
- Stage 1/2 (stage_1_and_2.py): every rank keeps the whole bit16 module (`bit16_groups_flat`). In backward,
  each parameter's gradient (full, compute dtype) is copied into a contiguous reduce bucket of
  `reduce_bucket_size` elements (allocated by the first gradient hook of a backward, `setup_buckets`,
  released in the epilogue `_release_ipg_buffers`) and dropped; when the bucket fills, and at the end of
  backward, it is reduced into `grads_in_partition` (compute dtype, ceil(numel/N)), alive until the step ends. The step flattens a group's gradient partition
  and converts it to fp32 (`step`: `self.flatten(self.averaged_gradients[i]).to(fp32)`): a flat copy in the
  compute dtype and an fp32 copy on top of the partition.
- Stage 3 (stage3.py, partition_parameters.py): parameters are flat partitions of ceil(numel / N) elements
  (`lp_param_buffer` / `fp16_partitioned_groups_flat`); parameters of at most
  `stage3_param_persistence_threshold` (1e5) elements stay gathered on every rank as well (`persistent_parameters`).
  At setup the optimizer allocates the reduce bucket (`ipg_buckets[dtype].buffer`, `reduce_bucket_size`
  elements) and the gradient partition buffer (`grad_partitions_flat_buffer`, compute dtype), both kept for
  the run. A module's parameters are all-gathered in the compute dtype before its forward / backward and
  released after (the engine gathers a decoder layer at a time; DeepSpeed fetches module by module and
  prefetches up to `stage3_prefetch_bucket_size` elements ahead, so the engine holds at most one layer's
  worth more). Once the first micro-batch has recorded the module order (partitioned_param_coordinator.py
  `is_complete_trace`), a module's parameters are not released if the same module comes back within
  `stage3_max_reuse_distance` (1e9) parameter elements of the order (`__params_to_release`): on a small
  model everything stays gathered; on llama3-70b (856M elements a layer, 1.05B in lm_head) only lm_head
  between its forward and its backward. The all-gather: one flat buffer per fetch (compute dtype), then a
  torch.cat copy per parameter; prefetched modules (once the order is recorded, up to
  `stage3_prefetch_bucket_size` elements ahead, starting from the top-level module's own, parameterless
  fetch) share one flat buffer that lives until the last of them is fetched. Gradients are produced whole, copied into the bucket, reduce-scattered into the partition
  buffer and dropped. The step prepares each sub-group (`sub_group_size` 1e9 partition elements,
  `_create_fp16_sub_groups`) by `flatten(...).to(fp32)` (`_prepare_fp32_grad_for_sub_group`): compute-dtype
  flat + fp32 copy of the sub-group, released after its update.
Bucket and threshold defaults: data/interconnect.json (runtime/zero/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

from ..dtypes import BF16, FP16, FP32, DType
from ..training import Training
from .autograd import Param, Tape
from .sim import Allocator, Tensor, rounded

if TYPE_CHECKING:  # pragma: no cover
    from ..tuned import TunedModel
    from .sharding import ShardPlan

ZERO = {"zero1": 1, "zero2": 2, "zero3": 3}
_FLOATS = (FP32.name, BF16.name, FP16.name)
_SKIP = ("arch", "block", "linear", "quant")  # architecture / quantization: no parameter dtypes to cast


def stage(training: Training) -> int:
    return ZERO.get(training.shard, 0)


def _defaults() -> dict[str, Any]:
    from .shard_common import interconnect

    return {k: int(v["value"]) for k, v in interconnect()["deepspeed_defaults"].items()}


def _cast(obj: Any, to: DType) -> Any:
    """`obj` (a TunedModel or one of its parts) with every floating parameter dtype replaced by `to`."""
    if isinstance(obj, DType):
        return to if obj.name in _FLOATS else obj
    if isinstance(obj, tuple):
        return tuple(_cast(x, to) for x in obj)
    if not is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes = {}
    for f in fields(obj):
        if f.name in _SKIP:
            continue
        v = getattr(obj, f.name)
        new = _cast(v, to)
        if new is not v and new != v:
            changes[f.name] = new
    return replace(obj, **changes) if changes else obj


def zero_view(model: "TunedModel", training: Training) -> tuple["TunedModel", Training]:
    """The step DeepSpeed runs: with bf16/fp16 on, every floating parameter in the compute dtype and no
    autocast (pure half precision; the fp32 master copy is the optimizer's, see the module docstring)."""
    if not stage(training) or training.precision == "fp32":
        return model, training
    c = training.compute_dtype
    return _cast(model, c), training.with_(precision=c.name)


def persistent(plan: "ShardPlan", numel: int) -> bool:
    """Stage 3 keeps parameters of at most stage3_param_persistence_threshold elements gathered."""
    return plan.stage == 3 and numel <= _defaults()["stage3_param_persistence_threshold"]


def setup_buffers(alloc: Allocator, plan: "ShardPlan", trainables: list[Param]) -> None:
    """What deepspeed.initialize allocates after the parameters: the fp32 master partition (all stages),
    stage 3's gradient partition buffer and reduce bucket."""
    d = _defaults()
    local = sum(plan.local_numel(p.numel) for p in trainables)
    master = rounded(FP32.bytes_for(local))
    if plan.training.offload != "none":
        plan.host_bytes += master
    else:
        alloc.add_bytes(master, "optimizer_state")
    if plan.stage == 3 and trainables:
        grads = rounded(plan.compute.bytes_for(local))
        if plan.training.offload != "none":  # stage3.py: on `self.device`, the CPU when the optimizer is offloaded
            plan.host_bytes += grads
        else:
            alloc.add_bytes(grads, "grads")
        alloc.add_bytes(rounded(plan.compute.bytes_for(d["reduce_bucket_size"])), "comm_buffers")  # type: ignore[arg-type]


def step_scratch(plan: "ShardPlan", trainables: list[Param]) -> int:
    """Transient bytes of the ZeRO step on top of what is alive: a flat compute-dtype copy and an fp32 copy
    of the largest (sub-)group's gradient partition (see the module docstring)."""
    if plan.training.offload != "none" or not trainables:
        return 0
    parts = [plan.local_numel(p.numel) for p in trainables]
    if plan.stage == 3:
        limit, largest, cur = _defaults()["sub_group_size"], 0, 0
        for n in parts:  # _create_fp16_sub_groups: close a sub-group once it reaches sub_group_size
            cur += n
            if cur >= limit:
                largest, cur = max(largest, cur), 0
        largest = max(largest, cur)
    else:
        largest = sum(parts)
    return rounded(plan.compute.bytes_for(largest)) + rounded(FP32.bytes_for(largest))


def on_gradient(alloc: Allocator, plan: "ShardPlan") -> None:
    """A gradient was produced: stage 1/2's first gradient hook of a backward allocates the reduce bucket
    (stage_1_and_2.py `process_gradients` -> `setup_buckets`: `reduce_bucket_size` elements, compute dtype;
    a second one only with overlap_comm, off by default below stage 3)."""
    if plan.stage < 3 and plan.zero_bucket is None:
        size = _defaults()["reduce_bucket_size"]
        plan.zero_bucket = alloc.new_bytes(rounded(plan.compute.bytes_for(size)), "comm_buffers")  # type: ignore[attr-defined]


@dataclass
class GatherState:
    """ZeRO-3 gathered parameters across micro-batches: module key -> the copies; prefetched keys -> their
    coalesced all-gather; group id -> (flat buffer, keys not fetched yet)."""

    available: dict[int, Tensor | None] = field(default_factory=dict)
    inflight: dict[int, int] = field(default_factory=dict)
    groups: dict[int, tuple[Tensor, set[int]]] = field(default_factory=dict)
    next_gid: int = 0


class ZeroHooks:
    """The ZeRO events of one micro-batch, called from engine/step.py's forward/backward (the FSDPHooks
    interface): stage 3 gathers, gradients dropped after reduction, stage 1/2's backward buffers."""

    def __init__(self, plan: "ShardPlan", params) -> None:  # type: ignore[no-untyped-def]
        from .shard_common import _block_params

        self.plan = plan
        head = params.head if params.head is not None else params.embedding
        self.first = [params.embedding, *params.other_embeddings]
        seen = {id(p) for p in self.first}
        self.last = [p for p in [head, *params.final_norms, *params.head_linears, *params.extra] if id(p) not in seen]
        self.blocks = [_block_params(bp) for bp in params.blocks]
        # kept across micro-batches and steps (max_reuse_distance, prefetches in flight)
        self.state: GatherState = plan.zero_gathered.setdefault(0, GatherState())  # type: ignore[assignment]
        self.gathered = self.state.available
        self.in_bucket = 0  # gradient elements copied into the reduce bucket since its last reduction
        # DeepSpeed's module order of one micro-batch, as (key, elements): forward, then backward (with
        # checkpointing each layer is fetched for its recomputation and again for its backward)
        numel = {-3: 0, -1: sum(p.numel for p in self.first), -2: sum(p.numel for p in self.last)}
        numel.update({i: sum(p.numel for p in b) for i, b in enumerate(self.blocks)})
        # -3: the top-level module, fetched first with no parameters of its own (recurse=False): with the
        # order recorded, its fetch already prefetches what follows (`_fetch_sub_module_impl`)
        fwd = [-3, -1, *range(len(self.blocks)), -2]
        twice = 2 if plan.training.grad_ckpt else 1
        bwd = [-2, *(i for i in reversed(range(len(self.blocks))) for _ in range(twice))]
        if any(p.trainable for p in self.first):
            bwd.append(-1)
        self.order = [(k, numel[k]) for k in fwd + bwd]
        self.fwd_pos = {k: n for n, k in enumerate(fwd)}
        self.bwd_pos = {k: len(fwd) + n for n, k in enumerate(bwd)}  # the last occurrence
        self.bwd_first = {k: len(fwd) + n for n, k in reversed(list(enumerate(bwd)))}
        groups = {-3: [], -1: self.first, -2: self.last, **dict(enumerate(self.blocks))}
        self.copies = {k: [rounded(plan.compute.bytes_for(p.numel)) for p in g if not persistent(plan, p.numel)]
                       for k, g in groups.items()}  # torch.cat per parameter: one allocation each
        self.gathered_numel = {k: sum(p.numel for p in g if not persistent(plan, p.numel)) for k, g in groups.items()}

    # -- helpers --
    def _gather(self, alloc: Allocator, key: int, group: list[Param], pos: int) -> None:
        """partitioned_param_coordinator.py `fetch_sub_module` for the module(s) `key` at `pos` of the order:
        all-gather what is neither gathered nor in flight (one flat buffer, then a torch.cat copy per
        parameter, partition_parameters.py `_all_gather_dtype` / `AllGatherCoalescedHandle.wait`), wait for
        what is in flight, then (once the order is recorded) prefetch the next modules up to
        stage3_prefetch_bucket_size elements as one coalesced all-gather, whose flat buffer lives until the
        last of them is fetched (the handle stays in `__inflight_param_registry` for each of its params)."""
        plan, st = self.plan, self.state
        if plan.stage != 3 or key in st.available:
            return
        new = alloc.new_bytes  # type: ignore[attr-defined]
        gid = st.inflight.pop(key, None)
        flat = None if gid is not None else (new(rounded(plan.compute.bytes_for(self.gathered_numel[key])), "comm_buffers")
                                            if self.gathered_numel[key] else None)
        st.available[key] = new(sum(self.copies[key]), "unsharded_params") if self.copies[key] else None
        if flat is not None:
            alloc.release(flat)
        if gid is not None:
            buf, pending = st.groups[gid]
            pending.discard(key)
            if not pending:
                alloc.release(buf)
                del st.groups[gid]
        if plan.zero_micro_batches < 1:
            return  # the first micro-batch records the module order: no prefetch yet
        d = _defaults()
        live = sum(self.gathered_numel[k] for k in list(st.available) + list(st.inflight))
        budget = min(d["stage3_max_live_parameters"] - live, d["stage3_prefetch_bucket_size"])
        chosen: list[int] = []
        numel = 0
        for other, _ in self.order[pos + 1:]:
            if numel >= budget:
                break
            if other in st.available or other in st.inflight or other in chosen or not self.gathered_numel[other]:
                continue
            chosen.append(other)
            numel += self.gathered_numel[other]
        if chosen:
            st.next_gid += 1
            st.groups[st.next_gid] = (new(rounded(plan.compute.bytes_for(numel)), "comm_buffers"), set(chosen))
            for k in chosen:
                st.inflight[k] = st.next_gid

    def _kept(self, key: int, pos: int) -> bool:
        """partitioned_param_coordinator.py `__params_to_release`: walk the module order after `pos`; the
        parameters stay gathered if `key` comes back before stage3_max_reuse_distance elements."""
        if self.plan.stage != 3 or self.plan.zero_micro_batches < 1:
            return False  # the first micro-batch records the order and releases everything
        limit = _defaults()["stage3_max_reuse_distance"]
        traversed = 0
        for other, numel in self.order[pos + 1:]:  # the recorded order of one micro-batch: no wrap-around
            if traversed >= limit:
                return False
            if other == key:
                return True
            traversed += numel
        return False

    def _release(self, alloc: Allocator, key: int, pos: int | None = None) -> None:
        if pos is not None and self._kept(key, pos):
            return
        t = self.gathered.pop(key, None)
        if t is not None:
            alloc.release(t)

    def _drop_grads(self, alloc: Allocator, group: list[Param], epilogue: bool = False) -> None:
        """Gradients copied into the reduce bucket and set to None (stage_1_and_2.py
        `reduce_independent_p_g_buckets_and_remove_grads`, stage3.py `reduce_partition_and_remove_grads`).
        Stage 1 does it in the backward epilogue only (`process_gradients` reduces in the hook only with
        partition_gradients or overlap_comm; `reduce_gradients` then walks every parameter): until then
        every full gradient is alive."""
        plan = self.plan
        if plan.stage == 1 and not epilogue:
            return
        size = _defaults()["reduce_bucket_size"]
        for p in group:
            if p.trainable and p.grad is not None and p.grad.alive:
                if self.in_bucket + p.numel > size and self.in_bucket:  # full: reduce it first
                    self._reduce_bucket(alloc)
                alloc.release(p.grad)
                p.grad = None
                self.in_bucket += p.numel

    def _reduce_bucket(self, alloc: Allocator) -> None:
        """Stage 1/2 `reduce_ipg_grads` -> `allreduce_bucket`: `self.flatten(bucket)` copies the bucket's
        gradients (compute dtype) for the collective, then the rank's share lands in `grads_in_partition`."""
        if self.plan.stage < 3 and self.in_bucket:
            alloc.spike(rounded(self.plan.compute.bytes_for(self.in_bucket)))
            self._grad_partition(alloc)
        self.in_bucket = 0

    def _grad_partition(self, alloc: Allocator) -> None:
        """Stage 1/2 `grads_in_partition` (compute dtype, ceil(numel/N) of every trainable), allocated at the
        first bucket reduction (stage_1_and_2.py `copy_grads_in_partition`) and kept until the step's zero_grad."""
        plan = self.plan
        if plan.stage < 3 and 0 not in plan.sharded_grads:
            local = sum(plan.local_numel(p.numel) for p in self._all_trainable())
            if local:
                plan.sharded_grads[0] = alloc.new_bytes(rounded(plan.compute.bytes_for(local)), "grads")  # type: ignore[attr-defined]

    def _all_trainable(self) -> list[Param]:
        return [p for p in self.first + self.last + [q for b in self.blocks for q in b] if p.trainable]

    # -- the FSDPHooks interface --
    def forward_start(self, alloc: Allocator) -> None:
        self._gather(alloc, -3, [], self.fwd_pos[-3])
        self.state.available.pop(-3, None)
        self._gather(alloc, -1, self.first, self.fwd_pos[-1])

    def block_start(self, alloc: Allocator, tape: Tape, i: int) -> None:
        from .shard_common import marker

        if i == 0:
            self._release(alloc, -1, self.fwd_pos[-1])
        self._gather(alloc, i, self.blocks[i], self.fwd_pos[i])
        marker(tape, lambda: self._post_backward(alloc, i))

    def block_end(self, alloc: Allocator, tape: Tape, i: int) -> None:
        from .shard_common import marker

        self._release(alloc, i, self.fwd_pos[i])
        if i == len(self.blocks) - 1:
            self._gather(alloc, -2, self.last, self.fwd_pos[-2])
        marker(tape, lambda: self._pre_backward(alloc, i))

    def forward_end(self, alloc: Allocator) -> None:
        self._release(alloc, -1, self.fwd_pos[-1])
        self._release(alloc, -2, self.fwd_pos[-2])

    def backward_start(self, alloc: Allocator) -> None:
        self._gather(alloc, -2, self.last, self.bwd_first[-2])

    def _pre_backward(self, alloc: Allocator, i: int) -> None:
        if i == len(self.blocks) - 1:  # the head's backward is done: its gradients are reduced
            self._drop_grads(alloc, self.last)
            self._release(alloc, -2, self.bwd_pos[-2])
        self._gather(alloc, i, self.blocks[i], self.bwd_first[i])

    def _post_backward(self, alloc: Allocator, i: int) -> None:
        self._release(alloc, i, self.bwd_pos[i])
        self._drop_grads(alloc, self.blocks[i])
        if i == 0 and any(p.trainable for p in self.first):
            self._gather(alloc, -1, self.first, self.bwd_first[-1])

    def backward_end(self, alloc: Allocator) -> None:
        if not self.blocks:
            self._drop_grads(alloc, self.last)
            self._release(alloc, -2, self.bwd_pos[-2])
        self._drop_grads(alloc, self.first)
        self._release(alloc, -1, self.bwd_pos.get(-1, self.fwd_pos[-1]))
        self.plan.zero_micro_batches += 1
        if self.plan.stage == 1:
            self._drop_grads(alloc, self._all_trainable(), epilogue=True)
        self._reduce_bucket(alloc)  # the epilogue reduces what is left in the bucket
        if self.plan.zero_bucket is not None:  # _release_ipg_buffers
            alloc.release(self.plan.zero_bucket)
            self.plan.zero_bucket = None
