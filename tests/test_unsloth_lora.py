"""Unsloth's fused LoRA autograd Functions (engine/unsloth_lora.py, from unsloth 2026.10.9 kernels/fast_lora.py):
what each forward saves against a hand computation from the cited lines, what its backward allocates, when
Unsloth would not patch (peft's ops run, and the estimate says why), and the estimate-level change against the peft
ops in the expected direction by the modelled amount."""

import pytest

from peftplan.arch import Linear, from_hf_config
from peftplan.catalog import load_gpu
from peftplan.dtypes import BF16, FP32, NF4
from peftplan.engine import unsloth_lora
from peftplan.engine.autograd import Param, Tape
from peftplan.engine.ops import Ctx
from peftplan.engine.program import LinearParams, tuned_linear
from peftplan.engine.sim import Allocator, rounded
from peftplan.estimate import estimate
from peftplan.training import Training
from peftplan.tuned import Quant, TunedLinear

N, H, KV, I, R = 256, 128, 64, 512, 16  # tokens, hidden, k/v width, intermediate, LoRA rank
SHAPES = {"q": (H, H), "k": (H, KV), "v": (H, KV), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
TINY = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 512, "num_hidden_layers": 3}


def _lps(alloc, quant=False, **tuned_kw):
    out = {}
    for role, (fin, fout) in SHAPES.items():
        t = TunedLinear(Linear(f"x.{role}_proj", fin, fout, False, role), NF4 if quant else BF16, False, BF16, False,
                        quant=Quant("nf4", True, compute_dtype=BF16) if quant else None, lora_rank=R,
                        lora_dtype=FP32, **tuned_kw)
        w = Param(fin * fout, t.weight_dtype, False)
        w.tensor = alloc.new(fin * fout, t.weight_dtype, "frozen_params")
        a, b = Param(R * fin, FP32, True), Param(fout * R, FP32, True)
        a.tensor = alloc.new(a.numel, FP32, "trainable_params")
        b.tensor = alloc.new(b.numel, FP32, "trainable_params")
        out[role] = LinearParams(t, w, None, a, b)
    return out


def _ctx(kernels=("unsloth_lora",)):
    alloc = Allocator()
    return Ctx(Tape(alloc), N, BF16, kernels=frozenset(kernels)), alloc


def _saved(tape):
    return sum(t.nbytes for n in tape.nodes for t in n.saved)


def test_lora_qkv_saves_the_input_once():
    # fast_lora.py 845-854 save_for_backward(X, QA, QB, KA, KB, VA, VB): the adapters are leaves (no new bytes)
    ctx, alloc = _ctx()
    lps = _lps(alloc)
    x = ctx.tape.new(N * H, BF16, True, "x")
    q, k, v = unsloth_lora.qkv(ctx, Training(), x, lps)
    assert (q.numel, k.numel, v.numel) == (N * H, N * KV, N * KV)
    [node] = ctx.tape.nodes
    assert node.name == "unsloth_lora_qkv" and node.saved == [x]
    assert _saved(ctx.tape) == rounded(N * H * 2)
    # peft's ops (program.py _lora) save per adapter a bf16 copy of x and its N x r product
    peft, palloc = _ctx(())
    plps = _lps(palloc)
    x2 = peft.tape.new(N * H, BF16, True, "x")
    for role in "qkv":
        peft.tape.drop(tuned_linear(peft, x2, plps[role]))
    assert _saved(peft.tape) - _saved(ctx.tape) >= 3 * rounded(N * R * 2) + 2 * rounded(N * H * 2)


def test_lora_mlp_saves_x_e_g_and_recomputes_h():
    # fast_lora.py 448 save_for_backward(gateA, gateB, upA, upB, downA, downB, X, e, g): h (swiglu.py 49) is a
    # forward local, freed when forward returns
    ctx, alloc = _ctx()
    lps = _lps(alloc)
    x = ctx.tape.new(N * H, BF16, True, "x")
    before = alloc.total
    out = unsloth_lora.mlp(ctx, Training(), x, lps)
    [node] = ctx.tape.nodes
    assert node.name == "unsloth_lora_mlp" and node.saved[0] is x
    assert _saved(ctx.tape) == rounded(N * H * 2) + 2 * rounded(N * I * 2)
    assert alloc.total - before == 2 * rounded(N * I * 2) + rounded(N * H * 2)  # e, g saved; the output i
    assert out.numel == N * H


