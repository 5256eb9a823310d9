"""Option labels come from the method registry: every registered method gets one, and every option
it has shows in the label once it differs from its default."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from peftplan.catalog import load_gpu, load_model
from peftplan.estimate import estimate
from peftplan.labels import config_label, option_label
from peftplan.methods import registry
from peftplan.training import Training


def _other_value(cls: type, f: dataclasses.Field) -> typing.Any:  # type: ignore[type-arg]
    """A valid value of field `f` that differs from its default (from the field's own type)."""
    hint = typing.get_type_hints(cls)[f.name]
    default = f.default
    choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()
    if choices:
        return next(c for c in choices if c != default and c != "int8")  # int8: a quant without double quant
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default * 2
    if isinstance(default, float):
        return default + 0.25 if default >= 1 else 0.1
    if default is None:
        return "q_proj"
    raise AssertionError(f"no test value for {cls.__name__}.{f.name}")


@pytest.mark.parametrize("method", sorted(registry()))
def test_every_registered_method_has_a_readable_label(method: str) -> None:
    spec = registry()[method]
    defaults = dataclasses.asdict(spec.options_cls())  # type: ignore[call-overload]
    label = config_label(method, defaults)
    assert label.split(" ")[0] == method
    assert config_label(method, None) == label  # missing options read as their defaults
    assert not any(bad in label for bad in ("{", "}", "None", "True", "False", "'", "=")), label
    for f in dataclasses.fields(spec.options_cls):  # type: ignore[arg-type]
        changed = dict(defaults, **{f.name: _other_value(spec.options_cls, f)})
        other = config_label(method, changed)
        assert other != label, f"{method}: option {f.name} does not show in its label ({label!r})"
        assert not any(bad in other for bad in ("{", "}", "None", "True", "False")), other


def test_the_issue_example_and_quantization_details() -> None:
    opts = {"rank": 16, "targets": "all-linear", "quant": "nf4", "double_quant": True}
    assert option_label("qlora", opts) == "r16 all-linear nf4+dq"
    assert option_label("qlora", {**opts, "double_quant": False}) == "r16 all-linear nf4"
    # bitsandbytes' double quantization is a 4-bit option: qlora.py drops it for int8
    assert option_label("qlora", {**opts, "quant": "int8"}) == "r16 all-linear int8"
    assert option_label("lora", {"rank": 8, "alpha": 32.0, "dropout": 0.05}) == "r8 alpha 32 dropout 0.05"
    assert option_label("full", {}) == "" and config_label("full", {}) == "full"
    assert option_label("adapter", {"adapter_size": 32, "adapter_kind": "pfeiffer"}) == "bottleneck 32 pfeiffer"
    assert option_label("lora", {"rank": 8, "not_a_field": 3}) == "r8 not-a-field 3"  # never dropped silently


def test_an_estimates_options_read_back_as_its_label() -> None:
    """estimate() records the options the trainer resolved (TRL skips kbit prep); the label says so."""
    e = estimate(load_model("llama3.2-1b"), "qlora", Training(micro_batch=1, seq_len=256, trainer="trl"),
                 load_gpu("a100-80g"), {"rank": 16, "targets": "all-linear"})
    label = option_label(e.method, e.options)
    assert label.startswith("r16 all-linear nf4+dq")
    assert ("no kbit prep" in label) == (e.options["kbit_prep"] is False)
