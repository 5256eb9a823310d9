"""Builders for the 2025 dense decoder families: Qwen3, Gemma 3 (text), OLMo 2, SmolLM3.

Each reads the fields its transformers 5.23 implementation reads (models/<type>/modeling_<type>.py and
configuration_<type>.py); `arch.BUILDERS` registers them. What differs from Llama:

- qwen3 (Qwen3Attention): `q_norm` / `k_norm`, RMSNorms over head_dim applied per head after the
  projection, before RoPE; per-layer sliding window only when `use_sliding_window` (off in every
  published Qwen3 config).
- gemma3_text (Gemma3DecoderLayer): four norms per block (input, post-attention, pre- and
  post-feedforward), Gemma's `(1 + weight)` RMSNorm, q/k norms over head_dim, layers alternating
  sliding-window and global attention (`layer_types`, or `sliding_window_pattern`, default 6: every
  6th layer global), an embedding scaled by sqrt(hidden_size) (Gemma3TextScaledWordEmbedding), a tied
  head and optional final logit soft-capping.
- olmo2 (Olmo2DecoderLayer): no pre-norms; the norms follow attention and MLP
  (`post_attention_layernorm`, `post_feedforward_layernorm`); q/k norms over the whole projection
  width (H*hd and K*hd), `(weight * x).to(input_dtype)`.
- smollm3 (SmolLM3Attention): Llama with RoPE skipped on every `no_rope_layer_interval`-th layer
  (`no_rope_layers`, default interval 4).
"""

from __future__ import annotations

from typing import Any, Mapping

from .arch_types import ArchError, Block, Linear, ModelArch, Norm, _Fields


