"""The planner's structures for a trainer other than the bare step: one concrete recording per point.

`replay._Structure` records a step once on encoded sizes and reads every number back as a polynomial
in (B, T, r). The trainers' losses are not polynomials: TRL's fused LM head and axolotl's / Unsloth's
chunked cross-entropy loop over tiles of a fixed number of tokens (engine/losses.py), so their number
of tiles, and the last tile's size, are not polynomials of B x T. `_PointStructure` gives the planner
the same interface for such a trainer with one symbolic step per (micro-batch, sequence length, rank)
instead: the step is recorded at concrete sizes (the same recorder, depth-extrapolated where
engine/depth.py can), and what the optimizer changes is still added afterwards, so the three searched
optimizers share one recording. Every number equals estimate()'s under that trainer (tests/test_planner.py);
the search costs one symbolic step (~20-60 ms for an 8B model) per point instead of one per structure.
"""

from __future__ import annotations

from typing import Any

from ..arch import ModelArch
from ..engine import roofline
from ..estimate import count_params
from ..methods import MethodError
from ..training import Training, TrainingError
from .encoding import _NotExact
from .record import _record_step
from .replay import state_over
from .space import Variant


class _PointKernels:
    """`KernelPolys.table_at` for a point structure: the recorded KernelTable of that point."""

    def __init__(self, owner: "_PointStructure") -> None:
        self.owner = owner

    def table_at(self, B: int, T: int, r: int) -> roofline.KernelTable:
        return self.owner._point(B, T, r)[4]


class _PointStructure:
    """A method setting under `trainer` (with its `trainer_options`), recorded per point; see the module docstring."""

    point_wise = True

    def __init__(self, arch: ModelArch, variant: Variant, ranks: tuple[int | None, ...], grad_ckpt: bool,
                 attention: str, precision: str, accumulate: bool, trainer: str,
                 trainer_options: tuple[str, ...]) -> None:
        from ..result import build_tuned

        self.arch, self.variant, self.attention, self.precision = arch, variant, attention, precision
        self.accumulate = accumulate
        self.trainer, self.trainer_options = trainer, trainer_options
        self.params: dict[int | None, Any] = {}
        self.errors: dict[int | None, str] = {}
        self.models: dict[int | None, Any] = {}
        self.exact, self.reason = True, ""
        self._state: dict[tuple[str, int], int] = {}
        self._micro: dict[tuple[Any, ...], Any] = {}
        self._points: dict[tuple[int, int, int], tuple[Any, ...]] = {}
        self._trainables: dict[int, list[tuple[int, Any]]] = {}
        self.kernels = _PointKernels(self)
        self.grad_ckpt = grad_ckpt
        base = self._training(1, 1)
        for r in ranks:
            opts = variant.opts()
            if r is not None:
                opts["rank"] = r
            try:
                model, _ = build_tuned(arch, variant.method, opts, base.with_(grad_ckpt=grad_ckpt))
            except (MethodError, TrainingError) as exc:
                self.errors[r] = str(exc).splitlines()[0]
                continue
            self.models[r] = model
            self.params[r] = count_params(model)
        if not self.models:
            self.exact, self.reason = False, "no configuration can be built"
            return
        self.grad_ckpt = grad_ckpt or next(iter(self.models.values())).forces_grad_ckpt

    def _training(self, B: int, T: int) -> Training:
        return Training(micro_batch=B, seq_len=T, grad_accum=2 if self.accumulate else 1, grad_ckpt=self.grad_ckpt,
                        attention=self.attention, precision=self.precision, optimizer="adamw", optimizer_impl="fused",  # type: ignore[arg-type]
                        trainer=self.trainer, trainer_options=self.trainer_options)

    def _model(self, r: int) -> Any:
        model = self.models.get(r)
        return model if model is not None else self.models[None]  # a method without a rank: recorded as r = 0

    def _point(self, B: int, T: int, r: int) -> tuple[Any, ...]:
        """(peak before the optimizer state, peak after it without it, AdamW's state, FLOPs, KernelTable,
        activations copied to the host per micro-batch)."""
        key = (B, T, r)
        got = self._points.get(key)
        if got is None:
            from ..engine.flops import step_flops
            from ..engine.ops import FlopCount

            model = self._model(r)
            training = self._training(B, T)
            counted = FlopCount()
            rec = _record_step(model, training, counted)
            if rec.classes:
                raise _NotExact("a concrete recording has encoded sizes")
            fl = step_flops(model, training.with_(grad_accum=1), counted=counted)
            table = getattr(counted, "table", None) or roofline.kernel_table(counted.kernels)
            got = (max(rec.pre, default=0), max(rec.post, default=0), rec.state,
                   (fl.forward, fl.backward_input, fl.backward_weight, fl.recompute), table,
                   rec.activation_offload_bytes)
            self._points[key] = got
            self._trainables.setdefault(r, rec.trainables)
        return got

    def __getstate__(self) -> dict[str, Any]:
        """For the disk cache: the recorded points and the models (new points are recorded after a load), not
        the architecture (set again on load) or the per-GPU memo."""
        state = dict(self.__dict__)
        state["arch"] = None
        state["_micro"] = {}
        return state

    # -- the evaluation interface of replay._Structure ------------------------------------------------
    def peak_at(self, B: int, T: int, r: int, optimizer: str) -> int:
        before, after = self._point(B, T, r)[:2]
        return max(before, after + self.state_bytes(optimizer, r))

    def flops_at(self, B: int, T: int, r: int) -> tuple[int, int, int, int]:
        return self._point(B, T, r)[3]

    def activation_offload_at(self, B: int, T: int, r: int) -> int:
        """Bytes of saved activations copied to the host and back per micro-batch (Unsloth's offloaded
        checkpointing, TRL's activation offloading): PCIe time in the roofline, as estimate() adds it."""
        return self._point(B, T, r)[5]

    def trainables_at(self, r: int) -> list[tuple[int, Any]]:
        """(numel, dtype) of every trainable tensor at rank r (recorded with the first point at that rank)."""
        got = self._trainables.get(r)
        if got is None:
            self._point(1, 1, r)
            got = self._trainables[r]
        return got

    def state_bytes(self, optimizer: str, r: int) -> int:
        """Optimizer state on the device over the trainable tensors (replay.state_over), AdamW's checked
        against the state the recording added."""
        key = (optimizer, r)
        got = self._state.get(key)
        if got is None:
            got = state_over(optimizer, self.trainables_at(r))
            recorded = [p[2] for (_, _, rr), p in self._points.items() if rr == r]
            if optimizer == "adamw" and recorded and recorded[0] != got:
                raise _NotExact("the recomputed optimizer state disagrees with the recorded step")
            self._state[key] = got
        return got
