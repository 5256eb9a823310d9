"""`Evaluator`: exact rows for many configurations of one model, through the replay fast path or estimate()."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

from ..arch import ModelArch, resolve_attention
from ..catalog import GPU
from ..engine import roofline
from ..estimate import Estimate, estimate, overheads
from ..methods import MethodError, explicit_grad_ckpt_options
from ..training import Training, TrainingError
from .cache import _disk_load, _disk_save
from .replay import _FAST_OPTIMIZERS, _NotExact, _Structure
from .replay_time import micro_batch_time, paged_bytes, trainable_bytes
from .space import LORA_LIKE, RANKS, PlanConfig, PlanRow, PlanStats, Variant

_STRUCT_CACHE: dict[tuple[Any, ...], tuple[ModelArch, _Structure]] = {}
_STRUCT_CACHE_MAX = 1024


def clear_cache() -> None:
    """Forget recorded structures held in this process (the benchmark's cold runs; the disk cache,
    if any, is left alone: point PEFTPLAN_CACHE_DIR at an empty directory for a truly cold run)."""
    _STRUCT_CACHE.clear()



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
        # who runs the step (Training.trainer / trainer_options): "hf", the bare step, is recorded once per
        # structure on encoded sizes; any other trainer per point (replay_point.py: its loss is not a polynomial)
        self.trainer = "hf"
        self.trainer_options: tuple[str, ...] = ()
        self._point_structures: list[tuple[tuple[Any, ...], Any, int]] = []  # (disk key, structure, points on load)
        # estimate() of this plan's configurations: (config, id(gpu), flush_check) -> (gpu, its estimate)
        self._estimates: dict[tuple[PlanConfig, int, bool], tuple[GPU, Estimate]] = {}

    @property
    def point_wise(self) -> bool:
        """A trainer other than the bare step, or the bare step with switches (e.g. --liger): recorded per point."""
        return self.trainer != "hf" or bool(self.trainer_options)

    def persist(self) -> None:
        """Write the point structures that recorded new points to the disk cache (planner/cache.py), so a
        second plan of the same model under the same trainer is warm."""
        for key, s, loaded in self._point_structures:
            if len(s._points) > loaded:
                self.stats.structures_recorded += len(s._points) - loaded  # one symbolic step per new point
                _disk_save(self.arch, key, s)
        self._point_structures = [(key, s, len(s._points)) for key, s, _ in self._point_structures]

    def _use_fast(self, s: "_Structure", config: PlanConfig) -> bool:
        return self.fast and s.exact and (self.sharded_fast or not config.sharded)

    def _structure_of(self, config: PlanConfig) -> _Structure:
        return self.structure(config.variant, config.grad_ckpt, config.attention, config.precision,
                              config.grad_accum > 1)

    def _keys(self, variant: Variant, grad_ckpt: bool, attention: str, precision: str, accumulate: bool
              ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(the in-process cache key, the disk key) of a structure."""
        base = _with_ckpt_options(variant.base, grad_ckpt)
        attention = resolve_attention(self.arch, attention, explicit=False)[0]  # as estimate() resolves it
        ranks: tuple[int | None, ...] = self.ranks if variant.method in LORA_LIKE else (None,)
        key = (id(self.arch), base, ranks, grad_ckpt, attention, precision, accumulate, self.trainer,
               self.trainer_options)
        return key, (base, ranks, grad_ckpt, attention, precision, accumulate)

    def _held(self, key: tuple[Any, ...]) -> Any:
        hit = _STRUCT_CACHE.get(key)
        return hit[1] if hit is not None and hit[0] is self.arch else None

    def structure(self, variant: Variant, grad_ckpt: bool, attention: str, precision: str,
                  accumulate: bool = False) -> _Structure:
        key, disk_key = self._keys(variant, grad_ckpt, attention, precision, accumulate)
        hit = self._held(key)
        if hit is not None:
            return hit
        base, ranks, grad_ckpt, attention, precision, accumulate = disk_key
        if len(_STRUCT_CACHE) >= _STRUCT_CACHE_MAX:
            _STRUCT_CACHE.clear()
        if self.point_wise:
            from .replay_point import _PointStructure

            point_key = (base, ranks, grad_ckpt, attention, precision, accumulate, self.trainer, self.trainer_options)
            s: Any = _disk_load(self.arch, point_key)
            if s is not None:
                self.stats.structures_loaded += 1
            else:
                s = _PointStructure(self.arch, base, ranks, grad_ckpt, attention, precision, accumulate,
                                    self.trainer, self.trainer_options)  # its symbolic steps are counted in persist()
            self._point_structures.append((point_key, s, len(s._points)))
            _STRUCT_CACHE[key] = (self.arch, s)
            return s
        s = _disk_load(self.arch, disk_key)
        if s is not None:
            self.stats.structures_loaded += 1
        else:
            s = _Structure(self.arch, base, ranks, grad_ckpt, attention, precision, accumulate)
            if s.models:
                self.stats.structures_recorded += 1
            _disk_save(self.arch, disk_key, s)
        _STRUCT_CACHE[key] = (self.arch, s)
        return s

    def prefetch(self, configs: Iterable[PlanConfig]) -> None:
        """Record, in worker processes (planner/parallel.py), the symbolic steps `configs` will need and this
        process does not hold yet: the structures of the bare step, or under a trainer each configuration's
        point. The serial path reads them from the cache; whatever a worker could not do it still does."""
        from .parallel import run_parallel

        if not self.fast:
            return
        tasks: list[Callable[[], Any]] = []
        merges: list[Callable[[Any], None]] = []
        seen: set[Any] = set()
        for config in configs:
            key, disk_key = self._keys(config.variant, config.grad_ckpt, config.attention, config.precision,
                                       config.grad_accum > 1)
            if self.point_wise:
                s = self.structure(config.variant, config.grad_ckpt, config.attention, config.precision,
                                   config.grad_accum > 1)
                r = config.variant.rank or 0
                point = (config.micro_batch, config.seq_len, r)
                if not self._use_fast(s, config) or point in s._points or (id(s), point) in seen or config.variant.rank in s.errors:
                    continue
                seen.add((id(s), point))
                tasks.append(lambda s=s, point=point: (s._point(*point), s._trainables.get(point[2])))
                merges.append(lambda got, s=s, point=point: (s._points.setdefault(point, got[0]),
                                                             s._trainables.setdefault(point[2], got[1])))
                continue
            if key in seen or self._held(key) is not None:
                continue
            seen.add(key)
            loaded = _disk_load(self.arch, disk_key)
            if loaded is not None:
                self.stats.structures_loaded += 1
                _STRUCT_CACHE[key] = (self.arch, loaded)
                continue
            base, ranks, grad_ckpt, attention, precision, accumulate = disk_key
            tasks.append(lambda a=(self.arch, base, ranks, grad_ckpt, attention, precision, accumulate):
                         _Structure(*a))
            merges.append(lambda got, key=key, disk_key=disk_key: self._adopt(key, disk_key, got))
        if len(tasks) < 2:
            return
        for merge, got in zip(merges, run_parallel(tasks)):
            if got is not None:
                merge(got)

    def _adopt(self, key: tuple[Any, ...], disk_key: tuple[Any, ...], s: _Structure) -> None:
        """A structure recorded by a worker: held, counted and saved as structure() does with its own."""
        if self._held(key) is not None:
            return
        s.arch = self.arch
        if s.models:
            self.stats.structures_recorded += 1
        _disk_save(self.arch, disk_key, s)
        _STRUCT_CACHE[key] = (self.arch, s)

    def prefetch_estimates(self, configs: Iterable[PlanConfig], gpu: GPU) -> None:
        """estimate() of each of `configs` in worker processes (planner/parallel.py), for `estimate` to return."""
        from .parallel import run_parallel

        todo = list(dict.fromkeys(c for c in configs if (c, id(gpu), True) not in self._estimates))
        if len(todo) < 2:
            return
        for config, got in zip(todo, run_parallel([lambda c=c: self._estimate(c, gpu, True) for c in todo])):
            if got is not None:
                self._estimates[(config, id(gpu), True)] = (gpu, got)

    def distrust(self, config: PlanConfig) -> None:
        """Evaluate this configuration's structure with estimate() from now on."""
        s = self._structure_of(config)
        s.exact = False
        s.reason = "disagreed with estimate()"

    def _checked(self, config: PlanConfig) -> _Structure:
        s = self._structure_of(config)
        r = config.variant.rank
        if r in s.errors:
            raise MethodError(s.errors[r])
        if r is not None and r not in s.models:
            raise MethodError(f"rank {r} is not among the planner's ranks {self.ranks}")
        return s

    def error(self, config: PlanConfig) -> str | None:
        """Why this configuration cannot be built (MethodError), or None."""
        s = self._structure_of(config)
        return s.errors.get(config.variant.rank)

    def effective(self, config: PlanConfig) -> PlanConfig:
        """The configuration estimate() actually runs (QLoRA's kbit prep forces checkpointing)."""
        s = self._structure_of(config)
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

    def lower_bound(self, config: PlanConfig) -> int | None:
        """The fast path's device total (allocated peak + CUDA context, a lower bound of estimate()'s), or
        None where the fast path does not take this configuration."""
        s = self._checked(config)
        if not self._use_fast(s, config) or config.optimizer not in _FAST_OPTIMIZERS:
            return None
        try:
            return _device_total(s.peak_at(config.micro_batch, config.seq_len, config.variant.rank or 0,
                                           config.optimizer))
        except _NotExact:
            return None

    def searchable(self, config: PlanConfig) -> bool:
        """Fit verdicts are cheap for any micro-batch here: search beyond the grid."""
        s = self._checked(config)
        return (self._use_fast(s, config) and config.optimizer in _FAST_OPTIMIZERS
                and not s.point_wise)  # replay_point.py: a symbolic step per micro-batch

    def _fast(self, s: _Structure, config: PlanConfig, gpu: GPU) -> PlanRow:
        r = config.variant.rank or 0
        B, T = config.micro_batch, config.seq_len
        peak = s.peak_at(B, T, r, config.optimizer)
        device_total = _device_total(peak)
        accum = config.grad_accum
        flops = sum(s.flops_at(B, T, r)) * accum
        # the same roofline and float arithmetic as estimate()
        peak_flops = gpu.peak_for(_compute_dtype(config.precision))
        step_time = tokens_per_s = None
        if peak_flops > 0:
            paged = paged_bytes(s, config.optimizer, r)
            rates = roofline.rates_for(gpu)
            table, micro = micro_batch_time(s, B, T, r, rates)
            timing = roofline.step_time(
                table, rates, micro=micro, grad_accum=accum, optimizer=config.optimizer,
                optimizer_impl="fused", trainable_bytes=trainable_bytes(s, r),
                trainable_elements=s.params[config.variant.rank].trainable,
                paged_bytes_over=min(paged, max(0, device_total + paged - gpu.memory_bytes)) if paged else 0,
                offload_bytes=s.activation_offload_at(B, T, r) * accum if s.point_wise else 0)
            step_time = timing.step_time_s
            tokens_per_s = config.n_gpus * (B * T) * accum / step_time  # estimate()'s expression
        p = s.params[config.variant.rank]
        cap = gpu.memory_bytes
        if config.grad_ckpt != s.grad_ckpt:
            config = replace(config, grad_ckpt=s.grad_ckpt)
        return PlanRow(config, peak, device_total, cap, device_total <= cap,
                       cap - device_total, flops, step_time, tokens_per_s, p.trainable, p.total, path="fast")

    def estimate(self, config: PlanConfig, gpu: GPU, flush_check: bool = True) -> Estimate:
        """estimate() of `config` (`flush_check=False`: see estimate(); for probes whose misses are dropped),
        memoized for this plan (the first row is estimated to verify the fast path, then again as a shown row)."""
        got = self._estimates.get((config, id(gpu), flush_check))
        if got is None or got[0] is not gpu:
            got = self._estimates[(config, id(gpu), flush_check)] = (gpu, self._estimate(config, gpu, flush_check))
        return got[1]

    def _estimate(self, config: PlanConfig, gpu: GPU, flush_check: bool) -> Estimate:
        try:
            training = config.training()
            if self.alloc_conf:
                training = training.with_(alloc_conf=self.alloc_conf)
            if self.point_wise:
                training = training.with_(trainer=self.trainer, trainer_options=self.trainer_options)
            return estimate(self.arch, config.variant.method, training, gpu,
                            _with_ckpt_options(config.variant, config.grad_ckpt).opts(), flush_check=flush_check)
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


