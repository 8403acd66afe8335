"""Is one column better than another? Intervals of the difference in AUROC, and a verdict on a claim.

The report draws its conclusions from differences of 0.01-0.03 in AUROC, one training run a column. A
per-column interval cannot say whether such a difference is real: two columns scored on the same test
images are correlated, and their intervals overlap even where the difference is clear. So:

- `delong`: the difference of two AUROCs on the same cases, its standard error and a test (DeLong,
  DeLong & Clarke-Pearson 1988), with Sun & Xu's (2014) midrank algorithm: O(n log n), not O(n_pos n_neg).
- `paired_difference`: the difference per label and averaged (macro, micro) between two columns given as
  one or more training runs (seeds) each, with an interval for both the test sample and the seeds.
- `verdict`: what such an interval says of a claim that A is better than, worse than or similar to B.

Library only: arrays in, numbers out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from scipy.stats import norm, rankdata

from cxr14.metrics import _ranked, _weighted_auroc

DIRECTIONS = ("better", "worse", "similar")
VERDICTS = ("supported", "not shown", "contradicted")


# ---------------------------------------------------------------- DeLong

class DeLong(NamedTuple):
    auroc_a: float
    auroc_b: float
    difference: float  # auroc_a - auroc_b
    se: float  # its standard error
    z: float  # difference / se
    p: float  # two-sided
    low: float  # the interval of the difference at `level`: difference -+ z_level * se
    high: float


def _binary(y, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{where}: y must be one 0/1 (or boolean) value per case, got shape {y.shape} "
                         f"and values {np.unique(y)[:5].tolist()}")
    return y.astype(bool)


def placements(y: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's structural components from midranks (Sun & Xu 2014): for each positive, the share
    of negatives it outscores (V10), for each negative the share of positives that outscore it (V01), ties
    counting half. The midrank of a positive among all cases less its midrank among the positives is the
    number of negatives below it: three sorts instead of comparing every pair."""
    positives, negatives = score[y], score[~y]
    m, n = len(positives), len(negatives)
    among_all = rankdata(np.concatenate([positives, negatives]))
    v10 = (among_all[:m] - rankdata(positives)) / n
    v01 = 1 - (among_all[m:] - rankdata(negatives)) / m
    return float(v10.mean()), v10, v01


def delong(y, score_a, score_b, level: float = 0.95) -> DeLong:
    """DeLong's test of two correlated AUROCs: the same cases, scored by two models. The variance of the
    difference is that of the difference of the structural components, over positives and negatives:
    Var(V10_a - V10_b) / m + Var(V01_a - V01_b) / n, which is the paper's S10 and S01 matrices contrasted
    with (1, -1). Identical scores give a difference of 0, z 0 and p 1 (as pROC's roc.test)."""
    y = _binary(y, "delong")
    score_a, score_b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    if score_a.shape != y.shape or score_b.shape != y.shape:
        raise ValueError(f"delong: y, score_a and score_b must have one value per case: shapes {y.shape}, "
                         f"{score_a.shape}, {score_b.shape}")
    m = int(y.sum())
    n = len(y) - m
    if m < 2 or n < 2:
        raise ValueError(f"delong: {m} positive and {n} negative cases; the variance needs at least 2 of each")
    auroc_a, v10_a, v01_a = placements(y, score_a)
    auroc_b, v10_b, v01_b = placements(y, score_b)
    difference = auroc_a - auroc_b
    se = float(np.sqrt(np.var(v10_a - v10_b, ddof=1) / m + np.var(v01_a - v01_b, ddof=1) / n))
    if se > 0:
        z = difference / se
    else:  # no variance: the same ranking, or both perfect or constant
        z = 0.0 if difference == 0 else float(np.copysign(np.inf, difference))
    half = float(norm.ppf(0.5 + level / 2)) * se
    return DeLong(auroc_a, auroc_b, difference, se, z, float(2 * norm.sf(abs(z))), difference - half, difference + half)


