"""`peftplan trainers`: the registered trainers (peftplan/trainers/), their defaults and options."""

from __future__ import annotations

from .common import _guard


def trainers() -> None:
    """List the registered trainers: library version modelled, loss, defaults and options."""

    def run() -> None:
        from rich.console import Console
        from rich.table import Table

        from ..trainers import CLI_DEFAULT_TRAINER, registry

        table = Table(title=f"trainers (--trainer; default {CLI_DEFAULT_TRAINER})")
        for col in ("name", "models", "what", "defaults", "options", "checked", "source"):
            table.add_column(col, overflow="fold")
        for spec in registry().values():
            opts = ", ".join("--" + o.replace("_", "-") for o in spec.options) or "-"
            table.add_row(spec.name, spec.label, spec.summary, spec.defaults_line(), opts, spec.checked, spec.source)
        Console().print(table)

    _guard(run)
