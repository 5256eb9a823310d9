"""`python -m peftplan.cli ...` runs the CLI (as `python -m peftplan ...` does)."""

from peftplan.cli import app

app()
