"""`--explain`: each term of an estimate as a formula with its numbers substituted."""

from __future__ import annotations

from .catalog import load_model
from .estimate import Estimate, overheads
from .units import BYTES_PER_GIB


def _g(n: float) -> str:
    return f"{n / BYTES_PER_GIB:,.3f} GiB"


def explain_lines(est: Estimate) -> list[str]:
    arch = load_model(est.model)
    t = est.training
    m = est.memory
    c = m.components
    B, T, V = t.micro_batch, t.seq_len, arch.vocab_size
    lines = [
        f"weights = Σ numel × bits/8 over every tensor (each rounded to 512 B) = {_g(m.weights_bytes)}",
        f"quantization constants = Σ blocks(numel/64) × absmax bytes (+ DQ second level /256) = {_g(m.quant_constants_bytes)}",
        f"trainable = {est.params.trainable:,} params; gradients = trainable × bits/8 of the param dtype = {_g(m.gradients_bytes)}",
        f"optimizer state ({t.optimizer}) = Σ per trainable tensor (AdamW: 2 × numel × param bytes) = {_g(m.optimizer_state_bytes)}",
        f"logits + loss at the peak = fp32 logits B·T·V·4 = {B}·{T}·{V}·4 = {_g(B * T * V * 4)} per copy; "
        f"alive at the peak: {_g(c.get('loss_logits', 0))} (log-softmax output) + its gradients (in temporaries)",
        f"saved activations at the peak = what each op's backward needs (engine/program.py) = {_g(c.get('saved_activations', 0))}",
        f"temporaries at the peak (activation gradients, casts, dequantized weights) = {_g(c.get('temporaries', 0))}",
        f"peak allocated = max over the step's timeline (phase {m.peak_phase}) = {_g(m.peak_allocated_bytes)}",
        f"reserved = allocated × (1 + {overheads()['reserved_over_allocated']['value']}) = {_g(m.peak_reserved_bytes)}",
        f"device total = reserved + CUDA context {_g(m.cuda_context_bytes)} = {_g(m.device_total_bytes)}",
        f"FLOPs/step = forward {est.compute.flops_forward:.3e} + backward-input {est.compute.flops_backward_input:.3e} "
        f"+ backward-weight {est.compute.flops_backward_weight:.3e} + recompute {est.compute.flops_recompute:.3e} "
        f"= {est.compute.flops_per_step:.3e} (matmuls: 2·N·in·out each, N = B·T = {B * T})",
    ]
    cp = est.compute
    if cp.step_time_s is not None:
        lines.append(f"step time = Σ over the step's kernels of max(FLOPs / achievable FLOP/s, bytes / achievable "
                     f"bandwidth) (engine/roofline.py, data/roofline.json), {cp.time_bound}-bound = "
                     f"{cp.step_time_s:.3f} s; model FLOPs utilization {cp.utilization:.0%} of the dense "
                     f"{cp.matmul_dtype} peak; where the time goes:")
        total = sum(cp.time_breakdown.values()) or 1.0
        for label, secs in sorted(cp.time_breakdown.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {label:<28} {secs * 1e3:10.2f} ms  {100 * secs / total:5.1f}%")
    return lines
