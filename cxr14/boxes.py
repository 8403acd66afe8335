"""NIH's box list (BBox_List_2017): radiologists' boxes of eight findings, read and written in its format.

Its columns are `Image Index, Finding Label, Bbox [x,y,w,h]` with x, y, w, h in four cells (so pandas
names them `Bbox [x`, `y`, `w`, `h]`; NIH's header adds three empty ones): the box's top-left corner,
width and height in the pixels of the PNG (1024 x 1024 for NIH's images). In this repo: image, label,
x, y, w, h.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr14.atomic import write_csv
from cxr14.labels import FINDINGS
from cxr14.params import StageError

REFERENCE = Path("data/reference/BBox_List_2017.csv.gz")
# The findings of NIH's box list, in its order (the synthetic generator boxes the signs of these too).
BOXED_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                  "Pneumothorax")
NIH_COLUMNS = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
COLUMNS = ["image", "label", "x", "y", "w", "h"]


def read(path: str | Path) -> pd.DataFrame:
    """A box list in NIH's format as image, label, x, y, w, h (checked: known findings, sizes above zero)."""
    raw = pd.read_csv(path, dtype={"Image Index": str, "Finding Label": str})
    if len(raw.columns) < 6 or list(raw.columns[:2]) != NIH_COLUMNS[:2]:
        raise StageError(f"{path}: not a box list in NIH's format (its header: {', '.join(map(str, raw.columns[:6]))}); "
                         f"expected the columns {', '.join(NIH_COLUMNS)}")
    frame = raw.iloc[:, :6].set_axis(COLUMNS, axis=1)
    frame["label"] = frame["label"].replace({"Infiltrate": "Infiltration"})  # NIH's list spells it so
    unknown = sorted(set(frame["label"]) - set(FINDINGS))
    if unknown:
        raise StageError(f"{path}: unknown finding {unknown[0]!r} in Finding Label; the findings are {', '.join(FINDINGS)}")
    numbers = frame[["x", "y", "w", "h"]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1) | (numbers["w"] <= 0) | (numbers["h"] <= 0)
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise StageError(f"{path}, the box of {frame['image'].iloc[first]} ({frame['label'].iloc[first]}): "
                         "x, y, w, h must be numbers with w and h above zero")
    return frame.assign(**{c: numbers[c].astype(float) for c in ("x", "y", "w", "h")})


def write(path: str | Path, frame: pd.DataFrame) -> None:
    """image, label, x, y, w, h written in NIH's format (its header, without the three empty columns)."""
    write_csv(path, frame[COLUMNS].set_axis(NIH_COLUMNS, axis=1))
