"""Forward programs of the 2025 dense families (arch_modern.py): Qwen3, Gemma 3, OLMo 2, SmolLM3.

Sources, transformers 5.23: models/qwen3/modeling_qwen3.py (Qwen3RMSNorm, Qwen3Attention: q_norm/k_norm
on `q_proj(x).view(..., head_dim)` before RoPE), models/gemma3/modeling_gemma3.py (Gemma3RMSNorm
`output * (1.0 + weight.float())` then `.type_as(x)`, Gemma3DecoderLayer's four norms,
Gemma3TextScaledWordEmbedding), models/olmo2/modeling_olmo2.py (Olmo2RMSNorm `(weight * x).to(input_dtype)`,
Olmo2DecoderLayer post-norms, q/k norms before the head split), models/smollm3/modeling_smollm3.py
(`if self.use_rope:` around apply_rotary_pos_emb), masking_utils.py (`_ignore_causal_mask_sdpa`: a
sliding layer gets a materialised mask once kv_length >= sliding_window), integrations/sdpa_attention.py
(`use_gqa_in_sdpa` is False with a mask: repeat_kv copies of k and v).
"""

from __future__ import annotations

from ..arch import ModelArch
from ..training import Training
from .ops import Ctx, add, elementwise, mul
from .sim import Tensor
from .norms import norm_style, rmsnorm  # noqa: F401  (re-exported)


def _unsloth():  # type: ignore[no-untyped-def]
    """engine/unsloth_lora.py, imported when a block first runs Unsloth's LoRA kernels (`--trainer unsloth`)."""
    from . import unsloth_lora

    return unsloth_lora


def sliding_masked(arch: ModelArch, training: Training, window: int | None, kv_tokens: int) -> bool:
    """masking_utils.py `_ignore_causal_mask_sdpa`: with `local_attention_size` set and
    kv_length >= it, SDPA gets a materialised boolean mask instead of `is_causal`."""
    return training.attention != "eager" and window is not None and kv_tokens >= window


