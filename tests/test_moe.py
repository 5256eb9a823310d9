"""Mixtral and Qwen3-MoE (arch_moe.py, engine/program_moe.py, methods/moe_lora.py) against transformers 5.23 +
peft 0.21: parameter counts (total, active, LoRA on fused experts through peft's MoE config conversion), peft's
own refusals reproduced, and the engine's peak against the fake-tensor trace at real width, reduced depth."""

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peftplan.arch import from_hf_config  # noqa: E402
from peftplan.catalog import load_gpu, load_model  # noqa: E402
from peftplan.estimate import build_tuned, count_params, estimate  # noqa: E402
from peftplan.methods import MethodError  # noqa: E402
from peftplan.training import Training  # noqa: E402

TINY = {
    "mixtral": dict(model_type="mixtral", vocab_size=1000, hidden_size=256, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=512, num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2),
    # layer 1 dense (mlp_only_layers): peft's conversion also takes its gate_proj/up_proj/down_proj away
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=1000, hidden_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, intermediate_size=512, moe_intermediate_size=128,
                      num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                      norm_topk_prob=True),
}


def _hf(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj", "gate_proj,up_proj,down_proj,gate"])
def test_lora_param_counts_follow_peft_moe_conversion(family, targets):
    arch = from_hf_config(TINY[family], family)
    model = _hf(TINY[family])
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    cfg_targets = targets if targets == "all-linear" else targets.split(",")
    if family == "mixtral" and targets.startswith("gate_proj"):
        with pytest.raises(MethodError):  # mixtral's v4 names are w1/w3/w2: gate_proj matches nothing
            tuned, _ = build_tuned(arch, "lora", {"rank": 16, "targets": targets}, Training(micro_batch=1, seq_len=8))
            assert count_params(tuned).trainable == 0
        return
    tuned, _ = build_tuned(arch, "lora", {"rank": 16, "targets": targets}, Training(micro_batch=1, seq_len=8))
    with torch.device("meta"):
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=cfg_targets))
    mine = count_params(tuned)
    assert (mine.trainable, mine.total) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_no_default_targets_estimates_all_linear_and_says_so(family, method):
    """peft 0.21 + transformers 5.23: LoraConfig() without target_modules raises on these models. peftplan
    does not refuse: it estimates all-linear (what practice sets) and says why, in the assumptions."""
    arch = from_hf_config(TINY[family], family)
    with torch.device("meta"), pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(_hf(TINY[family]), peft.LoraConfig(task_type="CAUSAL_LM"))
    training = Training(micro_batch=1, seq_len=8)
    tuned, opts = build_tuned(arch, method, {}, training)
    assert opts.targets == "all-linear"
    assert any("no default" in n and "all-linear" in n for n in tuned.notes)
    explicit, _ = build_tuned(arch, method, {"targets": "all-linear"}, training)
    assert count_params(tuned) == count_params(explicit)
    est = estimate(arch, method, training, load_gpu("h100"))
    assert est.options["targets"] == "all-linear" and any("no default" in a for a in est.assumptions)


def test_a_model_type_with_a_peft_default_keeps_it():
    arch = load_model("llama3.2-1b")
    tuned, opts = build_tuned(arch, "lora", {}, Training(micro_batch=1, seq_len=8))
    assert opts.targets is None and not any("no default" in n for n in tuned.notes)


def test_gpt_oss_is_eager_and_dequantized():
    arch = load_model("gpt-oss-20b")
    assert round(arch.total_params / 1e9, 1) == 20.9
    # OpenAI's 3.6B active excludes the 0.58B input embedding (a lookup); peftplan's active count keeps it
    assert round((arch.active_params - arch.embedding_numel) / 1e9, 2) == 3.61
    e = estimate(arch, "lora", Training(micro_batch=1, seq_len=1024), load_gpu("h100"), {"targets": "all-linear"})
    assert e.training.attention == "eager" and any("eager" in a for a in e.assumptions)
    assert any("MXFP4" in a for a in e.assumptions)


def test_catalog_active_params():
    mixtral, qwen = load_model("mixtral-8x7b"), load_model("qwen3-30b-a3b")
    assert round(mixtral.total_params / 1e9, 1) == 46.7 and round(mixtral.active_params / 1e9, 1) == 12.9
    assert round(qwen.total_params / 1e9, 1) == 30.5 and round(qwen.active_params / 1e9, 2) == 3.35


def test_qlora_leaves_experts_unquantized_and_says_so():
    e = estimate(load_model("qwen3-30b-a3b"), "qlora", Training(micro_batch=1, seq_len=512), load_gpu("rtx4090"),
                 {"targets": "all-linear"})
    text = " ".join(e.assumptions)
    assert "fused experts stay unquantized" in text and "fp32" in text
    # 28.99B expert + router parameters in fp32 after prepare_model_for_kbit_training: > 100 GiB, it cannot fit
    assert e.memory.weights_bytes > 100 * 2**30 and not e.fits


REDUCED = {"mixtral": ("mixtral-8x7b", 1), "qwen3_moe": ("qwen3-30b-a3b", 2), "gpt_oss": ("gpt-oss-20b", 2)}
CASES = [
    ("lora", {"rank": 16, "targets": "all-linear"}, {}),  # ParamWrapper on router and fused experts
    ("lora", {"rank": 16, "targets": "all-linear"}, {"grad_ckpt": True}),
    ("lora", {"targets": "q_proj,v_proj"}, {}),
    ("qlora", {"targets": "all-linear", "kbit_prep": False}, {}),
    ("full", {}, {"precision": "bf16"}),
]


@pytest.mark.parametrize("family", list(REDUCED))
@pytest.mark.parametrize("method,options,extra", CASES)
def test_engine_matches_trace_at_real_width(family, method, options, extra):
    from peftplan.harness.trace import trace

    name, layers = REDUCED[family]
    cfg = {**load_model(name).config, "num_hidden_layers": layers}
    if "layer_types" in cfg:  # gpt-oss: one sliding-window and one global layer
        cfg["layer_types"] = cfg["layer_types"][:layers]
    arch = from_hf_config(cfg, f"{name}-L{layers}")
    # gpt-oss: past its 128-token window, so the sliding layer's mask differs from the global one
    training = Training(micro_batch=1, seq_len=256 if family == "gpt_oss" else 128, **extra)
    e = estimate(arch, method, training, load_gpu("h200"), options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trace(arch, method, options, training, flops=False)
    assert (e.params.total, e.params.trainable) == (r.params_total, r.params_trainable)
    err = (e.memory.peak_allocated_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
    assert abs(err) < 0.01, f"engine {e.memory.peak_allocated_bytes:,} vs trace {r.peak_allocated_bytes:,} ({err:+.2%})"


def test_bitfit_on_gpt_oss_is_refused_not_misestimated():
    with pytest.raises(MethodError, match="BitFit"):
        build_tuned(load_model("gpt-oss-20b"), "bitfit", {}, Training(micro_batch=1, seq_len=8))
