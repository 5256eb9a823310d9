"""Shared arithmetic of peft's prompt-learning methods (prompt tuning, P-tuning, prefix tuning).

peft `_prepare_prompt_learning_config` (utils/other.py) sets token_dim = hidden size and
num_layers = the config's layer count; `num_transformer_submodules` is 2 for SEQ_2_SEQ_LM, else 1
(peft_model.py), and a prompt table has num_virtual_tokens * num_transformer_submodules rows.
"""

from __future__ import annotations

from ..arch import ModelArch
from .base import MethodError


def submodules(arch: ModelArch) -> int:
    return 2 if arch.task == "seq2seq-lm" else 1


def check_prompt_task(arch: ModelArch, method: str) -> None:
    """peft inserts soft prompts / prefixes only in its task models (PeftModelForCausalLM, ...ForSeq2SeqLM,
    classification, feature extraction: peft_model.py); it has no masked-LM task type, and the plain
    PeftModel.forward calls the base model without the prompt, so a masked-LM step never trains it."""
    if arch.task == "masked-lm":
        raise MethodError(f"peft {method} has no masked-LM task type: its soft prompt would never enter "
                          f"{arch.name}'s MLM step (use a causal or seq2seq model)")


def check_prompt_width(arch: ModelArch, method: str) -> None:
    """peft's prompt encoders are `token_dim` = config.hidden_size wide (peft_model.py `_setup_prompt_encoder`)
    and are concatenated with the input embeddings; a model whose embeddings are narrower than its hidden
    size (OPT-350m: word_embed_proj_dim 512, hidden 1024, projected in after the lookup) fails in torch.cat
    (traced: "Sizes of tensors must match except in dimension 1")."""
    _, _, width = arch.embeddings[0]
    if width != arch.hidden_size:
        raise MethodError(f"peft {method} fails on {arch.name}: its soft prompt is hidden_size {arch.hidden_size} "
                          f"wide but the input embeddings are {width} wide (torch.cat size mismatch)")


def check_virtual_tokens(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise MethodError(f"virtual-tokens must be a positive integer, got {n!r}")


def config_num_layers(arch: ModelArch) -> int:
    """peft reads num_hidden_layers / num_layers / n_layer: for T5 that is the encoder's layer count."""
    cfg = arch.config
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if cfg.get(key):
            return int(cfg[key])
    return arch.num_layers
