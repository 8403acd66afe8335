"""The catalog of the report's tables, and `cxr table` / `cxr report` on real (smoke-scale) experiments."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from cxr14 import labels
from cxr14.params import apply, flatten, load
from experiments import demo as demo_settings
from experiments import tables
from stages import crop, download, evaluate, filter, resample, split, train

from .conftest import REPO, preset_overrides, working_tree_copy
from .test_journeys import journey

CHECKS = (download, filter, crop, split, resample, train, evaluate)


def test_the_catalog_holds_the_reports_fifteen_tables():
    catalog = tables.load(REPO / "tables.yaml")
    assert len(catalog) == 15
    assert {"preprocessing", "model_selection_14", "binary_fibrosis", "benchmark_15", "findings_only_vs_15"} <= set(catalog)
    assert len(catalog["preprocessing"].columns) == 6 and len(catalog["model_selection_14"].columns) == 4


@pytest.mark.parametrize("name", list(tables.load(REPO / "tables.yaml")))
def test_every_override_is_a_real_key_with_a_valid_value(name):
    table = tables.load(REPO / "tables.yaml")[name]
    base = load(REPO / "params.yaml")
    for column in table.runnable:
        for demo in (False, True):
            params = apply(base, tables.settings(table, column, demo))
            for stage in CHECKS:
                stage.check(params)  # raises ParamError naming the key on a typo or a bad value
            assert params["task"]["kind"] in (table.task, "multilabel15", "multilabel14_findings_only")


def test_column_settings_beat_the_demo_which_beats_the_table():
    table = tables.Table("t", "T", "multilabel14", ["macro"], {"model.backbone": "densenet169", "train.epochs": 30},
                         [tables.Column("c", "C", {"train.epochs": 5}, {"train.batch_size": 4})])
    merged = tables.settings(table, table.columns[0], demo=True, extra={"seed": 7})
    assert merged["model.backbone"] == "resnet18"  # the demo shrinks what the table shares
    assert merged["train.epochs"] == 5  # but not what the table compares
    assert merged["train.batch_size"] == 4 and merged["seed"] == 7


def test_a_column_of_several_seeds_shows_their_mean_and_standard_deviation():
    table = tables.load(REPO / "tables.yaml")["head_14"]
    runs = [{"evaluate": {"auroc_macro": macro}, "resample": {}, "params": {}} for macro in (0.80, 0.84)]
    text = tables.markdown(table, {"single": runs, "relu-256-50": [], "relu-256-50-dropout": []})
    assert "| Macro average AUROC | 0.820 ± 0.028 (n=2) (0.650) |" in text


def test_with_seeds_each_column_runs_n_times_differing_only_in_run_seed(monkeypatch):
    ran = {}
    monkeypatch.setattr(tables, "CATALOG", REPO / "tables.yaml")
    monkeypatch.setattr(tables, "_exp", lambda *args: subprocess.CompletedProcess(args, 0, stdout=""))
    monkeypatch.setattr(tables, "_run_one_by_one", lambda todo: (ran.update(todo) or list(todo), []))
    assert tables.run("binary_fibrosis", demo=True, seeds=2) == 0
    assert sorted(ran) == ["binary_fibrosis-balanced-s1", "binary_fibrosis-balanced-s2",
                           "binary_fibrosis-oversampled-s1", "binary_fibrosis-oversampled-s2"]
    overrides = {exp: [o for o in args if not o.startswith("-S")] for exp, (_, args) in ran.items()}
    assert "run_seed=2" in overrides["binary_fibrosis-balanced-s2"]
    first, second = (set(overrides[f"binary_fibrosis-balanced-s{k}"]) for k in (1, 2))
    assert first ^ second == {"run_seed=1", "run_seed=2"}


def test_markdown_puts_the_reports_figure_beside_each_new_one():
    table = tables.load(REPO / "tables.yaml")["head_14"]
    found = {"single": [{"evaluate": {"loss": 0.2, "auroc_micro": 0.9, "auroc_macro": 0.85,
                                      "auroc": {n: 0.8 for n in labels.FINDINGS}},
                         "resample": {}, "params": {"data": {"source": "synthetic"}}}],
             "relu-256-50": [], "relu-256-50-dropout": []}
    text = tables.markdown(table, found)
    assert "| Atelectasis | 0.800 (0.640) | - (0.660) | - (0.630) |" in text
    assert "| Loss | 0.2000 (0.1578) |" in text
    assert "say nothing about NIH" in text and "Not run yet: relu-256-50, relu-256-50-dropout" in text


SMOKE = preset_overrides("smoke")  # on top of --demo, which applies presets/demo.yaml


def cxr(folder, *args, check=True, env=None):
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=folder, capture_output=True, text=True,
                          timeout=900, env=env)
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return working_tree_copy(tmp_path_factory.mktemp("tables") / "repo")


def smoke_args():
    return [a for item in SMOKE for a in ("-S", item)]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count one after another and at once


@pytest.mark.e2e
def test_a_table_runs_and_shows(clone):
    """The docs' command (docs/tables.md, journey table-demo); the catalog test above checks every table's
    settings; each task kind has its own unit tests (tests/test_evaluate.py, tests/test_tasks_models.py)."""
    (command,) = journey("table-demo")
    name, columns = "optimizer_15", 2
    assert command.split() == ["cxr", "table", "run", name, "--demo"]
    out = cxr(clone, *command.split()[1:], *smoke_args(), env=ONE_THREAD).stdout
    assert f"table {name}: {columns} run, 0 kept, 0 failed" in out
    listed = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=clone, capture_output=True, text=True).stdout
    table = tables.load(clone / "tables.yaml")[name]
    assert all(table.experiment(c) in listed for c in table.runnable)
    shown = cxr(clone, "table", "show", name).stdout
    assert "Not run yet" not in shown and "synthetic" in shown
    page = (clone / "plots" / "tables" / f"{name}.md").read_text()
    assert page.count("(") >= 3  # the report's figures in brackets
    assert (clone / "plots" / "tables" / f"{name}.html").stat().st_size > 100_000  # plotly inlined: opens offline


@pytest.mark.e2e
def test_rerunning_a_table_keeps_what_is_already_there(clone):
    out = cxr(clone, "table", "run", "optimizer_15", "--demo", *smoke_args(), env=ONE_THREAD).stdout
    assert "table optimizer_15: 0 run, 2 kept, 0 failed" in out


@pytest.mark.e2e
def test_a_failed_column_is_reported_and_the_others_still_run(clone):
    # one training step an epoch: what is tested is the report, not the training
    done = cxr(clone, "table", "run", "weights_15", "--demo", *smoke_args(), "-S", "train.steps_per_epoch=1",
               check=False)
    assert done.returncode == 1
    assert "weights_15-imagenet: FAILED" in done.stdout
    assert "table weights_15: 1 run, 0 kept, 1 failed: weights_15-imagenet" in done.stdout


def test_a_column_that_is_another_runs_run_waits_for_it_then_comes_from_the_run_cache():
    chosen = [CATALOG["benchmark_15"], CATALOG["resampling_15"]]
    todo = {t.experiment(c): (c, []) for t in chosen for c in t.runnable}
    first, second = tables.waves(chosen, todo)
    assert list(first) == ["benchmark_15-benchmark", "resampling_15-resampled"]
    assert list(second) == ["resampling_15-original"]  # same_run_as benchmark_15/benchmark
    alone = [CATALOG["resampling_15"]]
    assert [list(w) for w in tables.waves(alone, {t.experiment(c): (c, []) for t in alone for c in t.runnable})] == [
        ["resampling_15-original", "resampling_15-resampled"]]


# The same thread count for both ways: on the CPU it changes the order of floating-point sums, so the figures.
@pytest.fixture(scope="module")
def queued_clone(tmp_path_factory):
    return working_tree_copy(tmp_path_factory.mktemp("queued") / "repo")


def evaluated(folder, experiment: str) -> dict:
    import dvc.api

    return json.loads(dvc.api.read("metrics/evaluate.json", repo=str(folder), rev=experiment))


@pytest.fixture(scope="module")
def at_once(queued_clone):
    """optimizer_15 (2 columns) and weights_15 (1 column, which fails) queued together, 2 at a time."""
    return cxr(queued_clone, "table", "run", "optimizer_15", "weights_15", "--demo", *smoke_args(), "--jobs", "2",
               env=ONE_THREAD, check=False)


@pytest.mark.e2e
def test_columns_run_at_once_through_dvcs_queue_give_the_figures_of_one_after_another(queued_clone, at_once, clone):
    assert "$ dvc queue start --jobs 2" in at_once.stdout
    assert "table optimizer_15: 2 run, 0 kept, 0 failed" in at_once.stdout
    changes = [line.split(" ", 1)[1] for line in at_once.stdout.splitlines() if line.endswith((": running", ": success"))]
    assert len({change.split(":")[0] for change in changes[:2]}) == 2 and all("running" in c for c in changes[:2])
    # one after another, in the other clone (its own DVC cache: nothing comes from the queued runs)
    cxr(clone, "table", "run", "optimizer_15", "--demo", *smoke_args(), env=ONE_THREAD)
    table = tables.load(REPO / "tables.yaml")["optimizer_15"]
    for column in table.runnable:
        experiment = table.experiment(column)
        assert evaluated(queued_clone, experiment) == evaluated(clone, experiment), experiment


@pytest.mark.e2e
def test_a_failed_queued_column_is_named_with_the_command_that_shows_its_log(queued_clone, at_once):
    done = at_once
    assert done.returncode == 1
    assert "weights_15-imagenet: FAILED; its log: dvc queue logs weights_15-imagenet" in done.stdout
    assert "table weights_15: 1 run, 0 kept, 1 failed: weights_15-imagenet" in done.stdout
    log = subprocess.run(["dvc", "queue", "logs", "weights_15-imagenet"], cwd=queued_clone, capture_output=True,
                         text=True).stdout
    assert "model.pretrained = 'imagenet' is not valid" in log


def test_a_column_that_lost_dvcs_run_cache_race_is_told_from_one_that_failed():
    """The log of a queued column that failed because another saved the same stage's run-cache entry at once
    (seen in CI), against a column that failed on its own (a bad param): only the first is run again."""
    raced = ("Running stage 'filter':\n> python -m stages.filter\nfilter: kept 299 of 300 images\n"
             "ERROR: failed to reproduce 'filter': [Errno 2] No such file or directory: '/tmp/q/repo/.dvc/cache/runs/"
             "a9/a9ca8774d896c30c66662d9d1c9ec3769a16255e2d85c73e84ccfc2c3a31e4f4/.5JeA7oArAJtiNUWhntgpdg.tmp'\n")
    own = ("Running stage 'check':\n> python -m stages.check\nerror: params.yaml: model.pretrained = 'imagenet' is not "
           "valid\nERROR: failed to reproduce 'check': failed to run: python -m stages.check, exited with 2\n")
    missing_data = "ERROR: failed to reproduce 'crop': [Errno 2] No such file or directory: 'data/raw/archives/x.tar.gz'\n"
    assert tables.lost_a_run_cache_race(raced)
    assert not tables.lost_a_run_cache_race(own) and not tables.lost_a_run_cache_race(missing_data)


@pytest.mark.e2e
def test_report_page_for_an_experiment(clone):
    cxr(clone, "report", "optimizer_15-adam", "--out", "plots/report.html")
    page = (clone / "plots" / "report.html").read_text()
    for expected in ("Test AUROC and AUPRC by label", "ROC curves", "Training curves", "Confusion matrix",
                     "patients in more than one part", "CheXNet (paper)", "synthetic data set", "Where the model looks"):
        assert expected in page, expected
    assert page.count("Plotly.newPlot") == 6  # the four above, reliability curves and the localization chart


def test_overrides_set_params_yaml_as_dvc_applies_them(tmp_path):
    """What `dvc exp run -S` makes of the overrides equals what the catalog check validated."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    from experiments.demo import overrides

    params = load(REPO / "params.yaml")
    wanted = {"resample.targets.Hernia": 2500, "resample.targets.No Finding": 30000, "crop.pixels": 224,
              "model.head.hidden": [256, 50], "train.early_stopping_patience": None}
    items = overrides(wanted, params)
    assert "++resample.targets={Hernia:2500,No Finding:30000}" in items
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(str(tmp_path / "params.yaml"), items)
    assert load(tmp_path / "params.yaml") == apply(params, wanted)


