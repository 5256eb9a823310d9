"""Activations saved for backward kept in host memory instead of on the GPU, modelled from the trainers' sources (no
trace checks it: the CPU tracer has no host/device split; estimates say "modelled from source").

Two policies (`POLICIES`), attached to the step's tape (`Tape.offloader`, engine/step.py):

`trl` -- TRL 1.16 `SFTConfig(activation_offloading=True)`: `get_act_offloading_ctx_manager(model)`
  (trl/models/activation_offloading.py) is a `saved_tensors_hooks` around the forward:
  - pack_tensor (200-335): every tensor autograd saves goes to a pinned host copy (`empty_like(pin_memory=True)`,
    `copy_(non_blocking=True)`) unless it is smaller than `min_offload_size` = 1024 bytes (102, 241), a parameter or
    buffer (246), or a storage already offloaded and still stashed (221-224: kept on the GPU); with
    `use_streams=True` (99) the GPU tensor stays referenced in `fwd_stash` until `max_fwd_stash_size` = 5 later
    tensors have been packed (280-290).
  - Under non-reentrant gradient checkpointing (TRL's default), the checkpoint's own hooks replace the saved tensors
    inside each layer (innermost hooks win), so what reaches TRL's hook are the layers' inputs, which
    `torch.utils.checkpoint` saves through `_NoopSaveInputs` outside the layer: they are offloaded.
  - unpack_tensor_with_streams (385-535): a saved tensor comes back (`.to(device, non_blocking=True)`) when its
    node's backward unpacks it, the forward stash is dropped, and the copy is freed once the *next* node's hook runs
    (`prev_node_ids`, 494-502): one node later.
  - The LM head is excluded (690-720: `lm_head` forward hooks); the fused LM head's own saved tensors are modelled on
    the GPU (its custom node, engine/losses.py).
`unsloth` -- Unsloth's `use_gradient_checkpointing="unsloth"` (unsloth_zoo 2026.10.9 gradient_checkpointing.py
  `UnslothCheckpointFunction`, 1337-1720, installed by `patch_unsloth_smart_gradient_checkpointing`, 2069-2088,
  for max_seq_length >= 512, unsloth models/_utils.py 502-515): a reentrant checkpoint whose layer input
  (argument 0, when it requires grad) is copied to a pinned host slot (1506) when larger than MINIMUM_SIZE = 2 MiB
  (1326) and not the last layer after the first pass (1326-1330 LAST_GC_INDEX); backward copies it back into a
  persistent GPU staging buffer (1578-1601) and recomputes the layer from that buffer (`buffer.detach()`, 1656: no
  new tensor). The staging buffer (`GPU_BUFFERS`, resized to the largest input, 1468-1471) lives for the run; a
  second one (`GPU_BUFFERS_B`, double buffering) is allocated from the second pass when more than 512 MiB are free
  (1386-1404; assumed free). Host slots (`CPU_BUFFERS`): 200 pinned buffers of 128 Ki elements at start
  (1296-1298, 64-66), grown to the offloaded size and never shrunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .sim import Allocator, Tensor, rounded

TRL_MIN_OFFLOAD_BYTES = 1024  # activation_offloading.py:128 `min_offload_size: int = 1024`
TRL_FWD_STASH = 5  # activation_offloading.py:129 `max_fwd_stash_size: int = 5`
UNSLOTH_MIN_BYTES = 2 * 1024 * 1024  # gradient_checkpointing.py:1326 `MINIMUM_SIZE = 2 * 1024 * 1024` (strictly larger)
UNSLOTH_INITIAL_GPU_BUFFER = 2 * 256 * 2048  # gradient_checkpointing.py:65, elements of the buffer dtype
UNSLOTH_CPU_BUFFERS = 200  # gradient_checkpointing.py:66 INITIAL_CPU_BUFFER_COUNT
UNSLOTH_CPU_BUFFER = 128 * 1024  # gradient_checkpointing.py:64 INITIAL_CPU_BUFFER_SIZE, elements (bf16: 2 bytes)
POLICIES = ("trl", "unsloth")


@dataclass
class OffloadState:
    """What outlives one forward/backward: host bytes (current, peak), bytes copied each way, Unsloth's buffers."""

    policy: str
    n_layers: int
    host: int = 0
    host_peak: int = 0
    copied: int = 0  # bytes device -> host in the last micro-batch (the same come back)
    passes: int = 0  # forwards started
    staging: list[Tensor] = field(default_factory=list)  # Unsloth's GPU staging buffers (never freed)
    slots: list[int] = field(default_factory=list)  # Unsloth's host slots, bytes each

    def add_host(self, n: int) -> None:
        self.host += n
        self.host_peak = max(self.host_peak, self.host)


