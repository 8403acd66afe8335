"""Metrics against scikit-learn on fixed predictions; bootstrap intervals; thresholds."""

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from cxr14 import metrics

NAMES = ("A", "B", "C")


def fixed(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.5, 0.2, 0.05]).astype(np.float32)
    p = np.clip(y * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
    p[:10, 0] = 0.5  # ties
    return y, p


def test_auroc_matches_scikit_learn():
    y, p = fixed()
    result = metrics.auroc(y, p, NAMES)
    for j, name in enumerate(NAMES):
        assert result["per_label"][name] == roc_auc_score(y[:, j], p[:, j])
    assert result["micro"] == roc_auc_score(y.ravel(), p.ravel())
    assert np.isclose(result["macro"], np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(3)]))


def test_rank_auroc_used_by_the_bootstrap_equals_scikit_learn():
    y, p = fixed()
    assert np.allclose(metrics.rank_auroc(y, p), [roc_auc_score(y[:, j], p[:, j]) for j in range(3)])


def test_a_label_with_one_class_has_no_auroc_and_stays_out_of_the_macro():
    y, p = fixed()
    y[:, 2] = 0
    result = metrics.auroc(y, p, NAMES)
    assert result["per_label"]["C"] is None
    assert np.isclose(result["macro"], np.mean([result["per_label"]["A"], result["per_label"]["B"]]))


def test_auprc_matches_scikit_learn():
    y, p = fixed()
    result = metrics.auprc(y, p, NAMES)
    for j, name in enumerate(NAMES):
        assert result["per_label"][name] == average_precision_score(y[:, j], p[:, j])


def test_scores_at_a_threshold_match_scikit_learn():
    y, p = fixed()
    scores = metrics.at_threshold(y[:, 0], p[:, 0], 0.6)
    predicted = p[:, 0] >= 0.6
    assert np.isclose(scores["precision"], precision_score(y[:, 0], predicted))
    assert np.isclose(scores["sensitivity"], recall_score(y[:, 0], predicted))
    assert np.isclose(scores["f1"], f1_score(y[:, 0], predicted))
    assert np.isclose(scores["specificity"], recall_score(1 - y[:, 0], ~predicted))
    assert scores["tp"] + scores["fp"] + scores["fn"] + scores["tn"] == len(y)


def test_f1_threshold_is_the_best_f1_on_validation():
    y, p = fixed()
    chosen = metrics.choose_threshold(y[:, 1], p[:, 1], "f1")
    best = max(f1_score(y[:, 1], p[:, 1] >= t) for t in np.unique(p[:, 1]))
    assert np.isclose(f1_score(y[:, 1], p[:, 1] >= chosen), best)


def test_pr_crossing_threshold_balances_precision_and_recall():
    y, p = fixed()
    chosen = metrics.choose_threshold(y[:, 0], p[:, 0], "pr_crossing")
    scores = metrics.at_threshold(y[:, 0], p[:, 0], chosen)
    assert abs(scores["precision"] - scores["sensitivity"]) < 0.05


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_data():
    widths = []
    for n in (200, 3000):
        y, p = fixed(n, seed=1)
        patients = np.arange(n) // 3  # three images per patient
        ci = metrics.bootstrap_auroc(y, p, patients, rounds=300, seed=0)
        point = metrics.auroc(y, p, NAMES)
        for j, name in enumerate(NAMES):
            low, high = ci["per_label"][j]
            assert low <= point["per_label"][name] <= high
        assert ci["macro"][0] <= point["macro"] <= ci["macro"][1]
        widths.append(ci["macro"][1] - ci["macro"][0])
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_whole_patients():
    y, p = fixed(60)
    one_patient = metrics.bootstrap_auroc(y, p, np.zeros(60, dtype=int), rounds=50, seed=0)
    assert one_patient["macro"][0] == one_patient["macro"][1]  # one patient: every resample is the same set


def test_each_bootstrap_round_is_the_auroc_of_the_resampled_rows_ties_included():
    """The bootstrap weighs rows by how often their patient was drawn instead of building each resample:
    it must give what scikit-learn gives on the resample built by hand."""
    rng = np.random.default_rng(4)
    y = (rng.random((400, 2)) < [0.3, 0.1]).astype(np.float32)
    p = np.round(rng.random((400, 2)), 1)  # many ties
    patients = rng.integers(0, 90, 400)
    ids, rows_of = np.unique(patients, return_inverse=True)
    drawn = np.random.default_rng([5, 7]).integers(0, len(ids), len(ids))  # the draws of round 1, seed 5
    rows = np.concatenate([np.flatnonzero(rows_of == i) for i in drawn])
    times = np.bincount(drawn, minlength=len(ids))[rows_of]
    for j in range(2):
        by_hand = roc_auc_score(y[rows, j], p[rows, j])
        assert abs(metrics._weighted_auroc(times, *metrics._ranked(y[:, j], p[:, j])) - by_hand) < 1e-12
    one_round = metrics.bootstrap_auroc(y, p, patients, rounds=1, seed=5, level=0.0)
    assert abs(one_round["per_label"][0][0] - roc_auc_score(y[rows, 0], p[rows, 0])) < 1e-12
