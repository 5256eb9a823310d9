"""The forward pass of a TunedModel as ops on the symbolic tape, following the HF implementations: the
embeddings, each block of the classic families (program_modern.py / program_moe.py / program_gptoss.py hold the
2025 families), the final norm and the loss. The block's parts live in their own modules: params.py (the
parameters), peft_linear.py (a target linear with its adapter), norms.py, attention.py, dropout.py.

Sources, transformers 5.23: models/llama/modeling_llama.py (LlamaRMSNorm, apply_rotary_pos_emb,
LlamaMLP, LlamaDecoderLayer), integrations/sdpa_attention.py, loss/loss_utils.py
(ForCausalLMLoss upcasts logits to fp32), models/gpt2, opt, bloom, bert, t5. peft 0.21:
tuners/lora/layer.py (Linear.forward casts x to the adapter dtype per adapter), tuners/lora/dora.py,
tuners/ia3/layer.py. bitsandbytes 0.50: nn/modules.py Linear4bit.forward, autograd/_functions.py
MatMul4Bit (dequantizes the weight in forward and again in backward, saves no activation).
"""

from __future__ import annotations
from ..arch import ModelArch
from ..dtypes import FP32, INT64
from ..training import Training
from ..tuned import TunedModel
from .autograd import Param
from . import ops
from .ops import Ctx, add, cast, elementwise, linear, mul
from .sim import Tensor, rounded
from .program_modern import modern_block_forward
from ..arch_modern import BUILDERS as _MODERN_BUILDERS
from ..arch_moe import BUILDERS as _MOE_BUILDERS
from .params import BlockParams, LinearParams, ModelParams  # noqa: F401  (LinearParams re-exported)
from .dropout import _dropout, attention_dropout, hidden_dropout  # noqa: F401
from .peft_linear import (BNB_4BIT_BLOCKSIZE, BNB_GEMM_4BIT_CUSTOM_MAX_M, _dora, _ia3_scaling,  # noqa: F401
                          _lora, _lora_bnb_autocast, _quantized_base, tuned_linear)
from .norms import _layernorm, _norm, _rmsnorm, _t5_layernorm  # noqa: F401
from .attention import _attention, _rope, _softcap  # noqa: F401
from .adapters import _adapter, _with_adapters  # noqa: F401  (_adapter re-exported)


def _unsloth():  # type: ignore[no-untyped-def]
    """engine/unsloth_lora.py, imported when a block first runs Unsloth's LoRA kernels (`--trainer unsloth`)."""
    from . import unsloth_lora

    return unsloth_lora


MODERN_TYPES = frozenset(_MODERN_BUILDERS) | frozenset(_MOE_BUILDERS)


def embeddings_out(ctx: Ctx, arch: ModelArch, h: Tensor, params: "ModelParams") -> Tensor:
    """What the embedding module does after the lookups (and position adds); consumes `h`.

    bert/roberta (BertEmbeddings.forward): LayerNorm then dropout(hidden_dropout_prob); bloom
    (BloomModel.forward): word_embeddings_layernorm; gpt2 (`self.drop`, embd_pdrop), opt
    (`nn.functional.dropout(hidden_states, p=self.dropout)` in OPTDecoder) and t5 (T5Stack
    `self.dropout(inputs_embeds)`): dropout only. The dropout saves its mask only when the embeddings
    require grad (full fine-tuning, prompt learning, checkpointing's enable_input_require_grads).
    """
    if arch.family in ("bert", "bloom") and len(params.final_norms) == 2:
        hn = _norm(ctx, arch, h, params.final_norms[0])
        ctx.tape.drop(h)
        h = hn
    p = float(arch.config.get("embd_pdrop", 0.0) or 0.0) if arch.family == "gpt2" else \
        (hidden_dropout(arch) if arch.family in ("bert", "t5") else 0.0)  # OPTDecoder (5.23) sets but never applies it
    out = _dropout(ctx, h, p)
    ctx.tape.drop(h)
    return out


