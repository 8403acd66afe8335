"""Stage 5, resample: per-label target counts for the training part only.

Labels above their target are undersampled (random images carrying them are dropped), then labels
below it are oversampled with replacement, rarest first. Images carry several labels, so a label
may end above its target through the images added for another; the metrics show before, target
and after, laid out like the report's resampling tables, and beside them the images that carry that
label alone (unique_before, unique_after: the report's 'Total occurrence of a unique label'). Empty
targets: the training part as is.
Outputs: data/resample/train.csv, metrics/resample.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr14 import labels
from cxr14.atomic import read_csv, write_csv, write_json
from cxr14.params import PARAMS_FILE, ParamError, check_number, load, section, training_seed

MAX_TARGET = 1_000_000  # images per label; NIH has 112,120 images in all


def check(params: dict) -> tuple[dict[str, int], int]:
    settings = section(params, "resample")
    targets = settings.get("targets") or {}  # `targets:` left empty is off too
    if not isinstance(targets, dict):
        raise ParamError("resample.targets", targets, "a mapping of label to image count, such as {Hernia: 2500}")
    for name, count in targets.items():
        labels.check_label(name, f"resample.targets.{name}")
        # A bound keeps a typo (an extra zero or three) from building a training index that fills memory.
        check_number(f"resample.targets.{name}", count, low=0, high=MAX_TARGET, integer=True)
    settings.finish()
    return {name: int(n) for name, n in targets.items()}, training_seed(params)


def resample(train: pd.DataFrame, targets: dict[str, int], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, 5])
    carries = pd.DataFrame(labels.encode(train["labels"], labels.ALL_LABELS).astype(bool), columns=labels.ALL_LABELS)
    keep = np.ones(len(train), dtype=bool)
    for name, target in targets.items():  # undersample first, so oversampled copies are never dropped
        rows = np.flatnonzero(keep & carries[name].to_numpy())
        if len(rows) > target:
            keep[rng.choice(rows, size=len(rows) - target, replace=False)] = False
    picked = list(np.flatnonzero(keep))
    counts = carries[keep].sum()
    for name in sorted(targets, key=lambda n: counts[n]):
        deficit = targets[name] - int(counts[name])
        rows = np.flatnonzero(keep & carries[name].to_numpy())
        if deficit <= 0 or len(rows) == 0:
            continue
        extra = rng.choice(rows, size=deficit, replace=True)
        picked.extend(extra)
        counts += carries.iloc[extra].sum()
    return train.iloc[np.sort(np.asarray(picked, dtype=int))].reset_index(drop=True)


def unique_counts(finding_labels: pd.Series) -> dict[str, int]:
    """How many images carry each label and no other (the report's 'Total occurrence of a unique label'; every
    No Finding image is one)."""
    sets = [labels.split_labels(text) for text in finding_labels]
    alone = pd.Series([names[0] for names in sets if len(names) == 1], dtype=object).value_counts()
    return {name: int(alone.get(name, 0)) for name in labels.ALL_LABELS}


def main(params_path: str = PARAMS_FILE, split_dir: Path = Path("data/split"), out: Path = Path("data/resample"),
         metrics: Path = Path("metrics/resample.json")) -> None:
    targets, seed = check(load(params_path))
    train = read_csv(split_dir / "train.csv")
    after = resample(train, targets, seed)
    before_counts, after_counts = labels.counts(train["labels"]), labels.counts(after["labels"])
    alone_before, alone_after = unique_counts(train["labels"]), unique_counts(after["labels"])
    table = {name: {"before": before_counts[name], "target": targets.get(name, "same"), "after": after_counts[name],
                    "unique_before": alone_before[name], "unique_after": alone_after[name]}
             for name in labels.ALL_LABELS}
    write_csv(out / "train.csv", after)
    write_json(metrics, {"images_before": len(train), "images_after": len(after), "labels": table})
    print(f"resample: {len(train)} -> {len(after)} training images" + (" (no targets)" if not targets else ""))


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.resample")
