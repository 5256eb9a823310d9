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
