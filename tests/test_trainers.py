"""Trainers (peftplan/trainers/): the registry, `hf` keeping the bare step's numbers, TRL's fused LM head in the
engine against TRL's real code path traced under fake tensors, the CLI's --trainer and the gate on the committed
TRL records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftplan.catalog import load_gpu, load_model
from peftplan.cli import app
from peftplan.estimate import estimate
from peftplan.trainers import CLI_DEFAULT_TRAINER, TrainerError, get_trainer, trainer_names
from peftplan.training import Training, TrainingError

GIB = 2**30
CPU = Path(__file__).resolve().parent.parent / "profiles" / "cpu"
runner = CliRunner()


def test_registry():
    assert {"hf", "trl"} <= set(trainer_names())
    assert CLI_DEFAULT_TRAINER == "trl" and Training().trainer == "hf"
    assert get_trainer("trl").version.startswith("1.16")
    with pytest.raises(TrainerError, match="unknown trainer 'axolotl2'"):
        get_trainer("axolotl2")
    with pytest.raises(TrainingError, match="--packing does not apply to trainer 'hf'"):
        Training(trainer="hf", trainer_options=("packing",))
    assert Training(trainer="trl", trainer_options=["packing"]).trainer_options == ("packing",)


def test_trl_fused_head_drops_the_logits_and_hf_keeps_them():
    """The issue's case: llama3-8b QLoRA on a T4, batch 1 x 2048."""
    arch, t4 = load_model("llama3-8b"), load_gpu("t4")
    common = dict(micro_batch=1, seq_len=2048, precision="fp16-mixed")
    hf = estimate(arch, "qlora", Training(**common), t4)
    assert hf.memory.components["loss_logits"] > 2.9 * GIB  # two fp32 logits-sized tensors at 128k x 2048
    trl = estimate(arch, "qlora", Training(**common, trainer="trl", grad_ckpt=True), t4)
    assert trl.memory.components.get("loss_logits", 0) < 0.5 * GIB
    assert trl.memory.peak_allocated_bytes < hf.memory.peak_allocated_bytes
    # SFTTrainer casts a quantized base's adapters to bf16 and does not run kbit prep
    assert trl.options["kbit_prep"] is False and hf.options["kbit_prep"] is True
    assert trl.params.trainable == hf.params.trainable
    assert trl.to_dict()["trainer"]["name"] == "trl" and trl.to_dict()["trainer"]["version"] == "1.16.0"
    assert any("fused LM head" in a for a in trl.assumptions)


def test_hf_trainer_is_the_bare_step():
    arch, gpu = load_model("llama3.2-1b"), load_gpu("a100-80g")
    for method in ("lora", "qlora", "full"):
        a = estimate(arch, method, Training(micro_batch=2, seq_len=256), gpu)
        b = estimate(arch, method, Training(micro_batch=2, seq_len=256, trainer="hf"), gpu)
        assert a.memory == b.memory and a.compute == b.compute