# ---------------------------------------------------------------- fidelity to the report and provenance

CATALOG = tables.load(REPO / "tables.yaml")


def _columns():
    return [(table, column) for table in CATALOG.values() for column in table.columns]


def test_every_setting_says_where_it_comes_from():
    for table in CATALOG.values():
        assert set(table.why) == set(table.set), table.name
        for column in table.columns:
            expected = set(column.set) | ({"same_run_as"} if column.same_run_as else set())
            assert set(column.why) == expected, f"{table.name}/{column.name}"
            assert all(str(v).strip() for v in column.why.values()), f"{table.name}/{column.name}"


def test_a_setting_without_provenance_is_refused(tmp_path):
    (tmp_path / "tables.yaml").write_text(
        "t:\n  title: T\n  task: multilabel14\n  rows: [macro]\n  set: {train.epochs: 20}\n  why: {}\n"
        "  columns: [{name: c, title: C, set: {}, why: {}}]\n")
    with pytest.raises(ValueError, match="t: no provenance for train.epochs"):
        tables.load(tmp_path / "tables.yaml")


def test_columns_with_the_same_figures_in_the_report_are_declared_one_run():
    """Two columns whose 14 per-label figures agree (13 or more) are one run of the report's; the catalog says so."""
    linked = {frozenset((f"{t.name}/{c.name}", c.same_run_as)) for t, c in _columns() if c.same_run_as}
    for (t1, c1), (t2, c2) in itertools.combinations(_columns(), 2):
        a, b = c1.report.get("auroc"), c2.report.get("auroc")
        if a and b and sum(x == y for x, y in zip(a, b)) >= 13:
            assert frozenset((f"{t1.name}/{c1.name}", f"{t2.name}/{c2.name}")) in linked, (c1.name, c2.name)


