"""Build the real model a method describes: transformers from the config, then peft / bitsandbytes / LISA /
bottleneck adapters, dtypes exactly as the method's `TunedModel` says.

The model is constructed on the meta device (parameters only; buffers are real, as accelerate's
`init_empty_weights(include_buffers=False)` does), methods are applied there, and `materialize` then
creates every parameter on the target device: real tensors on "cpu"/"cuda", or FakeTensors when a
`FakeTensorMode` is given (the tracer's fake "cpu" device). Quantized linears are quantized by
bitsandbytes at that point (`functional.quantize_4bit` / `int8_vectorwise_quant`), which works on
FakeTensors because bitsandbytes registers fake kernels for its ops.

Nothing is downloaded and no remote code is run: the architecture comes from the transformers class
registered for the config's `model_type` (`trust_remote_code=False`).

The transformers model comes from `hf_model.py`, the bitsandbytes swap and quantization from
`quantize.py`, the adapters and peft configs from `method_modules.py`; this module puts them together
(`build_meta`, `build_model`), materializes the parameters, makes the optimizer and checks the dtypes.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..arch import ModelArch
from ..engine.program import BNB_GEMM_4BIT_CUSTOM_MAX_M  # noqa: F401  (the engine and the tracer share it)
from ..methods import get_method
from ..training import Training
from ..tuned import TunedModel
from . import HarnessError, NotTraceable
from .hf_model import (AUTO_CLASSES, TORCH_DTYPES, ParamSpec, _new_base_model,  # noqa: F401  (re-exported)
                       apply_base_specs, attn_implementation, base_param_specs, find_blocks, hf_config, torch_dtype)
from .method_modules import PEFT_TASK, Bottleneck, _insert_adapters, _peft_config  # noqa: F401  (re-exported)
from .quantize import _quantize_linears, _quantize_weight


@dataclass
class BuiltModel:
    """The model as users train it, plus what the tracer needs to know about it."""

    model: nn.Module  # what the training loop calls (PeftModel for peft methods)
    base: nn.Module  # the transformers model inside
    tuned: TunedModel
    training: Training
    device: str
    optimizer: torch.optim.Optimizer | None = None
    optimizer_error: str | None = None  # why no optimizer could be made on this device
    quant_modules: list[nn.Module] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def arch(self) -> ModelArch:
        return self.tuned.arch

    def params(self) -> tuple[int, int]:
        """(total, trainable) as peft's get_nb_trainable_parameters counts them."""
        return count_params(self.model)

    def quant_tensors(self) -> Iterator[torch.Tensor]:
        """bitsandbytes quantization constants (absmax, code tables, nested state, SCB)."""
        for mod in self.quant_modules:
            w = mod.weight
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                    if isinstance(t, torch.Tensor):
                        yield t
                if qs.state2 is not None:
                    for t in (qs.state2.absmax, qs.state2.code):
                        if isinstance(t, torch.Tensor):
                            yield t
            for name in ("SCB",):
                t = getattr(w, name, None)
                if isinstance(t, torch.Tensor):
                    yield t
            state = getattr(mod, "state", None)
            if state is not None and isinstance(getattr(state, "SCB", None), torch.Tensor):
                yield state.SCB


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) exactly as peft `PeftModel.get_nb_trainable_parameters` counts: 4-bit packed
    weights count two parameters per byte (peft multiplies by 2 * element size for Params4bit)."""
    total = trainable = 0
    for _, p in model.named_parameters():
        n = p.numel()
        if p.is_meta and p.__class__.__name__ == "Params4bit":
            pass  # not quantized yet: the meta tensor has the unpacked shape
        elif p.__class__.__name__ == "Params4bit" or getattr(p, "_peftplan_4bit", False):
            n = n * 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


# ---- options ---------------------------------------------------------------------------------


def coerce_options(method: str, options: Any) -> Any:
    spec = get_method(method)
    if options is None:
        return spec.make_options({})
    if isinstance(options, dict):
        return spec.make_options(dict(options))
    if is_dataclass(options):
        return options
    raise HarnessError(f"options for {method} must be a dict or {spec.options_cls.__name__}")


def options_dict(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if isinstance(options, dict):
        return dict(options)
    return {f.name: getattr(options, f.name) for f in fields(options)}


# ---- materialization ---------------------------------------------------------------------------


def materialize(model: nn.Module, device: str, fake_mode=None, real_init: bool = True, seed: int = 0) -> None:
    """Create every meta parameter/buffer on `device` (FakeTensors under `fake_mode`), keeping
    dtypes, requires_grad and sharing (tied weights stay tied); quantize bitsandbytes linears."""
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    real = fake_mode is None
    gen = torch.Generator().manual_seed(seed)
    if fake_mode is not None and any(getattr(m, "_peftplan_quant", None) for m in model.modules()):
        # bitsandbytes builds its 8-bit dynamic code table from Python floats with data-dependent ops:
        # build it for real once (it caches it), outside the fake mode.
        import bitsandbytes.functional as bnbf
        if "dynamic" not in bnbf.name2qmap:
            bnbf.name2qmap["dynamic"] = bnbf.create_dynamic_map().to("cpu")
    memo: dict[int, torch.Tensor] = {}
    with ctx:
        for mod in model.modules():
            quant = getattr(mod, "_peftplan_quant", None)
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if quant is not None and name == "weight":
                    if id(p) not in memo:
                        _quantize_weight(mod, device, real_init and real)
                        memo[id(p)] = mod.weight
                    continue
                if id(p) in memo:
                    mod._parameters[name] = memo[id(p)]
                    continue
                data = _new_tensor(p, device, fake_mode, real_init and real, gen)
                new = nn.Parameter(data, requires_grad=p.requires_grad)
                memo[id(p)] = new
                mod._parameters[name] = new
            for name, b in list(mod._buffers.items()):
                if b is None:
                    continue
                if id(b) in memo:
                    mod._buffers[name] = memo[id(b)]
                    continue
                new = _new_tensor(b, device, fake_mode, False, gen)
                memo[id(b)] = new
                mod._buffers[name] = new
        # peft keeps the virtual-token ids as a plain tensor attribute
        prompt_tokens = getattr(model, "prompt_tokens", None)
        if isinstance(prompt_tokens, dict):
            for k, v in list(prompt_tokens.items()):
                prompt_tokens[k] = torch.arange(v.numel(), device="cpu").long()


def _new_tensor(t: torch.Tensor, device: str, fake_mode, init: bool, gen: torch.Generator) -> torch.Tensor:
    if t.is_meta:
        out = torch.empty(t.shape, dtype=t.dtype, device=device)
        if init and out.is_floating_point():
            with torch.no_grad():
                if out.device.type == "cpu":
                    out.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(t.dtype))
                else:  # on the GPU, from its (seeded) generator: a CPU draw of 8B values takes minutes
                    out.normal_(0.0, 0.02)
        return out
    data = t.detach()
    if fake_mode is not None:
        return fake_mode.from_tensor(data.to("cpu")) if device == "cpu" else fake_mode.from_tensor(data)
    return data.to(device)


# ---- optimizer ---------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, training: Training, device: str) -> tuple[torch.optim.Optimizer | None, str | None]:
    """The optimizer HF Trainer would make (two groups: decay / no decay), or (None, reason)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        return None, "nothing is trainable"
    opt = training.optimizer
    impl = training.optimizer_impl
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    lr = 5e-5  # TrainingArguments.learning_rate default
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **flags), None
    if opt in ("sgd", "sgd-momentum"):
        momentum = 0.9 if opt == "sgd-momentum" else 0.0
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **flags), None
    if opt == "adafactor":
        from transformers.optimization import Adafactor
        # Trainer optim="adafactor": scale_parameter=False, relative_step=False, with the learning rate
        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False), None
    import bitsandbytes as bnb
    if opt == "lion":
        if device != "cuda":
            return None, "Lion: torch has no Lion; bitsandbytes' Lion runs its update kernel on CUDA only"
        return bnb.optim.Lion(groups, lr=lr), None
    cls = {"adamw-8bit": "AdamW8bit", "paged-adamw": "PagedAdamW", "paged-adamw-8bit": "PagedAdamW8bit"}[opt]
    if device != "cuda":
        return None, (f"bitsandbytes {cls} keeps its states in CUDA (paged: unified) memory with its own kernels; "
                      "not traceable on CPU, profile it on a GPU")
    return getattr(bnb.optim, cls)(groups, lr=lr), None