# ---------------------------------------------------------------- paired bootstrap over patients and seeds

def patient_resamples(patients, rounds: int, seed: int) -> Iterator[np.ndarray]:
    """For each round, how many times each image is in a resample of whole patients (drawn with replacement,
    as many as there are). The stream is metrics.bootstrap_auroc's: with the same seed, the per-column
    intervals and the paired ones resample the same patients."""
    rng = np.random.default_rng([seed, 7])
    ids, rows_of = np.unique(np.asarray(patients), return_inverse=True)
    for _ in range(rounds):
        yield np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))[rows_of]


def _seeds(per_seed, y: np.ndarray, column: str) -> list[np.ndarray]:
    """One column's predictions as a list of [images, labels] arrays, one a seed; a 2-D array is one seed."""
    runs = [per_seed] if isinstance(per_seed, np.ndarray) and per_seed.ndim == 2 else list(per_seed)
    if not runs:
        raise ValueError(f"paired_difference: column {column} has no seeds; give one [images, labels] array a seed")
    out = []
    for k, run in enumerate(runs):
        run = np.asarray(run, dtype=float)
        if run.shape != y.shape:
            raise ValueError(f"paired_difference: column {column}, seed {k}: scores of shape {run.shape}, "
                             f"labels of shape {y.shape}; both must be [images, labels] on the same test images")
        out.append(run)
    return out


def _ranked_runs(y: np.ndarray, runs: list[np.ndarray]) -> list[list[tuple]]:
    """Each seed's labels, then all its scores at once (micro), sorted once for every round to reuse."""
    return [[_ranked(y[:, j], p[:, j]) for j in range(y.shape[1])] + [_ranked(y.ravel(), p.ravel())] for p in runs]


def _aurocs(ranked_runs: list[list[tuple]], times: np.ndarray) -> np.ndarray:
    """[seeds, labels + 1]: each seed's AUROC per label, then micro, on the images weighted by `times`
    (NaN where a label has one class there)."""
    labels = len(ranked_runs[0]) - 1
    micro_times = np.repeat(times, labels)  # y.ravel() is image by image
    return np.array([[_weighted_auroc(times, *label) for label in run[:labels]] + [_weighted_auroc(micro_times, *run[labels])]
                     for run in ranked_runs])


