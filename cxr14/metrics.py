"""Classification metrics per label: AUROC, AUPRC, patient-level bootstrap intervals, thresholds.

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


def bootstrap_auroc(y: np.ndarray, p: np.ndarray, patients: np.ndarray, rounds: int, seed: int,
                    level: float = 0.95) -> dict:
    """Percentile intervals for each label's AUROC and the macro AUROC, resampling whole patients."""
    rng = np.random.default_rng([seed, 7])
    ids, rows_of = np.unique(patients, return_inverse=True)
    members = [np.flatnonzero(rows_of == i) for i in range(len(ids))]
    per_label = np.full((rounds, y.shape[1]), np.nan)
    for r in range(rounds):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        per_label[r] = rank_auroc(y[rows], p[rows])
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


def print_table(task, result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"test AUROC ({task.kind}, {result['images']} images)")
    for column in ("label", "positives", "AUROC", "95% CI", "AUPRC"):
        table.add_column(column, justify="left" if column == "label" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name in task.names:
        ci = result.get("auroc_ci", {}).get(name)
        table.add_row(name, str(result["positives"][name]), fmt(result["auroc"][name]),
                      "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}", fmt(result["auprc"][name]))
    ci = result.get("auroc_macro_ci")
    table.add_row("macro average", "", fmt(result["auroc_macro"]), "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}",
                  fmt(result["auprc_macro"]), style="bold")
    table.add_row("micro average", "", fmt(result["auroc_micro"]), "", "")
    Console().print(table)
