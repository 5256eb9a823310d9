"""The 2025 dense families (arch_modern.py, engine/program_modern.py) and the catalog models added with them.

- Every added catalog model: total parameters, and LoRA r=16 `all-linear` trainable parameters, equal
  transformers + peft on the meta device.
- Engine vs the fake-tensor trace of the real HF + peft step within 1%, at each family's real width and
  reduced depth (gemma3: one sliding and one global layer, with a sequence past the window so the
  sliding mask is materialised; smollm3: four layers, the fourth a NoPE layer).
"""

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peftplan.arch import from_hf_config  # noqa: E402
from peftplan.catalog import load_gpu, load_model  # noqa: E402
from peftplan.estimate import build_tuned, count_params, estimate  # noqa: E402
from peftplan.training import Training  # noqa: E402

ADDED = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "gemma3-1b", "gemma3-4b",
         "gemma3-12b", "gemma3-27b", "olmo2-7b", "smollm3-3b", "phi4", "mistral-nemo-12b", "llama3.1-70b",
         "llama3.3-70b", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b", "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b"]


def _hf_model(arch):
    cfg = transformers.AutoConfig.for_model(**dict(arch.config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", ADDED)
def test_total_and_lora_all_linear_params_match(name):
    arch = load_model(name)
    model = _hf_model(arch)
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    tuned, opts = build_tuned(arch, "lora", {"rank": 16, "targets": "all-linear"}, Training(micro_batch=1, seq_len=64))
    mine = count_params(tuned)
    with torch.device("meta"):
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, target_modules="all-linear"))
    assert (mine.trainable, mine.total) == pm.get_nb_trainable_parameters()


def test_gemma3_layer_pattern_and_norms():
    arch = load_model("gemma3-1b")
    windows = [b.sliding_window for b in arch.blocks]
    assert windows.count(None) == 4 and windows[5] is None and windows[0] == 512  # every 6th layer global
    assert arch.tie_word_embeddings and arch.embed_scale and arch.qk_norm == "head"
    assert [b.rope for b in load_model("smollm3-3b").blocks[:4]] == [True, True, True, False]


def test_gemma3_vision_language_config_is_its_text_decoder():
    """The hub's Gemma3ForConditionalGeneration config.json (model_type gemma3) lists only non-default text
    fields; peftplan fills Gemma3TextConfig's defaults and models the language model."""
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}
    arch = from_hf_config(cfg, "gemma-3-4b-it")
    text = transformers.AutoConfig.for_model(**cfg).text_config
    with torch.device("meta"):
        real = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(text).parameters())
    assert arch.total_params == real == load_model("gemma3-4b").total_params


def test_hub_ids_of_variants_resolve_offline():
    from peftplan.catalog import resolve_model_name

    assert resolve_model_name("Qwen/Qwen3-8B-Base") == "qwen3-8b"
    assert resolve_model_name("google/gemma-3-27b-it") == "gemma3-27b"
    assert resolve_model_name("openai/gpt-oss-20b") == "gpt-oss-20b"


# (catalog model, config overrides: real width, reduced depth, seq_len)
REDUCED = {
    "qwen3": ("qwen3-8b", dict(num_hidden_layers=2, max_window_layers=2), 256),
    "gemma3": ("gemma3-1b", dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]), 640),
    "olmo2": ("olmo2-7b", dict(num_hidden_layers=2), 256),
    "smollm3": ("smollm3-3b", dict(num_hidden_layers=4), 256),
    "phi4": ("phi4", dict(num_hidden_layers=2), 256),
    "mistral-nemo": ("mistral-nemo-12b", dict(num_hidden_layers=2), 256),
}
CASES = [(fam, m, ck) for fam in REDUCED for m, ck in (("lora", False), ("lora", True), ("qlora", False),
                                                         ("full", False), ("prefix", False))]


def reduced_arch(family):
    name, over, seq = REDUCED[family]
    cfg = {**load_model(name).config, **over}
    return from_hf_config(cfg, f"{name}-L{over['num_hidden_layers']}"), seq


@pytest.mark.parametrize("family,method,grad_ckpt", CASES)
def test_engine_matches_trace_at_real_width(family, method, grad_ckpt):
    from peftplan.harness.trace import trace

    arch, seq = reduced_arch(family)
    options = {"rank": 16, "targets": "all-linear"} if method in ("lora", "qlora") else {}
    training = Training(micro_batch=1, seq_len=seq, grad_ckpt=grad_ckpt)
    e = estimate(arch, method, training, load_gpu("h200"), options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = trace(arch, method, options, training, flops=False)
    assert (e.params.total, e.params.trainable) == (r.params_total, r.params_trainable)
    err = (e.memory.peak_allocated_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
    assert abs(err) < 0.01, f"engine {e.memory.peak_allocated_bytes:,} vs trace {r.peak_allocated_bytes:,} ({err:+.2%})"


def test_gemma3_final_logit_softcapping_matches_trace():
    """No published Gemma 3 config sets final_logit_softcapping; the modelled cap * tanh(logits / cap) is
    checked on a small config that does."""
    from peftplan.harness.trace import trace

    arch = from_hf_config({"model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 256,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
                           "intermediate_size": 512, "num_hidden_layers": 2, "sliding_window": 32,
                           "final_logit_softcapping": 30.0}, "tiny-gemma3-softcap")
    assert arch.final_logit_softcap == 30.0
    training = Training(micro_batch=2, seq_len=64)
    for method in ("lora", "full"):
        e = estimate(arch, method, training, load_gpu("h200"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = trace(arch, method, {}, training, flops=False)
        err = (e.memory.peak_allocated_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
        assert abs(err) < 0.01, (method, err)