@pytest.mark.parametrize("table, column", [(t, c) for t, c in _columns() if c.same_run_as],
                         ids=lambda x: getattr(x, "name", ""))
def test_a_column_declared_the_same_run_runs_the_same_params(table, column):
    other_table, other = column.reuses
    base = load(REPO / "params.yaml")
    assert apply(base, tables.settings(table, column)) == apply(base, tables.settings(other_table, other))


def test_the_demo_shrinks_image_counts_even_where_a_column_sets_them():
    table = CATALOG["findings_only_vs_15"]
    column = next(c for c in table.columns if c.name == "findings-only-14")
    assert tables.settings(table, column)["split.official.sizes"] == [32400, 3620, 15731]
    assert tables.settings(table, column, demo=True)["split.official.sizes"] is None  # NIH's lists as they are
    benchmark = CATALOG["benchmark_15"]
    assert tables.settings(benchmark, benchmark.columns[0], demo=True)["split.random.sizes"] == demo_settings.SMOKE_FRACTIONS


def test_the_fifteen_label_dense_heads_have_no_dropout():
    """'3 densely connected NN layer', spelled Dense(256, relu) + Dense(50, relu) + Dense(15, sigmoid): no Dropout;
    no 15-label head in the report has one, the benchmark's (and the tables built on it) included."""
    base = load(REPO / "params.yaml")
    fifteen = [(t, c) for t, c in _columns() if not c.reference
               and apply(base, tables.settings(t, c))["task"]["kind"] == "multilabel15"]
    assert {t.name for t, _ in fifteen} >= {"model_selection_15", "head_15", "weights_15", "optimizer_15", "benchmark_15",
                                            "resampling_15", "class_weights_15", "findings_only_vs_15"}
    for table, column in fifteen:
        assert apply(base, tables.settings(table, column))["model"]["head"]["dropout"] == 0.0, column.name


