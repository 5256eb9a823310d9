"""pytest plugin (entry point `pytest11: peftplan`): the `peftplan_envelope` fixture.

    def test_step_fits(peftplan_envelope):
        est = estimate(arch, "lora", training, load_gpu("a100-80g"))
        with peftplan_envelope(est, model=model, optimizer=opt) as m:
            train_step()
        assert m.measured_bytes > 0

The fixture is `peftplan.envelope.envelope` (see there): on exit the block's peak must be inside the
estimate, or the test fails with an EnvelopeError saying predicted, measured, envelope and the
biggest component. Measurements of the test are kept on `peftplan_envelope.measurements`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest


class _EnvelopeFixture:
    def __init__(self) -> None:
        self.measurements: list[Any] = []

    @contextlib.contextmanager
    def __call__(self, est: Any, **kwargs: Any) -> Iterator[Any]:
        from .envelope import envelope

        with envelope(est, **kwargs) as m:
            self.measurements.append(m)
            yield m


@pytest.fixture
def peftplan_envelope() -> _EnvelopeFixture:
    """Context-manager factory: `with peftplan_envelope(estimate, model=..., optimizer=...) as m: step()`."""
    return _EnvelopeFixture()