# ---- the whole build -----------------------------------------------------------------------------


def _gc_info(model: nn.Module) -> dict[str, Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    for mod in model.modules():
        if isinstance(mod, GradientCheckpointingLayer) and getattr(mod, "gradient_checkpointing", False):
            func = getattr(mod, "_gradient_checkpointing_func", None)
            kw = getattr(func, "keywords", {}) or {}
            # torch.utils.checkpoint without use_reentrant falls back to the reentrant variant (with a warning)
            return {"grad_ckpt": True, "reentrant": bool(kw.get("use_reentrant", True))}
    return {"grad_ckpt": False, "reentrant": None}


def build_meta(arch: ModelArch, method: str, options: Any = None, training: Training | None = None,
               device: str = "cpu") -> BuiltModel:
    """Everything up to materialization: the model on the meta device, methods applied."""
    training = training or Training()
    from ..trainers import get_trainer

    trainer = get_trainer(training.trainer)
    if options is None or isinstance(options, dict):
        options = trainer.method_options(method, options)
    opts = coerce_options(method, options)
    tuned = get_method(method).build(arch, opts, training)
    if trainer.adapt is not None:
        tuned = trainer.adapt(tuned, training)
    impl, note = attn_implementation(training, device, arch.model_type)
    notes = [note] if note else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = _new_base_model(arch, impl)
        specs = base_param_specs(base, tuned)
        apply_base_specs(base, specs)
        quant_modules: list[nn.Module] = []
        if any(t.quant is not None for tb in tuned.blocks for t in tb.linears):
            quant_modules = _quantize_linears(base, tuned, training)
        kbit_prep = bool(getattr(opts, "kbit_prep", False))
        if kbit_prep:
            import peft
            peft.prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=bool(getattr(opts, "kbit_grad_ckpt", True)))
        if training.grad_ckpt and not _gc_info(base)["grad_ckpt"]:
            if tuned.method == "prefix":
                raise NotTraceable("peft refuses prefix tuning with gradient checkpointing")
            base.gradient_checkpointing_enable()  # transformers defaults: use_reentrant=False
        elif tuned.forces_grad_ckpt and not _gc_info(base)["grad_ckpt"]:
            base.gradient_checkpointing_enable()
        if tuned.input_requires_grad and not kbit_prep:
            base.enable_input_require_grads()
        if tuned.blocks and any(tb.adapters for tb in tuned.blocks):
            _insert_adapters(base, tuned)
        model: nn.Module = base
        pcfg = _peft_config(base, tuned, opts)
        if pcfg is not None:
            import peft
            with torch.device("meta"):
                model = peft.get_peft_model(base, pcfg)
        if training.trainer == "trl":  # SFTTrainer.__init__'s changes to the model (harness/trl_step.py)
            from .trl_step import prepare

            prepare(model, base, bool(quant_modules), bool(_gc_info(base)["grad_ckpt"]))
        if kbit_prep:  # prepare_model_for_kbit_training upcast the non-quantized parameters to fp32
            specs = {k: ParamSpec(torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype,
                                  False, v.role) for k, v in specs.items()}
    info = {"attn_requested": training.attention, "attn_implementation": impl, **_gc_info(base),
            "kbit_prep": kbit_prep, "peft_type": str(pcfg.peft_type.value) if pcfg is not None else None,
            "task_type": PEFT_TASK[arch.task], "transformers_class": type(base).__name__}
    built = BuiltModel(model=model, base=base, tuned=tuned, training=training, device=device,
                       quant_modules=quant_modules, info=info, notes=notes)
    problems = check_dtypes(built, specs)
    if problems:
        raise HarnessError(f"{arch.name} {method}: the built model disagrees with the TunedModel: " + "; ".join(problems[:6]))
    return built