def stack_locals(ctx: Ctx, arch: ModelArch, h: Tensor, batch: int) -> list[Tensor]:
    """Tensors the stack's forward keeps in Python locals until it returns, made before its position add;
    `h` is `inputs_embeds` (retained: the add does not rebind it). The caller releases them when the
    stack's forward ends.

    GPT2Model.forward: `inputs_embeds`, `position_ids` (arange, 1 x T int64) and `position_embeds =
    self.wpe(position_ids)` (1 x T x d). OPTDecoder.forward: `position_attention_mask` (torch.ones, B x T
    fp32), `position_ids` (B x T int64), `pos_embeds` (B x T x d) and `inputs_embeds` (project_in's
    output when the model has one). Was -1.1% on opt-350m DoRA, whose peak is in layer 0's forward
    (fuzz seed 20261202). Other families add no position embedding here (rotary / ALiBi / none)."""
    if arch.family not in ("gpt2", "opt") or not arch.embeddings[1:]:
        return []
    tape = ctx.tape
    tokens = h.numel // arch.hidden_size  # B x T, virtual tokens included (peft cats them first)
    rows = tokens if arch.family == "opt" else tokens // batch
    out = [tape.alloc.new(tokens, FP32, "temporaries", label="position_attention_mask")] \
        if arch.family == "opt" else []
    out.append(tape.alloc.new(rows, INT64, "temporaries", label="position_ids"))
    out.append(tape.alloc.new(rows * arch.hidden_size, h.dtype, "temporaries", label="position_embeds"))
    out.append(tape.alloc.retain(h))
    return out


def stack_end(ctx: Ctx, arch: ModelArch, h: Tensor, norm: "Param") -> Tensor:
    """The last norm of a stack; T5Stack.forward follows `final_layer_norm` with `self.dropout`
    (encoder and decoder). Consumes `h`."""
    hn = _norm(ctx, arch, h, norm)
    ctx.tape.drop(h)
    if arch.family != "t5":
        return hn
    out = _dropout(ctx, hn, hidden_dropout(arch))
    ctx.tape.drop(hn)
    return out


def head_transform(ctx: Ctx, arch: ModelArch, h: Tensor, params: "ModelParams") -> Tensor:
    """bert/roberta MLM head before the decoder: dense, gelu, LayerNorm (BertPredictionHeadTransform,
    RobertaLMHead.forward); `gelu` saves its input. Other families: the final norm. Consumes `h`."""
    if arch.family == "bert" and params.head_linears:
        d = linear(ctx, h, params.head_linears[0], None, arch.hidden_size)
        ctx.tape.drop(h)
        h = elementwise(ctx, "act", d)
        ctx.tape.drop(d)
    for n in params.final_norms[-1:]:
        h = stack_end(ctx, arch, h, n)
    return h


def _gelu_new(ctx: Ctx, x: Tensor) -> Tensor:
    """transformers activations.py NewGELUActivation (gpt2 "gelu_new"; T5/mT5 "gated-gelu" maps
    dense_act_fn to "gelu_new"), written out in Python:
    `0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))`.
    Saved: pow's input (fp32 under autocast: pow is on CUDA autocast's fp32 list, so x is upcast first),
    tanh's output, and both operands of the final mul (0.5*x and 1+tanh) — four activation-sized
    tensors instead of one; the fp32 ones promote the output to fp32 under autocast.
    """
    tape = ctx.tape
    half = elementwise(ctx, "mul_scalar", x, save_inputs=False)
    xf = cast(ctx, x, FP32) if ctx.autocast is not None else tape.alloc.retain(x)
    cube = elementwise(ctx, "pow", xf)
    tape.drop(xf)
    c = elementwise(ctx, "mul_scalar", cube, save_inputs=False)
    tape.drop(cube)
    inner = add(ctx, x, c)
    tape.drop(c)
    inner2 = elementwise(ctx, "mul_scalar", inner, save_inputs=False)
    tape.drop(inner)
    t = elementwise(ctx, "tanh", inner2, save_inputs=False, save_output=True)
    tape.drop(inner2)
    u = elementwise(ctx, "add_scalar", t, save_inputs=False)
    tape.drop(t)
    out = mul(ctx, half, u)
    tape.drop(half, u)
    return out


