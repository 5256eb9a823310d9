"""`plan --html`: the plan as ONE self-contained HTML file, the same kind of report as `compare --html`.

1. The fit matrix (report_fit.py): every searched method variant x micro-batch, coloured by headroom,
   the verdict in the cell, hover for the numbers. A cell shows the best-ranked configuration of that
   variant and micro-batch that fits (over checkpointing, attention, optimizer), else the one closest
   to fitting; the last column the largest micro-batch beyond the grid that fits, where there is one.
2. The quality-vs-speed front with the fit boundary (plotly, imported only here; plotly.js inlined so
   the file opens offline), two panels sharing the tokens/s axis: every searched configuration at its
   tokens/s against its quality prior (filled: fits, hollow: does not), the Pareto front of what fits
   and the front the search would reach without the memory limit; below, the same configurations'
   device memory against the GPU's capacity, the fit boundary, with what lies above it shaded.
3. The ranked table with readable labels, the explanation, the notes and what was skipped.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from ..report_fit import LEGEND_HTML, FitCell, FitMatrix, fit_matrix_figure, verdict_short
from ..units import BYTES_PER_GIB
from .ranking import quality_of
from .space import TARGETS, PlanResult, PlanRow

# distinct hues for up to 11 methods (d3's category10, then black)
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#000000"]
LOWER_BOUND_NOTE = ("device total is a lower bound here (allocated + CUDA context): the planner's fast path does "
                    "not replay the caching allocator; the listed rows are re-estimated with it")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _quality(r: PlanRow) -> float | None:
    return r.quality if r.quality is not None else quality_of(r.config.variant)


def quality_speed_front(rows: list[PlanRow], fitting_only: bool = True) -> list[PlanRow]:
    """The rows no other row beats on both quality prior and tokens/s, fastest first: among those that
    fit (default), or among every row given (`fitting_only=False`: the front without the memory limit)."""
    known = [r for r in rows if (r.fits or not fitting_only) and r.tokens_per_s and _quality(r) is not None]
    front: list[PlanRow] = []
    best_q = None
    for r in sorted(known, key=lambda r: (-(r.tokens_per_s or 0), -(_quality(r) or 0))):
        q = _quality(r)
        if best_q is None or (q or 0) > best_q:
            front.append(r)
            best_q = q
    return front


def row_verdict(r: PlanRow) -> str:
    """report_fit.verdict_short of a plan row ("tight" only where estimate() gave the envelope)."""
    return verdict_short(r.fits, r.headroom_bytes, r.envelope_bytes)


def _cell(r: PlanRow, rank: int | None, text: str = "") -> FitCell:
    c = r.config
    where = f"#{rank} of the ranking" if rank is not None else "closest to fitting"
    detail = (f"{where}: batch {c.micro_batch}" + (f" x{c.grad_accum} accum" if c.grad_accum > 1 else "")
              + f", ckpt {'on' if c.grad_ckpt else 'off'}, {c.attention}, {c.optimizer}"
              + (f", {c.n_gpus} GPUs {c.shard}" if c.sharded else "")
              + (f", {r.tokens_per_s:,.0f} tokens/s" if r.tokens_per_s else ""))
    return FitCell(row_verdict(r), r.headroom_bytes, r.peak_allocated_bytes, r.peak_reserved_bytes,
                   r.device_total_bytes, r.gpu_memory_bytes, detail,
                   note=LOWER_BOUND_NOTE if r.path != "direct" else "", text=text)


def plan_fit_matrix(result: PlanResult) -> FitMatrix:
    """Rows: the method variants searched (labels.py labels); columns: the micro-batches of the grid (those
    every variant was evaluated at) and "largest that fits" (beyond the grid). A cell: the best-ranked
    fitting configuration of that variant and micro-batch, else the closest miss (least device memory)."""
    rank = {id(r): i for i, r in enumerate(result.rows, 1)}
    every = list(result.rows) + list(result.closest)
    variants: list[str] = []
    batches: dict[str, set[int]] = {}
    for r in every:
        v = r.config.variant.label
        if v not in variants:
            variants.append(v)
        batches.setdefault(v, set()).add(r.config.micro_batch)
    grid = sorted(set.intersection(*batches.values())) if batches else []
    # methods in the order their best row ranks; within one, by target set, rank, then the label
    method_order = list(dict.fromkeys(r.config.variant.method for r in every))
    by_label = {r.config.variant.label: r.config.variant for r in every}

    def order(label: str) -> tuple[Any, ...]:
        v = by_label[label]
        t = v.opts().get("targets")
        return (method_order.index(v.method), TARGETS.index(t) if t in TARGETS else len(TARGETS), v.rank or 0, label)

    variants.sort(key=order)
    columns = [f"batch {b}" for b in grid]
    m = FitMatrix(variants, columns, row_title="method and options", column_title="micro-batch per GPU")
    best: dict[tuple[str, int], PlanRow] = {}
    for r in every:
        key = (r.config.variant.label, r.config.micro_batch)
        old = best.get(key)
        if old is None or _better(r, old, rank):
            best[key] = r
    for (v, b), r in best.items():
        if b in grid:
            m.cells[(v, f"batch {b}")] = _cell(r, rank.get(id(r)))
    beyond = [r for r in result.rows if r.config.micro_batch > max(grid, default=0)]
    if beyond:
        column = "largest that fits"
        m.columns.append(column)
        for v in variants:
            mine = [r for r in beyond if r.config.variant.label == v]
            if mine:
                top = max(r.config.micro_batch for r in mine)
                r = min((x for x in mine if x.config.micro_batch == top), key=lambda x: rank[id(x)])
                m.cells[(v, column)] = _cell(r, rank[id(r)], text=f"{row_verdict(r)} b{top}")
            elif grid and (v, f"batch {grid[-1]}") in m.cells:
                m.cells[(v, column)] = FitCell("n/a", detail=f"no micro-batch above {grid[-1]} fits, or the "
                                               "search beyond the grid does not run for this setting")
    return m


def _better(a: PlanRow, b: PlanRow, rank: dict[int, int]) -> bool:
    """a before b in a cell: a ranked fitting row before any other, then the better rank, then less memory."""
    ra, rb = rank.get(id(a)), rank.get(id(b))
    if ra is not None or rb is not None:
        return rb is None or (ra is not None and ra < rb)
    return a.device_total_bytes < b.device_total_bytes


def front_figure(result: PlanResult):  # type: ignore[no-untyped-def]
    """Quality vs speed (top) and device memory vs speed with the capacity as the fit boundary (bottom)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    every = list(result.rows) + list(result.closest)
    methods = sorted({r.config.variant.method for r in every})
    color = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}
    cap = result.gpu.memory_bytes / BYTES_PER_GIB

    def hover(r: PlanRow) -> str:
        q = _quality(r)
        return _e(f"{r.config.label} | {r.device_total_bytes / BYTES_PER_GIB:.2f} GiB of {cap:.2f} | "
                  f"headroom {r.headroom_bytes / BYTES_PER_GIB:+.2f} GiB: {row_verdict(r)} | "
                  f"{(r.tokens_per_s or 0):,.0f} tokens/s | quality prior {'?' if q is None else f'{q:.3f}'}")

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.55, 0.45],
                        subplot_titles=("quality prior vs tokens/s: the front of what fits",
                                        "device memory vs tokens/s: the fit boundary"))
    for m in methods:
        for fits in (True, False):
            pts = [r for r in every if r.config.variant.method == m and r.fits == fits and r.tokens_per_s]
            if not pts:
                continue
            marker = dict(color=color[m], size=8, symbol="circle" if fits else "circle-open")
            name = _e(m + ("" if fits else " (does not fit)"))
            text = [hover(r) for r in pts]
            fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in pts], y=[_quality(r) for r in pts], mode="markers",
                                     name=name, marker=marker, text=text, hoverinfo="text", legendgroup=name),
                          row=1, col=1)
            fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in pts],
                                     y=[r.device_total_bytes / BYTES_PER_GIB for r in pts], mode="markers",
                                     name=name, marker=marker, text=text, hoverinfo="text", legendgroup=name,
                                     showlegend=False), row=2, col=1)
    unlimited = quality_speed_front(every, fitting_only=False)
    if unlimited:
        fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in unlimited], y=[_quality(r) for r in unlimited],
                                 mode="lines", name="front without the memory limit", hoverinfo="skip",
                                 line=dict(color="#8c959f", dash="dash", shape="hv")), row=1, col=1)
    front = quality_speed_front(result.rows)
    if front:
        fig.add_trace(go.Scatter(x=[r.tokens_per_s for r in front], y=[_quality(r) for r in front],
                                 mode="lines+markers", name="front of what fits", hoverinfo="skip",
                                 marker=dict(color="#24292f", size=12, symbol="star"),
                                 line=dict(color="#24292f", width=2, shape="hv")), row=1, col=1)
    # log scale: a 24 GiB boundary stays visible beside a 400 GiB full fine-tuning
    low = min([r.device_total_bytes / BYTES_PER_GIB for r in every] + [cap]) / 1.2
    top = max([r.device_total_bytes / BYTES_PER_GIB for r in every] + [cap]) * 1.2
    fig.add_hrect(y0=cap, y1=top, fillcolor="#cf222e", opacity=0.08, line_width=0, row=2, col=1)  # type: ignore[arg-type]
    fig.add_hline(y=cap, line=dict(color="#cf222e", dash="dash"), row=2, col=1)  # type: ignore[arg-type]
    # placed by hand: add_hline's own annotation lands at 10**cap on a log axis
    fig.add_annotation(x=0.0, xref="x2 domain", xanchor="left", y=math.log10(cap), yref="y2", yanchor="bottom",
                       text=_e(f"{result.gpu.name} capacity {cap:.2f} GiB: fit boundary (above: does not fit)"),
                       showarrow=False, font=dict(color="#cf222e"), bgcolor="rgba(255,255,255,0.7)")
    fig.update_yaxes(title_text="quality prior (GSM8K accuracy)", row=1, col=1)
    fig.update_yaxes(title_text="device memory (GiB = 2^30 B, log)", type="log",
                     range=[math.log10(low), math.log10(top)], row=2, col=1)
    fig.update_xaxes(title_text="tokens/s (roofline step time)", row=2, col=1)
    fig.update_layout(height=860, margin=dict(t=40), legend=dict(groupclick="togglegroup"))
    return fig


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px auto; max-width: 1300px;
       color: #1f2328; padding: 0 16px; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7de; }
