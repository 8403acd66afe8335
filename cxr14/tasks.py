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

from cxr14 import labels
from cxr14.params import section

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
        return labels.ALL_LABELS if self.kind == "multilabel15" else labels.FINDINGS


def check(params: dict) -> Task:
    settings = section(params, "task")
    task = Task(
        kind=settings.choice("kind", KINDS),
        target=labels.check_label(settings.get("target"), "task.target", labels.FINDINGS),
        negatives_per_positive=settings.number("negatives_per_positive", low=0, low_open=True),
    )
    settings.finish()
    return task


def select(frame: pd.DataFrame, task: Task, part: str, seed: int) -> pd.DataFrame:
    """The rows of one part (train, val, test) that the task uses."""
    if task.kind == "multilabel14_findings_only":
        return frame[frame["labels"] != labels.NO_FINDING].reset_index(drop=True)
    if task.kind == "binary" and part == "train":
        positive = labels.encode(frame["labels"], (task.target,))[:, 0].astype(bool)
        negatives = np.flatnonzero(~positive)
        wanted = min(len(negatives), round(task.negatives_per_positive * positive.sum()))
        chosen = np.random.default_rng([seed, 6]).choice(negatives, size=wanted, replace=False)
        return frame.iloc[np.sort(np.concatenate([np.flatnonzero(positive), chosen]))].reset_index(drop=True)
    return frame.reset_index(drop=True)


def targets(frame: pd.DataFrame, task: Task) -> np.ndarray:
    """float32 [N, outputs] of 0/1."""
    return labels.encode(frame["labels"], task.names).astype(np.float32)
