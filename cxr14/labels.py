"""The NIH ChestX-ray14 labels and their encodings for each task."""

from __future__ import annotations

import numpy as np
import pandas as pd

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"
# The report's 15-label order is alphabetical, which puts "No Finding" at index 10.
ALL_LABELS = tuple(sorted(FINDINGS + (NO_FINDING,)))


def split_labels(finding_labels: str) -> list[str]:
    """'Cardiomegaly|Effusion' -> ['Cardiomegaly', 'Effusion']."""
    return [name for name in str(finding_labels).split("|") if name]


def check_label(name: str, key: str, allowed: tuple[str, ...] = ALL_LABELS) -> str:
    from cxr14.params import ParamError

    if name not in allowed:
        raise ParamError(key, name, "one of " + ", ".join(allowed))
    return name


def encode(finding_labels: pd.Series, names: tuple[str, ...]) -> np.ndarray:
    """Multi-hot matrix [N, len(names)] of uint8: column j is 1 where the image carries names[j]."""
    column = {name: j for j, name in enumerate(names)}
    out = np.zeros((len(finding_labels), len(names)), dtype=np.uint8)
    for i, text in enumerate(finding_labels):
        for name in split_labels(text):
            j = column.get(name)
            if j is not None:
                out[i, j] = 1
    return out


def counts(finding_labels: pd.Series, names: tuple[str, ...] = ALL_LABELS) -> dict[str, int]:
    """How many images carry each label."""
    return {name: int(n) for name, n in zip(names, encode(finding_labels, names).sum(axis=0))}
