"""A symbolic allocator: the training step as a timeline of tensor allocations and frees.

No tensor holds data; each has a byte size (rounded up to the CUDA caching allocator's 512-byte
block, c10/cuda/CUDACachingAllocator.cpp `kMinBlockSize`), a category and a reference count.
The running total and its maximum give the peak of `torch.cuda.max_memory_allocated`; the
breakdown by category at the peak says which term made it. `Allocator.events` keeps the ordered
allocations and frees as plain integers (n > 0: allocate n bytes, handle = its index; ~i: free the
allocation made at event i; 0: an allocation taken back, e.g. a checkpoint recompute's output that
its early stop never computed), which engine/allocator.py replays through the caching allocator
for the reserved peak.

Categories match what the tracer (peftplan/harness/trace.py) records, so the two compare term
by term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..dtypes import DType

Category = Literal[
    "frozen_params", "trainable_params", "quant_constants", "grads", "optimizer_state",
    "saved_activations", "temporaries", "loss_logits", "inputs",
]
CATEGORIES: tuple[Category, ...] = (
    "frozen_params", "trainable_params", "quant_constants", "grads", "optimizer_state",
    "saved_activations", "loss_logits", "temporaries", "inputs",
)

ALLOC_BLOCK = 512  # CUDACachingAllocator rounds every request up to a multiple of 512 bytes (kMinBlockSize)


def rounded(n_bytes: int) -> int:
    """Bytes the caching allocator hands out for an `n_bytes` request."""
    if n_bytes <= 0:
        return 0
    return -(-n_bytes // ALLOC_BLOCK) * ALLOC_BLOCK


@dataclass(eq=False, slots=True)
class Tensor:
    """A symbolic tensor: `numel` elements of `dtype`; `nbytes` is its rounded allocation."""

    numel: int
    dtype: DType
    category: Category
    requires_grad: bool = False
    nbytes: int = 0
    refs: int = 1
    alive: bool = True
    label: str = ""
    event: int = -1  # index of its allocation in Allocator.events (-1: none recorded)


@dataclass
class Peak:
    bytes: int = 0
    phase: str = "load"
    components: dict[str, int] = field(default_factory=dict)


class Allocator:
    """Running total of live bytes, by category, with the peak and its phase."""

    def __init__(self) -> None:
        self.by_category: dict[str, int] = {c: 0 for c in CATEGORIES}
        self.total = 0
        self.phase = "load"
        self._phase_key = "load"  # the phase's kind ("forward", "backward", ...), cached: _note runs per tensor
        self.peak = Peak()
        self.phase_peaks: dict[str, int] = {}
        self.events: list[int] = []  # the timeline for engine/allocator.py (see the module docstring)
        self.parts: list[int] | None = None  # set before add_bytes: the separate tensors it stands for
        self.last_event = -1  # the first event of the last add_bytes()
        self._counts: dict[int, int] = {}  # event -> tensors, for new(count > 1)

    def mark(self, kind: str, block: int | None = None) -> None:
        """A segment boundary for the depth extrapolation (engine/depth.py MarkingAllocator); none here."""

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self._phase_key = phase.split(":")[0]

    def _note(self) -> None:
        key = self._phase_key
        if self.total > self.phase_peaks.get(key, -1):
            self.phase_peaks[key] = self.total
        if self.total > self.peak.bytes:
            self.peak = Peak(self.total, self.phase, dict(self.by_category))

    def new(self, numel: int, dtype: DType, category: Category, requires_grad: bool = False,
            label: str = "", count: int = 1) -> Tensor:
        """Allocate `count` identical tensors as one record (e.g. one per layer); returns the record."""
        each = rounded(dtype.bytes_for(numel))
        nbytes = each * count
        t = Tensor(numel, dtype, category, requires_grad, nbytes, 1, True, label)
        if each:
            t.event = len(self.events)
            if count == 1:
                self.events.append(each)
            else:
                self._counts[t.event] = count
                self.events.extend([each] * count)
        self.by_category[category] += nbytes
        self.total += nbytes
        self._note()
        return t

    def add_bytes(self, nbytes: int, category: Category) -> None:
        """Account already-rounded bytes (a group of small tensors computed elsewhere: set `parts`
        to their sizes first, in allocation order, for the timeline). Never freed unless a
        Tensor made for it takes `last_event` as its event."""
        parts = self.parts
        self.parts = None
        events = self.events
        self.last_event = len(events) if nbytes else -1
        if parts is None:
            if nbytes:
                events.append(nbytes)
        else:
            events.extend(p for p in parts if p)
        self.by_category[category] += nbytes
        self.total += nbytes
        self._note()

    def recategorize(self, t: Tensor, category: Category) -> None:
        if t.alive and t.category != category:
            self.by_category[t.category] -= t.nbytes
            self.by_category[category] += t.nbytes
            t.category = category

    def retain(self, t: Tensor) -> Tensor:
        t.refs += 1
        return t

    def release(self, t: Tensor | None) -> None:
        """Drop one reference; free the storage when none is left."""
        if t is None or not t.alive:
            return
        t.refs -= 1
        if t.refs <= 0:
            t.alive = False
            if t.event >= 0:
                count = self._counts.pop(t.event, 1) if self._counts else 1
                if count == 1:
                    self.events.append(~t.event)
                else:
                    self.events.extend(~e for e in range(t.event, t.event + count))
            self.by_category[t.category] -= t.nbytes
            self.total -= t.nbytes

    def spike(self, nbytes: int, category: Category = "temporaries") -> None:
        """A transient allocation freed at once (e.g. a kernel's scratch buffer); with `parts` set,
        that many separate tensors, all allocated and then all freed."""
        start = len(self.events)
        self.add_bytes(nbytes, category)
        self.events.extend(~i for i in range(start, len(self.events)))
        self.by_category[category] -= nbytes
        self.total -= nbytes
