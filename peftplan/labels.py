"""Readable labels for a method's options: "r16 all-linear nf4+dq" instead of a raw dict.

The parts come from the method registry: the fields of the method's options dataclass
(`MethodSpec.options_cls`), in their declared order, each value read from the estimate's options and
compared with the field's own default. How one field *reads* is a rule per field name (below), not a
string per configuration, so a newly registered method gets a label without touching this module:
a field without a rule is shown as `name value` when it differs from its default. A field may also
carry its own format in its metadata (`field(metadata={"label": "r{value}"})`), which wins.

Pure (no torch, pandas or plotly).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .methods import get_method

# bitsandbytes' 4-bit storage types: double quantization (`bnb_4bit_use_double_quant`) applies to them only;
# methods/qlora.py `build` drops it for int8 (LLM.int8 has no second quantization of its scales)
FOUR_BIT = ("nf4", "fp4")


@dataclass(frozen=True)
class FieldRule:
    """How one option field reads in a label.

    `fmt(value, options)` gives the text ("" shows nothing); `always`: shown at its default too (the
    options that define the configuration: rank, quantization type, bottleneck size...), otherwise
    only when the value differs from the field's default; `glue`: appended to the previous part
    without a space ("nf4" + "+dq")."""

    fmt: Callable[[Any, Mapping[str, Any]], str]
    always: bool = False
    glue: bool = False


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


RULES: dict[str, FieldRule] = {
    # LoRA family (methods/lora.py LoraOptions)
    "rank": FieldRule(lambda v, o: f"r{v}", always=True),
    "alpha": FieldRule(lambda v, o: f"alpha {_num(v)}"),
    "dropout": FieldRule(lambda v, o: f"dropout {_num(v)}"),
    # None = peft's per-model default list (omitted); otherwise the names or preset as given
    "targets": FieldRule(lambda v, o: "" if v is None else str(v)),
    # QLoRA (methods/qlora.py QLoraOptions)
    "quant": FieldRule(lambda v, o: str(v), always=True),
    "double_quant": FieldRule(lambda v, o: "+dq" if v and o.get("quant") in FOUR_BIT else "", always=True, glue=True),
    "kbit_prep": FieldRule(lambda v, o: "" if v else "no kbit prep"),
    "kbit_grad_ckpt": FieldRule(lambda v, o: "" if v else "kbit ckpt off"),
    # LISA, bottleneck adapters, soft prompts
    "lisa_layers": FieldRule(lambda v, o: f"{v} layers", always=True),
    "adapter_kind": FieldRule(lambda v, o: str(v), always=True),
    "adapter_size": FieldRule(lambda v, o: f"bottleneck {v}", always=True),
    "virtual_tokens": FieldRule(lambda v, o: f"{v} tokens", always=True),
}


def _default(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def option_parts(method: str, options: Mapping[str, Any] | None) -> list[str]:
    """The label's parts for `method` with `options` (missing options read as their defaults)."""
    opts = dict(options or {})
    fields = dataclasses.fields(get_method(method).options_cls)  # type: ignore[arg-type]
    values = {f.name: opts.get(f.name, _default(f)) for f in fields}
    parts: list[str] = []
    for f in fields:
        value, default = values[f.name], _default(f)
        rule = RULES.get(f.name)
        own = f.metadata.get("label")
        if own is not None:
            text = str(own).format(value=value) if value != default or (rule and rule.always) else ""
            glue = False
        elif rule is not None:
            text = rule.fmt(value, values) if (rule.always or value != default) else ""
            glue = rule.glue
        else:
            text = f"{f.name.replace('_', '-')} {_num(value)}" if value != default else ""
            glue = False
        if not text:
            continue
        if glue and parts:
            parts[-1] += text
        else:
            parts.append(text)
    known = {f.name for f in fields}
    parts += [f"{k.replace('_', '-')} {_num(v)}" for k, v in sorted(opts.items()) if k not in known]
    return parts


def option_label(method: str, options: Mapping[str, Any] | None) -> str:
    """"r16 all-linear nf4+dq" (qlora), "bottleneck 64 houlsby" (adapter), "" (full, bitfit)."""
    return " ".join(option_parts(method, options))


def config_label(method: str, options: Mapping[str, Any] | None) -> str:
    """The method and its option label: "qlora r16 all-linear nf4+dq", "full"."""
    return " ".join([method] + option_parts(method, options))
