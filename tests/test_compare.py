"""The difference between two columns: DeLong's test, the paired bootstrap over patients and seeds, verdicts."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxr14 import compare

# ---------------------------------------------------------------- DeLong

# pROC's aSAH data set (xrobin/pROC, data/aSAH.RData, commit 5d15efd5c6ed15b0ed9877399ac3a7085b739ff0): 113
# patients after an aneurysmal subarachnoid hemorrhage (Turck et al. 2010, Intensive Care Medicine 36:107-115).
# outcome: 1 Poor, 0 Good; wfns: the WFNS grade, an ordered factor 1-5; s100b and ndka: blood markers.
ASAH_OUTCOME = "00001101001011001011101000000000100110110000000001100010001010011101101111000110100000010000000000001111110001000"
ASAH_WFNS = "11113254125255125225211112121134214541425511241125521251222151125214524414121421232421451154221113125225552445111"
ASAH_S100B = """0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07 0.33 0.09 0.09 0.07
0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09 0.96 0.25 0.5 0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09
0.86 0.52 0.08 0.06 0.13 2.07 0.1 0.14 0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09 0.27 0.71 0.08 0.26
0.08 0.16 0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15 0.08 0.14 0.1 0.07 0.04
0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48"""
ASAH_NDKA = """3.01 8.54 8.09 10.42 17.4 12.75 6.0 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6 16.11 32.37 54.82 32.41
49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21 5.03 14.04 21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96
14.34 41.43 7.63 7.06 12.59 13.56 3.87 9.44 7.66 12.98 419.19 27.19 22.27 9.95 21.22 11.73 10.4 58.83 6.39 11.09 12.22
13.67 17.21 22.63 12.9 9.7 21.57 8.23 72.57 15.54 10.51 10.6 14.57 5.19 9.63 4.61 21.48 17.3 12.71 9.44 11.07 19.46
10.83 5.37 11.97 7.75 9.83 10.55 28.49 8.53 12.57 12.9 46.83 11.68 12.67 9.01 9.57 34.06 11.72 14.26 47.61 11.67 24.58
10.33 13.87 15.89 22.43 6.79 13.45"""


def asah():
    y = np.array([int(c) for c in ASAH_OUTCOME])
    columns = {"wfns": np.array([float(c) for c in ASAH_WFNS]), "s100b": np.array(ASAH_S100B.split(), dtype=float),
               "ndka": np.array(ASAH_NDKA.split(), dtype=float)}
    assert len(y) == 113 and y.sum() == 41 and all(len(v) == 113 for v in columns.values())
    return y, columns


@pytest.mark.parametrize("a, b, z, p, low, high", [
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
])
def test_delong_gives_procs_roc_test_on_its_asah_data(a, b, z, p, low, high):
    """pROC's own test of roc.test's default (DeLong's test for two correlated ROC curves), xrobin/pROC
    tests/testthat/test-roc.test.R at commit 13bdf2cf3cb3b941e890a57742999fa37e3f66fa ("roc.test statistic and
    p are as expected with defaults"): roc.test(r.wfns, r.s100b) gives Z = 2.20898359144091, p =
    0.0271757822291882 and a 95% interval of the difference 0.0104061769564846 to 0.174214419249478; wfns
    against ndka Z = 2.79777591868904, p = 0.00514557970691098; ndka against s100b Z = -1.39077002573558,
    p = 0.164295175223054. Each ROC is roc(aSAH$outcome, aSAH$<marker>): Poor is the case, higher is worse."""
    y, columns = asah()
    result = compare.delong(y, columns[a], columns[b])
    assert result.z == pytest.approx(z, rel=1e-9)
    assert result.p == pytest.approx(p, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-9)


def test_delongs_aurocs_of_the_asah_markers_are_those_pROC_documents():
    """pROC's documentation (e.g. ?roc) prints 'Area under the curve: 0.7314' for s100b; wfns 0.8237, ndka 0.6120."""
    y, columns = asah()
    result = compare.delong(y, columns["wfns"], columns["s100b"])
    assert round(result.auroc_a, 4) == 0.8237 and round(result.auroc_b, 4) == 0.7314
    assert round(compare.delong(y, columns["ndka"], columns["s100b"]).auroc_a, 4) == 0.6120


def pairwise_delong(y, a, b):
    """DeLong et al. (1988) as the paper writes it: psi(X, Y) = 1, 1/2 or 0 for every positive X and negative
    Y, the structural components V10 and V01 as means of psi, S10 and S01 as covariance matrices over the
    two models, and the variance of the difference as the contrast (1, -1)' (S10/m + S01/n) (1, -1)."""
    def psi(scores):
        x, z = scores[y == 1][:, None], scores[y == 0][None, :]
        return (x > z) + 0.5 * (x == z)

    m, n = int(y.sum()), int(len(y) - y.sum())
    v10 = np.array([psi(a).mean(axis=1), psi(b).mean(axis=1)])
    v01 = np.array([psi(a).mean(axis=0), psi(b).mean(axis=0)])
    s = np.cov(v10) / m + np.cov(v01) / n
    contrast = np.array([1, -1])
    return psi(a).mean(), psi(b).mean(), float(np.sqrt(contrast @ s @ contrast))


def tied_scores(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    a = np.round(y * 0.4 + rng.random(n), 1)  # rounded: many ties, within and across the classes
    b = np.round(0.6 * a + 0.4 * rng.random(n) + 0.1 * y, 1)  # correlated with a
    return y, a, b


def test_delong_equals_the_pairwise_computation_of_its_structural_components_with_ties():
    y, a, b = tied_scores()
    auroc_a, auroc_b, se = pairwise_delong(y, a, b)
    result = compare.delong(y, a, b)
    assert (result.auroc_a, result.auroc_b) == pytest.approx((auroc_a, auroc_b), abs=1e-12)
    assert result.se == pytest.approx(se, rel=1e-10)
    assert result.z == pytest.approx((auroc_a - auroc_b) / se, rel=1e-10)


def test_delongs_aurocs_are_scikit_learns():
    y, a, b = tied_scores(seed=1)
    result = compare.delong(y, a, b)
    assert result.auroc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auroc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result.difference == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)


def test_identical_scores_differ_by_nothing_with_p_one():
    """As pROC's 'DeLong roc.test works when curves are identical': Z = 0, p = 1."""
    y, a, _ = tied_scores()
    result = compare.delong(y, a, a)
    assert (result.difference, result.se, result.z, result.p) == (0, 0, 0, 1)
    assert result.low == result.high == 0


def test_swapping_the_models_negates_the_difference_and_keeps_p():
    y, a, b = tied_scores(seed=2)
    ab, ba = compare.delong(y, a, b), compare.delong(y, b, a)
    assert ba.difference == pytest.approx(-ab.difference) and ba.z == pytest.approx(-ab.z)
    assert ba.p == pytest.approx(ab.p) and (ba.low, ba.high) == pytest.approx((-ab.high, -ab.low))


def test_delong_refuses_cases_of_one_class():
    with pytest.raises(ValueError, match="0 positive and 5 negative"):
        compare.delong(np.zeros(5), np.arange(5.0), np.arange(5.0))


def test_delong_refuses_labels_that_are_not_zero_or_one():
    with pytest.raises(ValueError, match="0/1"):
        compare.delong(np.array([0, 1, 2, 1]), np.arange(4.0), np.arange(4.0))


# ---------------------------------------------------------------- paired bootstrap

def column(n=600, labels=3, seed=0, images_per_patient=3):
    """Labels, one column's scores and patient ids: images of a patient are consecutive."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < np.linspace(0.4, 0.15, labels)).astype(np.float32)
    p = np.clip(0.25 * y + rng.random((n, labels)) * 0.75, 0, 1)
    return y, p, np.arange(n) // images_per_patient


def noisy(p, seed, scale=0.3):
    return p + scale * np.random.default_rng(seed).random(p.shape)


def width(summary):
    return summary["interval"][1] - summary["interval"][0]


def test_patient_resamples_weigh_whole_patients():
    patients = np.repeat(np.arange(40), 3)
    for times in compare.patient_resamples(patients, rounds=20, seed=0):
        per_patient = times.reshape(40, 3)
        assert (per_patient == per_patient[:, :1]).all()  # a patient's images are drawn together
        assert per_patient[:, 0].sum() == 40  # as many patients drawn as there are


def test_with_one_seed_each_it_is_the_paired_patient_bootstrap():
    """Each round: scikit-learn's AUROC of both columns on the same resampled patients, A minus B; the
    interval: the percentiles of those differences."""
    y, a, patients = column()
    b = noisy(a, 1)
    result = compare.paired_difference([a], [b], y, patients, rounds=60, seed=3)
    by_hand = np.array([[roc_auc_score(y[:, j], a[:, j], sample_weight=t) - roc_auc_score(y[:, j], b[:, j], sample_weight=t)
                         for j in range(3)] for t in compare.patient_resamples(patients, rounds=60, seed=3)])
    for j in range(3):
        assert result["per_label"][j]["interval"] == pytest.approx(np.percentile(by_hand[:, j], [2.5, 97.5]), abs=1e-12)
        assert result["per_label"][j]["difference"] == pytest.approx(
            roc_auc_score(y[:, j], a[:, j]) - roc_auc_score(y[:, j], b[:, j]), abs=1e-12)
    assert result["macro"]["interval"] == pytest.approx(np.percentile(by_hand.mean(axis=1), [2.5, 97.5]), abs=1e-12)


def test_the_micro_difference_is_that_of_all_labels_pooled():
    y, a, patients = column()
    b = noisy(a, 1)
    result = compare.paired_difference(a, b, y, patients, rounds=5, seed=0)
    expected = roc_auc_score(y.ravel(), a.ravel()) - roc_auc_score(y.ravel(), b.ravel())
    assert result["micro"]["difference"] == pytest.approx(expected, abs=1e-12)


def test_identical_columns_differ_by_exactly_zero_with_a_zero_width_interval():
    y, a, patients = column()
    seeds = [noisy(a, s) for s in range(3)]  # seeds that disagree: still the same in both columns
    result = compare.paired_difference(seeds, [s.copy() for s in seeds], y, patients, rounds=50, seed=0)
    for summary in (*result["per_label"], result["macro"], result["micro"]):
        assert summary["difference"] == 0 and summary["interval"] == [0, 0]


def test_a_clearly_better_column_has_an_interval_above_zero():
    y, b, patients = column(seed=4)
    a = b + 0.3 * y  # positives scored higher: a better ranking on every label
    result = compare.paired_difference([a, noisy(a, 1, 0.05)], [b, noisy(b, 2, 0.05)], y, patients, rounds=200, seed=0)
    for summary in (*result["per_label"], result["macro"], result["micro"]):
        assert summary["interval"][0] > 0


def test_the_interval_widens_when_seeds_disagree():
    y, b, patients = column(seed=5)
    a = noisy(b, 1, 0.1)
    agreeing = compare.paired_difference([a, a, a], [b, b, b], y, patients, rounds=300, seed=0)
    # the same mean ranking quality, but one run much better than another: the training run is in doubt
    disagreeing = compare.paired_difference([a + 0.1 * y, a, a - 0.1 * y], [b, b, b], y, patients, rounds=300, seed=0)
    assert width(disagreeing["macro"]) > 1.5 * width(agreeing["macro"])


def test_copies_of_one_seed_add_nothing():
    y, a, patients = column()
    b = noisy(a, 1)
    one = compare.paired_difference([a], [b], y, patients, rounds=50, seed=2)
    copies = compare.paired_difference([a, a.copy()], [b, b.copy(), b.copy()], y, patients, rounds=50, seed=2)
    assert copies["macro"]["interval"] == pytest.approx(one["macro"]["interval"], abs=1e-12)
    assert copies["seeds"] == [2, 3] and not copies["paired_seeds"]


def test_with_one_image_per_patient_the_interval_is_close_to_delongs():
    rng = np.random.default_rng(6)
    y = (rng.random((1500, 1)) < 0.3).astype(int)
    a = y * 0.5 + rng.random((1500, 1))
    b = 0.7 * a + 0.5 * rng.random((1500, 1))
    boot = compare.paired_difference(a, b, y, np.arange(1500), rounds=1000, seed=0)["per_label"][0]
    exact = compare.delong(y[:, 0], a[:, 0], b[:, 0])
    assert boot["difference"] == pytest.approx(exact.difference, abs=1e-12)
    assert boot["interval"] == pytest.approx([exact.low, exact.high], abs=0.005)


def test_a_label_with_one_class_in_a_resample_is_skipped_in_that_round():
    y, a, patients = column(n=300)
    y[:, 2] = 0
    y[0, 2] = 1  # one positive image: the label is defined only in rounds that draw its patient
    result = compare.paired_difference(a, noisy(a, 1), y, patients, rounds=100, seed=0)
    assert 0 < result["per_label"][2]["rounds"] < 100
    assert result["per_label"][0]["rounds"] == 100


def test_a_label_with_one_class_in_the_test_set_has_no_difference_and_stays_out_of_the_macro():
    y, a, patients = column()
    y[:, 1] = 0
    b = noisy(a, 1)
    result = compare.paired_difference(a, b, y, patients, rounds=20, seed=0)
    assert result["per_label"][1] == {"difference": None, "interval": None, "rounds": 0}
    defined = [roc_auc_score(y[:, j], a[:, j]) - roc_auc_score(y[:, j], b[:, j]) for j in (0, 2)]
    assert result["macro"]["difference"] == pytest.approx(np.mean(defined), abs=1e-12)


def test_scores_of_another_shape_than_the_labels_are_refused_naming_column_and_seed():
    y, a, patients = column()
    with pytest.raises(ValueError, match="column b, seed 1: scores of shape \\(600, 2\\)"):
        compare.paired_difference([a], [a, a[:, :2]], y, patients, rounds=5, seed=0)


# ---------------------------------------------------------------- verdict

@pytest.mark.parametrize("low, high, direction, margin, expected", [
    (0.01, 0.03, "better", None, "supported"),
    (-0.01, 0.03, "better", None, "not shown"),
    (0.0, 0.03, "better", None, "not shown"),  # touching 0 does not decide
    (-0.03, -0.01, "better", None, "contradicted"),
    (-0.03, -0.01, "worse", None, "supported"),
    (-0.03, 0.01, "worse", None, "not shown"),
    (0.01, 0.03, "worse", None, "contradicted"),
    (-0.004, 0.008, "similar", 0.01, "supported"),
    (-0.01, 0.01, "similar", 0.01, "supported"),  # the margin's own bounds are inside
    (-0.004, 0.012, "similar", 0.01, "not shown"),
    (0.011, 0.03, "similar", 0.01, "contradicted"),
    (-0.05, -0.02, "similar", 0.01, "contradicted"),
    (0.0, 0.0, "similar", 0.01, "supported"),
    (0.0, 0.0, "better", None, "not shown"),
])
def test_verdict(low, high, direction, margin, expected):
    assert compare.verdict(low, high, direction, margin) == expected


def test_similar_needs_a_margin():
    with pytest.raises(ValueError, match="'similar' needs a margin"):
        compare.verdict(-0.01, 0.01, "similar")


def test_better_takes_no_margin():
    with pytest.raises(ValueError, match="takes no margin"):
        compare.verdict(0.01, 0.02, "better", 0.01)


def test_an_unknown_direction_names_the_valid_ones():
    with pytest.raises(ValueError, match="better, worse, similar"):
        compare.verdict(0.01, 0.02, "higher")


@pytest.mark.parametrize("low, high", [(0.02, 0.01), (float("nan"), 0.01)])
def test_an_interval_upside_down_or_undefined_is_refused(low, high):
    with pytest.raises(ValueError, match="expected two numbers, low not above high"):
        compare.verdict(low, high, "better")
