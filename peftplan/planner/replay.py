"""The exact fast path: one symbolic step recorded per structure, replayed for every batch, sequence and rank.

`estimate()` runs the symbolic step (engine/step.py) for one configuration: ~20-70 ms for an 8B
model. The planner runs that same step once per *structure* (a method with its non-rank
options, checkpointing, attention, precision) with the micro-batch B, the sequence length T and
the LoRA rank r replaced by huge powers of two (T = 2**64, r = 2**256, B = 2**576). Python ints
are exact, so every size the engine computes comes out as a polynomial in (B, T, r) written in
base 2**64, and its coefficients can be read back digit by digit. An Allocator subclass records
every allocation, free, add and spike; the running total at every event is then a polynomial
with non-negative coefficients, and the peak at a concrete (B, T, r) is the largest of them.
Only local maxima of the timeline can be the peak (allocations only add, frees only subtract), and
a candidate that another one covers everywhere can never be the largest: a few dozen to a few
hundred candidates remain, evaluated in microseconds.

The caching allocator rounds every allocation up to 512 bytes, which is not a polynomial. Each
size-dependent tensor is therefore tagged, in the digits above the polynomial, with its rounding
class (its numel polynomial and element width): every total carries how many tensors of each class
it holds, including totals the engine derives from the allocator (a checkpointed layer's
recompute spike), and the concrete rounding of each class is added back at evaluation time.
The optimizer adds its state once, at the first `step()`, and keeps it: the state of adamw,
adamw-8bit and paged-adamw-8bit is recomputed with engine/optimizers.py's `tensor_cost` over the
recorded trainable tensors (checked against the recorded AdamW state) and added to the candidates
after that point. FLOPs come from `step_flops` run on the same encoded sizes (checked against
`step_flops` at concrete sizes).

Every check that fails (a size that is not a polynomial of the expected degrees, a FLOP
polynomial that disagrees, an optimizer step with scratch memory, an optimizer or implementation
the recording does not cover) raises _NotExact, and the planner falls back to estimate() for that structure.

The encoding's constants and decoding live in encoding.py, the recording of the step in record.py; this module
turns a recording into candidates for the peak (`_pareto`) and evaluates them (`_Structure`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..arch import ModelArch
from ..engine.sim import ALLOC_BLOCK
from ..estimate import Params, count_params
from ..methods import MethodError, get_method
from ..training import Training, TrainingError
from .encoding import _DIGIT, _ENC_B, _ENC_R, _ENC_T, _NPOLY, _POS, _digits, _guard, _monomials, _NotExact, _poly
from .record import _record_step
from .replay_time import KernelPolys, split_eval as _split_eval
from .space import Variant


@dataclass(frozen=True)
class _Candidate:
    poly: tuple[int, ...]  # 12 coefficients
    counts: tuple[tuple[int, int], ...]  # (rounding class, tensors of it) with a non-zero count


def _pareto(cands: list[int], ndigits: int, against: list[_Candidate] | None = None) -> list[_Candidate]:
    """The candidates that can be the maximum at some (B, T, r): the others are dropped when one
    kept candidate is at least as large everywhere.

    Candidate f covers c everywhere when every polynomial coefficient of f is >= c's (monomials
    are >= 1 for B, T, r >= 1) and that excess, at its smallest (B = T = r = 1: the sum of the
    coefficient differences), pays for the rounding c can have in excess of f: at most 511 bytes
    per tensor of a class that c holds more of. Candidates covered by one in `against` are
    dropped too (the running totals after the optimizer state exists cover those before it).
    """
    poly_mask = (1 << (_DIGIT * _NPOLY)) - 1
    guard_all = _guard(ndigits)
    guard = _guard(_NPOLY)

    # A cheap pass on the encoded integers first: neighbours on the timeline often dominate each
    # other digit by digit (a temporary freed, the next one of the same class allocated).
    kept: list[int] = []
    for c in cands:
        while kept and ((c - kept[-1] + guard_all) & guard_all) == guard_all:
            kept.pop()
        if not kept or ((kept[-1] - c + guard_all) & guard_all) != guard_all:
            kept.append(c)
    decoded = []
    for c in set(kept):
        d = _digits(c, ndigits)
        counts = tuple((i, n) for i, n in enumerate(d[_NPOLY:]) if n)
        poly = _poly(d)
        decoded.append((c & poly_mask, sum(poly), sum(n for _, n in counts), poly, counts))
    decoded.sort(key=lambda x: (x[0], x[2]), reverse=True)  # a covering candidate comes first

    def entry(poly: tuple[int, ...], counts: tuple[tuple[int, int], ...], cand: _Candidate):  # type: ignore[no-untyped-def]
        p = sum(c << (_DIGIT * pos) for pos, c in zip(_POS, poly))
        return [p, sum(poly), dict(counts), cand]

    front: list[list[Any]] = [entry(a.poly, a.counts, a) for a in against or ()]
    out: list[_Candidate] = []
    for p, total, _, poly, counts in decoded:
        for k, f in enumerate(front):
            fp, ftotal, fcounts, _ = f
            if ((fp - p + guard) & guard) != guard:
                continue
            deficit = 0
            for i, n in counts:
                m = fcounts.get(i, 0)
                if n > m:
                    deficit += n - m
            if ftotal - total >= (ALLOC_BLOCK - 1) * deficit:
                if k:  # move to front: the next candidates in order are often covered by it too
                    front.insert(0, front.pop(k))
                break
        else:
            cand = _Candidate(poly, counts)
            front.append([p, total, dict(counts), cand])
            out.append(cand)
    return out


def _with_rank(model: Any, rank: int) -> Any:
    blocks = tuple(
        replace(tb, linears=tuple(replace(t, lora_rank=rank) if t.lora_rank else t for t in tb.linears))
        for tb in model.blocks
    )
    return replace(model, blocks=blocks)


def _flop_fields(fl: Any) -> tuple[int, int, int, int]:
    return (fl.forward, fl.backward_input, fl.backward_weight, fl.recompute)


class _Structure:
    """One recorded symbolic step: method + non-rank options, checkpointing, attention, precision."""

    point_wise = False  # recorded once on encoded sizes (replay_point.py's structures are recorded per point)

    def __init__(self, arch: ModelArch, variant: Variant, ranks: tuple[int | None, ...], grad_ckpt: bool,
                 attention: str, precision: str, accumulate: bool = False) -> None:
        """`accumulate`: record the step with gradient accumulation (two micro-batches, the second
        with the first's gradients alive, as engine/step.py simulates any grad_accum >= 2)."""
        self.accumulate = accumulate
        self.arch = arch
        self.variant = variant
        self.attention = attention
        self.precision = precision
        self.params: dict[int | None, Params] = {}
        self.errors: dict[int | None, str] = {}
        self.exact = True
        self.reason = ""
        self._parts: dict[tuple[int, int], Any] = {}
        self._peaks: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._state: dict[tuple[str, int], int] = {}
        self._micro: dict[tuple[Any, ...], Any] = {}
        base_training = Training(grad_ckpt=grad_ckpt, attention=attention, precision=precision)  # type: ignore[arg-type]
        models: dict[int | None, Any] = {}
        spec = get_method(variant.method)
        for r in ranks:
            opts = variant.opts()
            if r is not None:
                opts["rank"] = r
            try:
                model = spec.build(arch, spec.make_options(opts), base_training)
            except (MethodError, TrainingError) as exc:
                self.errors[r] = str(exc).splitlines()[0]
                continue
            models[r] = model
            self.params[r] = count_params(model)
        self.models = models
        self.grad_ckpt = grad_ckpt
        if not models:
            self.exact = False
            self.reason = "no configuration can be built"
            return
        base = next(iter(models.values()))
        self.grad_ckpt = grad_ckpt or base.forces_grad_ckpt
        # The structure stands for every micro-batch and sequence length: the method must not
        # build a different model for another one.
        r0 = next(iter(models))
        other = dict(variant.opts(), **({"rank": r0} if r0 is not None else {}))
        if spec.build(arch, spec.make_options(other), base_training.with_(micro_batch=3, seq_len=777)) != base:
            self.exact = False
            self.reason = "the method builds a model that depends on the batch or sequence"
            return
        self.symbolic_rank = any(t.lora_rank for tb in base.blocks for t in tb.linears)
        try:
            self._build(base)
        except _NotExact as exc:
            self.exact = False
            self.reason = str(exc)

    def __getstate__(self) -> dict[str, Any]:
        """What evaluation needs: the candidates, polynomials, params and errors; not the model
        objects, the architecture (set again on load) or the per-point memo tables."""
        state = dict(self.__dict__)
        state["models"] = {r: None for r in self.models}  # only membership is used after recording
        state["arch"] = None
        state["_parts"], state["_peaks"], state["_micro"] = {}, {}, {}
        return state

    # -- recording --------------------------------------------------------------------------
    def _build(self, base: Any) -> None:
        from ..engine.flops import step_flops
        from ..engine.ops import FlopCount

        if self.symbolic_rank:
            for r, m in self.models.items():
                if r is None or _with_rank(base, r) != m:
                    raise _NotExact("the rank changes more than the LoRA shapes")
            sym = _with_rank(base, _ENC_R)
        else:
            sym = base
        enc = Training(micro_batch=_ENC_B, seq_len=_ENC_T, grad_accum=1, grad_ckpt=self.grad_ckpt,
                       attention=self.attention, precision=self.precision,  # type: ignore[arg-type]
                       optimizer="adamw", optimizer_impl="fused")
        # one symbolic run gives the memory events and, as for estimate(), the first micro-batch's
        # FLOPs and kernels (simulate_step's flop_counter)
        counted = FlopCount()
        rec = _record_step(sym, enc.with_(grad_accum=2) if self.accumulate else enc, counted)
        ndig = _NPOLY + len(rec.classes)
        pre, post, state_val, trainables = rec.pre, rec.post, rec.state, rec.trainables
        self.post = _pareto(post, ndig)
        # The optimizer state only adds: a running total seen again after it exists (the second
        # step repeats the first) cannot be the peak before it.
        seen = set(post)
        self.pre = _pareto([c for c in pre if c not in seen], ndig, against=self.post)
        self.state_poly = _poly(_digits(state_val, _NPOLY))
        self.classes = [(_poly(_digits(numel, _NPOLY)), bits) for (numel, bits), _ in
                        sorted(rec.classes.items(), key=lambda kv: kv[1])]
        self.trainables = [(_poly(_digits(n, _NPOLY)), dt) for n, dt in trainables]
        for coefs, _ in self.trainables:
            if any(coefs[i] for i in (1, 2, 4, 5, 6, 7, 8, 9, 10, 11)):
                raise _NotExact("a trainable tensor's size depends on the batch or sequence")
        decode = lambda v: _poly(_digits(v, _NPOLY))  # noqa: E731
        table = getattr(counted, "table", None)
        self.kernels = (KernelPolys.from_table(table, decode) if table is not None
                        else KernelPolys(counted.kernels, decode))
        fl = step_flops(sym, enc, counted=counted)
        self.flops = tuple(_poly(_digits(v, _NPOLY))
                           for v in (fl.forward, fl.backward_input, fl.backward_weight, fl.recompute))
        # The FLOP polynomial must match step_flops at a concrete point, (B, T) = (3, 320) at the
        # largest rank (the comparisons with estimate() in tests/test_planner.py cover other points and
        # ranks): it catches a count that is not a polynomial (a sliding window's min(T, W)). A recording
        # from shallow runs is checked on the one-copy shallow model, whose polynomial it recorded too
        # (the extrapolation in depth of the counts is exact by construction, tests/test_depth_extrapolation.py);
        # otherwise the full model is run (~0.5 s on an 8B model).
        r, m = list(self.models.items())[-1]
        point = Training(micro_batch=3, seq_len=320, grad_ckpt=self.grad_ckpt, attention=self.attention,
                         precision=self.precision)  # type: ignore[arg-type]
        if rec.shallow is not None:
            from ..engine.depth import shallow_model

            shape, one_copy = rec.shallow
            polys = [_poly(_digits(v, _NPOLY)) for v in _flop_fields(step_flops(sym, enc, counted=one_copy))]
            mono = _monomials(320, r or 0)
            expected = tuple(d + 3 * e for d, e in (_split_eval(c, mono) for c in polys))
            direct = step_flops(shallow_model(m, shape, 1), point)
        else:
            expected = self.flops_at(3, 320, r or 0)
            direct = step_flops(m, point)
        if expected != _flop_fields(direct):
            raise _NotExact("the FLOP polynomial disagrees with step_flops")
        for r in self.models:
            self.state_bytes("adamw", r or 0)  # checks the recomputed state against the recorded one

    # -- evaluation -------------------------------------------------------------------------
    def flops_at(self, B: int, T: int, r: int) -> tuple[int, int, int, int]:
        mono = _monomials(T, r)
        out = []
        for coefs in self.flops:
            d, e = _split_eval(coefs, mono)
            out.append(d + B * e)
        return tuple(out)  # type: ignore[return-value]

    def trainables_at(self, r: int) -> list[tuple[int, Any]]:
        """(numel, dtype) of every trainable tensor at rank r."""
        return [(c[0] + c[3] * r, dtype) for c, dtype in self.trainables]

    def state_bytes(self, optimizer: str, r: int) -> int:
        """Optimizer state on the device: engine/optimizers.py tensor_cost over the trainable tensors."""
        key = (optimizer, r)
        got = self._state.get(key)
        if got is None:
            got = state_over(optimizer, self.trainables_at(r))
            if optimizer == "adamw":
                d, e = _split_eval(self.state_poly, _monomials(0, r))
                if e or d != got:
                    raise _NotExact("the recomputed optimizer state disagrees with the recorded step")
            self._state[key] = got
        return got

    def _at(self, T: int, r: int):  # type: ignore[no-untyped-def]
        """Per (T, r): each candidate as (B-free bytes, bytes per B, class counts); each class's
        bytes (B-free, per B)."""
        got = self._parts.get((T, r))
        if got is None:
            mono = _monomials(T, r)
            pre = [(*_split_eval(c.poly, mono), c.counts) for c in self.pre]
            post = [(*_split_eval(c.poly, mono), c.counts) for c in self.post]
            classes = []
            for coefs, bits in self.classes:
                d, e = _split_eval(coefs, mono)
                classes.append((d * bits // 8, e * bits // 8))
            got = (pre, post, classes)
            self._parts[(T, r)] = got
        return got

    def peak_at(self, B: int, T: int, r: int, optimizer: str) -> int:
        """Exactly the engine's peak allocated bytes for this micro-batch, sequence, rank and optimizer."""
        state = self.state_bytes(optimizer, r)
        key = (B, T, r)
        got = self._peaks.get(key)
        if got is None:
            got = self._peaks[key] = self._base_peaks(B, T, r)
        before, after = got
        return max(before, after + state)

    def _base_peaks(self, B: int, T: int, r: int) -> tuple[int, int]:
        """Largest running total before the optimizer state exists, and after it (without it)."""
        pre, post, classes = self._at(T, r)
        # bytes the caching allocator adds when it rounds one tensor of each class up to 512
        slack = {i: (-(d + B * e)) % ALLOC_BLOCK for i, (d, e) in enumerate(classes)}
        slack = {i: v for i, v in slack.items() if v}
        out = []
        for cands in (pre, post):
            best = 0
            for d, e, counts in cands:
                v = d + B * e
                if slack:
                    for i, n in counts:
                        extra = slack.get(i)
                        if extra:
                            v += n * extra
                if v > best:
                    best = v
            out.append(best)
        return out[0], out[1]


_FAST_OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")


def state_over(optimizer: str, trainables: list[tuple[int, Any]]) -> int:
    """Device bytes of `optimizer`'s state (fused implementation) over (numel, dtype) trainable tensors
    (engine/optimizers.py tensor_cost), or _NotExact for an optimizer the fast path does not take."""
    from ..engine.optimizers import tensor_cost

    if optimizer not in _FAST_OPTIMIZERS:
        raise _NotExact(f"optimizer {optimizer} is not on the fast path")
    return sum(tensor_cost(optimizer, "fused", n, dtype, None).state_bytes for n, dtype in trainables)
