"""The whole training step on the symbolic allocator: load, forward, backward, optimizer step.

Two optimizer steps are simulated, as the tracer and profiler run them: the first creates the
optimizer state lazily inside `step()`; the second starts with it allocated (steady state).
With gradient accumulation, the second micro-batch runs with the first one's gradients alive;
later micro-batches repeat that state, so two are enough. The peak is the maximum over all.
Gradient checkpointing: non-reentrant (transformers' default) records each layer's nodes with
holders instead of saved tensors and recomputes them, with torch's early stop, when backward
reaches the layer (autograd.CheckpointGroup); reentrant (peft's kbit prep) runs the layer under
no_grad and reruns it whole inside one CheckpointFunction node's backward (recompute.reentrant_backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arch import ModelArch
from ..dtypes import BOOL, INT64, DType
from ..trainers import get_trainer
from ..training import Training
from ..tuned import TunedModel
from .losses import LOSSES
from .autograd import CheckpointGroup, Node, Param, Tape
from .recompute import reentrant_backward
from . import ops
from .ops import Ctx, linear
from .optimizers import OptimizerCost, sequential_step_scratch, tensor_cost
from .program import (BlockParams, ModelParams, block_forward, embeddings_out, head_transform,
                      loss_forward, stack_end, stack_locals, virtual_prompt)
from .sim import Allocator, Peak, Tensor
from . import sharding
from .load import _all_params, _block_of_params, _load, _param_shapes


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
    host_bytes: int = 0  # offloaded to host memory (sharding.py, engine/offload.py), per rank
    activation_offload_bytes: int = 0  # saved activations copied to the host per micro-batch (and back), engine/offload.py
    # the ordered allocations / frees, load phase included (sim.Allocator.events; engine/allocator.py)
    events: list[int] = field(default_factory=list, repr=False, compare=False)


def _forward_backward(alloc: Allocator, model: TunedModel, params: ModelParams, training: Training,
                      grad_ckpt: bool, label: str) -> None:
    arch = model.arch
    B = training.micro_batch
    T = training.seq_len + model.virtual_tokens
    tokens = B * T
    autocast = training.compute_dtype if training.mixed else None
    tape = Tape(alloc)
    from .liger import layer_kernels  # trainer modules imported when a step runs, not with the CLI
    from .offload import offloader_for

    tape.offloader = offloader_for(alloc, training, model)  # activation offloading (engine/offload.py)
    tape.marking = getattr(alloc, "segs", None) is not None  # engine/depth.py: mark the blocks' backward
    for p in _all_params(params):
        tape.param_tensor(p)
    ctx = Ctx(tape, tokens, autocast, kernels=layer_kernels(training, arch))  # trainer kernels (engine/liger.py)
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
        # GptOssRotaryEmbedding.forward: `emb = freqs` (no cat of two halves): cos/sin are T x hd/2
        width = arch.head_dim // 2 if arch.family == "gpt_oss" else arch.head_dim
        rope_tables = [alloc.new(T * width, h.dtype, "saved_activations") for _ in range(2 * pairs)]
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
        alloc.mark("fwd", i)
        tape.block = i
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
    tape.block = None
    alloc.mark("fwd_end")
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
    if tape.marking:  # the same drops as Ctx.end_forward, marked by the block that cached each copy
        owners = _block_of_params(params)
        current = -2
        for key, t in ctx.cast_cache.items():
            block = owners.get(key)  # type: ignore[call-overload]
            if block != current:
                current = block
                alloc.mark("endfwd", block)
            tape.drop(t)
        ctx.cast_cache.clear()
    else:
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
        sub_ctx = Ctx(sub, tokens, autocast, {}, ctx.kernels)
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
                                   [tape.save(h, ckpt_input=True), *(tape.save(t) for t in held or [])],
                                   group=group, custom=reentrant_backward, block=tape.block))
        tape.drop(h)
        return out
    group = CheckpointGroup(replay, keep=[tape.keep_input(h), *(alloc.retain(t) for t in held or [])])
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


def simulate_step(model: TunedModel, training: Training, flop_counter: "ops.FlopCount | None" = None,
                  extrapolate: bool = True) -> StepMemory:
    """Run the symbolic step and return its peak (allocated bytes) with the breakdown.

    With `flop_counter`, the first micro-batch's forward and backward are also counted into it
    (the same ops `engine.flops.micro_batch_flops` counts), so an estimate runs the tape once less.
    `extrapolate`: a model whose blocks repeat is simulated at two small depths and extrapolated to
    its own, with the same result byte for byte (engine/depth.py); False (or a configuration
    depth.py cannot vouch for) runs every block: the reference."""
    if extrapolate:
        from .depth import extrapolated_step

        got = extrapolated_step(model, training, flop_counter, simulate=_simulate, step_memory=StepMemory)
        if got is not None:
            return got
    return _simulate(model, training, flop_counter)


def _simulate(model: TunedModel, training: Training, flop_counter: "ops.FlopCount | None" = None,
              alloc: Allocator | None = None) -> StepMemory:
    """The whole step on every block of `model` (`alloc`: the allocator to run it on, one GPU only)."""
    model, training = sharding.zero_view(model, training)  # DeepSpeed: pure half-precision module
    plan = sharding.plan_for(training)  # None on one GPU
    if alloc is None:
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
    marking = getattr(alloc, "segs", None) is not None  # engine/depth.py MarkingAllocator
    owners = _block_of_params(params) if marking else {}
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
            if marking and sum(parts) == state_bytes:
                # the same tensors added block by block (a rising run: the totals noted on the way are below
                # the last one, so the peaks are those of one add), each block's in its own segment
                for block, chunk in _by_block(trainables, [c.parts for c in costs], owners):
                    alloc.mark("state", block)
                    alloc.parts = chunk
                    alloc.add_bytes(sum(chunk), "optimizer_state")
                alloc.mark("state_end")
            else:
                if sum(parts) == state_bytes:  # each state tensor on the timeline (engine/allocator.py)
                    alloc.parts = parts
                alloc.add_bytes(state_bytes, "optimizer_state")
            states_alive = True
        scratch_parts: list[int] = []
        if sequential_parts:  # one parameter at a time: its temporaries and the previous one's leftover
            scratch_parts = list(sequential_parts)
        elif training.optimizer_impl == "foreach":  # _multi_tensor_*: one scratch tensor per parameter, a list
            scratch_parts = [c.scratch_bytes for c in costs if c.scratch_bytes]
        if marking and scratch_parts and not sequential_parts and not sharded_scratch:
            _marked_spike(alloc, list(_by_block(trainables, [[c.scratch_bytes] if c.scratch_bytes else []
                                                              for c in costs], owners)))
        else:
            if scratch_parts:  # the separate tensors of the spike, whose sum is the spike (engine/allocator.py replays them)
                alloc.parts = scratch_parts + ([sharded_scratch] if sharded_scratch else [])
            alloc.spike(step_scratch)
        grad_bytes = alloc.by_category["grads"]
        # zero_grad(set_to_none=True): every gradient freed
        current = -2
        for p in trainables:
            if marking and owners.get(id(p)) != current:
                current = owners.get(id(p))
                alloc.mark("zero_grad", current)
            if p.grad is not None and p.grad.alive:
                alloc.release(p.grad)
            p.grad = None
        if marking:
            alloc.mark("zero_grad_end")
        if plan is not None:
            plan.zero_grad(alloc)
    from .offload import host_and_copied

    act_host, act_copied = host_and_copied(alloc)  # activation offloading (engine/offload.py)
    return StepMemory(alloc.peak, alloc.phase_peaks, weights, quant_bytes, trainable_bytes, grad_bytes,
                      state_bytes, paged, (plan.host_bytes if plan is not None else 0) + act_host, act_copied,
                      alloc.events)


def _by_block(trainables: list[Param], parts: list[list[int]], owners: dict[int, int]):  # type: ignore[no-untyped-def]
    """(block or None, the parts of its run of consecutive trainables) in order (engine/depth.py)."""
    out: list[tuple[int | None, list[int]]] = []
    for p, ps in zip(trainables, parts):
        block = owners.get(id(p))
        if not out or out[-1][0] != block:
            out.append((block, []))
        out[-1][1].extend(ps)
    return out


def _marked_spike(alloc: Allocator, chunks: list[tuple[int | None, list[int]]]) -> None:
    """Allocator.spike over `chunks`' parts, block by block in marked segments: every part allocated
    (a rising run, noted once per chunk: the same peaks), then every part freed in the same order."""
    firsts = []
    total = 0
    for block, chunk in chunks:
        alloc.mark("spike", block)
        firsts.append(len(alloc.events))
        alloc.parts = chunk
        alloc.add_bytes(sum(chunk), "temporaries")
        total += sum(chunk)
    ends = firsts[1:] + [len(alloc.events)]
    for (block, _), first, end in zip(chunks, firsts, ends):
        alloc.mark("spike_free", block)
        alloc.events.extend(~i for i in range(first, end))
    alloc.mark("spike_end")
    alloc.by_category["temporaries"] -= total
    alloc.total -= total


def _in_optimizer_order(trainables: list[Param], costs: list["OptimizerCost"],
                        shapes: dict[int, tuple[int, int]]) -> list["OptimizerCost"]:
    """Costs in the order the optimizer updates the parameters: HF Trainer's two parameter groups,
    weight-decayed matrices first, then biases and norm weights (`get_decay_parameter_names`; the
    harness's make_optimizer), each in module order. 2-D tensors (those with a shape here) stand for the
    first group; the rest (biases, norms, 1-D vectors) for the second."""
    decay = [c for p, c in zip(trainables, costs) if id(p) in shapes]
    rest = [c for p, c in zip(trainables, costs) if id(p) not in shapes]
    return decay + rest

