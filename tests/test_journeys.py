"""The user journeys the docs describe, run through DVC as a user types them.

Each `<!-- journey: NAME -->` block of README.md and docs/*.md is read from the docs themselves, its paths
(/data/nih, /data/kaggle, ...) pointed at stand-ins made here from synthetic images in each source's real
layout, smoke-scale `-S` added, and run in one workspace (a working-tree copy), one after another, as a
user switching sources would. So the docs and the tests cannot drift apart. Every other shell block of
the docs says why no test runs it.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr14 import metadata as md
from cxr14 import synthetic
from cxr14.atomic import read_csv

from .conftest import REPO, preset_overrides, working_tree_copy

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- (journey: [\w-]+|not run by tests: [^>]+) -->$")
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")

# Smoke scale for every journey's dvc exp run (presets/demo.yaml and smoke.yaml): small images, a tiny network
# from scratch, two epochs; the data are the journey's own.
SMOKE = preset_overrides("demo", "smoke", leave_out=("data.",))


def shell_blocks() -> list[tuple[Path, int, str, str]]:
    """(file, line, the marker above the block or '', the block's text) of every shell block of the docs."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if FENCE.match(lines[i]):
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                above = lines[i - 1] if i else ""
                found.append((path, i + 1, above if MARKER.match(above) else "", "\n".join(lines[i + 1:end])))
                i = end
            i += 1
    return found


def journey(name: str) -> list[str]:
    """The commands of the docs' block marked `journey: name` (comments dropped)."""
    blocks = [text for _, _, marker, text in shell_blocks() if marker == f"<!-- journey: {name} -->"]
    assert len(blocks) == 1, f"the docs have {len(blocks)} blocks marked journey: {name}"
    commands = [line.split(" #")[0].strip() for line in blocks[0].splitlines()]
    return [c for c in commands if c and not c.startswith("#")]


def test_every_shell_block_of_the_docs_is_run_by_a_test_or_says_why_not():
    unmarked = [f"{path.relative_to(REPO)}:{line}" for path, line, marker, _ in shell_blocks() if not marker]
    assert not unmarked, "shell blocks without <!-- journey: NAME --> or <!-- not run by tests: why -->: " + \
        ", ".join(unmarked)


def test_every_journey_in_the_docs_is_run_here():
    marked = {marker.removeprefix("<!-- journey: ").removesuffix(" -->") for _, _, marker, _ in shell_blocks()
              if marker.startswith("<!-- journey:")}
    assert marked == set(JOURNEYS)


# ---------------------------------------------------------------- stand-ins, each in its source's layout

KAGGLE_2017 = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
SAMPLE_2017 = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position", "OriginalImageWidth", "OriginalImageHeight", "OriginalImagePixelSpacing_x",
               "OriginalImagePixelSpacing_y"]