# transformers models/bloom/modeling_bloom.py `bloom_gelu_back` (GeLUFunction.backward), in eager Python: beside the
# incoming gradient, `tanh_out` (a local until it returns), `0.5 * x`, `1 - tanh_out * tanh_out`, then
# `0.1070322243 * x` and its product with x are five input-sized temporaries alive at once; the input's gradient
# `ff * g` comes later, when at most `tanh_out` and `ff` are left (four beyond the gradient, at its peak)
BLOOM_GELU_BACK_TEMPS = 4


def _bloom_gelu(ctx: Ctx, x: Tensor) -> Tensor:
    """BLOOM's GeLUFunction: saves its input; its backward (`bloom_gelu_back`) runs in x's dtype (no custom_bwd,
    so outside autocast) and holds BLOOM_GELU_BACK_TEMPS input-sized temporaries with the input's gradient."""
    tape = ctx.tape
    out = tape.new(x.numel, x.dtype, x.requires_grad, "act")
    tape.record("act", [x], [out], [x], backward_scratch=BLOOM_GELU_BACK_TEMPS * rounded(x.dtype.bytes_for(x.numel)))
    return out


def block_forward(ctx: Ctx, arch: ModelArch, training: Training, h: Tensor, bp: BlockParams,
                  cos: Tensor | None, kv_tokens: int, encoder_out: Tensor | None = None) -> Tensor:
    """One decoder/encoder layer. Consumes the caller's reference to `h`; returns the new hidden state."""
    c = ops.COUNTER[0]
    before = c.forward if c is not None else 0
    if arch.model_type in MODERN_TYPES:  # qwen3 / gemma3_text / olmo2 / smollm3 (program_modern.py)
        out = modern_block_forward(ctx, arch, training, h, bp, cos, kv_tokens)
    else:
        out = _block_forward(ctx, arch, training, h, bp, cos, kv_tokens, encoder_out)
    if c is not None:
        c.block_forward += c.forward - before  # what gradient checkpointing runs again in backward
    return out