class Offloader:
    """One forward/backward's pack / unpack hooks (module docstring)."""

    def __init__(self, alloc: Allocator, state: OffloadState) -> None:
        self.alloc, self.state = alloc, state
        self.originals: dict[int, Tensor] = {}  # id(placeholder) -> the offloaded tensor
        self.stash: deque[Tensor] = deque()  # TRL's fwd_stash: GPU references kept a little longer
        self.lagging: list[Tensor] = []  # TRL: reloads freed when the next node runs
        self.ckpt_index = 0
        self.in_backward = False
        state.passes += 1
        state.copied = 0
        if state.policy == "unsloth":
            state.host = sum(state.slots)  # persistent pinned slots

    # ---- forward ----
    def pack(self, tape: Any, t: Tensor, ckpt_input: bool = False) -> Tensor | None:
        """The tensor as a node (or checkpoint frame) holds it: the tensor itself (kept on the GPU, one more
        reference) or a placeholder standing for its host copy (no device bytes). None: not this policy's business
        (the caller saves as usual)."""
        st = self.state
        if st.policy == "unsloth":
            if not ckpt_input:
                return None
            self.ckpt_index += 1
            last = self.ckpt_index == st.n_layers and st.passes > 1
            if not t.requires_grad or t.nbytes <= UNSLOTH_MIN_BYTES or last:
                return None
            self._unsloth_buffers(t)
            return self._placeholder(t)
        if t.nbytes < TRL_MIN_OFFLOAD_BYTES or id(t) in tape.leaf_params or not t.alive:
            return None
        if any(s is t for s in self.stash):  # storage already offloaded and stashed: kept on the GPU
            return None
        ph = self._placeholder(t)
        self.stash.append(self.alloc.retain(t))
        while len(self.stash) > TRL_FWD_STASH:
            self.alloc.release(self.stash.popleft())
        return ph

    def _placeholder(self, t: Tensor) -> Tensor:
        nbytes = t.numel * t.dtype.bits // 8
        self.state.copied += nbytes
        if self.state.policy == "trl":
            self.state.add_host(nbytes)
        ph = Tensor(t.numel, t.dtype, t.category, t.requires_grad, 0, 0, False, "offloaded " + t.label)
        self.originals[id(ph)] = t
        return ph

    def _unsloth_buffers(self, t: Tensor) -> None:
        st = self.state
        want = 2 if st.passes > 1 else 1  # double buffering from the second pass (module docstring)
        numel = max([t.numel, UNSLOTH_INITIAL_GPU_BUFFER] + [b.numel for b in st.staging])
        for b in list(st.staging):
            if b.numel < numel:  # `GPU_BUFFER.resize_(gpu_numel)`: a new storage, the old one freed
                st.staging.remove(b)
                self.alloc.release(b)
        while len(st.staging) < want:
            st.staging.append(self.alloc.new(numel, t.dtype, "saved_activations", label="unsloth GPU_BUFFER"))
        if not st.slots:
            st.slots = [rounded(UNSLOTH_CPU_BUFFER * 2)] * UNSLOTH_CPU_BUFFERS
        i = self.ckpt_index - 1
        while i >= len(st.slots):
            st.slots.append(0)
        st.slots[i] = max(st.slots[i], t.nbytes)
        st.host = sum(st.slots)
        st.host_peak = max(st.host_peak, st.host)

    # ---- backward ----
    def unpack(self, tensors: list[Tensor]) -> None:
        """Bring back the offloaded tensors of `tensors` (a node's saved list or a checkpoint frame's inputs), in
        place in the list, before the node's backward (or the layer's recompute) runs."""
        if not self.in_backward:
            self.in_backward = True
            while self.stash:  # unpack_tensor_with_streams: the forward stash is dropped
                self.alloc.release(self.stash.popleft())
        for t in self.lagging:
            self.alloc.release(t)
        self.lagging = []
        for i, ph in enumerate(tensors):
            orig = self.originals.pop(id(ph), None) if ph is not None else None
            if orig is None:
                continue
            if orig.alive:
                self.alloc.retain(orig)
            else:
                _revive(self.alloc, orig, zero=self.state.policy == "unsloth")
            if self.state.policy == "trl":
                self.state.host -= orig.numel * orig.dtype.bits // 8
                self.lagging.append(self.alloc.retain(orig))
            tensors[i] = orig


