"""The roofline step time on the fast path: the recorded step's kernels as polynomials in (B, T, r).

`_Structure` (replay.py) runs the symbolic step once on encoded sizes with a FlopCount attached;
every kernel it notes (engine/ops.py: GEMM shapes, fused attention FLOPs and bytes, memory-bound
bytes) is then a polynomial in the micro-batch B, the sequence length T and the LoRA rank r, read
back digit by digit as the memory sizes are. At a concrete (B, T, r) the polynomials give exactly
the KernelTable that estimate() builds from the concrete step, and engine/roofline.py's
`step_time` turns both into the same float, bit for bit.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..engine import roofline
from ..engine.sim import rounded


def split_eval(coefs: Sequence[int], mono: tuple[int, ...]) -> tuple[int, int]:
    """(B-free part, coefficient of B) of a replay polynomial at (T, r): `coefs` holds 6 coefficients of the
    monomials `mono` = (1, T, T^2, r, T r, T^2 r) and 6 more for the same monomials times B."""
    d = e = 0
    for i in range(6):
        c = coefs[i]
        if c:
            d += c * mono[i]
        c = coefs[i + 6]
        if c:
            e += c * mono[i]
    return d, e


class KernelPolys:
    """A micro-batch's kernels as polynomials (12 coefficients each, encoding._POS order)."""

    def __init__(self, kernels: Sequence[tuple[Any, ...]], decode: Any) -> None:
        """`decode(value) -> coefficients` raises encoding._NotExact for a value that is not a polynomial."""
        mm: dict[tuple[Any, ...], int] = {}
        attn: dict[tuple[Any, ...], int] = {}
        streams: dict[tuple[str, str], int] = {}
        for k in kernels:
            kind = k[0]
            if kind == "mm":
                key = (k[1], k[2], k[3], k[4], k[5], k[6])
                mm[key] = mm.get(key, 0) + 1
            elif kind == "attn":
                attn[k[1:]] = attn.get(k[1:], 0) + 1
            else:
                key2 = (k[1], kind)
                streams[key2] = streams.get(key2, 0) + k[2]  # a sum of polynomials is the polynomial of the sum
        self.launches = len(kernels)
        self.mm = [(phase, decode(m), decode(n), decode(kk), dt, decode(b), c)
                   for (phase, m, n, kk, dt, b), c in mm.items()]
        self.attn = [(phase, decode(f), decode(nb), dt, c) for (phase, f, nb, dt), c in attn.items()]
        self.streams = [(key, decode(v)) for key, v in streams.items()]

    @classmethod
    def from_table(cls, table: roofline.KernelTable, decode: Any) -> "KernelPolys":
        """The same from an aggregated KernelTable of encoded sizes (engine/depth.py's extrapolated counts)."""
        self = cls.__new__(cls)
        self.launches = table.launches
        self.mm = [(phase, decode(m), decode(n), decode(kk), dt, decode(b), c)
                   for (phase, m, n, kk, dt, b), c in table.matmuls.items()]
        self.attn = [(phase, decode(f), decode(nb), dt, c) for (phase, f, nb, dt), c in table.attention.items()]
        self.streams = [(key, decode(v)) for key, v in table.streams.items()]
        return self

    def table_at(self, B: int, T: int, r: int) -> roofline.KernelTable:
        mono = (1, T, T * T, r, T * r, T * T * r)

        def ev(coefs: Sequence[int]) -> int:
            d, e = split_eval(coefs, mono)
            return d + B * e

        mm: dict[tuple[Any, ...], int] = {}
        for phase, m, n, k, dt, b, c in self.mm:
            key = (phase, ev(m), ev(n), ev(k), dt, ev(b))
            mm[key] = mm.get(key, 0) + c
        attn: dict[tuple[Any, ...], int] = {}
        for phase, f, nb, dt, c in self.attn:
            key = (phase, ev(f), ev(nb), dt)
            attn[key] = attn.get(key, 0) + c
        streams = {key: ev(v) for key, v in self.streams}
        return roofline.KernelTable(mm, attn, streams, self.launches)


def micro_batch_time(s: Any, B: int, T: int, r: int, rates: roofline.Rates) -> tuple[roofline.KernelTable, Any]:
    """(KernelTable, roofline.micro_batch_seconds) of one micro-batch of recorded structure `s`
    (replay._Structure), memoized per point and GPU in the structure."""
    key = (B, T, r, rates)
    got = s._micro.get(key)
    if got is None:
        table = s.kernels.table_at(B, T, r)
        got = s._micro[key] = (table, roofline.micro_batch_seconds(table, rates))
    return got


def paged_bytes(s: Any, optimizer: str, r: int) -> int:
    """Optimizer state in CUDA unified memory (paged optimizers), outside the allocated peak."""
    from ..engine.optimizers import tensor_cost

    if not optimizer.startswith("paged"):
        return 0
    key = ("paged " + optimizer, r)
    got = s._state.get(key)
    if got is None:
        got = s._state[key] = sum(tensor_cost(optimizer, "fused", n, dtype, None).paged_bytes
                                  for n, dtype in s.trainables_at(r))
    return got


def trainable_bytes(s: Any, r: int) -> int:
    """Trainable parameters' bytes as allocated, at rank r: estimate()'s StepMemory.trainable_bytes,
    which the roofline's optimizer update reads."""
    key = ("trainable bytes", r)
    got = s._state.get(key)
    if got is None:
        got = s._state[key] = sum(rounded(dt.bytes_for(n)) for n, dt in s.trainables_at(r))
    return got
