"""A table's runs compared: each column's seeds found, their predictions paired on the shared test images,
and each of the report's claims given a verdict from the interval of the difference."""

import numpy as np
import pandas as pd
import pytest

from experiments import evidence, tables

from .conftest import REPO


def test_a_columns_runs_are_its_seeds_in_order_else_its_one_run():
    existing = {"t-a-s2", "t-a-s10", "t-a-s1", "t-a", "t-ab-s1", "t-b"}
    assert evidence.column_runs("t-a", existing) == ["t-a-s1", "t-a-s2", "t-a-s10"]
    assert evidence.column_runs("t-b", existing) == ["t-b"]
    assert evidence.column_runs("t-c", existing) == []


def predictions(images, scores, labels=None):
    return pd.DataFrame({"image": images, "patient_id": range(len(images)),
                         "labels": labels or ["Fibrosis" if s > 0.5 else "No Finding" for s in scores],
                         "p_Fibrosis": scores})


def test_runs_are_paired_on_the_test_images_they_share_in_one_order():
    a = predictions(["x", "y", "z"], [0.9, 0.2, 0.7])
    b = predictions(["z", "x"], [0.1, 0.8], labels=["Fibrosis", "Fibrosis"])
    paired = evidence.pair([a], [b])
    assert paired.images == (2, 3, 2) and paired.names == ["Fibrosis"]
    assert paired.a[0][:, 0].tolist() == [0.9, 0.7] and paired.b[0][:, 0].tolist() == [0.8, 0.1]
    assert paired.y[:, 0].tolist() == [1, 1]  # column A's labels: x and z are Fibrosis


@pytest.fixture
def binary_fibrosis(monkeypatch):
    rng = np.random.default_rng(0)
    images = [f"{i:08d}_000.png" for i in range(300)]
    truth = rng.random(300) < 0.3
    score = np.clip(truth * 0.3 + rng.random(300) * 0.7, 0, 1)
    frames = {name: predictions(images, score, ["Fibrosis" if t else "No Finding" for t in truth])
              for name in ("binary_fibrosis-balanced-s1", "binary_fibrosis-balanced-s2",
                           "binary_fibrosis-oversampled-s1", "binary_fibrosis-oversampled-s2")}
    monkeypatch.setattr(evidence, "read_predictions", lambda exp: frames.get(exp))
    return tables.load(REPO / "tables.yaml")["binary_fibrosis"], set(frames)


def test_a_claim_of_similar_columns_is_supported_when_their_difference_is_nil(binary_fibrosis):
    table, existing = binary_fibrosis
    verdicts = evidence.claim_verdicts(table, evidence.Runs(existing), rounds=50, seed=1)
    similar = next(v for v in verdicts if v["columns"] == ["oversampled", "balanced"])
    assert similar["difference"] == 0 and similar["interval"] == [0, 0] and similar["verdict"] == "supported"
    assert similar["seeds"] == [2, 2]


def test_a_claim_on_figures_only_or_on_columns_not_run_gets_no_verdict(binary_fibrosis):
    table, existing = binary_fibrosis
    verdicts = evidence.claim_verdicts(table, evidence.Runs(existing), rounds=20, seed=1)
    assert any(v["verdict"].startswith("not testable") for v in verdicts)  # against the CheXNet paper's figures
    missing = evidence.claim_verdicts(table, evidence.Runs({"binary_fibrosis-balanced-s1"}), rounds=20, seed=1)
    assert {v["verdict"] for v in missing} <= {"not run yet", "not testable: a column is figures only (reference)"}


def test_the_verdicts_are_written_under_the_table(binary_fibrosis):
    table, existing = binary_fibrosis
    runs = evidence.Runs(existing)
    text = evidence.markdown(evidence.claim_verdicts(table, runs, 20, 1),
                             evidence.baseline_differences(table, runs, 20, 1))
    assert "| oversampled | +0.000 [+0.000, +0.000] | 2 vs 2 | 300 |" in text
    assert "| **supported** | oversampled similar to (within 0.01) balanced |" in text