def _revive(alloc: Allocator, t: Tensor, zero: bool = False) -> None:
    """A dead tensor allocated again under the same identity (the host copy brought back); `zero`: it lands in a
    buffer that already exists (Unsloth's staging buffer), no new bytes. Bypasses `Allocator.new` on purpose: a
    checkpoint recompute wraps that method and would take the revived tensor for one of its own."""
    t.alive, t.refs = True, 1
    t.nbytes = 0 if zero else rounded(t.dtype.bytes_for(t.numel))
    t.event = -1
    if t.nbytes:
        t.event = len(alloc.events)
        alloc.events.append(t.nbytes)
    alloc.by_category[t.category] += t.nbytes
    alloc.total += t.nbytes
    alloc._note()


def offloader_for(alloc: Allocator, training: Any, model: Any) -> Offloader | None:
    """The tape's offloader for this step (None when nothing is offloaded); its state lives on the allocator across
    the simulated micro-batches and steps."""
    from ..trainers import get_trainer

    policy = get_trainer(training.trainer).offload_for(training.trainer_options)
    if policy is None or (policy == "unsloth" and (not training.grad_ckpt or training.seq_len < 512)):
        return None  # Unsloth: below max_seq_length 512, standard checkpointing (unsloth models/_utils.py 504)
    state = getattr(alloc, "offload_state", None)
    if state is None:
        state = OffloadState(policy, len(model.blocks))
        alloc.offload_state = state  # type: ignore[attr-defined]
    return Offloader(alloc, state)


def host_and_copied(alloc: Allocator) -> tuple[int, int]:
    """(peak host bytes, bytes copied each way per micro-batch) of the step simulated on `alloc`."""
    state = getattr(alloc, "offload_state", None)
    return (state.host_peak, state.copied) if state is not None else (0, 0)


def assumption(policy: str) -> str:
    if policy == "trl":
        return ("activation_offloading (trl/models/activation_offloading.py) modelled from source, not traced: saved "
                "activations >= 1 KiB (with checkpointing: the layer inputs) go to pinned host memory "
                "(parallel.host_bytes), the last 5 stay on the GPU until later ones are packed, each comes back when "
                "its node's backward runs and is freed one node later; the fused LM head's saved tensors are modelled "
                "on the GPU; the copies are added to the step time over PCIe (no overlap with compute assumed)")
    return ("Unsloth offloaded gradient checkpointing (unsloth_zoo gradient_checkpointing.py UnslothCheckpointFunction) "
            "modelled from source, not traced: every checkpointed layer input > 2 MiB but the last goes to pinned host "
            "memory (parallel.host_bytes, 200 initial slots included), backward reloads it into a persistent GPU "
            "staging buffer (two from the second step: double buffering assumed on); copies added to the step time "
            "over PCIe (no overlap assumed)")
