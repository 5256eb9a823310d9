"""The validation gate: re-predict every measured record with the engine and compare.

For each record (records.py) the architecture is rebuilt from the record's own config.json, the
Training from its training dict, the method options from its options; `estimate()` re-predicts it
and the result is compared with what was measured:

- parameters (total, trainable): exactly, every record.
- cpu-trace: the engine's peak within `cpu_trace_tolerance` (1%, data/overheads.json) of the traced
  peak. A CPU trace sees exactly the tensors the engine models (same 512-byte rounding, no GPU-only
  allocations), so its envelope is +-1%, not the GPU envelope.
- gpu-profile, outcome ok: the measured `max_memory_allocated` inside [envelope_low, envelope_high]
  (engine/envelope.py: the GPU-only terms the engine knows it does not model).
  Reserved (`max_memory_reserved`), where measured: the predicted reserved is the step's timeline
  replayed through the CUDA caching allocator (engine/allocator.py) under the record's
  PYTORCH_CUDA_ALLOC_CONF (its `training.alloc_conf`, else `env.PYTORCH_CUDA_ALLOC_CONF`); an
  error beyond `reserved_tolerance` (3%, data/overheads.json) is a violation, since reserved is
  what the fit verdict (fit.py) relies on.
  Step time, where measured: the signed error of the roofline step time (engine/roofline.py) is
  reported with whether it is inside the 15% target (data/roofline.json `step_time_tolerance`);
  never a violation while the roofline's constants are not fitted to any GPU profile.
- gpu-profile, outcome oom: consistent when the predicted envelope low exceeds the record's
  `memory.capacity_bytes` (the run could not have fit); otherwise a violation.

A record may carry `"xfail": "<reason>"` (a known engine deviation, marked in harness/matrix.py):
its violations are listed as known deviations and do not fail the gate; a marked record that passes
is a violation ("remove the xfail mark"), so marks cannot outlive the bug.

Signed error = (predicted - measured) / measured x 100 (positive: the engine over-predicts).
No torch here; pandas and plotly only in `write_html`.
"""

from __future__ import annotations

import html
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .records import Record, RecordError, iter_record_paths, load_record

CPU_TRACE_GPU = "a100-80g"  # any GPU: a CPU trace's comparison does not depend on capacity


class CheckError(ValueError):
    """A record that cannot be re-predicted (names the file and the field)."""


@dataclass
class Finding:
    path: str
    kind: str
    label: str
    model: str
    method: str
    where: str  # "cpu" or the GPU name
    outcome: str
    measured_bytes: int | None
    predicted_bytes: int
    envelope_low_bytes: int
    envelope_high_bytes: int
    error_pct: float | None
    params_measured: tuple[int, int] | None
    params_predicted: tuple[int, int]
    reserved_measured_bytes: int | None = None
    reserved_predicted_bytes: int | None = None
    reserved_high_bytes: int | None = None
    reserved_error_pct: float | None = None
    step_time_measured_s: float | None = None
    step_time_predicted_s: float | None = None
    step_time_error_pct: float | None = None
    step_time_within_target: bool | None = None  # |error| <= data/roofline.json step_time_tolerance
    capacity_bytes: int | None = None
    component_diffs: dict[str, int] = field(default_factory=dict)  # predicted - measured, by category
    violations: list[str] = field(default_factory=list)
    xfail: str | None = None

    @property
    def status(self) -> str:
        if self.xfail:
            return "known-deviation" if self.violations else "xpass"
        return "violation" if self.violations else "ok"

    @property
    def failing(self) -> bool:
        return self.status in ("violation", "xpass")

    def biggest_component_diff(self) -> tuple[str, int] | None:
        if not self.component_diffs:
            return None
        k = max(self.component_diffs, key=lambda c: abs(self.component_diffs[c]))
        return k, self.component_diffs[k]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        return d


@dataclass
class CheckResult:
    findings: list[Finding]
    tolerance: float

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if f.failing]

    @property
    def known_deviations(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "known-deviation"]

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> dict[str, list[dict[str, Any]]]:
        return {"by_method": summarize(self.findings, lambda f: f.method),
                "by_where": summarize(self.findings, lambda f: f"{f.kind}:{f.where}")}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": len(self.findings), "violations": len(self.violations),
                "known_deviations": len(self.known_deviations), "cpu_trace_tolerance": self.tolerance,
                "summary": self.summary(), "findings": [f.to_dict() for f in self.findings]}


def _signed(pred: float, meas: float) -> float | None:
    return 100.0 * (pred - meas) / meas if meas else None


