"""The HTML comparison report: self-contained, escaped, and rendered by a real browser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("plotly")
pytest.importorskip("pandas")

from peftplan.catalog import GPU, custom_gpu, load_config, load_gpu, load_model  # noqa: E402
from peftplan.estimate import Estimate, estimate  # noqa: E402
from peftplan.report import Comparison, compare, comparison_table, to_frame, to_rows, write_html  # noqa: E402
from peftplan.report_fit import comparison_fit_matrix  # noqa: E402
from peftplan.training import Training  # noqa: E402

EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    return compare(["llama3.2-1b"], ["full", "lora", "qlora", "bitfit"], ["t4", "a100-80g"], seqs=[512, 1024],
                   training=Training(micro_batch=2), title=f"report test {EVIL} & more")


@pytest.fixture(scope="module")
def html_file(comparison: Comparison, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_html(comparison, tmp_path_factory.mktemp("report") / "report.html")


def test_compare_covers_every_combination(comparison: Comparison) -> None:
    # 3 methods x 2 GPUs x 2 seqs estimated; BitFit skipped everywhere with the reason
    assert len(comparison.estimates) == 12
    assert {e.method for e in comparison.estimates} == {"full", "lora", "qlora"}
    assert len(comparison.skipped) == 4
    assert all(s.method == "bitfit" and "no bias" in s.reason for s in comparison.skipped)
    t4 = [e for e in comparison.estimates if e.gpu == "t4"]
    assert t4 and all(e.training.precision == "fp16-mixed" for e in t4)  # the T4 has no bf16
    assert any("t4 has no bf16" in n for n in comparison.notes)
    assert comparison.seqs == [512, 1024]


def test_html_is_self_contained(html_file: Path) -> None:
    text = html_file.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert '<script src="http' not in text and "<script src='http" not in text
    assert not re.findall(r"<script[^>]*\bsrc\s*=", text)  # no external script of any kind
    assert not re.findall(r"<link[^>]*\bhref\s*=\s*[\"']https?:", text)  # no external stylesheet
    assert "plotly.js v" in text or "plotly.min.js" in text or "Plotly.newPlot" in text
    assert text.count("Plotly.newPlot") >= 4  # memory, seq, flops, speed, params figures
    assert html_file.stat().st_size > 2_000_000  # plotly.js itself is inlined
    for section in ('id="memory"', 'id="seq"', 'id="flops"', 'id="speed"', 'id="params"', 'id="table"',
                    'id="skipped"', 'id="assumptions"'):
        assert section in text
    assert "steady_state" in text and "micro_batch" in text  # training settings listed
    assert "step time: a roofline over the step" in text  # estimate assumptions listed


def test_title_and_model_names_are_escaped(html_file: Path, tmp_path: Path) -> None:
    text = html_file.read_text(encoding="utf-8")
    assert EVIL not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text

    # a model whose name (its directory) is markup
    name = "<img src=x onerror=alert(1)>"
    model_dir = tmp_path / name
    model_dir.mkdir()
    _, cfg = load_config("llama3.2-1b")
    (model_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    c = compare([str(model_dir / "config.json")], ["lora"], ["a100-80g"])
    assert c.estimates[0].model == name
    out = write_html(c, tmp_path / "evil.html")
    body = out.read_text(encoding="utf-8")
    assert name not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body


def test_rows_and_frame(comparison: Comparison) -> None:
    rows = to_rows(comparison)
    assert len(rows) == 16
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["device_total_bytes"] > r["peak_allocated_bytes"] for r in ok)
    assert all(isinstance(r["fits"], bool) for r in ok)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 4 and all("no bias" in r["reason"] for r in skipped)
    frame = to_frame(comparison)
    assert len(frame) == 16 and "tokens_per_s" in frame.columns


def test_terminal_table(comparison: Comparison) -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(comparison_table(comparison))
    out = console.export_text()
    assert "qlora" in out and "a100-80g" in out and "skipped" in out
    assert EVIL in out  # shown literally, not interpreted as rich markup


# ---------------------------------------------------------------------------------------------
# the fit matrix
# ---------------------------------------------------------------------------------------------

def _verdict_from_text(e: Estimate) -> str:
    """The short verdict read from the estimate's own sentence (fit.py fit_verdict), not from report_fit."""
    if e.verdict.startswith("does not fit"):
        return "OOM"
    if e.verdict.startswith("fits only by flushing"):
        return "flush"
    if e.verdict.startswith("fits with") and ": tight" in e.verdict:
        return "tight"
    assert e.verdict.startswith("fits with"), e.verdict
    return "fits"


