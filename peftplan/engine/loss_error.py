"""The error a trainer's loss raises when it does not apply to the model (its own module: the loss
kernels in liger.py, chunked_ce.py and unsloth.py raise it, and losses.py dispatches to them)."""


class LossError(ValueError):
    """A loss that does not apply to the model (one line, for the user)."""
