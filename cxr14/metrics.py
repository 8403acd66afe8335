"""Classification metrics per label: AUROC, AUPRC, patient-level bootstrap intervals, thresholds, calibration.

Point estimates come from scikit-learn. The bootstrap recomputes AUROC thousands of times, so it
uses the rank formula on all labels at once (equal to scikit-learn's, tested).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _defined(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def auroc(y: np.ndarray, p: np.ndarray, names: tuple[str, ...]) -> dict:
    """Per-label AUROC (None where the part has only one class), micro and macro averages."""
    per_label = {name: float(roc_auc_score(y[:, j], p[:, j])) if _defined(y[:, j]) else None
                 for j, name in enumerate(names)}
    defined = [v for v in per_label.values() if v is not None]
    return {
        "per_label": per_label,
        "micro": float(roc_auc_score(y.ravel(), p.ravel())) if _defined(y.ravel()) else None,
        "macro": float(np.mean(defined)) if defined else None,
    }


def auprc(y: np.ndarray, p: np.ndarray, names: tuple[str, ...]) -> dict:
    per_label = {name: float(average_precision_score(y[:, j], p[:, j])) if y[:, j].any() else None
                 for j, name in enumerate(names)}
    defined = [v for v in per_label.values() if v is not None]
    return {"per_label": per_label, "macro": float(np.mean(defined)) if defined else None}


def rank_auroc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUROC of every column at once (NaN where a column has one class): the Mann-Whitney U statistic."""
    ranks = rankdata(p, axis=0)
    positives = y.sum(axis=0)
    negatives = len(y) - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * y).sum(axis=0) - positives * (positives + 1) / 2
        return u / (positives * negatives)


def _ranked(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One label's rows in score order, whether each is positive, and its group of tied scores."""
    order = np.argsort(p, kind="stable")
    ordered = p[order]
    group = np.concatenate([[0], np.cumsum(ordered[1:] != ordered[:-1])])
    return order, y[order].astype(bool), group, int(group[-1]) + 1 if len(group) else 0


def _weighted_auroc(times: np.ndarray, order: np.ndarray, positive: np.ndarray, group: np.ndarray,
                    groups: int) -> float:
    """The AUROC of the rows repeated `times` times (a bootstrap resample), without building it: the
    Mann-Whitney statistic with ties counted as half, as rank_auroc's average ranks count them. One pass
    over the rows in score order instead of a sort of the resample: linear in the rows, for each round."""
    weight = times[order].astype(float)
    negatives = np.bincount(group, weight * ~positive, groups)
    positives = np.bincount(group, weight * positive, groups)
    below = np.cumsum(negatives) - negatives
    pairs = positives.sum() * negatives.sum()
    return float((positives * (below + negatives / 2)).sum() / pairs) if pairs else float("nan")


def bootstrap_auroc(y: np.ndarray, p: np.ndarray, patients: np.ndarray, rounds: int, seed: int,
                    level: float = 0.95) -> dict:
    """Percentile intervals for each label's AUROC and the macro AUROC, resampling whole patients."""
    rng = np.random.default_rng([seed, 7])
    ids, rows_of = np.unique(patients, return_inverse=True)
    ranked = [_ranked(y[:, j], p[:, j]) for j in range(y.shape[1])]
    per_label = np.full((rounds, y.shape[1]), np.nan)
    for r in range(rounds):
        times = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))[rows_of]
        per_label[r] = [_weighted_auroc(times, *label) for label in ranked]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no label has both classes
        macro = np.nanmean(per_label, axis=1)
    tail = (1 - level) / 2 * 100

    def interval(values):
        values = values[~np.isnan(values)]
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) else None

    return {"per_label": [interval(per_label[:, j]) for j in range(y.shape[1])], "macro": interval(macro)}


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: str | float) -> float:
    """A decision threshold: a fixed number as given, or from the validation part: best F1, or where
    precision meets recall."""
    if not isinstance(rule, str):
        return float(rule)
    if not y.any():
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]
    if rule == "pr_crossing":
        return float(thresholds[np.argmin(np.abs(precision - recall))])
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    return float(thresholds[np.argmax(f1)])


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    predicted = p >= threshold
    tp, fp = int((predicted & (y == 1)).sum()), int((predicted & (y == 0)).sum())
    fn, tn = int((~predicted & (y == 1)).sum()), int((~predicted & (y == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "sensitivity": recall, "specificity": tn / (tn + fp) if tn + fp else 0.0, "precision": precision,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "accuracy": (tp + tn) / len(y) if len(y) else 0.0,
    }


CALIBRATION_STRATEGIES = ("uniform", "quantile")


def reliability(y: np.ndarray, p: np.ndarray, bins: int, strategy: str = "uniform") -> dict:
    """One label's reliability curve: for each bin holding an image, the mean predicted probability, the
    observed frequency of positives and the image count. Bins are `uniform` (equal width on [0, 1]) or
    `quantile` (equal mass: edges at the quantiles of p). Binned as scikit-learn's calibration_curve (tested):
    (low, high], the first from 0; it returns no counts, and the error needs them."""
    if strategy not in CALIBRATION_STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {CALIBRATION_STRATEGIES}")
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1) if strategy == "uniform" else np.percentile(p, np.linspace(0, 100, bins + 1))
    ids = np.searchsorted(edges[1:-1], p)
    count = np.bincount(ids, minlength=bins)
    kept = count > 0
    return {"predicted": np.bincount(ids, weights=p, minlength=bins)[kept] / count[kept],
            "observed": np.bincount(ids, weights=y, minlength=bins)[kept] / count[kept],
            "count": count[kept]}


def expected_calibration_error(curve: dict) -> float | None:
    """The count-weighted mean gap between observed frequency and mean predicted probability over the bins."""
    total = curve["count"].sum()
    if not total:
        return None
    return float((curve["count"] * np.abs(curve["observed"] - curve["predicted"])).sum() / total)


def calibration(y: np.ndarray, p: np.ndarray, names: tuple[str, ...], bins: int) -> dict:
    """Per-label expected calibration error with equal-width bins (`ece`) and equal-mass bins (`ece_adaptive`),
    their macro averages, and each label's equal-width reliability curve."""
    curves = {name: reliability(y[:, j], p[:, j], bins) for j, name in enumerate(names)}
    ece = {name: expected_calibration_error(curve) for name, curve in curves.items()}
    adaptive = {name: expected_calibration_error(reliability(y[:, j], p[:, j], bins, "quantile")) if len(y) else None
                for j, name in enumerate(names)}

    def macro(values):
        defined = [v for v in values.values() if v is not None]
        return float(np.mean(defined)) if defined else None

    return {"ece": ece, "ece_macro": macro(ece), "ece_adaptive": adaptive, "ece_adaptive_macro": macro(adaptive),
            "curves": curves}


def print_table(task, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"test AUROC ({task.kind}, {result['images']} images)")
    for column in ("label", "positives", "AUROC", "95% CI", "AUPRC", "ECE"):
        table.add_column(column, justify="left" if column == "label" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name in task.names:
        ci = result.get("auroc_ci", {}).get(name)
        table.add_row(name, str(result["positives"][name]), fmt(result["auroc"][name]),
                      "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}", fmt(result["auprc"][name]),
                      fmt(result.get("ece", {}).get(name)))
    ci = result.get("auroc_macro_ci")
    table.add_row("macro average", "", fmt(result["auroc_macro"]), "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}",
                  fmt(result["auprc_macro"]), fmt(result.get("ece_macro")), style="bold")
    table.add_row("micro average", "", fmt(result["auroc_micro"]), "", "", "")
    Console().print(table)
