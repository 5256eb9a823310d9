"""Storage data types, as widths in bits.

A 4-bit weight is half a byte: byte counts are always computed from bits over a whole tensor
(`bytes_for(numel)`), never from a per-element byte size that would round 4 bits to 0 or 1 byte.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """A storage type. `bits` is the width of one element."""

    name: str
    bits: int

    def bytes_for(self, numel: int) -> int:
        """Bytes to store `numel` elements, rounded up to a whole byte (bitsandbytes packs 2 per byte)."""
        return (numel * self.bits + 7) // 8

    def __str__(self) -> str:
        return self.name


FP32 = DType("fp32", 32)
FP16 = DType("fp16", 16)
BF16 = DType("bf16", 16)
INT8 = DType("int8", 8)
UINT8 = DType("uint8", 8)
INT64 = DType("int64", 64)
BOOL = DType("bool", 8)  # torch stores bool as one byte per element
NF4 = DType("nf4", 4)
FP4 = DType("fp4", 4)

BY_NAME = {d.name: d for d in (FP32, FP16, BF16, INT8, UINT8, INT64, BOOL, NF4, FP4)}
