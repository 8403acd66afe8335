"""The evaluate stage on a trained tiny model: metrics file, predictions, plots, binary tables."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxr14.params import ParamError
from stages import evaluate, train

from .conftest import write_params


@pytest.fixture
def trained(tiny_pipeline, tmp_path, monkeypatch):
    shutil.copytree(tiny_pipeline, tmp_path / "p", symlinks=True)
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def run(folder, changes):
    params = write_params(folder, changes)
    train.main(params)
    evaluate.main(params)
    return json.loads((folder / "metrics/evaluate.json").read_text())


def test_multilabel_metrics_predictions_and_plots(trained):
    result = run(trained, {"train": {"epochs": 1}})
    predictions = pd.read_csv(trained / "data/evaluate/predictions.csv")
    test = pd.read_csv(trained / "data/split/test.csv")
    assert list(predictions["image"]) == list(test["image"])
    y = predictions["labels"].str.contains("Effusion").to_numpy()
    for name, value in result["auroc"].items():  # predictions.csv is precise enough to recompute every figure exactly
        if value is not None:
            assert roc_auc_score(predictions["labels"].str.contains(name), predictions[f"p_{name}"]) == value
    assert np.isclose(result["auroc"]["Effusion"], roc_auc_score(y, predictions["p_Effusion"]), atol=1e-5)
    for key in ("loss", "auroc_micro", "auroc_macro", "auprc_macro", "auroc_macro_ci", "auroc_ci", "at_threshold"):
        assert key in result
    assert set(result["at_threshold"]["Effusion"]) >= {"threshold", "sensitivity", "specificity", "precision", "f1"}
    plots = trained / "plots/evaluate/plots"
    assert (plots / "sklearn/roc/Effusion.json").exists()
    assert (plots / "sklearn/precision_recall/Effusion.json").exists()
    assert (plots / "sklearn/confusion_matrix.json").exists()
    bars = json.loads((plots / "custom/auroc_by_label.json").read_text())
    assert {b["label"] for b in bars} == {k for k, v in result["auroc"].items() if v is not None}


def test_binary_reports_the_confusion_matrix_and_scores(trained):
    result = run(trained, {"task": {"kind": "binary", "target": "Effusion"}, "train": {"epochs": 1},
                           "evaluate": {"threshold": "pr_crossing"}})
    binary = result["binary"]
    confusion = binary["confusion"]
    assert sum(confusion.values()) == result["images"]
    assert np.isclose(binary["accuracy"], (confusion["tp"] + confusion["tn"]) / result["images"])
    assert set(binary) >= {"threshold", "accuracy", "precision", "recall", "f1", "auroc"}
    assert (trained / "plots/evaluate/plots/custom/threshold.json").exists()


def test_a_fixed_threshold_is_used_as_given(trained):
    result = run(trained, {"task": {"kind": "binary", "target": "Effusion"}, "train": {"epochs": 1},
                           "evaluate": {"threshold": 0.91}})
    assert result["binary"]["threshold"] == 0.91
    predictions = pd.read_csv(trained / "data/evaluate/predictions.csv")
    positive = predictions["labels"].str.contains("Effusion")
    predicted = predictions["p_Effusion"] >= 0.91
    assert result["binary"]["confusion"] == {"tn": int((~positive & ~predicted).sum()), "fp": int((~positive & predicted).sum()),
                                             "fn": int((positive & ~predicted).sum()), "tp": int((positive & predicted).sum())}


@pytest.mark.parametrize("value", ["best", 0, 1.5, True])
def test_a_threshold_is_a_rule_or_a_number_in_zero_one(value):
    with pytest.raises(ParamError) as caught:
        evaluate.threshold_rule(value)
    assert caught.value.key == "evaluate.threshold" and "0.91" in str(caught.value)


def test_top_label_confusion_pairs_each_true_label_with_the_top_prediction():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    p = np.array([[0.1, 0.7, 0.2], [0.3, 0.2, 0.1]])
    actual, predicted = evaluate.top_label_confusion(y, p, ("A", "B", "C"))
    assert actual == ["A", "C", "B"] and predicted == ["B", "B", "A"]


def test_a_model_trained_for_another_task_is_refused(trained):
    params = write_params(trained, {"train": {"epochs": 1}})
    train.main(params)
    with pytest.raises(ParamError, match="the task the model .* was trained for"):
        evaluate.main(write_params(trained, {"task": {"kind": "multilabel15"}}))
