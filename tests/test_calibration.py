"""Calibration: expected calibration error and reliability curves on hand-made probabilities."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from cxr14 import metrics
from cxr14.params import load


def column(*groups):
    """(y, p) for one label from groups of (probability, images, positives)."""
    y = np.concatenate([np.r_[np.ones(k), np.zeros(n - k)] for _, n, k in groups])
    p = np.concatenate([np.full(n, prob) for prob, n, _ in groups])
    return y, p


def test_perfectly_calibrated_probabilities_have_zero_error():
    y, p = column((0.25, 4, 1), (0.75, 8, 6), (0.05, 20, 1))
    assert metrics.expected_calibration_error(metrics.reliability(y, p, 10)) == pytest.approx(0, abs=1e-12)


def test_a_known_miscalibration_gives_the_count_weighted_gap():
    # 10 images at 0.2 of which half are positive (gap 0.3), 30 images at 0.8 all positive (gap 0.2)
    y, p = column((0.2, 10, 5), (0.8, 30, 30))
    assert metrics.expected_calibration_error(metrics.reliability(y, p, 10)) == pytest.approx((10 * 0.3 + 30 * 0.2) / 40)


def test_overconfidence_in_one_bin_is_the_whole_error():
    y, p = column((0.9, 50, 25))
    assert metrics.expected_calibration_error(metrics.reliability(y, p, 10)) == pytest.approx(0.4)


def test_labels_drawn_from_their_probabilities_are_nearly_calibrated():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(float)
    assert metrics.expected_calibration_error(metrics.reliability(y, p, 10)) < 0.005
    assert metrics.expected_calibration_error(metrics.reliability(y, p ** 2, 10)) > 0.1  # squared: too low everywhere


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_the_reliability_curve_is_scikit_learns(strategy):
    rng = np.random.default_rng(1)
    p = rng.beta(0.5, 2, 500)
    y = (rng.random(500) < p).astype(float)
    curve = metrics.reliability(y, p, 10, strategy)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy=strategy)
    assert np.allclose(curve["observed"], observed) and np.allclose(curve["predicted"], predicted)
    assert curve["count"].sum() == 500


def test_equal_mass_bins_hold_the_same_number_of_images():
    p = np.linspace(0.01, 0.3, 100)  # all in the first three equal-width bins
    y = np.zeros(100)
    assert list(metrics.reliability(y, p, 10, "quantile")["count"]) == [10] * 10
    assert len(metrics.reliability(y, p, 10, "uniform")["count"]) == 3


def test_empty_bins_are_left_out_of_the_curve():
    y, p = column((0.15, 3, 0), (0.95, 2, 2))
    curve = metrics.reliability(y, p, 10)
    assert list(curve["count"]) == [3, 2] and np.allclose(curve["predicted"], [0.15, 0.95])


def test_per_label_errors_and_their_macro_average():
    y1, p1 = column((0.2, 10, 5), (0.8, 30, 30))
    y2, p2 = column((0.25, 20, 5), (0.75, 20, 15))
    result = metrics.calibration(np.c_[y1, y2], np.c_[p1, p2], ("A", "B"), 10)
    assert result["ece"]["A"] == pytest.approx(0.225) and result["ece"]["B"] == pytest.approx(0, abs=1e-12)
    assert result["ece_macro"] == pytest.approx(0.225 / 2)
    assert set(result["ece_adaptive"]) == {"A", "B"} and result["ece_adaptive"]["B"] == pytest.approx(0, abs=1e-12)
    assert list(result["curves"]["A"]["count"]) == [10, 30]


def test_no_images_means_no_error():
    result = metrics.calibration(np.zeros((0, 1)), np.zeros((0, 1)), ("A",), 10)
    assert result["ece"] == {"A": None} and result["ece_macro"] is None and result["ece_adaptive_macro"] is None


@pytest.fixture(scope="module")
def evaluated(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline evaluated with an untrained network saved as train saves its model (what is measured is
    the evaluate stage, not training), once, in a copy of its own: read it, don't change it."""
    import os
    import shutil

    import torch

    from cxr14 import models
    from stages import evaluate, train

    from .conftest import REPO, write_params

    folder = tmp_path_factory.mktemp("calibration") / "p"
    shutil.copytree(tiny_pipeline, folder, symlinks=True)
    (folder / "tables.yaml").symlink_to(REPO / "tables.yaml")  # the report page reads CheXNet's figures there
    here = os.getcwd()
    os.chdir(folder)
    try:
        params = write_params(folder, {"evaluate": {"bootstrap": 0, "calibration_bins": 5}})
        loaded = load(params)
        task, model_config, config = train.check(loaded)
        size = models.input_size(model_config, loaded["crop"]["pixels"])
        torch.manual_seed(0)
        net = models.create_model(model_config, len(task.names), size)
        train.save_model(loaded, task, model_config, config, size, folder / "data/train/model.pt", net.state_dict(), 1)
        evaluate.main(params)
    finally:
        os.chdir(here)
    return folder


