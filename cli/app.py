"""`cxr`: one subcommand per pipeline stage (each reads params.yaml), plus the demo, tables and report.

The layer above the stages (stages/) and the experiment tools (experiments/): it imports them, they never
import it. `cxr X` is `python -m cli X`; `cxr <stage>` runs `python -m stages.<stage>`'s main as dvc.yaml does.

    cxr check    (every section of params.yaml, in seconds: dvc.yaml runs it before download)
    cxr download    cxr weights    cxr filter    cxr crop    cxr split    cxr resample    cxr train    cxr evaluate
    cxr localize    cxr demo    cxr table list|run|show    cxr report    cxr predict PATH...
"""

from __future__ import annotations

import typer

from cxr14 import stage as stage_runner
from cxr14.params import PARAMS_FILE

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0],
                  pretty_exceptions_enable=False)
PARAMS = typer.Option(PARAMS_FILE, "--params", "-p", help="the params file to read")


def _run(stage: str, params: str, lock: bool = True) -> None:
    code = stage_runner.run(f"stages.{stage}", params, lock)
    if code:
        raise typer.Exit(code)


@app.command()
def check(params: str = PARAMS) -> None:
    """Stage 0: every section of params.yaml by every stage's own rules, so a typo anywhere stops the
    pipeline in seconds, before a download or a crop of hours."""
    _run("check", params, lock=False)  # beside a running stage too: it reads params, writes one small file


@app.command()
def download(params: str = PARAMS) -> None:
    """Stage 1: the NIH archives (resumable, verified), a local copy read in place, or a synthetic set."""
    _run("download", params)


@app.command("weights")
def weights_(params: str = PARAMS) -> None:
    """Stage 1b: torchvision's ImageNet weights of model.backbone (model.pretrained: imagenet), fetched once, checked."""
    _run("weights", params)


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
def localize(params: str = PARAMS) -> None:
    """Stage 8: where the model looks: Grad-CAM (or CAM) heatmaps scored against NIH's boxes, and a gallery."""
    _run("localize", params)


table_app = typer.Typer(no_args_is_help=True, help="The report's tables (tables.yaml) as DVC experiments.")
app.add_typer(table_app, name="table")


@table_app.command("list")
def table_list() -> None:
    """The tables of the catalog, with their columns."""
    from experiments import tables

    for name, table in tables.load().items():
        columns = ", ".join(c.name + (" (reference)" if c.reference else "") for c in table.columns)
        typer.echo(f"{name:<22} {table.title}\n{'':<22} columns: {columns}")


