"""`peftplan` commands of this module register on the shared typer app (see cli.py)."""

from __future__ import annotations

from .cli import app, _fail, _guard  # noqa: F401
