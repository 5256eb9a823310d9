"""The seeds' arithmetic, recomputed by peftplan/claims.py, equals the figures the seeds quote."""

import pytest

from peftplan.claims import all_claims


@pytest.fixture(scope="module")
def claims():
    return {c.key: c for c in all_claims()}


@pytest.mark.parametrize("key, expected, tol", [
    ("full-7b-58gb", 58.0, 1e-9),
    ("full-7b-fp32", 112.0, 1e-9),   # 28 + 28 + 56 GB: "> 100 GB"
    ("mixed-16-bytes", 128.48, 0.01),  # 16 B x 8.03B params ("128GB", "over 120GB")
    ("qlora-4gb-weights", 4.0151, 1e-3),
    ("qlora-8.5-bytes", 8.5, 1e-12),
    ("double-quant", 0.127, 1e-3),
    ("adapter-49152", 49152, 0),
    ("prompt-20k", 20480, 0),
    ("lora-pq", 65536, 0),
    ("mt0-print", 2359296, 0),
])
def test_seed_arithmetic(claims, key, expected, tol):
    assert abs(claims[key].reproduced - expected) <= tol


def test_mt0_line_is_exact(claims):
    assert "trainable params: 2359296 || all params: 1231940608 || trainable%: 0.19151053100118282" in claims["mt0-print"].engine


def test_every_claim_says_why(claims):
    for c in claims.values():
        assert c.why and c.engine
