"""The loss at the end of the forward, one model per trainer (`TrainerSpec.loss` names one of `LOSSES`).

- `full_logits`: the bare step (program.py `loss_forward`): lm_head, fp32 upcast of the logits, cross-entropy.
- `trl_chunked_logprob`: TRL 1.16's fused LM head (trl/trainer/utils.py `add_fused_lm_head._fused_forward`,
  lines 1620-1660, and trl/kernels/chunked_logprob.py `ChunkedLogProbFunction`), as `SFTTrainer.compute_loss`
  calls it (`model(**inputs, fused_lm_head=True)`, sft_trainer.py 1611), on its GPU (Triton, compact) path.

Every allocation of the fused head, in order (N = label tokens scored, R = B x (T-1) shifted positions, H the
hidden size, V the vocabulary, C = 32768 the vocabulary tile (utils.py `_CHUNKED_LOGPROB_CHUNK_SIZE`),
K = 4096 the token tile (chunked_logprob.py:31 `TOKEN_CHUNK_SIZE`), cd the autocast dtype or the hidden dtype):

forward
  mask = labels[:, 1:] != -100                 R bool; saved by IndexBackward / MaskedScatterBackward
  hidden_states[mask]                          N x H, hidden dtype (aten.index copy); saved by the Function
  labels[mask]                                 N int64; saved (targets)
  7 running statistics                         N fp32 each (chunked_logprob.py:340-346), freed on return
  mm_buf                                       min(N, K) x C, cd (chunked_logprob.py:347), freed on return
  per token tile: hidden[...].to(cd)           n x H cd when the hidden dtype is not cd
  per vocab tile: weight[...].to(cd)           C x H cd when the head is not cd, freed after its mm (356)
  log_z, logprobs, entropy, is_top1            N each (378-383; log(sum_exp), x_sum_exp/sum_exp, two bool
                                               comparisons as temporaries); log_z and entropy saved (386)
  compact scatter (utils.py 1648-1652)         R per output: new_zeros, masked_scatter (out of place), zeros
                                               freed; the N-sized outputs freed, entropy kept (saved)
  loss = -log_probs.sum() / mask.sum()         R fp32 negation freed after the sum; scalars
compute_loss: per_token_loss = -log_probs      R fp32 until compute_loss returns, the loss scalar
backward (Function.backward, chunked_logprob.py 398-465)
  grad of -log_probs: R fp32; masked_select   N fp32 (masked_scatter_backward)
  grad_hidden zeros                            N x H fp32 (406-408) when the hidden states need grad
  grad_weight zeros                            V x H fp32 (409-411) when the head is trainable
  mm_buf                                       min(N, K) x C cd (413)
  w_chunk = weight[...].to(cd)                 C x H cd per tile when the head is not cd; the next tile's is
                                               allocated before the previous one is dropped (423)
  accumulate                                   in place (`_addmm_fp32`, CUDA `addmm(out_dtype=fp32, out=)`)
  return grad_hidden.to(hidden dtype)          N x H (a copy unless fp32), then grad_weight.to(head dtype)
  IndexBackward                                R x H zeros, `index_put` with the gradient (out of place under
                                               FakeTensors, `index_backward` for tensor subclasses: one more
                                               R x H tensor; a CUDA tensor is written in place), zeros freed
  SliceBackward ([:, :-1])                     B x T x H: the gradient of the final norm's output
"""

from __future__ import annotations

from typing import Callable

from ..arch import ModelArch
from ..dtypes import BOOL, FP32, INT64
from .autograd import Node, Param, Tape
from .ops import COUNTER, Ctx, count_matmul
from .loss_error import LossError, require_causal_lm  # noqa: F401  (LossError re-exported)
from .program import loss_forward
from .sim import Tensor

TRL_VOCAB_TILE = 32768  # trl/trainer/utils.py `_CHUNKED_LOGPROB_CHUNK_SIZE`
TRL_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py:31 `TOKEN_CHUNK_SIZE`
TRL_RUNNING_STATS = 7  # chunked_logprob.py:340-346: running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
#                        max_before_target, target_logit


def full_logits(ctx: Ctx, arch: ModelArch, h: Tensor, head: Param, batch: int, seq_len: int,
                virtual_tokens: int) -> Tensor:
    return loss_forward(ctx, arch, h, head, arch.vocab_size, batch * seq_len)


def _vocab_tiles(vocab: int) -> list[int]:
    return [min(TRL_VOCAB_TILE, vocab - s) for s in range(0, vocab, TRL_VOCAB_TILE)]


def _token_tiles(n: int) -> list[int]:
    return [min(TRL_TOKEN_TILE, n - s) for s in range(0, n, TRL_TOKEN_TILE)]


