"""The whole pipeline through DVC, from a fresh clone, at smoke scale on the synthetic data set."""

import json
import subprocess

import pytest

from .conftest import preset_overrides, working_tree_copy

pytestmark = pytest.mark.e2e

SMOKE = preset_overrides("demo", "smoke")


def sh(folder, *command):
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def exp_run(folder, name, *overrides):
    args = [a for o in overrides for a in ("-S", o)]
    return sh(folder, "dvc", "exp", "run", "-n", name, *args)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return working_tree_copy(tmp_path_factory.mktemp("clone") / "repo")


def test_dvc_runs_every_stage_and_shows_the_metrics(clone):
    out = exp_run(clone, "smoke-a", *SMOKE)
    for stage in ("check", "download", "filter", "crop", "split", "resample", "train", "evaluate", "localize"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads(sh(clone, "dvc", "metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]
    split = files["metrics/split.json"]["data"]
    assert split["patients_in_more_than_one_part"] == 0
    assert split["train"]["images"] > 0 and split["test"]["images"] > 0
    assert "labels" in files["metrics/resample.json"]["data"]
    assert "Atelectasis" in files["metrics/evaluate.json"]["data"]["auroc"]
    assert "boxes_scored" in files["metrics/localize.json"]["data"]


def test_an_ablation_reuses_the_data_stages_and_diffs_per_label_auroc(clone):
    out = exp_run(clone, "smoke-b", *SMOKE, "model.backbone=mobilenet_v3_small")
    assert "Stage 'crop' didn't change" in out and "Running stage 'train'" in out
    diff = sh(clone, "dvc", "metrics", "diff", "smoke-a", "--all")
    assert "auroc.Atelectasis" in diff and "metrics/evaluate.json" in diff
    names = sh(clone, "dvc", "exp", "list", "--name-only")
    assert "smoke-a" in names and "smoke-b" in names


def test_dvc_plots_show_draws_roc_confusion_and_auroc_bars(clone):
    sh(clone, "dvc", "plots", "show", "-o", "dvc_plots")
    page = (clone / "dvc_plots" / "index.html").read_text()
    for expected in ("roc/Atelectasis", "confusion_matrix", "auroc_by_label", "train_loss"):
        assert expected in page, expected


def test_editing_a_library_module_makes_exactly_its_users_stale(clone):
    from cxr14 import imports

    assert json.loads(sh(clone, "dvc", "status", "--json")) == {}  # the last run is current
    labels = clone / "cxr14" / "labels.py"
    original = labels.read_text()
    labels.write_text(original + "\n# an edit\n")
    try:
        stale = json.loads(sh(clone, "dvc", "status", "--json"))
    finally:
        labels.write_text(original)
    users = {s for s in ("download", "filter", "crop", "split", "resample", "train", "evaluate", "localize")
             if "cxr14/labels.py" in imports.project_files(f"stages.{s}")}
    assert users == {"download", "split", "resample", "train", "evaluate", "localize"}
    assert set(stale) == users | {"check"}  # check runs every stage's params check
    assert all({"changed deps": {"cxr14/labels.py": "modified"}} in stale[s] for s in set(stale))


def test_a_bad_value_anywhere_stops_the_pipeline_before_download(clone):
    done = subprocess.run(["dvc", "exp", "run", "-n", "typo", *[a for o in SMOKE for a in ("-S", o)],
                           "-S", "evaluate.bootstrap=-1"], cwd=clone, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "evaluate.bootstrap = -1" in done.stdout + done.stderr
    assert "Running stage 'download'" not in done.stdout


def test_dvc_plots_diff_shows_both_experiments_localization_galleries(clone):
    shown = json.loads(sh(clone, "dvc", "plots", "diff", "smoke-a", "smoke-b", "--json"))["data"]
    images = {name: entries for name, entries in shown.items() if name.startswith("plots/localize/images/")}
    assert images, sorted(shown)
    revisions = {rev for entries in images.values() for entry in entries for rev in entry["revisions"]}
    assert {"smoke-a", "smoke-b"} <= revisions
