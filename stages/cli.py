"""`cxr`: one subcommand per pipeline stage (each reads params.yaml), plus the demo.

    cxr download    cxr filter    cxr crop    cxr split    cxr resample    cxr train    cxr evaluate
    cxr demo
"""

from __future__ import annotations

import importlib

import typer

from stages.params import PARAMS_FILE, ParamError, StageError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0],
                  pretty_exceptions_enable=False)
PARAMS = typer.Option(PARAMS_FILE, "--params", "-p", help="the params file to read")


def _run(stage: str, params: str) -> None:
    module = importlib.import_module(f"stages.{stage}")
    try:
        module.main(params)
    except ParamError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    except (StageError, FileNotFoundError, FloatingPointError) as error:
        # Failures the user can act on (missing input, NaN loss, a failed download): one clear line.
        typer.secho(f"error in stage {stage}: {error}", fg="red", err=True)
        raise typer.Exit(1) from None


@app.command()
def download(params: str = PARAMS) -> None:
    """Stage 1: the NIH archives (resumable, verified), a local copy read in place, or a synthetic set."""
    _run("download", params)


@app.command("filter")
def filter_(params: str = PARAMS) -> None:
    """Stage 2: drop the Azure blacklist and unwanted view positions."""
    _run("filter", params)


@app.command()
def crop(params: str = PARAMS) -> None:
    """Stage 3: center crop and resize into one packed uint8 array, straight from the archives."""
    _run("crop", params)


@app.command()
def split(params: str = PARAMS) -> None:
    """Stage 4: train / val / test parts (random, patient or official)."""
    _run("split", params)


@app.command()
def resample(params: str = PARAMS) -> None:
    """Stage 5: per-label target counts for the training part."""
    _run("resample", params)


@app.command()
def train(params: str = PARAMS) -> None:
    """Stage 6: train (GPU when there is one; torchrun for several), per-label AUROC through dvclive."""
    _run("train", params)


@app.command()
def evaluate(params: str = PARAMS) -> None:
    """Stage 7: the best model on the test part: AUROC, AUPRC, bootstrap intervals, thresholds, plots."""
    _run("evaluate", params)


@app.command()
def demo(name: str = typer.Option("demo", help="the experiment's name")) -> None:
    """Run the whole pipeline on the synthetic data set as the DVC experiment `demo` (params.yaml untouched)."""
    from stages import demo as demo_module

    raise typer.Exit(demo_module.run(name))
