"""`peftplan check`: the validation gate over measured records (logic in check.py).

Exit codes: 0 all consistent, 1 any violation (a known deviation marked xfail is not one; a marked
record that no longer deviates is), 2 bad input (a record that cannot be read or re-predicted).
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from .common import _fail, _guard


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}%"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:,.3f}"


def _print(result) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    bad = [f for f in result.findings if f.status != "ok"]
    if bad:
        table = Table(title="violations and known deviations", show_lines=True)
        for col in ("status", "record", "measured GiB", "engine GiB", "envelope GiB", "error", "what",
                    "biggest component diff"):
            table.add_column(col, overflow="fold")
        for f in sorted(bad, key=lambda f: (f.status, f.path)):
            comp = f.biggest_component_diff()
            style = {"violation": "red", "xpass": "magenta", "known-deviation": "yellow"}[f.status]
            what = "; ".join(f.violations) or "passes: remove its xfail mark"
            if f.xfail:
                what += f"\n[dim]known: {f.xfail}[/dim]"
            table.add_row(f"[{style}]{f.status}[/{style}]", f"{f.label}\n[dim]{f.path}[/dim]", _gib(f.measured_bytes),
                          _gib(f.predicted_bytes), f"{_gib(f.envelope_low_bytes)} – {_gib(f.envelope_high_bytes)}",
                          _pct(f.error_pct), what,
                          f"{comp[0]} {comp[1] / 2**20:+,.2f} MiB" if comp else "-")
        console.print(table)
    summary = result.summary()
    for key, title in (("by_method", "per method"), ("by_where", "per kind / GPU")):
        t = Table(title=f"signed error of the engine's peak, {title} ((engine − measured) / measured)")
        for col in ("group", "records", "violations", "known deviations", "median error", "worst error"):
            t.add_column(col, justify="left" if col == "group" else "right")
        for row in summary[key]:
            t.add_row(row["group"], str(row["count"]), str(row["violations"]), str(row["known_deviations"]),
                      _pct(row["median_error_pct"]), _pct(row["worst_error_pct"]))
        console.print(t)
    classes = Table(title="known deviation classes of the differential fuzzer (peftplan/harness/fuzz.py)")
    for col in ("class", "measured", "why"):
        classes.add_column(col, overflow="fold")
    for d in _fuzz_classes():
        classes.add_row(d["name"], d["measured"], d["reason"])
    console.print(classes)
    verdict = "[green]ok[/green]" if result.ok else f"[red]{len(result.violations)} violation(s)[/red]"
    console.print(f"{len(result.findings)} records checked: {verdict}, {len(result.known_deviations)} known "
                  f"deviation(s); CPU traces held to ±{100 * result.tolerance:g}%, GPU profiles to the envelope")


def _fuzz_classes() -> list[dict[str, str]]:
    """The fuzzer's named known-deviation classes (reason and measured size), for the gate's output."""
    from ..harness.fuzz import KNOWN_DEVIATIONS

    return [{"name": d.name, "measured": d.measured, "reason": d.reason} for d in KNOWN_DEVIATIONS]


def check(
    paths: Optional[List[str]] = typer.Argument(None, help="record files or directories (default: profiles/)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    html_path: Optional[str] = typer.Option(None, "--html", help="also write a self-contained plotly report (a bare file name goes under reports/)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --html file"),
) -> None:
    """Re-predict every measured record (CPU traces, GPU profiles) with the engine and compare.

    Parameters must match exactly; a CPU trace's peak must be within 1% of the engine's; a GPU profile's
    max_memory_allocated must lie inside the engine's envelope, and an OOM record must be predicted not to
    fit. Exit 1 on any violation, 2 on a record that cannot be read."""

    def run() -> None:
        import os

        from ..check import check_paths, write_html

        result = check_paths(list(paths or ["profiles"]))
        if html_path is not None:
            target = html_path if os.path.dirname(html_path) else os.path.join("reports", html_path)
            try:
                write_html(result, target, force=force)
            except ImportError as exc:
                _fail(f"--html needs the report extra (pip install 'peftplan[report]'): {exc}")
        if as_json:
            print(json.dumps({**result.to_dict(), "fuzz_known_deviation_classes": _fuzz_classes()}, indent=2,
                             default=str))
        else:
            _print(result)
            if html_path is not None:
                from rich.console import Console

                Console(stderr=True).print(f"wrote {target}")
        if not result.ok:
            raise typer.Exit(code=1)

    _guard(run)
