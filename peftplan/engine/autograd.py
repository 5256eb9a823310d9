"""A symbolic autograd tape over the Allocator: what each op saves, and what backward allocates.

Each op follows the saving rules of its PyTorch derivative (tools/autograd/derivatives.yaml):
`mm(a, b)` saves `a` when `b` requires grad and `b` when `a` requires grad; `mul` likewise;
`add` and views save nothing; `silu`/`gelu` save their input; `log_softmax` saves its output;
casts (`.to(dtype)`) save nothing. A node is recorded only when an output requires grad, exactly
like autograd. Backward walks the nodes in reverse: it allocates the gradients of the node's
inputs, frees the node's saved tensors and the gradient of its outputs. A leaf parameter's
gradient is allocated once (first accumulation) and kept until the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..dtypes import DType
from .recompute import StopRecompute, recompute
from .sim import Allocator, Category, Tensor


@dataclass(eq=False)
class Param:
    """A (group of) leaf parameter(s) of `numel` elements stored as `dtype`."""

    numel: int
    dtype: DType
    trainable: bool
    tensor: Tensor | None = None  # as a Tensor for the tape (already allocated in load)
    grad: Tensor | None = None
    grad_count: int = 1  # how many separate tensors the group stands for (each rounded)
    bias_trainable: bool = False  # a norm weight whose bias is trainable (BitFit): its output needs grad


@dataclass(eq=False)
class Node:
    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    saved: list[Tensor]
    # bytes allocated inside this node's backward and alive while its first input's gradient is written (bnb
    # MatMul4Bit.backward: `grad_A = torch.matmul(grad_output, F.dequantize_4bit(B, ctx.state)...)` holds the
    # dequantized weight with grad_A, bitsandbytes/autograd/_functions.py), then freed
    backward_scratch: int = 0
    on_backward: Callable[[], None] | None = None  # extra work (FSDP hooks)
    group: "CheckpointGroup | None" = None  # the checkpointed layer whose recompute fills `saved`
    custom: "Callable[[Tape, Node], None] | None" = None  # replaces the standard backward (reentrant ckpt)
    block: int | None = None  # the block whose forward recorded it (engine/depth.py segments)


def _nbytes(t: Tensor) -> int:
    from .sim import rounded
    return rounded(t.dtype.bytes_for(t.numel))


# (CloneBackward0 too: derivatives.yaml `clone: self: grad`; peft bnb.py Linear4bit.forward `result.clone()`)
_PASSTHROUGH = frozenset({"add", "add_scalar", "add_mask", "clone"})
# Fused kernels whose backward writes an input's gradient into existing storage (engine/liger.py): into the output's
# gradient (Liger RMSNorm, `in_place=True`), or into the saved input itself (Liger / Unsloth SwiGLU, GeGLU)
_GRAD_INTO_OUTPUT_GRAD = frozenset({"liger_rms_norm"})
_GRAD_INTO_SAVED = frozenset({"liger_glu"})
# Kernels the roofline (engine/roofline.py) costs from their shapes (engine/ops.py log_matmul, program.py
# attention and 4-bit logs), and views that launch no kernel (torch.split / chunk)
_NOT_MEMORY_BOUND = frozenset({"linear", "matmul_4bit", "matmul_qk", "matmul_pv", "sdpa", "split", "chunk"})
from .counter import COUNTER as _COUNTER  # noqa: E402  (the counter engine/ops.py adds to as well)


def _forward_bytes(name: str, inputs: list[Tensor], outputs: list[Tensor]) -> int:
    """Bytes a memory-bound forward kernel reads and writes; an embedding lookup reads only the rows
    it gathers (as many bytes as it writes), not the table."""
    out = sum(t.numel * t.dtype.bits // 8 for t in outputs)
    if name == "embedding":
        return 2 * out
    return out + sum(t.numel * t.dtype.bits // 8 for t in inputs)


def _backward_bytes(node: "Node") -> int:
    """Bytes a memory-bound node's backward moves: its saved tensors and output gradients read, one
    gradient written per input that requires grad; an add hands its gradient through (no kernel)."""
    if node.name in _PASSTHROUGH:
        return 0
    return sum(t.numel * t.dtype.bits // 8 for t in (*node.saved, *node.outputs, *node.inputs))


@dataclass(eq=False)
class CheckpointGroup:
    """One layer under non-reentrant gradient checkpointing (torch/utils/checkpoint.py
    `_checkpoint_without_reentrant_generator`, transformers' default `use_reentrant=False`).

    Its forward records the autograd nodes on the main tape with the saved tensors replaced by
    holders (`_checkpoint_hook.pack_hook`): nothing is kept but the layer's input (the frame's
    args). The first node in backward that unpacks a saved tensor runs `recompute`
    (`_checkpoint_hook.unpack_hook` -> `frame.recompute_fn`), which replays the layer and stops as
    soon as the last saved tensor is packed again (torch 2.13 `early_stop=True`,
    `_recomputation_hook.pack_hook` raises `_StopRecomputationError`): the ops after it (the last
    projection's output, the residual add) are never rerun. Each recomputed tensor is then freed by
    its node's backward, as without checkpointing."""

    replay: Callable[["Tape"], Tensor]  # runs the layer's forward on a tape; returns its output
    saving_nodes: list[Node] = field(default_factory=list)
    keep: list[Tensor] = field(default_factory=list)  # the frame's args, freed with the layer's graph
    done: bool = False
    reentrant: bool = False  # CheckpointFunction: forward under no_grad records no node at all


@dataclass
class Tape:
    alloc: Allocator
    nodes: list[Node] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)  # id(tensor) -> its gradient buffer
    leaf_params: dict[int, Param] = field(default_factory=dict)  # id(tensor) -> param
    _seen: set[int] = field(default_factory=set)  # params whose grad arrived in this backward
    ckpt_group: CheckpointGroup | None = None  # forward of a checkpointed layer: saves become holders
    stop_after: int | None = None  # recompute: stop once this many saving nodes are recorded
    saving_nodes: list[Node] = field(default_factory=list)
    _pending: dict[int, Tensor] = field(default_factory=dict)  # id(param) -> grad waiting in its InputBuffer
    _sums: list[tuple[Param, Tensor]] = field(default_factory=list)  # tied-leaf sums waiting for their node's end
    _uses: dict[int, int] = field(default_factory=dict)  # id(leaf tensor) -> uses not yet back-propagated
    offloader: "object | None" = None  # saved activations kept in host memory (engine/offload.py), or None
    block: int | None = None  # the block being recorded (Node.block)
    marking: bool = False  # the step's main tape on a MarkingAllocator: backward marks block boundaries

    # ---- forward helpers --------------------------------------------------------------
    def new(self, numel: int, dtype: DType, requires_grad: bool, label: str = "",
            category: Category = "temporaries") -> Tensor:
        return self.alloc.new(numel, dtype, category, requires_grad, label)

    def drop(self, *tensors: Tensor | None) -> None:
        """The Python variable goes out of scope."""
        for t in tensors:
            if t is not None and id(t) not in self.leaf_params:
                self.alloc.release(t)

    def save(self, t: Tensor, ckpt_input: bool = False) -> Tensor:
        """A reference for a node's saved list (`ckpt_input`: a checkpointed layer's input); with an offloader, a
        placeholder for the host copy (engine/offload.py)."""
        if self.offloader is not None:
            ph = self.offloader.pack(self, t, ckpt_input)  # type: ignore[attr-defined]
            if ph is not None:
                return ph
        self.alloc.retain(t)
        if t.category == "temporaries":
            self.alloc.recategorize(t, "saved_activations")
        return t

    def keep_input(self, t: Tensor) -> Tensor:
        """A non-reentrant checkpoint frame's reference to its layer input (`_NoopSaveInputs`): offloadable."""
        if self.offloader is not None:
            ph = self.offloader.pack(self, t, True)  # type: ignore[attr-defined]
            if ph is not None:
                return ph
        return self.alloc.retain(t)

    def record(self, name: str, inputs: list[Tensor], outputs: list[Tensor], saved: list[Tensor | None],
               backward_scratch: int = 0) -> None:
        """Record a node when any output requires grad; otherwise saved tensors are not kept."""
        c = _COUNTER[0]
        if c is not None and name not in _NOT_MEMORY_BOUND:
            c.kernels.append(("mem", "forward", _forward_bytes(name, inputs, outputs)))
        if not any(o.requires_grad for o in outputs):
            return
        ins = [i for i in inputs if i.requires_grad]
        if self.ckpt_group is not None and self.ckpt_group.reentrant:
            return  # CheckpointFunction.forward runs the layer under torch.no_grad()
        if self.ckpt_group is not None:
            node = Node(name, ins, outputs, [], backward_scratch, group=self.ckpt_group, block=self.block)
            if any(t is not None for t in saved):
                self.ckpt_group.saving_nodes.append(node)
            self.nodes.append(node)
            return
        kept = [self.save(t) for t in saved if t is not None]
        node = Node(name, ins, outputs, kept, backward_scratch, block=self.block)
        self.nodes.append(node)
        if kept:
            self.saving_nodes.append(node)
            if self.stop_after is not None and len(self.saving_nodes) >= self.stop_after:
                raise StopRecompute

    def param_tensor(self, p: Param) -> Tensor:
        assert p.tensor is not None
        self.leaf_params[id(p.tensor)] = p
        return p.tensor

    # ---- backward -----------------------------------------------------------------------
    def _grad_for(self, t: Tensor, alias: Tensor | None = None, scratch: int = 0) -> None:
        """Produce (or accumulate into) the gradient of `t`; `alias`: the node passes its output's
        gradient through unchanged (the same tensor, no allocation)."""
        param = self.leaf_params.get(id(t))
        if param is not None:
            if not param.trainable:
                return
            if param.grad is not None and param.grad.alive and id(param) not in self._seen:
                self._accumulate(t, param)
                return
            if param.grad is None or not param.grad.alive:
                param.grad = self.alloc.new(param.numel, param.dtype, "grads", count=param.grad_count)
                self._seen.add(id(param))
            elif id(param) in self._seen:
                # A leaf used twice in one backward (tied embedding + lm_head): both gradients meet in the
                # AccumulateGrad node's InputBuffer. torch/csrc/autograd/input_buffer.cpp
                # `can_accumulate_inplace` refuses tensor-subclass-like inputs, so under the tracer's
                # FakeTensors the sum is out of place (old + incoming + sum alive at once); on plain
                # CUDA tensors it would add in place (one param-sized tensor less). Matches the trace.
                # torch/csrc/autograd/engine.cpp evaluate_function: the node's own gradient inputs die when
                # call_function returns, before its outputs are added into the next InputBuffers, so the
                # sum is allocated after this node's output gradients are freed (Tape._finish_sums)
                incoming = self.alloc.new(param.numel, param.dtype, "temporaries", count=param.grad_count)
                self._sums.append((param, incoming))
            return
        # the tracer files vocabulary-wide tensors (logits, their fp32 upcast, log-softmax and their
        # gradients) under loss_logits; every other gradient is a temporary
        cat = "loss_logits" if t.category == "loss_logits" else "temporaries"
        existing = self.grads.get(id(t))
        if existing is not None and existing.alive:
            # InputBuffer::accumulate (torch/csrc/autograd/input_buffer.cpp): the incoming gradient is
            # computed first (with its node's temporaries), then summed out of place with the buffered
            # one (`can_accumulate_inplace` refuses FakeTensors; a real CUDA step adds in place and
            # skips the sum's allocation), then both inputs of the sum are freed
            incoming = self.alloc.retain(alias) if alias is not None else self.alloc.new(t.numel, t.dtype, cat)
            self.alloc.spike(scratch)
            total = self.alloc.new(t.numel, t.dtype, cat)
            self.alloc.release(existing)
            self.alloc.release(incoming)
            self.grads[id(t)] = total
        elif alias is not None:
            self.grads[id(t)] = self.alloc.retain(alias)
        else:
            self.grads[id(t)] = self.alloc.new(t.numel, t.dtype, cat)
            self.alloc.spike(scratch)

    def _finish_sums(self) -> None:
        """The out-of-place sums of a tied leaf's two gradients (see `_grad_for`), after the node's
        gradient inputs are freed: old + incoming + sum alive at once, then old and incoming die."""
        for param, incoming in self._sums:
            total = self.alloc.new(param.numel, param.dtype, "grads", count=param.grad_count)
            self.alloc.release(param.grad)
            self.alloc.release(incoming)
            param.grad = total
        self._sums.clear()

    def _accumulate(self, t: Tensor, param: Param) -> None:
        """Gradient accumulation: `param.grad` survives from the previous micro-batch.

        The incoming gradient is a fresh tensor (the producing node's output). It waits in the
        AccumulateGrad node's InputBuffer until every use of the leaf has delivered (a tied
        embedding/lm_head: two uses, summed out of place under FakeTensors, input_buffer.cpp
        `can_accumulate_inplace`), then torch/csrc/autograd/functions/accumulate_grad.h
        `accumulateGrad` adds it in place (`variable_grad += new_grad`, grad mode off in backward)
        and the incoming buffer is freed. Before, the engine allocated nothing here: -11.2% on full
        fine-tuning with grad_accum=2 (llama3.2-1b, tied 1 GB fp32 embedding gradient)."""
        incoming = self.alloc.new(param.numel, param.dtype, "temporaries", count=param.grad_count)
        pending = self._pending.pop(id(param), None)
        if pending is not None:
            total = self.alloc.new(param.numel, param.dtype, "temporaries", count=param.grad_count)
            self.alloc.release(pending)
            self.alloc.release(incoming)
            incoming = total
        left = self._uses.get(id(t), 1) - 1
        self._uses[id(t)] = left
        if left > 0:
            self._pending[id(param)] = incoming
        else:
            self.alloc.release(incoming)  # in-place `grad += new`; the incoming buffer dies

    def backward(self, loss: Tensor, seed: Tensor | None = None, keep: Tensor | None = None) -> Tensor | None:
        """Backward from `loss` (a fresh scalar gradient, or `seed`'s buffer); returns the gradient
        of `keep` instead of freeing it (a reentrant checkpoint's input)."""
        self._seen = set()
        self._pending = {}
        self._uses = {}
        for node in self.nodes:
            if node.group is not None and not node.group.saving_nodes:
                for t in node.group.keep:
                    self.alloc.release(t)
                node.group.keep = []
            for inp in node.inputs:
                if id(inp) in self.leaf_params:
                    self._uses[id(inp)] = self._uses.get(id(inp), 0) + 1
        self.grads[id(loss)] = self.alloc.retain(seed) if seed is not None else \
            self.alloc.new(1, loss.dtype, "temporaries")
        marking, current = self.marking, -2
        for node in reversed(self.nodes):
            if marking and node.block != current:
                current = node.block
                self.alloc.mark("bwd", current)
            if self.offloader is not None:  # host copies brought back before the node runs (engine/offload.py)
                self.offloader.unpack(node.saved)  # type: ignore[attr-defined]
            if node.custom is not None:
                node.custom(self, node)
                continue
            g = node.group
            if g is not None and not g.done and g.saving_nodes and node is g.saving_nodes[-1]:
                if self.offloader is not None:
                    self.offloader.unpack(g.keep)  # type: ignore[attr-defined]
                recompute(self, g)
            if node.on_backward is not None:
                node.on_backward()
            if node.backward_scratch and not node.inputs:
                self.alloc.spike(node.backward_scratch)
            counter = _COUNTER[0]
            if counter is not None and node.name not in _NOT_MEMORY_BOUND:
                counter.kernels.append(("mem", "backward", _backward_bytes(node)))
            # AddBackward0 (tools/autograd/derivatives.yaml `self: grad`, `other: maybe_multiply(grad,
            # alpha)`) hands the incoming gradient itself to both inputs of a same-shape, same-dtype add
            # (residual stream, attention-mask add): no new tensor, one buffer shared
            passthrough = None
            if (node.name in _PASSTHROUGH or node.name in _GRAD_INTO_OUTPUT_GRAD) and len(node.outputs) == 1:
                passthrough = self.grads.get(id(node.outputs[0]))
            into_saved = node.name in _GRAD_INTO_SAVED and len(node.saved) == len(node.inputs)
            unvalidated: list[tuple[Tensor, Tensor]] = []  # MulBackward0 gradients validate_outputs fixes up
            for k, inp in enumerate(node.inputs):
                if into_saved:
                    self._grad_for(inp, node.saved[k])
                    continue
                o = node.outputs[0]
                if node.name == "mul" and id(inp) not in self.leaf_params and (inp.numel < o.numel or (
                        inp.dtype != o.dtype and inp.numel == o.numel)):
                    # derivatives.yaml mul: `grad * other` (FunctionsManual.cpp), full size in the output's dtype, for a
                    # promoted operand (fp16 by fp32: gelu_new, IA3's base output) or a broadcast one (the IA3 vector)
                    unvalidated.append((inp, self.alloc.new(o.numel, o.dtype, "temporaries")))
                    continue
                ok = passthrough is not None and passthrough.alive and inp.numel == node.outputs[0].numel \
                    and inp.dtype == node.outputs[0].dtype
                # PowBackward0 (derivatives.yaml `pow_backward(grad, self, exponent)` =
                # grad * (exponent * self.pow(exponent - 1))): self.pow(e-1) and its product with the
                # exponent are two input-sized temporaries alive while the input's gradient is written
                scratch = 2 * _nbytes(inp) if node.name == "pow" else 0
                if node.name == "mul" and inp.numel < node.outputs[0].numel:
                    # a broadcast leaf (a norm weight used directly): the full-size product, then sum_to
                    scratch = _nbytes(node.outputs[0])
                if k == 0:
                    scratch += node.backward_scratch
                self._grad_for(inp, passthrough if ok else None, scratch)
            # torch/csrc/autograd/engine.cpp call_function: apply, validate_outputs (per input `at::sum_to`, `grad.to`;
            # the replaced gradient dies), return (the incoming ones die), release_variables (the saved ones die); a
            # checkpointed layer's saved tensors die with apply's locals (torch/utils/checkpoint.py unpack_hook).
            for t in node.saved if node.group is not None else ():
                self.alloc.release(t)
            for inp, full in unvalidated:
                self._grad_for(inp)
                self.alloc.release(full)
            for out in node.outputs:
                gr = self.grads.pop(id(out), None)
                if gr is not None:
                    self.alloc.release(gr)
            for t in node.saved if node.group is None else ():
                self.alloc.release(t)
            self._finish_sums()
            if g is not None and g.saving_nodes and node is g.saving_nodes[0]:
                for t in g.keep:  # the last holder of the layer is gone: the frame and its args die
                    self.alloc.release(t)
                g.keep = []
        if marking:
            self.alloc.mark("bwd_end")
        self._finish_sums()
        if self.offloader is not None:
            self.offloader.unpack([])  # type: ignore[attr-defined]  # the last node's reloads
        kept = self.grads.pop(id(keep), None) if keep is not None else None
        for g in self.grads.values():
            self.alloc.release(g)
        for g in self._pending.values():
            self.alloc.release(g)
        self._pending = {}
        self.grads.clear()
        self.nodes.clear()
        return kept
