"""`plan --html`: the fit matrix of the ranked configurations, the quality-vs-speed front with the fit
boundary, the ranked table with readable labels; rendered by headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("plotly")

from peftplan.catalog import custom_gpu, load_gpu, load_model  # noqa: E402
from peftplan.estimate import estimate  # noqa: E402
from peftplan.methods import explicit_grad_ckpt_options  # noqa: E402
from peftplan.planner import PlanResult, plan  # noqa: E402
from peftplan.planner.report import plan_fit_matrix, quality_speed_front, write_plan_html  # noqa: E402

CAPACITY = 3 * 2**30  # a 3 GiB GPU: gpt2 fits up to micro-batch 4 or so, and not beyond


@pytest.fixture(scope="module")
def result() -> PlanResult:
    return plan(load_model("gpt2"), custom_gpu(CAPACITY, load_gpu("t4")), seq_len=512,
                methods=["lora", "qlora", "full", "ia3"], ranks=(8,), attentions=("sdpa",), seq_sweep=(512,))


@pytest.fixture(scope="module")
def html_file(result: PlanResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plan_html(result, tmp_path_factory.mktemp("plan") / "plan.html")


def _verdict_from_text(text: str) -> str:
    if text.startswith("does not fit"):
        return "OOM"
    if text.startswith("fits only by flushing"):
        return "flush"
    return "tight" if ": tight" in text else "fits"


def test_plan_fit_matrix_cells_are_the_rows_verdicts(result: PlanResult) -> None:
    m = plan_fit_matrix(result)
    assert m.columns[:5] == [f"batch {b}" for b in (1, 2, 4, 8, 16)]
    labels = {r.config.variant.label for r in result.rows + result.closest}
    assert set(m.rows) == labels and "qlora r8 all-linear nf4+dq" in labels and "lora r8 attn" in labels
    verdicts = set()
    for label in m.rows:
        for b in (1, 2, 4, 8, 16):
            cell = m.cell(label, f"batch {b}")
            assert cell is not None
            ranked = [i for i, r in enumerate(result.rows, 1) if r.config.variant.label == label
                      and r.config.micro_batch == b]
            if ranked:  # the best-ranked configuration of this variant and micro-batch that fits
                row = result.rows[ranked[0] - 1]
                assert cell.detail.startswith(f"#{ranked[0]} of the ranking") and cell.verdict in ("fits", "tight")
            else:  # none fits: the closest miss
                misses = [r for r in result.closest if r.config.variant.label == label and r.config.micro_batch == b]
                row = min(misses, key=lambda r: r.device_total_bytes)
                assert cell.verdict == ("flush" if row.fits else "OOM")
            assert (cell.headroom_bytes, cell.device_total_bytes, cell.capacity_bytes) == \
                (row.headroom_bytes, row.device_total_bytes, CAPACITY)
            if row.path == "direct":  # re-estimated rows: the verdict is estimate()'s own, computed again
                method = row.config.variant.method  # as `estimate` runs the row's flags (--no-grad-ckpt included)
                opts = {**row.config.variant.opts(), **explicit_grad_ckpt_options(method, row.config.grad_ckpt)}
                e = estimate(load_model("gpt2"), method, row.config.training(), custom_gpu(CAPACITY, load_gpu("t4")),
                             opts)
                assert cell.verdict == _verdict_from_text(e.verdict), (label, b, e.verdict)
                assert cell.peak_reserved_bytes == e.memory.peak_reserved_bytes and not cell.note
            else:
                assert cell.peak_reserved_bytes is None and "lower bound" in cell.note
            verdicts.add(cell.verdict)
    assert {"fits", "OOM"} <= verdicts  # the 3 GiB GPU splits the grid


def test_plan_html_has_matrix_front_boundary_and_labels(result: PlanResult, html_file: Path) -> None:
    text = html_file.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and not re.findall(r"<script[^>]*\bsrc\s*=", text)
    assert text.index('id="fit"') < text.index('id="front"') < text.index('id="table"')
    assert text.count("Plotly.newPlot") == 2  # the matrix; the front and the boundary share one figure
    assert "front of what fits" in text and "front without the memory limit" in text
    assert "fit boundary" in text and f"capacity {CAPACITY / 2**30:.2f} GiB" in text
    front = quality_speed_front(result.rows)
    unlimited = quality_speed_front(result.rows + result.closest, fitting_only=False)
    assert front and unlimited and unlimited[0].tokens_per_s >= front[0].tokens_per_s
    assert all(a.tokens_per_s >= b.tokens_per_s and a.quality < b.quality for a, b in zip(front, front[1:]))
    table = text[text.index('id="table"'):]
    best = result.rows[0]
    assert f">{best.config.variant.label}<" in table and ">fits<" in table
    assert "{" not in table.split("</table>")[0]  # labels, not dicts


def test_plan_report_renders_in_headless_chromium(result: PlanResult, html_file: Path, tmp_path: Path) -> None:
    from browser import render

    page = render(html_file, tmp_path, "plan", height=2600)
    assert page.dom.count('class="main-svg"') >= 4  # the matrix and the two-panel front drew
    m = plan_fit_matrix(result)
    filled = [(j, i) for j, r in enumerate(m.rows) for i, c in enumerate(m.columns) if m.cell(r, c) is not None]
    for j, i in filled:
        said = page.hovers[(j, i)]
        assert m.rows[j] in said and "device total" in said and "capacity: 3.00 GiB" in said, said
