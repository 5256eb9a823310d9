"""The modules a method adds on top of the transformers model: bottleneck adapters (a `Bottleneck` hooked
after attention / the MLP, or parallel to the MLP) and the peft config (LoRA / DoRA / QLoRA, IA3, prompt,
p-tuning, prefix) `peft.get_peft_model` applies."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tuned import TunedModel
from . import HarnessError, NotTraceable
from .hf_model import find_blocks, torch_dtype

PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "masked-lm": None}


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
