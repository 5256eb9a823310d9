"""Run configs (axolotl YAML, peft adapter_config.json, TrainingArguments JSON) and hub config fetching."""

import json

import pytest

from peftplan.catalog import load_gpu, load_model
from peftplan.estimate import estimate
from peftplan.hub import HubError, fetch_config
from peftplan.runconfig import RunConfig, RunConfigError, load_run_config
from peftplan.training import Training

# axolotl examples/llama-2/qlora.yml as quoted in seed 003 (its numbered lines 1-22 and 24-29; line 23 is blank).
SEED_AXOLOTL_QLORA = """\
base_model: NousResearch/Llama-2-7b-hf
model_type: LlamaForCausalLM
tokenizer_type: LlamaTokenizer
is_llama_derived_model: true

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:
"""

# The seed's mt0-large LoRA config dict (peft docs), as `save_pretrained` writes it with the base model.
SEED_MT0_LORA = {
    "peft_type": "LORA",
    "task_type": "SEQ_2_SEQ_LM",
    "inference_mode": False,
    "r": 8,
    "target_modules": ["q", "v"],
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "fan_in_fan_out": False,
    "enable_lora": None,
    "bias": "none",
    "base_model_name_or_path": "bigscience/mt0-large",
}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text), encoding="utf-8")
    return str(path)


def keys(items):
    return {i.split(":", 1)[0] for i in items}


def accounted(run: RunConfig, data: dict) -> None:
    """Every top-level key is either read (mapped) or ignored, never both, never neither."""
    read, ignored = keys(run.read), keys(run.ignored)
    assert not (read & ignored), read & ignored
    assert set(data) <= read | ignored, set(data) - (read | ignored)


# --------------------------------------------------------------------------------------------- axolotl

def test_seed_axolotl_qlora(tmp_path):
    import yaml

    run = load_run_config(write(tmp_path, "qlora.yml", SEED_AXOLOTL_QLORA))
    assert run.source_format == "axolotl"
    assert run.model == "llama2-7b" and run.model_id == "NousResearch/Llama-2-7b-hf"
    assert run.method == "qlora"
    assert run.options["rank"] == 32 and run.options["alpha"] == 16 and run.options["dropout"] == 0.05
    assert run.options["targets"] == "all-linear"
    assert run.options["quant"] == "nf4" and run.options["double_quant"] is True  # axolotl's BitsAndBytesConfig
    assert run.training["seq_len"] == 4096
    assert run.training["micro_batch"] == 1  # axolotl default micro_batch_size
    assert run.training["grad_ckpt"] is False
    ignored = run.ignored_keys()
    for key in ("datasets", "output_dir", "val_set_size", "tokenizer_type", "lora_fan_in_fan_out", "lora_model_dir"):
        assert key in ignored, key
    # packing keeps the per-step shapes peftplan models: read, not ignored
    assert any(i.startswith("sample_packing: true: packing fills each sequence") for i in run.read)
    assert "pad_to_sequence_len" in keys(run.read)
    accounted(run, yaml.safe_load(SEED_AXOLOTL_QLORA))
    text = "\n".join(run.describe())
    assert "llama2-7b" in text and "sample_packing" in text and "ignored" in text

    est = estimate(load_model(run.model), run.method, Training(**run.training), load_gpu("a100-80g"), run.options)
    assert 0 < est.memory.peak_allocated_bytes < load_gpu("a100-80g").memory_bytes
    assert est.params.trainable > 0


AXOLOTL_FULLER = """\
base_model: meta-llama/Llama-3.2-1B
adapter: lora
lora_r: 16
lora_alpha: 32
lora_dropout: 0.0
lora_target_modules:
  - q_proj
  - v_proj
peft_use_dora: true
micro_batch_size: 4
gradient_accumulation_steps: 8
sequence_len: 2048
optimizer: paged_adamw_32bit
learning_rate: 0.0002
bf16: true
fp16: false
tf32: true
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
flash_attention: true
wandb_project: demo
deepspeed: deepspeed_configs/zero2.json
"""


