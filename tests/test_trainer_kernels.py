"""Liger / Unsloth layer kernels, TRL activation offloading, Unsloth's trainer and axolotl's chunked CE: each modelled
kernel's saved bytes against a hand computation from the cited source, offload estimates below the plain ones by the
modelled amount, refusals, and the run-config keys mapped (engine/liger.py, engine/offload.py, engine/unsloth.py,
engine/chunked_ce.py, trainers/unsloth.py)."""

import json

from typer.testing import CliRunner

from peftplan.arch import from_hf_config
from peftplan.catalog import load_gpu
from peftplan.cli import app
from peftplan.dtypes import BF16, FP32
from peftplan.engine.autograd import Param, Tape
from peftplan.engine.ops import Ctx
from peftplan.engine.program import _rmsnorm, _rope
from peftplan.engine.liger import glu
from peftplan.engine.sim import Allocator, rounded
from peftplan.estimate import estimate
from peftplan.training import Training

runner = CliRunner()
N, H, I = 256, 128, 512
TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 512, "num_hidden_layers": 3}


def _ctx(kernels=frozenset()):
    alloc = Allocator()
    return Ctx(Tape(alloc), N, None, kernels=frozenset(kernels)), alloc


def _saved_bytes(tape):
    return sum(t.nbytes for n in tape.nodes for t in n.saved)


def test_liger_rms_norm_saves_input_and_fp32_rstd_only():
    # liger ops/rms_norm.py 657: save_for_backward(X, W, RSTD); RSTD fp32 per row (452-453); W is a parameter
    ctx, _ = _ctx({"rms_norm"})
    h = ctx.tape.new(N * H, BF16, True, "h")
    w = Param(H, BF16, True)
    w.tensor = ctx.tape.alloc.new(H, BF16, "trainable_params")
    _rmsnorm(ctx, h, w)
    assert _saved_bytes(ctx.tape) == rounded(N * H * 2) + rounded(N * 4)
    hf, _ = _ctx()
    h2 = hf.tape.new(N * H, BF16, True, "h")
    _rmsnorm(hf, h2, w)  # LlamaRMSNorm: saves an fp32 copy of the input (and more)
    assert _saved_bytes(hf.tape) >= rounded(N * H * 4) + rounded(N * 4)


def test_liger_swiglu_saves_gate_and_up_and_writes_their_gradients_in_place():
    # liger ops/swiglu.py 262: save_for_backward(a, b); 191-227: da, db stored into a's and b's storage
    ctx, alloc = _ctx({"glu"})
    gate = ctx.tape.new(N * I, BF16, True, "gate")
    up = ctx.tape.new(N * I, BF16, True, "up")
    out = glu(ctx, gate, up)
    ctx.tape.drop(gate, up)
    assert _saved_bytes(ctx.tape) == 2 * rounded(N * I * 2)
    node = ctx.tape.nodes[-1]
    assert node.name == "liger_glu" and node.saved == [gate, up] and out.numel == N * I
    before = alloc.total
    ctx.tape._grad_for(gate, node.saved[0])  # what Tape.backward does for this node (autograd._GRAD_INTO_SAVED)
    assert alloc.total == before and ctx.tape.grads[id(gate)] is gate  # aliased, not allocated


def test_liger_rope_allocates_nothing():
    # liger ops/rope.py 115-158: rotates q / k in place, saves cos / sin only (226)
    ctx, alloc = _ctx({"rope"})
    q = ctx.tape.new(N * H, BF16, True, "q")
    cos = ctx.tape.new(H, BF16, False, "cos")
    total = alloc.total
    out = _rope(ctx, q, cos)
    assert out is q and alloc.total == total and not ctx.tape.nodes
    hf, halloc = _ctx()
    q2 = hf.tape.new(N * H, BF16, True, "q")
    _rope(hf, q2, cos)
    assert halloc.peak.bytes > halloc.total - rounded(N * H * 2) + rounded(N * H * 2)  # the HF op's temporaries


def _tiny():
    return from_hf_config(TINY, "tiny")


def test_liger_option_lowers_the_estimate_and_is_labelled():
    arch, gpu = _tiny(), load_gpu("a100-80g")
    plain = estimate(arch, "lora", Training(micro_batch=2, seq_len=256, trainer="trl"), gpu)
    liger = estimate(arch, "lora", Training(micro_batch=2, seq_len=256, trainer="trl", trainer_options=("liger",)),
                     gpu)
    assert liger.memory.peak_allocated_bytes < plain.memory.peak_allocated_bytes
    assert any("layer kernels modelled from source" in a for a in liger.assumptions)


