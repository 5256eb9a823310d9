"""PyTorch's CUDA caching allocator, replayed on the step's allocation timeline (no torch).

`replay(events, conf)` runs the ordered allocations and frees of a step through a model of
`DeviceCachingAllocator` (torch 2.13, c10/cuda/CUDACachingAllocator.cpp; constants in
c10/core/AllocatorConfig.h, the installed header torch/include/c10/core/AllocatorConfig.h
lines 17-25) for one device and one stream, and returns what `torch.cuda.memory_stats()` would
say: peak reserved bytes and segments, and the allocator's state at the allocated peak
(fragmentation, cached segments, largest free block).

Sources read: the installed torch 2.13 headers (constants, AcceleratorAllocatorConfig's settings
and defaults: large_segment_size 20 MiB, max_non_split_rounding 20 MiB, max_split_size unlimited,
garbage_collection_threshold 0, expandable_segments off), and CUDACachingAllocator.cpp as stored in
the pytorch/pytorch index (commit 001074d2, the DeviceCachingAllocator functions named below; the
wheel ships no .cpp) with get_free_block's `max_non_split_rounding_size` check from the newer
templated CachingDeviceAllocator source. Functions are cited by name rather than line: the lines
move between releases (the rules modelled here read the same in both sources).

The rules, each with the function of CUDACachingAllocator.cpp it comes from:
- `round_size`: requests under kMinBlockSize (512 B) become 512 B, others round up to a multiple of
  512 B, or, with `roundup_power2_divisions`, to the next of N equal divisions of their power-of-2
  interval (`roundup_power2_next_division`).
- `get_pool`: requests <= kSmallSize (1 MiB) go to the small pool, larger ones to the large pool;
  the pools never share blocks.
- `get_allocation_size`: a new segment (cudaMalloc) is kSmallBuffer (2 MiB) for a small request,
  the large segment size (20 MiB, `large_segment_size_mb`; kLargeBuffer in older releases) for a
  request under kMinLargeAlloc (10 MiB), and the request rounded up to kRoundLarge (2 MiB) above.
- `get_free_block`: best fit, the free block with the smallest (size, address) not below the request
  (`BlockComparatorSize`: stream, size, ptr). With `max_split_size`: a request below it never takes
  a block at or above it, and a request at or above it takes one only if the block is smaller than
  request + `max_non_split_rounding_size` (20 MiB by default).
- `should_split` / `alloc_found_block`: the found block is split, the remainder staying cached in the
  pool, when the remainder is >= 512 B (small pool, or expandable segments), else when the request is
  under `max_split_size` and the remainder is > kSmallSize (1 MiB): a large block with 1 MiB or less
  to spare is handed out whole (that slack is allocated in the stats, as `block->size`).
- `free` / `free_block` / `try_merge_blocks`: a freed block is cached, merged with free neighbours
  of its own segment only (blocks of different segments never merge); segments are not returned to
  the driver.
- `alloc_block`: when no cached block fits, a new segment; under a memory limit (the GPU's capacity,
  or `per_process_memory_fraction`), `release_available_cached_blocks` (only with max_split_size:
  oversize cached blocks), then `release_cached_blocks` (every cached segment with no live block)
  and a retry; if that fails too, the run is out of memory.
- `garbage_collect_cached_blocks`: with `garbage_collection_threshold` and a memory fraction set
  (`set_fraction`; without one torch never runs it), unsplit cached large blocks at least as old
  (in `get_free_block` calls) as the average are released once reserved passes threshold x limit.
- expandable segments (`expandable_segments:True`; `try_allocate_expandable_block`,
  `find_expandable_block`, `map_block`): one segment per pool whose mapped size grows in pages of
  2 MiB (small pool) or 20 MiB (large pool); a request no free block fits maps the pages it needs
  after the segment's free tail; best fit prefers any other fitting free block to the tail
  (`get_free_block`'s expandable_size walk); splitting always (remainder >= 512 B).

Not modelled: several streams (`recordStream`, cross-stream events), CUDA graphs' private pools,
`emptyCache` calls by the program, and, under expandable segments, the unmapping of free pages in
the middle of the segment on an out-of-memory retry.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .alloc_conf import K_MIN_BLOCK, K_SMALL_BUFFER, K_SMALL_SIZE, NO_LIMIT, AllocConf, allocation_size, round_size

_EXPANDABLE_BASE = {True: 1 << 48, False: 2 << 48}  # address ranges of the two expandable segments


class _Block:
    """A Block of CUDACachingAllocator.cpp: a range of one segment, free (cached) or allocated."""

    __slots__ = ("addr", "size", "requested", "prev", "next", "free", "small", "gc_base")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr = addr
        self.size = size
        self.requested = 0
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.free = False
        self.small = small
        self.gc_base = 0


@dataclass(frozen=True)
class ReplayResult:
    """What torch.cuda.memory_stats() would report after the timeline, and the allocator's state
    at the allocated peak (the engine's peak). Bytes."""

    peak_reserved_bytes: int  # max_memory_reserved
    peak_allocated_bytes: int  # max_memory_allocated as torch counts it: whole block sizes
    peak_requested_bytes: int  # the same over the (rounded) request sizes: the engine's peak
    segments_at_peak: int  # segments (cudaMalloc'd, or mapped ranges when expandable) at the reserved peak
    max_segments: int
    peak_event: int  # the event after which reserved peaked
    # at the allocated (requested) peak:
    reserved_at_alloc_peak_bytes: int
    fragmentation_bytes: int  # reserved - allocated (block sizes) there
    cached_segments_bytes: int  # ... of which whole segments with no live block
    split_free_bytes: int  # ... of which free space inside segments that hold live blocks
    unsplit_slack_bytes: int  # allocated but not requested: blocks handed out whole (<= 1 MiB spare)
    largest_free_block_bytes: int
    small_pool_reserved_bytes: int
    large_pool_reserved_bytes: int
    alloc_peak_event: int
    alloc_retries: int  # cache flushes to make room (release_cached_blocks), with a memory limit
    out_of_memory: bool  # a request failed even after the flushes (limit given)
    reserved_limit_bytes: int  # the limit the replay ran under (0: none)
    final_reserved_bytes: int
    events: int
    conf: str

    @property
    def growth_after_alloc_peak_bytes(self) -> int:
        """Reserved added after the allocated peak: requests that found no cached block that fits."""
        return self.peak_reserved_bytes - self.reserved_at_alloc_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AllocatorReplay:
    """The state machine: `malloc(nbytes) -> handle`, `free(handle)`."""

    def __init__(self, conf: AllocConf | None = None, limit_bytes: int = 0) -> None:
        self.conf = conf = conf or AllocConf()
        self.mss = conf.max_split_size
        self.expandable = conf.expandable_segments
        # set_fraction: per_process_memory_fraction caps reserved at fraction x the limit given
        # (the device's memory); garbage collection only runs then (malloc / get_free_block)
        if conf.memory_fraction and limit_bytes:
            limit_bytes = int(conf.memory_fraction * limit_bytes)
        self.limit = limit_bytes
        self.gc_on = conf.garbage_collection_threshold > 0.0 and conf.memory_fraction > 0.0 and limit_bytes > 0
        self.free_lists: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, addr), sorted
        self.by_addr: dict[int, _Block] = {}  # free blocks by address
        self.next_addr = 1 << 20
        self.reserved = 0
        self.reserved_pool = {True: 0, False: 0}
        self.allocated = 0
        self.requested = 0
        self.segments = 0
        self.max_segments = 0
        self.whole_free = 0  # bytes of cached blocks that are whole segments
        self.tail: dict[bool, _Block | None] = {True: None, False: None}  # expandable: last block
        self.gc_calls = {True: 0, False: 0}
        self.peak_allocated = 0
        self.peak_requested = 0
        self.retries = 0
        self.oom = False
        self.n_events = 0
        self.peak_reserved = 0
        self.reserved_peak: tuple[int, int] = (0, -1)  # (segments, event) when reserved peaked
        self.alloc_peak: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 0, -1)  # see _snapshot

    # -- the free lists --------------------------------------------------------------------------
    def _insert(self, b: _Block) -> None:
        b.free = True
        b.gc_base = self.gc_calls[b.small]
        insort(self.free_lists[b.small], (b.size, b.addr))
        self.by_addr[b.addr] = b
        if b.prev is None and b.next is None:
            self.whole_free += b.size

    def _remove(self, b: _Block) -> None:
        fl = self.free_lists[b.small]
        del fl[bisect_left(fl, (b.size, b.addr))]
        del self.by_addr[b.addr]
        if b.prev is None and b.next is None:
            self.whole_free -= b.size

    # -- the peaks -------------------------------------------------------------------------------
    def _note_reserved(self, event: int) -> None:
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
            self.reserved_peak = (self.segments, event)

    def _snapshot(self, event: int, allocated: int, whole_free: int, slack: int) -> None:
        """The state at a new allocated (requested) maximum."""
        fls, fll = self.free_lists[True], self.free_lists[False]
        largest = max(fls[-1][0] if fls else 0, fll[-1][0] if fll else 0)
        self.alloc_peak = (self.reserved, allocated, whole_free, slack, largest, self.reserved_pool[True],
                           self.reserved_pool[False], event)

    # -- malloc ----------------------------------------------------------------------------------
    def malloc(self, nbytes: int, event: int = -1) -> _Block:
        """DeviceCachingAllocator::malloc."""
        size = round_size(nbytes, self.conf)
        small = size <= K_SMALL_SIZE  # get_pool
        b = self._get_free_block(size, small)
        if b is None:
            if self.gc_on:
                self._garbage_collect()
            b = self._expand(size, small) if self.expandable else self._alloc_block(size, small)
            self._note_reserved(event)
        # should_split / alloc_found_block
        remaining = b.size - size
        if (remaining >= K_MIN_BLOCK) if (small or self.expandable) else (size < self.mss and remaining > K_SMALL_SIZE):
            nb = _Block(b.addr, size, small)
            nb.prev, nb.next = b.prev, b
            if b.prev is not None:
                b.prev.next = nb
            b.prev = nb
            b.addr += size
            b.size = remaining
            self._insert(b)
            b = nb
        b.free = False
        b.requested = size
        self.allocated += b.size
        self.requested += size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested
            self._snapshot(event, self.allocated, self.whole_free, self.allocated - self.requested)
        return b

    def _get_free_block(self, size: int, small: bool) -> _Block | None:
        """get_free_block: best fit by (size, address), with the max_split_size rules."""
        if self.gc_on:
            self.gc_calls[small] += 1
        fl = self.free_lists[small]
        i = bisect_left(fl, (size,))
        if i == len(fl):
            return None
        b = self.by_addr[fl[i][1]]
        if self.expandable and b.next is None and i + 1 < len(fl):
            # the segment's free tail can grow without bound (expandable_size): any other fitting
            # block is a better fit
            b = self.by_addr[fl[i + 1][1]]
        mss = self.mss
        if size < mss and b.size >= mss:
            return None  # do not return an oversized block for a request below max_split_size
        if size >= mss and b.size >= size + self.conf.max_non_split_rounding:
            return None
        self._remove(b)
        return b

    def _new_segment(self, nbytes: int, small: bool) -> None:
        self.reserved += nbytes
        self.reserved_pool[small] += nbytes

    def _alloc_block(self, size: int, small: bool) -> _Block:
        """alloc_block, with release_available_cached_blocks / release_cached_blocks and a retry
        when the limit would be passed."""
        nbytes = allocation_size(size, self.conf)
        if self.limit and self.reserved + nbytes > self.limit:
            if not (self.mss < NO_LIMIT and self._release_available(size, small)
                    and self.reserved + nbytes <= self.limit):
                self.retries += 1
                self._release_cached()
                if self.reserved + nbytes > self.limit:
                    self.oom = True  # CUDA out of memory; the replay goes on to size the need
        b = _Block(self.next_addr, nbytes, small)
        self.next_addr += nbytes + K_SMALL_BUFFER  # segments are never adjacent
        self._new_segment(nbytes, small)
        self.segments += 1
        if self.segments > self.max_segments:
            self.max_segments = self.segments
        return b

    def _expand(self, size: int, small: bool) -> _Block:
        """try_allocate_expandable_block: map pages after the segment's free tail (or at its end)."""
        page = K_SMALL_BUFFER if small else self.conf.large_segment_size
        tail = self.tail[small]
        have = 0
        if tail is not None and tail.free:
            have = tail.size
            self._remove(tail)
        new = -(-(size - have) // page) * page
        if self.limit and self.reserved + new > self.limit:
            self.oom = True
        self._new_segment(new, small)
        if self.reserved_pool[small] == new:
            self.segments += 1  # the pool's first mapping: one contiguous mapped segment
            self.max_segments = max(self.max_segments, self.segments)
        if have:
            tail.size += new  # map_block merges the new pages into the free tail (try_merge_blocks)
            return tail
        b = _Block(_EXPANDABLE_BASE[small] + self.reserved_pool[small] - new, new, small)
        b.prev = tail
        if tail is not None:
            tail.next = b
        self.tail[small] = b
        return b

    def _release(self, b: _Block) -> None:
        """release_block: a whole cached segment goes back to the driver."""
        self._remove(b)
        self.reserved -= b.size
        self.reserved_pool[b.small] -= b.size
        self.segments -= 1

    def _release_cached(self) -> None:
        """release_cached_blocks -> release_blocks: every cached block that is a whole segment."""
        for small in (False, True):
            for _, addr in list(self.free_lists[small]):
                b = self.by_addr[addr]
                if b.prev is None and b.next is None:
                    self._release(b)

    def _release_available(self, size: int, small: bool) -> bool:
        """release_available_cached_blocks: oversize cached blocks, just enough for the request."""
        fl = self.free_lists[small]
        key = max(size, self.mss)
        i = bisect_left(fl, (key,))
        if i < len(fl):
            b = self.by_addr[fl[i][1]]
            if b.prev is None and b.next is None:
                self._release(b)
                return True
            return False
        released = 0
        for _, addr in reversed(list(fl)):
            b = self.by_addr[addr]
            if released >= key or b.size < self.mss:
                break
            if b.prev is None and b.next is None:
                released += b.size
                self._release(b)
        return released >= key

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: release aged, unsplit cached large blocks."""
        threshold = int(self.conf.garbage_collection_threshold * self.limit)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        calls = self.gc_calls[False]
        freeable = [b for b in (self.by_addr[a] for _, a in self.free_lists[False])
                    if b.prev is None and b.next is None]
        if not freeable:
            return
        total_age = sum(calls - b.gc_base for b in freeable)
        count = len(freeable)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            threshold_age = total_age / count
            freed = False
            for b in [self.by_addr[a] for _, a in list(self.free_lists[False])]:
                if b.prev is None and b.next is None and calls - b.gc_base >= threshold_age:
                    freed = True
                    reclaimed += b.size
                    total_age -= calls - b.gc_base
                    count -= 1
                    self._release(b)

    # -- free ------------------------------------------------------------------------------------
    def free(self, b: _Block) -> None:
        """free -> free_block: cache the block, merged with free neighbours (try_merge_blocks)."""
        self.allocated -= b.size
        self.requested -= b.requested
        p = b.prev
        if p is not None and p.free:
            self._remove(p)
            b.addr = p.addr
            b.size += p.size
            b.prev = p.prev
            if b.prev is not None:
                b.prev.next = b
        n = b.next
        if n is not None and n.free:
            self._remove(n)
            b.size += n.size
            b.next = n.next
            if b.next is not None:
                b.next.prev = b
            if self.tail[b.small] is n:
                self.tail[b.small] = b
        self._insert(b)

    # -- driving it ------------------------------------------------------------------------------
    def run(self, events: Sequence[int], generic: bool = False) -> ReplayResult:
        """Replay `events` (see `replay`). The default settings (no max_split_size, rounding
        divisions, expandable segments or garbage collection) take an inlined copy of
        malloc / get_free_block / free; `generic=True` forces the general path (tests compare them)."""
        fast = not (generic or self.expandable or self.gc_on or self.mss < NO_LIMIT
                    or any(self.conf.roundup_power2_divisions))
        if fast:
            self._run_default(events)
        else:
            live: dict[int, _Block] = {}
            malloc, free = self.malloc, self.free
            for i, ev in enumerate(events):
                if ev > 0:
                    live[i] = malloc(ev, i)
                elif ev < 0 and ~ev in live:
                    free(live.pop(~ev))
        self.n_events = len(events)
        return self.result()

    def _run_default(self, events: Sequence[int]) -> None:
        """malloc / free under torch's default settings, inlined (the estimate runs this per call).

        The state at the allocated peak is taken at the first free after a new maximum (nothing
        changes between the last allocation of a rising run and that free)."""
        fls, fll = self.free_lists[True], self.free_lists[False]
        by_addr = self.by_addr
        pop_addr = by_addr.pop
        live: list[_Block | None] = [None] * len(events)
        allocated = requested = peak_allocated = peak_requested = 0
        pending = -1  # event of a new allocated maximum not yet recorded
        whole_free = self.whole_free
        Block = _Block
        bisect, insert = bisect_left, insort
        for i, ev in enumerate(events):
            if ev > 0:
                size = (ev + 511) & ~511 if ev >= K_MIN_BLOCK else K_MIN_BLOCK  # round_size
                small = size <= K_SMALL_SIZE
                fl = fls if small else fll
                j = bisect(fl, (size,))
                if j < len(fl):  # get_free_block: best fit
                    b = pop_addr(fl[j][1])
                    del fl[j]
                    if b.prev is None and b.next is None:
                        whole_free -= b.size
                else:
                    self.whole_free = whole_free
                    b = self._alloc_block(size, small)
                    whole_free = self.whole_free
                    self._note_reserved(i)
                remaining = b.size - size
                if remaining >= K_MIN_BLOCK if small else remaining > K_SMALL_SIZE:  # should_split
                    nb = Block(b.addr, size, small)
                    nb.prev = p = b.prev
                    nb.next = b
                    if p is not None:
                        p.next = nb
                    b.prev = nb
                    b.addr += size
                    b.size = remaining
                    b.free = True
                    insert(fl, (remaining, b.addr))
                    by_addr[b.addr] = b
                    b = nb
                b.free = False
                b.requested = size
                allocated += b.size
                requested += size
                live[i] = b
                if allocated > peak_allocated:
                    peak_allocated = allocated
                if requested > peak_requested:
                    peak_requested = requested
                    pending = i
            elif ev < 0:
                b = live[~ev]
                if b is None:
                    continue  # its allocation was taken off the timeline (a zero-byte event)
                if pending >= 0:
                    self._snapshot(pending, allocated, whole_free, allocated - requested)
                    pending = -1
                live[~ev] = None
                allocated -= b.size
                requested -= b.requested
                fl = fls if b.small else fll
                p = b.prev
                if p is not None and p.free:  # try_merge_blocks [p b]
                    del fl[bisect(fl, (p.size, p.addr))]
                    del by_addr[p.addr]
                    b.addr = p.addr
                    b.size += p.size
                    b.prev = p = p.prev
                    if p is not None:
                        p.next = b
                n = b.next
                if n is not None and n.free:  # try_merge_blocks [b n]
                    del fl[bisect(fl, (n.size, n.addr))]
                    del by_addr[n.addr]
                    b.size += n.size
                    b.next = n = n.next
                    if n is not None:
                        n.prev = b
                b.free = True
                insert(fl, (b.size, b.addr))
                by_addr[b.addr] = b
                if b.prev is None and b.next is None:
                    whole_free += b.size
        if pending >= 0:
            self._snapshot(pending, allocated, whole_free, allocated - requested)
        self.whole_free = whole_free
        self.allocated, self.requested = allocated, requested
        self.peak_allocated, self.peak_requested = peak_allocated, peak_requested

    def result(self) -> ReplayResult:
        reserved, allocated, whole, slack, largest, small, large, event = self.alloc_peak
        segments, reserved_event = self.reserved_peak
        return ReplayResult(
            peak_reserved_bytes=self.peak_reserved, peak_allocated_bytes=self.peak_allocated,
            peak_requested_bytes=self.peak_requested, segments_at_peak=segments, max_segments=self.max_segments,
            peak_event=reserved_event, reserved_at_alloc_peak_bytes=reserved, fragmentation_bytes=reserved - allocated,
            cached_segments_bytes=whole, split_free_bytes=reserved - allocated - whole, unsplit_slack_bytes=slack,
            largest_free_block_bytes=largest, small_pool_reserved_bytes=small, large_pool_reserved_bytes=large,
            alloc_peak_event=event, alloc_retries=self.retries, out_of_memory=self.oom, reserved_limit_bytes=self.limit,
            final_reserved_bytes=self.reserved, events=self.n_events, conf=self.conf.text or "default")


def replay(events: Sequence[int], conf: AllocConf | None = None, limit_bytes: int = 0) -> ReplayResult:
    """Replay a timeline: `events[i] > 0` allocates that many bytes (the handle is i), `~j` (< 0)
    frees the allocation made at event j; 0 is no allocation (torch allocates nothing for zero
    bytes), and its free is skipped. `limit_bytes`: what reserved may reach (0: unbounded;
    with per_process_memory_fraction, that fraction of it)."""
    return AllocatorReplay(conf, limit_bytes).run(events)