def test_axolotl_training_keys(tmp_path):
    import yaml

    run = load_run_config(write(tmp_path, "run.yaml", AXOLOTL_FULLER))
    assert run.model == "llama3.2-1b" and run.method == "dora"
    assert run.options == {"rank": 16, "alpha": 32, "dropout": 0.0, "targets": "q_proj,v_proj"}
    assert run.training == {
        "micro_batch": 4, "seq_len": 2048, "grad_accum": 8, "grad_ckpt": True, "attention": "flash",
        "precision": "bf16-mixed", "optimizer": "paged-adamw", "trainer": "hf", "shard": "zero2",
    }
    ign = dict(i.split(": ", 1) for i in run.ignored)
    # the ZeRO stage from the DeepSpeed file's name (the file is not there); the GPU count comes from --gpus
    assert any(line.startswith("deepspeed: deepspeed_configs/zero2.json -> shard=zero2") for line in run.read)
    assert "learning_rate" in ign and "wandb_project" in ign and "tf32" in ign
    accounted(run, yaml.safe_load(AXOLOTL_FULLER))
    one_gpu = {k: v for k, v in run.training.items() if k != "shard"}  # as the CLI does without --gpus
    est = estimate(load_model(run.model), run.method, Training(**one_gpu), load_gpu("a100-80g"), run.options)
    # every DoRA tensor here (r=16 on q/v of a 2048-wide model) has < 1e5 elements: bitsandbytes keeps their
    # states as ordinary device tensors (optim/optimizer.py get_state_buffer), nothing is paged
    assert est.memory.paged_optimizer_bytes == 0 and est.memory.optimizer_state_bytes > 0
    full = estimate(load_model(run.model), "full", Training(**one_gpu), load_gpu("a100-80g"))
    assert full.memory.paged_optimizer_bytes > 0


@pytest.mark.parametrize("name,expected", [
    ("adamw_torch_fused", ("adamw", "fused")), ("adamw_torch", ("adamw", "foreach")),
    ("adamw_bnb_8bit", ("adamw-8bit", None)), ("adamw_8bit", ("adamw-8bit", None)),
    ("paged_adamw_8bit", ("paged-adamw-8bit", None)), ("paged_adamw_32bit", ("paged-adamw", None)),
    ("adafactor", ("adafactor", None)), ("sgd", ("sgd", None)), ("lion_32bit", ("lion", None)),
])
def test_optimizer_names(tmp_path, name, expected):
    run = load_run_config(write(tmp_path, "o.yml", f"base_model: gpt2\noptimizer: {name}\n"))
    assert run.training["optimizer"] == expected[0]
    if expected[1]:
        assert run.training["optimizer_impl"] == expected[1]


def test_unknown_optimizer_is_listed_not_dropped(tmp_path):
    run = load_run_config(write(tmp_path, "o.yml", "base_model: gpt2\noptimizer: ademamix_8bit\n"))
    assert "optimizer" not in run.training or run.training["optimizer"] == "adamw"
    assert any(i.startswith("optimizer: optimizer 'ademamix_8bit' is not modelled") for i in run.ignored)


def test_axolotl_lisa_and_full(tmp_path):
    lisa = load_run_config(write(tmp_path, "lisa.yml", "base_model: NousResearch/Llama-2-7b-hf\nadapter:\n"
                                 "lora_r:\nlisa_n_layers: 4\nlisa_step_interval: 20\nbf16: true\n"))
    assert lisa.method == "lisa" and lisa.options == {"lisa_layers": 4}
    assert lisa.training["precision"] == "bf16"  # loaded in bf16: no fp32 master weights
    assert "lora_r" in lisa.ignored_keys() and "lisa_step_interval" in lisa.ignored_keys()
    full = load_run_config(write(tmp_path, "full.yml", "base_model: gpt2\nfp16: true\nbf16: false\n"))
    assert full.method == "full" and full.training["precision"] == "fp16"


def test_axolotl_8bit_lora_and_bnb_overrides(tmp_path):
    run8 = load_run_config(write(tmp_path, "a.yml", "base_model: gpt2\nadapter: lora\nload_in_8bit: true\n"))
    assert run8.method == "qlora" and run8.options["quant"] == "int8"
    run4 = load_run_config(write(tmp_path, "b.yml", "base_model: gpt2\nadapter: qlora\nload_in_4bit: true\n"
                                 "bnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"
                                 "  bnb_4bit_use_double_quant: false\n"))
    assert run4.options["quant"] == "fp4" and run4.options["double_quant"] is False


def test_axolotl_unknown_model_keeps_hub_id(tmp_path):
    run = load_run_config(write(tmp_path, "x.yml", "base_model: someone/some-model-7b\nadapter: lora\n"))
    assert run.model == "someone/some-model-7b" and run.method == "lora"


