"""The measuring side: build the real HF + peft model a method describes, and trace its training step.

`build.build_model` constructs the model the way users do (transformers from the config, peft /
bitsandbytes / LISA / bottleneck adapters on top, dtypes exactly as the method's TunedModel says);
`trace.trace` runs whole training steps under `FakeTensorMode` on the fake CPU device (or with real
tensors, for small models) and records every storage the step allocates.

Needs the `harness` extra (torch, transformers, peft, bitsandbytes); importing this package does not
import torch, the submodules do.
"""

from __future__ import annotations

__all__ = ["build_model", "count_params", "TraceResult", "HarnessError", "NotTraceable"]
# The tracer itself: `from peftplan.harness.trace import trace` (the submodule shadows a package-level name).


class HarnessError(RuntimeError):
    """The real stack cannot build or run this configuration (one line, for the user)."""


class NotTraceable(HarnessError):
    """A configuration that exists but cannot be traced on this device (e.g. paged optimizers on CPU)."""


def __getattr__(name: str):  # lazy: keep `import peftplan.harness` free of torch
    if name in ("build_model", "count_params"):
        from . import build
        return getattr(build, name)
    if name == "TraceResult":
        from .trace import TraceResult
        return TraceResult
    raise AttributeError(name)
