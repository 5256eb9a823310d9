"""`peftplan methods`: the registered fine-tuning methods (peftplan/methods/) and their options."""

from __future__ import annotations

from .common import _guard


def methods() -> None:
    """List the registered fine-tuning methods and their options."""

    def run() -> None:
        import dataclasses

        from rich.console import Console
        from rich.table import Table

        from ..methods import registry

        table = Table(title="methods")
        for col in ("name", "what", "options", "peft", "source"):
            table.add_column(col)
        for spec in registry().values():
            opts = ", ".join(f"--{f.name.replace('_', '-')}={f.default}" for f in dataclasses.fields(spec.options_cls))
            table.add_row(spec.name, spec.summary, opts or "-", spec.peft_type or "-", spec.source)
        Console().print(table)

    _guard(run)