def test_where_the_catalog_sets_the_epochs_all_of_them_run():
    """The report's epochs (20, 5, 10, 50) are what it ran: early stopping (ours) must not cut them short."""
    base = load(REPO / "params.yaml")
    stated = [(t, c) for t, c in _columns() if not c.reference and "train.epochs" in tables.settings(t, c)]
    assert len(stated) >= 20
    for table, column in stated:
        assert apply(base, tables.settings(table, column))["train"]["early_stopping_patience"] is None, \
            f"{table.name}/{column.name}"


TEN_PERCENT_14 = ("model_selection_14", "head_14", "optimizer_14")


def test_the_ten_percent_fourteen_label_runs_share_optimizer_epochs_and_head():
    """Columns 5 and 7 of the preprocessing table are optimizer_14's SGD run and head_14's Dropout(0.2) run; the
    report compares column 6 with each on one setting. Every 10% 14-label run shares what those two fix: SGD,
    20 epochs, the Dropout(0.2) 256-50 head (the columns that compare one of them excepted)."""
    base = load(REPO / "params.yaml")
    shared = {"train.optimizer": "sgd", "train.epochs": 20, "train.early_stopping_patience": None,
              "model.head.hidden": [256, 50], "model.head.dropout": 0.2, "split.fraction_of": "all"}
    runs = [(t, c) for t, c in _columns() if t.name in TEN_PERCENT_14 + ("preprocessing",) and not c.reference]
    for table, column in runs:
        params = flatten(apply(base, tables.settings(table, column)))
        if params["split.fraction"] != 0.1:
            continue  # preprocessing's 100% columns: the final model
        for key, value in shared.items():
            if key not in column.set:  # what the column compares
                assert params[key] == value, f"{table.name}/{column.name}: {key}"


