"""`python -m cli ...` is `cxr ...`."""

from cli.app import app

app(prog_name="cxr")