@table_app.command("run")
def table_run(names: list[str] = typer.Argument(..., metavar="NAME", help="one or more tables, or all"),
              demo: bool = typer.Option(False, "--demo", help="the demo's small settings (synthetic data)"),
              set_param: list[str] = typer.Option([], "--set-param", "-S", help="key=value for every column"),
              jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="columns at a time, through DVC's queue "
                                       "(1: one after another); each train and evaluate takes a GPU of its own"),
              seeds: int = typer.Option(None, "--seeds", min=1, help="run each column N times (NAME-COLUMN-s1 ... "
                                        "-sN, run_seed 1 to N): only the training randomness differs")) -> None:
    """Run each column of a table (of several tables; all: every table) as the DVC experiment NAME-COLUMN."""
    from experiments import tables

    try:
        code = tables.run(names, demo, set_param, jobs, seeds)
    except (KeyError, ValueError) as error:
        typer.secho(f"error: {error.args[0]}", fg="red", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@table_app.command("show")
def table_show(name: str, why: bool = typer.Option(False, "--why", help="where each column's settings come from: "
                                                                         "the report's words or ours"),
               rounds: int = typer.Option(None, "--rounds", min=0, help="bootstrap rounds of the differences "
                                          "(default: params.yaml's evaluate.bootstrap; 0: no differences)")) -> None:
    """The table as the report lays it out, the report's figures beside; each column against the first with
    a 95% interval, and a verdict on each of the report's claims; also plots/tables/NAME.{md,html,json}."""
    from rich.console import Console
    from rich.markdown import Markdown

    from experiments import tables

    try:
        text = tables.show(name, rounds=rounds)
    except KeyError as error:
        typer.secho(f"error: {error.args[0]}", fg="red", err=True)
        raise typer.Exit(2) from None
    Console(width=200).print(Markdown(text))
    if why:
        typer.echo("\n" + tables.provenance(tables.load()[name]))
    typer.echo(f"written: plots/tables/{name}.md, plots/tables/{name}.html, plots/tables/{name}.json")


@app.command()
def report(rev: str = typer.Argument(None, help="an experiment name or git revision; default: the workspace"),
           out: str = typer.Option("plots/report.html", help="where to write the page")) -> None:
    """One self-contained HTML page of a run's results (opens offline)."""
    from experiments import report as report_module

    path = report_module.write(rev, out)
    typer.echo(f"written: {path}")


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help="PNG, JPEG or DICOM files, or folders of them (searched recursively)"),
    model: str = typer.Option("data/train/model.pt", help="a model file, or an experiment's name or git revision "
                                                          "(its data/train/model.pt, read through DVC)"),
    out: str = typer.Option("predictions.csv", help="the CSV to write: one row per file, each label's probability"),
    heatmaps: str = typer.Option(None, help="a folder for Grad-CAM overlays (PNG) of each image's top labels"),
    top: int = typer.Option(1, min=1, help="with --heatmaps: how many of each image's most probable labels"),
    batch_size: int = typer.Option(32, min=1, help="images per batch"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """A trained model on your own images, prepared as its training images were (the crop and sizes its
    model file records). A file that cannot be read gets its error in the CSV and on stderr, and the rest
    still run. Missing folders of --out and --heatmaps are made. Exit status: 0 when at least one image was
    predicted, 1 when none could be read, 2 when the model cannot be loaded or --out / --heatmaps cannot be
    written (checked before any image is read)."""
    from pathlib import Path

    from cxr14 import predict

    if device not in ("auto", "cpu", "cuda"):
        typer.secho(f"error: --device {device}: expected auto, cpu or cuda", fg="red", err=True)
        raise typer.Exit(2)
    for option, value, folder in (("--out", out, False), ("--heatmaps", heatmaps, True)):
        if value and (why := predict.cannot_write(value, folder)):  # before the model and the images, not after
            typer.secho(f"error: {option} {value}: {why}", fg="red", err=True)
            raise typer.Exit(2)
    try:
        predictor = predict.load_model(model, device)
    except predict.PredictError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(2) from None
    files, problems = predict.find_images(paths)
    for path, why in problems.items():
        typer.secho(f"error: {path}: {why}", fg="red", err=True)
    typer.echo(f"predict: {len(files)} file{'' if len(files) == 1 else 's'} with {predictor.source} "
               f"(center {predictor.fraction:g} -> {predictor.crop_size} px, network {predictor.input_size} px, "
               f"{predictor.runtime.device})")
    results = predict.predict(predictor, files, batch_size, Path(heatmaps) if heatmaps else None, top)
    results += [predict.Result(path, None, why) for path, why in problems.items()]
    predict.print_summary(results, predictor.names, predictor.source)
    written = predict.write(results, predictor.names, out)
    read = sum(r.error is None for r in results)
    typer.echo(f"written: {written} ({read} predicted, {len(results) - read} unreadable)"
               + (f"; heatmaps in {heatmaps}" if heatmaps and read else ""))
    if not read:
        typer.secho("error: no file could be read", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def demo(name: str = typer.Option("demo", help="the experiment's name")) -> None:
    """Run the whole pipeline on the synthetic data set as the DVC experiment `demo` (params.yaml untouched)."""
    from experiments import demo as demo_module

    raise typer.Exit(demo_module.run(name))
