"""The normalisation layers of the classic families (LlamaRMSNorm, Gemma 2's (1 + w), T5LayerNorm,
nn.LayerNorm) as ops on the symbolic tape: what each saves for backward and what it upcasts to fp32."""

from __future__ import annotations

from ..arch import ModelArch
from ..dtypes import FP32
from .autograd import Param
from .ops import Ctx, cast, elementwise, mul, promote
from .sim import Tensor


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
        return rmsnorm(ctx, h, w, h.numel // arch.hidden_size, norm_style(arch))
    return _rmsnorm(ctx, h, w, gemma=arch.family == "gemma2", t5=arch.family == "t5")


def rmsnorm(ctx: Ctx, h: Tensor, w: Param, rows: int, style: str) -> Tensor:
    """An RMSNorm over `rows` rows of h (h.numel // rows wide). Styles:

    "llama" (LlamaRMSNorm, Qwen3RMSNorm): `weight * x32.mul(rsqrt(...)).to(input_dtype)`;
    "gemma" (Gemma3RMSNorm): `(x32 * rsqrt(...) * (1 + weight.float())).type_as(x)`;
    "olmo2" (Olmo2RMSNorm): `(weight * (x32 * rsqrt(...))).to(input_dtype)`.
    pow saves its fp32 input, rsqrt its output, mul each operand for the other's gradient.
    """
    if "rms_norm" in ctx.kernels:  # a trainer's fused kernel (engine/liger.py)
        from .liger import rms_norm
        return rms_norm(ctx, h, w, rows, in_place=style != "gemma")
    tape = ctx.tape
    h32 = cast(ctx, h, FP32)
    sq = tape.new(h32.numel, FP32, h32.requires_grad, "pow")
    tape.record("pow", [h32], [sq], [h32])
    var = tape.new(rows, FP32, h32.requires_grad, "mean")
    tape.record("mean", [sq], [var], [])
    tape.drop(sq)
    r = tape.new(rows, FP32, h32.requires_grad, "rsqrt")
    tape.record("rsqrt", [var], [r], [r])
    tape.drop(var)
    y = mul(ctx, h32, r)
    tape.drop(h32, r)
    wt = tape.param_tensor(w)
    if style == "llama":
        y2 = cast(ctx, y, h.dtype)
        tape.drop(y)
        out = elementwise(ctx, "mul", wt, y2, numel=y2.numel,
                          out_dtype=w.dtype if w.dtype.bits > y2.dtype.bits else y2.dtype)
        tape.drop(y2)
        return out
    if style == "gemma":
        one_plus = elementwise(ctx, "add_scalar", wt, save_inputs=False, out_dtype=FP32)
        out32 = mul(ctx, y, one_plus)
        tape.drop(one_plus)
    else:  # olmo2: weight (any dtype) * fp32 -> fp32
        out32 = elementwise(ctx, "mul", wt, y, numel=y.numel, out_dtype=FP32)
    tape.drop(y)
    out = cast(ctx, out32, h.dtype)
    tape.drop(out32)
    return out


def norm_style(arch: ModelArch) -> str:
    # GptOssRMSNorm is OLMo 2's `(weight * x).to(input_dtype)`
    return {"gemma3": "gemma", "olmo2": "olmo2", "gpt_oss": "olmo2"}.get(arch.family, "llama")
