"""The planner's worker processes (planner/parallel.py): the same plan on one core and on several."""

from __future__ import annotations

import os

import pytest

from peftplan.catalog import load_gpu, load_model
from peftplan.planner import clear_cache, parallel, plan


def _boom() -> int:
    raise ValueError("raised in the worker")


def test_run_parallel_keeps_order_runs_in_workers_and_leaves_failures_to_the_caller(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTPLAN_JOBS", "2")
    here = os.getpid()
    got = parallel.run_parallel([lambda: (1, os.getpid()), _boom, lambda: (3, os.getpid()), lambda: lambda: 0])
    assert got[0][0] == 1 and got[2][0] == 3
    assert here not in (got[0][1], got[2][1])  # forked workers did the work
    assert got[1] is None  # raised: the caller runs it again and meets the exception itself
    assert got[3] is None  # a result that does not pickle back
    monkeypatch.setenv("PEFTPLAN_JOBS", "1")
    assert parallel.run_parallel([lambda: 1, lambda: 2]) == [None, None]  # one core: the caller's serial path
    monkeypatch.setenv("PEFTPLAN_JOBS", "not-a-number")
    assert parallel.workers_for(5) == 1


def _rows(result):  # type: ignore[no-untyped-def]
    return ([r.to_dict() for r in result.rows], [r.to_dict() for r in result.closest], repr(result.limits),
            result.notes, result.stats.structures_recorded, result.stats.configs_evaluated)


@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_plan_on_two_workers_equals_plan_on_one(trainer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structures (or, under a trainer, points) recorded and rows estimated in workers give the serial plan,
    row for row; and the workers really returned work."""
    arch, gpu = load_model("gpt2"), load_gpu("t4")
    kw = dict(methods=["lora", "qlora", "full"], ranks=(8,), micro_batches=(1, 4), seq_sweep=(256, 512),
              trainer=trainer)
    returned = []
    real = parallel.run_parallel

    def counting(tasks):  # type: ignore[no-untyped-def]
        got = real(tasks)
        returned.append(sum(g is not None for g in got))
        return got

    monkeypatch.setattr(parallel, "run_parallel", counting)
    monkeypatch.setenv("PEFTPLAN_CACHE", "0")  # both plans record every structure (no disk cache between them)
    results = {}
    for jobs in ("1", "2"):
        monkeypatch.setenv("PEFTPLAN_JOBS", jobs)
        returned.clear()
        clear_cache()
        results[jobs] = plan(arch, gpu, **kw)
        assert (sum(returned) > 0) == (jobs == "2"), returned
    clear_cache()
    assert results["1"].rows, "nothing fits: the comparison would be empty"
    assert _rows(results["2"]) == _rows(results["1"])
