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
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..arch import ModelArch
from ..dtypes import BF16, FP16, FP32, DType
from ..methods import get_method
from ..methods.common import frozen_base_dtype
from ..training import Training
from ..tuned import TunedModel
from . import HarnessError, NotTraceable

TORCH_DTYPES = {FP32.name: torch.float32, BF16.name: torch.bfloat16, FP16.name: torch.float16}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM",
                "masked-lm": "AutoModelForMaskedLM"}
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "masked-lm": None}
from ..engine.program import BNB_GEMM_4BIT_CUSTOM_MAX_M  # noqa: E402,F401  (the engine and the tracer share it)


def torch_dtype(d: DType) -> torch.dtype:
    try:
        return TORCH_DTYPES[d.name]
    except KeyError:
        raise HarnessError(f"no torch dtype for {d.name}") from None


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


# ---- the transformers model ------------------------------------------------------------------


def attn_implementation(training: Training, device: str, model_type: str = "") -> tuple[str, str | None]:
    """(implementation passed to transformers, note) for training.attention on `device`."""
    if model_type == "gpt_oss" and training.attention != "eager":
        return "eager", "gpt-oss has no SDPA path (modeling_gpt_oss.py _supports_sdpa = False): eager attention"
    if training.attention == "flash":
        if device == "cuda":
            import importlib.util
            if importlib.util.find_spec("flash_attn") is not None:
                return "flash_attention_2", None
            return "sdpa", "flash attention requested: flash_attn is not installed, using SDPA (whose CUDA flash kernel saves the same tensors)"
        return "sdpa", "flash attention requested: traced with SDPA on CPU (flash_attention_2 needs CUDA)"
    return training.attention, None


def hf_config(arch: ModelArch, attn_impl: str):
    from transformers import AutoConfig

    cfg = dict(arch.config)
    if cfg.get("auto_map") or cfg.get("trust_remote_code"):
        # auto_map names the repo's own modelling code: the harness builds only transformers' native
        # classes and never runs remote code (no trust_remote_code anywhere in peftplan).
        raise HarnessError(f"{arch.name}: config.json has auto_map (remote modelling code); peftplan never "
                           "runs remote code: remove auto_map if the model_type is a native transformers one")
    model_type = cfg.pop("model_type", None) or arch.model_type
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = attn_impl
    if hasattr(config, "use_cache"):
        config.use_cache = False  # the Trainer turns the KV cache off for training
    return config


