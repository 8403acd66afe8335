"""Is a difference real? The runs of a table's columns (one each, or several seeds: `cxr table run --seeds N`),
read through DVC, compared on the test images they share: the difference in AUROC between two columns with
an interval that holds both the test sample and the training runs (cxr14/compare.py: a paired patient
bootstrap over the seeds), and a verdict on each of the report's claims (tables.yaml `claims:`).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr14 import compare
from cxr14.labels import split_labels

PREDICTIONS = "data/evaluate/predictions.csv"


def column_runs(experiment: str, existing: set[str]) -> list[str]:
    """The experiments of one column: its seeds (EXP-s1, EXP-s2, ...) when there are any, else EXP itself."""
    seeded = re.compile(re.escape(experiment) + r"-s(\d+)$")
    runs = sorted((e for e in existing if seeded.match(e)), key=lambda e: int(seeded.match(e).group(1)))
    return runs or ([experiment] if experiment in existing else [])


def read_predictions(experiment: str) -> pd.DataFrame | None:
    """An experiment's test predictions (image, patient_id, labels, p_LABEL ...), read through DVC."""
    import dvc.api

    try:
        return pd.read_csv(io.StringIO(dvc.api.read(PREDICTIONS, rev=experiment)), dtype={"image": str})
    except Exception:  # not run, or its outputs are not in this repository's cache
        return None


@dataclass
class Paired:
    """Two columns' runs on the test images all of them share, in one order."""
    names: list[str]            # the labels both columns predict
    y: np.ndarray               # [images, labels] 0/1
    patients: np.ndarray
    a: list[np.ndarray]         # one [images, labels] score array a run
    b: list[np.ndarray]
    images: tuple[int, int, int]  # shared, column A's, column B's


def pair(runs_a: list[pd.DataFrame], runs_b: list[pd.DataFrame]) -> Paired:
    frames = [*runs_a, *runs_b]
    shared = sorted(set.intersection(*(set(f["image"]) for f in frames)))
    names = [c[2:] for c in runs_a[0].columns if c.startswith("p_") and all(c in f.columns for f in frames)]
    first = runs_a[0].set_index("image").loc[shared]
    y = np.stack([first["labels"].map(lambda text, n=n: n in split_labels(text)).to_numpy() for n in names],
                 axis=1).astype(int)

    def scores(frame: pd.DataFrame) -> np.ndarray:
        return frame.set_index("image").loc[shared, [f"p_{n}" for n in names]].to_numpy(dtype=float)

    return Paired(names, y, first["patient_id"].to_numpy(), [scores(f) for f in runs_a], [scores(f) for f in runs_b],
                  (len(shared), len(runs_a[0]), len(runs_b[0])))


def pick(result: dict, names: list[str], metric: str) -> dict:
    """The difference and interval of one metric: macro, micro, a label, or binary (the one output)."""
    if metric in ("macro", "micro"):
        return result[metric]
    return result["per_label"][0 if metric == "binary" else names.index(metric)]


def difference(runs_a: list[pd.DataFrame], runs_b: list[pd.DataFrame], metric: str, rounds: int, seed: int) -> dict:
    """A minus B on the images both were tested on: {difference, interval, seeds, images}."""
    paired = pair(runs_a, runs_b)
    if not len(paired.y):
        return {"difference": None, "interval": None, "seeds": [len(runs_a), len(runs_b)], "images": paired.images}
    result = compare.paired_difference(paired.a, paired.b, paired.y, paired.patients, rounds, seed)
    chosen = pick(result, paired.names, metric)
    return {"difference": chosen["difference"], "interval": chosen["interval"], "seeds": result["seeds"],
            "images": paired.images}


class Runs:
    """Every column's predictions, read once through DVC."""

    def __init__(self, existing: set[str]):
        self.existing, self.cache = existing, {}

    def of(self, table, column) -> list[pd.DataFrame]:
        key = table.experiment(column)
        if key not in self.cache:
            frames = [read_predictions(e) for e in column_runs(key, self.existing)]
            self.cache[key] = [f for f in frames if f is not None]
        return self.cache[key]


def claim_verdicts(table, runs: Runs, rounds: int, seed: int) -> list[dict]:
    """Each claim of the table with its measured difference, interval and verdict (or why there is none)."""
    out = []
    for claim in table.claims:
        (table_a, column_a), (table_b, column_b) = claim.sides
        entry = {"quote": claim.quote, "columns": claim.columns, "metric": claim.metric, "direction": claim.direction,
                 "margin": claim.margin, "note": claim.note, "difference": None, "interval": None, "verdict": None}
        if column_a.reference or column_b.reference:
            entry["verdict"] = "not testable: a column is figures only (reference)"
        elif not runs.of(table_a, column_a) or not runs.of(table_b, column_b):
            entry["verdict"] = "not run yet"
        else:
            found = difference(runs.of(table_a, column_a), runs.of(table_b, column_b), claim.metric, rounds, seed)
            entry.update(found)
            low, high = found["interval"] or (None, None)
            entry["verdict"] = "no shared test images" if low is None else \
                compare.verdict(low, high, claim.direction, claim.margin)
        out.append(entry)
    return out


def baseline_differences(table, runs: Runs, rounds: int, seed: int) -> dict[str, dict]:
    """Each run column against the table's first run column: the macro (or binary) AUROC difference."""
    columns = table.runnable
    metric = "binary" if table.task == "binary" else "macro"
    if not columns or not runs.of(table, columns[0]):
        return {}
    base = runs.of(table, columns[0])
    return {c.name: {**difference(runs.of(table, c), base, metric, rounds, seed), "against": columns[0].name,
                     "metric": metric}
            for c in columns[1:] if runs.of(table, c)}


def _interval(entry: dict) -> str:
    if entry.get("difference") is None:
        return "-"
    low, high = entry["interval"]
    return f"{entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(claims: list[dict], baseline: dict[str, dict]) -> str:
    """The differences against the first column, and the claims' verdicts, under the table."""
    lines = []
    if baseline:
        first = next(iter(baseline.values()))
        lines += ["", f"Difference in {first['metric']} AUROC against {first['against']}, with its 95% interval "
                  "(paired patient bootstrap on the shared test images, over the seeds):", "",
                  "| column | difference [95% interval] | seeds | shared test images |", "|---|---|---|---|"]
        lines += [f"| {name} | {_interval(e)} | {e['seeds'][0]} vs {e['seeds'][1]} | {e['images'][0]:,} |"
                  for name, e in baseline.items()]
    if claims:
        lines += ["", "The report's conclusions (tables.yaml `claims`), each A against B:", "",
                  "| verdict | claim | A - B [95% interval] | metric | quote |", "|---|---|---|---|---|"]
        for c in claims:
            relation = f"similar to (within {c['margin']:g})" if c["direction"] == "similar" else f"{c['direction']} than"
            lines.append(f"| **{c['verdict']}** | {c['columns'][0]} {relation} {c['columns'][1]} | "
                         f"{_interval(c)} | {c['metric']} | '{c['quote']}'" + (f" ({c['note']})" if c["note"] else "")
                         + " |")
        lines += ["", "supported: the interval excludes 0 in the claimed direction (similar: lies within the margin); "
                  "not shown: it does not decide; contradicted: it excludes the claim."]
    return "\n".join(lines) + ("\n" if lines else "")
