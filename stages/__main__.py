"""`python -m stages ...` is `cxr ...` (dvc.yaml uses this form; see there)."""

from stages.cli import app

app(prog_name="cxr")
