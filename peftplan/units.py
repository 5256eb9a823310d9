"""Units: byte multiples and parsing/formatting at the edges.

Everything inside peftplan is an integer number of bytes or FLOPs; these helpers convert only for
display and for parsing user input. GiB is 2**30 bytes and GB is 10**9 bytes; they are never mixed.
"""

from __future__ import annotations

import re

BYTES_PER_KIB = 2**10
BYTES_PER_MIB = 2**20
BYTES_PER_GIB = 2**30
BYTES_PER_GB = 10**9

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """Parse '12GiB', '16 GB', '24000000000' into integer bytes; raise ValueError otherwise."""
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size (examples: 12GiB, 16GB, 24000000000)")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(round(value))


def gib(n_bytes: int) -> float:
    """Bytes as GiB (2**30) for display."""
    return n_bytes / BYTES_PER_GIB


def gb(n_bytes: int) -> float:
    """Bytes as GB (10**9) for display."""
    return n_bytes / BYTES_PER_GB


def fmt_gib(n_bytes: int, digits: int = 2) -> str:
    """'12.34 GiB'."""
    return f"{gib(n_bytes):,.{digits}f} GiB"


def fmt_count(n: int) -> str:
    """Human count: 8.03B, 41.9M, 20.5K."""
    for bound, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= bound:
            return f"{n / bound:.3g}{suffix}"
    return str(n)


def fmt_flops(flops: float) -> str:
    """'1.23e14 FLOP' style, compact."""
    return f"{flops:.3e}"