def test_trl_activation_offloading_moves_the_layer_inputs_to_host():
    # with checkpointing, the offloaded tensors are the layer inputs (B*T*H bf16 each, one per layer)
    arch, gpu = _tiny(), load_gpu("a100-80g")
    B, T = 2, 256
    base = Training(micro_batch=B, seq_len=T, trainer="trl", precision="bf16", grad_ckpt=True)
    plain = estimate(arch, "lora", base, gpu)
    off = estimate(arch, "lora", base.with_(trainer_options=("activation_offloading",)), gpu)
    layer_input = B * T * arch.hidden_size * 2
    # the layer inputs, plus what the final norm (outside the checkpointed layers) saves
    assert off.parallel["host_bytes"] >= arch.num_layers * layer_input
    drop = plain.memory.peak_allocated_bytes - off.memory.peak_allocated_bytes
    assert 0 < drop <= off.parallel["host_bytes"]
    assert off.compute.time_breakdown["offload over PCIe"] > 0
    assert any("activation_offloading" in a for a in off.assumptions)


def test_unsloth_offload_host_slots_and_device_drop():
    # unsloth_zoo gradient_checkpointing.py: 200 initial pinned slots of 128 Ki bf16 (64-66, 1296), the first pass
    # offloads every layer input > 2 MiB into its slot (grown to the input's size)
    arch, gpu = _tiny(), load_gpu("a100-80g")
    B, T = 8, 1024  # layer input 8*1024*256*2 = 4 MiB > 2 MiB
    t = Training(micro_batch=B, seq_len=T, trainer="unsloth", precision="bf16", grad_ckpt=True)
    est = estimate(arch, "lora", t, gpu)
    layer_input = rounded(B * T * arch.hidden_size * 2)
    slot = rounded(128 * 1024 * 2)
    assert est.parallel["host_bytes"] == arch.num_layers * layer_input + (200 - arch.num_layers) * slot
    small = estimate(arch, "lora", t.with_(seq_len=256), gpu)  # < 512 tokens: standard checkpointing (no host)
    assert small.parallel["host_bytes"] == 0
    assert any("Unsloth" in a for a in est.assumptions)


def test_unsloth_defaults_and_refusals():
    r = runner.invoke(app, ["estimate", "--model", "llama3.2-1b", "--method", "lora", "--trainer", "unsloth",
                            "--batch", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["trainer"]["name"] == "unsloth" and out["training"]["seq_len"] == 2048
    assert out["training"]["grad_ckpt"] is True and out["options"]["rank"] == 16
    assert any("load_in_4bit=True" in a for a in out["assumptions"])
    for args, msg in ((["--trainer", "unsloth", "--liger"], "--liger does not apply to trainer 'unsloth'"),
                      (["--trainer", "unsloth", "--activation-offloading"], "does not apply to trainer 'unsloth'"),
                      (["--trainer", "hf", "--activation-offloading"], "does not apply to trainer 'hf'"),
                      (["--trainer", "nope"], "unknown trainer 'nope'")):
        r = runner.invoke(app, ["estimate", "--model", "llama3.2-1b", *args])
        assert r.exit_code == 2 and msg in r.stderr, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1


def test_chunked_ce_keeps_no_fp32_logits():
    arch, gpu = _tiny(), load_gpu("a100-80g")
    t = Training(micro_batch=2, seq_len=256, trainer="hf")
    plain = estimate(arch, "lora", t, gpu)
    chunked = estimate(arch, "lora", t.with_(trainer_options=("chunked_ce",)), gpu)
    assert chunked.memory.peak_allocated_bytes < plain.memory.peak_allocated_bytes


def test_runconfig_keys_mapped_not_ignored(tmp_path):
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps({"model_name_or_path": "meta-llama/Llama-3.2-1B", "max_length": 512,
                               "per_device_train_batch_size": 1, "activation_offloading": True,
                               "use_liger_kernel": True, "dataset_text_field": "text"}))
    r = runner.invoke(app, ["estimate", "--config", str(sft), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ignored = [i.split(":", 1)[0] for i in out["run_config"]["ignored"]]
    assert "activation_offloading" not in ignored and "use_liger_kernel" not in ignored
    assert set(out["trainer"]["options"]) >= {"activation_offloading", "liger"}
    ax = tmp_path / "ax.yml"
    ax.write_text("base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nsequence_len: 512\nmicro_batch_size: 1\n"
                  "chunked_cross_entropy: true\nchunked_cross_entropy_num_chunks: 16\n")
    r = runner.invoke(app, ["estimate", "--config", str(ax), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ignored = [i.split(":", 1)[0] for i in out["run_config"]["ignored"]]
    assert not [k for k in ignored if k.startswith("chunked_cross_entropy")], ignored
    assert "chunked_ce" in out["trainer"]["options"]
