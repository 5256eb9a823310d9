import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def catalog_names():
    from peftplan.catalog import model_names

    return model_names()


def pytest_terminal_summary(terminalreporter):
    """Print the differential fuzzer's seed so any run reproduces (PEFTPLAN_FUZZ_SEED=...)."""
    module = sys.modules.get("test_fuzz") or sys.modules.get("tests.test_fuzz")
    if module is not None:
        terminalreporter.write_line(f"peftplan fuzz: {module.EXAMPLES} examples, seed {module.SEED} "
                                    f"(PEFTPLAN_FUZZ_SEED={module.SEED} reproduces)")