def modern_block_forward(ctx: Ctx, arch: ModelArch, training: Training, h: Tensor, bp, cos: Tensor | None,
                         kv_tokens: int) -> Tensor:  # type: ignore[no-untyped-def]
    """One decoder layer of a qwen3 / gemma3_text / olmo2 / smollm3 model. Consumes `h`."""
    from .attention import _attention, _rope
    from .peft_linear import tuned_linear
    from .adapters import _with_adapters

    tape = ctx.tape
    block = bp.tuned.block
    lps = {lp.tuned.linear.role: lp for lp in bp.linears}
    norms = {n.name: p for n, p in zip(block.norms, bp.norms)}
    style = norm_style(arch)
    H, K, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
    n = ctx.tokens

    def norm(x: Tensor, name: str, rows: int = n) -> Tensor:
        out = rmsnorm(ctx, x, norms[name], rows, style)
        tape.drop(x)
        return out

    # ---- self-attention ----
    residual = h
    x = rmsnorm(ctx, h, norms["input_layernorm"], n, style) if "input_layernorm" in norms else tape.alloc.retain(h)
    fused = "unsloth_lora" in ctx.kernels and _unsloth().qkv(ctx, training, x, lps)  # engine/unsloth_lora.py
    q, k, v = fused or (tuned_linear(ctx, x, lps["q"]), tuned_linear(ctx, x, lps["k"]), tuned_linear(ctx, x, lps["v"]))
    tape.drop(x)
    if arch.qk_norm == "head":
        q, k = norm(q, "self_attn.q_norm", n * H), norm(k, "self_attn.k_norm", n * K)
    elif arch.qk_norm == "proj":
        q, k = norm(q, "self_attn.q_norm"), norm(k, "self_attn.k_norm")
    if cos is not None and block.rope:
        qr, kr = _rope(ctx, q, cos), _rope(ctx, k, cos)
        tape.drop(q, k)
        q, k = qr, kr
    masked_by_prefix = False
    if bp.tuned.prefix_tokens:
        # prefix tuning (as program.py's attn_part): DynamicCache.update cats the trainable prefix keys/values
        # in front of k and v; kv_len != q_len, so transformers passes a mask instead of is_causal
        n_prefix = training.micro_batch * bp.tuned.prefix_tokens * K * hd
        kp = tape.new(k.numel + n_prefix, k.dtype, True, "prefix_cat_k")
        vp = tape.new(v.numel + n_prefix, v.dtype, True, "prefix_cat_v")
        tape.record("cat", [k], [kp], [])
        tape.record("cat", [v], [vp], [])
        tape.drop(k, v)
        k, v, masked_by_prefix = kp, vp, True
    extras = {name: p for (name, _), p in zip(block.extra_params, bp.extras)}
    if arch.family == "gpt_oss":
        from .program_gptoss import sink_attention

        a = sink_attention(ctx, arch, training, q, k, v, kv_tokens, extras["self_attn.sinks"])
    else:
        masked = masked_by_prefix or sliding_masked(arch, training, block.sliding_window, kv_tokens)
        a = _attention(ctx, arch, training, q, k, v, kv_tokens, True, masked=masked)
    tape.drop(q, k, v)
    o = ("unsloth_lora" in ctx.kernels and _unsloth().o(ctx, training, a, lps)) or tuned_linear(ctx, a, lps["o"])
    tape.drop(a)
    o = _with_adapters(ctx, "after-attn", o, bp)
    sandwich = "pre_feedforward_layernorm" in norms  # gemma3: norms before and after each sub-layer
    post_only = "input_layernorm" not in norms  # olmo2: norms after each sub-layer only
    if sandwich or post_only:
        o = norm(o, "post_attention_layernorm")
    h = add(ctx, residual, o)
    tape.drop(residual, o)
    # ---- MLP ----
    residual = h
    pre = "pre_feedforward_layernorm" if sandwich else "" if post_only else "post_attention_layernorm"
    x = rmsnorm(ctx, h, norms[pre], n, style) if pre else tape.alloc.retain(h)
    if block.moe is not None:
        from .program_moe import moe_forward

        m = moe_forward(ctx, x, block.moe, extras, bp.expert_lora,  # mixtral / qwen3_moe / gpt_oss sparse MLP
                        dict(bp.tuned.expert_lora))
    elif "unsloth_lora" in ctx.kernels and (fused_mlp := _unsloth().mlp(ctx, training, x, lps)) is not None:
        m = fused_mlp  # Unsloth's LoRA_MLP (engine/unsloth_lora.py)
    else:
        gate = tuned_linear(ctx, x, lps["gate"])
        if "glu" in ctx.kernels:  # a trainer's fused kernel (engine/liger.py)
            from .liger import glu
            up = tuned_linear(ctx, x, lps["up"])
            prod = glu(ctx, gate, up)
            tape.drop(gate, up)
        else:
            # `self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))` (modeling_smollm3.py /
            # modeling_qwen3.py MLP.forward): the activation runs before up_proj, so its node is older and
            # backward (highest sequence number first, torch/csrc/autograd/engine.cpp ReadyQueue) runs up_proj's
            # nodes while the activation's saved input and incoming gradient are still alive
            act = elementwise(ctx, "act", gate)  # silu / gelu_pytorch_tanh save their input
            tape.drop(gate)
            up = tuned_linear(ctx, x, lps["up"])
            prod = mul(ctx, act, up)
            tape.drop(act, up)
        m = tuned_linear(ctx, prod, lps["down"])
        tape.drop(prod)
    for spec, down, upw in [s for s in bp.adapters if s[0].placement == "parallel-mlp"]:
        from .adapters import _adapter

        pa = _adapter(ctx, x, spec, down, upw)
        m2 = add(ctx, m, pa)
        tape.drop(m, pa)
        m = m2
    tape.drop(x)
    m = _with_adapters(ctx, "after-mlp", m, bp)
    if "post_feedforward_layernorm" in norms:
        m = norm(m, "post_feedforward_layernorm")
    out = add(ctx, residual, m)
    tape.drop(residual, m)
    return out


