"""Sparse mixture-of-experts decoders: Mixtral and Qwen3-MoE (transformers 5.23).

transformers 5.x stores each layer's experts as fused 3-D nn.Parameters (`MixtralExperts`,
`Qwen3MoeExperts`: `gate_up_proj` E x 2F x D, `down_proj` E x D x F) and the router as a bare
`weight` parameter (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`), none of them nn.Linear. Consequences
the engine follows (methods treat a block's `extra_params` like its norms):

- peft `target_modules="all-linear"` finds only the attention projections: the experts and the
  router stay frozen (peft 0.21 reaches fused expert weights only through `target_parameters`).
- bitsandbytes quantization (transformers integrations/bitsandbytes.py `replace_with_bnb_linear`
  converts `nn.Linear` / `Conv1D` only): under QLoRA the experts stay in the load dtype, and
  peft's `prepare_model_for_kbit_training` casts them, like every non-Params4bit weight, to fp32.
- FLOPs and the step time follow the active parameters: each token runs top_k experts.
"""

from __future__ import annotations

from typing import Any, Mapping

from .arch_modern import _dims, _model, attention_linears, gated_mlp, layer_types, window_for
from .arch_types import ArchError, Block, ModelArch, MoE, Norm  # MoE: re-exported, it lived here


def _experts(name: str, cfg: Mapping[str, Any], key: str) -> tuple[int, int]:
    E, k = cfg.get(key), cfg.get("num_experts_per_tok")
    for field, value in ((key, E), ("num_experts_per_tok", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArchError(f"{name}: config field {field!r} must be a positive integer, got {value!r}")
    if k > E:
        raise ArchError(f"{name}: num_experts_per_tok {k} exceeds the {E} experts")
    return E, k


def mixtral(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """Mixtral (modeling_mixtral.py): Mistral attention, every MLP a MixtralSparseMoeBlock."""
    f, V, D, H, K, L, F, hd = _dims(name, cfg)
    E, k = _experts(name, cfg, "num_local_experts")
    moe = MoE("mixtral", E, k, D, F)
    norms = (Norm("input_layernorm", D, False), Norm("post_attention_layernorm", D, False))
    window = cfg.get("sliding_window")
    block = Block("decoder", attention_linears(D, H, K, hd, False), norms, moe.params(), moe=moe,
                  sliding_window=window if isinstance(window, int) and window > 0 else None)
    return _model(name, cfg, "llama", (block,) * L, f, V, D, H, K, hd, F, False)


def qwen3_moe(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """Qwen3-MoE (modeling_qwen3_moe.py): Qwen3 attention (q/k norms); layer i is sparse when
    `i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0`, else a dense Qwen3MoeMLP."""
    f, V, D, H, K, L, F, hd = _dims(name, cfg)
    E, k = _experts(name, cfg, "num_experts")
    Fm = f.pos_int("moe_intermediate_size")
    moe = MoE("qwen3_moe", E, k, D, Fm, norm_topk=bool(f.opt("norm_topk_prob", False)))
    norms = (Norm("input_layernorm", D, False), Norm("self_attn.q_norm", hd, False),
             Norm("self_attn.k_norm", hd, False), Norm("post_attention_layernorm", D, False))
    attn = attention_linears(D, H, K, hd, bool(f.opt("attention_bias", False)))
    step = int(f.opt("decoder_sparse_step", 1))
    dense_only = set(f.opt("mlp_only_layers", []) or [])
    use_sw = bool(f.opt("use_sliding_window", False)) and cfg.get("sliding_window") is not None
    mwl = int(f.opt("max_window_layers", L))
    kinds = layer_types(name, cfg, L, ["sliding_attention" if use_sw and i >= mwl else "full_attention"
                                       for i in range(L)])
    blocks = []
    for i, kind in enumerate(kinds):
        window = window_for(name, cfg, kind) if use_sw else None
        if i not in dense_only and (i + 1) % step == 0:
            blocks.append(Block("decoder", attn, norms, moe.params(), moe=moe, sliding_window=window))
        else:
            blocks.append(Block("decoder", attn + gated_mlp(D, F, False), norms, sliding_window=window))
    return _model(name, cfg, "llama", tuple(blocks), f, V, D, H, K, hd, F, False, qk_norm="head")


def gpt_oss(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """gpt-oss (modeling_gpt_oss.py): biased q/k/v/o, a learned attention sink per head (`self_attn.sinks`),
    layers alternating sliding-window (128) and global attention (`layer_types`, default even layers
    sliding), every MLP a GptOssMLP: router with bias, top-k on the logits then softmax over the k values,
    experts with biases and the clamped SwiGLU (`_apply_gate`). Published checkpoints hold the experts in
    MXFP4 (`quantization_config.quant_method = "mxfp4"`); training dequantizes them to bf16
    (Mxfp4Config(dequantize=True), the only way to get gradients through them), which is what is modelled."""
    f, V, D, H, K, L, F, hd = _dims(name, {**cfg, "head_dim": cfg.get("head_dim", 64)})
    E, k = _experts(name, cfg, "num_local_experts")
    moe = MoE("gpt_oss", E, k, D, F, bias=True, norm_topk=False, router="router", transposed=True)
    norms = (Norm("input_layernorm", D, False), Norm("post_attention_layernorm", D, False))
    attn = attention_linears(D, H, K, hd, bool(f.opt("attention_bias", True)))
    kinds = layer_types(name, cfg, L, ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)])
    blocks = tuple(Block("decoder", attn, norms, (("self_attn.sinks", H),) + moe.params(), moe=moe,
                         sliding_window=window_for(name, {"sliding_window": 128, **cfg}, kind)) for kind in kinds)
    return _model(name, cfg, "gpt_oss", blocks, f, V, D, H, K, hd, F, False)


BUILDERS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss}
