"""The forward pass of a TunedModel as ops on the symbolic tape, following the HF implementations.

Sources, transformers 5.23: models/llama/modeling_llama.py (LlamaRMSNorm, apply_rotary_pos_emb,
LlamaMLP, LlamaDecoderLayer), integrations/sdpa_attention.py, loss/loss_utils.py
(ForCausalLMLoss upcasts logits to fp32), models/gpt2, opt, bloom, bert, t5. peft 0.21:
tuners/lora/layer.py (Linear.forward casts x to the adapter dtype per adapter), tuners/lora/dora.py,
tuners/ia3/layer.py. bitsandbytes 0.50: nn/modules.py Linear4bit.forward, autograd/_functions.py
MatMul4Bit (dequantizes the weight in forward and again in backward, saves no activation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arch import ModelArch
from ..dtypes import BOOL, FP32, INT64, DType
from ..training import Training
from ..tuned import BottleneckAdapter, TunedBlock, TunedLinear, TunedModel
from .autograd import Param
from . import ops, unsloth_lora
from .ops import Ctx, add, cast, count_matmul, elementwise, linear, mul, promote, scale
from .sim import Tensor, rounded
from .program_modern import modern_block_forward
from ..arch_modern import BUILDERS as _MODERN_BUILDERS
from ..arch_moe import BUILDERS as _MOE_BUILDERS

MODERN_TYPES = frozenset(_MODERN_BUILDERS) | frozenset(_MOE_BUILDERS)
# bitsandbytes 0.50.2 on CUDA: gemm_4bit runs a fused kernel up to this many rows; above, it dequantizes the
# weight and calls F.linear (bitsandbytes/backends/cuda/ops.py `_gemm_4bit_custom_max_m`)
BNB_GEMM_4BIT_CUSTOM_MAX_M = 1536
BNB_4BIT_BLOCKSIZE = 64  # bnb 4-bit quantization block (functional.quantize_4bit blocksize=64)


@dataclass(eq=False)
class LinearParams:
    tuned: TunedLinear
    weight: Param
    bias: Param | None
    lora_a: Param | None = None
    lora_b: Param | None = None
    magnitude: Param | None = None
    ia3: Param | None = None


@dataclass(eq=False)
class BlockParams:
    tuned: TunedBlock
    linears: list[LinearParams]
    norms: list[Param]
    adapters: list[tuple[BottleneckAdapter, Param, Param]]  # (spec, down weight+bias, up weight+bias)
    extras: list[Param] = field(default_factory=list)  # block.extra_params, in order (MoE router/experts)
    expert_lora: dict[str, tuple[Param, Param]] = field(default_factory=dict)  # MoE parameter -> (lora_A, lora_B)


@dataclass(eq=False)
class ModelParams:
    embedding: Param
    other_embeddings: list[Param]
    blocks: list[BlockParams]
    final_norms: list[Param]
    head: Param | None  # untied lm_head
    head_linears: list[Param]
    extra: list[Param]


def _dropout(ctx: Ctx, x: Tensor, p: float) -> Tensor:
    """nn.Dropout(p) in training: a new tensor and a saved bool mask (native_dropout); p=0 is identity."""
    if p <= 0:
        return ctx.tape.alloc.retain(x)
    mask = ctx.tape.new(x.numel, BOOL, False, "dropout_mask")
    out = ctx.tape.new(x.numel, x.dtype, x.requires_grad, "dropout")
    ctx.tape.record("dropout", [x], [out], [mask])
    ctx.tape.drop(mask)
    return out


def hidden_dropout(arch: ModelArch) -> float:
    """The residual-stream dropout probability (gpt2 resid_pdrop, bert hidden_dropout_prob, t5
    dropout_rate, opt dropout); Llama-like families have none in training."""
    if arch.family in ("llama", "gemma2", "gemma3", "olmo2", "gpt_oss", "phi3"):
        return 0.0
    return float(arch.config.get("resid_pdrop", arch.config.get("hidden_dropout_prob",
                 arch.config.get("dropout_rate", arch.config.get("dropout", 0.0)))) or 0.0)


def attention_dropout(arch: ModelArch) -> float:
    """Dropout on the attention probabilities (eager attention; SDPA applies it inside its kernel):
    gpt2 attn_pdrop, bert/roberta attention_probs_dropout_prob, t5 dropout_rate (T5Attention), the
    others' attention_dropout (modeling_*.py eager_attention_forward `dropout(attn_weights, p=...)`)."""
    keys = {"gpt2": "attn_pdrop", "bert": "attention_probs_dropout_prob", "t5": "dropout_rate"}
    key = keys.get(arch.family, "attention_dropout")
    return float(arch.config.get(key, 0.0) or 0.0)


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