def test_lora_w_saves_its_input_and_allocates_dx():
    # fast_lora.py 1073 save_for_backward(A, B, X); backward 1108 `dX = dY @ W.t()`: a new tensor (no out=)
    ctx, alloc = _ctx()
    lps = _lps(alloc)
    x = ctx.tape.new(N * H, BF16, True, "attn_out")
    unsloth_lora.o(ctx, Training(), x, lps)
    [node] = ctx.tape.nodes
    assert node.saved == [x] and _saved(ctx.tape) == rounded(N * H * 2)
    ctx.tape.grads[id(node.outputs[0])] = alloc.new(N * H, BF16, "temporaries")
    node.custom(ctx.tape, node)
    dx = ctx.tape.grads[id(x)]
    assert dx is not x and dx.nbytes == rounded(N * H * 2)


@pytest.mark.parametrize("fn,roles,saved_extra", [(unsloth_lora.qkv, "qkv", 0),
                                                  (unsloth_lora.mlp, ("gate", "up", "down"), 2)])
def test_backward_writes_dx_into_the_saved_input_and_decodes_4bit_weights(fn, roles, saved_extra):
    # 565 / 935 `torch.matmul(dY, W.t(), out=X)`: dX is X's storage; 563 / 934 fast_dequantize(use_global_buffer=
    # False): a fresh bf16 weight per projection while its dX term is computed
    ctx, alloc = _ctx()
    lps = _lps(alloc, quant=True)
    x = ctx.tape.new(N * H, BF16, True, "x")
    fn(ctx, Training(), x, lps)
    scratch = unsloth_lora._SCRATCH[alloc]
    assert scratch.nbytes == rounded(max(fin * fout for fin, fout in SHAPES.values()) * 2)  # utils.py 649-657
    [node] = ctx.tape.nodes
    for out in node.outputs:
        ctx.tape.grads[id(out)] = alloc.new(out.numel, BF16, "temporaries")
    start = alloc.total
    alloc.peak.bytes = 0
    node.custom(ctx.tape, node)
    assert ctx.tape.grads[id(x)] is x  # aliased, not allocated
    decoded = rounded(max(lps[r].tuned.linear.weight_numel for r in roles if r != "down") * 2)
    assert alloc.peak.bytes >= start + decoded
    grads = sum(rounded(lps[r].lora_a.numel * 4) + rounded(lps[r].lora_b.numel * 4) for r in roles)
    outs = sum(rounded(o.numel * 2) for o in node.outputs)
    e_g = saved_extra * rounded(N * I * 2)
    assert alloc.total == start + grads - outs - e_g  # fp32 adapter grads in; output grads, e, g freed; dX is x
    assert scratch.alive


def test_unsloth_declines_where_patch_peft_model_does():
    alloc = Allocator()
    for kw, why in (({"dora": True}, "DoRA"), ({"lora_dropout": 0.1}, "lora_dropout > 0")):
        lps = _lps(alloc, **kw)
        assert unsloth_lora.group_reason([lp.tuned for lp in lps.values()], ("q", "k", "v"), Training()) \
            .startswith(why)
    lps = _lps(alloc)
    del lps["k"]
    ctx, _ = _ctx()
    x = ctx.tape.new(N * H, BF16, True, "x")
    assert unsloth_lora.qkv(ctx, Training(), x, lps) is None and not ctx.tape.nodes
    assert unsloth_lora.mlp(ctx, Training(shard="fsdp-full", n_gpus=2), x, _lps(alloc)) is None


