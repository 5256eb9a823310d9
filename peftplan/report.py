"""Comparisons of methods x models x GPUs x sequence lengths: a self-contained HTML report, flat rows
for CSV/JSON, and a rich table for the terminal.

plotly and pandas are imported only inside the functions that need them (the `report` extra);
the rest of peftplan never imports them. The HTML file inlines plotly.js (`include_plotlyjs=True`),
so it opens offline, and every string that came from the user (model names and paths, method
options, GPU names, the title) is HTML-escaped before it reaches the page or a chart.
GiB = 2**30 bytes throughout.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .arch import ModelArch
from .catalog import GPU, load_gpu, load_model
from .display import COMPONENT_LABELS as DISPLAY_LABELS
from .estimate import Estimate, estimate
from .methods import MethodError
from .training import Training
from .units import BYTES_PER_GIB, fmt_count, fmt_gib

COMPONENT_LABELS = {
    **DISPLAY_LABELS,  # the estimate table's names, plus the two device-level terms the report stacks
    "reserved_overhead": "allocator reserve (estimate)",
    "cuda_context": "CUDA context",
}
COMPONENT_ORDER = tuple(COMPONENT_LABELS)


@dataclass(frozen=True)
class Skipped:
    """A combination that cannot be estimated (e.g. BitFit on a model without biases), and why."""

    model: str
    method: str
    gpu: str
    seq_len: int
    reason: str


@dataclass
class Comparison:
    estimates: list[Estimate]
    skipped: list[Skipped]
    training: Training
    title: str = "peftplan comparison"
    notes: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return _unique(e.model for e in self.estimates)

    @property
    def methods(self) -> list[str]:
        return _unique(e.method for e in self.estimates)

    @property
    def gpus(self) -> list[str]:
        return _unique(e.gpu for e in self.estimates)

    @property
    def seqs(self) -> list[int]:
        return sorted({e.training.seq_len for e in self.estimates})


def _unique(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def compare(models: Sequence[str | ModelArch], methods: Sequence[str], gpus: Sequence[str | GPU],
            seqs: Sequence[int] | None = None, training: Training | None = None,
            options_by_method: Mapping[str, Mapping[str, Any]] | None = None, title: str | None = None) -> Comparison:
    """Estimate every model x method x GPU x sequence length.

    Combinations whose method cannot apply (MethodError, e.g. BitFit on a model without biases)
    are kept in `skipped` with the reason. A GPU without bf16 (T4, V100) runs a bf16 precision as
    the fp16 one, as the CLI does; the comparison notes it.
    """
    base = training or Training()
    archs = [load_model(m) if isinstance(m, str) else m for m in models]
    devices = [load_gpu(g) if isinstance(g, str) else g for g in gpus]
    seq_list = list(seqs) if seqs else [base.seq_len]
    options = {k: dict(v) for k, v in (options_by_method or {}).items()}
    estimates: list[Estimate] = []
    skipped: list[Skipped] = []
    notes: list[str] = []
    for arch in archs:
        for method in methods:
            for gpu in devices:
                t = base
                if base.precision.startswith("bf16") and not gpu.bf16_supported:
                    t = base.with_(precision=base.precision.replace("bf16", "fp16"))
                    note = f"{gpu.name} has no bf16: {base.precision} runs as {t.precision} there"
                    if note not in notes:
                        notes.append(note)
                for seq in seq_list:
                    try:
                        estimates.append(estimate(arch, method, t.with_(seq_len=seq), gpu, options.get(method)))
                    except MethodError as exc:
                        skipped.append(Skipped(arch.name, method, gpu.name, seq, str(exc).splitlines()[0]))
    if title is None:
        title = f"peftplan: {', '.join(a.name for a in archs)} · {', '.join(methods)} · {', '.join(g.name for g in devices)}"
        if base.trainer != "hf":
            title += f" · trainer {base.trainer}"
    return Comparison(estimates, skipped, base, title, notes)


# ---------------------------------------------------------------------------------------------
# Flat rows (CSV / JSON) and the terminal table
# ---------------------------------------------------------------------------------------------

def _device_components(e: Estimate) -> dict[str, int]:
    """Bytes on the device by component: the allocated peak's breakdown, the allocator's reserve
    estimate and the CUDA context; they add up to `memory.device_total_bytes`."""
    out = {k: int(v) for k, v in e.memory.components.items() if v}
    reserve = e.memory.peak_reserved_bytes - e.memory.peak_allocated_bytes
    if reserve:
        out["reserved_overhead"] = reserve
    out["cuda_context"] = e.memory.cuda_context_bytes
    return out


def to_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """One flat dict per estimate (and per skipped combination, with its reason)."""
    rows: list[dict[str, Any]] = []
    for e in comparison.estimates:
        t = e.training
        row: dict[str, Any] = {
            "model": e.model, "method": e.method, "gpu": e.gpu, "status": "ok", "reason": "",
            "options": json.dumps(e.options, sort_keys=True, default=str),
            "seq_len": t.seq_len, "micro_batch": t.micro_batch, "grad_accum": t.grad_accum,
            "grad_ckpt": t.grad_ckpt, "attention": t.attention, "precision": t.precision,
            "optimizer": t.optimizer, "optimizer_impl": t.optimizer_impl,
            "peak_allocated_bytes": e.memory.peak_allocated_bytes,
            "peak_reserved_bytes": e.memory.peak_reserved_bytes,
            "device_total_bytes": e.memory.device_total_bytes,
            "device_total_gib": e.memory.device_total_bytes / BYTES_PER_GIB,
            "envelope_low_bytes": e.memory.envelope_low_bytes, "envelope_high_bytes": e.memory.envelope_high_bytes,
            "peak_phase": e.memory.peak_phase,
            "gpu_memory_bytes": e.gpu_memory_bytes, "fits": e.fits, "headroom_bytes": e.headroom_bytes,
            "verdict": e.verdict, "trainable_params": e.params.trainable, "total_params": e.params.total,
            "trainable_percent": e.params.trainable_percent,
            "flops_per_step": e.compute.flops_per_step, "step_time_s": e.compute.step_time_s,
            "tokens_per_s": e.compute.tokens_per_s, "matmul_dtype": e.compute.matmul_dtype,
        }
        for k in COMPONENT_ORDER[:9]:
            row[f"mem_{k}_bytes"] = int(e.memory.components.get(k, 0))
        rows.append(row)
    for s in comparison.skipped:
        rows.append({"model": s.model, "method": s.method, "gpu": s.gpu, "seq_len": s.seq_len,
                     "status": "skipped", "reason": s.reason})
    return rows


def to_frame(comparison: Comparison):  # type: ignore[no-untyped-def]
    """`to_rows` as a pandas DataFrame (pandas imported only here)."""
    import pandas as pd

    return pd.DataFrame(to_rows(comparison))


def _verdict_text(e: Estimate):  # type: ignore[no-untyped-def]
    """The fit verdict's short form (report_fit.py), coloured as in the HTML fit matrix."""
    from rich.text import Text

    from .report_fit import estimate_verdict

    v = estimate_verdict(e)
    return Text(v, style={"fits": "green", "tight": "yellow", "flush": "yellow"}.get(v, "red"))