# --------------------------------------------------------------------------------------------- peft

def test_seed_mt0_adapter_config(tmp_path):
    path = write(tmp_path, "adapter_config.json", SEED_MT0_LORA)
    run = load_run_config(path)
    assert run.source_format == "peft"
    assert run.model == "mt0-large" and run.method == "lora"
    assert run.options == {"rank": 8, "alpha": 32, "dropout": 0.1, "targets": "q,v"}
    assert run.training == {}
    ign = dict(i.split(": ", 1) for i in run.ignored)
    for key in ("task_type", "inference_mode", "fan_in_fan_out", "enable_lora"):
        assert key in ign, key
    assert "bias" in keys(run.read)  # "none" is what peftplan models
    accounted(run, SEED_MT0_LORA)
    # the directory holding it works too, and the estimate reproduces the seed's trainable-parameter count
    assert load_run_config(str(tmp_path)).options == run.options
    est = estimate(load_model(run.model), run.method, Training(seq_len=128, micro_batch=1),
                   load_gpu("a100-80g"), run.options)
    assert est.params.trainable == 2359296


def test_peft_variants(tmp_path):
    dora = load_run_config(write(tmp_path, "d.json", {"peft_type": "LORA", "r": 4, "use_dora": True,
                                                      "target_modules": "all-linear", "bias": "all",
                                                      "base_model_name_or_path": "gpt2"}))
    assert dora.method == "dora" and dora.options["targets"] == "all-linear" and dora.model == "gpt2"
    assert any(i.startswith("bias:") and "not modelled" in i for i in dora.ignored)
    prompt = load_run_config(write(tmp_path, "p.json", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 10,
                                                        "token_dim": 768, "prompt_tuning_init": "RANDOM"}))
    assert prompt.method == "prompt" and prompt.options == {"virtual_tokens": 10} and prompt.model is None
    ia3 = load_run_config(write(tmp_path, "i.json", {"peft_type": "IA3", "target_modules": ["k", "v", "wo"],
                                                     "feedforward_modules": ["wo"]}))
    assert ia3.method == "ia3" and ia3.options == {"targets": "k,v,wo"}
    assert "feedforward_modules" in ia3.ignored_keys()
    regex = load_run_config(write(tmp_path, "r.json", {"peft_type": "LORA", "target_modules": r".*\.q_proj"}))
    assert "targets" not in regex.options and "target_modules" in regex.ignored_keys()
    other = load_run_config(write(tmp_path, "o.json", {"peft_type": "LOHA", "r": 8}))
    assert other.method is None and "peft_type" in other.ignored_keys() and "r" in other.ignored_keys()


# --------------------------------------------------------------------------------------------- TrainingArguments

TRAINING_ARGS = {
    "output_dir": "out", "overwrite_output_dir": False, "do_train": True, "eval_strategy": "no",
    "per_device_train_batch_size": 2, "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 16,
    "learning_rate": 2e-4, "weight_decay": 0.0, "num_train_epochs": 3.0, "max_steps": -1,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "logging_steps": 10, "save_strategy": "epoch",
    "seed": 42, "bf16": True, "fp16": False, "tf32": None, "dataloader_num_workers": 0,
    "report_to": ["tensorboard"], "optim": "paged_adamw_8bit", "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False}, "max_length": 2048, "packing": False,
    "dataset_text_field": "text", "push_to_hub": False, "ddp_find_unused_parameters": None,
}


def test_training_arguments_json(tmp_path):
    run = load_run_config(write(tmp_path, "training_args.json", TRAINING_ARGS))
    # max_length / packing / dataset_text_field are SFTConfig's: a TRL file, run by the trl trainer
    assert run.source_format == "trl-sftconfig"
    assert run.model is None and run.method is None  # plain TrainingArguments say nothing about the method
    assert run.training == {"trainer": "trl", "micro_batch": 2, "grad_accum": 16, "seq_len": 2048,
                            "grad_ckpt": True, "precision": "bf16-mixed", "optimizer": "paged-adamw-8bit"}
    assert "learning_rate" in run.ignored_keys() and "packing" in keys(run.read)
    accounted(run, TRAINING_ARGS)
    Training(**run.training)