def build_model(arch: ModelArch, method: str, options: Any = None, training: Training | None = None,
                device: str = "meta", *, fake_mode=None, real_init: bool = True,
                with_optimizer: bool = True) -> BuiltModel:
    """The real model (and optimizer) as a user would train it.

    device "meta": parameters stay on meta (counts and dtypes only, no optimizer).
    device "cpu"/"cuda": parameters created there; with `fake_mode` they are FakeTensors on the fake
    device (the tracer's setting). Dtypes are checked against the TunedModel afterwards."""
    training = training or Training()
    built = build_meta(arch, method, options, training, device=device if device != "meta" else "cpu")
    built.device = device
    if device != "meta":
        materialize(built.model, device, fake_mode=fake_mode, real_init=real_init)
        if with_optimizer:
            ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
            with ctx:
                built.optimizer, built.optimizer_error = make_optimizer(built.model, training, device)
    built.info["grad_ckpt"] = _gc_info(built.base)["grad_ckpt"]
    built.info["input_requires_grad"] = _input_requires_grad(built)
    return built


def _input_requires_grad(built: BuiltModel) -> bool:
    emb = built.base.get_input_embeddings()
    return bool(getattr(emb, "_forward_hooks", None)) and any(
        getattr(h, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad")
        for h in emb._forward_hooks.values())


def check_dtypes(built: BuiltModel, specs: dict[str, ParamSpec]) -> list[str]:
    """Every parameter's dtype (and a base parameter's trainability) against the TunedModel.

    Run on the meta model after the method is applied; materialization keeps dtypes."""
    tuned = built.tuned
    problems: list[str] = []
    adapter_dtypes = {t.lora_dtype for tb in tuned.blocks for t in tb.linears if t.lora_rank} | \
        {t.ia3_dtype for tb in tuned.blocks for t in tb.linears if t.ia3} | \
        {a.dtype for tb in tuned.blocks for a in tb.adapters} | {e.dtype for e in tuned.extra_params}
    adapter_torch = {torch_dtype(d) for d in adapter_dtypes if d is not None}
    quant_ids = {id(m.weight) for m in built.quant_modules}
    for name, p in built.model.named_parameters():
        if id(p) in quant_ids:
            continue
        base_name = name.replace(".base_layer.", ".")
        for prefix in ("base_model.model.", "base_model."):
            if base_name.startswith(prefix) and base_name[len(prefix):] in specs:
                base_name = base_name[len(prefix):]
                break
        spec = specs.get(base_name)
        if spec is not None:
            if p.dtype != spec.dtype:
                problems.append(f"{name}: {p.dtype} (TunedModel: {spec.dtype})")
            if p.requires_grad != spec.trainable:
                problems.append(f"{name}: requires_grad={p.requires_grad} (TunedModel: trainable={spec.trainable})")
        elif p.requires_grad and p.dtype not in adapter_torch:
            problems.append(f"{name}: adapter parameter in {p.dtype} (TunedModel: {sorted(map(str, adapter_torch))})")
    return problems