def tuned_linear(ctx: Ctx, x: Tensor, lp: LinearParams) -> Tensor:
    """A block linear with whatever the method wrapped around it (LoRA/DoRA/QLoRA/IA3)."""
    t = lp.tuned
    lin = t.linear
    tape = ctx.tape
    x_in = x
    vector = _ia3_scaling(ctx, lp) if t.ia3 else None
    if t.ia3 == "in":
        # peft 0.21 ia3 Linear.forward (feed-forward): x = x.to(ia3 dtype); interm = (x * scaling).to(x's
        # dtype). mul saves the upcast x for the vector's grad and the scaling for x's grad.
        x_up = cast(ctx, x, vector.dtype)  # type: ignore[union-attr]
        prod = mul(ctx, x_up, vector)  # type: ignore[arg-type]
        tape.drop(x_up)
        x_in = cast(ctx, prod, x.dtype)
        tape.drop(prod)
    if t.quant is not None:
        result = _quantized_base(ctx, x_in, lp)
    else:
        result = linear(ctx, x_in, lp.weight, lp.bias, lin.out_features)
    if x_in is not x:
        tape.drop(x_in)
    if t.ia3 == "out":
        # peft 0.21 ia3 Linear.forward: result = (result * scaling).to(result.dtype); the product is
        # promoted to the vector's dtype (fp32 adapters) and cast back, so activations keep their dtype.
        prod = mul(ctx, result, vector)  # type: ignore[arg-type]
        tape.drop(result)
        result = cast(ctx, prod, result.dtype)
        tape.drop(prod)
    if vector is not None:
        tape.drop(vector)
    if t.lora_rank:
        result = _lora(ctx, x, result, lp)
    return result


def _ia3_scaling(ctx: Ctx, lp: LinearParams) -> Tensor:
    """peft 0.21 ia3 Linear.forward: `ia3_scaling = 1; ia3_scaling *= ia3_l.flatten()` makes a new
    tensor the size of the vector (int * tensor); the elementwise mul saves it for the input's grad."""
    return elementwise(ctx, "mul_scalar", ctx.tape.param_tensor(lp.ia3), save_inputs=False)  # type: ignore[arg-type]


