"""The fit matrix: one cell per configuration, coloured by headroom, the verdict written in the cell.

`compare --html` opens with it (rows: model x method with its option label; columns: GPU x sequence
length) and `plan --html` has one too (planner/report.py: method variants x micro-batch). The cells
carry `estimate()`'s own numbers; the verdict's short form follows fit.py `fit_verdict`:

- "fits": the device total (reserved + CUDA context + NCCL) is under the capacity by at least what
  the estimate may miss (the envelope's spread, engine/envelope.py);
- "tight": it fits by less than that;
- "flush": the device total is over the capacity, but the caching allocator gets under it by freeing
  its cached segments and retrying (fit.py; slower steps);
- "OOM": it does not fit.

Colour: a diverging scale of the headroom (capacity - device total, GiB = 2**30 bytes) centred at
0 GiB, red below (does not fit), green above (fits), and amber over the cells whose verdict is
tight or flush. Hover: peak allocated, peak reserved, device total, capacity, headroom, the verdict.

The data half (`FitCell`, `FitMatrix`, `comparison_fit_matrix`) is pure; plotly is imported only
inside `fit_matrix_figure`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .labels import config_label
from .units import BYTES_PER_GIB

if TYPE_CHECKING:
    from .estimate import Estimate
    from .report import Comparison

VERDICTS = ("fits", "tight", "flush", "OOM")
RED_DARK, RED_LIGHT = "#a40e26", "#ffcecb"  # does not fit: the further over, the darker
GREEN_LIGHT, GREEN_DARK = "#dafbe1", "#1a7f37"  # fits: the more headroom, the darker
AMBER = "#e3a008"  # tight, or fits only by flushing the allocator's cache
GREY = "#eaeef2"  # not estimated (the method does not apply)


def verdict_short(fits: bool, headroom_bytes: int, uncertainty_bytes: int | None) -> str:
    """fit.py `fit_verdict` in one word. `uncertainty_bytes`: the envelope's spread (None: unknown,
    e.g. the planner's fast path, where no row can be called tight)."""
    if not fits:
        return "OOM"
    if headroom_bytes < 0:  # fit_verdict: fits only through release_cached_blocks retries
        return "flush"
    if uncertainty_bytes is not None and headroom_bytes < uncertainty_bytes:  # fit_verdict: tight
        return "tight"
    return "fits"


def estimate_verdict(e: "Estimate") -> str:
    """`verdict_short` of an estimate (its envelope spread is what estimate() gave fit_verdict)."""
    return verdict_short(e.fits, e.headroom_bytes, e.memory.envelope_high_bytes - e.memory.envelope_low_bytes)


@dataclass(frozen=True)
class FitCell:
    """One cell. Byte counts are None where the configuration was not estimated (`verdict` "n/a") or
    where the number is not known (the planner's fast path has no reserved peak)."""

    verdict: str  # VERDICTS, or "n/a"
    headroom_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_total_bytes: int | None = None
    capacity_bytes: int | None = None
    detail: str = ""  # the full verdict, the reason it was skipped, or the configuration shown
    note: str = ""  # e.g. "device total is a lower bound" (planner fast path)
    text: str = ""  # the cell's own text when not the verdict (e.g. "fits b37")


@dataclass
class FitMatrix:
    """Cells by (row, column); rows and columns in display order (labels are plain text)."""

    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], FitCell] = field(default_factory=dict)
    row_title: str = ""
    column_title: str = ""

    def cell(self, row: str, column: str) -> FitCell | None:
        return self.cells.get((row, column))


def _gpu_column(gpu: str, seq: int, many_seqs: bool) -> str:
    return f"{gpu} · seq {seq}" if many_seqs else gpu


