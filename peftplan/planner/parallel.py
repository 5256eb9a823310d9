"""Independent pieces of a plan on several CPU cores: forked worker processes, results pickled back.

A cold plan records dozens of symbolic steps (one per method setting, or per point under a trainer) and
re-estimates its shown rows with estimate(); each is pure Python that holds the GIL, and none depends on
another. `run_parallel(tasks)` runs such zero-argument callables in forked workers (the tasks are inherited
by the fork, not pickled: closures are fine; only the results travel back) and returns each one's result, or
None where the task raised or the worker could not run it: the caller computes those itself, as it would
without workers, so an exception is raised where it always was and every number is the serial path's.

Workers: the cores this process may run on (`os.sched_getaffinity`), at most one per task;
PEFTPLAN_JOBS=N overrides (1: everything in this process). Forking needs a POSIX system with the "fork" start
method (Linux); elsewhere, in a daemonic process (a worker itself) or with one core, the tasks run here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

_TASKS: Sequence[Callable[[], Any]] = ()  # the running batch, inherited by the forked workers


def workers_for(n_tasks: int) -> int:
    """Processes to use for `n_tasks` tasks (1: run them in this process)."""
    env = os.environ.get("PEFTPLAN_JOBS", "").strip()
    if env:
        try:
            cores = max(1, int(env))
        except ValueError:
            cores = 1
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = os.cpu_count() or 1
    return max(1, min(cores, n_tasks))


def _run(i: int) -> Any:
    try:
        return _TASKS[i]()
    except Exception:  # the caller recomputes it and meets the exception there
        return None


def run_parallel(tasks: Sequence[Callable[[], Any]]) -> list[Any]:
    """Each task's result (None where it raised or did not run in a worker: the caller then runs it itself).

    With one worker the tasks are not run at all here (all None): the caller's serial path does them, lazily,
    exactly as before."""
    global _TASKS
    n = workers_for(len(tasks))
    if n <= 1:
        return [None] * len(tasks)
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
        return [None] * len(tasks)
    from concurrent.futures import ProcessPoolExecutor

    _TASKS = tasks
    out: list[Any] = []
    try:
        with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork")) as pool:
            for future in [pool.submit(_run, i) for i in range(len(tasks))]:
                try:
                    out.append(future.result())
                except Exception:  # its result would not pickle, or the worker died (out of memory, killed)
                    out.append(None)
    except Exception:  # the pool could not start or shut down: whatever did not come back is run by the caller
        out += [None] * (len(tasks) - len(out))
    finally:
        _TASKS = ()
    return out