def data_entry_2017(rows: pd.DataFrame, columns: list[str], names: pd.Series | None = None) -> pd.DataFrame:
    """NIH's rows in a 2017 file's columns: ages written 060Y, the original sizes and spacings."""
    return pd.DataFrame({columns[0]: rows["image"] if names is None else names, columns[1]: rows["labels"],
                         columns[2]: rows["follow_up"], columns[3]: rows["patient_id"],
                         columns[4]: [f"{int(a):03d}Y" for a in rows["age"].fillna(50)], columns[5]: rows["sex"],
                         columns[6]: rows["view"], columns[7]: 2500, columns[8]: 2048, columns[9]: 0.143,
                         columns[10]: 0.143})


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    """/data/nih (NIH's archives), /data/kaggle (images_0XX/images/*.png, Data_Entry_2017.csv), /data/sample
    (sample/images/*.png, sample_labels.csv), /data/hospital (renamed PNGs and their own CSV)."""
    root = tmp_path_factory.mktemp("data")
    metadata = md.read_metadata(REPO / md.REFERENCE / md.METADATA_FILE)
    rows = synthetic.draw_patients(metadata, 240, 6, 8, 5).reset_index(drop=True)
    where = md.archive_of_each_image(metadata, md.read_archive_table(REPO / md.REFERENCE / md.ARCHIVES_FILE))
    archive = where.loc[rows["image"]].to_numpy()
    pngs = [synthetic.encode_png(synthetic.render_with_boxes(row, 64, 5)[0], 1) for _, row in rows.iterrows()]

    def write(path: Path, png: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)

    for name in np.unique(archive):
        (root / "nih").mkdir(exist_ok=True)
        with tarfile.open(root / "nih" / name, "w:gz") as tar:
            for i in np.flatnonzero(archive == name):
                info = tarfile.TarInfo(f"images/{rows['image'][i]}")
                info.size = len(pngs[i])
                tar.addfile(info, fileobj=io.BytesIO(pngs[i]))
    for i, png in enumerate(pngs):
        write(root / "kaggle" / archive[i].removesuffix(".tar.gz") / "images" / rows["image"][i], png)
        write(root / "sample" / "sample" / "images" / rows["image"][i], png)
    data_entry_2017(rows, KAGGLE_2017).to_csv(root / "kaggle" / "Data_Entry_2017.csv", index=False)
    data_entry_2017(rows, SAMPLE_2017).to_csv(root / "sample" / "sample_labels.csv", index=False)
    renamed = pd.Series([f"hosp_{i:04d}.png" for i in range(len(rows))])
    for i, png in enumerate(pngs):
        write(root / "hospital" / "export" / f"batch{i % 3}" / renamed[i], png)
    own = data_entry_2017(rows, SAMPLE_2017, renamed).iloc[:, :7]
    own["Patient ID"] = own["Patient ID"] + 900000  # the hospital's own patient numbers
    own.to_csv(root / "hospital" / "labels.csv", index=False)
    return {f"/data/{name}": root / name for name in ("nih", "kaggle", "sample", "hospital")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return working_tree_copy(tmp_path_factory.mktemp("journeys") / "repo")


def run(folder: Path, command: str, standins: dict[str, Path], smoke: list[str] = SMOKE, target: str | None = None):
    for path, standin in standins.items():
        command = re.sub(re.escape(path) + r"(?=/|\s|$)", str(standin), command)
    args = shlex.split(command)
    if args[0] == "cxr":
        args = [sys.executable, "-m", "cli", *args[1:]]
    if args[:3] == ["dvc", "exp", "run"] or args[1:4] == ["-m", "cli", "table"]:
        args += [a for item in smoke for a in ("-S", item)] + ([target] if target else [])
    done = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def metrics(folder: Path, name: str) -> dict:
    return json.loads((folder / "metrics" / f"{name}.json").read_text())


# The journeys in the order a user might take them in one workspace; the test of each names its checks.
# table-demo runs in tests/test_tables.py, whose other table tests build on that run.
JOURNEYS = ["table-demo", "nih-archives", "kaggle-full", "kaggle-sample", "hospital", "predict-report", "ablation"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["nih-archives", "kaggle-full", "kaggle-sample"])
def test_a_copy_of_nih_runs_through_dvc_to_the_split(workspace, standins, name):
    (command,) = journey(name)
    run(workspace, command, standins, target="split")
    found = metrics(workspace, "download")
    assert found["found"] == 240 and found["archives" if name == "nih-archives" else "png_files"] > 0
    assert metrics(workspace, "split")["test"]["images"] > 0
    assert (workspace / "data/raw/archives").is_dir()  # the output DVC expects, whatever the source
    if name == "kaggle-sample":  # the sample's own labels, ages written 060Y
        assert read_csv(workspace / "data/raw/metadata.csv")["age"].between(1, 120).all()


@pytest.mark.e2e
def test_a_hospital_export_with_its_own_csv_runs_the_whole_pipeline_on_a_patient_split(workspace, standins):
    (command,) = journey("hospital")
    run(workspace, command, standins)
    assert metrics(workspace, "split")["patients_in_more_than_one_part"] == 0
    assert yaml.safe_load((workspace / "params.yaml").read_text())["split"]["method"] == "patient"
    assert "auroc" in metrics(workspace, "evaluate")
    assert read_csv(workspace / "data/raw/metadata.csv")["image"].str.startswith("hosp_").all()


@pytest.mark.e2e
def test_predict_and_report_on_the_hospitals_model(workspace, standins):
    predict, report = journey("predict-report")
    out = run(workspace, predict, standins)
    written = pd.read_csv(workspace / "predictions.csv")
    assert len(written) == 240 and "240 predicted" in out
    run(workspace, report, standins)
    assert (workspace / "plots/report.html").stat().st_size > 100_000


@pytest.mark.e2e
def test_the_chexnet_ablation_after_a_workspace_run_leaves_a_valid_params_yaml(workspace, standins):
    """The second workspace `dvc exp run -S` writes onto the file the first rewrote (ruamel's round trip); the
    run goes as far as the check stage, which reads every section (training DenseNet-121 adds nothing here)."""
    (command,) = journey("ablation")
    run(workspace, command, standins, smoke=[s for s in SMOKE if not s.startswith("model.")], target="check")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    assert params["model"]["backbone"] == "densenet121" and params["model"]["head"]["hidden"] == []
