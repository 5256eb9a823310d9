"""`plan --html`: the quality-vs-speed front of a plan and its fit boundary, as ONE self-contained HTML file.

Two charts (plotly, imported only here; plotly.js inlined so the file opens offline): every
searched configuration at its tokens/s against its quality prior, those that fit filled, those
that do not hollow, the Pareto front of what fits joined by a line; and device memory against
tokens/s with the GPU's capacity as the fit boundary. Then the ranked table and the explanation.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..units import BYTES_PER_GIB
from .ranking import quality_of
from .space import PlanResult, PlanRow

_PALETTE = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#1b7c83", "#a40e26",
            "#0550ae", "#6639ba"]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def quality_speed_front(rows: list[PlanRow]) -> list[PlanRow]:
    """The fitting rows no other fitting row beats on both quality prior and tokens/s, fastest first."""
    known = [r for r in rows if r.fits and r.tokens_per_s and r.quality is not None]
    front: list[PlanRow] = []
    best_q = None
    for r in sorted(known, key=lambda r: (-(r.tokens_per_s or 0), -(r.quality or 0))):
        if best_q is None or (r.quality or 0) > best_q:
            front.append(r)
            best_q = r.quality
    return front


def write_plan_html(result: PlanResult, path: str | Path) -> Path:
    """Write the report and return its path."""
    import plotly.graph_objects as go

    path = Path(path)
    every = [r for r in result.rows] + [r for r in result.closest]
    methods = sorted({r.config.variant.method for r in every})
    color = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}

    def hover(r: PlanRow) -> str:
        c = r.config
        return _e(f"{c.label} | {r.device_total_bytes / BYTES_PER_GIB:.2f} GiB | "
                  f"{(r.tokens_per_s or 0):,.0f} tokens/s | quality prior "
                  f"{'?' if r.quality is None else f'{r.quality:.3f}'}")

    front_fig = go.Figure()
    memory_fig = go.Figure()
    for m in methods:
        for fits in (True, False):
            pts = [r for r in every if r.config.variant.method == m and r.fits == fits and r.tokens_per_s]
            if not pts:
                continue
            marker = dict(color=color[m], size=8, symbol="circle" if fits else "circle-open")
            name = _e(m + ("" if fits else " (does not fit)"))
            qual = [quality_of(r.config.variant) for r in pts]
            front_fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in pts], y=qual, mode="markers", name=name,
                                           marker=marker, text=[hover(r) for r in pts], hoverinfo="text",
                                           legendgroup=m))
            memory_fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in pts],
                                            y=[r.device_total_bytes / BYTES_PER_GIB for r in pts], mode="markers",
                                            name=name, marker=marker, text=[hover(r) for r in pts],
                                            hoverinfo="text", legendgroup=m))
    front = quality_speed_front(result.rows)
    if front:
        front_fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in front], y=[r.quality for r in front],
                                       mode="lines", name="front of what fits", line=dict(color="#24292f", dash="dot"),
                                       hoverinfo="skip"))
    front_fig.update_layout(xaxis_title="tokens/s (roofline step time)", yaxis_title="quality prior (GSM8K accuracy, "
                            "PEFT MetaMathQA comparison)", height=520, margin=dict(t=30))
    cap = result.gpu.memory_bytes / BYTES_PER_GIB
    memory_fig.add_hline(y=cap, line=dict(color="#cf222e", dash="dash"),
                         annotation_text=_e(f"{result.gpu.name} capacity {cap:.2f} GiB: fit boundary"))
    memory_fig.update_layout(xaxis_title="tokens/s", yaxis_title="device memory (GiB = 2^30 bytes)", height=520,
                             margin=dict(t=30))
    title = (f"{result.model} on {result.gpu.name}, seq {result.seq_len}: "
             f"{len(result.rows)} configurations fit, ranked by {result.objective}")
    parts = ["<!doctype html><html><head><meta charset=\"utf-8\">", f"<title>{_e(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:2px 6px;font-size:13px}"
             ".sub{color:#57606a}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p>{_e(result.explanation)}</p>",
             "<h2 id=\"front\">Quality vs speed</h2>",
             front_fig.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False}),
             "<h2 id=\"boundary\">Memory vs speed: the fit boundary</h2>",
             memory_fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}),
             "<h2 id=\"table\">Ranked configurations</h2><table><tr><th>#</th><th>configuration</th>"
             "<th>device memory (GiB)</th><th>tokens/s</th><th>quality prior</th><th>flags</th></tr>"]
    for i, r in enumerate(result.rows[:200], 1):
        parts.append(f"<tr><td>{'=' if r.tie and i > 1 else ''}{i}</td><td>{_e(r.config.label)}</td>"
                     f"<td>{r.device_total_bytes / BYTES_PER_GIB:.2f}</td><td>{(r.tokens_per_s or 0):,.0f}</td>"
                     f"<td>{'?' if r.quality is None else f'{r.quality:.3f}'}</td><td><code>{_e(r.config.flags())}"
                     "</code></td></tr>")
    parts.append("</table>")
    for n in result.notes:
        parts.append(f"<p class=\"sub\">note: {_e(n)}</p>")
    parts.append("<p class=\"sub\">Generated by peftplan plan. Quality priors and roofline constants with their "
                 "sources: peftplan/data/quality_prior.json, peftplan/data/roofline.json.</p></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
