"""`peftplan models [FILTER] [--hub]`: the bundled catalog, readable at 80 columns.

Names are never cut (the name column is as wide as the longest name and does not wrap); the other
columns are short numbers. MoE models show their active parameters (total minus the experts a token is
not routed to, arch.ModelArch.active_params). The hub ids, which are long, get their own listing
(`--hub`), two columns wide.
"""

from __future__ import annotations

from typing import Any, Optional

import typer

from .common import _guard


def models(
    filter_text: Optional[str] = typer.Argument(None, metavar="[FILTER]",
                                                help="show only names, hub ids or model_types containing this"),
    hub: bool = typer.Option(False, "--hub", help="list each model's hub id (they resolve offline)"),
) -> None:
    """List the bundled model catalog (MoE: total and active parameters)."""

    def run() -> None:
        from rich.console import Console

        Console().print(models_table(filter_text, hub))

    _guard(run)


def matching(filter_text: str | None) -> list[tuple[str, Any]]:
    """(name, catalog entry) of the models whose name, hub id, alias or model_type contains the filter
    (case-insensitive); all of them without a filter."""
    import json

    from ..catalog import _data_dir, model_index

    out = []
    needle = (filter_text or "").strip().lower()
    for name, entry in sorted(model_index().items()):
        if needle:
            with open(_data_dir() / "models" / entry.file, encoding="utf-8") as fh:
                model_type = str(json.load(fh).get("model_type", ""))
            haystack = [name, entry.hub_id, model_type, *entry.aliases]
            if not any(needle in h.lower() for h in haystack):
                continue
        out.append((name, entry))
    return out


def models_table(filter_text: str | None, hub: bool):  # type: ignore[no-untyped-def]
    """The rich Table for `peftplan models`; ValueError (one line) when the filter matches nothing."""
    from rich import box
    from rich.table import Table

    from ..catalog import load_model, model_index
    from ..suggest import did_you_mean
    from ..units import fmt_count

    rows = matching(filter_text)
    if not rows:
        raise ValueError(f"no catalog model matches {filter_text!r}{did_you_mean(filter_text or '', model_index())}")
    width = max(len(name) for name, _ in rows)
    title = "bundled models" + (f" matching {filter_text!r}" if filter_text else "")
    # columns separated by the box's one-space divider, no padding, no edges: the longest name (28) and the
    # numbers fit 80 columns
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0))
    table.add_column("name", no_wrap=True, min_width=width)
    if hub:
        table.add_column("hub id (resolves offline)", no_wrap=True)
        for name, entry in rows:
            table.add_row(name, entry.hub_id)
        return table
    for col in ("model_type", "params", "active", "L", "D", "H/KV", "vocab"):
        table.add_column(col, justify="left" if col == "model_type" else "right", no_wrap=True)
    for name, _ in rows:
        a = load_model(name)
        moe = any(b.moe is not None for b in a.blocks)
        table.add_row(name, a.model_type, fmt_params(a.total_params), fmt_params(a.active_params) if moe else "",
                      str(a.num_layers), str(a.hidden_size), f"{a.num_heads}/{a.num_kv_heads}", fmt_count(a.vocab_size))
    table.caption = "L layers, D hidden size, H/KV query/key-value heads; active (MoE): per-token parameters"
    return table


def fmt_params(n: int) -> str:
    """Parameters in B (10**9) with two decimals, or M below one billion: 8.03B, 46.70B, 596M."""
    return f"{n / 1e9:.2f}B" if n >= 995_000_000 else f"{n / 1e6:.0f}M"