def _with_ckpt_options(variant: Variant, grad_ckpt: bool) -> Variant:
    """The variant as a run without checkpointing builds it: QLoRA's kbit prep then gets
    use_gradient_checkpointing=False (methods.explicit_grad_ckpt_options), as `--no-grad-ckpt` does."""
    extra = explicit_grad_ckpt_options(variant.method, grad_ckpt)
    return Variant(variant.method, variant.options + tuple(extra.items())) if extra else variant


def _device_total(peak: int) -> int:
    """A lower bound of estimate()'s device total for an allocated peak: reserved >= allocated, and
    reserved itself needs the configuration's own timeline replayed through the caching allocator
    (engine/allocator.py), which the fast path does not have. Rows shown are re-estimated
    (search.py `_exact_rows`)."""
    return peak + int(overheads()["cuda_context_bytes"]["value"])


def row_from_estimate(config: PlanConfig, est: Estimate) -> PlanRow:
    return PlanRow(
        replace(config, grad_ckpt=est.training.grad_ckpt), est.memory.peak_allocated_bytes,
        est.memory.device_total_bytes, est.gpu_memory_bytes, est.fits, est.headroom_bytes,
        est.compute.flops_per_step, est.compute.step_time_s, est.compute.tokens_per_s,
        est.params.trainable, est.params.total, path="direct",
        peak_reserved_bytes=est.memory.peak_reserved_bytes,
        envelope_bytes=est.memory.envelope_high_bytes - est.memory.envelope_low_bytes,
    )


def precision_for(gpu: GPU) -> str:
    return "bf16-mixed" if gpu.bf16_supported else "fp16-mixed"