def comparison_fit_matrix(comparison: "Comparison") -> FitMatrix:
    """Rows: (model,) method with its option label; columns: GPU x sequence length, in the order given.
    Each cell is one estimate's verdict; a skipped combination is "n/a" with the reason."""
    est = comparison.estimates
    models = {e.model for e in est} | {s.model for s in comparison.skipped}
    many_models = len(models) > 1
    seqs = sorted({e.training.seq_len for e in est} | {s.seq_len for s in comparison.skipped})
    many_seqs = len(seqs) > 1
    labels: dict[tuple[str, str], str] = {}
    for e in est:
        labels.setdefault((e.model, e.method), config_label(e.method, e.options))

    def row_of(model: str, method: str) -> str:
        text = labels.get((model, method), method)
        return f"{model} · {text}" if many_models else text

    rows: list[str] = []
    gpus: list[str] = []
    for model, method, gpu in [(e.model, e.method, e.gpu) for e in est] + \
                              [(s.model, s.method, s.gpu) for s in comparison.skipped]:
        if row_of(model, method) not in rows:
            rows.append(row_of(model, method))
        if gpu not in gpus:
            gpus.append(gpu)
    columns = [_gpu_column(g, s, many_seqs) for g in gpus for s in seqs]
    m = FitMatrix(rows, columns, row_title="method" if not many_models else "model · method",
                  column_title="GPU" + (" · sequence length" if many_seqs else ""))
    for e in est:
        mem = e.memory
        m.cells[(row_of(e.model, e.method), _gpu_column(e.gpu, e.training.seq_len, many_seqs))] = FitCell(
            estimate_verdict(e), e.headroom_bytes, mem.peak_allocated_bytes, mem.peak_reserved_bytes,
            mem.device_total_bytes, e.gpu_memory_bytes, e.verdict,
            note=f"{e.training.precision}, micro-batch {e.training.micro_batch}")
    for s in comparison.skipped:
        m.cells.setdefault((row_of(s.model, s.method), _gpu_column(s.gpu, s.seq_len, many_seqs)),
                           FitCell("n/a", detail=s.reason))
    return m


# ---------------------------------------------------------------------------------------------
# plotly
# ---------------------------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / BYTES_PER_GIB:,.2f} GiB"


def _wrap(text: str, width: int = 72) -> list[str]:
    """Hover labels do not wrap by themselves."""
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _hover(row: str, column: str, c: FitCell) -> str:
    e = lambda t: html.escape(str(t), quote=True)  # noqa: E731  (plotly renders entities as text)
    head = f"<b>{e(row)}</b><br>{e(column)}<br>"
    if c.verdict == "n/a":
        return head + "not estimated: " + "<br>".join(e(x) for x in _wrap(c.detail))
    lines = [f"peak allocated: {_gib(c.peak_allocated_bytes)}",
             f"peak reserved: {_gib(c.peak_reserved_bytes)}" if c.peak_reserved_bytes is not None
             else "peak reserved: not replayed",
             f"device total: {_gib(c.device_total_bytes)}", f"capacity: {_gib(c.capacity_bytes)}",
             "headroom: " + ("-" if c.headroom_bytes is None else f"{c.headroom_bytes / BYTES_PER_GIB:+,.2f} GiB"),
             f"<b>{e(c.verdict)}</b>: " + "<br>".join(e(x) for x in _wrap(c.detail))]
    if c.note:
        lines += [e(x) for x in _wrap(c.note)]
    return head + "<br>".join(lines)


def headroom_scale(values: list[float]) -> tuple[float, float, list[list[Any]]]:
    """(zmin, zmax, colorscale) for headroom values in GiB: diverging at 0 GiB, red below (darkest at
    the most negative), green above (darkest at the most headroom), with a step at 0 so that a
    configuration over the capacity never looks like one that fits. Each side spans its own range, so
    that -100 GiB of full fine-tuning does not wash out the +5 GiB of a LoRA."""
    lo, hi = min(values + [0.0]), max(values + [0.0])
    if lo == hi:
        lo, hi = -1.0, 1.0
    zero = (0.0 - lo) / (hi - lo)
    return lo, hi, [[0.0, RED_DARK], [zero, RED_LIGHT], [zero, GREEN_LIGHT], [1.0, GREEN_DARK]]