def test_transformers5_activation_checkpointing_and_sgd_momentum(tmp_path):
    # transformers 5 dumps both names; activation_checkpointing is the real one, gradient_checkpointing its alias
    args = {"per_device_train_batch_size": 1, "activation_checkpointing": True, "gradient_checkpointing": True,
            "activation_checkpointing_kwargs": None, "gradient_checkpointing_kwargs": None, "optim": "sgd",
            "optim_args": "momentum=0.9,nesterov=True", "bf16": False, "fp16": False, "use_cache": False,
            "hub_token": "<HUB_TOKEN>", "torch_empty_cache_steps": 10}
    run = load_run_config(write(tmp_path, "args.json", args))
    assert run.source_format == "training-args"  # no SFTConfig key: the bare transformers Trainer
    assert run.training == {"trainer": "hf", "micro_batch": 1, "grad_ckpt": True, "optimizer": "sgd-momentum",
                            "precision": "fp32"}
    assert "gradient_checkpointing" in run.ignored_keys() and "optim_args" in keys(run.read)
    assert not any("<HUB_TOKEN>" in line for line in run.describe())
    accounted(run, args)
    plain = load_run_config(write(tmp_path, "sgd.json", {"per_device_train_batch_size": 1, "optim": "sgd"}))
    assert plain.training["optimizer"] == "sgd"


def test_trl_recipe_with_model_config(tmp_path):
    recipe = ("model_name_or_path: mistralai/Mistral-7B-v0.1\ntorch_dtype: bfloat16\n"
              "attn_implementation: flash_attention_2\nuse_peft: true\nload_in_4bit: true\n"
              "lora_target_modules: all-linear\nper_device_train_batch_size: 4\nmax_seq_length: 1024\n"
              "bf16: true\ngradient_checkpointing: true\nlearning_rate: 2.0e-4\n")
    run = load_run_config(write(tmp_path, "config_qlora.yaml", recipe))
    assert run.source_format == "trl-sftconfig" and run.training["trainer"] == "trl"
    assert run.model == "mistral-7b" and run.method == "qlora"
    assert run.options == {"quant": "nf4", "double_quant": False, "rank": 16, "alpha": 32, "dropout": 0.05,
                           "targets": "all-linear"}  # TRL ModelConfig defaults for the absent lora_* keys
    assert run.training["attention"] == "flash" and run.training["seq_len"] == 1024
    assert run.training["precision"] == "bf16-mixed"
    import yaml
    accounted(run, yaml.safe_load(recipe))
    est = estimate(load_model(run.model), run.method, Training(**run.training), load_gpu("a100-80g"), run.options)
    assert est.memory.peak_allocated_bytes > 0


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,text,needle", [
    ("bad.yml", "base_model: gpt2\n  adapter: [lora\n", "not valid YAML"),
    ("bad.json", '{"peft_type": "LORA", "r": 8,,}', "not valid JSON"),
    ("list.yaml", "- a\n- b\n", "expected a mapping"),
    ("empty.yml", "", "empty"),
    ("other.json", '{"hello": 1, "world": 2}', "not a recognised run config"),
    ("badrank.yml", "base_model: gpt2\nadapter: lora\nlora_r: eight\n", "lora_r"),
    ("badbatch.json", '{"per_device_train_batch_size": 0}', "per_device_train_batch_size"),
])
def test_errors_name_the_file(tmp_path, name, text, needle):
    path = write(tmp_path, name, text)
    with pytest.raises(RunConfigError) as info:
        load_run_config(path)
    message = str(info.value)
    assert name in message and needle in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(RunConfigError, match="no such file"):
        load_run_config(str(tmp_path / "nope.yml"))


# --------------------------------------------------------------------------------------------- hub

def fake_cache(root, repo_id, config, sha="0123456789abcdef0123456789abcdef01234567"):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha, encoding="utf-8")
    return repo


def test_fetch_config_from_offline_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2}
    fake_cache(cache, "acme/tiny-llama", config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert fetch_config("acme/tiny-llama") == config
    with pytest.raises(HubError) as info:
        fetch_config("acme/not-cached")
    message = str(info.value)
    assert "acme/not-cached" in message and str(cache) in message and "config.json" in message
    assert "\n" not in message


def test_fetch_config_honours_hf_home(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    home = tmp_path / "hf"
    config = {"model_type": "gpt2"}
    fake_cache(home / "hub", "org/m", config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert fetch_config("org/m") == config


def test_fetch_config_rejects_non_ids():
    with pytest.raises(HubError, match="not a hub repo id"):
        fetch_config("../etc/passwd")