def _new_base_model(arch: ModelArch, attn_impl: str) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    config = hf_config(arch, attn_impl)
    auto = getattr(transformers, AUTO_CLASSES[arch.task])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # token-id range warnings for test-sized vocabularies
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with init_empty_weights(include_buffers=False):
                model = auto.from_config(config, attn_implementation=attn_impl, trust_remote_code=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.tie_weights()  # transformers skips tying for parameters created on meta
    _untie_if_needed(model, arch)
    model.train()
    return model


def _untie_if_needed(model: nn.Module, arch: ModelArch) -> None:
    """Follow the config's tie_word_embeddings like `from_pretrained` does with a real checkpoint.

    transformers 5.23 forces T5Config/MT5Config.tie_word_embeddings = True, so `from_config` ties
    T5 v1.1 / mT5's lm_head to `shared`; `from_pretrained` finds both tensors in the checkpoint with
    different values and does not tie them (modeling_utils `tie_weights`, "will NOT tie them")."""
    out_emb = model.get_output_embeddings()
    inp_emb = model.get_input_embeddings()
    if arch.tie_word_embeddings or out_emb is None or inp_emb is None:
        return
    if out_emb.weight is inp_emb.weight:
        out_emb.weight = nn.Parameter(torch.empty_like(inp_emb.weight, device="meta"),
                                      requires_grad=inp_emb.weight.requires_grad)
        keys = getattr(model, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            for k in [k for k in keys if k.endswith("lm_head.weight")]:
                keys.pop(k)


def find_blocks(model: nn.Module, arch: ModelArch) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of each transformer block, in arch.blocks order.

    Block containers are the nn.ModuleLists whose children hold every linear path of the block
    (T5: encoder.block then decoder.block, as arch lists encoder blocks first)."""
    out: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        k = len(out)
        if k >= arch.num_layers:
            break
        want = arch.blocks[k]
        first = mod[0]
        if not all(_has_submodule(first, lin.path) for lin in want.linears):
            continue
        for i, child in enumerate(mod):
            out.append((f"{name}.{i}", child))
    if len(out) != arch.num_layers:
        raise HarnessError(f"{arch.name}: found {len(out)} blocks in the transformers model, the architecture has {arch.num_layers}")
    return out


def _has_submodule(mod: nn.Module, path: str) -> bool:
    try:
        mod.get_submodule(path)
        return True
    except AttributeError:
        return False


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(mod).__name__.lower()


@dataclass(frozen=True)
class ParamSpec:
    dtype: torch.dtype
    trainable: bool
    role: str  # embedding, block-linear, block-norm, block-extra, final-norm, head, head-extra


def base_param_specs(model: nn.Module, tuned: TunedModel) -> dict[str, ParamSpec]:
    """Dtype and trainability of every parameter of the transformers model, from the TunedModel.

    Biases outside blocks follow peftplan.estimate.count_params: final-norm biases and head biases
    are trainable when `head_bias_trainable` (BitFit)."""
    arch = tuned.arch
    specs: dict[str, ParamSpec] = {}
    seen: set[int] = set()
    blocks = find_blocks(model, arch)
    block_prefixes = {}
    for (prefix, bmod), tb in zip(blocks, tuned.blocks):
        block_prefixes[prefix] = (bmod, tb)
        lin_params: set[int] = set()
        for t in tb.linears:
            lmod = bmod.get_submodule(t.linear.path)
            if t.quant is None:
                specs[f"{prefix}.{t.linear.path}.weight"] = ParamSpec(torch_dtype(t.weight_dtype), t.weight_trainable, "block-linear")
            if getattr(lmod, "bias", None) is not None:
                specs[f"{prefix}.{t.linear.path}.bias"] = ParamSpec(torch_dtype(t.bias_dtype), t.bias_trainable, "block-linear")
            for p in lmod.parameters(recurse=False):
                lin_params.add(id(p))
        for pname, p in bmod.named_parameters():
            if id(p) in lin_params:
                continue
            owner = bmod.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else bmod
            if _is_norm(owner):
                trainable = tb.norms_trainable or (pname.endswith("bias") and tb.norm_bias_trainable)
                specs[f"{prefix}.{pname}"] = ParamSpec(torch_dtype(tb.norm_dtype), trainable, "block-norm")
            else:  # T5 relative_attention_bias
                specs[f"{prefix}.{pname}"] = ParamSpec(torch_dtype(tb.norm_dtype), tb.norms_trainable, "block-extra")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_emb_params = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    for mname, mod in model.named_modules():
        if any(mname == b or mname.startswith(b + ".") for b in block_prefixes):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, nn.Embedding):
                spec = ParamSpec(torch_dtype(tuned.embedding_dtype), tuned.embedding_trainable, "embedding")
            elif _is_norm(mod):
                trainable = tuned.final_norms_trainable or (pname == "bias" and tuned.head_bias_trainable)
                spec = ParamSpec(torch_dtype(tuned.final_norm_dtype), trainable, "final-norm")
            elif id(p) in out_emb_params and pname == "weight":
                spec = ParamSpec(torch_dtype(tuned.head_dtype), tuned.head_trainable, "head")
            elif isinstance(mod, nn.Linear) or pname == "weight":
                trainable = tuned.head_trainable or (pname == "bias" and tuned.head_bias_trainable)
                spec = ParamSpec(torch_dtype(tuned.head_dtype), trainable, "head")
            else:  # MLM output bias
                spec = ParamSpec(torch_dtype(tuned.head_dtype), tuned.head_trainable or tuned.head_bias_trainable, "head-extra")
            specs[full] = spec
    return specs


def _set_param(mod: nn.Module, pname: str, dtype: torch.dtype, requires_grad: bool) -> None:
    p = getattr(mod, pname)
    if p.dtype != dtype:
        p.data = p.data.to(dtype)
    p.requires_grad_(requires_grad)


def apply_base_specs(model: nn.Module, specs: dict[str, ParamSpec]) -> None:
    for name, spec in specs.items():
        mname, _, pname = name.rpartition(".")
        mod = model.get_submodule(mname) if mname else model
        _set_param(mod, pname, spec.dtype, spec.trainable)


# ---- quantization (QLoRA) ----------------------------------------------------------------------


def _quantize_linears(model: nn.Module, tuned: TunedModel, training: Training) -> list[nn.Module]:
    """Replace quantized block linears by bitsandbytes Linear4bit / Linear8bitLt (on meta), as
    transformers' bnb quantizer does at load time; the weights are quantized in `materialize`."""
    import bitsandbytes as bnb

    arch = tuned.arch
    out = []
    for (prefix, bmod), tb in zip(find_blocks(model, arch), tuned.blocks):
        for t in tb.linears:
            if t.quant is None:
                continue
            parent_path, _, child = t.linear.path.rpartition(".")
            parent = bmod.get_submodule(parent_path) if parent_path else bmod
            old = getattr(parent, child)
            if isinstance(old, nn.Linear):
                in_f, out_f = old.in_features, old.out_features
            elif type(old).__name__ == "Conv1D":  # GPT-2: transformers' bnb integration swaps it too (weight transposed)
                in_f, out_f = old.weight.shape
            else:
                raise HarnessError(f"{arch.name}: {prefix}.{t.linear.path} is a {type(old).__name__}, "
                                   "bitsandbytes quantizes nn.Linear / Conv1D only")
            # bitsandbytes quantizes the weight as loaded (torch_dtype): QuantState.dtype is what
            # dequantize_4bit returns in backward. The TunedModel records only the storage (nf4).
            load_dtype = torch_dtype(frozen_base_dtype(training))
            bias = old.bias is not None
            if t.quant.kind in ("nf4", "fp4"):
                new = bnb.nn.Linear4bit(in_f, out_f, bias=bias,
                                        compute_dtype=torch_dtype(training.compute_dtype),
                                        compress_statistics=t.quant.double_quant, quant_type=t.quant.kind,
                                        quant_storage=torch.uint8, device="meta")
                new._peftplan_quant = (t.quant.kind, t.quant.double_quant, t.quant.blocksize)
            else:
                new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new._peftplan_quant = ("int8", False, 0)
            new._peftplan_load_dtype = load_dtype
            if bias:
                new.bias = nn.Parameter(torch.empty(out_f, dtype=old.bias.dtype, device="meta"), requires_grad=False)
            new.train(old.training)
            setattr(parent, child, new)
            out.append(new)
    model.is_loaded_in_4bit = any(m._peftplan_quant[0] != "int8" for m in out)
    model.is_loaded_in_8bit = any(m._peftplan_quant[0] == "int8" for m in out)
    model.is_quantized = True
    return out


def _quantize_weight(mod: nn.Module, device: str, real_init: bool) -> None:
    """Create the module's weight on `device` and quantize it as bitsandbytes does at load time."""
    import bitsandbytes.functional as bnbf

    kind, dq, blocksize = mod._peftplan_quant
    w = torch.empty(mod.out_features, mod.in_features, dtype=mod._peftplan_load_dtype, device=device)
    if real_init:
        w.normal_(0.0, 0.02)
    if kind in ("nf4", "fp4"):
        packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=kind,
                                        quant_storage=torch.uint8)
        # A plain Parameter holding the packed bytes with the QuantState attached: Params4bit cannot wrap
        # a FakeTensor, and Linear4bit.forward / peft's lora.Linear4bit only read these attributes.
        p = nn.Parameter(packed, requires_grad=False)
        p.quant_state = qs
        p.quant_type = kind
        p.compress_statistics = dq
        p.blocksize = blocksize
        p.quant_storage = torch.uint8
        p.bnb_quantized = True
        p._peftplan_4bit = True
        mod.weight = p
        mod.quant_state = qs
    else:
        cb, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w)
        p = nn.Parameter(cb, requires_grad=False)
        p.CB = cb
        p.SCB = scb
        p.has_fp16_weights = False
        p._peftplan_int8 = True
        mod.weight = p
    del w