def test_cli_default_trainer_defaults_and_bad_input():
    base = ["estimate", "--model", "llama3.2-1b", "--method", "lora", "--batch", "1", "--seq", "512", "--json"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["trainer"]["name"] == "trl" and out["training"]["grad_ckpt"] is True  # SFTConfig default
    r = runner.invoke(app, base + ["--no-grad-ckpt"])
    assert json.loads(r.stdout)["training"]["grad_ckpt"] is False  # what the user sets wins
    r = runner.invoke(app, base + ["--trainer", "hf"])
    hf = json.loads(r.stdout)
    api = estimate(load_model("llama3.2-1b"), "lora", Training(micro_batch=1, seq_len=512), load_gpu("a100-80g"))
    assert hf["trainer"]["name"] == "hf" and hf["memory"]["peak_allocated_bytes"] == api.memory.peak_allocated_bytes
    for args, needle in ((["--trainer", "nope"], "unknown trainer 'nope'"),
                         (["--trainer", "hf", "--packing"], "--packing does not apply to trainer 'hf'")):
        r = runner.invoke(app, base + args)
        assert r.exit_code == 2 and needle in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = runner.invoke(app, ["estimate", "--model", "llama3.2-1b", "--trainer", "trl"])
    assert r.exit_code == 0 and "trainer: trl" in r.stdout and "1.16.0" in r.stdout
    r = runner.invoke(app, ["trainers"])
    assert r.exit_code == 0 and "trl" in r.stdout and "hf" in r.stdout


def test_sftconfig_file_selects_the_trl_trainer(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: meta-llama/Meta-Llama-3-8B\nuse_peft: true\nload_in_4bit: true\n"
                    "per_device_train_batch_size: 1\nmax_length: 2048\npacking: true\n")
    r = runner.invoke(app, ["estimate", "--config", str(path), "--gpu", "t4", "--precision", "fp16-mixed", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["run_config"]["format"] == "trl-sftconfig"
    assert out["trainer"] == {"name": "trl", "library": "trl", "version": "1.16.0", "options": ["packing"]}
    assert out["memory"]["components"].get("loss_logits", 0) < 0.5 * GIB
    r = runner.invoke(app, ["estimate", "--config", str(path), "--trainer", "hf"])
    assert r.exit_code == 2 and "--packing does not apply to trainer 'hf'" in r.stderr


# ---- the gate on the committed TRL records (no torch needed) ---------------------------------------------------

def _trl_records():
    return sorted(CPU.glob("*_trl.json"))


def test_committed_trl_records_pass_and_a_bare_loss_is_caught(monkeypatch):
    from peftplan.check import check_paths
    import peftplan.engine.losses as losses

    paths = _trl_records()
    assert len(paths) >= 20, "profiles/cpu has no TRL records: run `peftplan trace --matrix ci`"
    res = check_paths(paths)
    assert res.ok, [(f.path, f.violations) for f in res.violations]
    assert sum(f.status == "ok" for f in res.findings) >= 0.75 * len(res.findings)
    # the engine without TRL's fused head (the bare step's fp32 logits) must fail the TRL records
    monkeypatch.setitem(losses.LOSSES, "trl_chunked_logprob", lambda ctx, arch, h, head, b, s, vt:
                        losses.loss_forward(ctx, arch, h, head, arch.vocab_size, b * s))
    bad = check_paths(paths)
    assert not bad.ok and len(bad.violations) >= 10


# ---- engine vs the real TRL step, traced (needs torch, transformers, peft, trl) --------------------------------

@pytest.mark.parametrize("method", ["lora", "qlora", "full", "prompt"])
def test_engine_matches_the_traced_trl_step(method, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from peftplan.arch import from_hf_config
    from peftplan.harness.matrix import TINY_LLAMA
    from peftplan.harness.trace import trace
    import trl.kernels.chunked_logprob as ck

    calls = []
    original = ck.ChunkedLogProbFunction.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ck.ChunkedLogProbFunction, "forward", staticmethod(counted))
    arch = from_hf_config(TINY_LLAMA, "tiny-llama")
    training = Training(micro_batch=2, seq_len=64, grad_ckpt=True, trainer="trl")
    res = trace(arch, method, None, training, flops=False)
    assert calls, "the tracer did not run TRL's ChunkedLogProbFunction"
    est = estimate(arch, method, training, load_gpu("h200"))
    err = (est.memory.peak_allocated_bytes - res.peak_allocated_bytes) / res.peak_allocated_bytes
    assert abs(err) < 0.01, (method, err, est.memory.components, res.components)
    assert (res.params_total, res.params_trainable) == (est.params.total, est.params.trainable)


# ---- Liger (modelled from source) and the axolotl file of the issue --------------------------------------------

def test_liger_chunking_from_source():
    from peftplan.engine.liger import liger_chunk_rows

    # ops/fused_linear_cross_entropy.py 62-63: BT = 4096*4, V = 32000, H = 4096 -> inc_factor 8, chunk 2048
    assert liger_chunk_rows(4096 * 4, 4096, 32000) == 2048
    assert liger_chunk_rows(2048, 4096, 128256) == 64  # llama3-8b, one sequence of 2048


AXOLOTL_LIGER = """base_model: meta-llama/Meta-Llama-3-8B
adapter: qlora
load_in_4bit: true
lora_target_linear: true
plugins:
  - axolotl.integrations.liger.LigerPlugin
liger_rope: true
liger_rms_norm: true
liger_glu_activation: true
liger_fused_linear_cross_entropy: true
sample_packing: true
flash_attention: true
micro_batch_size: 2
sequence_len: 4096
"""


def test_axolotl_liger_file_reads_every_liger_key_and_drops_the_logits(tmp_path):
    path = tmp_path / "liger.yml"
    path.write_text(AXOLOTL_LIGER)
    r = runner.invoke(app, ["estimate", "--config", str(path), "--gpu", "a100-80g", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ignored = [i.split(":", 1)[0] for i in out["run_config"]["ignored"]]
    assert not [k for k in ignored if k.startswith("liger") or k in ("plugins", "sample_packing")], ignored
    assert out["trainer"]["name"] == "hf"
    assert out["trainer"]["options"] == ["liger_flce", "liger_rope", "liger_rms_norm", "liger_glu"]
    assert out["memory"]["components"].get("loss_logits", 0) < 1 * GIB
    assert any("modelled from source" in a for a in out["assumptions"])
    bare = runner.invoke(app, ["estimate", "--config", str(path), "--gpu", "a100-80g", "--json", "--trainer", "hf"])
    assert "liger_flce" in json.loads(bare.stdout)["trainer"]["options"]  # the file's switches stay on under hf
    plain = estimate(load_model("llama3-8b"), "qlora",
                     Training(micro_batch=2, seq_len=4096, attention="flash", grad_ckpt=True, trainer="hf"),
                     load_gpu("a100-80g"), {"targets": "all-linear", "kbit_prep": False})
    assert plain.memory.components["loss_logits"] > 10 * GIB  # the 11.74 GiB without Liger
    r = runner.invoke(app, ["estimate", "--model", "llama3-8b", "--trainer", "trl", "--chunked-ce"])
    assert r.exit_code == 2 and "--chunked-ce does not apply to trainer 'trl'" in r.stderr


# ---- LLaMA-Factory (modelled from source) ----------------------------------------------------------------------

LLAMAFACTORY_QLORA = """### model
model_name_or_path: meta-llama/Meta-Llama-3-8B
quantization_bit: 4
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
bf16: true
"""


def test_llamafactory_yaml(tmp_path):
    """LLaMA-Factory's examples/extras/fsdp_qlora/llama3_lora_sft.yaml (model id without -Instruct)."""
    path = tmp_path / "lf.yaml"
    path.write_text(LLAMAFACTORY_QLORA)
    r = runner.invoke(app, ["estimate", "--config", str(path), "--gpu", "rtx4090", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["run_config"]["format"] == "llamafactory" and out["trainer"]["name"] == "llamafactory"
    assert out["method"] == "qlora" and out["options"]["targets"] == "all-linear"
    assert out["options"]["kbit_prep"] is False  # LLaMA-Factory never calls prepare_model_for_kbit_training
    assert out["training"]["grad_ckpt"] is True and out["training"]["seq_len"] == 2048
    ignored = dict(i.split(": ", 1) for i in out["run_config"]["ignored"])
    assert ignored["dataset"] == "data, not memory" and ignored["template"] == "data, not memory"
    assert any("modelled from its source" in a for a in out["assumptions"])
    path.write_text(LLAMAFACTORY_QLORA + "enable_liger_kernel: true\n")
    liger = json.loads(runner.invoke(app, ["estimate", "--config", str(path), "--gpu", "rtx4090", "--json"]).stdout)
    assert liger["trainer"]["options"] == ["liger"]
    assert liger["memory"]["components"].get("loss_logits", 0) < out["memory"]["components"]["loss_logits"] / 10


def test_axolotl_fsdp_and_deepspeed_keys(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z3.json").write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}')
    ds = tmp_path / "ds.yml"
    ds.write_text("base_model: meta-llama/Meta-Llama-3-8B\nadapter: lora\ndeepspeed: ds/z3.json\n")
    out = json.loads(runner.invoke(app, ["estimate", "--config", str(ds), "--gpus", "2", "--json"]).stdout)
    assert (out["parallel"]["shard"], out["parallel"]["offload"]) == ("zero3", "optimizer")
    fs = tmp_path / "fsdp.yml"
    fs.write_text("base_model: meta-llama/Meta-Llama-3-8B\nadapter: lora\nfsdp: [full_shard, auto_wrap]\n"
                  "fsdp_config:\n  fsdp_offload_params: true\n")
    out = json.loads(runner.invoke(app, ["estimate", "--config", str(fs), "--gpus", "4", "--json"]).stdout)
    assert (out["parallel"]["shard"], out["parallel"]["offload"]) == ("fsdp-full", "optimizer+params")
    one = json.loads(runner.invoke(app, ["estimate", "--config", str(fs), "--json"]).stdout)
    assert one["parallel"]["n_gpus"] == 1 and one["parallel"]["shard"] == "none"
    assert any("pass --gpus N" in n for n in one["run_config"]["notes"])
    both = tmp_path / "both.yml"
    both.write_text("base_model: meta-llama/Meta-Llama-3-8B\nadapter: lora\nfsdp: [full_shard]\ndeepspeed: ds/z3.json\n")
    r = runner.invoke(app, ["estimate", "--config", str(both)])
    assert r.exit_code == 2 and "both set" in r.stderr


def test_compare_takes_the_trainer():
    r = runner.invoke(app, ["compare", "--model", "llama3-8b", "--methods", "qlora", "--gpus", "t4", "--batch", "1",
                            "--seq", "2048", "--json"])
    assert r.exit_code == 0, r.output
    trl = json.loads(r.stdout)
    r = runner.invoke(app, ["compare", "--model", "llama3-8b", "--methods", "qlora", "--gpus", "t4", "--batch", "1",
                            "--seq", "2048", "--json", "--trainer", "hf"])
    hf = json.loads(r.stdout)
    assert trl["title"].endswith("trainer trl") and "trainer" not in hf["title"]
    assert trl["rows"][0]["device_total_bytes"] < hf["rows"][0]["device_total_bytes"]
    r = runner.invoke(app, ["compare", "--model", "llama3-8b", "--methods", "lora", "--trainer", "nope"])
    assert r.exit_code == 2 and "unknown trainer" in r.stderr
