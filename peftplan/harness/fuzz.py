"""Differential fuzzing of the engine against the CPU trace over the whole option space.

A `FuzzCase` is one configuration: a catalog model at its real widths and a reduced depth, a method
with its options, and the training setup. `run_case` estimates it with the engine and traces the real
HF + peft step under fake tensors (harness/trace.py), and returns a `FuzzOutcome`: the signed error of
the engine's peak, or which side refused it. The engine passes a case when it is within `TOLERANCE` of
the trace, or when it refuses exactly what the real stack refuses; a known, measured deviation is named
by a class in `KNOWN_DEVIATIONS` (shown by `peftplan check` and benchmarks/fuzz_vs_trace.md).

The hypothesis strategies (`cases()`) draw every dimension the tracer can run on a CPU. Left out, and
why: the bitsandbytes 8-bit/paged optimizers and Lion (CUDA-only kernels: `make_optimizer` refuses them
on CPU), flash attention (traced as SDPA on a CPU, which is what the engine models it as), sharding
(checked by tests/test_sharding.py on the fake process group), trainer switches (Liger is CUDA-only).
Trainers: `hf` (the bare step) and `trl` (SFTTrainer's fused LM-head loss, traced through TRL's code).
tests/test_fuzz.py runs a bounded,
seeded sample in the default test run; benchmarks/fuzz_vs_trace.py runs >= 2,000 examples.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ..arch import ModelArch, from_hf_config
from ..catalog import load_gpu, load_model
from ..methods import get_method, method_names
from ..training import Training

TOLERANCE = 0.01  # |engine - trace| / trace for a pass (the CPU trace models the same tensors exactly)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")
# One or two catalog models per family, at real width (fake tensors cost per op, not per byte).
FAMILY_MODELS = ("llama3.2-1b", "llama3-8b", "tinyllama-1.1b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b",
                 "gemma2-2b", "phi3-mini", "gpt2", "opt-350m", "bloomz-560m", "roberta-base", "bert-large",
                 "mt0-large", "qwen3-0.6b", "gemma3-1b", "olmo2-7b", "smollm3-3b")
# Left out for now: the MoE families (mixtral, qwen3_moe, gpt_oss): torch 2.13's `_grouped_mm` meta kernel takes
# bf16 only, so fp32 experts (mixed precision's master weights, kbit prep) cannot be traced; they are checked at
# real width by tests/test_moe.py and benchmarks/modern_families_vs_trace.py.
# What a CPU trace can run (harness/build.py make_optimizer refuses the others off CUDA).
CPU_OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adafactor")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16", "fp16")
TRACED_TRAINERS = ("hf", "trl")
GPU = load_gpu("h200")  # capacity does not enter the peak


@dataclass(frozen=True)
class FuzzCase:
    """One configuration: `model` from the catalog with `layers` layers (all widths real)."""

    model: str
    layers: int
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def arch(self) -> ModelArch:
        cfg = dict(load_model(self.model).config)
        for k in LAYER_KEYS:
            if k in cfg:
                cfg[k] = self.layers
        return from_hf_config(cfg, f"{self.model}-L{self.layers}")

    def to_training(self) -> Training:
        return Training(**self.training)

    def label(self) -> str:
        """A one-line description that reproduces the case."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class FuzzOutcome:
    case: FuzzCase
    engine_bytes: int | None = None
    trace_bytes: int | None = None
    engine_refusal: str | None = None
    trace_refusal: str | None = None
    trace_error: str | None = None  # the tracer itself failed (not the stack refusing): reported, never passed

    @property
    def error(self) -> float | None:
        """Signed relative error of the engine's peak, (engine - trace) / trace."""
        if self.engine_bytes is None or not self.trace_bytes:
            return None
        return (self.engine_bytes - self.trace_bytes) / self.trace_bytes

    @property
    def verdict(self) -> str:
        """"pass", "both-refuse", "engine-refuses" (the stack runs it), "trace-refuses" (the engine
        estimates what the stack refuses), "trace-error", or "deviation" (beyond tolerance)."""
        if self.engine_refusal is not None and (self.trace_refusal is not None or self.trace_error is not None):
            return "both-refuse"  # the real step failing in torch (OPT-350m prompt tuning: torch.cat) counts
        if self.trace_error is not None:
            return "trace-error"
        if self.engine_refusal is not None:
            return "engine-refuses"
        if self.trace_refusal is not None:
            return "trace-refuses"
        err = self.error
        return "pass" if err is not None and abs(err) <= TOLERANCE else "deviation"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.case), "engine_bytes": self.engine_bytes, "trace_bytes": self.trace_bytes,
                "error": self.error, "verdict": self.verdict, "engine_refusal": self.engine_refusal,
                "trace_refusal": self.trace_refusal, "trace_error": self.trace_error,
                "known_deviation": known_deviation(self)}


