"""`python -m blastscan` runs the command line."""

from blastscan.cli import app

app(prog_name="blastscan")
