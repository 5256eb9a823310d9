"""`plan(arch, gpu)`: which fine-tuning setups fit on this GPU, ranked by throughput.

The search space is every method that applies (full, LoRA, QLoRA NF4 with and without double
quantization, DoRA, LISA, adapters, prompt / prefix / P-tuning, IA3, BitFit) x LoRA rank
{8, 16, 64} x micro-batch {1, 2, 4, 8, 16} x gradient checkpointing {on, off} x attention
{sdpa, eager} x optimizer {adamw, adamw-8bit, paged-adamw-8bit}, in the GPU's mixed precision
(bf16-mixed, or fp16-mixed where the GPU has no bf16). Configurations that fit
(`Estimate.fits`) are ranked by tokens per second.

Speed, and why it is exact
--------------------------
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
other than fused AdamW variants) sends that structure to `estimate()` directly. `plan()`
re-estimates the first row it shows with `estimate()` and, should they ever disagree, evaluates
that structure directly from then on; tests/test_planner.py compares both paths on a sample.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from array import array
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from fractions import Fraction
from typing import Any, Iterable, Sequence

from .arch import ModelArch
from .catalog import GPU, gpu_catalog
from .engine.sim import ALLOC_BLOCK
from .estimate import Estimate, Params, count_params, estimate, overheads
from .methods import MethodError, get_method, method_names
from .training import DEFAULT_SEQ_LEN, SHARDS, Training, TrainingError
from .units import fmt_count, fmt_gib

DEFAULT_METHODS: tuple[str, ...] = (
    "full", "lora", "qlora", "dora", "lisa", "adapter", "prompt", "prefix", "ptuning", "ia3", "bitfit",
)
RANKS: tuple[int, ...] = (8, 16, 64)
MICRO_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
GRAD_CKPT: tuple[bool, ...] = (False, True)
ATTENTIONS: tuple[str, ...] = ("sdpa", "eager")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-8bit", "paged-adamw-8bit")
SHARD_SEARCH: tuple[str, ...] = ("ddp", "zero2", "zero3")  # searched with n_gpus > 1 once estimate() shards
SEQ_SWEEP: tuple[int, ...] = tuple(2 ** k for k in range(8, 18))  # 256 .. 131072
MAX_MICRO_BATCH_SEARCH = 4096  # upper end of the exact largest-micro-batch search
LORA_LIKE = ("lora", "qlora", "dora")
# Among configurations with the same tokens/s, prefer the exact optimizer over quantized states.
_OPTIMIZER_PREFERENCE = {"adamw": 0, "adamw-8bit": 1, "paged-adamw-8bit": 2}


# ---------------------------------------------------------------------------------------------
# What is searched
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A method with the options the planner sets (rank, double quantization)."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @cached_property
    def rank(self) -> int | None:
        return self.opts().get("rank")

    @property
    def label(self) -> str:
        o = self.opts()
        parts = [self.method]
        if "rank" in o:
            parts.append(f"r{o['rank']}")
        if self.method == "qlora":
            parts.append(str(o.get("quant", "nf4")) + ("+dq" if o.get("double_quant", True) else ""))
        return " ".join(parts)

    @cached_property
    def base(self) -> "Variant":
        """The variant without its rank (what a recorded structure stands for)."""
        return Variant(self.method, tuple((k, v) for k, v in self.options if k != "rank"))


def variants_for(method: str, ranks: Sequence[int] = RANKS) -> list[Variant]:
    if method in ("lora", "dora"):
        return [Variant(method, (("rank", r),)) for r in ranks]
    if method == "qlora":
        return [Variant(method, (("double_quant", dq), ("quant", "nf4"), ("rank", r)))
                for dq in (True, False) for r in ranks]
    return [Variant(method)]


@dataclass(frozen=True)
class PlanConfig:
    variant: Variant
    micro_batch: int
    seq_len: int
    grad_ckpt: bool
    attention: str
    optimizer: str
    precision: str
    n_gpus: int = 1
    shard: str = "none"  # training.SHARDS; "ddp" or a ZeRO/FSDP stage when n_gpus > 1

    @property
    def sharded(self) -> bool:
        return self.n_gpus > 1 or self.shard != "none"

    def training(self) -> Training:
        return Training(micro_batch=self.micro_batch, seq_len=self.seq_len, grad_accum=1, grad_ckpt=self.grad_ckpt,
                        attention=self.attention, precision=self.precision,  # type: ignore[arg-type]
                        optimizer=self.optimizer, optimizer_impl="fused",  # type: ignore[arg-type]
                        n_gpus=self.n_gpus, shard=self.shard)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        return (f"{self.variant.label} · batch {self.micro_batch} · seq {self.seq_len} · "
                f"ckpt {'on' if self.grad_ckpt else 'off'} · {self.attention} · {self.optimizer}"
                + (f" · {self.n_gpus} GPUs {self.shard}" if self.sharded else ""))

    def flags(self) -> str:
        """The `peftplan estimate` flags that reproduce this configuration."""
        o = self.variant.opts()
        out = [f"--method {self.variant.method}"]
        if "rank" in o:
            out.append(f"--rank {o['rank']}")
        if self.variant.method == "qlora":
            out.append(f"--quant {o.get('quant', 'nf4')}")
            out.append("--double-quant" if o.get("double_quant", True) else "--no-double-quant")
        out += [f"--batch {self.micro_batch}", f"--seq {self.seq_len}",
                "--grad-ckpt" if self.grad_ckpt else "--no-grad-ckpt", f"--attn {self.attention}",
                f"--precision {self.precision}", f"--optimizer {self.optimizer}"]
        if self.sharded:
            out += [f"--gpus {self.n_gpus}", f"--shard {self.shard}"]
        return " ".join(out)


@dataclass(frozen=True)
class PlanRow:
    config: PlanConfig
    peak_allocated_bytes: int
    device_total_bytes: int
    gpu_memory_bytes: int
    fits: bool
    headroom_bytes: int
    flops_per_step: int
    step_time_s: float | None
    tokens_per_s: float | None
    trainable_params: int
    total_params: int
    train_time_s: float | None = None
    train_cost_usd: float | None = None
    path: str = "fast"  # "fast" (exact polynomial path) or "direct" (estimate() call)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": c.variant.method, "variant": c.variant.label, "options": c.variant.opts(),
            "micro_batch": c.micro_batch, "seq_len": c.seq_len, "grad_ckpt": c.grad_ckpt,
            "attention": c.attention, "optimizer": c.optimizer, "precision": c.precision,
            "n_gpus": c.n_gpus, "shard": c.shard,
            "peak_allocated_bytes": self.peak_allocated_bytes, "device_total_bytes": self.device_total_bytes,
            "gpu_memory_bytes": self.gpu_memory_bytes, "fits": self.fits, "headroom_bytes": self.headroom_bytes,
            "flops_per_step": self.flops_per_step, "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s, "trainable_params": self.trainable_params,
            "total_params": self.total_params, "train_time_s": self.train_time_s,
            "train_cost_usd": self.train_cost_usd, "path": self.path, "flags": c.flags(),
        }


@dataclass(frozen=True)
class MethodLimit:
    """For one method: the largest sequence length (micro-batch 1) and micro-batch (at the plan's
    sequence length) that fit with any searched setting, and the setting that achieves each."""

    method: str
    max_seq_len: int | None
    max_seq_row: PlanRow | None
    max_micro_batch: int | None
    max_micro_batch_row: PlanRow | None
    micro_batch_searched_to: int
    seq_limited_by_context: bool = False


@dataclass
class PlanStats:
    configs_evaluated: int = 0
    fast: int = 0
    direct: int = 0
    fit_checks: int = 0  # exact fits / does-not-fit verdicts (the searches for the largest seq and batch)
    structures_recorded: int = 0
    structures_loaded: int = 0  # from the disk cache
    seconds: float = 0.0

    @property
    def configs_per_s(self) -> float:
        """Configurations with every number exact (rows) per second of plan()."""
        return self.configs_evaluated / self.seconds if self.seconds > 0 else float("inf")

    @property
    def checks_per_s(self) -> float:
        """Rows and fit verdicts together per second of plan()."""
        return (self.configs_evaluated + self.fit_checks) / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class PlanResult:
    model: str
    gpu: GPU
    n_gpus: int
    seq_len: int
    tokens: int | None
    price_per_hour: float | None
    precision: str
    rows: list[PlanRow]  # fitting configurations, best first
    closest: list[PlanRow]  # configurations that do not fit, smallest device memory first
    limits: list[MethodLimit]
    skipped: list[tuple[str, str]]  # (what, why)
    explanation: str
    notes: list[str]
    suggestion: str | None
    stats: PlanStats
    best_estimate: Estimate | None = None

    @property
    def best(self) -> PlanRow | None:
        return self.rows[0] if self.rows else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "gpu": self.gpu.name, "gpu_memory_bytes": self.gpu.memory_bytes,
            "n_gpus": self.n_gpus, "seq_len": self.seq_len, "tokens": self.tokens,
            "price_per_hour": self.price_per_hour, "precision": self.precision,
            "fits": [r.to_dict() for r in self.rows], "closest": [r.to_dict() for r in self.closest[:20]],
            "limits": [{
                "method": lim.method, "max_seq_len": lim.max_seq_len,
                "max_seq_config": lim.max_seq_row.to_dict() if lim.max_seq_row else None,
                "max_micro_batch": lim.max_micro_batch,
                "max_micro_batch_config": lim.max_micro_batch_row.to_dict() if lim.max_micro_batch_row else None,
                "micro_batch_searched_to": lim.micro_batch_searched_to,
                "seq_limited_by_context": lim.seq_limited_by_context,
            } for lim in self.limits],
            "skipped": [{"what": w, "why": y} for w, y in self.skipped],
            "explanation": self.explanation, "notes": self.notes, "suggestion": self.suggestion,
            "stats": dataclasses.asdict(self.stats) | {"configs_per_s": self.stats.configs_per_s,
                                                       "checks_per_s": self.stats.checks_per_s},
        }


# ---------------------------------------------------------------------------------------------
# The exact fast path: one recorded symbolic step per structure
# ---------------------------------------------------------------------------------------------

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


def _split_eval(coefs: Sequence[int], mono: tuple[int, ...]) -> tuple[int, int]:
    """(B-free part, coefficient of B) of a polynomial at (T, r)."""
    d = e = 0
    for i in range(6):
        c = coefs[i]
        if c:
            d += c * mono[i]
        c = coefs[i + 6]
        if c:
            e += c * mono[i]
    return d, e


_NEW, _FREE, _ADD, _SPIKE = 0, 1, 2, 3
_record_lock = threading.Lock()


@dataclass
class _Recording:
    events: list[tuple[Any, ...]]
    classes: dict[tuple[int, int], int]  # (encoded numel, bits) -> rounding class index


def _record_step(model: Any, training: Training) -> _Recording:
    """Run engine.step.simulate_step on encoded sizes with an allocator that records every event.

    A size-dependent tensor is given its exact (unrounded) encoded byte count plus a 1 in the digit
    of its *rounding class* (its numel polynomial and width): every total the engine computes from
    allocator totals (e.g. a checkpointed layer's recompute spike) then also counts how many
    tensors of each class it holds, which is what the 512-byte rounding at concrete sizes needs.
    """
    import peftplan.engine.step as step_mod
    from .engine.sim import Allocator

    events: list[tuple[Any, ...]] = []
    classes: dict[tuple[int, int], int] = {}
    owner = threading.get_ident()

    class _Recorder(Allocator):
        def __init__(self) -> None:
            super().__init__()
            self._in_spike = False

        def _note(self) -> None:  # peaks of encoded sizes mean nothing; the planner computes its own
            pass

        def new(self, numel, dtype, category, requires_grad=False, label="", count=1):  # type: ignore[no-untyped-def]
            t = super().new(numel, dtype, category, requires_grad, label, count)
            if numel >= _Q:
                bits = dtype.bits
                if bits % 8:
                    raise _NotExact("a sub-byte tensor's size depends on the batch")
                key = (numel, bits)
                cls = classes.get(key)
                if cls is None:
                    cls = classes[key] = len(classes)
                exact = numel * bits // 8 * count + (count << (_DIGIT * (_NPOLY + cls)))
                delta = exact - t.nbytes
                t.nbytes = exact
                self.total += delta
                self.by_category[category] += delta
            events.append((_NEW, t, category))
            return t

        def release(self, t):  # type: ignore[no-untyped-def]
            if t is None or not t.alive:
                return
            super().release(t)
            if not t.alive:
                events.append((_FREE, t))

        def add_bytes(self, nbytes, category):  # type: ignore[no-untyped-def]
            super().add_bytes(nbytes, category)
            if not self._in_spike:
                events.append((_ADD, nbytes, category))

        def spike(self, nbytes, category="temporaries"):  # type: ignore[no-untyped-def]
            self._in_spike = True
            try:
                super().spike(nbytes, category)
            finally:
                self._in_spike = False
            events.append((_SPIKE, nbytes, self.phase))

    def factory() -> Allocator:
        # Only this thread's simulation records; any other thread keeps the plain allocator.
        return _Recorder() if threading.get_ident() == owner else Allocator()

    if not isinstance(getattr(step_mod, "Allocator", None), type):
        raise _NotExact("engine/step.py no longer builds its allocator as `Allocator()`")
    with _record_lock:
        saved = step_mod.Allocator
        step_mod.Allocator = factory  # type: ignore[assignment]
        try:
            step_mod.simulate_step(model, training)
        finally:
            step_mod.Allocator = saved  # type: ignore[assignment]
    return _Recording(events, classes)


def _timeline(events: list[tuple[Any, ...]]):  # type: ignore[no-untyped-def]
    """Candidates for the peak before / after the optimizer state appears, the state, the trainables.

    Allocations only add and frees only subtract, so the running total can only peak at the last
    event before a free, at a spike, or at the end: those are the candidates. The optimizer
    state's own add is left out of the running total (the caller adds the state of the optimizer
    it evaluates).
    """
    cur = 0
    rising = False
    pre: list[int] = []
    post: list[int] = []
    state_val: int | None = None
    trainables: list[tuple[int, Any]] = []
    for ev in events:
        kind = ev[0]
        if kind == _NEW:
            t = ev[1]
            if state_val is None and ev[2] == "trainable_params":
                trainables.append((t.numel, t.dtype))
            cur += t.nbytes
            rising = True
        elif kind == _FREE:
            if rising:
                (post if state_val is not None else pre).append(cur)
            cur -= ev[1].nbytes
            rising = False
        elif kind == _ADD:
            if ev[2] == "optimizer_state":
                if state_val is not None:
                    raise _NotExact("optimizer state added twice")
                state_val = ev[1]
                continue
            cur += ev[1]
            rising = True
        else:
            _, nbytes, phase = ev
            if phase.startswith("optimizer") and nbytes:
                raise _NotExact("the optimizer step allocates scratch")
            (post if state_val is not None else pre).append(cur + nbytes)
    (post if state_val is not None else pre).append(cur)
    if state_val is None:
        raise _NotExact("no optimizer state was recorded")
    return pre, post, state_val, trainables


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


class _Structure:
    """One recorded symbolic step: method + non-rank options, checkpointing, attention, precision."""

    def __init__(self, arch: ModelArch, variant: Variant, ranks: tuple[int | None, ...], grad_ckpt: bool,
                 attention: str, precision: str) -> None:
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
        state["_parts"], state["_peaks"] = {}, {}
        return state

    # -- recording --------------------------------------------------------------------------
    def _build(self, base: Any) -> None:
        from .engine.flops import step_flops

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
        rec = _record_step(sym, enc)
        ndig = _NPOLY + len(rec.classes)
        pre, post, state_val, trainables = _timeline(rec.events)
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
        fl = step_flops(sym, enc)
        self.flops = tuple(_poly(_digits(v, _NPOLY))
                           for v in (fl.forward, fl.backward_input, fl.backward_weight, fl.recompute))
        # The FLOP polynomial must match step_flops at concrete points, for every rank.
        for r, m in self.models.items():
            for B, T in ((3, 320), (5, 1000)):
                direct = step_flops(m, Training(micro_batch=B, seq_len=T, grad_ckpt=self.grad_ckpt,
                                                attention=self.attention, precision=self.precision))  # type: ignore[arg-type]
                if self.flops_at(B, T, r or 0) != (direct.forward, direct.backward_input,
                                                   direct.backward_weight, direct.recompute):
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

    def state_bytes(self, optimizer: str, r: int) -> int:
        """Optimizer state on the device: engine/optimizers.py tensor_cost over the trainable tensors."""
        from .engine.optimizers import tensor_cost

        key = (optimizer, r)
        got = self._state.get(key)
        if got is None:
            if optimizer not in _FAST_OPTIMIZERS:
                raise _NotExact(f"optimizer {optimizer} is not on the fast path")
            got = sum(tensor_cost(optimizer, "fused", c[0] + c[3] * r, dtype, None).state_bytes
                      for c, dtype in self.trainables)
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


# ---------------------------------------------------------------------------------------------
# The evaluator: fast path with direct fallback, memoized
# ---------------------------------------------------------------------------------------------

_STRUCT_CACHE: dict[tuple[Any, ...], tuple[ModelArch, _Structure]] = {}
_STRUCT_CACHE_MAX = 1024


def clear_cache() -> None:
    """Forget recorded structures held in this process (the benchmark's cold runs; the disk cache,
    if any, is left alone: point PEFTPLAN_CACHE_DIR at an empty directory for a truly cold run)."""
    _STRUCT_CACHE.clear()


# A recorded structure depends only on the model's architecture, the structure key and the code
# that simulates the step, so it is kept on disk between processes (a second `peftplan plan` for the
# model is warm), keyed by a hash of all of peftplan's source and data files: any change to the
# engine, the methods or the planner makes a new key. PEFTPLAN_CACHE=0 turns it off;
# PEFTPLAN_CACHE_DIR moves it (default $XDG_CACHE_HOME/peftplan or ~/.cache/peftplan).

def _cache_dir():  # type: ignore[no-untyped-def]
    import os
    from pathlib import Path

    if os.environ.get("PEFTPLAN_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    where = os.environ.get("PEFTPLAN_CACHE_DIR")
    if where:
        return Path(where)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftplan"


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """sha256 over every .py and .json file of the installed peftplan package (and the Python version)."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{sys.version_info[:3]} {sys.byteorder} {_DIGIT} {_NPOLY}".encode())
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".json") and f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _disk_path(arch: ModelArch, key: tuple[Any, ...]):  # type: ignore[no-untyped-def]
    import hashlib

    where = _cache_dir()
    if where is None:
        return None
    digest = hashlib.sha256(repr((_code_fingerprint(), arch, key)).encode()).hexdigest()
    return where / "plan" / _code_fingerprint()[:16] / f"{digest}.pickle"