def _dims(name: str, cfg: Mapping[str, Any]) -> tuple[_Fields, int, int, int, int, int, int, int]:
    f = _Fields(name, cfg)
    V = f.pos_int("vocab_size")
    D = f.pos_int("hidden_size")
    H = f.pos_int("num_attention_heads")
    K = f.pos_int("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else H
    L = f.pos_int("num_hidden_layers")
    F = f.pos_int("intermediate_size")
    if cfg.get("head_dim") is None and D % H:
        raise ArchError(f"{name}: hidden_size {D} is not divisible by num_attention_heads {H}")
    hd = f.pos_int("head_dim") if cfg.get("head_dim") is not None else D // H
    return f, V, D, H, K, L, F, hd


def attention_linears(D: int, H: int, K: int, hd: int, bias: bool) -> tuple[Linear, ...]:
    return (
        Linear("self_attn.q_proj", D, H * hd, bias, "q"),
        Linear("self_attn.k_proj", D, K * hd, bias, "k"),
        Linear("self_attn.v_proj", D, K * hd, bias, "v"),
        Linear("self_attn.o_proj", H * hd, D, bias, "o"),
    )


def gated_mlp(D: int, F: int, bias: bool, prefix: str = "mlp.") -> tuple[Linear, ...]:
    return (
        Linear(f"{prefix}gate_proj", D, F, bias, "gate"),
        Linear(f"{prefix}up_proj", D, F, bias, "up"),
        Linear(f"{prefix}down_proj", F, D, bias, "down"),
    )


def layer_types(name: str, cfg: Mapping[str, Any], L: int, default: list[str]) -> list[str]:
    """config.layer_types when given (validated), else `default`."""
    given = cfg.get("layer_types")
    if given is None:
        return default
    if not isinstance(given, list) or len(given) != L:
        raise ArchError(f"{name}: layer_types must list one type per layer ({L})")
    return [str(t) for t in given]


def window_for(name: str, cfg: Mapping[str, Any], kind: str) -> int | None:
    if kind == "full_attention":
        return None
    if kind != "sliding_attention":
        raise ArchError(f"{name}: unsupported layer type {kind!r} (supported: full_attention, sliding_attention)")
    window = cfg.get("sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ArchError(f"{name}: sliding_attention layers need a positive integer sliding_window")
    return window


def _model(name: str, cfg: Mapping[str, Any], family: str, blocks: tuple[Block, ...], f: _Fields, V: int, D: int,
           H: int, K: int, hd: int, F: int, tie_default: bool, **extra: Any) -> ModelArch:
    act = f.opt("hidden_activation", None) or f.opt("hidden_act", "silu")
    return ModelArch(
        name=name, model_type=str(cfg["model_type"]), family=family, task="causal-lm",  # type: ignore[arg-type]
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=K, head_dim=hd,
        intermediate_size=F, gated_mlp=True, activation=str(act), norm_kind="rmsnorm",
        blocks=blocks, embeddings=(("embed_tokens", V, D),), final_norms=(Norm("norm", D, False),),
        head_linears=(), head_extra=(), tie_word_embeddings=bool(f.opt("tie_word_embeddings", tie_default)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        sliding_window=next((b.sliding_window for b in blocks if b.sliding_window), None),
        config=dict(cfg), **extra,
    )


def qwen3(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """Qwen3 (modeling_qwen3.py): Llama plus per-head q_norm / k_norm; attention_bias default False."""
    f, V, D, H, K, L, F, hd = _dims(name, cfg)
    bias = bool(f.opt("attention_bias", False))
    linears = attention_linears(D, H, K, hd, bias) + gated_mlp(D, F, False)
    norms = (Norm("input_layernorm", D, False), Norm("self_attn.q_norm", hd, False),
             Norm("self_attn.k_norm", hd, False), Norm("post_attention_layernorm", D, False))
    # configuration_qwen3.py: sliding layers only with use_sliding_window, from max_window_layers on
    use_sw = bool(f.opt("use_sliding_window", False)) and cfg.get("sliding_window") is not None
    mwl = int(f.opt("max_window_layers", L))
    kinds = layer_types(name, cfg, L, ["sliding_attention" if use_sw and i >= mwl else "full_attention"
                                       for i in range(L)])
    blocks = tuple(Block("decoder", linears, norms, sliding_window=window_for(name, cfg, k) if use_sw else None)
                   for k in kinds)
    return _model(name, cfg, "llama", blocks, f, V, D, H, K, hd, F, False, qk_norm="head")


def gemma3_text(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """Gemma 3 text model (modeling_gemma3.py Gemma3ForCausalLM)."""
    f, V, D, H, K, L, F, hd = _dims(name, cfg)
    if cfg.get("head_dim") is None:
        raise ArchError(f"{name}: gemma3_text config lacks 'head_dim'")
    bias = bool(f.opt("attention_bias", False))
    linears = attention_linears(D, H, K, hd, bias) + gated_mlp(D, F, False)
    norms = (Norm("input_layernorm", D, False), Norm("self_attn.q_norm", hd, False),
             Norm("self_attn.k_norm", hd, False), Norm("post_attention_layernorm", D, False),
             Norm("pre_feedforward_layernorm", D, False), Norm("post_feedforward_layernorm", D, False))
    pattern = int(f.opt("sliding_window_pattern", 6))  # configuration_gemma3.py `_sliding_window_pattern`
    kinds = layer_types(name, cfg, L, ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(L)])
    blocks = tuple(Block("decoder", linears, norms, sliding_window=window_for(name, cfg, k)) for k in kinds)
    cap = cfg.get("final_logit_softcapping")
    return _model(name, cfg, "gemma3", blocks, f, V, D, H, K, hd, F, True, qk_norm="head", embed_scale=True,
                  final_logit_softcap=float(cap) if cap else None)


def olmo2(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """OLMo 2 (modeling_olmo2.py): post-norms only, q/k norms over the full projection width."""
    f, V, D, H, K, L, F, hd = _dims(name, cfg)
    bias = bool(f.opt("attention_bias", False))
    linears = attention_linears(D, H, K, hd, bias) + gated_mlp(D, F, False)
    norms = (Norm("self_attn.q_norm", H * hd, False), Norm("self_attn.k_norm", K * hd, False),
             Norm("post_attention_layernorm", D, False), Norm("post_feedforward_layernorm", D, False))
    blocks = (Block("decoder", linears, norms),) * L
    return _model(name, cfg, "olmo2", blocks, f, V, D, H, K, hd, F, False, qk_norm="proj")


def smollm3(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """SmolLM3 (modeling_smollm3.py): Llama with NoPE layers (`no_rope_layers[i] == 0`)."""
    f, V, D, H, K, L, F, hd = _dims(name, cfg)
    bias = bool(f.opt("attention_bias", False))
    linears = attention_linears(D, H, K, hd, bias) + gated_mlp(D, F, bool(f.opt("mlp_bias", False)))
    norms = (Norm("input_layernorm", D, False), Norm("post_attention_layernorm", D, False))
    interval = int(f.opt("no_rope_layer_interval", 4))
    rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
    if len(rope) != L:
        raise ArchError(f"{name}: no_rope_layers must list one flag per layer ({L})")
    use_sw = bool(f.opt("use_sliding_window", False)) and cfg.get("sliding_window") is not None
    # configuration_smollm3.py: a sliding layer is a NoPE layer when use_sliding_window
    blocks = tuple(Block("decoder", linears, norms, rope=bool(r),
                         sliding_window=cfg["sliding_window"] if use_sw and not r else None) for r in rope)
    return _model(name, cfg, "llama", blocks, f, V, D, H, K, hd, F, True)


# configuration_gemma3.py Gemma3TextConfig defaults: hub config.json files of the multimodal checkpoints
# (model_type "gemma3") list only the text fields that differ from these
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
}


def gemma3_multimodal(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """A Gemma 3 vision-language config.json (Gemma3ForConditionalGeneration): its language model only, as
    Gemma3ForCausalLM builds it from `text_config` (the SigLIP tower and projector are not modelled)."""
    text = cfg.get("text_config")
    if not isinstance(text, Mapping):
        raise ArchError(f"{name}: a gemma3 config.json needs a 'text_config' object (peftplan models its text decoder)")
    merged = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}, "model_type": "gemma3_text"}
    if cfg.get("tie_word_embeddings") is not None and text.get("tie_word_embeddings") is None:
        merged["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return gemma3_text(name, merged)


BUILDERS = {"qwen3": qwen3, "gemma3_text": gemma3_text, "gemma3": gemma3_multimodal, "olmo2": olmo2,
            "smollm3": smollm3}