.sub { color: #57606a; } table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; } .wrap { overflow-x: auto; }
.no { color: #cf222e; font-weight: 600; } .yes { color: #1a7f37; font-weight: 600; }
.tight { color: #9a6700; font-weight: 600; } code { background: #f6f8fa; padding: 1px 4px; font-size: 0.95em; }
"""
_VERDICT_CLASS = {"fits": "yes", "tight": "tight", "flush": "tight", "OOM": "no"}


def _table(result: PlanResult, limit: int = 200) -> str:
    fits = bool(result.rows)
    rows = result.rows if fits else result.closest
    cols = [("#", ""), ("method and options", "l"), ("batch", ""), ("ckpt", "l"), ("attention", "l"),
            ("optimizer", "l"), ("device GiB", ""), ("headroom GiB", ""), ("verdict", "l"), ("tokens/s", ""),
            ("quality prior", ""), ("trainable", ""), ("estimate flags", "l")]
    if result.tokens is not None:
        cols[10:10] = [("train time h", ""), ("cost USD", "")]
    out = ["<div class=\"wrap\"><table><thead><tr>"]
    out += [f"<th class=\"{c}\">{_e(n)}</th>" for n, c in cols]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows[:limit], 1):
        c, v = r.config, row_verdict(r)
        q = _quality(r)
        cells = [(("=" if fits and r.tie and i > 1 else "") + str(i), ""), (c.variant.label, "l"),
                 (str(c.micro_batch) + (f" x{c.grad_accum}" if c.grad_accum > 1 else ""), ""),
                 ("on" if c.grad_ckpt else "off", "l"), (c.attention, "l"), (c.optimizer, "l"),
                 (("≥ " if r.path != "direct" else "") + f"{r.device_total_bytes / BYTES_PER_GIB:.2f}", ""),
                 (f"{r.headroom_bytes / BYTES_PER_GIB:+.2f}", ""), (v, "l " + _VERDICT_CLASS[v]),
                 (f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-", ""), ("?" if q is None else f"{q:.3f}", ""),
                 (f"{r.trainable_params:,}", ""), (f"<code>{_e(c.flags())}</code>", "l raw")]
        if result.tokens is not None:
            cells[10:10] = [(f"{r.train_time_s / 3600:,.1f}" if r.train_time_s else "-", ""),
                            (f"{r.train_cost_usd:,.2f}" if r.train_cost_usd is not None else "-", "")]
        out.append("<tr>" + "".join(f"<td class=\"{cls.replace(' raw', '')}\">{val if cls.endswith('raw') else _e(val)}"
                                    "</td>" for val, cls in cells) + "</tr>")
    out.append("</tbody></table></div>")
    if len(rows) > limit:
        out.append(f"<p class=\"sub\">{len(rows) - limit} more rows in <code>peftplan plan --all --json</code>.</p>")
    return "".join(out)


def write_plan_html(result: PlanResult, path: str | Path) -> Path:
    """Write the report and return its path."""
    path = Path(path)
    title = (f"{result.model} on {result.gpu.name}" + (f" x{result.n_gpus}" if result.n_gpus > 1 else "")
             + f", seq {result.seq_len}, trainer {result.trainer}: {len(result.rows)} configurations fit, "
             f"ranked by {result.objective}")
    every = list(result.rows) + list(result.closest)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{_e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p class=\"sub\">{len(every)} configurations searched · {result.precision} · capacity "
             f"{result.gpu.memory_bytes / BYTES_PER_GIB:.2f} GiB · GiB = 2<sup>30</sup> bytes</p>",
             f"<p>{_e(result.explanation)}</p>"]
    first = True
    if every:
        parts += ["<h2 id=\"fit\">Does it fit? Method x micro-batch</h2>", LEGEND_HTML,
                  "<p class=\"sub\">A cell: the best-ranked configuration of that method and micro-batch that fits "
                  "(over checkpointing, attention and optimizer), else the one closest to fitting. "
                  + _e(LOWER_BOUND_NOTE[0].upper() + LOWER_BOUND_NOTE[1:]) + " (marked ≥ in the table).</p>",
                  fit_matrix_figure(plan_fit_matrix(result)).to_html(full_html=False, include_plotlyjs=True,
                                                                    config={"displaylogo": False})]
        first = False
        parts += ["<h2 id=\"front\">Quality vs speed: the front and the fit boundary</h2>",
                  "<p class=\"sub\">Filled: fits; hollow: does not. The dashed line is the front the search would "
                  "reach with unlimited memory: where it leaves the front of what fits, memory is what costs quality "
                  "or speed. Quality priors and their sources: peftplan/data/quality_prior.json.</p>",
                  front_figure(result).to_html(full_html=False, include_plotlyjs=first, config={"displaylogo": False})]
    else:
        parts.append("<p><b>Nothing could be estimated.</b></p>")
    parts.append("<h2 id=\"table\">" + ("Ranked configurations" if result.rows else
                                        "Nothing fits: the closest configurations") + "</h2>")
    parts.append(_table(result))
    if result.suggestion:
        parts.append(f"<p>{_e(result.suggestion)}</p>")
    if result.skipped:
        parts.append("<h2 id=\"skipped\">Not searched</h2><ul>")
        parts += [f"<li><b>{_e(w)}</b>: {_e(y)}</li>" for w, y in result.skipped]
        parts.append("</ul>")
    for n in result.notes:
        parts.append(f"<p class=\"sub\">note: {_e(n)}</p>")
    parts.append("<p class=\"sub\">Generated by peftplan plan. The estimate is symbolic: no GPU was used. Quality "
                 "priors and roofline constants with their sources: peftplan/data/quality_prior.json, "
                 "peftplan/data/roofline.json.</p></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