def _disk_load(arch: ModelArch, key: tuple[Any, ...]) -> "_Structure | None":
    import pickle

    try:
        path = _disk_path(arch, key)
        if path is None or not path.is_file():
            return None
        with open(path, "rb") as fh:
            stored_key, s = pickle.load(fh)
        if stored_key != repr((arch, key)) or not isinstance(s, _Structure):
            return None
        s.arch = arch
        return s
    except Exception:  # a corrupt or foreign file: record again
        return None


def _disk_save(arch: ModelArch, key: tuple[Any, ...], s: "_Structure") -> None:
    import os
    import pickle
    import tempfile

    try:
        path = _disk_path(arch, key)
        if path is None:
            return
        if not path.parent.is_dir():  # a new code version: drop the structures of the old ones
            import shutil

            for old in path.parent.parent.glob("*"):
                if old.is_dir() and old.name != path.parent.name:
                    shutil.rmtree(old, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump((repr((arch, key)), s), fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except Exception:
        pass  # read-only home, full disk: the cache is an optimisation only


class Evaluator:
    """Exact estimates of many configurations of one model; `fast=False` calls estimate() for each."""

    def __init__(self, arch: ModelArch, ranks: Sequence[int] = RANKS, fast: bool = True,
                 sharded_fast: bool = False) -> None:
        self.arch = arch
        self.ranks = tuple(ranks)
        self.fast = fast
        # The recorded structures are one GPU's step. A configuration with n_gpus > 1 or a shard
        # takes the fast path only when the caller established that estimate() gives it the one-GPU
        # numbers (sharding_modelled() is False); otherwise it is estimated directly.
        self.sharded_fast = sharded_fast
        self.stats = PlanStats()
        self.alloc_conf = ""  # PYTORCH_CUDA_ALLOC_CONF for every estimate() (Training.alloc_conf)

    def _use_fast(self, s: "_Structure", config: PlanConfig) -> bool:
        return self.fast and s.exact and (self.sharded_fast or not config.sharded)

    def structure(self, variant: Variant, grad_ckpt: bool, attention: str, precision: str) -> _Structure:
        base = variant.base
        ranks: tuple[int | None, ...] = self.ranks if variant.method in LORA_LIKE else (None,)
        key = (id(self.arch), base, ranks, grad_ckpt, attention, precision)
        hit = _STRUCT_CACHE.get(key)
        if hit is not None and hit[0] is self.arch:
            return hit[1]
        if len(_STRUCT_CACHE) >= _STRUCT_CACHE_MAX:
            _STRUCT_CACHE.clear()
        disk_key = (base, ranks, grad_ckpt, attention, precision)
        s = _disk_load(self.arch, disk_key)
        if s is not None:
            self.stats.structures_loaded += 1
        else:
            s = _Structure(self.arch, base, ranks, grad_ckpt, attention, precision)
            if s.models:
                self.stats.structures_recorded += 1
            _disk_save(self.arch, disk_key, s)
        _STRUCT_CACHE[key] = (self.arch, s)
        return s

    def distrust(self, config: PlanConfig) -> None:
        """Evaluate this configuration's structure with estimate() from now on."""
        s = self.structure(config.variant, config.grad_ckpt, config.attention, config.precision)
        s.exact = False
        s.reason = "disagreed with estimate()"

    def _checked(self, config: PlanConfig) -> _Structure:
        s = self.structure(config.variant, config.grad_ckpt, config.attention, config.precision)
        r = config.variant.rank
        if r in s.errors:
            raise MethodError(s.errors[r])
        if r is not None and r not in s.models:
            raise MethodError(f"rank {r} is not among the planner's ranks {self.ranks}")
        return s

    def error(self, config: PlanConfig) -> str | None:
        """Why this configuration cannot be built (MethodError), or None."""
        s = self.structure(config.variant, config.grad_ckpt, config.attention, config.precision)
        return s.errors.get(config.variant.rank)

    def effective(self, config: PlanConfig) -> PlanConfig:
        """The configuration estimate() actually runs (QLoRA's kbit prep forces checkpointing)."""
        s = self.structure(config.variant, config.grad_ckpt, config.attention, config.precision)
        return config if config.grad_ckpt == s.grad_ckpt else replace(config, grad_ckpt=s.grad_ckpt)

    def evaluate(self, config: PlanConfig, gpu: GPU) -> PlanRow:
        """Every number estimate() gives for the planner's columns, exactly."""
        s = self._checked(config)
        self.stats.configs_evaluated += 1
        if self._use_fast(s, config):
            try:
                row = self._fast(s, config, gpu)
                self.stats.fast += 1
                return row
            except _NotExact:
                pass
        self.stats.direct += 1
        return row_from_estimate(config, self.estimate(config, gpu))

    def fits(self, config: PlanConfig, gpu: GPU) -> bool:
        """estimate(...).fits, computing only the peak (the searches for the largest seq and batch)."""
        s = self._checked(config)
        self.stats.fit_checks += 1
        if self._use_fast(s, config):
            try:
                peak = s.peak_at(config.micro_batch, config.seq_len, config.variant.rank or 0, config.optimizer)
                return _device_total(peak) <= gpu.memory_bytes
            except _NotExact:
                pass
        self.stats.direct += 1
        try:
            return self.estimate(config, gpu).fits
        except MethodError:
            return False  # cannot run at all

    def searchable(self, config: PlanConfig) -> bool:
        """Fit verdicts are cheap for any micro-batch here: search beyond the grid."""
        return self._use_fast(self._checked(config), config) and config.optimizer in _FAST_OPTIMIZERS

    def _fast(self, s: _Structure, config: PlanConfig, gpu: GPU) -> PlanRow:
        r = config.variant.rank or 0
        B, T = config.micro_batch, config.seq_len
        peak = s.peak_at(B, T, r, config.optimizer)
        device_total = _device_total(peak)
        flops = sum(s.flops_at(B, T, r))
        # the same float arithmetic as estimate() (grad_accum is 1)
        util = float(overheads()["matmul_utilization"]["value"])
        peak_flops = gpu.peak_for(_compute_dtype(config.precision))
        step_time = tokens_per_s = None
        if peak_flops > 0:
            step_time = flops / (peak_flops * util)
            tokens_per_s = B * T * 1 / step_time
        p = s.params[config.variant.rank]
        cap = gpu.memory_bytes
        if config.grad_ckpt != s.grad_ckpt:
            config = replace(config, grad_ckpt=s.grad_ckpt)
        return PlanRow(config, peak, device_total, cap, device_total <= cap,
                       cap - device_total, flops, step_time, tokens_per_s, p.trainable, p.total, path="fast")

    def estimate(self, config: PlanConfig, gpu: GPU) -> Estimate:
        try:
            training = config.training()
            if self.alloc_conf:
                training = training.with_(alloc_conf=self.alloc_conf)
            return estimate(self.arch, config.variant.method, training, gpu, config.variant.opts())
        except TrainingError as exc:  # e.g. a paged optimizer with sharding: this setup cannot run
            raise MethodError(str(exc).splitlines()[0]) from None

    def fits_on(self, config: PlanConfig, gpu: GPU) -> PlanRow:
        """Evaluate `config` on another GPU (its precision follows that GPU)."""
        return self.evaluate(replace(config, precision=precision_for(gpu)), gpu)


_SHARD_PROBES: dict[tuple[Any, ...], bool] = {}


def sharding_modelled(arch: ModelArch, gpu: GPU, n_gpus: int, shards: Sequence[str] = ("zero3",)) -> bool:
    """Whether estimate() gives a sharded setup different numbers from one GPU's (probed on `arch`
    with full fine-tuning, micro-batch 1, 64 tokens, where sharded weights, gradients and AdamW
    state would show). Until the engine models sharding, estimate() ignores n_gpus/shard."""
    if n_gpus <= 1:
        return False
    precision = precision_for(gpu)
    key = (id(arch), arch.name, gpu.name, n_gpus, tuple(shards), precision)
    got = _SHARD_PROBES.get(key)
    if got is None:
        one = Training(micro_batch=1, seq_len=64, precision=precision)  # type: ignore[arg-type]

        def sig(t: Training) -> tuple[Any, ...]:
            e = estimate(arch, "full", t, gpu)
            return (e.memory.peak_allocated_bytes, e.memory.device_total_bytes, e.compute.flops_per_step,
                    e.compute.step_time_s, e.params.trainable)

        base = sig(one)
        got = any(sig(one.with_(n_gpus=n_gpus, shard=s)) != base for s in shards if s != "none")
        _SHARD_PROBES[key] = got
    return got


@lru_cache(maxsize=None)
def _compute_dtype(precision: str) -> str:
    return Training(precision=precision).compute_dtype.name  # type: ignore[arg-type]


def _device_total(peak: int) -> int:
    """A lower bound of estimate()'s device total for an allocated peak: reserved >= allocated, and
    reserved itself needs the configuration's own timeline replayed through the caching allocator
    (engine/allocator.py), which the fast path does not have. Rows shown are re-estimated (_exact_rows)."""
    return peak + int(overheads()["cuda_context_bytes"]["value"])


EXACT_ROWS = 20  # rows re-estimated with the allocator replay (the table shows 15 by default)


def _exact_rows(ev: Evaluator, gpu: GPU, fitting: list[PlanRow], closest: list[PlanRow]
                ) -> tuple[list[PlanRow], list[PlanRow], Estimate | None]:
    """Rows with estimate()'s own numbers and fit verdict (fit.py: reserved from the caching-allocator
    replay) for what plan_table shows: the first EXACT_ROWS fitting rows, and the first fitting row of
    each method variant / checkpointing / attention / shard (its `distinct` view) up to EXACT_ROWS of
    them; the closest misses when nothing fits. A fast row's device total is a lower bound, so a row
    can only move from fitting to not; the ones that do join `closest`."""
    first: Estimate | None = None
    out: list[PlanRow] = []
    missed: list[PlanRow] = []
    exact_keys: set[tuple[str, bool, str, str]] = set()
    for row in fitting:
        key = (row.config.variant.label, row.config.grad_ckpt, row.config.attention, row.config.shard)
        if row.path != "direct" and (len(out) < EXACT_ROWS or (key not in exact_keys
                                                                and len(exact_keys) < EXACT_ROWS)):
            try:
                est = ev.estimate(row.config, gpu)
            except MethodError:
                continue
            row = replace(row_from_estimate(row.config, est), train_time_s=row.train_time_s,
                          train_cost_usd=row.train_cost_usd)
            if first is None and row.fits and not out:
                first = est
        if not row.fits:
            missed.append(row)
            continue
        if row.path == "direct":
            exact_keys.add(key)
        out.append(row)
    if not fitting:
        closest = [row_from_estimate(r.config, ev.estimate(r.config, gpu)) if r.path != "direct" else r
                   for r in closest[:EXACT_ROWS]] + closest[EXACT_ROWS:]
    closest = sorted(missed + closest, key=lambda r: (r.device_total_bytes, r.config.label))
    return sorted(out, key=_rank_key), closest, first


def row_from_estimate(config: PlanConfig, est: Estimate) -> PlanRow:
    return PlanRow(
        replace(config, grad_ckpt=est.training.grad_ckpt), est.memory.peak_allocated_bytes,
        est.memory.device_total_bytes, est.gpu_memory_bytes, est.fits, est.headroom_bytes,
        est.compute.flops_per_step, est.compute.step_time_s, est.compute.tokens_per_s,
        est.params.trainable, est.params.total, path="direct",
    )


def precision_for(gpu: GPU) -> str:
    return "bf16-mixed" if gpu.bf16_supported else "fp16-mixed"


# ---------------------------------------------------------------------------------------------
# plan()
# ---------------------------------------------------------------------------------------------

def _rank_key(row: PlanRow) -> tuple[Any, ...]:
    """Fastest first. On one GPU, tokens/s = tokens x peak x utilization / FLOPs, so the exact
    FLOPs per token order the rows the same way (without float ties, and also on a GPU without
    throughput figures). The model's throughput is linear in micro-batch, so equal FLOPs per token
    are broken by the larger micro-batch (fewer optimizer steps), the exact optimizer over
    quantized states, then the larger headroom."""
    c = row.config
    return (Fraction(row.flops_per_step, c.micro_batch * c.seq_len), -c.micro_batch,
            _OPTIMIZER_PREFERENCE.get(c.optimizer, 9), -row.headroom_bytes, c.label)


def _unique_list(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def _with_cost(row: PlanRow, tokens: int | None, price: float | None, n_gpus: int = 1) -> PlanRow:
    """Time to train `tokens` and its cost: `tokens_per_s` is one GPU's (estimate()); N data-parallel
    GPUs are assumed to scale linearly (no communication time) and each is paid for."""
    if tokens is None or not row.tokens_per_s:
        return row
    secs = tokens / (row.tokens_per_s * n_gpus)
    cost = secs / 3600 * price * n_gpus if price is not None else None
    return replace(row, train_time_s=secs, train_cost_usd=cost)


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan(arch: ModelArch, gpu: GPU, n_gpus: int = 1, seq_len: int | None = None, tokens: int | None = None,
         price_per_hour: float | None = None, methods: Iterable[str] | None = None, *,
         ranks: Sequence[int] = RANKS, micro_batches: Sequence[int] = MICRO_BATCHES,
         grad_ckpt: Sequence[bool] = GRAD_CKPT, attentions: Sequence[str] = ATTENTIONS,
         optimizers: Sequence[str] = OPTIMIZERS, seq_sweep: Sequence[int] = SEQ_SWEEP,
         shard: str | None = None, shards: Sequence[str] | None = None,
         fast: bool = True, verify: bool = True, alloc_conf: str = "") -> PlanResult:
    """Every searched configuration of `arch` on `n_gpus` x `gpu`; those that fit ranked by tokens/s.

    With `n_gpus` > 1, every configuration carries `n_gpus` and a sharding strategy (`shard`, or
    each of `shards`; default "ddp", and also ZeRO-2/3 when estimate() models sharding) into
    estimate(). The fast path records one GPU's step: when estimate() models sharding (probed on
    this model), sharded configurations are estimated directly (slower, exact); while it does not,
    they are exactly the one-GPU numbers and the plan says so.
    """
    started = time.perf_counter()
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n-gpus must be a positive integer, got {n_gpus!r}")
    seq = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0:
        raise TrainingError(f"seq-len must be a positive integer, got {seq!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    chosen = list(methods) if methods is not None else [m for m in DEFAULT_METHODS if m in method_names()]
    for m in chosen:
        get_method(m)  # unknown names raise MethodError with a suggestion
    precision = precision_for(gpu)
    price = price_per_hour if price_per_hour is not None else gpu.price_per_hour_usd
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    for s_ in ([shard] if shard is not None else []) + list(shards or []):
        if s_ not in SHARDS:
            from .suggest import did_you_mean

            raise TrainingError(f"unknown sharding {s_!r}{did_you_mean(s_, {k: k for k in SHARDS})} "
                                f"(choose from {', '.join(SHARDS)})")
    modelled = False
    if n_gpus == 1:
        shard_list: list[str] = ["none"]
    else:
        wanted = list(shards) if shards else ([shard] if shard not in (None, "none") else [])
        modelled = sharding_modelled(arch, gpu, n_gpus, tuple(wanted) or ("zero3",))
        if not wanted:
            wanted = list(SHARD_SEARCH) if modelled else ["ddp"]
        shard_list = _unique_list(wanted)
        if modelled:
            notes.append(f"{n_gpus} GPUs ({', '.join(shard_list)}): estimate() models sharding; the fast path records "
                         "one GPU's step, so these configurations are estimated directly (exact, slower). Time and "
                         f"cost assume {n_gpus} data-parallel GPUs scaling linearly (no communication time)")
            # Direct estimates cost tens of ms each: searching the one-GPU defaults would take minutes.
            # Narrow what the caller left at its default (sdpa never loses to eager here: same FLOPs
            # or fewer, less memory) and say so.
            narrowed = []
            if ranks is RANKS:
                ranks, narrowed = (16,), narrowed + ["rank 16"]
            if attentions is ATTENTIONS:
                attentions, narrowed = ("sdpa",), narrowed + ["sdpa attention"]
            if optimizers is OPTIMIZERS:
                optimizers, narrowed = ("adamw", "adamw-8bit"), narrowed + ["adamw / adamw-8bit"]
            if narrowed:
                notes.append("multi-GPU search narrowed to " + ", ".join(narrowed) + " (estimate() is called for each)")
        else:
            notes.append(f"{n_gpus} GPUs: multi-GPU sharding (DDP/FSDP/DeepSpeed) is not modelled yet by estimate(); "
                         "this plan is for one GPU, each of the others would hold the same. Time and cost assume "
                         f"{n_gpus} data-parallel GPUs scaling linearly")
    ev = Evaluator(arch, ranks=ranks, fast=fast, sharded_fast=not modelled)
    ev.alloc_conf = alloc_conf

    settings = [(ck, at, opt, sh) for sh in shard_list for ck in grad_ckpt for at in attentions for opt in optimizers]

    variants = [v for m in chosen for v in variants_for(m, ranks)]

    # ---- the grid at the plan's sequence length ------------------------------------------
    def grid() -> dict[PlanConfig, PlanRow]:
        rows: dict[PlanConfig, PlanRow] = {}
        for v in variants:
            for ck, at, opt, sh in settings:
                for mb in micro_batches:
                    cfg = PlanConfig(v, mb, seq, ck, at, opt, precision, n_gpus, sh)
                    why = ev.error(cfg)
                    if why is not None:
                        alone = ck and any(ev.error(replace(cfg, grad_ckpt=c2)) is None for c2 in grad_ckpt)
                        entry = (f"{v.label} with grad-ckpt on" if alone else v.label, why)
                        if entry not in skipped:
                            skipped.append(entry)
                        continue
                    eff = ev.effective(cfg)
                    if eff not in rows:  # QLoRA with checkpointing off runs with it on (kbit prep)
                        try:
                            rows[eff] = _with_cost(ev.evaluate(cfg, gpu), tokens, price, n_gpus)
                        except MethodError as exc:  # estimate() refuses this combination
                            entry = (f"{v.label} with {opt}" + (f", {sh}" if cfg.sharded else ""),
                                     str(exc).splitlines()[0])
                            if entry not in skipped:
                                skipped.append(entry)
        return rows

    # The first row shown is re-estimated with estimate(): should the fast path ever disagree (an
    # engine change it does not cover), that structure is evaluated directly from then on.
    best_estimate = None
    for _attempt in range(8):
        rows = grid()
        fitting = sorted((r for r in rows.values() if r.fits), key=_rank_key)
        closest = sorted((r for r in rows.values() if not r.fits), key=lambda r: (r.device_total_bytes, r.config.label))
        first = fitting[0] if fitting else (closest[0] if closest else None)
        if not verify or first is None or first.path == "direct":
            break
        best_estimate = ev.estimate(first.config, gpu)
        direct = row_from_estimate(first.config, best_estimate)
        if (direct.peak_allocated_bytes, direct.flops_per_step, direct.trainable_params) == \
                (first.peak_allocated_bytes, first.flops_per_step, first.trainable_params):
            break
        ev.distrust(first.config)
        notes.append(f"the fast path disagreed with estimate() on {first.config.variant.label} "
                     f"({'ckpt' if first.config.grad_ckpt else 'no ckpt'}, {first.config.attention}): "
                     "estimated directly")
    fitting, closest, first_estimate = _exact_rows(ev, gpu, fitting, closest)
    if first_estimate is not None:
        best_estimate = first_estimate
    if not fitting:
        best_estimate = None
    forced = _unique_list(v.method for v in variants for c in [PlanConfig(v, 1, seq, False, attentions[0],
                                                                         optimizers[0], precision, n_gpus,
                                                                         shard_list[0])]
                          if ev.error(c) is None and ev.effective(c).grad_ckpt)
    if forced and False in grad_ckpt:
        notes.append(f"{', '.join(forced)}: prepare_model_for_kbit_training turns gradient checkpointing on, "
                     "so only checkpointed configurations exist")

    # ---- per method: largest sequence length (batch 1) and micro-batch (plan seq) --------
    context = arch.max_position_embeddings
    sweep = [x for x in seq_sweep if context is None or x <= context]
    limits: list[MethodLimit] = []
    for m in chosen:
        bases: dict[PlanConfig, PlanConfig] = {}
        for v in (v for v in variants if v.method == m):
            for ck, at, opt, sh in settings:
                if modelled and (ck != max(grad_ckpt) or opt != optimizers[-1]):
                    continue  # direct estimates: the limits only from the least memory-hungry settings
                b = PlanConfig(v, 1, seq, ck, at, opt, precision, n_gpus, sh)
                if ev.error(b) is None:
                    bases.setdefault(ev.effective(b), b)
        if not bases:
            continue
        # largest power-of-two sequence that fits at micro-batch 1 (the peak only grows with T)
        by_seq: dict[int, list[PlanConfig]] = {}
        for b in bases.values():
            lo, hi, found = 0, len(sweep) - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                if ev.fits(replace(b, seq_len=sweep[mid]), gpu):
                    found, lo = sweep[mid], mid + 1
                else:
                    hi = mid - 1
            if found is not None:
                by_seq.setdefault(found, []).append(b)
        seq_row = None
        if by_seq:
            top = max(by_seq)
            seq_row = max((ev.evaluate(replace(b, seq_len=top), gpu) for b in by_seq[top]),
                          key=lambda r: (r.headroom_bytes, -_rank_key(r)[0]))  # most headroom, then fastest
        # largest micro-batch at the plan's sequence length (the peak only grows with B)
        by_mb: dict[int, list[PlanConfig]] = {}
        searched_to = max(micro_batches)
        for b in bases.values():
            if not ev.fits(b, gpu):
                continue
            if ev.searchable(b):
                searched_to = MAX_MICRO_BATCH_SEARCH
                lo, hi = 1, MAX_MICRO_BATCH_SEARCH
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if ev.fits(replace(b, micro_batch=mid), gpu):
                        lo = mid
                    else:
                        hi = mid - 1
                found_mb = lo
            else:
                found_mb = max([1] + [x for x in micro_batches if x > 1 and ev.fits(replace(b, micro_batch=x), gpu)])
            by_mb.setdefault(found_mb, []).append(b)
        mb_row = None
        if by_mb:
            top = max(by_mb)
            mb_row = max((ev.evaluate(replace(b, micro_batch=top), gpu) for b in by_mb[top]),
                         key=lambda r: (r.headroom_bytes, -_rank_key(r)[0]))
        limited = bool(seq_row is not None and context is not None and sweep and seq_sweep
                       and seq_row.config.seq_len == sweep[-1] and sweep[-1] < seq_sweep[-1])
        limits.append(MethodLimit(m, seq_row.config.seq_len if seq_row else None, seq_row,
                                  mb_row.config.micro_batch if mb_row else None, mb_row, searched_to, limited))

    if limits and fast:
        notes.append("largest sequence / micro-batch per method: searched on allocated + CUDA context, a lower "
                     "bound of the device total (the caching-allocator replay needs each configuration's own "
                     f"timeline); the first {EXACT_ROWS} configurations that fit are re-estimated with it")
    if tokens is not None and price is None:
        notes.append("no price per hour for this GPU in the catalog: pass price_per_hour for costs")
    suggestion = None if fitting else _what_would_fit(ev, arch, gpu, closest, limits, seq, chosen, precision,
                                                      n_gpus, modelled)
    explanation = _explain(fitting, closest, gpu, tokens, price, suggestion)
    stats = ev.stats
    stats.seconds = time.perf_counter() - started
    return PlanResult(model=arch.name, gpu=gpu, n_gpus=n_gpus, seq_len=seq, tokens=tokens, price_per_hour=price,
                      precision=precision, rows=fitting, closest=closest, limits=limits, skipped=skipped,
                      explanation=explanation, notes=notes, suggestion=suggestion, stats=stats,
                      best_estimate=best_estimate)


def _what_would_fit(ev: Evaluator, arch: ModelArch, gpu: GPU, closest: list[PlanRow], limits: list[MethodLimit],
                    seq: int, chosen: list[str], precision: str, n_gpus: int = 1, modelled: bool = False) -> str:
    parts: list[str] = []
    if closest:
        cheapest = closest[0]
        need = (f"a GPU with at least {fmt_gib(cheapest.device_total_bytes)} for the least memory-hungry "
                f"configuration ({cheapest.config.label})")
        bigger = sorted((g for g in gpu_catalog().values() if g.memory_bytes > gpu.memory_bytes),
                        key=lambda g: (g.memory_bytes, g.name))
        for g in bigger:
            row = ev.fits_on(cheapest.config, g)
            if row.fits:
                parts.append(f"{need}: it fits on the {g.name} ({fmt_gib(g.memory_bytes)}, "
                             f"{fmt_gib(row.device_total_bytes)} needed there)")
                break
        else:
            parts.append(f"{need}, more than any single GPU in the catalog")
    shorter = [lim for lim in limits if lim.max_seq_len is not None and lim.max_seq_len < seq]
    if shorter:
        top = max(shorter, key=lambda lim: (lim.max_seq_len or 0, lim.max_seq_row.headroom_bytes if lim.max_seq_row else 0))
        assert top.max_seq_row is not None
        parts.append(f"a shorter sequence fits: {top.max_seq_row.config.label} "
                     f"({fmt_gib(top.max_seq_row.device_total_bytes)} of {fmt_gib(gpu.memory_bytes)})")
    if "qlora" not in chosen:
        try:
            v = Variant("qlora", (("double_quant", True), ("quant", "nf4"), ("rank", ev.ranks[0])))
            cfg = PlanConfig(v, 1, seq, True, "sdpa", "paged-adamw-8bit", precision,
                             n_gpus, closest[0].config.shard if closest else ("ddp" if n_gpus > 1 else "none"))
            row = ev.evaluate(cfg, gpu)
            parts.append(f"QLoRA ({row.config.label}) would need {fmt_gib(row.device_total_bytes)}"
                         + (" and fits" if row.fits else ""))
        except MethodError:
            pass
    if closest:
        cheapest = closest[0]
        if modelled:  # estimate() shards: try more GPUs with ZeRO-3 (directly estimated)
            for n in (2, 4, 8, 16, 32, 64):
                if n <= n_gpus:
                    continue
                try:
                    row = ev.evaluate(replace(cheapest.config, n_gpus=n, shard="zero3"), gpu)
                except (MethodError, TrainingError):
                    break
                if row.fits:
                    parts.append(f"{n} x {gpu.name} with ZeRO-3 fit {cheapest.config.variant.label} "
                                 f"({fmt_gib(row.device_total_bytes)} per GPU)")
                    break
        else:
            parts.append("more GPUs would shard the weights, gradients and optimizer state (ZeRO-3/FSDP), "
                         "but estimate() does not model multi-GPU sharding yet")
    return "; ".join(parts) if parts else "nothing in the searched space fits"


def _explain(fitting: list[PlanRow], closest: list[PlanRow], gpu: GPU, tokens: int | None, price: float | None,
             suggestion: str | None) -> str:
    cap = fmt_gib(gpu.memory_bytes)
    if not fitting:
        if not closest:
            return f"Nothing could be evaluated on {gpu.name}."
        c = closest[0]
        return (f"Nothing fits on {gpu.name} ({cap}): the least memory-hungry configuration, {c.config.label}, "
                f"needs {fmt_gib(c.device_total_bytes)} on the device ({fmt_gib(c.peak_allocated_bytes)} allocated "
                f"at the peak plus the CUDA context). To make it fit: {suggestion}.")
    best = fitting[0]
    b = best.config
    text = (f"{b.variant.label} with micro-batch {b.micro_batch}, gradient checkpointing "
            f"{'on' if b.grad_ckpt else 'off'}, {b.attention} attention and {b.optimizer} ranks first")
    if best.tokens_per_s is not None:
        text += f" at {best.tokens_per_s:,.0f} tokens/s"
    text += (f": it needs {fmt_gib(best.device_total_bytes)} of {gpu.name}'s {cap}, leaving "
             f"{fmt_gib(best.headroom_bytes)} of headroom")
    pct = 100.0 * best.trainable_params / best.total_params if best.total_params else 0.0
    text += f", and trains {fmt_count(best.trainable_params)} parameters ({pct:.3g}% of {fmt_count(best.total_params)})."
    other = next((r for r in fitting[1:] if r.config.variant.method != b.variant.method), None)
    if other is None:
        other = fitting[1] if len(fitting) > 1 else None
    if other is not None and best.tokens_per_s and other.tokens_per_s:
        gain = 100.0 * (best.tokens_per_s / other.tokens_per_s - 1)
        text += (f" The runner-up, {other.config.variant.label} (batch {other.config.micro_batch}, ckpt "
                 f"{'on' if other.config.grad_ckpt else 'off'}, {other.config.attention}, {other.config.optimizer}), "
                 f"reaches {other.tokens_per_s:,.0f} tokens/s ({gain:+.1f}% for the winner)"
                 f" with {fmt_gib(other.headroom_bytes)} of headroom and {fmt_count(other.trainable_params)} "
                 "trainable parameters.")
        if b.grad_ckpt is False and other.config.grad_ckpt:
            text += " Skipping checkpointing avoids recomputing every layer's forward (about a third more FLOPs)."
    elif other is None:
        text += " It is the only configuration that fits."
    if tokens is not None and best.train_time_s is not None:
        text += f" Training on {tokens:,} tokens takes about {_fmt_duration(best.train_time_s)}"
        text += f" (${best.train_cost_usd:,.2f} at ${price:.2f}/h)." if best.train_cost_usd is not None and price else "."
    if best.tokens_per_s is None:
        text += (f" {gpu.name} has no throughput figures in the catalog: configurations are ranked by FLOPs per "
                 f"token ({best.flops_per_step / (b.micro_batch * b.seq_len) / 1e9:,.1f} GFLOP per token here).")
    else:
        text += (f" Throughput assumes {float(overheads()['matmul_utilization']['value']):.0%} of the GPU's dense "
                 "peak and is linear in micro-batch, so ties are broken by the larger micro-batch.")
    return text


def plan_table(result: PlanResult, limit: int = 15, distinct: bool = True):  # type: ignore[no-untyped-def]
    """The ranked configurations as a rich Table (rich imported only here).

    With `distinct`, only the best row of each method variant, checkpointing and attention is shown
    (the others differ only in micro-batch or optimizer)."""
    from rich.table import Table

    fits = bool(result.rows)
    title = (f"{result.model} on {result.gpu.name} ({fmt_gib(result.gpu.memory_bytes)}), seq {result.seq_len}: "
             + ("configurations that fit, fastest first" if fits else "nothing fits; least memory first"))
    from rich.text import Text

    table = Table(title=Text(title))  # a model name is a user string: never rich markup
    for col, just in (("#", "right"), ("method", "left"), ("batch", "right"), ("ckpt", "left"), ("attn", "left"),
                      ("optimizer", "left"), ("device memory", "right"), ("headroom", "right"),
                      ("tokens/s", "right"), ("trainable", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    if result.n_gpus > 1:
        table.add_column(f"x{result.n_gpus} GPUs", justify="left")
    if result.tokens is not None:
        table.add_column("time", justify="right")
        table.add_column("cost", justify="right")
    source = result.rows if fits else result.closest
    shown: list[PlanRow] = []
    seen: set[tuple[str, bool, str, str]] = set()
    for r in source:
        key = (r.config.variant.label, r.config.grad_ckpt, r.config.attention, r.config.shard)
        if distinct and key in seen:
            continue
        seen.add(key)
        shown.append(r)
        if len(shown) >= limit:
            break
    for i, r in enumerate(shown, 1):
        c = r.config
        cells = [str(i), c.variant.label, str(c.micro_batch), "on" if c.grad_ckpt else "off", c.attention, c.optimizer,
                 fmt_gib(r.device_total_bytes), fmt_gib(r.headroom_bytes) if r.fits else "does not fit",
                 f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-", fmt_count(r.trainable_params)]
        if result.n_gpus > 1:
            cells.append(c.shard)
        if result.tokens is not None:
            cells.append(_fmt_duration(r.train_time_s) if r.train_time_s else "-")
            cells.append(f"${r.train_cost_usd:,.2f}" if r.train_cost_usd is not None else "-")
        table.add_row(*cells)
    return table


def print_plan(result: PlanResult, limit: int = 15, distinct: bool = True) -> None:
    """Table, per-method limits, explanation and notes on the terminal (user strings never as markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal and console.width < 150:
        console = Console(highlight=False, width=150)  # piped: do not squeeze the columns to 80
    console.print(plan_table(result, limit, distinct))
    lim = Table(title="largest that fits, per method (any searched setting)")
    for col in ("method", "seq (batch 1)", "with", "batch (seq %d)" % result.seq_len, "with"):
        lim.add_column(col)
    for m in result.limits:
        mb = "-"
        if m.max_micro_batch:
            mb = str(m.max_micro_batch) + ("+" if m.max_micro_batch >= m.micro_batch_searched_to else "")
        lim.add_row(m.method, (str(m.max_seq_len) + (" (context)" if m.seq_limited_by_context else "")) if m.max_seq_len else "-",
                    _setting(m.max_seq_row), mb, _setting(m.max_micro_batch_row))
    if result.limits:
        console.print(lim)
    console.print(Text("why: " if result.rows else "") + Text(result.explanation))
    for n in result.notes:
        console.print(Text(f"note: {n}", style="dim"))
    for what, why in result.skipped:
        console.print(Text(f"skipped {what}: {why}", style="dim"))
    st = result.stats
    console.print(Text(f"{st.configs_evaluated} configurations and {st.fit_checks} fit checks in {st.seconds:.2f} s "
                       f"({st.structures_recorded} symbolic steps recorded, {st.direct} direct estimates)", style="dim"))


def _setting(row: PlanRow | None) -> str:
    if row is None:
        return "-"
    c = row.config
    return f"{c.variant.label}, ckpt {'on' if c.grad_ckpt else 'off'}, {c.attention}, {c.optimizer}"
