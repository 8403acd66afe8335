"""Learning tasks: which labels a model predicts and which images each part uses.

- multilabel14: the 14 findings; an image labelled only No Finding is all zeros.
- multilabel15: No Finding as a 15th output, in the report's (alphabetical) order.
- multilabel14_findings_only: as multilabel14, with No-Finding-only images dropped from every part.
- binary: one finding against the rest; the training part keeps all positives plus
  `negatives_per_positive` random negatives for each (the report's balanced set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxr14 import labels as L
from cxr14 import params as P

KINDS = ("multilabel14", "multilabel15", "multilabel14_findings_only", "binary")


@dataclass
class Task:
    kind: str
    target: str
    negatives_per_positive: float

    @property
    def names(self) -> tuple[str, ...]:
        if self.kind == "binary":
            return (self.target,)
        return L.ALL_LABELS if self.kind == "multilabel15" else L.FINDINGS


def check(params: dict) -> Task:
    section = P.section(params, "task")
    task = Task(
        kind=section.choice("kind", KINDS),
        target=L.check_label(section.get("target"), "task.target", L.FINDINGS),
        negatives_per_positive=section.number("negatives_per_positive", low=0, low_open=True),
    )
    section.finish()
    return task


def select(frame: pd.DataFrame, task: Task, part: str, seed: int) -> pd.DataFrame:
    """The rows of one part (train, val, test) that the task uses."""
    if task.kind == "multilabel14_findings_only":
        return frame[frame["labels"] != L.NO_FINDING].reset_index(drop=True)
    if task.kind == "binary" and part == "train":
        positive = L.encode(frame["labels"], (task.target,))[:, 0].astype(bool)
        negatives = np.flatnonzero(~positive)
        wanted = min(len(negatives), round(task.negatives_per_positive * positive.sum()))
        chosen = np.random.default_rng([seed, 6]).choice(negatives, size=wanted, replace=False)
        return frame.iloc[np.sort(np.concatenate([np.flatnonzero(positive), chosen]))].reset_index(drop=True)
    return frame.reset_index(drop=True)


def targets(frame: pd.DataFrame, task: Task) -> np.ndarray:
    """float32 [N, outputs] of 0/1."""
    return L.encode(frame["labels"], task.names).astype(np.float32)
