"""Headless Chromium for the HTML reports: a screenshot (kept in reports/_screenshots/ to look at), the DOM
after plotly drew, the console (any error fails), and the fit matrix's hover read back by moving the mouse
over every cell (a real `mousemove` on plotly's drag layer, so the layers drawn over the heatmap must let
it through). Tests skip without Chromium, except in CI (`CI=true`), which installs it."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "reports" / "_screenshots"

# Moves the mouse over each cell of the page's first plot (the fit matrix) and writes what the hover
# label says into <pre id="probe">, one "row,column:text" line per cell.
PROBE_JS = """
window.addEventListener('load', function () {
  setTimeout(function () {
    var out = [];
    var gd = document.querySelectorAll('.plotly-graph-div')[0];
    var xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
    var drag = gd.querySelector('.nsewdrag');
    var box = gd.getBoundingClientRect();
    var nx = gd.data[0].x.length, ny = gd.data[0].y.length;
    for (var j = 0; j < ny; j++) for (var i = 0; i < nx; i++) {
      drag.dispatchEvent(new MouseEvent('mousemove', {bubbles: true,
        clientX: box.left + xa._offset + xa.c2p(i), clientY: box.top + ya._offset + ya.c2p(j)}));
      var t = Array.from(gd.querySelectorAll('.hoverlayer .hovertext')).map(function (n) { return n.textContent; });
      out.push(j + ',' + i + ':' + t.join(' | '));
      Plotly.Fx.unhover(gd);
    }
    var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = out.join('\\n');
    document.body.appendChild(pre);
  }, 300);
});
"""


def chromium() -> str:
    """The Chromium executable, or skip (fail under CI)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    message = "chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _common(exe: str, profile: Path) -> list[str]:
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]


def console_errors(stderr: str) -> list[str]:
    """Console messages that are errors (Chromium logs every console message as INFO:CONSOLE)."""
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"error|uncaught|exception", line, re.IGNORECASE)]


@dataclass
class Rendered:
    dom: str
    screenshot: Path
    hovers: dict[tuple[int, int], str]


def render(html_file: Path, tmp_path: Path, name: str, height: int = 2400) -> Rendered:
    """Screenshot, DOM and the fit matrix's hover texts of `html_file`; fails on any console error."""
    exe = chromium()
    common = _common(exe, tmp_path / f"profile-{name}")
    shot = tmp_path / f"{name}.png"
    run = subprocess.run(common + [f"--screenshot={shot}", f"--window-size=1400,{height}", html_file.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not console_errors(run.stderr), console_errors(run.stderr)
    dom = subprocess.run(common + ["--dump-dom", html_file.as_uri()], capture_output=True, text=True, timeout=180)
    assert not console_errors(dom.stderr), console_errors(dom.stderr)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENSHOTS / f"{name}.png")

    probed = tmp_path / f"{name}-probe.html"
    text = html_file.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", f"<script>{PROBE_JS}</script></body>"), encoding="utf-8")
    run = subprocess.run(common + ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert not console_errors(run.stderr), console_errors(run.stderr)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, "the hover probe did not run: " + run.stderr[-2000:]
    hovers: dict[tuple[int, int], str] = {}
    for line in html.unescape(found.group(1)).splitlines():
        where, _, said = line.partition(":")
        j, i = where.split(",")
        hovers[(int(j), int(i))] = said
    return Rendered(dom.stdout, shot, hovers)