def fit_matrix_figure(m: FitMatrix, height: int | None = None):  # type: ignore[no-untyped-def]
    """The matrix as a plotly figure: a heatmap of the headroom (GiB) carrying the hover, an amber
    layer over tight / flush cells, and the verdicts as text on top."""
    import plotly.graph_objects as go

    esc = lambda t: html.escape(str(t), quote=True)  # noqa: E731
    xs, ys = [esc(c) for c in m.columns], [esc(r) for r in m.rows]
    cells = [[m.cell(r, c) for c in m.columns] for r in m.rows]
    gib = [[None if c is None or c.headroom_bytes is None or c.verdict == "n/a" else c.headroom_bytes / BYTES_PER_GIB
            for c in row] for row in cells]
    values = [v for row in gib for v in row if v is not None]
    zmin, zmax, scale = headroom_scale(values)
    hover = [[_hover(r, col, c) if c is not None else "" for col, c in zip(m.columns, row)]
             for r, row in zip(m.rows, cells)]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        x=xs, y=ys, z=gib, zmin=zmin, zmax=zmax, colorscale=scale, xgap=2, ygap=2,
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", hoverongaps=False,
        colorbar=dict(title=dict(text="headroom<br>GiB"), ticksuffix=" ")))
    amber = [[1 if c is not None and c.verdict in ("tight", "flush") else None for c in row] for row in cells]
    if any(v for row in amber for v in row):
        fig.add_trace(go.Heatmap(x=xs, y=ys, z=amber, zmin=0, zmax=1, colorscale=[[0, AMBER], [1, AMBER]],
                                 showscale=False, hoverinfo="skip", xgap=2, ygap=2, name="tight"))
    grey = [[1 if c is not None and c.verdict == "n/a" else None for c in row] for row in cells]
    if any(v for row in grey for v in row):
        fig.add_trace(go.Heatmap(x=xs, y=ys, z=grey, zmin=0, zmax=1, colorscale=[[0, GREY], [1, GREY]],
                                 showscale=False, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                                 hoverongaps=False, xgap=2, ygap=2, name="not estimated"))
    tx, ty, tt, tc = [], [], [], []
    for r, row, vals in zip(ys, cells, gib):
        for x, c, v in zip(xs, row, vals):
            if c is None:
                continue
            tx.append(x)
            ty.append(r)
            tt.append(esc(c.text or c.verdict))
            dark = c.verdict in ("fits", "OOM") and v is not None and (v < 0.55 * zmin or v > 0.55 * zmax)
            tc.append("#ffffff" if dark else "#1f2328")
    fig.add_trace(go.Scatter(x=tx, y=ty, text=tt, mode="text", textfont=dict(color=tc, size=13),
                             hoverinfo="skip", showlegend=False))
    fig.update_yaxes(autorange="reversed", title_text=esc(m.row_title), type="category")
    fig.update_xaxes(side="top", title_text=esc(m.column_title), type="category", tickangle=0,
                     tickvals=xs, ticktext=[x.replace(" · ", "<br>") for x in xs])
    per_row = 38 if len(m.rows) <= 16 else 28
    fig.update_layout(height=height or max(260, 110 + per_row * len(m.rows)), margin=dict(t=90, l=10, r=10, b=20),
                      plot_bgcolor="#ffffff", showlegend=False)
    return fig


LEGEND_HTML = (
    "<p class=\"sub\">Colour: headroom = capacity - device total (reserved + CUDA context), on a scale "
    "centred at 0 GiB: <span style=\"color:#a40e26;font-weight:600\">red</span> does not fit (OOM), "
    "<span style=\"color:#1a7f37;font-weight:600\">green</span> fits, "
    "<span style=\"color:#b07d00;font-weight:600\">amber</span> fits by less than the estimate may miss "
    "(tight) or only by flushing the allocator's cache (flush). Hover a cell for its numbers "
    "(GiB = 2<sup>30</sup> bytes).</p>")