def trl_chunked_logprob(ctx: Ctx, arch: ModelArch, h: Tensor, head: Param, batch: int, seq_len: int,
                        virtual_tokens: int) -> Tensor:
    """TRL's fused LM head and SFTTrainer's loss (module docstring), forward now, backward as one custom node."""
    require_causal_lm(arch, "TRL's fused LM head scores next tokens of a causal LM")
    tape, alloc = ctx.tape, ctx.tape.alloc
    H, V = arch.head_in_features, arch.vocab_size
    T = seq_len + virtual_tokens
    R = batch * (T - 1)  # hidden_states[:, :-1]
    # peft prompt learning pads the labels with -100 over the virtual tokens (peft_model.py): after the shift, the
    # first virtual_tokens - 1 positions of each row are ignored and all seq_len real labels are scored
    N = batch * seq_len if virtual_tokens else R
    hd, wd = h.dtype, head.dtype
    cd = ctx.autocast or hd
    head_t = tape.param_tensor(head)
    rg = h.requires_grad or head.trainable

    mask = alloc.new(R, BOOL, "saved_activations", label="label_mask")
    hid = alloc.new(N * H, hd, "saved_activations", rg, "hidden_states[mask]")
    targets = alloc.new(N, INT64, "saved_activations", label="labels[mask]")
    stats = [alloc.new(N, FP32, "temporaries", label="running_stat") for _ in range(TRL_RUNNING_STATS)]
    mm_buf = alloc.new(min(N, TRL_TOKEN_TILE) * TRL_VOCAB_TILE, cd, "loss_logits", label="mm_buf")
    tiles = _vocab_tiles(V)
    chunk = None
    for n in _token_tiles(N):
        if hd != cd:
            new_chunk = alloc.new(n * H, cd, "temporaries", label="hidden_chunk")
            alloc.release(chunk)
            chunk = new_chunk
        if wd != cd:
            alloc.spike(max(_rounded(cd, t * H) for t in tiles))
    count_matmul(2 * N * H * V, h.requires_grad, head.trainable)
    tmp = alloc.new(N, FP32, "temporaries")
    log_z = alloc.new(N, FP32, "saved_activations", label="log_z")
    alloc.release(tmp)
    logprobs = alloc.new(N, FP32, "temporaries", rg, "logprobs")
    tmp = alloc.new(N, FP32, "temporaries")
    entropy = alloc.new(N, FP32, "saved_activations", rg, "entropy")
    alloc.release(tmp)
    a, b = alloc.new(N, BOOL, "temporaries"), alloc.new(N, BOOL, "temporaries")
    top1 = alloc.new(N, BOOL, "temporaries")
    alloc.release(a)
    alloc.release(b)
    for t in (mm_buf, chunk, *stats):
        alloc.release(t)
    # compact scatter back to (B, T-1): log_probs, entropy, is_top1
    outs = []
    for dtype, grad in ((FP32, rg), (FP32, rg), (BOOL, False)):
        zeros = alloc.new(R, dtype, "temporaries")
        outs.append(alloc.new(R, dtype, "temporaries", grad))
        alloc.release(zeros)
    alloc.release(logprobs)
    alloc.release(top1)
    lp, ent, is_top1 = outs
    # the fused forward's own loss: -log_probs (R) summed, divided by mask.sum().clamp(min=1)
    neg = alloc.new(R, FP32, "temporaries")
    s = alloc.new(1, FP32, "temporaries")
    alloc.release(neg)
    msum = alloc.new(1, INT64, "temporaries")
    clamped = alloc.new(1, INT64, "temporaries")
    alloc.release(msum)
    inner_loss = alloc.new(1, FP32, "temporaries")
    alloc.release(s)
    alloc.release(clamped)
    # SFTTrainer.compute_loss: per_token_loss = -log_probs; loss = per_token_loss.sum() / num_tokens.clamp(min=1)
    per_token = alloc.new(R, FP32, "temporaries", rg)
    num = alloc.new(1, INT64, "temporaries")
    num_c = alloc.new(1, INT64, "temporaries")
    s = alloc.new(1, FP32, "temporaries", rg)
    loss = alloc.new(1, FP32, "temporaries", rg, "loss")
    for t in (s, num, num_c, per_token, lp, ent, is_top1, inner_loss):  # compute_loss returns: outputs die
        alloc.release(t)

    def backward(tp: Tape, node: Node) -> None:
        _trl_backward(tp, node, h, head, head_t, R, N, H, V, batch * T, cd)

    inputs = [h] if h.requires_grad else []
    if head.trainable:
        inputs.append(head_t)
    if rg:
        tape.nodes.append(Node("trl_fused_lm_head", inputs, [loss], [mask, hid, targets, log_z, entropy],
                               custom=backward))
    else:
        for t in (mask, hid, targets, log_z, entropy):
            alloc.release(t)
    return loss


