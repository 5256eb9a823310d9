"""Loading the model onto the symbolic allocator: every parameter (sharded or not) and its quantization
constants, in the order transformers + peft create them, and the lookups the step needs over them
(all parameters, the block that owns each, each trainable's 2-D shape for the optimizers).
engine/step.py runs the step on what `_load` returns."""

from __future__ import annotations

from ..arch import Linear, ModelArch
from ..dtypes import FP32, DType
from ..tuned import TunedModel
from .autograd import Param
from .program import BlockParams, LinearParams, ModelParams
from .sim import Allocator, rounded
from . import sharding


def _quant_constant_bytes(numel: int, tuned_quant) -> int:  # type: ignore[no-untyped-def]
    """bitsandbytes QuantState tensors for one weight (see tuned.Quant)."""
    return sum(_quant_constant_parts(numel, tuned_quant))


def _quant_constant_parts(numel: int, tuned_quant) -> list[int]:  # type: ignore[no-untyped-def]
    """The QuantState's tensors, one allocation each (the caching allocator places them separately)."""
    if tuned_quant.kind == "int8":
        return []  # the per-row SCB is added by the caller (needs out_features)
    blocks = -(-numel // tuned_quant.blocksize)
    code = rounded(16 * 4)  # the 16-entry fp32 NF4/FP4 code table of the QuantState
    if not tuned_quant.double_quant:
        return [rounded(blocks * 4), code]
    dq_blocks = -(-blocks // tuned_quant.dq_blocksize)
    # uint8 absmax + fp32 absmax of the absmax + the 256-entry fp32 dynamic code + the fp32 offset
    return [rounded(blocks), rounded(dq_blocks * 4), rounded(256 * 4), rounded(4), code]


def _load(alloc: Allocator, model: TunedModel) -> tuple[ModelParams, list[Param], int]:
    """Allocate every parameter (and quantization constants); returns params, trainables, quant bytes."""
    arch = model.arch
    trainables: list[Param] = []
    quant_bytes = 0

    def param(numel: int, dtype: DType, trainable: bool, rows: int = 0) -> Param:
        """`rows`: the tensor's dim 0 (FSDP2 shards and pads dim 0; 0 = one-dimensional)."""
        p = Param(numel, dtype, trainable)
        p.tensor = sharding.load_param(alloc, p, rows)
        if trainable:
            trainables.append(p)
        return p

    name, rows, cols = arch.embeddings[0]
    embedding = param(rows * cols, model.embedding_dtype, model.embedding_trainable, rows)
    others = [param(r * c, model.embedding_dtype, model.embedding_trainable, r) for _, r, c in arch.embeddings[1:]]
    blocks: list[BlockParams] = []
    for i, tb in enumerate(model.blocks):
        alloc.mark("load", i)
        lps: list[LinearParams] = []
        for t in tb.linears:
            lin = t.linear
            # bitsandbytes packs 4-bit weights into a (numel / per-element, 1) column: flat along dim 0
            packed = t.quant is not None and t.quant.kind != "int8"
            w = param(lin.weight_numel, t.weight_dtype, t.weight_trainable, 0 if packed else lin.out_features)
            if t.quant is not None:
                parts = _quant_constant_parts(lin.weight_numel, t.quant)
                if t.quant.kind == "int8":
                    parts = [rounded(lin.out_features * 4)]  # Int8Params SCB: one fp32 scale per row
                qb = sum(parts)
                alloc.parts = parts
                alloc.add_bytes(qb, "quant_constants")
                quant_bytes += qb
            b = param(lin.out_features, t.bias_dtype, t.bias_trainable) if lin.bias else None
            lp = LinearParams(t, w, b)
            if t.lora_rank:
                assert t.lora_dtype is not None
                lp.lora_a = param(t.lora_rank * lin.in_features, t.lora_dtype, True, t.lora_rank)
                lp.lora_b = param(lin.out_features * t.lora_rank, t.lora_dtype, True, lin.out_features)
                if t.dora:
                    lp.magnitude = param(lin.out_features, t.lora_dtype, True)
            if t.ia3:
                lp.ia3 = param(t.ia3_numel, t.ia3_dtype or FP32, True, 1 if t.ia3 == "in" else 0)  # (1, in) / (out, 1)
            lps.append(lp)
        norms = []
        for n in tb.block.norms:
            norms.append(param(n.dim, tb.norm_dtype, tb.norms_trainable))
            if n.bias:
                param(n.dim, tb.norm_dtype, tb.norms_trainable or tb.norm_bias_trainable)
                norms[-1].bias_trainable = tb.norms_trainable or tb.norm_bias_trainable
        extras = [param(numel, tb.norm_dtype, tb.norms_trainable) for _, numel in tb.block.extra_params]
        expert_lora: dict[str, tuple[Param, Param]] = {}
        for pname, rank in tb.expert_lora:  # peft ParamWrapper on MoE parameters (methods/moe_lora.py)
            from ..tuned import wrapped_shape

            experts, in_f, out_f = wrapped_shape(tb.block, pname)
            dt = tb.expert_lora_dtype or FP32
            expert_lora[pname] = (param(rank * experts * in_f, dt, True, rank * experts),
                                  param(out_f * rank * experts, dt, True, out_f))
        adapters = []
        for spec in tb.adapters:
            down = param(spec.dim * spec.size + spec.size, spec.dtype, True, spec.size)  # weight + bias
            up = param(spec.size * spec.dim + spec.dim, spec.dtype, True, spec.dim)
            adapters.append((spec, down, up))
        blocks.append(BlockParams(tb, lps, norms, adapters, extras, expert_lora))
    alloc.mark("load_end")
    final_norms = []
    for n in arch.final_norms:
        final_norms.append(param(n.dim, model.final_norm_dtype, model.final_norms_trainable))
        if n.bias:
            param(n.dim, model.final_norm_dtype, model.final_norms_trainable or model.head_bias_trainable)
            final_norms[-1].bias_trainable = model.final_norms_trainable or model.head_bias_trainable
    head_linears = []
    for lin in arch.head_linears:
        head_linears.append(param(lin.weight_numel, model.head_dtype, model.head_trainable, lin.out_features))
        if lin.bias:
            param(lin.out_features, model.head_dtype, model.head_trainable or model.head_bias_trainable)
    for _, numel in arch.head_extra:
        param(numel, model.head_dtype, model.head_trainable or model.head_bias_trainable)
    head = None
    if not arch.tie_word_embeddings:
        head = param(arch.vocab_size * arch.head_in_features, model.head_dtype, model.head_trainable, arch.vocab_size)
    extra = [param(e.numel, e.dtype, e.trainable, e.rows) for e in model.extra_params]
    return ModelParams(embedding, others, blocks, final_norms, head, head_linears, extra), trainables, quant_bytes


def _block_of_params(params: ModelParams) -> dict[int, int]:
    """id(Param) -> the index of the block that holds it (engine/depth.py's segments)."""
    out: dict[int, int] = {}
    for i, bp in enumerate(params.blocks):
        for lp in bp.linears:
            for p in (lp.weight, lp.bias, lp.lora_a, lp.lora_b, lp.magnitude, lp.ia3):
                if p is not None:
                    out[id(p)] = i
        for p in [*bp.norms, *bp.extras, *(q for ab in bp.expert_lora.values() for q in ab)]:
            out[id(p)] = i
        for _, d, u in bp.adapters:
            out[id(d)] = out[id(u)] = i
    return out


def _all_params(params: ModelParams) -> list[Param]:
    out = [params.embedding, *params.other_embeddings, *params.final_norms, *params.head_linears, *params.extra]
    if params.head is not None:
        out.append(params.head)
    for bp in params.blocks:
        for lp in bp.linears:
            out += [p for p in (lp.weight, lp.bias, lp.lora_a, lp.lora_b, lp.magnitude, lp.ia3) if p is not None]
        out += bp.norms + bp.extras + [p for ab in bp.expert_lora.values() for p in ab]
        for _, d, u in bp.adapters:
            out += [d, u]
    return out


def _param_shapes(params: ModelParams, arch: ModelArch | None = None) -> dict[int, tuple[int, int]]:
    shapes: dict[int, tuple[int, int]] = {}
    if arch is not None:
        # 2-D embedding / lm_head matrices: Adafactor factors their second moment too
        # (transformers optimization.py Adafactor `_get_options`: factored = len(grad.shape) >= 2)
        for (_, r, c), p in zip(arch.embeddings, [params.embedding, *params.other_embeddings]):
            shapes[id(p)] = (r, c)
        if params.head is not None:
            shapes[id(params.head)] = (arch.vocab_size, arch.head_in_features)
        for lin, p in zip(arch.head_linears, params.head_linears):
            shapes[id(p)] = (lin.out_features, lin.in_features)
    for bp in params.blocks:
        for lp in bp.linears:
            lin: Linear = lp.tuned.linear
            shapes[id(lp.weight)] = (lin.out_features, lin.in_features)
            if lp.lora_a is not None and lp.lora_b is not None:
                shapes[id(lp.lora_a)] = (lp.tuned.lora_rank, lin.in_features)
                shapes[id(lp.lora_b)] = (lin.out_features, lp.tuned.lora_rank)
        for spec, down, up in bp.adapters:  # each groups its projection's weight with its bias (_load)
            shapes[id(down)] = (spec.size, spec.dim)
            shapes[id(up)] = (spec.dim, spec.size)
    return shapes