@dataclass(frozen=True)
class KnownDeviation:
    """A named class of engine deviations found by the fuzzer: which cases, why, and how large (measured)."""

    name: str
    reason: str
    measured: str
    applies: Callable[[FuzzCase], bool]


def _t(case: FuzzCase, key: str, default: Any = None) -> Any:
    return case.training.get(key, default)


# Every class names its cause and its measured size; a deviation outside these fails the fuzz test.
KNOWN_DEVIATIONS: tuple[KnownDeviation, ...] = (
    KnownDeviation(
        "llm-int8-cpu-path",
        "QLoRA with LLM.int8 bases: the CPU trace runs bitsandbytes' MatMul8bitFp (weight dequantized, the input "
        "saved in its own dtype) where CUDA runs MatMul8bitLt (int8 matmul with outlier decomposition, whose "
        "activations depend on the data); the engine keeps the CUDA-side assumption, so neither side is the GPU "
        "step: wait for a GPU profile before fitting either",
        "-1.0% to -1.3% (llama3-8b, 2 layers, fp32, b3 s123; fuzz seed 33, 2026-12-02)",
        lambda c: c.method == "qlora" and c.options.get("quant") == "int8",
    ),
    KnownDeviation(
        "gpt2-family-dropout",
        "GPT-2 with dropout in the embedding, attention and residual paths: the engine keeps fewer tensors than "
        "the trace around the embedding dropout and the checkpointed layers' inputs (undiagnosed). Under TRL "
        "(no logits peak) and mixed precision the peak is gelu_new's last mul in backward, `0.5*x (fp16) * "
        "(1+tanh) (fp32)`: MulBackward0 computes the fp16 operand's gradient in fp32 (`grad * other`) and the "
        "autograd engine casts it to fp16 only after the node returns (validate_outputs), so two fp32 "
        "gradients are alive with the incoming one where the engine allocates the fp16 one (7,888,896 B of the "
        "7,892,480 B gap in the -2.9% case, traced 2026-12-02; modelled since in engine/autograd.py, the case "
        "now passes). GPT2Model's eager causal mask "
        "and its inputs_embeds / position_embeds locals are modelled since 2026-12-02. It shows where "
        "activations dominate the peak (small widths, short sequences)",
        "-1.0% to -4.7% on tiny GPT-2 (hidden 128, profiles/cpu matrix, 2026-12-02); at real width -2.9% (gpt2, "
        "1 layer, P-tuning, eager, checkpointing, fp16-mixed, TRL, b4 s289; fuzz seed 20261202; -3.2% before the "
        "eager mask and embedding locals were modelled), every other real-width GPT-2 case of that run within 1%",
        lambda c: c.model in ("gpt2", "gpt2-medium"),
    ),
)


def known_deviation(outcome: FuzzOutcome) -> str | None:
    """Name of the known class a deviating outcome falls in (None for passes and unknown deviations)."""
    if outcome.verdict != "deviation":
        return None
    for d in KNOWN_DEVIATIONS:
        if d.applies(outcome.case):
            return d.name
    return None


def run_case(case: FuzzCase, *, trace_fn: Callable[..., Any] | None = None) -> FuzzOutcome:
    """Engine and trace on one case (each refusal caught and kept as the outcome)."""
    from ..estimate import estimate
    from . import HarnessError

    if trace_fn is None:
        from .trace import trace as trace_fn  # type: ignore[no-redef]
    engine_bytes = engine_refusal = None
    traced_options = dict(case.options)
    try:
        arch = case.arch()
        training = case.to_training()
        est = estimate(arch, case.method, training, GPU, dict(case.options))
        engine_bytes = est.memory.peak_allocated_bytes
        if "targets" not in traced_options and est.options.get("targets") is not None:
            # the engine chose the targets (peft has no default for this model_type: estimate.py build_tuned
            # says so in its assumptions): trace the configuration it estimated, as `estimate --trace` does
            traced_options["targets"] = est.options["targets"]
    except ValueError as exc:  # ArchError, TrainingError, MethodError: the engine's one-line refusals
        engine_refusal = str(exc)
    trace_bytes = trace_refusal = trace_error = None
    try:
        arch = case.arch()
        training = case.to_training()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = trace_fn(arch, case.method, traced_options, training, flops=False)  # type: ignore[misc]
        trace_bytes = res.peak_allocated_bytes
    except (HarnessError, ValueError, TypeError, NotImplementedError) as exc:
        # the real stack (transformers / peft / the harness's NotTraceable) refuses the configuration
        trace_refusal = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    except Exception as exc:  # noqa: BLE001 - a tracer failure is reported, never counted as a pass
        trace_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return FuzzOutcome(case, engine_bytes, trace_bytes, engine_refusal, trace_refusal, trace_error)