def summarize(findings: Iterable[Finding], key) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Per group: count, violations, median and worst (largest |error|, with its sign) signed error %."""
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(key(f), []).append(f)
    rows = []
    for name in sorted(groups):
        fs = groups[name]
        errs = [f.error_pct for f in fs if f.error_pct is not None]
        rows.append({
            "group": name, "count": len(fs), "violations": sum(f.failing for f in fs),
            "known_deviations": sum(f.status == "known-deviation" for f in fs),
            "median_error_pct": statistics.median(errs) if errs else None,
            "worst_error_pct": max(errs, key=abs) if errs else None,
        })
    return rows


def _training(rec: Record):  # type: ignore[no-untyped-def]
    from .training import Training

    known = set(Training.__dataclass_fields__)
    fields = dict(rec.training)
    env = rec.raw.get("env") if isinstance(rec.raw.get("env"), dict) else {}
    if not fields.get("alloc_conf") and env.get("PYTORCH_CUDA_ALLOC_CONF"):
        fields["alloc_conf"] = str(env["PYTORCH_CUDA_ALLOC_CONF"])
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckError(f"{rec.path}: field 'training.{unknown[0]}' is not a Training field")
    try:
        return Training(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckError(f"{rec.path}: field 'training': {exc}") from None


def _gpu(rec: Record):  # type: ignore[no-untyped-def]
    from .catalog import custom_gpu, load_gpu

    if rec.kind == "cpu-trace":
        return load_gpu(CPU_TRACE_GPU)
    if rec.gpu_catalog_name:
        try:
            g = load_gpu(rec.gpu_catalog_name)
        except ValueError as exc:
            raise CheckError(f"{rec.path}: field 'gpu.catalog_name': {exc}") from None
        if rec.capacity_bytes and rec.capacity_bytes != g.memory_bytes:
            g = custom_gpu(rec.capacity_bytes, g)
        return g
    return custom_gpu(rec.capacity_bytes or 0)


def check_record(rec: Record, tolerance: float) -> Finding:
    """Re-predict one record and compare (see the module docstring)."""
    from .arch import from_hf_config
    from .estimate import estimate, overheads

    try:
        arch = from_hf_config(dict(rec.config), rec.model_name)
    except ValueError as exc:
        raise CheckError(f"{rec.path}: field 'model.config': {exc}") from None
    training = _training(rec)
    gpu = _gpu(rec)
    try:
        est = estimate(arch, rec.method, training, gpu, dict(rec.options))
    except ValueError as exc:
        raise CheckError(f"{rec.path}: cannot re-predict ({rec.method}, options {dict(rec.options)}): "
                         f"{str(exc).splitlines()[0]}") from None
    m = est.memory
    where = "cpu" if rec.kind == "cpu-trace" else (rec.gpu_name or gpu.name)
    measured = rec.peak_allocated_bytes
    params_meas = (rec.params_total, rec.params_trainable) if rec.params_total is not None else None
    xfail = rec.raw.get("xfail") if isinstance(rec.raw.get("xfail"), str) else None
    f = Finding(
        path=rec.path, kind=rec.kind, label=rec.label, model=rec.model_name, method=rec.method, where=where,
        outcome=rec.outcome, measured_bytes=measured, predicted_bytes=m.peak_allocated_bytes,
        envelope_low_bytes=m.envelope_low_bytes, envelope_high_bytes=m.envelope_high_bytes,
        error_pct=_signed(m.peak_allocated_bytes, measured) if measured else None,
        params_measured=params_meas, params_predicted=(est.params.total, est.params.trainable),
        capacity_bytes=rec.capacity_bytes, xfail=xfail,
    )
    if rec.components:
        f.component_diffs = {k: m.components.get(k, 0) - rec.components.get(k, 0)
                             for k in sorted(set(rec.components) | set(m.components))
                             if m.components.get(k, 0) != rec.components.get(k, 0)}
    if params_meas is not None and params_meas != f.params_predicted:
        f.violations.append(f"params: measured {params_meas[0]:,} total / {params_meas[1]:,} trainable, "
                            f"engine {f.params_predicted[0]:,} / {f.params_predicted[1]:,}")
    if rec.kind == "cpu-trace":
        if measured is not None and f.error_pct is not None and abs(f.error_pct) > 100 * tolerance:
            f.violations.append(f"peak: engine {m.peak_allocated_bytes:,} B vs traced {measured:,} B "
                                f"({f.error_pct:+.3f}%, tolerance ±{100 * tolerance:g}%)")
        return f
    # gpu-profile
    if rec.outcome == "oom":
        if rec.capacity_bytes is not None and m.envelope_low_bytes <= rec.capacity_bytes:
            f.violations.append(f"oom: the run went out of memory but the engine's envelope low "
                                f"{m.envelope_low_bytes:,} B fits in the capacity {rec.capacity_bytes:,} B")
        return f
    if measured is not None and not (m.envelope_low_bytes <= measured <= m.envelope_high_bytes):
        f.violations.append(f"peak: measured {measured:,} B outside the envelope "
                            f"[{m.envelope_low_bytes:,}, {m.envelope_high_bytes:,}] B ({f.error_pct:+.3f}%)")
    if rec.peak_reserved_bytes is not None:
        frac = float(overheads()["reserved_tolerance"]["value"])
        f.reserved_measured_bytes = rec.peak_reserved_bytes
        f.reserved_predicted_bytes = m.peak_reserved_bytes
        f.reserved_high_bytes = int(m.peak_reserved_bytes * (1 + frac))
        f.reserved_error_pct = _signed(m.peak_reserved_bytes, rec.peak_reserved_bytes)
        if f.reserved_error_pct is not None and abs(f.reserved_error_pct) > 100 * frac:
            f.violations.append(f"reserved: measured {rec.peak_reserved_bytes:,} B vs the allocator replay's "
                                f"{m.peak_reserved_bytes:,} B ({f.reserved_error_pct:+.2f}%, tolerance "
                                f"±{100 * frac:g}%)")
    if rec.step_time_s is not None:
        f.step_time_measured_s = rec.step_time_s
        f.step_time_predicted_s = est.compute.step_time_s
        if est.compute.step_time_s is not None:
            f.step_time_error_pct = _signed(est.compute.step_time_s, rec.step_time_s)
            from .engine.roofline import constants

            target = 100 * float(constants()["step_time_tolerance"]["value"])
            f.step_time_within_target = abs(f.step_time_error_pct) <= target
    return f


def check_paths(paths: list[str | os.PathLike[str]], tolerance: float | None = None) -> CheckResult:
    """Load every record under `paths` and check each. RecordError / CheckError on a bad record."""
    from .estimate import overheads

    tol = float(overheads()["cpu_trace_tolerance"]["value"]) if tolerance is None else tolerance
    files = list(iter_record_paths(list(paths)))
    if not files:
        raise RecordError(f"{', '.join(str(p) for p in paths)}: no record files (*.json)")
    findings = [check_record(load_record(p), tol) for p in files]
    return CheckResult(findings, tol)


# ---- HTML ----------------------------------------------------------------------------------------


def write_html(result: CheckResult, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """A self-contained plotly report: predicted vs measured with envelope bars, error by method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    p = Path(path)
    if p.exists() and not force:
        raise RecordError(f"{p}: exists; use --force to overwrite")
    p.parent.mkdir(parents=True, exist_ok=True)
    gib = 2**30
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("predicted vs measured peak allocated (GiB), envelope bars",
                                        "signed error by method (%)"))
    colors = {"ok": "#2a9d8f", "violation": "#e63946", "known-deviation": "#f4a261", "xpass": "#9b5de5"}
    for status, color in colors.items():
        fs = [f for f in result.findings if f.status == status and f.measured_bytes]
        if not fs:
            continue
        fig.add_trace(go.Scatter(
            x=[f.measured_bytes / gib for f in fs], y=[f.predicted_bytes / gib for f in fs], mode="markers",
            name=status, marker={"color": color, "size": 8},
            error_y={"type": "data", "symmetric": False,
                     "array": [(f.envelope_high_bytes - f.predicted_bytes) / gib for f in fs],
                     "arrayminus": [(f.predicted_bytes - f.envelope_low_bytes) / gib for f in fs]},
            hovertext=[html.escape(f"{f.label} [{f.kind}] {f.error_pct:+.3f}%" if f.error_pct is not None
                                   else f.label) for f in fs],
            hoverinfo="text"), row=1, col=1)
    top = max([max(f.measured_bytes or 0, f.envelope_high_bytes) for f in result.findings] + [1]) / gib
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="predicted = measured",
                             line={"dash": "dot", "color": "#888"}), row=1, col=1)
    methods = sorted({f.method for f in result.findings})
    for status, color in colors.items():
        fs = [f for f in result.findings if f.status == status and f.error_pct is not None]
        if not fs:
            continue
        fig.add_trace(go.Scatter(x=[html.escape(f.method) for f in fs], y=[f.error_pct for f in fs], mode="markers",
                                 marker={"color": color, "size": 7}, showlegend=False,
                                 hovertext=[html.escape(f.label) for f in fs], hoverinfo="text+y"), row=1, col=2)
    fig.update_xaxes(type="log", title_text="measured GiB", row=1, col=1)
    fig.update_yaxes(type="log", title_text="predicted GiB", row=1, col=1)
    fig.update_xaxes(categoryorder="array", categoryarray=[html.escape(m) for m in methods], row=1, col=2)
    fig.update_yaxes(title_text="(predicted − measured) / measured, %", row=1, col=2)
    n, v = len(result.findings), len(result.violations)
    fig.update_layout(title=html.escape(f"peftplan check: {n} records, {v} violations, "
                                        f"{len(result.known_deviations)} known deviations"), height=600)
    body = fig.to_html(full_html=False, include_plotlyjs=True)
    rows = "".join(
        f"<tr><td>{html.escape(f.status)}</td><td>{html.escape(f.label)}</td><td>{html.escape(f.kind)}</td>"
        f"<td>{'' if f.error_pct is None else f'{f.error_pct:+.3f}%'}</td>"
        f"<td>{html.escape('; '.join(f.violations) or '')}{html.escape(' — known: ' + f.xfail) if f.xfail else ''}</td>"
        f"<td>{html.escape(os.path.basename(f.path))}</td></tr>"
        for f in result.findings if f.status != "ok")
    table = ("<table border=1 cellpadding=4><tr><th>status</th><th>record</th><th>kind</th><th>error</th>"
             f"<th>what</th><th>file</th></tr>{rows}</table>" if rows else "<p>no violations</p>")
    doc = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>peftplan check</title></head><body>"
           f"<h1>peftplan check</h1>{body}<h2>violations and known deviations</h2>{table}</body></html>")
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, p)
    return p