def comparison_table(comparison: Comparison):  # type: ignore[no-untyped-def]
    """A rich Table of the comparison for the terminal (rich imported only here). The model column
    appears only when there are several models (the title names a single one)."""
    from rich.table import Table
    from rich.text import Text

    many_models = len({e.model for e in comparison.estimates} | {s.model for s in comparison.skipped}) > 1
    table = Table(title=Text(comparison.title))  # Text: no rich markup from user strings
    cols = [("model", "left")] if many_models else []
    cols += [("method", "left"), ("gpu", "left"), ("precision", "left"), ("seq", "right"), ("batch", "right"),
             ("device memory", "right"), ("of", "right"), ("verdict", "center"), ("trainable", "right"),
             ("TFLOP/step", "right"), ("step time", "right"), ("tokens/s", "right")]
    for col, just in cols:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for e in comparison.estimates:
        c = e.compute
        table.add_row(
            *([Text(e.model)] if many_models else []), Text(e.method), Text(e.gpu), e.training.precision,
            str(e.training.seq_len), str(e.training.micro_batch),
            fmt_gib(e.memory.device_total_bytes), fmt_gib(e.gpu_memory_bytes),
            _verdict_text(e),
            fmt_count(e.params.trainable), f"{c.flops_per_step / 1e12:,.1f}",
            f"{c.step_time_s:.3f} s" if c.step_time_s is not None else "-",
            f"{c.tokens_per_s:,.0f}" if c.tokens_per_s is not None else "-",
        )
    for s in comparison.skipped:
        table.add_row(*([Text(s.model)] if many_models else []), Text(s.method), Text(s.gpu), "", str(s.seq_len), "",
                      "-", "-", Text("skipped", style="yellow"), Text(s.reason, overflow="fold"), "", "", "",
                      style="dim")
    return table


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px auto; max-width: 1300px;
       color: #1f2328; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
