"""`--explain`: each term of an estimate as a formula with its numbers substituted."""

from __future__ import annotations

from .catalog import load_model
from .estimate import Estimate
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
        *allocator_lines(est),
        f"device total = reserved + CUDA context {_g(m.cuda_context_bytes)}"
        + (f" + NCCL buffers {_g(m.nccl_buffers_bytes)}" if m.nccl_buffers_bytes else "")
        + f" = {_g(m.device_total_bytes)}; {est.verdict or ('fits' if est.fits else 'does not fit')}",
        f"FLOPs/step = forward {est.compute.flops_forward:.3e} + backward-input {est.compute.flops_backward_input:.3e} "
        f"+ backward-weight {est.compute.flops_backward_weight:.3e} + recompute {est.compute.flops_recompute:.3e} "
        f"= {est.compute.flops_per_step:.3e} (matmuls: 2·N·in·out each, N = B·T = {B * T})",
    ]
    if t.shard.startswith("zero"):
        lines.insert(4, f"DeepSpeed {t.shard}: the module in {t.compute_dtype.name} (weights, gradients per rank); the "
                        f"fp32 master partition (4 B × trainable / {t.n_gpus}) counts as optimizer state: "
                        f"{_g(c.get('optimizer_state', 0))} at the peak (engine/deepspeed.py)")
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


def allocator_lines(est: Estimate) -> list[str]:
    """Where reserved comes from: the caching-allocator replay (engine/allocator.py) of the step's timeline."""
    m = est.memory
    a = m.allocator
    if not a:
        return [f"reserved = {_g(m.peak_reserved_bytes)}"]
    return [
        f"reserved = the step's {a['events']:,} allocations/frees replayed through the CUDA caching allocator "
        f"(PYTORCH_CUDA_ALLOC_CONF {a['conf']}) = {_g(m.peak_reserved_bytes)} in {a['segments_at_peak']:,} segments "
        f"(max_memory_allocated as torch counts whole blocks: {_g(a['peak_allocated_bytes'])})",
        f"  at the allocated peak: reserved {_g(a['reserved_at_alloc_peak_bytes'])} = allocated "
        f"{_g(a['reserved_at_alloc_peak_bytes'] - a['fragmentation_bytes'])} + fragmentation "
        f"{_g(a['fragmentation_bytes'])}: cached segments with no live block {_g(a['cached_segments_bytes'])} "
        f"(freed tensors the allocator keeps), free space inside segments in use {_g(a['split_free_bytes'])} "
        f"(20 MiB segments of 1-10 MiB requests, 2 MiB small-pool segments, remainders of reused blocks); "
        f"largest free block {_g(a['largest_free_block_bytes'])}; small pool {_g(a['small_pool_reserved_bytes'])}, "
        f"large pool {_g(a['large_pool_reserved_bytes'])}",
        f"  after the allocated peak reserved grows by "
        f"{_g(a['peak_reserved_bytes'] - a['reserved_at_alloc_peak_bytes'])}"
        " (requests no cached block fits: blocks of one segment never merge with another's)"
        + (f"; blocks handed out whole with <= 1 MiB spare: {_g(a['unsplit_slack_bytes'])}"
           if a['unsplit_slack_bytes'] else ""),
    ]
