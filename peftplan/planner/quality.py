"""The quality prior of the planner's objective `quality`: data/quality_prior.json (each value with its
source: published method comparisons), and the source line shown for a method and its targets."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


@lru_cache(maxsize=1)
def quality_prior() -> dict[str, Any]:
    """data/quality_prior.json (every value with its source)."""
    return json.loads((resources.files("peftplan") / "data" / "quality_prior.json").read_text(encoding="utf-8"))


def quality_source_for(method: str, targets: str, lora_like: bool) -> str:
    """Where a method's (and, for LoRA-like methods, its target set's) prior comes from."""
    prior = quality_prior()
    fam = prior["families"].get(method)
    if fam is None:
        return "no prior for this method"
    text = fam["source"]
    if lora_like and targets != "default":
        text += "; targets: " + prior["targets"][targets]["source"]
    return text
