"""One target linear as peft + bitsandbytes run it: the frozen or trainable base (fp16/bf16, bitsandbytes
4-bit / int8), then its adapter: LoRA (peft tuners/lora/layer.py Linear.forward, bnb.py under autocast),
DoRA (tuners/lora/dora.py), IA3 scaling (tuners/ia3/layer.py). bitsandbytes 0.50: nn/modules.py
Linear4bit.forward, autograd/_functions.py MatMul4Bit."""

from __future__ import annotations

from ..dtypes import FP32
from . import ops
from .ops import Ctx, add, cast, count_matmul, elementwise, linear, mul, promote, scale
from .sim import Tensor, rounded
from .params import LinearParams
from .dropout import _dropout


# bitsandbytes 0.50.2 on CUDA: gemm_4bit runs a fused kernel up to this many rows; above, it dequantizes the
# weight and calls F.linear (bitsandbytes/backends/cuda/ops.py `_gemm_4bit_custom_max_m`)
BNB_GEMM_4BIT_CUSTOM_MAX_M = 1536


BNB_4BIT_BLOCKSIZE = 64  # bnb 4-bit quantization block (functional.quantize_4bit blocksize=64)


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
        out = add(ctx, base_out, lora_out)
        tape.drop(base_out, lora_out)
    else:
        xd = _dropout(ctx, xa, t.lora_dropout)
        a = linear(ctx, xd, lp.lora_a, None, t.lora_rank)
        tape.drop(xd)
        b = linear(ctx, a, lp.lora_b, None, lin.out_features)
        tape.drop(a)
        s = scale(ctx, b)
        tape.drop(b)
        out = add(ctx, base_out, s)
        tape.drop(base_out, s)
    final = cast(ctx, out, base_out.dtype)
    # peft 0.21 lora/layer.py Linear.forward rebinds `x = self._cast_input_dtype(x, lora_A.weight.dtype)`: the
    # adapter-dtype copy is a local until forward returns (after `result.to(torch_result_dtype)`), alive with
    # lora_B's output and its scaled copy even when dropout (which saves only its mask) means no node saves it.
    # Traced: llama3.2-1b LoRA r1 up_proj, bf16, dropout 0.05, TRL, checkpointing: 3.6 MB at the recompute's peak
    tape.drop(out, xa)
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
