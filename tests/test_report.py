"""The HTML comparison report: self-contained, escaped, and rendered by a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("plotly")
pytest.importorskip("pandas")

from peftplan.catalog import load_config  # noqa: E402
from peftplan.report import Comparison, compare, comparison_table, to_frame, to_rows, write_html  # noqa: E402
from peftplan.training import Training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
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


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def test_report_renders_in_headless_chromium(html_file: Path, tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = html_file.as_uri()
    shot = tmp_path / "shot.png"
    run = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1400,2400", url],
                         capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    assert 'class="main-svg"' in dom.stdout  # plotly drew its SVGs
    assert dom.stdout.count('class="main-svg"') >= 5
    keep = ROOT / "reports" / "_screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "report.png")
