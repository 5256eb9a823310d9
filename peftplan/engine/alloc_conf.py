"""PYTORCH_CUDA_ALLOC_CONF and the caching allocator's size rules (no torch); the replay is engine/allocator.py.

Parsing follows AcceleratorAllocatorConfig / CUDAAllocatorConfig (torch 2.13,
c10/core/AllocatorConfig.h, c10/cuda/CUDAAllocatorConfig.h); the size rules are the functions of
c10/cuda/CUDACachingAllocator.cpp named in each docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MiB = 2**20
K_MIN_BLOCK = 512  # kMinBlockSize: AllocatorConfig.h line 19
K_SMALL_SIZE = 1 * MiB  # kSmallSize, largest "small" request: AllocatorConfig.h line 21
K_SMALL_BUFFER = 2 * MiB  # kSmallBuffer, small-pool segment: AllocatorConfig.h line 17
K_MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: AllocatorConfig.h line 23
K_ROUND_LARGE = 2 * MiB  # kRoundLarge: AllocatorConfig.h line 25
# kLargeBuffer; AllocatorConfig.h `large_segment_size_{20971520}` in 2.13
K_LARGE_BUFFER = 20 * MiB
K_ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: the power-of-2 size intervals from 1 MiB to 64 GiB
NO_LIMIT = 2**63  # max_split_size default: std::numeric_limits<size_t>::max()


class AllocConfError(ValueError):
    """A PYTORCH_CUDA_ALLOC_CONF string this model cannot read."""


@dataclass(frozen=True)
class AllocConf:
    """The device-allocator settings of PYTORCH_CUDA_ALLOC_CONF (c10/core/AllocatorConfig.h)."""

    expandable_segments: bool = False
    max_split_size: int = NO_LIMIT  # bytes; blocks at or above it are never split
    max_non_split_rounding: int = K_LARGE_BUFFER  # bytes (max_non_split_rounding_mb, default 20 MiB)
    large_segment_size: int = K_LARGE_BUFFER  # bytes (large_segment_size_mb)
    roundup_power2_divisions: tuple[int, ...] = (0,) * K_ROUNDUP_INTERVALS  # per power-of-2 interval from 1 MiB
    garbage_collection_threshold: float = 0.0
    memory_fraction: float = 0.0  # per_process_memory_fraction (0: not set)
    text: str = ""  # the string it was parsed from ("" = torch's defaults)

    def divisions_for(self, size: int) -> int:
        """AcceleratorAllocatorConfig::roundup_power2_divisions(size): the interval index is
        log2(size) - log2(1 MiB), clamped to [0, 15]."""
        index = max(0, size.bit_length() - 1 - 20)
        return self.roundup_power2_divisions[min(index, K_ROUNDUP_INTERVALS - 1)]


_BOOL = {"true": True, "false": False}


def parse_alloc_conf(text: str | None) -> AllocConf:
    """Parse a PYTORCH_CUDA_ALLOC_CONF string ("key:value,key:[a:b,>:c]"), as
    AcceleratorAllocatorConfig::parseArgs and CUDAAllocatorConfig::parseArgs read it.

    Raises AllocConfError (one line) on anything else. Keys that do not change the device
    allocator's layout (pinned_*, release_lock_on_cudamalloc, backend:native) are accepted and
    ignored; `backend:cudaMallocAsync` is refused (a different allocator)."""
    if not text or not text.strip():
        return AllocConf()
    tokens = _tokenize(text)
    kw: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        key = tokens[i]
        if i + 1 >= len(tokens) or tokens[i + 1] != ":":
            raise AllocConfError(f"alloc conf: expected 'key:value' at {key!r}")
        i += 2
        if i < len(tokens) and tokens[i] == "[":
            j = tokens.index("]", i) if "]" in tokens[i:] else -1
            if j < 0:
                raise AllocConfError(f"alloc conf: unclosed '[' after {key}")
            value: Any = tokens[i + 1:j]
            i = j + 1
        else:
            if i >= len(tokens):
                raise AllocConfError(f"alloc conf: no value for {key}")
            value = tokens[i]
            i += 1
        _set(kw, key, value)
        if i < len(tokens):
            if tokens[i] != ",":
                raise AllocConfError(f"alloc conf: expected ',' after {key}")
            i += 1
    return AllocConf(text=text.strip(), **kw)


def _tokenize(text: str) -> list[str]:
    """ConfigTokenizer: ',', ':', '[', ']' are tokens of their own; whitespace is dropped."""
    out: list[str] = []
    buf = ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append(buf)
                buf = ""
            out.append(ch)
        elif not ch.isspace():
            buf += ch
    if buf:
        out.append(buf)
    return out


def _mb(key: str, value: Any, minimum: int = 0) -> int:
    try:
        mb = int(value)
    except (TypeError, ValueError):
        raise AllocConfError(f"alloc conf: {key} needs a whole number of MB, got {value!r}") from None
    if mb < minimum:
        raise AllocConfError(f"alloc conf: {key} must be >= {minimum}")
    return mb * MiB


def _set(kw: dict[str, Any], key: str, value: Any) -> None:
    if key == "expandable_segments":
        v = _BOOL.get(str(value).lower())
        if v is None:
            raise AllocConfError("alloc conf: expandable_segments takes True or False")
        kw["expandable_segments"] = v
    elif key == "max_split_size_mb":
        # parseMaxSplitSize / parseMaxNonSplitRoundingSize: at least kLargeBuffer / kMB (20)
        kw["max_split_size"] = _mb(key, value, 20)
    elif key == "max_non_split_rounding_mb":
        kw["max_non_split_rounding"] = _mb(key, value, 20)
    elif key == "large_segment_size_mb":
        kw["large_segment_size"] = _mb(key, value, 1)
    elif key == "garbage_collection_threshold":
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise AllocConfError("alloc conf: garbage_collection_threshold needs a number") from None
        if not 0.0 < v < 1.0:  # parseGarbageCollectionThreshold: (0.0, 1.0)
            raise AllocConfError("alloc conf: garbage_collection_threshold must be in (0, 1)")
        kw["garbage_collection_threshold"] = v
    elif key == "per_process_memory_fraction":
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise AllocConfError("alloc conf: per_process_memory_fraction needs a number") from None
        if not 0.0 < v <= 1.0:
            raise AllocConfError("alloc conf: per_process_memory_fraction must be in (0, 1]")
        kw["memory_fraction"] = v
    elif key == "roundup_power2_divisions":
        kw["roundup_power2_divisions"] = _divisions(value)
    elif key == "backend":
        if str(value) != "native":
            raise AllocConfError("alloc conf: only backend:native (the caching allocator) is modelled")
    elif key.startswith("pinned_") or key in ("release_lock_on_cudamalloc", "expandable_segments_handle_type",
                                             "graph_capture_record_stream_reuse"):
        return  # host-side or locking settings: no effect on the device memory layout
    else:
        raise AllocConfError(f"alloc conf: unknown key {key!r}")


def _divisions(value: Any) -> tuple[int, ...]:
    """parseRoundUpPower2Divisions: one power of 2 for every interval, or [size_mb:div, ..., >:div]
    where size_mb is a power of 2 (its interval index is log2(size_mb)) and div a power of 2 or 0;
    the first entry also fills the intervals below it, '>' fills those after the last one."""
    def div(v: str, zero_ok: bool = True) -> int:
        try:
            d = int(v)
        except ValueError:
            raise AllocConfError(f"alloc conf: roundup_power2_divisions: {v!r} is not a number") from None
        if d < 0 or (d & (d - 1)) or (d == 0 and not zero_ok):
            raise AllocConfError("alloc conf: roundup_power2_divisions must be powers of 2")
        return d

    if isinstance(value, str):
        return (div(value, zero_ok=False),) * K_ROUNDUP_INTERVALS
    out = [0] * K_ROUNDUP_INTERVALS
    items = [t for t in value if t != ","]
    if len(items) % 3:
        raise AllocConfError("alloc conf: roundup_power2_divisions list needs size:divisions pairs")
    last = 0
    first = True
    for k in range(0, len(items), 3):
        size, colon, d = items[k:k + 3]
        if colon != ":":
            raise AllocConfError("alloc conf: roundup_power2_divisions list needs size:divisions pairs")
        if size == ">":
            for j in range(last + 1, K_ROUNDUP_INTERVALS):
                out[j] = div(d)
            continue
        try:
            mb = int(size)
        except ValueError:
            raise AllocConfError(f"alloc conf: roundup_power2_divisions: {size!r} is not a size") from None
        if mb <= 0 or mb & (mb - 1):
            raise AllocConfError("alloc conf: roundup_power2_divisions intervals must be powers of 2")
        index = min(mb.bit_length() - 1, K_ROUNDUP_INTERVALS - 1)
        if first:
            for j in range(index):
                out[j] = div(d)
            first = False
        out[index] = div(d)
        last = index
    return tuple(out)


def round_size(size: int, conf: AllocConf) -> int:
    """DeviceCachingAllocator::round_size (with roundup_power2_next_division)."""
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    divisions = conf.divisions_for(size)
    if divisions > 1 and size > K_MIN_BLOCK * divisions:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        low = size & ~(step - 1)
        return size if low == size else low + step
    return -(-size // K_MIN_BLOCK) * K_MIN_BLOCK


def allocation_size(size: int, conf: AllocConf) -> int:
    """DeviceCachingAllocator::get_allocation_size: the size of a new segment for a request."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return conf.large_segment_size
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE

