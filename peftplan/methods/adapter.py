"""Bottleneck adapters: Houlsby (series, after attention and MLP), Pfeiffer (after MLP), parallel.

Houlsby et al. 2019 (sec. 2.1): down-projection to `size`, nonlinearity, up-projection, skip
connection, inserted after the attention output projection and after the feed-forward; the
paper also trains the layer norms. Pfeiffer et al. 2021 (AdapterFusion): one adapter after the
feed-forward. Parallel (He et al. 2022): the adapter reads the MLP input and its output is added
to the MLP output. peft has no bottleneck adapters; peftplan's tracer inserts real nn.Modules
(Linear, ReLU, Linear in fp32) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..arch import ModelArch
from ..training import Training
from ..tuned import BottleneckAdapter, TunedModel
from .base import MethodError, MethodSpec, register
from .common import ADAPTER_DTYPE, frozen_base_dtype, uniform_model

PLACEMENTS = {
    "houlsby": ("after-attn", "after-mlp"),
    "pfeiffer": ("after-mlp",),
    "parallel": ("parallel-mlp",),
}


@dataclass(frozen=True)
class AdapterOptions:
    adapter_size: int = field(default=64, metadata={"help": "bottleneck width m (Houlsby et al. use 8-256)"})
    adapter_kind: Literal["houlsby", "pfeiffer", "parallel"] = field(default="houlsby", metadata={
        "help": "houlsby (after attention and MLP, norms trained), pfeiffer (after MLP), parallel (beside MLP)"})


def build(arch: ModelArch, options: AdapterOptions, training: Training) -> TunedModel:
    size = options.adapter_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise MethodError(f"adapter-size must be a positive integer, got {size!r}")
    if size > arch.hidden_size:
        raise MethodError(f"adapter-size {size} exceeds the hidden size {arch.hidden_size}: not a bottleneck")
    if options.adapter_kind not in PLACEMENTS:
        raise MethodError(f"unknown adapter kind {options.adapter_kind!r} (houlsby, pfeiffer, parallel)")
    base = uniform_model(arch, "adapter", frozen_base_dtype(training), trainable=False)
    adapters = tuple(BottleneckAdapter(p, arch.hidden_size, size, ADAPTER_DTYPE)
                     for p in PLACEMENTS[options.adapter_kind])
    train_norms = options.adapter_kind == "houlsby"
    blocks = tuple(replace(b, adapters=adapters, norms_trainable=train_norms) for b in base.blocks)
    return replace(base, blocks=blocks)


SPEC = register(MethodSpec(
    name="adapter", summary="bottleneck adapters (Houlsby series, Pfeiffer, parallel)",
    options_cls=AdapterOptions, build=build, peft_type=None,
    source="Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021; He et al. 2022",
))