def test_evaluate_reports_each_labels_error_from_its_predictions(evaluated):
    import json

    import pandas as pd

    result = json.loads((evaluated / "metrics/evaluate.json").read_text())
    predictions = pd.read_csv(evaluated / "data/evaluate/predictions.csv")
    assert set(result["ece"]) == set(result["auroc"]) == set(result["ece_adaptive"])
    for name, value in result["ece"].items():
        y = predictions["labels"].str.split("|").apply(lambda labels, n=name: n in labels).to_numpy(float)
        assert value == pytest.approx(metrics.expected_calibration_error(metrics.reliability(y, predictions[f"p_{name}"], 5)))
    assert result["ece_macro"] == pytest.approx(np.mean(list(result["ece"].values())))


def test_evaluate_writes_the_reliability_curves_for_dvc_plots(evaluated):
    import json

    import yaml

    from .conftest import REPO

    rows = json.loads((evaluated / "plots/evaluate/plots/custom/calibration.json").read_text())
    rows = rows["calibration"] if isinstance(rows, dict) else rows
    result = json.loads((evaluated / "metrics/evaluate.json").read_text())
    assert {r["label"] for r in rows} == set(result["ece"])
    for name in result["ece"]:
        mine = [r for r in rows if r["label"] == name]
        assert sum(r["images"] for r in mine) == result["images"] and len(mine) <= 5
        assert all(0 <= r["mean_predicted"] <= 1 and 0 <= r["observed"] <= 1 for r in mine)
    plots = {k: v for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"] if isinstance(entry, dict)
             for k, v in entry.items()}
    declared = plots["plots/evaluate/plots/custom/calibration.json"]
    assert (REPO / ".dvc/plots" / f"{declared['template']}.json").exists()
    assert (declared["x"], declared["y"]) == ("mean_predicted", "observed")


@pytest.mark.parametrize("value", [0, 2.5, None])
def test_the_number_of_bins_is_a_whole_number_from_params(value):
    from cxr14.params import ParamError
    from stages import evaluate

    from .conftest import params_with

    params = params_with({"evaluate": {"calibration_bins": value}})
    with pytest.raises(ParamError, match="evaluate.calibration_bins"):
        evaluate.check(params)


def test_the_report_page_draws_one_reliability_line_per_label_and_the_diagonal(evaluated, tmp_path, monkeypatch):
    import json

    from experiments import report

    monkeypatch.chdir(evaluated)

    result = json.loads((evaluated / "metrics/evaluate.json").read_text())
    figure = report.reliability_figure(result, None)
    names = [trace.name for trace in figure.data]
    assert names[0] == "perfectly calibrated" and list(figure.data[0].x) == [0, 1] == list(figure.data[0].y)
    assert names[1:] == [f"{n} (ECE {v:.3f})" for n, v in result["ece"].items()]
    assert "Reliability (test, macro ECE" in report.write(None, tmp_path / "report.html").read_text()
