"""What FSDP (engine/sharding.py) and DeepSpeed ZeRO (engine/deepspeed.py) share: the interconnect and
framework-default data (data/interconnect.json), the parameters of one block, and the no-op tape node whose
backward runs a hook (a sharding framework's per-block backward events)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .autograd import Node, Param, Tape


@lru_cache(maxsize=1)
def interconnect() -> dict[str, Any]:
    text = (resources.files("peftplan") / "data" / "interconnect.json").read_text(encoding="utf-8")
    return json.loads(text)


def marker(tape: Tape, on_backward) -> None:  # type: ignore[no-untyped-def]
    """A tape node that does nothing but run `on_backward` when backward reaches it."""
    tape.nodes.append(Node("fsdp", [], [], [], on_backward=on_backward))


def _block_params(bp) -> list[Param]:  # type: ignore[no-untyped-def]
    out: list[Param] = []
    for lp in bp.linears:
        out += [p for p in (lp.weight, lp.bias, lp.lora_a, lp.lora_b, lp.magnitude, lp.ia3) if p is not None]
    out += bp.norms + bp.extras  # extras: MoE router and fused experts (arch_moe.py)
    out += [p for ab in bp.expert_lora.values() for p in ab]
    for _, d, u in bp.adapters:
        out += [d, u]
    return out