def test_estimate_drops_by_the_autocast_copies_and_says_so(monkeypatch):
    # the forward peak is the fused CE; peft's lora_A / lora_B matmuls under autocast cache a bf16 copy of every fp32
    # adapter weight until the forward ends (program.py weight_for_matmul); the fused Functions cast with .to()
    # (fast_lora.py 483-490, utils.py 1895-1897), freed at once: the peak drops by exactly those copies
    arch, gpu = from_hf_config(TINY, "tiny"), load_gpu("a100-80g")
    t = Training(micro_batch=2, seq_len=1024, trainer="unsloth", grad_ckpt=True)
    fused = estimate(arch, "lora", t, gpu)
    monkeypatch.setattr(unsloth_lora, "_take", lambda *a: None)
    peft = estimate(arch, "lora", t, gpu)
    assert fused.memory.peak_phase.startswith("forward") and peft.memory.peak_phase.startswith("forward")
    r, h, kv, inter = 16, 256, 128, 512
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    copies = arch.num_layers * sum(rounded(r * i * 2) + rounded(o * r * 2) for i, o in shapes)
    assert peft.memory.peak_allocated_bytes - fused.memory.peak_allocated_bytes == copies
    assert fused.compute.flops_forward == peft.compute.flops_forward  # the same products
    line = [a for a in fused.assumptions if "Unsloth LoRA kernels" in a]
    assert line and "LoRA_QKV, LoRA_W (o), LoRA_MLP" in line[0]
    assert not any("not modelled: the peft ops are" in a for a in fused.assumptions)
    # QLoRA: the same copies, less the persistent NF4 decode scratch (the largest weight, bf16)
    monkeypatch.undo()
    q_fused = estimate(arch, "qlora", t, gpu)
    monkeypatch.setattr(unsloth_lora, "_take", lambda *a: None)
    q_peft = estimate(arch, "qlora", t, gpu)
    assert q_peft.memory.peak_allocated_bytes - q_fused.memory.peak_allocated_bytes == copies - rounded(h * inter * 2)


def test_other_trainers_do_not_run_the_unsloth_functions():
    arch, gpu = from_hf_config(TINY, "tiny"), load_gpu("a100-80g")
    for trainer in ("hf", "trl"):
        est = estimate(arch, "lora", Training(micro_batch=2, seq_len=256, trainer=trainer), gpu,
                       {"targets": "all-linear"})
        assert not any("Unsloth LoRA kernels" in a for a in est.assumptions)
    dora = estimate(arch, "dora", Training(micro_batch=2, seq_len=256, trainer="unsloth"), gpu)
    assert any("none apply; peft's LoRA ops on qkv, o, mlp: DoRA" in a for a in dora.assumptions)


def test_without_checkpointing_the_saved_activations_drop_by_the_modelled_amount(monkeypatch):
    # all layers' saved tensors are alive at the forward peak (the fused CE). Per layer, peft's ops save for each of
    # the 7 adapters a bf16 copy of its input (lora/layer.py casts x to the fp32 adapter dtype, autocast back) and its
    # T x r product, plus the bf16 autocast copies of A and B (cached, saved by the mm nodes); the Functions save
    # the input once per group: QKV its input X (the RMSNorm saves its own input, not X), LoRA_W the attention
    # output (SDPA saves it already: no new bytes), LoRA_MLP X, e, g (e, g = the gate / up outputs the SwiGLU kernel
    # saves on the peft path too). Layer 0's q / k / v inputs need no grad: their lora_A copies are not saved.
    arch, gpu = from_hf_config(TINY, "tiny"), load_gpu("a100-80g")
    t = Training(micro_batch=2, seq_len=1024, trainer="unsloth", grad_ckpt=False)
    fused = estimate(arch, "lora", t, gpu)
    monkeypatch.setattr(unsloth_lora, "_take", lambda *a: None)
    peft = estimate(arch, "lora", t, gpu)
    T, r, h, kv, inter = 2 * 1024, 16, 256, 128, 512

    def c(n):
        return rounded(n * 2)

    per_layer = 4 * c(T * h) + c(T * inter) + 7 * c(T * r)  # qkv 3 copies - X, o 1 copy, mlp 2 + 1 copies - X
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    weights = arch.num_layers * sum(c(r * i) + c(o * r) for i, o in shapes) - 3 * c(r * h)
    saved = peft.memory.components["saved_activations"] - fused.memory.components["saved_activations"]
    assert saved == arch.num_layers * per_layer + weights
    assert fused.memory.peak_allocated_bytes < peft.memory.peak_allocated_bytes