.sub { color: #57606a; } table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; }
.no { color: #cf222e; font-weight: 600; } .yes { color: #1a7f37; font-weight: 600; }
.tight { color: #9a6700; font-weight: 600; }
.wrap { overflow-x: auto; } td.opt { white-space: normal; min-width: 220px; max-width: 320px; font-size: 0.9em; } ul { line-height: 1.5; } code { background: #f6f8fa; padding: 1px 4px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _memory_bars(est: list[Estimate], many_models: bool, many_seqs: bool, with_seq: bool = True) -> dict[str, Estimate]:
    """Bar label -> estimate: one bar per model, method (and sequence length), shared by the GPUs
    whose estimates give the same memory (it depends on the GPU only through the precision);
    labels are built from user strings and escaped (plotly renders entities as text)."""
    groups: dict[tuple[Any, ...], list[Estimate]] = {}
    for e in est:
        key = (e.model, e.method, e.training.seq_len if with_seq else None)
        groups.setdefault(key, []).append(e)
    bars: dict[str, Estimate] = {}
    for (model, method, seq), items in groups.items():
        base = ([model] if many_models else []) + [method] + ([f"seq {seq}"] if with_seq and many_seqs else [])
        distinct = _unique(tuple(sorted(_device_components(e).items())) for e in items)
        if len(distinct) == 1:
            bars[_e(" · ".join(base))] = items[0]
        else:
            for e in items:
                bars[_e(" · ".join(base + [f"{e.gpu} ({e.training.precision})"]))] = e
    return bars


def _gib(n: int) -> float:
    return n / BYTES_PER_GIB


def write_html(comparison: Comparison, path: str | Path, title: str | None = None) -> Path:
    """Write ONE self-contained HTML file (plotly.js inlined; opens offline) and return its path."""
    import plotly.graph_objects as go

    path = Path(path)
    est = comparison.estimates
    page_title = title if title is not None else comparison.title
    many_models = len({e.model for e in est}) > 1
    many_seqs = len({e.training.seq_len for e in est}) > 1
    gpus: dict[str, int] = {}
    for e in est:
        gpus.setdefault(e.gpu, e.gpu_memory_bytes)
    palette = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#1b7c83"]
    figures: list[tuple[str, str, Any]] = []  # (section id, heading, figure)

    def capacity_lines(fig: Any) -> None:
        for i, (name, cap) in enumerate(gpus.items()):
            fig.add_hline(y=_gib(cap), line_dash="dash", line_color=palette[i % len(palette)],
                          annotation_text=f"{_e(name)}: {_gib(cap):.1f} GiB", annotation_position="top left")

    # 0. the fit matrix: does each method fit on each GPU at each sequence length (report_fit.py)
    if est or comparison.skipped:
        from .report_fit import comparison_fit_matrix, fit_matrix_figure

        figures.append(("fit", "Does it fit? Method x GPU" + (" x sequence length" if many_seqs else ""),
                        fit_matrix_figure(comparison_fit_matrix(comparison))))

    # 1. memory components: one bar per (model, method, seq, precision); GPUs share bars when the
    #    estimates agree (the memory does not depend on the GPU beyond its precision)
    bars = _memory_bars(est, many_models, many_seqs)
    if bars:
        fig = go.Figure()
        comps = _unique(k for e in bars.values() for k in COMPONENT_ORDER if k in _device_components(e))
        for k in comps:
            fig.add_bar(name=COMPONENT_LABELS[k], x=list(bars),
                        y=[_gib(_device_components(e).get(k, 0)) for e in bars.values()],
                        hovertemplate="%{x}<br>" + COMPONENT_LABELS[k] + ": %{y:.2f} GiB<extra></extra>")
        capacity_lines(fig)
        fig.update_layout(barmode="stack", yaxis_title="GiB on the device (2^30 bytes)", legend_title="component",
                          height=560, margin=dict(t=40))
        figures.append(("memory", "Memory at the peak, by component, against each GPU's capacity", fig))

    # 2. device memory vs sequence length per method
    if many_seqs:
        fig = go.Figure()
        series: dict[str, list[Estimate]] = {}
        for seq in sorted({e.training.seq_len for e in est}):
            for name, e in _memory_bars([x for x in est if x.training.seq_len == seq], many_models, False).items():
                series.setdefault(name, []).append(e)
        for name, items in series.items():
            items = sorted(items, key=lambda x: x.training.seq_len)
            fig.add_scatter(name=name, mode="lines+markers", x=[x.training.seq_len for x in items],
                            y=[_gib(x.memory.device_total_bytes) for x in items])
        capacity_lines(fig)
        seq_ticks = sorted({e.training.seq_len for e in est})
        fig.update_xaxes(tickvals=seq_ticks, ticktext=[str(x) for x in seq_ticks])
        fig.update_layout(xaxis_title="sequence length (tokens)", xaxis_type="log",
                          yaxis_title="device memory (GiB)", height=480, margin=dict(t=40))
        figures.append(("seq", "Device memory vs sequence length", fig))

    # 3. compute: FLOPs per step, step time and tokens/s per method and GPU
    if est:
        fig = go.Figure()
        flop_bars: dict[str, Estimate] = {}
        for e in est:
            flop_bars.setdefault(_e(" · ".join(([e.model] if many_models else []) + [e.method]
                                               + ([f"seq {e.training.seq_len}"] if many_seqs else []))), e)
        fig.add_bar(x=list(flop_bars), y=[e.compute.flops_per_step / 1e12 for e in flop_bars.values()],
                    marker_color="#8250df", hovertemplate="%{x}<br>%{y:,.1f} TFLOP per step<extra></extra>")
        fig.update_layout(yaxis_title="TFLOP per optimizer step", height=420, margin=dict(t=40), showlegend=False)
        figures.append(("flops", "FLOPs per optimizer step", fig))

        timed = [e for e in est if e.compute.tokens_per_s is not None]
        if timed:
            from plotly.subplots import make_subplots

            fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                                subplot_titles=("tokens per second (one GPU)", "seconds per optimizer step"))
            for i, g in enumerate(gpus):
                sel = [e for e in timed if e.gpu == g]
                if not sel:
                    continue
                x = [_e(" · ".join(([e.model] if many_models else []) + [e.method]
                                   + ([f"seq {e.training.seq_len}"] if many_seqs else []))) for e in sel]
                color = palette[i % len(palette)]
                fig.add_bar(name=_e(g), x=x, y=[e.compute.tokens_per_s for e in sel], marker_color=color,
                            legendgroup=_e(g), hovertemplate="%{x}<br>%{y:,.0f} tokens/s<extra>" + _e(g) + "</extra>",
                            row=1, col=1)
                fig.add_bar(name=_e(g), x=x, y=[e.compute.step_time_s for e in sel], marker_color=color,
                            legendgroup=_e(g), showlegend=False,
                            hovertemplate="%{x}<br>%{y:.3f} s per step<extra>" + _e(g) + "</extra>", row=1, col=2)
            fig.update_layout(barmode="group", legend_title="GPU", height=460, margin=dict(t=60))
            figures.append(("speed", "Throughput and step time per method and GPU", fig))

    # 4. trainable parameters (log scale)
    if est:
        fig = go.Figure()
        pbars: dict[str, Estimate] = {}
        for e in est:
            pbars.setdefault(_e(" · ".join(([e.model] if many_models else []) + [e.method])), e)
        fig.add_bar(x=list(pbars), y=[max(e.params.trainable, 1) for e in pbars.values()],
                    text=[f"{fmt_count(e.params.trainable)} ({e.params.trainable_percent:.3g}%)" for e in pbars.values()],
                    textposition="outside", marker_color="#1a7f37",
                    hovertemplate="%{x}<br>%{y:,} trainable<extra></extra>")
        fig.update_layout(yaxis_type="log", yaxis_title="trainable parameters (log scale)", height=440,
                          margin=dict(t=40), showlegend=False)
        figures.append(("params", "Trainable parameters", fig))

    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(page_title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(page_title)}</h1>",
        f"<p class=\"sub\">{len(est)} estimates, {len(comparison.skipped)} skipped · models: "
        f"{_e(', '.join(comparison.models) or '-')} · methods: {_e(', '.join(comparison.methods) or '-')} · "
        f"GPUs: {_e(', '.join(comparison.gpus) or '-')} · GiB = 2<sup>30</sup> bytes</p>",
    ]
    if not est:
        parts.append("<p><b>Nothing could be estimated.</b></p>")
    first = True
    for sid, heading, fig in figures:
        parts.append(f"<h2 id=\"{sid}\">{_e(heading)}</h2>")
        if sid == "fit":
            from .report_fit import LEGEND_HTML

            parts.append(LEGEND_HTML)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False,
                                 config={"displaylogo": False, "responsive": True}))
        first = False
    parts.append("<h2 id=\"table\">Every number</h2>")
    parts.append(_table_html(comparison))
    if comparison.skipped:
        parts.append("<h2 id=\"skipped\">Skipped combinations</h2><ul>")
        for s in comparison.skipped:
            parts.append(f"<li><b>{_e(s.method)}</b> on {_e(s.model)} ({_e(s.gpu)}, seq {s.seq_len}): {_e(s.reason)}</li>")
        parts.append("</ul>")
    parts.append("<h2 id=\"assumptions\">Assumptions and training settings</h2>")
    parts.append(_assumptions_html(comparison))
    parts.append("<p class=\"sub\">Generated by peftplan. The estimate is symbolic: no GPU was used.</p>")
    parts.append("</body></html>")
    text = "\n".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