@pytest.mark.parametrize("quote_start, compared", [("Column 5 and 6", {"filter.blacklist"}),
                                                   ("Column 6 and 7", {"crop.fraction"})])
def test_the_reports_preprocessing_pairs_differ_in_their_compared_setting_only(quote_start, compared):
    claim = next(c for c in CATALOG["preprocessing"].claims if c.quote.startswith(quote_start))
    (table_a, a), (table_b, b) = claim.sides
    base = load(REPO / "params.yaml")
    params_a, params_b = (flatten(apply(base, tables.settings(t, c))) for t, c in ((table_a, a), (table_b, b)))
    assert {k for k in params_a.keys() | params_b.keys() if params_a.get(k) != params_b.get(k)} == compared


def test_a_ten_percent_column_says_what_its_fraction_is_a_share_of():
    for table, column in _columns():
        if not column.reference and tables.settings(table, column).get("split.fraction", 1.0) < 1:
            assert tables.settings(table, column).get("split.fraction_of") == "all", f"{table.name}/{column.name}"


def test_only_the_balanced_binary_model_has_the_reports_threshold():
    """'With the threshold 0.91' is read off the balanced model's own graph; the oversampled one has no stated threshold."""
    table = CATALOG["binary_fibrosis"]
    threshold = {c.name: tables.settings(table, c)["evaluate.threshold"] for c in table.runnable}
    assert threshold == {"balanced": 0.91, "oversampled": "pr_crossing"}
    assert table.columns[1].why["evaluate.threshold"].startswith("ours:")