def _block_forward(ctx: Ctx, arch: ModelArch, training: Training, h: Tensor, bp: BlockParams,
                   cos: Tensor | None, kv_tokens: int, encoder_out: Tensor | None = None) -> Tensor:
    tape = ctx.tape
    lps = {lp.tuned.linear.role: lp for lp in bp.linears}
    norms = iter(bp.norms)
    pre_ln = not (arch.family == "opt" and not arch.config.get("do_layer_norm_before", True)) and arch.family != "bert"
    drop_p = hidden_dropout(arch)

    def attn_part(x: Tensor, prefix: str, kv_src: Tensor | None, causal: bool) -> Tensor:
        held_base = None
        if f"{prefix}qkv" in lps:
            qkv = tuned_linear(ctx, x, lps[f"{prefix}qkv"])
            H, K, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
            n = ctx.tokens
            q = tape.new(n * H * hd, qkv.dtype, qkv.requires_grad, "q_split")
            k = tape.new(n * K * hd, qkv.dtype, qkv.requires_grad, "k_split")
            if cos is not None and not prefix:
                # modeling_phi3.py Phi3Attention: q/k/v are slices (views) of qkv_proj's output; q and k
                # are replaced by their rotary copies, but the value view goes to SDPA, which saves it:
                # the whole qkv storage stays alive with it. v is modelled as a zero-byte view and qkv
                # is held by the attention node's saved tensors (was: a v-sized copy, -6 MiB/layer on
                # phi3-mini b1 s512, -1.4%)
                v = Tensor(n * K * hd, qkv.dtype, "temporaries", qkv.requires_grad, 0, 1, True, "v_view")
                held_base = tape.alloc.retain(qkv)
            else:
                v = tape.new(n * K * hd, qkv.dtype, qkv.requires_grad, "v_split")
            tape.record("split", [qkv], [q, k, v], [])
            tape.drop(qkv)
        elif fused := ("unsloth_lora" in ctx.kernels and not prefix and _unsloth().qkv(ctx, training, x, lps)):
            q, k, v = fused  # Unsloth's LoRA_QKV (engine/unsloth_lora.py)
        else:
            q = tuned_linear(ctx, x, lps[f"{prefix}q"])
        src = kv_src if kv_src is not None else x
        if f"{prefix}qkv" not in lps and not fused:
            k = tuned_linear(ctx, src, lps[f"{prefix}k"])
            v = tuned_linear(ctx, src, lps[f"{prefix}v"])
        if cos is not None and not prefix:
            qr, kr = _rope(ctx, q, cos), _rope(ctx, k, cos)
            tape.drop(q, k)
            q, k = qr, kr
        if bp.tuned.prefix_tokens and not prefix:
            # prefix tuning: DynamicCache.update concatenates the trainable prefix keys/values in
            # front of k and v (torch.cat: new tensors that require grad)
            n_prefix = training.micro_batch * bp.tuned.prefix_tokens * arch.num_kv_heads * arch.head_dim
            kp = tape.new(k.numel + n_prefix, k.dtype, True, "prefix_cat_k")
            vp = tape.new(v.numel + n_prefix, v.dtype, True, "prefix_cat_v")
            tape.record("cat", [k], [kp], [])
            tape.record("cat", [v], [vp], [])
            tape.drop(k, v, held_base)  # the value view is consumed by the cat: qkv is not held
            k, v, held_base = kp, vp, None
        # cross-attention attends over the encoder sequence: its length is the encoder output's rows
        # (T5Attention: key/value states from `key_value_states`), not this stack's kv length
        enc_tokens = src.numel // (training.micro_batch * arch.hidden_size) if prefix else kv_tokens
        bias = None
        if arch.family == "t5":
            # T5Attention.forward: the first layer of each stack builds `position_bias`
            # (1, n_heads, q_len, k_len) in the query dtype (compute_bias for self-attention,
            # torch.zeros for cross-attention), later layers reuse it; SDPA receives it as attn_mask
            # and saves it: one tensor per stack and attention kind, alive until backward.
            key = ("t5_position_bias", bp.tuned.block.stack == "encoder", prefix)
            bias = ctx.cast_cache.get(key)  # type: ignore[call-overload]
            if bias is None:
                bias = tape.new(arch.num_heads * (ctx.tokens // training.micro_batch) * enc_tokens,
                                ctx.autocast or q.dtype, False, "t5_position_bias")
                ctx.cast_cache[key] = bias  # type: ignore[index]  # dropped by Ctx.end_forward
        a = _attention(ctx, arch, training, q, k, v, enc_tokens, causal,
                       masked=bool(bp.tuned.prefix_tokens) and not prefix, bias=bias, hold=held_base)
        tape.drop(q, k, v, held_base)
        o = ("unsloth_lora" in ctx.kernels and not prefix and _unsloth().o(ctx, training, a, lps)) \
            or tuned_linear(ctx, a, lps[f"{prefix}o"])
        tape.drop(a)
        od = _dropout(ctx, o, drop_p)
        tape.drop(o)
        return od

    def mlp_part(x: Tensor) -> Tensor:
        if "unsloth_lora" in ctx.kernels and (fused := _unsloth().mlp(ctx, training, x, lps)) is not None:
            return fused  # Unsloth's LoRA_MLP (engine/unsloth_lora.py)
        if "gate_up" in lps:
            gu = tuned_linear(ctx, x, lps["gate_up"])
            gate = tape.new(gu.numel // 2, gu.dtype, gu.requires_grad, "chunk")
            up = tape.new(gu.numel // 2, gu.dtype, gu.requires_grad, "chunk")
            tape.record("chunk", [gu], [gate, up], [])
            tape.drop(gu)
        elif "gate" in lps:
            gate = tuned_linear(ctx, x, lps["gate"])
            # `self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))` (modeling_llama.py LlamaMLP and
            # every gated MLP of these families; T5DenseGatedActDense: `act(wi_0(h))` before `wi_1(h)`): the
            # activation runs before up_proj, so up_proj's forward temporaries meet the activation's output, and
            # backward (highest sequence number first, torch/csrc/autograd/engine.cpp ReadyQueue) runs up_proj's
            # nodes while the activation's saved input and its incoming gradient are alive. Liger's fused GLU
            # takes both projections.
            up = tuned_linear(ctx, x, lps["up"]) if "glu" in ctx.kernels else None
        else:
            gate, up = tuned_linear(ctx, x, lps["up"]), None
        if "glu" in ctx.kernels and up is not None and "gate" in lps:  # a trainer's fused kernel (engine/liger.py)
            from .liger import glu
            act = glu(ctx, gate, up)
            tape.drop(up)
            up = None
        elif arch.activation == "gelu_new" or (arch.family == "t5" and arch.activation == "gelu"):
            act = _gelu_new(ctx, gate)
        elif arch.activation == "relu":  # ReluBackward0 uses its result (derivatives.yaml threshold_backward)
            act = elementwise(ctx, "act", gate, save_inputs=False, save_output=True)
        elif arch.activation == "bloom_gelu":
            act = _bloom_gelu(ctx, gate)
        else:
            act = elementwise(ctx, "act", gate)  # silu / gelu / bloom GeLUFunction save their input
        tape.drop(gate)
        if up is None and "gate" in lps and "glu" not in ctx.kernels:
            up = tuned_linear(ctx, x, lps["up"])
        if up is not None:
            prod = mul(ctx, act, up)
            tape.drop(act, up)
        else:
            prod = act
        if arch.family == "t5":
            pd = _dropout(ctx, prod, drop_p)
            tape.drop(prod)
            prod = pd
        down = tuned_linear(ctx, prod, lps["down"])
        tape.drop(prod)
        dd = _dropout(ctx, down, drop_p)
        tape.drop(down)
        return dd

    # ---- self-attention ----
    residual = h
    x = _norm(ctx, arch, h, next(norms)) if pre_ln else tape.alloc.retain(h)
    a = attn_part(x, "", None, causal=arch.task == "causal-lm" or bp.tuned.block.stack != "encoder")
    tape.drop(x)
    a = _with_adapters(ctx, "after-attn", a, bp)
    if arch.family == "gemma2":
        an = _norm(ctx, arch, a, next(norms))
        tape.drop(a)
        a = an
    h = add(ctx, residual, a)
    tape.drop(residual, a)
    if not pre_ln:
        hn = _norm(ctx, arch, h, next(norms))
        tape.drop(h)
        h = hn
    # ---- cross-attention (T5 decoder) ----
    if bp.tuned.block.stack == "cross-decoder" and encoder_out is not None:
        residual = h
        x = _norm(ctx, arch, h, next(norms))
        c = attn_part(x, "cross_", encoder_out, causal=False)
        tape.drop(x)
        h = add(ctx, residual, c)
        tape.drop(residual, c)
    # ---- MLP ----
    residual = h
    x = _norm(ctx, arch, h, next(norms)) if pre_ln else tape.alloc.retain(h)
    parallel = [s for s in bp.adapters if s[0].placement == "parallel-mlp"]
    m = mlp_part(x)
    for spec, down, up in parallel:
        pa = _adapter(ctx, x, spec, down, up)
        m2 = add(ctx, m, pa)
        tape.drop(m, pa)
        m = m2
    tape.drop(x)
    m = _with_adapters(ctx, "after-mlp", m, bp)
    if arch.family == "gemma2":
        mn = _norm(ctx, arch, m, next(norms))
        tape.drop(m)
        m = mn
    h2 = add(ctx, residual, m)
    tape.drop(residual, m)
    if not pre_ln:
        hn = _norm(ctx, arch, h2, next(norms))
        tape.drop(h2)
        h2 = hn
    return h2


def loss_forward(ctx: Ctx, arch: ModelArch, h: Tensor, head: Param, vocab: int, label_tokens: int) -> Tensor:
    """lm_head, fp32 upcast of the logits, cross-entropy (log_softmax saves its output).

    Causal LMs: ForCausalLMLoss upcasts (loss/loss_utils.py `logits = logits.float()`). BERT/RoBERTa MLM
    and T5 call `CrossEntropyLoss()` on the logits as they are (modeling_bert.py, modeling_t5.py): in
    pure half precision log_softmax runs in half; under autocast log_softmax is on CUDA autocast's
    fp32 list, which casts its input to fp32 just as `.float()` does."""
    tape = ctx.tape
    logits = linear(ctx, h, head, None, vocab)
    if arch.final_logit_softcap is not None:
        logits = _softcap(ctx, logits)  # Gemma 2 / Gemma 3 final_logit_softcapping
    loss_dtype = FP32 if arch.task == "causal-lm" or ctx.autocast is not None else logits.dtype
    logits32 = cast(ctx, logits, loss_dtype)
    tape.drop(logits)  # Trainer.compute_loss keeps only the loss: the half logits die here
    if logits32.category != "saved_activations":
        tape.alloc.recategorize(logits32, "loss_logits")
    lsm = tape.new(logits32.numel, loss_dtype, logits32.requires_grad, "log_softmax")
    tape.alloc.recategorize(lsm, "loss_logits")
    tape.record("log_softmax", [logits32], [lsm], [lsm])
    tape.drop(logits32)
    target = tape.new(label_tokens, INT64, False, "target")
    tape.alloc.recategorize(target, "inputs")
    loss = tape.new(1, FP32, lsm.requires_grad, "loss")
    tape.record("nll_loss", [lsm], [loss], [target])
    tape.drop(lsm, target)
    return loss


def virtual_prompt(ctx: Ctx, model: TunedModel, params: ModelParams, h: Tensor) -> None:
    """peft prompt learning (PeftModelForCausalLM.forward): `prompts = self.get_prompt(batch_size)`,
    `prompts.to(inputs_embeds.dtype)`, `torch.cat((prompts, inputs_embeds), dim=1)` into `h`.

    The prompt encoder runs once on the num_virtual_tokens rows (the trace shows (1, vt) prompt
    tokens, expanded over the batch afterwards). Prompt tuning: an embedding lookup. P-tuning
    (tuners/p_tuning/model.py, MLP reparameterization): Linear ReLU Linear ReLU Linear, fp32 weights
    under autocast: each matmul saves the half-precision copy of its input and of its weight (the
    autocast cast of a trainable leaf, cached for the forward); ReLU saves its output.
    """
    tape = ctx.tape
    vt = model.virtual_tokens
    d = model.arch.hidden_size
    by_name = {e.name: p for e, p in zip(model.extra_params, params.extra)}
    table = by_name.get("prompt_encoder.embedding")
    if not vt or table is None:
        return
    idx = tape.new(vt, INT64, False, "prompt_tokens")
    x = tape.new(vt * d, table.dtype, True, "prompt_embedding")
    tape.record("embedding", [tape.param_tensor(table)], [x], [idx])
    tape.drop(idx)
    if "prompt_encoder.mlp_head.0.weight" in by_name:
        # the MLP runs on the vt prompt rows: Linear ReLU Linear ReLU Linear; `linear` casts each trainable
        # weight once per forward under autocast (cached) and saves what its backward needs; ReLU its output
        tokens, ctx.tokens = ctx.tokens, vt
        for i in (0, 2, 4):
            w, b = by_name[f"prompt_encoder.mlp_head.{i}.weight"], by_name[f"prompt_encoder.mlp_head.{i}.bias"]
            out = linear(ctx, x, w, b, w.numel // (b.numel or 1))
            tape.drop(x)
            if i < 4:
                x = elementwise(ctx, "relu", out, save_inputs=False, save_output=True)
                tape.drop(out)
            else:
                x = out
        ctx.tokens = tokens
    p = cast(ctx, x, h.dtype)
    tape.drop(x)
    tape.record("cat", [p], [h], [])
    tape.drop(p)