def _quantized_base(ctx: Ctx, x: Tensor, lp: LinearParams) -> Tensor:
    """bnb Linear4bit: x.to(compute dtype); gemm_4bit; .to(input dtype).

    On CUDA, bitsandbytes 0.50.2's gemm_4bit runs a fused kernel up to BNB_GEMM_4BIT_CUSTOM_MAX_M rows and
    above it dequantizes the weight (and, with double quantization, the absmax: two fp32 vectors) for
    F.linear, alive with the output (backends/cuda/ops.py `_gemm_4bit_custom_max_m`). LLM.int8 always
    dequantizes (the CPU-traceable MatMul8bitFp path)."""
    tape = ctx.tape
    t = lp.tuned
    lin = t.linear
    four_bit = t.quant is not None and t.quant.kind != "int8"
    compute = (t.quant.compute_dtype if four_bit and t.quant.compute_dtype else None) or ctx.autocast or x.dtype
    xc = cast(ctx, x, compute)
    temps = []
    if t.quant is None or t.quant.kind == "int8" or ctx.tokens > BNB_GEMM_4BIT_CUSTOM_MAX_M:
        if t.quant is not None and t.quant.kind != "int8" and t.quant.double_quant:
            blocks = -(-lin.weight_numel // BNB_4BIT_BLOCKSIZE)
            temps += [tape.new(blocks, FP32, False, "absmax_dq"), tape.new(blocks, FP32, False, "absmax")]
        temps.append(tape.new(lin.weight_numel, compute, False, "dequantized_weight"))
    deq_bytes = rounded(compute.bytes_for(lin.weight_numel))
    out = tape.new(ctx.tokens * lin.out_features, compute, xc.requires_grad, "linear4bit")
    # bitsandbytes gemm_4bit forward; MatMul4Bit.backward computes grad_A only (frozen packed weight)
    count_matmul(2 * xc.numel * lin.out_features, xc.requires_grad, False)
    # roofline: bitsandbytes backends/cuda/ops.py gemm_4bit dequantizes then runs F.linear above 1536 rows;
    # MatMul4Bit.backward dequantizes again for grad_A. The dequant reads the packed weight and its absmax
    # and writes the weight in the compute dtype.
    q = lp.tuned.quant
    absmax = -(-lin.weight_numel // q.blocksize) * (1 if q.double_quant else 4) if q.kind != "int8" else 4 * lin.out_features
    # (the fused kernel below 1536 rows dequantizes inline, reading the same packed weight and absmax)
    traffic = lin.weight_numel * (8 if q.kind == "int8" else 4) // 8 + absmax + deq_bytes
    ops.log_kernel("dequant", "forward", traffic)
    ops.log_matmul(ctx.tokens, lin.out_features, lin.in_features, compute, xc.requires_grad, False)
    if xc.requires_grad:
        ops.log_kernel("dequant", "backward", traffic)
    # MatMul4Bit saves only the packed weight (already counted); its backward dequantizes again.
    tape.record("matmul_4bit", [xc], [out], [], backward_scratch=deq_bytes)
    tape.drop(*temps, xc)
    result = cast(ctx, out, x.dtype)
    tape.drop(out)
    return result


def _lora(ctx: Ctx, x: Tensor, base_out: Tensor, lp: LinearParams) -> Tensor:
    """peft lora.Linear.forward: result + lora_B(lora_A(dropout(x.to(adapter dtype)))) * scaling."""
    tape = ctx.tape
    t = lp.tuned
    lin = t.linear
    assert lp.lora_a is not None and lp.lora_b is not None and t.lora_dtype is not None
    if t.quant is not None and ctx.autocast is not None and not t.dora:
        return _lora_bnb_autocast(ctx, x, base_out, lp)
    # peft lora/layer.py Linear.forward: `x = self._cast_input_dtype(x, lora_A.weight.dtype)` (per adapter);
    # under FSDP2 mixed precision that weight is the all-gathered compute-dtype copy (tuned.lora_forward_dtype)
    xa = cast(ctx, x, t.lora_forward_dtype or t.lora_dtype)
    if t.dora:
        lora_out = _dora(ctx, xa, base_out, lp)
        tape.drop(xa)
        out = add(ctx, base_out, lora_out)
        tape.drop(base_out, lora_out)
    else:
        xd = _dropout(ctx, xa, t.lora_dropout)
        tape.drop(xa)
        a = linear(ctx, xd, lp.lora_a, None, t.lora_rank)
        tape.drop(xd)
        b = linear(ctx, a, lp.lora_b, None, lin.out_features)
        tape.drop(a)
        s = scale(ctx, b)
        tape.drop(b)
        out = add(ctx, base_out, s)
        tape.drop(base_out, s)
    final = cast(ctx, out, base_out.dtype)
    tape.drop(out)
    return final


def _lora_bnb_autocast(ctx: Ctx, x: Tensor, base_out: Tensor, lp: LinearParams) -> Tensor:
    """peft tuners/lora/bnb.py Linear4bit/Linear8bitLt.forward under autocast.

    `result = result.clone()` ("defensively clone"), then `requires_conversion = not
    torch.is_autocast_enabled()`: under autocast x is NOT cast to the adapter dtype, so lora_A's
    autocast matmul reads the half-precision x itself (no copy) and every adapter of the layer's
    input (q and v) saves that same tensor; the output is added without a dtype conversion.
    """
    tape = ctx.tape
    t = lp.tuned
    assert lp.lora_a is not None and lp.lora_b is not None
    result = tape.new(base_out.numel, base_out.dtype, base_out.requires_grad, "clone")
    tape.record("clone", [base_out], [result], [])
    tape.drop(base_out)
    xd = _dropout(ctx, x, t.lora_dropout)
    a = linear(ctx, xd, lp.lora_a, None, t.lora_rank)
    tape.drop(xd)
    b = linear(ctx, a, lp.lora_b, None, t.linear.out_features)
    tape.drop(a)
    s = scale(ctx, b)
    tape.drop(b)
    out = add(ctx, result, s)
    tape.drop(result, s)
    return out


def _dora(ctx: Ctx, x: Tensor, base_out: Tensor, lp: LinearParams) -> Tensor:
    """peft 0.21 DoraLinearVariant.forward + DoraLinearLayer.forward on `x` (already cast to the adapter
    dtype); returns result_dora, which the caller adds to the base output.

    In order: `x = dropout(x)` and `base_result = None` when dropout is active (else base_result is the
    base output); `get_lora_weight`: lora_B(lora_A(eye(in))) — the identity, its product with A and
    the (in x out) product, all alive until the function returns (their graph dies with the local
    variable, the norm uses them detached); `weight.to(x.dtype)` (a copy unless the base already has
    x's dtype; a 4-bit base is dequantized first); `get_weight_norm`: `weight + scaling * lora_weight`
    (two weight-sized temporaries, freed on return); `lora_result = lora_B(lora_A(x))`; without a
    base_result, `F.linear(x, weight)` recomputes it on the dropped x; then
    `(mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling`, whose products save
    base_result and lora_result for the magnitude's gradient.
    """
    tape = ctx.tape
    t = lp.tuned
    lin = t.linear
    assert lp.lora_a is not None and lp.lora_b is not None and lp.magnitude is not None
    n_in, n_out, r = lin.in_features, lin.out_features, t.lora_rank
    adapter_dtype = t.lora_forward_dtype or t.lora_dtype or FP32
    xd = _dropout(ctx, x, t.lora_dropout)
    recompute_base = t.lora_dropout > 0
    # get_lora_weight: two forward matmuls whose result is only used detached (FLOPs, no backward)
    count_matmul(2 * n_in * n_in * r + 2 * n_in * r * n_out, False, False)
    wdt = x.dtype if x.dtype.bits >= 16 else FP32
    ops.log_matmul(n_in, r, n_in, wdt, False, False)
    ops.log_matmul(n_in, n_out, r, wdt, False, False)
    # get_weight_norm over out x in: lora_weight.T written (1), W.to(x.dtype) read + written (2),
    # scaling * lora_weight read + written (2), W + that read twice + written (3), the norm reads it (1)
    ops.log_kernel("dora", "forward", 9 * lin.weight_numel * wdt.bits // 8)
    mm = ctx.autocast or adapter_dtype  # the dtype the adapter matmuls run in
    # get_lora_weight's local identity; lora_A saves it for its weight's gradient unless autocast casts it
    # (then the cast copy is saved and the identity dies when get_lora_weight returns)
    eye = tape.new(n_in * n_in, adapter_dtype, False, "dora_eye")
    temps = [eye] if mm == adapter_dtype else [tape.new(n_in * n_in, mm, False, "dora_eye_cast")]
    temps.append(tape.new(n_in * r, mm, False, "dora_eye_a"))  # saved by lora_B
    lora_weight = tape.new(n_in * n_out, mm, False, "dora_lora_weight")
    if mm != adapter_dtype:
        tape.drop(eye)
    if mm != x.dtype:  # `lora_weight = lora_weight.to(x.dtype)` rebinds: the matmul output dies
        temps.append(tape.new(n_in * n_out, x.dtype, False, "dora_lora_weight_cast"))
        tape.drop(lora_weight)
    else:
        temps.append(lora_weight)
    weight_x: Tensor | None = None  # the base weight as x's dtype, when that is a new tensor
    if t.quant is not None:  # dequantize_module_weight: the 4-bit base dequantized to its compute dtype
        weight_x = tape.new(lin.weight_numel, ctx.autocast or x.dtype, False, "dora_dequantized")
        if weight_x.dtype != x.dtype:  # `weight = weight.to(x.dtype)` rebinds: the dequantized copy dies
            deq, weight_x = weight_x, tape.new(lin.weight_numel, x.dtype, False, "dora_weight")
            tape.drop(deq)
    elif lp.weight.dtype != x.dtype:
        weight_x = tape.new(lin.weight_numel, x.dtype, False, "dora_weight")
    if weight_x is not None:
        temps.append(weight_x)
    # get_weight_norm: scaling * lora_weight, then weight + it; both die on return (the norm is tiny)
    scaled_lw = tape.new(n_in * n_out, x.dtype, False, "dora_scaled_lora_weight")
    summed = tape.new(lin.weight_numel, x.dtype, False, "dora_w_plus_ba")
    tape.drop(scaled_lw, summed)
    a = linear(ctx, xd, lp.lora_a, None, r)
    b = linear(ctx, a, lp.lora_b, None, n_out)
    tape.drop(a)
    if recompute_base:
        # F.linear(x, weight): a frozen weight, so only the input's gradient needs the (cast) weight
        wsrc = weight_x if weight_x is not None else tape.param_tensor(lp.weight)
        xc = cast(ctx, xd, ctx.autocast) if ctx.autocast is not None else tape.alloc.retain(xd)
        wc = cast(ctx, wsrc, ctx.autocast) if ctx.autocast is not None else tape.alloc.retain(wsrc)
        base_result = tape.new(ctx.tokens * n_out, ctx.autocast or promote(xc.dtype, wc.dtype), xc.requires_grad,
                               "dora_base_result")
        count_matmul(2 * xc.numel * n_out, xc.requires_grad, False)
        tape.record("linear", [xc, wc], [base_result], [None, wc if xc.requires_grad else None])
        tape.drop(xc, wc)
    else:
        base_result = tape.alloc.retain(base_out)
    tape.drop(xd)
    mag = tape.param_tensor(lp.magnitude)
    # (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
    left = elementwise(ctx, "mul", mag, base_result, numel=base_result.numel,
                       out_dtype=promote(mag.dtype, base_result.dtype))
    tape.drop(base_result)
    right = elementwise(ctx, "mul", mag, b, numel=b.numel, out_dtype=promote(mag.dtype, b.dtype))
    tape.drop(b)
    right_s = scale(ctx, right)
    tape.drop(right)
    out = add(ctx, left, right_s)
    tape.drop(left, right_s)
    tape.drop(*temps)  # get_lora_weight's tensors and the weight copy die when the function returns
    return out


def _t5_layernorm(ctx: Ctx, h: Tensor, w: Param) -> Tensor:
    """T5LayerNorm.forward: `variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)`;
    `hidden_states = hidden_states * torch.rsqrt(variance + eps)` multiplies the ORIGINAL (half) input,
    so the mul saves it besides pow's fp32 copy (LlamaRMSNorm multiplies the fp32 copy); the fp32
    product is cast to the weight dtype when that is half; `self.weight * hidden_states`."""
    tape = ctx.tape
    h32 = cast(ctx, h, FP32)
    sq = tape.new(h32.numel, FP32, h32.requires_grad, "pow")
    tape.record("pow", [h32], [sq], [h32])
    tape.drop(h32)
    var = tape.new(ctx.tokens, FP32, h.requires_grad, "mean")
    tape.record("mean", [sq], [var], [])
    tape.drop(sq)
    r = tape.new(ctx.tokens, FP32, h.requires_grad, "rsqrt")
    tape.record("rsqrt", [var], [r], [r])
    tape.drop(var)
    y = mul(ctx, h, r)
    tape.drop(r)
    y2 = cast(ctx, y, w.dtype) if w.dtype.bits < 32 else tape.alloc.retain(y)
    tape.drop(y)
    wt = tape.param_tensor(w)
    out = elementwise(ctx, "mul", wt, y2, numel=y2.numel, out_dtype=promote(w.dtype, y2.dtype))
    tape.drop(y2)
    return out


def _rmsnorm(ctx: Ctx, h: Tensor, w: Param, gemma: bool = False, t5: bool = False) -> Tensor:
    """LlamaRMSNorm: h.to(fp32); pow(2).mean; rsqrt; h*r; .to(input dtype); weight * that."""
    tape = ctx.tape
    n = ctx.tokens
    if t5:
        return _t5_layernorm(ctx, h, w)
    if "rms_norm" in ctx.kernels:  # a trainer's fused kernel (engine/liger.py)
        from .liger import rms_norm
        return rms_norm(ctx, h, w, in_place=not gemma)
    h32 = cast(ctx, h, FP32)
    sq = tape.new(h32.numel, FP32, h32.requires_grad, "pow")
    tape.record("pow", [h32], [sq], [h32])
    var = tape.new(n, FP32, h32.requires_grad, "mean")
    tape.record("mean", [sq], [var], [])
    tape.drop(sq)
    r = tape.new(n, FP32, h32.requires_grad, "rsqrt")
    tape.record("rsqrt", [var], [r], [r])
    tape.drop(var)
    y = mul(ctx, h32, r)
    tape.drop(h32, r)
    y2 = cast(ctx, y, h.dtype) if not gemma else tape.alloc.retain(y)
    tape.drop(y)
    wt = tape.param_tensor(w)
    if gemma:
        # Gemma2RMSNorm: output * (1.0 + weight.float()), then .type_as(x)
        one_plus = elementwise(ctx, "add_scalar", wt, save_inputs=False, out_dtype=FP32)
        out32 = mul(ctx, y2, one_plus)
        tape.drop(one_plus)
        out = cast(ctx, out32, h.dtype)
        tape.drop(out32, y2)
        return out
    out = elementwise(ctx, "mul", wt, y2, numel=y2.numel, out_dtype=w.dtype if w.dtype.bits > y2.dtype.bits else y2.dtype)
    tape.drop(y2)
    return out


def _layernorm(ctx: Ctx, h: Tensor, w: Param) -> Tensor:
    """nn.LayerNorm (native_layer_norm): saves input, mean and rstd (fp32 per row)."""
    tape = ctx.tape
    rg = h.requires_grad or w.trainable or w.bias_trainable
    out = tape.new(h.numel, h.dtype if ctx.autocast is None else FP32, rg, "layer_norm")
    # layer_norm is an fp32 op under autocast: the input is upcast (a copy when half)
    hin = cast(ctx, h, FP32) if ctx.autocast is not None else tape.alloc.retain(h)
    # ... and so are its weight and bias (native_layer_norm_backward takes both: derivatives.yaml
    # `native_layer_norm`), fp32 copies saved per call when the parameters are half precision.
    # Every layer-norm family in the catalog (gpt2, opt, bloom, bert/roberta) has a bias.
    wb = [tape.new(w.numel, FP32, False, "ln_weight_fp32") for _ in range(2)] \
        if ctx.autocast is not None and w.dtype != FP32 else []
    mean = tape.new(ctx.tokens, FP32, False, "ln_mean")
    rstd = tape.new(ctx.tokens, FP32, False, "ln_rstd")
    tape.record("layer_norm", [hin, tape.param_tensor(w)], [out], [hin, mean, rstd, *wb])
    tape.drop(hin, mean, rstd, *wb)
    return out


def _norm(ctx: Ctx, arch: ModelArch, h: Tensor, w: Param) -> Tensor:
    if arch.norm_kind == "layernorm":
        return _layernorm(ctx, h, w)
    if arch.family in ("gemma3", "olmo2", "gpt_oss"):
        # their final norm is the blocks' RMSNorm class (Gemma3RMSNorm, Olmo2RMSNorm, GptOssRMSNorm)
        from .program_modern import norm_style, rmsnorm

        return rmsnorm(ctx, h, w, h.numel // arch.hidden_size, norm_style(arch))
    return _rmsnorm(ctx, h, w, gemma=arch.family == "gemma2", t5=arch.family == "t5")


def _attention(ctx: Ctx, arch: ModelArch, training: Training, q: Tensor, k: Tensor, v: Tensor,
               kv_tokens: int, causal: bool, masked: bool = False, bias: Tensor | None = None,
               hold: Tensor | None = None) -> Tensor:
    """The attention core on projected q/k/v; returns the output (N x H*hd).

    SDPA (flash / memory-efficient kernels) saves q, k, v, the output and a logsumexp
    (B x H x T, fp32). Eager attention (eager_attention_forward) materialises repeat_kv copies of
    k and v, the scores (B x H x T x S) in the compute dtype, the fp32 softmax and its cast back.
    """
    tape = ctx.tape
    B = training.micro_batch
    H, K, hd = arch.num_heads, arch.num_kv_heads, arch.head_dim
    T = ctx.tokens // B
    dt = ctx.autocast or q.dtype
    qc = cast(ctx, q, dt)
    kc = cast(ctx, k, dt)
    vc = cast(ctx, v, dt)
    rg = qc.requires_grad or kc.requires_grad or vc.requires_grad
    bmm = 2 * B * H * T * kv_tokens * hd  # one of QK^T / PV (torch.utils.flop_counter bmm_flop)
    if training.attention == "eager":
        groups = H // K
        kr = tape.new(kc.numel * groups, dt, kc.requires_grad, "repeat_kv") if groups > 1 else tape.alloc.retain(kc)
        vr = tape.new(vc.numel * groups, dt, vc.requires_grad, "repeat_kv") if groups > 1 else tape.alloc.retain(vc)
        if groups > 1:
            # repeat_kv (expand + reshape: a copy); its backward sums the copies' gradients back into k/v's.
            # Unrecorded, the copies' gradients stayed alive to the end of backward (+2.45% on llama3.2-1b
            # full bf16 eager + checkpointing, whose peak is there)
            # (the recorded nodes also give the roofline its memory-bound copy kernels, forward and backward)
            tape.record("repeat_kv", [kc], [kr], [])
            tape.record("repeat_kv", [vc], [vr], [])
        scores = tape.new(B * H * T * kv_tokens, dt, rg, "scores")
        tape.record("matmul_qk", [qc, kr], [scores], [kr if qc.requires_grad else None, qc if kr.requires_grad else None])
        if arch.attn_logit_softcap is not None:
            scores = _softcap(ctx, scores)
        # eager matmuls: each backward half runs only for an operand that requires grad
        c = ops.COUNTER[0]
        if c is not None:
            c.forward += 2 * bmm
            c.backward_input += bmm * (int(qc.requires_grad) + int(kr.requires_grad)
                                       + int(qc.requires_grad or kr.requires_grad) + int(vr.requires_grad))
            # per (batch, head): scores = q (T x hd) @ k^T (hd x S); out = probs (T x S) @ v (S x hd)
            ops.log_matmul(T, kv_tokens, hd, dt, qc.requires_grad, kr.requires_grad, B * H)
            ops.log_matmul(T, hd, kv_tokens, dt, qc.requires_grad or kr.requires_grad, vr.requires_grad, B * H)
        masked = tape.new(scores.numel, dt, rg, "masked_scores")
        tape.record("add_mask", [scores], [masked], [])
        tape.drop(scores)
        # llama-like, opt and bloom call softmax(..., dtype=torch.float32); gpt2, bert/roberta and t5 call
        # softmax(attn_weights) (modeling_*.py eager_attention_forward): fp32 only under autocast, whose
        # fp32 op list holds softmax
        upcast = ctx.autocast is not None or arch.family not in ("gpt2", "bert", "t5")
        probs32 = tape.new(masked.numel, FP32 if upcast else dt, rg, "softmax_fp32")
        tape.record("softmax", [masked], [probs32], [probs32])
        tape.drop(masked)
        probs = cast(ctx, probs32, dt)
        tape.drop(probs32)
        dropped = _dropout(ctx, probs, attention_dropout(arch))  # saves its bool mask
        tape.drop(probs)
        probs = dropped
        if hold is not None and groups == 1:
            # `hold`: v is a strided view of the fused qkv output (modeling_phi3.py). Eager
            # `torch.matmul(attn_weights, value_states)` reshapes it for bmm (aten/src/ATen/native/LinearAlgebra.cpp
            # `_matmul_impl`: expand + reshape of a non-contiguous view, a copy), and bmm saves that copy, not the
            # view: qkv is not held (was +1.1..+1.6% on phi3-mini prompt tuning, eager, 3 layers; fuzz seed 20261202)
            vcopy = tape.new(vc.numel, dt, vc.requires_grad, "matmul_value_copy")
            tape.record("clone", [vr], [vcopy], [])
            tape.drop(vr)
            vr = vcopy
        out = tape.new(qc.numel, dt, rg or vr.requires_grad, "attn_out")
        # (eager: a repeat_kv or matmul copy of the value is saved, never the qkv view `hold` stands for)
        tape.record("matmul_pv", [probs, vr], [out], [vr if probs.requires_grad else None, probs if vr.requires_grad else None])
        tape.drop(probs, kr, vr, qc, kc, vc)
        return out
    mask = None
    if masked:
        # With an attention mask (prefix tuning: past key/values make kv_len != q_len, so transformers
        # passes a mask instead of is_causal): sdpa_attention.py `use_gqa_in_sdpa` is False when a mask
        # is given, so GQA keys/values are expanded by `repeat_kv` (new tensors, saved by SDPA in place
        # of the un-repeated ones); torch's SDPA converts the boolean mask into a float mask of the
        # query dtype (aten/src/ATen/native/transformers/attention.cpp `convert_boolean_attn_mask`,
        # a `where` per call), which the memory-efficient kernel saves for backward.
        groups = H // K
        if groups > 1:
            kr = tape.new(kc.numel * groups, dt, kc.requires_grad, "repeat_kv")
            vr = tape.new(vc.numel * groups, dt, vc.requires_grad, "repeat_kv")
            tape.record("repeat_kv", [kc], [kr], [])
            tape.record("repeat_kv", [vc], [vr], [])
            tape.drop(kc, vc)
            kc, vc = kr, vr
        mask = tape.new(B * T * kv_tokens, dt, False, "sdpa_float_mask")
    lse = tape.new(B * H * T, FP32, False, "logsumexp")
    out = tape.new(qc.numel, dt, rg, "sdpa_out")
    tape.record("sdpa", [qc, kc, vc], [out], [qc, kc, vc, out, lse, mask, bias, hold],
                backward_scratch=0)
    tape.drop(lse, qc, kc, vc, mask)
    c = ops.COUNTER[0]
    if c is not None:
        # torch.utils.flop_counter sdpa_flop_count: QK^T + PV; sdpa_backward_flop_count: the scores
        # recomputed, grad of scores, grad V, grad Q, grad K (5 bmms); the kernel computes all of them
        is_causal = causal and not masked and bias is None
        c.forward += 2 * bmm
        if is_causal:
            c.causal_forward += 2 * bmm
        # the fused kernel reads q, k, v (and the mask), writes out and the logsumexp; its backward
        # reads those and dout, writes dq, dk, dv; a causal kernel skips the masked half of the FLOPs
        io = sum(ops.tensor_bytes(t) for t in (qc, kc, vc, out, lse)) + (ops.tensor_bytes(mask) if mask is not None else 0)
        work = bmm // 2 if is_causal else bmm
        c.kernels.append(("attn", "forward", 2 * work, io, dt.name))
        if rg:
            c.kernels.append(("attn", "backward", 5 * work, 2 * io, dt.name))
        if rg:
            c.backward_input += 5 * bmm
            if is_causal:
                c.causal_backward += 5 * bmm
    return out


def _rope(ctx: Ctx, x: Tensor, cos: Tensor) -> Tensor:
    """apply_rotary_pos_emb: (x * cos) + (rotate_half(x) * sin); saves only cos/sin (no grad)."""
    if "rope" in ctx.kernels or "rope_copy" in ctx.kernels:  # a trainer's fused kernel (engine/liger.py)
        from .liger import rope
        return rope(ctx, x, copy="rope_copy" in ctx.kernels)
    tape = ctx.tape
    dt = x.dtype if x.dtype.bits >= cos.dtype.bits else cos.dtype
    a = tape.new(x.numel, dt, x.requires_grad, "x_cos")
    tape.record("mul", [x], [a], [])
    half = tape.new(x.numel // 2, x.dtype, x.requires_grad, "neg")
    rot = tape.new(x.numel, x.dtype, x.requires_grad, "cat")
    # rotate_half's backward (CatBackward0 -> NegBackward0/SliceBackward0) carries the gradient of
    # `rot` back into x's; without this node the gradient of `rot` was allocated and never consumed
    tape.record("rotate_half", [x], [rot], [])
    tape.drop(half)
    b = tape.new(x.numel, dt, x.requires_grad, "rot_sin")
    tape.record("mul", [rot], [b], [])
    tape.drop(rot)
    out = add(ctx, a, b)
    tape.drop(a, b)
    return out


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


def _adapter(ctx: Ctx, x: Tensor, spec: BottleneckAdapter, down: Param, up: Param) -> Tensor:
    """Bottleneck adapter body: up(relu(down(x))) (the caller adds the residual)."""
    tape = ctx.tape
    xa = cast(ctx, x, spec.dtype) if ctx.autocast is None else tape.alloc.retain(x)
    d = linear(ctx, xa, down, None, spec.size)
    tape.drop(xa)
    r = tape.new(d.numel, d.dtype, d.requires_grad, "relu")
    tape.record("relu", [d], [r], [r])
    tape.drop(d)
    u = linear(ctx, r, up, None, spec.dim)
    tape.drop(r)
    out = cast(ctx, u, x.dtype)
    tape.drop(u)
    return out


def _with_adapters(ctx: Ctx, placement: str, h: Tensor, bp: BlockParams) -> Tensor:
    for spec, down, up in bp.adapters:
        if spec.placement == placement:
            a = _adapter(ctx, h, spec, down, up)
            out = add(ctx, h, a)
            ctx.tape.drop(a, h)
            h = out
    return h


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
        elif fused := ("unsloth_lora" in ctx.kernels and not prefix and unsloth_lora.qkv(ctx, training, x, lps)):
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
        o = ("unsloth_lora" in ctx.kernels and not prefix and unsloth_lora.o(ctx, training, a, lps)) \
            or tuned_linear(ctx, a, lps[f"{prefix}o"])
        tape.drop(a)
        od = _dropout(ctx, o, drop_p)
        tape.drop(o)
        return od

    def mlp_part(x: Tensor) -> Tensor:
        if "unsloth_lora" in ctx.kernels and (fused := unsloth_lora.mlp(ctx, training, x, lps)) is not None:
            return fused  # Unsloth's LoRA_MLP (engine/unsloth_lora.py)
        if "gate_up" in lps:
            gu = tuned_linear(ctx, x, lps["gate_up"])
            gate = tape.new(gu.numel // 2, gu.dtype, gu.requires_grad, "chunk")
            up = tape.new(gu.numel // 2, gu.dtype, gu.requires_grad, "chunk")
            tape.record("chunk", [gu], [gate, up], [])
            tape.drop(gu)
        elif "gate" in lps:
            gate = tuned_linear(ctx, x, lps["gate"])
            up = tuned_linear(ctx, x, lps["up"])
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


def _softcap(ctx: Ctx, x: Tensor) -> Tensor:
    """Gemma 2 soft-capping, `x / cap; tanh; * cap` (modeling_gemma2.py): three new tensors of x's size,
    each freeing its input; tanh saves its output for backward. Consumes `x`."""
    div = elementwise(ctx, "div_scalar", x, save_inputs=False)
    ctx.tape.drop(x)
    t = elementwise(ctx, "tanh", div, save_inputs=False, save_output=True)
    ctx.tape.drop(div)
    out = elementwise(ctx, "mul_scalar", t, save_inputs=False)
    ctx.tape.drop(t)
    return out


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
