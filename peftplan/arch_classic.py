"""Builders for the classic families: Llama / Mistral / Qwen2 / Gemma 2, Phi-3, GPT-2, OPT, BLOOM, T5 / mT5,
BERT / RoBERTa, each reading the config.json fields its transformers 5.23 implementation reads
(models/<type>/modeling_<type>.py); `arch.BUILDERS` registers them with the modern and MoE ones."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .arch_types import ArchError, Block, Family, Linear, ModelArch, Norm, _Fields


def _llama_like(name: str, cfg: Mapping[str, Any], family: Family) -> ModelArch:
    """Llama, Mistral, Qwen2, Gemma2 (modeling_llama.py / modeling_mistral.py / modeling_qwen2.py / modeling_gemma2.py)."""
    f = _Fields(name, cfg)
    model_type = f.req("model_type")
    V = f.pos_int("vocab_size")
    D = f.pos_int("hidden_size")
    H = f.pos_int("num_attention_heads")
    K = f.pos_int("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else H
    L = f.pos_int("num_hidden_layers")
    F = f.pos_int("intermediate_size")
    hd = f.pos_int("head_dim") if cfg.get("head_dim") is not None else D // H
    if cfg.get("head_dim") is None and D % H:
        raise ArchError(f"{name}: hidden_size {D} is not divisible by num_attention_heads {H}")
    if model_type == "qwen2":
        # modeling_qwen2.py: q/k/v have bias=True, o_proj bias=False; the MLP has no bias.
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(f.opt("attention_bias", False))
        mlp_bias = bool(f.opt("mlp_bias", False))
    linears = (
        Linear("self_attn.q_proj", D, H * hd, qkv_bias, "q"),
        Linear("self_attn.k_proj", D, K * hd, qkv_bias, "k"),
        Linear("self_attn.v_proj", D, K * hd, qkv_bias, "v"),
        Linear("self_attn.o_proj", H * hd, D, o_bias, "o"),
        Linear("mlp.gate_proj", D, F, mlp_bias, "gate"),
        Linear("mlp.up_proj", D, F, mlp_bias, "up"),
        Linear("mlp.down_proj", F, D, mlp_bias, "down"),
    )
    norm_names = ["input_layernorm", "post_attention_layernorm"]
    if family == "gemma2":
        norm_names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    norms = tuple(Norm(n, D, False) for n in norm_names)
    block = Block("decoder", linears, norms)
    tie = bool(f.opt("tie_word_embeddings", family == "gemma2"))
    act = f.opt("hidden_activation", None) or f.opt("hidden_act", "silu")
    return ModelArch(
        name=name, model_type=model_type, family=family, task="causal-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=K, head_dim=hd,
        intermediate_size=F, gated_mlp=True, activation=str(act), norm_kind="rmsnorm",
        blocks=(block,) * L, embeddings=(("embed_tokens", V, D),),
        final_norms=(Norm("norm", D, False),), head_linears=(), head_extra=(),
        tie_word_embeddings=tie, max_position_embeddings=cfg.get("max_position_embeddings"),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        # Gemma2Config defaults: attn_logit_softcapping 50.0, final_logit_softcapping 30.0 (configuration_gemma2.py);
        # an explicit null turns either off
        attn_logit_softcap=cfg.get("attn_logit_softcapping", 50.0) if family == "gemma2" else None,
        final_logit_softcap=cfg.get("final_logit_softcapping", 30.0) if family == "gemma2" else None,
        config=dict(cfg),
    )


def _llama(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    return _llama_like(name, cfg, "llama")


def _gemma2(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    return _llama_like(name, cfg, "gemma2")


def _phi3(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """Phi-3 (modeling_phi3.py): fused qkv_proj and gate_up_proj, no biases."""
    f = _Fields(name, cfg)
    V, D, H, L, F = (f.pos_int(k) for k in ("vocab_size", "hidden_size", "num_attention_heads",
                                              "num_hidden_layers", "intermediate_size"))
    K = f.pos_int("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else H
    hd = D // H
    linears = (
        Linear("self_attn.qkv_proj", D, (H + 2 * K) * hd, False, "qkv"),
        Linear("self_attn.o_proj", H * hd, D, False, "o"),
        Linear("mlp.gate_up_proj", D, 2 * F, False, "gate_up"),
        Linear("mlp.down_proj", F, D, False, "down"),
    )
    norms = (Norm("input_layernorm", D, False), Norm("post_attention_layernorm", D, False))
    return ModelArch(
        name=name, model_type="phi3", family="phi3", task="causal-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=K, head_dim=hd,
        intermediate_size=F, gated_mlp=True, activation=str(f.opt("hidden_act", "silu")),
        norm_kind="rmsnorm", blocks=(Block("decoder", linears, norms),) * L,
        embeddings=(("embed_tokens", V, D),), final_norms=(Norm("norm", D, False),),
        head_linears=(), head_extra=(), tie_word_embeddings=bool(f.opt("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        sliding_window=cfg.get("sliding_window"), config=dict(cfg),
    )


def _gpt2(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """GPT-2 (modeling_gpt2.py): Conv1D c_attn/c_proj/c_fc with biases, learned positions, tied head."""
    f = _Fields(name, cfg)
    V, D, H, L, P = (f.pos_int(k) for k in ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions"))
    F = f.opt("n_inner", None) or 4 * D
    linears = (
        Linear("attn.c_attn", D, 3 * D, True, "qkv"),
        Linear("attn.c_proj", D, D, True, "o"),
        Linear("mlp.c_fc", D, F, True, "up"),
        Linear("mlp.c_proj", F, D, True, "down"),
    )
    norms = (Norm("ln_1", D, True), Norm("ln_2", D, True))
    return ModelArch(
        name=name, model_type="gpt2", family="gpt2", task="causal-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=D // H,
        intermediate_size=F, gated_mlp=False, activation=str(f.opt("activation_function", "gelu_new")),
        norm_kind="layernorm", blocks=(Block("decoder", linears, norms),) * L,
        embeddings=(("wte", V, D), ("wpe", P, D)), final_norms=(Norm("ln_f", D, True),),
        head_linears=(), head_extra=(), tie_word_embeddings=bool(f.opt("tie_word_embeddings", True)),
        max_position_embeddings=P, config=dict(cfg),
    )


def _opt(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """OPT (modeling_opt.py): learned positions with offset 2, optional project_in/out, post-LN for 350m."""
    f = _Fields(name, cfg)
    V, D, H, L, F, P = (f.pos_int(k) for k in ("vocab_size", "hidden_size", "num_attention_heads",
                                                 "num_hidden_layers", "ffn_dim", "max_position_embeddings"))
    E = f.pos_int("word_embed_proj_dim") if cfg.get("word_embed_proj_dim") is not None else D
    bias = bool(f.opt("enable_bias", True))
    linears = (
        Linear("self_attn.q_proj", D, D, bias, "q"),
        Linear("self_attn.k_proj", D, D, bias, "k"),
        Linear("self_attn.v_proj", D, D, bias, "v"),
        Linear("self_attn.out_proj", D, D, bias, "o"),
        Linear("fc1", D, F, bias, "up"),
        Linear("fc2", F, D, bias, "down"),
    )
    ln_affine = bool(f.opt("layer_norm_elementwise_affine", True))
    norms = (Norm("self_attn_layer_norm", D, True), Norm("final_layer_norm", D, True)) if ln_affine else ()
    pre_ln = bool(f.opt("do_layer_norm_before", True))
    final = (Norm("final_layer_norm", D, True),) if pre_ln and not f.opt("_remove_final_layer_norm", False) else ()
    head_linears = ()
    if E != D:
        head_linears = (Linear("project_out", D, E, False, "proj"), Linear("project_in", E, D, False, "proj"))
    return ModelArch(
        name=name, model_type="opt", family="opt", task="causal-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=D // H,
        intermediate_size=F, gated_mlp=False, activation=str(f.opt("activation_function", "relu")),
        norm_kind="layernorm", blocks=(Block("decoder", linears, norms),) * L,
        embeddings=(("embed_tokens", V, E), ("embed_positions", P + 2, D)),  # OPTLearnedPositionalEmbedding offset 2
        final_norms=final, head_linears=head_linears, head_extra=(),
        tie_word_embeddings=bool(f.opt("tie_word_embeddings", True)), max_position_embeddings=P,
        config=dict(cfg),
    )


def _bloom(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """BLOOM (modeling_bloom.py): fused query_key_value, ALiBi (no position embedding), embedding LayerNorm."""
    f = _Fields(name, cfg)
    V = f.pos_int("vocab_size")
    D = f.pos_int("hidden_size", "n_embed")
    H = f.pos_int("n_head", "num_attention_heads")
    L = f.pos_int("n_layer", "num_hidden_layers")
    linears = (
        Linear("self_attention.query_key_value", D, 3 * D, True, "qkv"),
        Linear("self_attention.dense", D, D, True, "o"),
        Linear("mlp.dense_h_to_4h", D, 4 * D, True, "up"),
        Linear("mlp.dense_4h_to_h", 4 * D, D, True, "down"),
    )
    norms = (Norm("input_layernorm", D, True), Norm("post_attention_layernorm", D, True))
    return ModelArch(
        name=name, model_type="bloom", family="bloom", task="causal-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=D // H,
        intermediate_size=4 * D, gated_mlp=False, activation="bloom_gelu", norm_kind="layernorm",
        blocks=(Block("decoder", linears, norms),) * L, embeddings=(("word_embeddings", V, D),),
        final_norms=(Norm("word_embeddings_layernorm", D, True), Norm("ln_f", D, True)),
        head_linears=(), head_extra=(), tie_word_embeddings=bool(f.opt("tie_word_embeddings", True)),
        max_position_embeddings=None, config=dict(cfg),
    )


def _t5(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """T5 / mT5 (modeling_t5.py): no biases, relative position bias in each stack's first layer, gated FF for v1.1."""
    f = _Fields(name, cfg)
    model_type = f.req("model_type")
    V, D, H, dkv, F, L = (f.pos_int(k) for k in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers"))
    Ld = f.pos_int("num_decoder_layers") if cfg.get("num_decoder_layers") is not None else L
    buckets = f.pos_int("relative_attention_num_buckets") if cfg.get("relative_attention_num_buckets") else 32
    proj = str(f.opt("feed_forward_proj", "relu"))
    gated = proj.startswith("gated-")
    inner = H * dkv

    def attn(module: str, role_prefix: str) -> tuple[Linear, ...]:
        return tuple(Linear(f"{module}.{x}", D if x != "o" else inner, inner if x != "o" else D, False,
                            role_prefix + x) for x in "qkvo")

    def ff(layer: int) -> tuple[Linear, ...]:
        p = f"layer.{layer}.DenseReluDense"
        return ((Linear(f"{p}.wi_0", D, F, False, "gate"), Linear(f"{p}.wi_1", D, F, False, "up")) if gated
                else (Linear(f"{p}.wi", D, F, False, "up"),)) + (Linear(f"{p}.wo", F, D, False, "down"),)
    enc_norms = (Norm("layer_norm", D, False),) * 2
    dec_norms = (Norm("layer_norm", D, False),) * 3
    enc = Block("encoder", attn("layer.0.SelfAttention", "") + ff(1), enc_norms)
    dec = Block("cross-decoder", attn("layer.0.SelfAttention", "") + attn("layer.1.EncDecAttention", "cross_")
                + ff(2), dec_norms)
    rel = (("relative_attention_bias", buckets * H),)
    blocks = ((Block("encoder", enc.linears, enc_norms, rel),) + (enc,) * (L - 1)
              + (Block("cross-decoder", dec.linears, dec_norms, rel),) + (dec,) * (Ld - 1))
    tie = bool(f.opt("tie_word_embeddings", True))
    return ModelArch(
        name=name, model_type=model_type, family="t5", task="seq2seq-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=dkv,
        intermediate_size=F, gated_mlp=gated, activation=proj.removeprefix("gated-"), norm_kind="rmsnorm",
        blocks=blocks, embeddings=(("shared", V, D),),
        final_norms=(Norm("final_layer_norm", D, False), Norm("final_layer_norm", D, False)),
        head_linears=(), head_extra=(), tie_word_embeddings=tie, max_position_embeddings=None,
        keep_in_fp32=("wo",),  # modeling_t5.py / modeling_mt5.py: _keep_in_fp32_modules = ["wo"]
        config=dict(cfg),
    )


def _bert(name: str, cfg: Mapping[str, Any]) -> ModelArch:
    """BERT / RoBERTa for masked LM (modeling_bert.py / modeling_roberta.py): no pooler, tied decoder + bias."""
    f = _Fields(name, cfg)
    model_type = f.req("model_type")
    V, D, H, L, F, P = (f.pos_int(k) for k in ("vocab_size", "hidden_size", "num_attention_heads",
                                                 "num_hidden_layers", "intermediate_size", "max_position_embeddings"))
    T = f.pos_int("type_vocab_size") if cfg.get("type_vocab_size") else 2
    linears = (
        Linear("attention.self.query", D, D, True, "q"),
        Linear("attention.self.key", D, D, True, "k"),
        Linear("attention.self.value", D, D, True, "v"),
        Linear("attention.output.dense", D, D, True, "o"),
        Linear("intermediate.dense", D, F, True, "up"),
        Linear("output.dense", F, D, True, "down"),
    )
    norms = (Norm("LayerNorm", D, True), Norm("LayerNorm", D, True))
    return ModelArch(
        name=name, model_type=model_type, family="bert", task="masked-lm",
        vocab_size=V, hidden_size=D, num_heads=H, num_kv_heads=H, head_dim=D // H,
        intermediate_size=F, gated_mlp=False, activation=str(f.opt("hidden_act", "gelu")),
        norm_kind="layernorm", blocks=(Block("encoder", linears, norms),) * L,
        embeddings=(("word_embeddings", V, D), ("position_embeddings", P, D), ("token_type_embeddings", T, D)),
        # embeddings.LayerNorm, then the MLM head's transform LayerNorm
        final_norms=(Norm("LayerNorm", D, True), Norm("LayerNorm", D, True)),
        head_linears=(Linear("lm_head.dense", D, D, True, "proj"),), head_extra=(("bias", V),),
        tie_word_embeddings=bool(f.opt("tie_word_embeddings", True)), max_position_embeddings=P,
        config=dict(cfg),
    )


BUILDERS: dict[str, Callable[[str, Mapping[str, Any]], ModelArch]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "opt": _opt,
    "bloom": _bloom,
    "t5": _t5,
    "mt5": _t5,
    "bert": _bert,
    "roberta": _bert,
}