def test_what_the_report_does_not_state_is_marked_ours():
    """InceptionV3's auxiliary classifier (torchvision's; the report's Keras one has none) and findings_only_vs_15's
    15-label column (the benchmark run, which the report does not name) are this repo's choices."""
    inception = next(c for c in CATALOG["model_selection_14"].columns if c.name == "inceptionv3")
    assert "auxiliary" in inception.why["model.backbone"] and "ours" in inception.why["model.backbone"]
    assert any("auxiliary" in note and "ours" in note for note in CATALOG["model_selection_14"].notes)
    labels15 = next(c for c in CATALOG["findings_only_vs_15"].columns if c.name == "labels-15")
    assert labels15.why["same_run_as"].startswith("ours:")


def test_the_binary_tables_second_figures_are_those_of_its_confusion_matrix():
    column = CATALOG["binary_fibrosis"].columns[0]
    m = column.report["binary"]
    tn, fp, fn, tp = m["tn"], m["fp"], m["fn"], m["tp"]
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    derived = {"accuracy": (tn + tp) / (tn + fp + fn + tp), "precision": precision, "recall": recall,
               "f1": 2 * precision * recall / (precision + recall)}
    assert derived == pytest.approx(column.report["binary_from_matrix"], abs=5e-5)
    assert column.report["text"]["fibrosis_test_images"] == 431 and fn + tp == 434


def test_show_prints_where_the_report_disagrees_with_itself():
    table = CATALOG["binary_fibrosis"]
    text = tables.markdown(table, {c.name: [] for c in table.runnable})
    assert "| accuracy | - (0.964; its matrix: 0.946) |" in text
    notes = [line for line in text.splitlines() if line.startswith("- The report disagrees with itself:")]
    assert len(notes) == 2 and "431" in notes[1] and "434" in notes[1]


def test_a_reference_columns_figures_are_shown_as_its_sources_not_the_reports():
    """The CheXNet paper's macro 0.841 is not printed in the report: no brackets (the report's figures), the source
    named in the column's header."""
    table = CATALOG["final_vs_chexnet"]
    text = tables.markdown(table, {c.name: [] for c in table.runnable})
    assert "| CheXNet paper's figures [reference: figures only, not run] |" in text
    macro = next(line for line in text.splitlines() if line.startswith("| Macro average AUROC |"))
    assert [cell.strip() for cell in macro.strip("|").split("|")][1:] == ["0.841", "-", "-", "-"]
    assert "| Hernia | 0.916 | - (0.480) |" in text
    assert "(0.841)" not in text
    resampling = CATALOG["resampling_15"]  # a reference column whose source is the report
    text = tables.markdown(resampling, {c.name: [] for c in resampling.runnable})
    assert "| Hernia (training images) | - (151) | 65 | - (4,118) |" in text


def test_the_column_this_repo_adds_is_marked_and_has_no_figures():
    table = CATALOG["optimizer_14"]
    ours = [c for c in table.columns if c.ours]
    assert [c.name for c in ours] == ["adam-then-sgd"] and ours[0].report == {}
    assert "Adam, then SGD from the best weights [ours: not in the report]" in tables.markdown(table, {})


def test_show_why_prints_each_columns_provenance(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    monkeypatch.setattr(tables, "CATALOG", REPO / "tables.yaml")
    monkeypatch.setattr(tables, "results", lambda table, existing: {c.name: [] for c in table.runnable})
    monkeypatch.chdir(tmp_path)  # show writes plots/tables/ here
    done = CliRunner().invoke(app, ["table", "show", "head_14", "--why", "--rounds", "0"])
    assert done.exit_code == 0, done.output
    assert "model.head.dropout = 0.2    # 'Dropout(0.2)+ Dense(256 ...)" in done.output
    assert "crop.pixels = 224    # the Dropout(0.2) column is preprocessing's '10% 224 NoCrop RemoveBlack' run" in done.output
    assert 'train.optimizer = "sgd"    # ours: not stated; the Dropout(0.2) column is preprocessing\'s column 7' in done.output
    assert "note: Backbone: not stated: params.yaml's DenseNet169" in done.output