def _rounded(dtype, numel: int) -> int:  # type: ignore[no-untyped-def]
    from .sim import rounded

    return rounded(dtype.bytes_for(numel))


def _trl_backward(tape: Tape, node: Node, h: Tensor, head: Param, head_t: Tensor, R: int, N: int, H: int, V: int,
                  rows: int, cd) -> None:  # type: ignore[no-untyped-def]
    alloc = tape.alloc
    c = COUNTER[0]
    if c is not None:  # every tile is projected again in backward (chunked_logprob.py 425)
        c.recompute += 2 * N * H * V
    loss = node.outputs[0]
    g_loss = tape.grads.pop(id(loss), None)
    g_div = alloc.new(1, FP32, "temporaries")  # DivBackward: grad / num_tokens
    alloc.release(g_loss)
    g_neg = alloc.new(R, FP32, "temporaries")  # NegBackward of the expanded sum gradient
    alloc.release(g_div)
    g_lp = alloc.new(N, FP32, "temporaries")  # masked_scatter_backward: grad.masked_select(mask)
    alloc.release(g_neg)
    # ChunkedLogProbFunction.backward
    grad_hidden = alloc.new(N * H, FP32, "temporaries") if h.requires_grad else None
    grad_weight = None
    if head.trainable:
        accumulating = head.grad is not None and head.grad.alive  # a later micro-batch of grad accumulation
        if head.dtype == FP32 and not accumulating:
            tape._grad_for(head_t)  # the fp32 accumulator is the parameter's gradient (AccumulateGrad steals it)
        else:
            # a 16-bit head, or an existing .grad: the fp32 accumulator lives through the whole backward and
            # is converted / added in place (accumulate_grad.h `variable_grad += new_grad`) only at its end
            grad_weight = alloc.new(V * H, FP32, "temporaries")
    mm_buf = alloc.new(min(N, TRL_TOKEN_TILE) * TRL_VOCAB_TILE, cd, "loss_logits", label="mm_buf")
    hd = node.saved[1].dtype
    chunk = w_chunk = None
    for n in _token_tiles(N):
        if hd != cd:
            new_chunk = alloc.new(n * H, cd, "temporaries")
            alloc.release(chunk)
            chunk = new_chunk
        if head.dtype != cd:
            for t in _vocab_tiles(V):
                new_w = alloc.new(t * H, cd, "temporaries")
                alloc.release(w_chunk)
                w_chunk = new_w
    g_hid = None
    if grad_hidden is not None:
        if hd != FP32:
            g_hid = alloc.new(N * H, hd, "temporaries")
            alloc.release(grad_hidden)
        else:
            g_hid = grad_hidden
    if grad_weight is not None:
        if head.dtype == FP32:  # no conversion: the accumulator itself is added into .grad, then freed
            alloc.release(grad_weight)
            tape._grad_for(head_t)
        else:
            tape._grad_for(head_t)
            alloc.release(grad_weight)
    for t in (mm_buf, chunk, w_chunk, g_lp):
        alloc.release(t)
    for t in node.saved[1:]:  # hid, targets, log_z, entropy: released after the Function's backward
        alloc.release(t)
    if g_hid is not None:
        # IndexBackward0 (index_backward): zeros (R x H) and, for tensor subclasses such as the tracer's
        # FakeTensors, an out-of-place index_put: two R x H tensors, the zeros then freed
        zeros = alloc.new(R * H, hd, "temporaries")
        g_hs = alloc.new(R * H, hd, "temporaries")
        alloc.release(zeros)
        alloc.release(g_hid)
        tape._grad_for(h)  # SliceBackward0: the B x T x H gradient of the final norm's output
        alloc.release(g_hs)
    alloc.release(node.saved[0])  # the label mask (held by the graph's masked_scatter / index nodes)


def _liger_flce(*args, **kwargs) -> Tensor:  # type: ignore[no-untyped-def]
    from .liger import liger_flce

    return liger_flce(*args, **kwargs)


def _chunked_ce(*args, **kwargs) -> Tensor:  # type: ignore[no-untyped-def]
    from .chunked_ce import chunked_ce

    return chunked_ce(*args, **kwargs)


def _unsloth_fused_ce(*args, **kwargs) -> Tensor:  # type: ignore[no-untyped-def]
    from .unsloth import unsloth_fused_ce

    return unsloth_fused_ce(*args, **kwargs)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "full_logits": full_logits,
    "trl_chunked_logprob": trl_chunked_logprob,
    "liger_flce": _liger_flce,
    "chunked_ce": _chunked_ce,
    "unsloth_fused_ce": _unsloth_fused_ce,  # engine/unsloth.py, modelled from unsloth_zoo's source  # engine/chunked_ce.py, axolotl's chunked cross-entropy, modelled from source  # engine/liger.py, modelled from liger-kernel 0.8.2's source (not traceable on a CPU)
}