@pytest.fixture(scope="module")
def fit_case() -> tuple[Comparison, dict[str, GPU]]:
    """Two GPUs sized from independent estimates so that every verdict occurs: one holds the LoRA step by half
    of what the estimate may miss (tight), one holds the QLoRA step only once the allocator flushes its cache
    (flush; the LoRA step has no such regime since peft's fp32 input copy lives through its adapter: in the
    allocator simulation every capacity below its device total is OOM, flush or not)."""
    arch, a100 = load_model("llama3.2-1b"), load_gpu("a100-80g")
    qlora = {"rank": 16, "targets": "all-linear"}
    m = estimate(arch, "lora", Training(micro_batch=2, seq_len=512), a100).memory
    q = estimate(arch, "qlora", Training(micro_batch=2, seq_len=512), a100, qlora).memory
    gpus = {"tight": custom_gpu(m.device_total_bytes + (m.envelope_high_bytes - m.envelope_low_bytes) // 2, a100),
            "flush": custom_gpu(q.device_total_bytes - (q.peak_reserved_bytes - q.peak_allocated_bytes) // 2, a100),
            "a100": a100}
    c = compare([arch], ["full", "lora", "qlora", "bitfit"], list(gpus.values()), seqs=[512, 1024],
                training=Training(micro_batch=2), options_by_method={"qlora": qlora})
    return c, gpus


def test_fit_matrix_cells_are_the_estimates_verdicts(fit_case: tuple[Comparison, dict[str, GPU]]) -> None:
    comparison, gpus = fit_case
    matrix = comparison_fit_matrix(comparison)
    arch = load_model("llama3.2-1b")
    assert matrix.rows == ["full", "lora r8", "qlora r16 all-linear nf4+dq", "bitfit"]
    assert matrix.columns == [f"{g.name} · seq {s}" for g in gpus.values() for s in (512, 1024)]
    seen = set()
    for method, row in zip(("full", "lora", "qlora", "bitfit"), matrix.rows):
        for gpu in gpus.values():
            for seq in (512, 1024):
                cell = matrix.cell(row, f"{gpu.name} · seq {seq}")
                assert cell is not None
                if method == "bitfit":  # llama has no biases
                    assert cell.verdict == "n/a" and "no bias" in cell.detail
                    continue
                opts = {"rank": 16, "targets": "all-linear"} if method == "qlora" else None
                e = estimate(arch, method, Training(micro_batch=2, seq_len=seq), gpu, opts)  # computed again
                assert cell.verdict == _verdict_from_text(e), (row, gpu.name, seq, e.verdict)
                assert (cell.headroom_bytes, cell.device_total_bytes, cell.capacity_bytes) == \
                    (gpu.memory_bytes - e.memory.device_total_bytes, e.memory.device_total_bytes, gpu.memory_bytes)
                assert (cell.peak_allocated_bytes, cell.peak_reserved_bytes) == \
                    (e.memory.peak_allocated_bytes, e.memory.peak_reserved_bytes)
                seen.add(cell.verdict)
    assert seen == {"fits", "tight", "flush", "OOM"}  # the case exercises every verdict
    assert matrix.cell("lora r8", f"{gpus['tight'].name} · seq 512").verdict == "tight"
    assert matrix.cell("qlora r16 all-linear nf4+dq", f"{gpus['flush'].name} · seq 512").verdict == "flush"


def test_fit_matrix_opens_the_report_with_hover_numbers(fit_case: tuple[Comparison, dict[str, GPU]],
                                                       tmp_path: Path) -> None:
    comparison, gpus = fit_case
    text = write_html(comparison, tmp_path / "fit.html").read_text(encoding="utf-8")
    assert text.index('id="fit"') < text.index('id="memory"') < text.index('id="table"')
    for what in ("peak allocated: ", "peak reserved: ", "device total: ", "capacity: ", "headroom: "):
        assert what in text
    assert "fits with" in text and "tight (less than" in text and "fits only by flushing" in text
    # the numbers table: readable option labels, not dicts; the raw options stay in the assumptions
    table = text[text.index('id="table"'):text.index('id="assumptions"')]
    assert "r16 all-linear nf4+dq" in table and '"rank"' not in table and "{" not in table
    assert ">tight<" in table and ">flush<" in table and ">OOM<" in table
    assert '"rank": 16' in text[text.index('id="assumptions"'):].replace("&quot;", '"')


def test_report_renders_in_headless_chromium(html_file: Path, comparison: Comparison, tmp_path: Path) -> None:
    from browser import render

    page = render(html_file, tmp_path, "report")
    assert page.dom.count('class="main-svg"') >= 6  # plotly drew its SVGs (fit matrix, memory, seq, ...)
    matrix = comparison_fit_matrix(comparison)
    assert len(page.hovers) == len(matrix.rows) * len(matrix.columns)
    for (j, i), said in page.hovers.items():  # the mouse over each cell shows that cell's numbers
        cell = matrix.cell(matrix.rows[j], matrix.columns[i])
        assert cell is not None and matrix.rows[j] in said and matrix.columns[i] in said, said
        if cell.verdict == "n/a":
            assert "not estimated" in said and "no bias" in said, said
        else:
            for what in ("peak allocated", "peak reserved", "device total", "capacity", "headroom"):
                assert what in said, said
            assert f"{cell.device_total_bytes / 2**30:,.2f} GiB" in said and f"{cell.verdict}:" in said, said


def test_fit_matrix_renders_every_verdict_in_headless_chromium(fit_case: tuple[Comparison, dict[str, GPU]],
                                                               tmp_path: Path) -> None:
    from browser import render

    comparison, _ = fit_case
    page = render(write_html(comparison, tmp_path / "fit.html"), tmp_path, "report-fit", height=1000)
    said = " ".join(page.hovers.values())
    assert "tight: fits with" in said and "flush: fits only by flushing" in said and "OOM: does not fit" in said
