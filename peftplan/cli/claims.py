"""`peftplan claims`: the lecture notes' arithmetic (peftplan/claims.py) beside what a real run allocates."""

from __future__ import annotations

import json

import typer

from .common import _guard


def claims(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The lecture notes' arithmetic reproduced, beside what a real run allocates."""

    def run() -> None:
        from ..claims import all_claims

        items = all_claims()
        if as_json:
            print(json.dumps([c.__dict__ for c in items], indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="seed claims: their arithmetic, and what a real HF + peft step allocates", show_lines=True)
        for col in ("claim", "the seed says", "its arithmetic", "engine (real run)", "why they differ"):
            table.add_column(col, overflow="fold")
        for c in items:
            table.add_row(f"{c.key}\n[dim]{c.seed}[/dim]", f"{c.statement}: [bold]{c.quoted}[/bold]",
                          f"{c.reproduced:,.4g} {c.unit}", c.engine, c.why)
        Console(width=200).print(table)

    _guard(run)
