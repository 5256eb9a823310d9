"""`python -m peftplan ...` runs the CLI."""

from peftplan.cli import app

app()