def _seed_draw(rng: np.random.Generator, k_a: int, k_b: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeds of one round, drawn with replacement: the same positions for both columns when they have
    as many seeds (seed i of A with seed i of B), each column its own otherwise."""
    a = rng.integers(0, k_a, k_a)
    return a, (a if k_a == k_b else rng.integers(0, k_b, k_b))


def _summary(differences: np.ndarray, point: float, level: float) -> dict:
    kept = differences[np.isfinite(differences)]
    tail = (1 - level) / 2 * 100
    interval = [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))] if len(kept) else None
    return {"difference": None if np.isnan(point) else float(point), "interval": interval, "rounds": int(len(kept))}


def paired_difference(per_seed_a, per_seed_b, y, patients, rounds: int, seed: int, level: float = 0.95) -> dict:
    """AUROC of column A minus column B, each the mean over its seeds, per label, macro and micro, with a
    percentile interval that holds both sources of doubt:

    - the test sample: each round resamples whole patients, the same ones for both columns and every seed
      (`patient_resamples`), so that what the columns share (the same hard images) cancels out of the
      difference instead of widening it;
    - the training run: in the same round the seeds are resampled too (with replacement, as many as each
      column has) and each column is the mean of the drawn seeds. This is a two-stage bootstrap of the
      mean over seeds: the interval is for the difference between the two settings (the expected AUROC of
      a training run), which the report's words claim, not for one pair of runs; it narrows as seeds are
      added, and widens as they disagree. When both columns have as many seeds, seed i of A is drawn with
      seed i of B: runs with the same seed share their initialisation and data order, so the pairing takes
      that shared noise out; runs that share nothing are still independent pairs, so nothing is lost. With
      k seeds the bootstrap's seed variance is (k-1)/k of the usual estimate: with few seeds the interval
      is, if anything, narrow on that part.

    With one seed each it is the paired patient bootstrap. Identical columns give a difference of 0 in
    every round. A label with a single class in a resample is skipped in that round (its `rounds` counts
    those kept); the macro of a round averages the labels defined in it.

    per_seed_a, per_seed_b: a list of [images, labels] score arrays, one a training run (a 2-D array is one);
    y: the labels [images, labels], patients: one id an image; all on the same test images, in one order.
    Returns {"per_label": [{"difference", "interval", "rounds"}, ...], "macro": {...}, "micro": {...},
    "seeds": [k_a, k_b], "paired_seeds": bool}; a difference is None where the test set has one class."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"paired_difference: y must be [images, labels], got shape {y.shape}")
    runs_a, runs_b = _seeds(per_seed_a, y, "a"), _seeds(per_seed_b, y, "b")
    patients = np.asarray(patients)
    if patients.shape != (len(y),):
        raise ValueError(f"paired_difference: patients must be one id an image: shape {patients.shape}, "
                         f"{len(y)} images")
    if rounds < 1:
        raise ValueError(f"paired_difference: rounds {rounds}: expected 1 or more")
    labels = y.shape[1]
    ranked_a, ranked_b = _ranked_runs(y, runs_a), _ranked_runs(y, runs_b)
    everything = np.ones(len(y), dtype=np.int64)
    point = _aurocs(ranked_a, everything).mean(axis=0) - _aurocs(ranked_b, everything).mean(axis=0)
    seed_rng = np.random.default_rng([seed, 8])
    per_round = np.empty((rounds, labels + 1))
    for r, times in enumerate(patient_resamples(patients, rounds, seed)):
        drawn_a, drawn_b = _seed_draw(seed_rng, len(runs_a), len(runs_b))
        a, b = _aurocs(ranked_a, times), _aurocs(ranked_b, times)
        per_round[r] = a[drawn_a].mean(axis=0) - b[drawn_b].mean(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a round (or the test set) where no label has both classes
        macro_rounds = np.nanmean(per_round[:, :labels], axis=1)
        macro_point = np.nanmean(point[:labels])
    return {
        "per_label": [_summary(per_round[:, j], point[j], level) for j in range(labels)],
        "macro": _summary(macro_rounds, macro_point, level),
        "micro": _summary(per_round[:, labels], point[labels], level),
        "seeds": [len(runs_a), len(runs_b)],
        "paired_seeds": len(runs_a) == len(runs_b),
    }


# ---------------------------------------------------------------- verdict

def verdict(low: float, high: float, direction: str, margin: float | None = None) -> str:
    """What an interval of the difference A - B says of a claim: "supported", "not shown" or "contradicted".

    better: the interval above 0 supports it, below 0 contradicts it; worse: the mirror image. similar: an
    interval inside [-margin, +margin] supports it (every difference it allows is one the claim would call
    small), one entirely outside contradicts it. An interval touching the bound does not decide."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    if not low <= high:
        raise ValueError(f"interval [{low}, {high}]: expected two numbers, low not above high")
    if direction == "similar":
        if margin is None or not margin > 0:
            raise ValueError(f"direction 'similar' needs a margin above 0 (AUROC), got {margin!r}")
        if -margin <= low and high <= margin:
            return "supported"
        return "contradicted" if high < -margin or low > margin else "not shown"
    if margin is not None:
        raise ValueError(f"direction {direction!r} takes no margin (got {margin!r}): only 'similar' has one")
    above, below = low > 0, high < 0
    if direction == "worse":
        above, below = below, above
    return "supported" if above else "contradicted" if below else "not shown"