# ---- bottleneck adapters -----------------------------------------------------------------------


class Bottleneck(nn.Module):
    """Down-projection, ReLU, up-projection (Houlsby et al. 2019), fp32; returns only the branch.

    Under autocast the matmuls run in the autocast dtype; without it a half-precision input is cast
    to the adapter dtype and the result back, as peft does for LoRA."""

    def __init__(self, dim: int, size: int, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(dim, size, dtype=dtype)
        self.act = nn.ReLU()
        self.up = nn.Linear(size, dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.down.weight.dtype:
            return self.up(self.act(self.down(x)))
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def _insert_adapters(model: nn.Module, tuned: TunedModel) -> int:
    arch = tuned.arch
    n = 0
    for (prefix, bmod), tb in zip(find_blocks(model, arch), tuned.blocks):
        if not tb.adapters:
            continue
        roles = {t.linear.role: t.linear.path for t in tb.linears}
        o_path = roles.get("o") or roles.get("cross_o")
        down_path = roles.get("down")
        up_path = roles.get("up") or roles.get("gate_up") or roles.get("gate")
        for ad in tb.adapters:
            mod = Bottleneck(ad.dim, ad.size, torch_dtype(ad.dtype)).to("meta")
            attr = "adapter_" + ad.placement.replace("-", "_")
            bmod.add_module(attr, mod)
            if ad.placement == "after-attn":
                if o_path is None:
                    raise HarnessError(f"{arch.name}: no attention output projection for an after-attn adapter")
                bmod.get_submodule(o_path).register_forward_hook(_series_hook(mod))
            elif ad.placement == "after-mlp":
                if down_path is None:
                    raise HarnessError(f"{arch.name}: no MLP down projection for an after-mlp adapter")
                bmod.get_submodule(down_path).register_forward_hook(_series_hook(mod))
            else:  # parallel-mlp: reads the MLP input, adds to the MLP output
                if down_path is None or up_path is None:
                    raise HarnessError(f"{arch.name}: no MLP projections for a parallel adapter")
                stash: dict[str, torch.Tensor] = {}
                bmod.get_submodule(up_path).register_forward_pre_hook(_stash_hook(stash))
                bmod.get_submodule(down_path).register_forward_hook(_parallel_hook(mod, stash))
            n += 1
    return n


def _series_hook(adapter: Bottleneck):
    def hook(module, args, output):
        return output + adapter(output)
    return hook


def _stash_hook(stash: dict):
    def hook(module, args):
        stash["x"] = args[0]
    return hook


def _parallel_hook(adapter: Bottleneck, stash: dict):
    def hook(module, args, output):
        x = stash.pop("x")
        return output + adapter(x)
    return hook


# ---- peft ----------------------------------------------------------------------------------------


def _linear_paths(model: nn.Module, tuned: TunedModel, pred) -> list[str]:
    out = []
    for (prefix, _), tb in zip(find_blocks(model, tuned.arch), tuned.blocks):
        for t in tb.linears:
            if pred(t):
                out.append(f"{prefix}.{t.linear.path}")
    return out


def _peft_config(model: nn.Module, tuned: TunedModel, options: Any):
    import peft

    arch = tuned.arch
    task = PEFT_TASK[arch.task]
    m = tuned.method
    if m in ("lora", "dora", "qlora"):
        targets = _linear_paths(model, tuned, lambda t: t.lora_rank > 0)
        first = next(t for tb in tuned.blocks for t in tb.linears if t.lora_rank)
        alpha = getattr(options, "alpha", first.lora_rank)
        extra: dict[str, Any] = {}
        expert = next((tb.expert_lora for tb in tuned.blocks if tb.expert_lora), ())
        if expert:
            # what peft's utils/transformers_weight_conversion.py `_convert_peft_config_moe` makes of the v4
            # names (methods/moe_lora.py): target_parameters, gate_up_proj at twice the rank and alpha
            extra["target_parameters"] = [name.removeprefix("experts.") for name, _ in expert]
            fused = [rank for name, rank in expert if name == "experts.gate_up_proj"]
            if fused:
                extra["rank_pattern"] = {r".*\.gate_up_proj": fused[0]}
                extra["alpha_pattern"] = {r".*\.gate_up_proj": alpha * fused[0] // first.lora_rank}
        return peft.LoraConfig(r=first.lora_rank, lora_alpha=alpha,
                               lora_dropout=first.lora_dropout, target_modules=targets, task_type=task,
                               use_dora=first.dora, bias="none", **extra)
    if m == "ia3":
        targets = _linear_paths(model, tuned, lambda t: t.ia3 is not None)
        ff = _linear_paths(model, tuned, lambda t: t.ia3 == "in")
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, task_type=task)
    if m in ("prompt", "ptuning", "prefix"):
        if task is None:
            raise NotTraceable(f"peft prompt-learning methods need a causal-lm or seq2seq-lm task, {arch.name} is {arch.task}")
        if m == "prompt":
            return peft.PromptTuningConfig(num_virtual_tokens=tuned.virtual_tokens, task_type=task)
        if m == "ptuning":
            return peft.PromptEncoderConfig(num_virtual_tokens=tuned.virtual_tokens, task_type=task)
        return peft.PrefixTuningConfig(num_virtual_tokens=tuned.blocks[0].prefix_tokens, task_type=task)
    return None


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
