"""The whole training step on the symbolic allocator: load, forward, backward, optimizer step.

Two optimizer steps are simulated, as the tracer and profiler run them: the first creates the
optimizer state lazily inside `step()`; the second starts with it allocated (steady state).
With gradient accumulation, the second micro-batch runs with the first one's gradients alive;
later micro-batches repeat that state, so two are enough. The peak is the maximum over all.
Gradient checkpointing: non-reentrant (transformers' default) records each layer's nodes with
holders instead of saved tensors and recomputes them, with torch's early stop, when backward
reaches the layer (autograd.CheckpointGroup); reentrant (peft's kbit prep) runs the layer under
no_grad and reruns it whole inside one CheckpointFunction node's backward (autograd.reentrant_backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arch import Linear, ModelArch
from ..dtypes import BOOL, FP32, INT64, DType
from ..trainers import get_trainer
from ..training import Training
from ..tuned import TunedModel
from .losses import LOSSES
from .autograd import CheckpointGroup, Node, Param, Tape, reentrant_backward
from . import ops
from .ops import Ctx, cast, linear
from .optimizers import OptimizerCost, sequential_step_scratch, tensor_cost
from .program import (BlockParams, LinearParams, ModelParams, block_forward, embeddings_out, head_transform,
                      loss_forward, stack_end, stack_locals, virtual_prompt)
from .sim import Allocator, Peak, Tensor, rounded
from . import sharding


@dataclass(frozen=True)
class StepMemory:
    peak: Peak
    phase_peaks: dict[str, int]
    weights_bytes: int  # all parameters as stored (frozen + trainable)
    quant_constant_bytes: int
    trainable_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    paged_optimizer_bytes: int  # outside max_memory_allocated (CUDA unified memory)
    host_bytes: int = 0  # offloaded to host memory (sharding.py), per rank
    # the ordered allocations / frees, load phase included (sim.Allocator.events; engine/allocator.py)
    events: list[int] = field(default_factory=list, repr=False, compare=False)


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
    for tb in model.blocks:
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
            from ..methods.moe_lora import wrapped_shape

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


def _forward_backward(alloc: Allocator, model: TunedModel, params: ModelParams, training: Training,
                      grad_ckpt: bool, label: str) -> None:
    arch = model.arch
    B = training.micro_batch
    T = training.seq_len + model.virtual_tokens
    tokens = B * T
    autocast = training.compute_dtype if training.mixed else None
    tape = Tape(alloc)
    for p in _all_params(params):
        tape.param_tensor(p)
    ctx = Ctx(tape, tokens, autocast)
    alloc.set_phase(f"forward:{label}")
    ids = alloc.new(B * training.seq_len, INT64, "inputs")
    labels = alloc.new(B * training.seq_len, INT64, "inputs")
    fsdp = sharding.hooks_for(alloc, params)  # None on one GPU
    if fsdp is not None:
        fsdp.forward_start(alloc)
    emb = params.embedding
    # transformers 5.23 modeling_utils.py `_activation_checkpointing_enable` calls
    # `self.enable_input_require_grads()` (main_input_name == "input_ids"): with checkpointing on, the
    # embedding output always requires grad, so gradients flow (and are allocated) down to layer 0
    emb_rg = emb.trainable or model.input_requires_grad or model.virtual_tokens > 0 or grad_ckpt
    h = tape.new(tokens * arch.head_in_features, emb.dtype, emb_rg, "embedding")
    tape.record("embedding", [tape.param_tensor(emb)], [h], [ids if emb.trainable else None])
    if arch.embed_scale:
        # Gemma3TextScaledWordEmbedding.forward: `super().forward(ids) * self.embed_scale.to(weight.dtype)`,
        # a new tensor inside the embedding module (the hooked output is the scaled one)
        scaled = tape.new(h.numel, h.dtype, emb_rg, "embed_scale")
        tape.record("mul_scalar", [h], [scaled], [])
        tape.drop(h)
        h = scaled
    # enable_input_require_grads (checkpointing, kbit prep, input_requires_grad) registers a forward hook
    # `output.requires_grad_(True)` on the input embeddings (transformers modeling_utils.py): with a
    # frozen embedding the output is a *leaf* that requires grad, so the graph's AccumulateGrad node
    # holds it (torch/csrc/autograd/functions/accumulate_grad.h `variable`) until backward ends
    leaf_hook = not emb.trainable and (grad_ckpt or model.input_requires_grad)
    held_leaves = [alloc.retain(h)] if leaf_hook and not model.virtual_tokens else []
    if leaf_hook and model.virtual_tokens:
        # `h` here stands for peft's cat((prompts, inputs_embeds)); the hooked leaf is the word
        # embeddings' own output (B x seq_len x d), alive next to it
        held_leaves.append(alloc.new(B * training.seq_len * arch.head_in_features, emb.dtype, "saved_activations"))
    virtual_prompt(ctx, model, params, h)  # prompt / P-tuning: the soft prompt cat'd in front (program.py)
    if arch.head_in_features != arch.hidden_size and params.head_linears:
        proj = linear(ctx, h, params.head_linears[-1], None, arch.hidden_size)  # OPT project_in
        tape.drop(h)
        h = proj
    held_locals = stack_locals(ctx, arch, h, B)  # GPT-2 / OPT: inputs_embeds, position ids and embeddings
    for p in params.other_embeddings:
        h2 = tape.new(h.numel, h.dtype, h.requires_grad or p.trainable, "add_pos")
        tape.record("add", [h, tape.param_tensor(p)], [h2], [])
        tape.drop(h)
        h = h2
    h = embeddings_out(ctx, arch, h, params)  # embedding LayerNorm / dropout (program.py)
    cos = None
    rope_tables: list[Tensor] = []
    if arch.family in ("llama", "gemma2", "gemma3", "olmo2", "gpt_oss", "phi3"):
        # LlamaRotaryEmbedding: cos and sin (1 x T x hd: transformers 5.23 builds position_ids as
        # `cache_position.unsqueeze(0)`, batch 1, broadcast in apply_rotary_pos_emb) in the hidden
        # dtype, shared by all layers; Gemma3TextModel.forward builds one pair per distinct layer type
        # (`for layer_type in set(self.config.layer_types)`: global and local RoPE bases)
        pairs = len({b.sliding_window is not None for b in arch.blocks}) if arch.family == "gemma3" else 1
        rope_tables = [alloc.new(T * arch.head_dim, h.dtype, "saved_activations") for _ in range(2 * pairs)]
        cos = rope_tables[0]
    layer_masks = _layer_masks(alloc, arch, training, B, T, h.dtype,
                               params.blocks[0].tuned.prefix_tokens if params.blocks else 0)  # program_modern families' sliding masks
    eager_mask = None
    if arch.family in ("llama", "gpt2", "opt") and training.attention == "eager" and not layer_masks:
        # transformers 5.23 masking_utils.py `create_causal_mask` -> `eager_mask`: one B x 1 x T x S
        # additive float mask in the embeddings' dtype (torch.where(mask, 0, min_dtype)), built once per
        # forward and passed to every layer (llama-like, GPT2Model and OPTDecoder: seen in the CPU trace,
        # fuzz seed 20261202). Checkpointing keeps it alive into backward: the decoder
        # layer's kwargs are bound in `partial(super().__call__, **kwargs)` (modeling_layers.py
        # GradientCheckpointingLayer), held by the checkpoint frame / CheckpointFunction.
        S = T + (params.blocks[0].tuned.prefix_tokens if params.blocks else 0)
        eager_mask = alloc.new(B * T * S, h.dtype, "saved_activations")
    encoder_out = None
    n_enc = sum(1 for b in params.blocks if b.tuned.block.stack == "encoder")
    for i, bp in enumerate(params.blocks):
        if arch.family == "t5" and i == n_enc:
            encoder_out = stack_end(ctx, arch, h, params.final_norms[0])  # encoder final_layer_norm + dropout
            # peft peft_model.py PeftModelForSeq2SeqLM.forward (PROMPT_TUNING / P_TUNING) cats the prompt
            # onto the encoder's inputs_embeds only: the decoder runs on the labels' seq_len tokens
            T = training.seq_len
            ctx.tokens = B * T
            h = tape.new(ctx.tokens * arch.hidden_size, emb.dtype, emb_rg, "decoder_embedding")
            tape.record("embedding", [tape.param_tensor(emb)], [h], [])
            if leaf_hook:  # the same hooked embedding module runs for the decoder's inputs
                held_leaves.append(alloc.retain(h))
            h = embeddings_out(ctx, arch, h, params)
        if fsdp is not None:
            fsdp.block_start(alloc, tape, i)
        kv = T + bp.tuned.prefix_tokens
        if grad_ckpt:
            held = [eager_mask] if eager_mask is not None else []
            if layer_masks:  # the layer's kwargs hold the mask of its own layer type (None when skipped)
                held = [t for t in [layer_masks.get(bp.tuned.block.sliding_window)] if t is not None]
            h = _checkpointed_block(ctx, arch, training, h, bp, cos, kv, encoder_out, model.reentrant_ckpt, held)
        else:
            h = block_forward(ctx, arch, training, h, bp, cos, kv, encoder_out)
        if fsdp is not None:
            fsdp.block_end(alloc, tape, i)
    alloc.release(eager_mask)  # LlamaModel.forward returns: its reference dies
    for t in held_locals:
        alloc.release(t)
    for t in layer_masks.values():
        alloc.release(t)
    h = head_transform(ctx, arch, h, params)  # final norm (+ t5 dropout, bert/roberta dense+gelu+LN)
    head = params.head if params.head is not None else emb
    if arch.head_in_features != arch.hidden_size and params.head_linears:
        proj = linear(ctx, h, params.head_linears[0], None, arch.head_in_features)  # OPT project_out
        tape.drop(h)
        h = proj
    loss_key = get_trainer(training.trainer).loss_for(training.trainer_options)  # the trainer's loss (losses.py)
    if loss_key == "full_logits":
        loss = loss_forward(ctx, arch, h, head, arch.vocab_size, B * training.seq_len)
    else:
        loss = LOSSES[loss_key](ctx, arch, h, head, B, training.seq_len, model.virtual_tokens)
    tape.drop(h)
    if encoder_out is not None:
        tape.drop(encoder_out)
    ctx.end_forward()
    if fsdp is not None:
        fsdp.forward_end(alloc)
    alloc.set_phase(f"backward:{label}")
    if fsdp is not None:
        fsdp.backward_start(alloc)
    tape.backward(loss)
    for t in held_leaves:  # the graph (and its AccumulateGrad nodes) is freed with the backward
        alloc.release(t)
    if fsdp is not None:
        fsdp.backward_end(alloc)
    tape.drop(loss)
    alloc.release(ids)
    alloc.release(labels)
    for t in rope_tables:
        alloc.release(t)


def _layer_masks(alloc: Allocator, arch: ModelArch, training: Training, B: int, T: int, dtype: DType,
                 prefix: int = 0) -> dict:
    """The attention masks a program_modern family's model builds once per forward, keyed by the
    layer's sliding window (None: global layers); only families with sliding-window layers or eager
    attention have any (llama's eager mask is handled by the caller).

    SDPA (masking_utils.py `sdpa_mask`): global layers use `is_causal` (no tensor); a sliding layer
    type gets a boolean (1, 1, T, S) mask, expanded (a view) over the batch, once
    kv_length >= sliding_window (`_ignore_causal_mask_sdpa`). Eager (`eager_mask`): one additive
    B x 1 x T x S mask in the embeddings' dtype per layer type.
    """
    from .program import MODERN_TYPES
    from .program_modern import sliding_masked

    if arch.model_type not in MODERN_TYPES:
        return {}
    windows = {b.sliding_window for b in arch.blocks}
    if training.attention == "eager":  # S = T + prefix-tuning keys
        return {w: alloc.new(B * T * (T + prefix), dtype, "saved_activations") for w in windows}
    return {w: alloc.new(T * T, BOOL, "saved_activations") for w in windows if sliding_masked(arch, training, w, T)}


def _checkpointed_block(ctx: Ctx, arch: ModelArch, training: Training, h: Tensor, bp: BlockParams,
                        cos: Tensor | None, kv: int, encoder_out: Tensor | None, reentrant: bool = False,
                        held: list[Tensor] | None = None) -> Tensor:
    """A layer under non-reentrant checkpointing (autograd.CheckpointGroup): its nodes go on the main
    tape with nothing saved but its input; backward recomputes the saved tensors (with early stop)
    when it reaches the layer, so the recomputed tensors, the layer's gradient temporaries and its
    parameters' gradients appear and die op by op as torch runs them."""
    tape, alloc = ctx.tape, ctx.tape.alloc
    tokens, autocast = ctx.tokens, ctx.autocast

    def replay(sub: Tape) -> Tensor:
        # checkpoint.py recompute_fn: the same autocast state, a fresh autocast weight cache (the
        # outer one was cleared when forward left autocast; the recompute's is cleared on its exit)
        sub_ctx = Ctx(sub, tokens, autocast, {})
        out = block_forward(sub_ctx, arch, training, alloc.retain(h), bp, cos, kv, encoder_out)
        sub_ctx.end_forward()
        return out

    if reentrant:
        group = CheckpointGroup(replay, reentrant=True)
        tape.ckpt_group = group
        try:
            out = block_forward(ctx, arch, training, alloc.retain(h), bp, cos, kv, encoder_out)
        finally:
            tape.ckpt_group = None
        # CheckpointFunction: one node, the input saved (ctx.save_for_backward), its own backward
        if out.requires_grad or h.requires_grad:
            out.requires_grad = True
            tape.nodes.append(Node("checkpoint", [h] if h.requires_grad else [], [out],
                                   [tape.save(h), *(tape.save(t) for t in held or [])],
                                   group=group, custom=reentrant_backward))
        tape.drop(h)
        return out
    group = CheckpointGroup(replay, keep=[alloc.retain(h), *(alloc.retain(t) for t in held or [])])
    tape.ckpt_group = group
    try:
        out = block_forward(ctx, arch, training, h, bp, cos, kv, encoder_out)
    finally:
        tape.ckpt_group = None
    if not group.saving_nodes:  # no holder references the frame: its args die with the forward
        for t in group.keep:
            alloc.release(t)
        group.keep = []
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


def simulate_step(model: TunedModel, training: Training, flop_counter: "ops.FlopCount | None" = None) -> StepMemory:
    """Run the symbolic step and return its peak (allocated bytes) with the breakdown.

    With `flop_counter`, the first micro-batch's forward and backward are also counted into it
    (the same ops `engine.flops.micro_batch_flops` counts), so an estimate runs the tape once less."""
    model, training = sharding.zero_view(model, training)  # DeepSpeed: pure half-precision module
    plan = sharding.plan_for(training)  # None on one GPU
    alloc = Allocator() if plan is None else sharding.ShardedAllocator(plan)
    alloc.set_phase("load")
    params, trainables, quant_bytes = _load(alloc, model)
    weights = alloc.total - quant_bytes
    trainable_bytes = alloc.by_category["trainable_params"]
    if plan is not None:
        sharding.persistent_buffers(alloc, trainables)
    grad_ckpt = training.grad_ckpt or model.forces_grad_ckpt
    micro_steps = min(training.grad_accum, 2)
    state_bytes = paged = 0
    step_scratch = 0
    shapes = _param_shapes(params, model.arch)
    for e, p in zip(model.extra_params, params.extra):  # soft prompts, prompt encoders, prefix tables
        if e.rows:
            shapes[id(p)] = (e.rows, e.numel // e.rows)
    costs = [tensor_cost(training.optimizer, training.optimizer_impl, p.numel, p.dtype, shapes.get(id(p)))
             for p in trainables] if plan is None else sharding.optimizer_costs(plan, trainables, shapes)
    state_bytes = sum(c.state_bytes for c in costs)
    paged = sum(c.paged_bytes for c in costs)
    # transformers' Adafactor has one (per-parameter) implementation, whatever optimizer_impl says
    sequential_parts: list[int] = []
    if training.optimizer == "adafactor" or training.optimizer_impl == "for-loop":
        step_scratch, sequential_parts = sequential_step_scratch(_in_optimizer_order(trainables, costs, shapes))
    elif training.optimizer_impl == "foreach":
        step_scratch = sum(c.scratch_bytes for c in costs)
    else:
        step_scratch = 0 if training.optimizer.startswith("adamw") or training.optimizer.startswith("paged") \
            else max((c.scratch_bytes for c in costs), default=0)
    sharded_scratch = sharding.step_scratch(alloc, trainables)  # ZeRO's flat copies (engine/deepspeed.py)
    step_scratch += sharded_scratch
    states_alive = False
    grad_bytes = 0
    for step in (1, 2):
        for micro in range(micro_steps):
            label = f"step{step}.mb{micro + 1}"
            if flop_counter is not None and step == 1 and micro == 0:
                previous = ops.COUNTER[0]
                ops.COUNTER[0] = flop_counter
                try:
                    _forward_backward(alloc, model, params, training, grad_ckpt, label)
                finally:
                    ops.COUNTER[0] = previous
            else:
                _forward_backward(alloc, model, params, training, grad_ckpt, label)
        alloc.set_phase(f"optimizer:step{step}")
        if not states_alive:
            parts = [n for c in costs for n in c.parts]
            if sum(parts) == state_bytes:  # each state tensor on the timeline (engine/allocator.py)
                alloc.parts = parts
            alloc.add_bytes(state_bytes, "optimizer_state")
            states_alive = True
        scratch_parts: list[int] = []
        if sequential_parts:  # one parameter at a time: its temporaries and the previous one's leftover
            scratch_parts = list(sequential_parts)
        elif training.optimizer_impl == "foreach":  # _multi_tensor_*: one scratch tensor per parameter, a list
            scratch_parts = [c.scratch_bytes for c in costs if c.scratch_bytes]
        if scratch_parts:  # the separate tensors of the spike, whose sum is the spike (engine/allocator.py replays them)
            alloc.parts = scratch_parts + ([sharded_scratch] if sharded_scratch else [])
        alloc.spike(step_scratch)
        grad_bytes = alloc.by_category["grads"]
        # zero_grad(set_to_none=True): every gradient freed
        for p in trainables:
            if p.grad is not None and p.grad.alive:
                alloc.release(p.grad)
            p.grad = None
        if plan is not None:
            plan.zero_grad(alloc)
    return StepMemory(alloc.peak, alloc.phase_peaks, weights, quant_bytes, trainable_bytes, grad_bytes,
                      state_bytes, paged, plan.host_bytes if plan is not None else 0, alloc.events)


def _in_optimizer_order(trainables: list[Param], costs: list["OptimizerCost"],
                        shapes: dict[int, tuple[int, int]]) -> list["OptimizerCost"]:
    """Costs in the order the optimizer updates the parameters: HF Trainer's two parameter groups,
    weight-decayed matrices first, then biases and norm weights (`get_decay_parameter_names`; the
    harness's make_optimizer), each in module order. 2-D tensors (those with a shape here) stand for the
    first group; the rest (biases, norms, 1-D vectors) for the second."""
    decay = [c for p, c in zip(trainables, costs) if id(p) in shapes]
    rest = [c for p, c in zip(trainables, costs) if id(p) not in shapes]
    return decay + rest


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
