"""Running a stage from the command line: `python -m stages.<name> [--params FILE]` (dvc.yaml's form)
or `cxr <name>`. A failure the user can act on is one red line and an exit code, never a traceback:
2 for a bad value in params.yaml, 1 for a failure of the stage (a missing input, a NaN loss)."""

from __future__ import annotations

import argparse
import importlib
import sys

import typer

from cxr14.params import PARAMS_FILE, ParamError, StageError


def run(module: str, params: str = PARAMS_FILE) -> int:
    """Import `module` (stages.crop, ...), run its main(params) and return the exit code."""
    name = module.rpartition(".")[2]
    try:
        importlib.import_module(module).main(params)
    except ParamError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        return 2
    except (StageError, FileNotFoundError, FloatingPointError) as error:
        typer.secho(f"error in stage {name}: {error}", fg="red", err=True)
        return 1
    return 0


def command_line(module: str) -> None:
    """The `if __name__ == "__main__"` of a stage module. The module is imported under its own name
    (not as __main__), so that the functions its worker processes run are found by that name."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=f"Run the stage {module}.")
    parser.add_argument("--params", "-p", default=PARAMS_FILE, help="the params file to read")
    sys.exit(run(module, parser.parse_args().params))
