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


@dataclass(eq=False)
class Node:
    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    saved: list[Tensor]
    backward_scratch: int = 0  # bytes allocated and freed inside this node's backward
    on_backward: Callable[[], None] | None = None  # extra work (a checkpointed layer's parameter grads)


@dataclass
class Tape:
    alloc: Allocator
    nodes: list[Node] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)  # id(tensor) -> its gradient buffer
    leaf_params: dict[int, Param] = field(default_factory=dict)  # id(tensor) -> param
    _seen: set[int] = field(default_factory=set)  # params whose grad arrived in this backward

    # ---- forward helpers --------------------------------------------------------------
    def new(self, numel: int, dtype: DType, requires_grad: bool, label: str = "",
            category: Category = "temporaries") -> Tensor:
        return self.alloc.new(numel, dtype, category, requires_grad, label)

    def drop(self, *tensors: Tensor | None) -> None:
        """The Python variable goes out of scope."""
        for t in tensors:
            if t is not None and id(t) not in self.leaf_params:
                self.alloc.release(t)

    def save(self, t: Tensor) -> Tensor:
        self.alloc.retain(t)
        if t.category == "temporaries":
            self.alloc.recategorize(t, "saved_activations")
        return t

    def record(self, name: str, inputs: list[Tensor], outputs: list[Tensor], saved: list[Tensor | None],
               backward_scratch: int = 0) -> None:
        """Record a node when any output requires grad; otherwise saved tensors are not kept."""
        if not any(o.requires_grad for o in outputs):
            return
        kept = [self.save(t) for t in saved if t is not None]
        self.nodes.append(Node(name, [i for i in inputs if i.requires_grad], outputs, kept, backward_scratch))

    def param_tensor(self, p: Param) -> Tensor:
        assert p.tensor is not None
        self.leaf_params[id(p.tensor)] = p
        return p.tensor

    # ---- backward -----------------------------------------------------------------------
    def _grad_for(self, t: Tensor) -> None:
        """Produce (or accumulate into) the gradient of `t`."""
        param = self.leaf_params.get(id(t))
        if param is not None:
            if not param.trainable:
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
                incoming = self.alloc.new(param.numel, param.dtype, "temporaries", count=param.grad_count)
                total = self.alloc.new(param.numel, param.dtype, "grads", count=param.grad_count)
                self.alloc.release(param.grad)
                self.alloc.release(incoming)
                param.grad = total
            else:
                # AccumulateGrad adds in place into an existing .grad (gradient accumulation)
                pass
            return
        # the tracer files vocabulary-wide tensors (logits, their fp32 upcast, log-softmax and their
        # gradients) under loss_logits; every other gradient is a temporary
        cat = "loss_logits" if t.category == "loss_logits" else "temporaries"
        existing = self.grads.get(id(t))
        if existing is not None and existing.alive:
            # InputBuffer::accumulate: out-of-place add when both are alive, then the old one is freed
            new = self.alloc.new(t.numel, t.dtype, cat)
            self.alloc.release(existing)
            self.grads[id(t)] = new
        else:
            self.grads[id(t)] = self.alloc.new(t.numel, t.dtype, cat)

    def backward(self, loss: Tensor) -> None:
        self._seen = set()
        self.grads[id(loss)] = self.alloc.new(1, loss.dtype, "temporaries")
        for node in reversed(self.nodes):
            if node.on_backward is not None:
                node.on_backward()
            if node.backward_scratch:
                self.alloc.spike(node.backward_scratch)
            for inp in node.inputs:
                self._grad_for(inp)
            for t in node.saved:
                self.alloc.release(t)
            for out in node.outputs:
                g = self.grads.pop(id(out), None)
                if g is not None:
                    self.alloc.release(g)
        for g in self.grads.values():
            self.alloc.release(g)
        self.grads.clear()
        self.nodes.clear()
