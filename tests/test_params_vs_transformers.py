"""Exact parameter counts: the engine against models built on the meta device with transformers + peft.

Every catalog model x every method that peft has (LoRA, DoRA, IA3, prompt, prefix, P-tuning) and
those peftplan builds itself (full, BitFit, LISA) are compared with the real module tree.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peftplan.catalog import load_model, model_names  # noqa: E402
from peftplan.estimate import build_tuned, count_params  # noqa: E402
from peftplan.methods import MethodError  # noqa: E402
from peftplan.training import Training  # noqa: E402

TASKS = {"causal-lm": transformers.AutoModelForCausalLM, "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
         "masked-lm": transformers.AutoModelForMaskedLM}
# peft has no masked-LM task type; FEATURE_EXTRACTION wraps any base model (prompt learning included)
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "masked-lm": "FEATURE_EXTRACTION"}


def _hf_model(arch):
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in arch.config.items() if k != "auto_map"})
    with torch.device("meta"):
        return TASKS[arch.task].from_config(cfg)


def _untied_head_correction(arch):
    """transformers 5.23 forces T5/MT5 to tie lm_head to the embedding (T5Config); the checkpoint has its own."""
    if arch.family == "t5" and not arch.tie_word_embeddings:
        return arch.vocab_size * arch.hidden_size
    return 0


@pytest.mark.parametrize("name", model_names())
def test_total_params_match_transformers(name):
    arch = load_model(name)
    model = _hf_model(arch)
    real = sum(p.numel() for p in model.parameters())
    assert arch.total_params == real + _untied_head_correction(arch)


def _peft_config(method, arch, opts):
    task = PEFT_TASK[arch.task]
    if method in ("lora", "dora"):
        targets = None if opts.targets is None else opts.targets.split(",")
        return peft.LoraConfig(task_type=task, r=opts.rank, lora_alpha=opts.alpha, target_modules=targets,
                               use_dora=method == "dora")
    if method == "ia3":
        return peft.IA3Config(task_type=task)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=opts.virtual_tokens)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=opts.virtual_tokens)
    if method == "ptuning":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=opts.virtual_tokens)
    raise AssertionError(method)


PEFT_METHODS = ["lora", "dora", "ia3", "prompt", "prefix", "ptuning"]
MODELS = ["llama3.2-1b", "qwen2.5-0.5b", "gemma2-2b", "phi3-mini", "gpt2", "opt-350m", "bloomz-560m", "mt0-large",
          "roberta-base", "mistral-7b", "llama3-8b"]


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_peft_counts_match(name, method):
    arch = load_model(name)
    options = {"targets": "all-linear"} if method in ("lora", "dora") and arch.model_type == "phi3" else {}
    if method == "ia3" and arch.model_type == "phi3":
        options = {"targets": "qkv_proj,o_proj"}
    if method in ("prompt", "ptuning", "prefix") and arch.task == "masked-lm":
        # peft has no masked-LM task type: the engine refuses (methods/prompting.py check_prompt_task)
        from peftplan.methods import MethodError

        with pytest.raises(MethodError, match="masked-LM"):
            build_tuned(arch, method, options, Training(micro_batch=1, seq_len=64))
        return
    if method in ("prompt", "ptuning") and arch.embeddings[0][2] != arch.hidden_size:
        # OPT-350m: the soft prompt (hidden_size wide) cannot be concatenated with its narrower embeddings;
        # the engine refuses what the real step fails on (tests/test_fuzz.py traces the failure)
        from peftplan.methods import MethodError

        with pytest.raises(MethodError, match="torch.cat"):
            build_tuned(arch, method, options, Training(micro_batch=1, seq_len=64))
        return
    tuned, opts = build_tuned(arch, method, options, Training(micro_batch=1, seq_len=64))
    mine = count_params(tuned)
    model = _hf_model(arch)
    cfg = _peft_config(method, arch, opts)
    if method == "ia3" and options:
        cfg = peft.IA3Config(task_type=PEFT_TASK[arch.task], target_modules=options["targets"].split(","),
                             feedforward_modules=[])
    if method in ("lora", "dora") and options.get("targets") == "all-linear":
        cfg = peft.LoraConfig(task_type=PEFT_TASK[arch.task], r=opts.rank, lora_alpha=opts.alpha,
                              target_modules="all-linear", use_dora=method == "dora")
    with torch.device("meta"):
        pm = peft.get_peft_model(model, cfg)
    trainable, total = pm.get_nb_trainable_parameters()
    assert mine.trainable == trainable
    assert mine.total == total + _untied_head_correction(arch)


def test_mt0_large_seed_line():
    """The seed's print_trainable_parameters line for mt0-large, LoRA r=8 on q,v (lecture 003)."""
    tuned, _ = build_tuned(load_model("mt0-large"), "lora", {"rank": 8, "alpha": 32, "dropout": 0.1, "targets": "q,v"},
                           Training(micro_batch=1, seq_len=64))
    p = count_params(tuned)
    assert p.legacy_peft_line() == ("trainable params: 2359296 || all params: 1231940608 || "
                                    "trainable%: 0.19151053100118282")


@pytest.mark.parametrize("name", ["llama3.2-1b", "gpt2", "roberta-base", "mt0-large"])
@pytest.mark.parametrize("method", ["full", "bitfit", "lisa"])
def test_non_peft_methods_match_module_tree(name, method):
    arch = load_model(name)
    model = _hf_model(arch)
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    if method == "bitfit" and n_bias == 0:
        with pytest.raises(MethodError, match="bias"):  # the HF module tree has no bias: BitFit is refused
            build_tuned(arch, method, {}, Training(micro_batch=1, seq_len=64))
        return
    tuned, opts = build_tuned(arch, method, {}, Training(micro_batch=1, seq_len=64))
    mine = count_params(tuned)
    if method == "full":
        expected = sum(p.numel() for p in model.parameters()) + _untied_head_correction(arch)
    elif method == "bitfit":
        expected = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    else:
        # the decoder/encoder stacks, not T5Block's own `.layer` list of sub-layers
        layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
                  and (n.endswith(("layers", ".h", "block")) or n == "h" or n.endswith("encoder.layer"))]
        blocks = [b for group in layers for b in group]  # T5: encoder blocks first, then decoder
        frozen = sum(p.numel() for b in blocks[: len(blocks) - opts.lisa_layers] for p in b.parameters())
        expected = sum(p.numel() for p in model.parameters()) + _untied_head_correction(arch) - frozen
    assert mine.trainable == expected