def is_acceptable(outcome: FuzzOutcome) -> bool:
    """Within tolerance, a refusal both sides share, or a named known deviation."""
    return outcome.verdict in ("pass", "both-refuse") or known_deviation(outcome) is not None


# ---- hypothesis strategies ------------------------------------------------------------------------


def cases(models: tuple[str, ...] = FAMILY_MODELS, methods: tuple[str, ...] | None = None,
          max_layers: int = 3, max_tokens: int = 2048):  # type: ignore[no-untyped-def]
    """A hypothesis strategy of FuzzCase over the option space (hypothesis imported only here)."""
    from hypothesis import strategies as st

    method_list = tuple(methods or method_names())

    @st.composite
    def draw(d):  # type: ignore[no-untyped-def]
        model = d(st.sampled_from(models))
        layers = d(st.integers(1, max_layers))
        method = d(st.sampled_from(method_list))
        arch = load_model(model)
        options = d(_options(method, arch, layers))
        batch = d(st.integers(1, 4))
        seq = d(st.integers(8, max(8, min(512, max_tokens // batch))))
        training = {
            "micro_batch": batch, "seq_len": seq,
            "grad_accum": d(st.sampled_from((1, 1, 2, 3))),
            "grad_ckpt": d(st.booleans()),
            "attention": d(st.sampled_from(("sdpa", "eager"))),
            "precision": d(st.sampled_from(PRECISIONS)),
            "optimizer": d(st.sampled_from(CPU_OPTIMIZERS)),
            "optimizer_impl": d(st.sampled_from(("fused", "foreach", "for-loop"))),
        }
        # the trainers whose step the CPU tracer runs through the real code (TRL: SFTTrainer.compute_loss);
        # llamafactory is modelled from source and has no traced step
        training["trainer"] = d(st.sampled_from(TRACED_TRAINERS))
        if training["optimizer"] == "adafactor":
            training["optimizer_impl"] = "for-loop"  # transformers' Adafactor has one implementation
        return FuzzCase(model, layers, method, options, training)

    return draw()


def _options(method: str, arch: ModelArch, layers: int):  # type: ignore[no-untyped-def]
    """Strategy of the method's options (only the fields the method has; None = the method's default)."""
    from hypothesis import strategies as st

    names = set(get_method(method).option_names())
    linear_names = arch.all_linear_names()
    parts: dict[str, Any] = {}
    if "rank" in names:
        parts["rank"] = st.sampled_from((1, 4, 8, 16, 64))
        parts["alpha"] = st.sampled_from((8, 16, 32))
        parts["dropout"] = st.sampled_from((0.0, 0.0, 0.05, 0.1))
        parts["targets"] = st.one_of(st.none(), st.just("all-linear"),
                                     st.lists(st.sampled_from(linear_names), min_size=1, max_size=4, unique=True)
                                     .map(lambda xs: ",".join(xs)))
    if method == "ia3":
        parts["targets"] = st.one_of(st.none(), st.lists(st.sampled_from(linear_names), min_size=1, max_size=3,
                                                         unique=True).map(lambda xs: ",".join(xs)))
    if "quant" in names:
        parts["quant"] = st.sampled_from(("nf4", "nf4", "fp4", "int8"))
        parts["double_quant"] = st.booleans()
        parts["kbit_prep"] = st.booleans()
        parts["kbit_grad_ckpt"] = st.booleans()
    if "lisa_layers" in names:
        parts["lisa_layers"] = st.integers(1, max(1, layers))
    if "adapter_size" in names:
        parts["adapter_size"] = st.sampled_from((8, 16, 64))
        parts["adapter_kind"] = st.sampled_from(("houlsby", "pfeiffer", "parallel"))
    if "virtual_tokens" in names:
        parts["virtual_tokens"] = st.integers(1, 32)
    return st.fixed_dictionaries({}, optional=parts).map(
        lambda opts: {k: v for k, v in opts.items() if v is not None})
