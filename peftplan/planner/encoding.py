"""The planner's encoding of sizes as polynomials in (B, T, r): constants and decoding (replay.py's docstring).

A size simulated with T = 2**64, r = 2**256 and B = 2**576 is a base-2**64 number whose digits are the
coefficients of its polynomial; the digits above the polynomial's (_NPOLY on) count the tensors of each
rounding class (record.py). Every decoding that meets something else raises _NotExact: the planner then
falls back to estimate() for that structure or point.
"""

from __future__ import annotations

import sys
from array import array
from typing import Sequence

_DIGIT = 64
_Q = 1 << _DIGIT
# Monomial B^i T^j r^k sits at digit j + 4k + 9i (i, k <= 1, j <= 2). The digits in between
# (T^3 at 3, r T^3 at 7, r^2 at 8, ...) are never used by a valid size: a size of a higher degree
# than the engine is known to produce lands there (or beyond) and is refused, not misread.
_NPOLY = 17
_ENC_T = _Q
_ENC_R = _Q ** 4
_ENC_B = _Q ** 9
_POS = (0, 1, 2, 4, 5, 6, 9, 10, 11, 13, 14, 15)  # 1, T, T^2, r, rT, rT^2, then the same times B
_COEF_MAX = 1 << 62  # digits stay below this so the guard-bit dominance test is exact


class _NotExact(Exception):
    """The fast path cannot vouch for this structure/point: use estimate() directly."""


def _digits(n: int, ndigits: int) -> tuple[int, ...]:
    """Base-2**64 digits of a non-negative encoded value (all below 2**62), or _NotExact."""
    if n < 0 or n >> (_DIGIT * ndigits):
        raise _NotExact("a size is not a polynomial of the expected degrees")
    out = array("Q", n.to_bytes(8 * ndigits, "little"))
    if sys.byteorder != "little":  # pragma: no cover
        out.byteswap()
    if max(out) >= _COEF_MAX:
        raise _NotExact("a size is not a polynomial with non-negative coefficients")
    return tuple(out)


def _guard(ndigits: int) -> int:
    return sum((1 << 63) << (_DIGIT * i) for i in range(ndigits))


def _poly(digits: Sequence[int]) -> tuple[int, ...]:
    """The 12 coefficients of a decoded size (see _POS), or _NotExact for an unexpected monomial."""
    if any(digits[i] for i in range(_NPOLY) if i not in _POS):
        raise _NotExact("a size has a monomial of a degree the planner does not expect")
    return tuple(digits[i] for i in _POS)


def _monomials(T: int, r: int) -> tuple[int, ...]:
    """Values of 1, T, T^2, r, rT, rT^2: the B-free half of _POS (the B half is the same times B)."""
    return (1, T, T * T, r, T * r, T * T * r)



_NEW, _FREE, _ADD, _SPIKE = 0, 1, 2, 3  # the kinds of a recorded event (record.py)
