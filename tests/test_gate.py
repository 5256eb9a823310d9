"""The gate on the committed CPU traces (profiles/cpu): the engine passes, a perturbed engine does not.

profiles/cpu holds the records of `peftplan trace --matrix ci` (harness/matrix.py): the real
transformers + peft step traced under fake tensors. `check` re-predicts each with the engine; these
tests need no torch (the engine is pure Python).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import peftplan.engine.program as program
import peftplan.engine.step as step
import peftplan.estimate as estimate_mod
from peftplan.check import check_paths
from peftplan.dtypes import BF16, FP32
from peftplan.harness.matrix import XFAIL, matrix
from peftplan.records import iter_record_paths, load_record

CPU = Path(__file__).resolve().parent.parent / "profiles" / "cpu"


@pytest.fixture(scope="module")
def committed():
    if not CPU.is_dir() or not any(CPU.glob("*.json")):
        pytest.fail("profiles/cpu has no records: run `peftplan trace --matrix ci --out-dir profiles/cpu`")
    return [CPU]


def test_committed_records_cover_the_matrix(committed):
    """Every matrix entry has its committed record, carrying the matrix's xfail mark (and no other)."""
    records = {load_record(p).raw["matrix"]["id"]: load_record(p) for p in iter_record_paths(committed)}
    entries = matrix("ci")
    assert {e.id for e in entries} <= set(records), sorted({e.id for e in entries} - set(records))
    for e in entries:
        assert records[e.id].raw.get("xfail") == e.xfail, e.id
    from peftplan.methods import method_names

    assert {r.method for r in records.values()} == set(method_names())
    assert set(XFAIL) <= {e.id for e in entries}, "an xfail mark names no matrix entry"


def test_unperturbed_engine_passes_the_gate(committed):
    res = check_paths(committed)
    assert res.ok, "\n".join(f"{f.path}: {'; '.join(f.violations) or 'xpass'}" for f in res.violations)
    passing = [f for f in res.findings if f.status == "ok"]
    assert len(passing) >= 0.6 * len(res.findings)
    assert all(abs(f.error_pct) <= 1.0 for f in passing)


def test_dropping_the_fp32_logits_upcast_is_caught(committed, monkeypatch):
    """The loss keeps bf16 logits instead of transformers' fp32 upcast: the gate must fail."""
    original = step.loss_forward

    def no_upcast(*args, **kwargs):
        monkeypatch.setattr(program, "FP32", BF16)
        try:
            return original(*args, **kwargs)
        finally:
            monkeypatch.setattr(program, "FP32", FP32)

    monkeypatch.setattr(step, "loss_forward", no_upcast)
    res = check_paths(committed)
    assert not res.ok
    caught = {(f.model, f.method) for f in res.violations}
    assert ("llama3.2-1b", "lora") in caught and ("llama3-8b", "lora") in caught
    assert all(f.error_pct < 0 for f in res.violations if f.kind == "cpu-trace" and f.error_pct is not None
               and not f.xfail)


def test_a_miscounted_parameter_is_caught(committed, monkeypatch):
    original = estimate_mod.count_params

    def off_by_one(model):
        p = original(model)
        return estimate_mod.Params(p.total, p.trainable + 1)

    monkeypatch.setattr(estimate_mod, "count_params", off_by_one)
    res = check_paths(committed)
    assert len(res.violations) == len(res.findings) - len([f for f in res.findings if f.status == "known-deviation"])
    assert all(any(v.startswith("params") for v in f.violations) for f in res.violations)
