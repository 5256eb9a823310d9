"""axolotl's `chunked_cross_entropy` (axolotl 0.19.0 src/axolotl/monkeypatch/loss/chunked.py), modelled from source:
no trace checks it (its per-chunk loss is `torch.compile`d, which the CPU tracer does not run), so estimates that use it
say "modelled from source".

`patch_chunked_ce_loss_fn(num_output_chunks)` (chunked.py 131-138; loaders/patch_manager.py 408-413, default 8
chunks, `chunked_cross_entropy_num_chunks` overrides) replaces transformers' `ForCausalLMLoss`:
  model forward       the lm_head still builds the whole (B x T x V) logits in the compute dtype (no fp32 upcast)
  chunked.py 111-113  labels padded by one column (B x (T+1) int64) and shifted (B x T int64, contiguous)
  chunked.py 53       `(labels != ignore_index).sum()`: a B x T bool, then a scalar
  chunked.py 91-93    `source.chunk(n, dim=1)`: views of the logits, no copy
  chunked.py 63-70    per chunk `F.cross_entropy(logits_chunk.float(), labels_chunk, reduction="sum")`, compiled by
                      inductor (chunked.py 80-82). Assumed (AOTAutograd's min-cut partitioner, not read from a trace):
                      the upcast, log-softmax and gather fuse into one reduction kernel that saves the half-precision
                      chunk (a view of the logits) and one fp32 logsumexp per row; its backward recomputes the
                      softmax and writes the chunk's gradient in the logits' dtype (rows/n x V), no fp32 copy
backward              SplitBackward (`chunk`'s derivative): the n chunk gradients wait in its input buffer, then
                      `cat` builds the (B x T x V) gradient of the logits (all chunks alive with it), the chunks die,
                      and the lm_head's backward consumes it
So at most the half logits, the n chunk gradients and their concatenation are alive: 3 half-precision logits-sized
tensors, against the bare step's fp32 upcast, log-softmax and fp32 gradient.
"""

from __future__ import annotations

from ..arch import ModelArch
from ..dtypes import BOOL, FP32, INT64
from .autograd import Node, Param, Tape
from .ops import Ctx, linear
from .sim import Tensor

AXOLOTL_DEFAULT_CHUNKS = 8  # chunked.py `num_output_chunks: int = 8` (get_causal_lm_loss / patch_chunked_ce_loss_fn)


def _chunk_rows(total: int, n: int) -> list[int]:
    """torch.chunk(n) along the sequence: ceil(total / n) per chunk, the last one shorter (fewer chunks if it runs
    out)."""
    size = -(-total // n)
    return [min(size, total - s) for s in range(0, total, size)]


def chunked_ce(ctx: Ctx, arch: ModelArch, h: Tensor, head: Param, batch: int, seq_len: int, virtual_tokens: int,
               num_chunks: int = AXOLOTL_DEFAULT_CHUNKS) -> Tensor:
    from .loss_error import require_causal_lm

    require_causal_lm(arch, "axolotl's chunked cross-entropy replaces ForCausalLMLoss")
    tape, alloc = ctx.tape, ctx.tape.alloc
    V = arch.vocab_size
    T = seq_len + virtual_tokens
    logits = linear(ctx, h, head, None, V)  # compute dtype (autocast) or the hidden dtype
    alloc.recategorize(logits, "loss_logits")
    padded = alloc.new(batch * (T + 1), INT64, "inputs")
    shifted = alloc.new(batch * T, INT64, "inputs")
    mask = alloc.new(batch * T, BOOL, "temporaries")
    count = alloc.new(1, INT64, "temporaries")
    alloc.release(mask)
    rows = [batch * t for t in _chunk_rows(T, num_chunks)]
    lse = [alloc.new(r, FP32, "saved_activations", label="chunk logsumexp") for r in rows]
    sums = [alloc.new(1, FP32, "temporaries") for _ in rows]
    loss = alloc.new(1, FP32, "temporaries", logits.requires_grad, "loss")
    for t in (*sums, count, padded):
        alloc.release(t)
    saved = [alloc.retain(logits), *lse, shifted]

    def backward(tp: Tape, node: Node) -> None:
        g = tp.grads.pop(id(node.outputs[0]), None)
        tp.alloc.release(g)
        if logits.requires_grad:
            chunks = [tp.alloc.new(r * V, logits.dtype, "loss_logits", label="chunk grad") for r in rows]
            tp._grad_for(logits)  # SplitBackward's cat: the whole logits gradient, chunks alive with it
            for c in chunks:
                tp.alloc.release(c)
        for t in node.saved:
            tp.alloc.release(t)

    if logits.requires_grad:
        tape.nodes.append(Node("axolotl_chunked_ce", [logits], [loss], saved, custom=backward))
    else:
        for t in saved:
            alloc.release(t)
    tape.drop(logits)
    return loss


def assumption(arch: ModelArch, training) -> str:  # type: ignore[no-untyped-def]
    return (f"axolotl chunked_cross_entropy ({AXOLOTL_DEFAULT_CHUNKS} chunks; monkeypatch/loss/chunked.py) modelled "
            "from source, not traced: the half-precision logits are built, each chunk's compiled loss saves the chunk "
            "and an fp32 logsumexp per row and writes a half-precision gradient (inductor's fusion assumed), "
            "SplitBackward concatenates the chunk gradients")
