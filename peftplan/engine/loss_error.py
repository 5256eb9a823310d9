"""The error a trainer's loss raises when it does not apply to the model (its own module: the loss
kernels in liger.py, chunked_ce.py and unsloth.py raise it, and losses.py dispatches to them)."""


class LossError(ValueError):
    """A loss that does not apply to the model (one line, for the user)."""


def require_causal_lm(arch, loss: str) -> None:  # type: ignore[no-untyped-def]
    """The trainers' fused / chunked losses score next tokens: refuse a seq2seq or masked LM in one line.
    `loss` completes the sentence, e.g. "TRL's fused LM head scores next tokens of a causal LM"."""
    if arch.task != "causal-lm":
        raise LossError(f"{loss}; {arch.name} is {arch.task}")