_VERDICT_CLASS = {"fits": "yes", "tight": "tight", "flush": "tight", "OOM": "no"}


def _table_html(comparison: Comparison) -> str:
    from .labels import option_label
    from .report_fit import estimate_verdict

    cols = [("model", "l"), ("method", "l"), ("options", "l"), ("gpu", "l"), ("seq", ""), ("batch", ""),
            ("precision", "l"), ("verdict", "l"), ("device GiB", ""), ("capacity GiB", ""), ("headroom GiB", ""),
            ("allocated GiB", ""), ("peak phase", "l")]
    cols += [(f"{COMPONENT_LABELS[k]} GiB", "") for k in COMPONENT_ORDER[:9]]
    cols += [("trainable", ""), ("total params", ""), ("trainable %", ""), ("TFLOP/step", ""),
             ("step time s", ""), ("tokens/s", "")]
    out = ["<div class=\"wrap\"><table><thead><tr>"]
    out += [f"<th class=\"{c}\">{_e(name)}</th>" for name, c in cols]
    out.append("</tr></thead><tbody>")
    for e in comparison.estimates:
        m, c, t = e.memory, e.compute, e.training
        cells = [
            (e.model, "l"), (e.method, "l"), (option_label(e.method, e.options) or "-", "l opt"), (e.gpu, "l"),
            (t.seq_len, ""), (t.micro_batch, ""), (t.precision, "l"),
            (estimate_verdict(e), "l " + _VERDICT_CLASS[estimate_verdict(e)]),
            (f"{_gib(m.device_total_bytes):.2f}", ""), (f"{_gib(e.gpu_memory_bytes):.2f}", ""),
            (f"{_gib(e.headroom_bytes):.2f}", ""), (f"{_gib(m.peak_allocated_bytes):.2f}", ""), (m.peak_phase, "l"),
        ]
        cells += [(f"{_gib(m.components.get(k, 0)):.3f}", "") for k in COMPONENT_ORDER[:9]]
        cells += [(f"{e.params.trainable:,}", ""), (f"{e.params.total:,}", ""),
                  (f"{e.params.trainable_percent:.4f}", ""), (f"{c.flops_per_step / 1e12:,.2f}", ""),
                  (f"{c.step_time_s:.4f}" if c.step_time_s is not None else "-", ""),
                  (f"{c.tokens_per_s:,.0f}" if c.tokens_per_s is not None else "-", "")]
        out.append("<tr>" + "".join(f"<td class=\"{cls}\">{_e(v)}</td>" for v, cls in cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _assumptions_html(comparison: Comparison) -> str:
    t = comparison.training
    settings = {k: v for k, v in asdict(t).items() if k != "seq_len"}
    settings["seq_len"] = ", ".join(str(s) for s in comparison.seqs) or t.seq_len
    out = ["<p>Training settings (shared by every estimate):</p><ul>"]
    out += [f"<li><code>{_e(k)}</code> = {_e(v)}</li>" for k, v in settings.items()]
    out.append("</ul>")
    opts = _unique((e.method, json.dumps(e.options, sort_keys=True, default=str)) for e in comparison.estimates)
    if opts:
        out.append("<p>Method options:</p><ul>")
        from .labels import option_label

        out += [f"<li><b>{_e(m)}</b> {_e(option_label(m, json.loads(o)))}: <code>{_e(o)}</code></li>"
                for m, o in opts]
        out.append("</ul>")
    notes = list(comparison.notes)
    notes += _unique(a for e in comparison.estimates for a in e.assumptions)
    eff = _unique(f"{e.method} on {e.model}: gradient checkpointing forced on" for e in comparison.estimates
                  if e.training.grad_ckpt and not t.grad_ckpt)
    notes += eff
    if notes:
        out.append("<p>Assumptions:</p><ul>")
        out += [f"<li>{_e(n)}</li>" for n in notes]
        out.append("</ul>")
    return "".join(out)
