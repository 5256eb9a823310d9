"""The transformers model from the config, as the method's `TunedModel` wants it: the class registered for
the `model_type` built on the meta device (no download, no remote code), the attention implementation,
the transformer blocks found in it, and each base parameter's dtype and trainability (`ParamSpec`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ModelArch
from ..dtypes import BF16, FP16, FP32, DType
from ..training import Training
from ..tuned import TunedModel
from . import HarnessError

TORCH_DTYPES = {FP32.name: torch.float32, BF16.name: torch.bfloat16, FP16.name: torch.float16}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM",
                "masked-lm": "AutoModelForMaskedLM"}


def torch_dtype(d: DType) -> torch.dtype:
    try:
        return TORCH_DTYPES[d.name]
    except KeyError:
        raise HarnessError(f"no torch dtype for {d.name}") from None


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
