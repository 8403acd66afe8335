"""Stage 4, split: train / validation / test parts.

- `random`: image level, as the report did (patients leak across parts; the metrics say by how much).
- `patient`: grouped by patient (the default), optionally stratified by each patient's rarest label.
- `official`: NIH's train_val / test lists, with a patient-grouped validation part carved out of
  train_val; with image counts in `split.official.sizes`, each part is exactly that many images, drawn by
  patient within its list (the report's findings-only table: 32,400 / 3,620 / 15,731).
`split.drop_no_finding` first drops the images labelled only No Finding; `split.fraction` then keeps a
patient-grouped subset (the report's 10% runs): of all the images before the split (`split.fraction_of: all`,
the report's '10% dataset'), or of the training part only after it (`train`: validation and test stay as the
whole data's split makes them).
Outputs: data/split/{train,val,test}.csv, metrics/split.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14 import labels
from cxr14 import metadata as md
from cxr14.atomic import read_csv, write_csv, write_json
from cxr14.params import PARAMS_FILE, ParamError, Section, load, section, seed

PARTS = ("train", "val", "test")
METHODS = ("random", "patient", "official")
FRACTION_OF = ("all", "train")  # split.fraction: a share of the whole data set, or of the training part only


@dataclass
class SplitConfig:
    method: str
    sizes: list[float] | None  # fractions summing to 1, image counts, or None (official: the lists as they are)
    counts: bool        # sizes are image counts
    val_fraction: float
    drop_no_finding: bool
    fraction: float
    fraction_of: str    # all: a subset before the split | train: the training part's subset after it
    stratify: bool
    seed: int


# What each method's sizes may be: every method has its own `split.<method>.sizes`, so that switching
# split.method alone (`-S split.method=patient`) never leaves another method's sizes behind.
VALID_SIZES = {
    "official": "null (NIH's lists as they are, validation by split.official.val_fraction) or three image counts "
                "such as [32400, 3620, 15731]",
    "patient": "three fractions that sum to 1, such as [0.7, 0.1, 0.2]",
    "random": "three fractions that sum to 1, such as [0.7, 0.1, 0.2], or three image counts such as "
              "[76200, 9478, 25250]",
}


def check(params: dict) -> SplitConfig:
    settings = section(params, "split")
    method = settings.choice("method", METHODS)
    methods = {name: settings.section(name) for name in METHODS}  # all three are checked: a typo anywhere is found
    read = {name: _sizes(part, name) for name, part in methods.items()}
    # 1 would leave no train part
    val_fraction = methods["official"].number("val_fraction", low=0, high=1, low_open=True, high_open=True)
    for part in methods.values():
        part.finish()
    sizes, counts = read[method]
    config = SplitConfig(
        method=method, sizes=sizes, counts=counts, val_fraction=val_fraction,
        drop_no_finding=settings.boolean("drop_no_finding"),
        fraction=settings.number("fraction", low=0, high=1, low_open=True),
        fraction_of=settings.choice("fraction_of", FRACTION_OF),
        stratify=settings.boolean("stratify"),
        seed=seed(params),
    )
    settings.finish()
    return config


def _sizes(section: Section, method: str) -> tuple[list | None, bool]:
    """split.<method>.sizes: (the sizes, whether they are image counts)."""
    sizes, key, valid = section.get("sizes"), section.key("sizes"), VALID_SIZES[method]
    if sizes is None and method == "official":
        return None, False
    numbers = isinstance(sizes, list) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sizes)
    if not numbers or len(sizes) != 3 or any(s < 0 for s in sizes):
        raise ParamError(key, sizes, valid)
    counts = all(isinstance(s, int) for s in sizes) and sum(sizes) > 1
    if (not counts and abs(sum(sizes) - 1) > 1e-6) or (counts and method == "patient") \
            or (not counts and method == "official"):  # never silently ignored
        raise ParamError(key, sizes, valid)
    return sizes, counts


def patient_strata(index: pd.DataFrame) -> pd.Series:
    """Each patient's rarest label over all their images (No Finding if none), for stratified draws."""
    frequency = labels.counts(index["labels"])
    rank = {name: i for i, name in enumerate(sorted(frequency, key=frequency.get))}
    rarest = index["labels"].map(lambda text: min(labels.split_labels(text), key=rank.__getitem__, default=labels.NO_FINDING))
    return rarest.groupby(index["patient_id"]).agg(lambda names: min(names, key=rank.__getitem__))


def assign_patients(patients: pd.Series, fractions: list[float], rng: np.random.Generator,
                    strata: pd.Series | None) -> dict[int, int]:
    """Patient -> part number, each stratum cut by the fractions in a seeded random order."""
    if strata is None:
        groups = [patients.to_numpy()]
    else:
        of_these = strata.loc[patients.to_numpy()]
        groups = [g.index.to_numpy() for _, g in of_these.groupby(of_these)]
    bounds = np.cumsum(fractions)[:-1]
    part = {}
    carry = rng.random()  # a random start keeps small strata from always landing in the first part
    for group in groups:
        order = rng.permutation(np.sort(group))
        position = (np.arange(len(order)) + carry) / len(order)
        carry = rng.random()
        for pid, where in zip(order, np.searchsorted(bounds, position, side="right")):
            part[int(pid)] = int(where)
    return part


def subset_patients(index: pd.DataFrame, fraction: float, rng: np.random.Generator) -> pd.DataFrame:
    if fraction >= 1:
        return index
    patients = np.sort(index["patient_id"].unique())
    keep = rng.choice(patients, size=max(1, round(fraction * len(patients))), replace=False)
    return index[index["patient_id"].isin(keep)]


def draw_exact(patients: pd.Series, count: int, rng: np.random.Generator, part: str) -> np.ndarray:
    """Patients (index) whose images (values: images per patient) add up to exactly `count`, in a seeded
    random order. The smaller side is filled (what to take, or what to leave out), patient by patient,
    skipping any that would overshoot: one-image patients, plentiful in NIH, close the gap."""
    total = int(patients.sum())
    if count > total:
        raise ParamError("split.official.sizes", count, f"at most the {total} images there are for the {part} part")
    take = count <= total - count
    need = count if take else total - count
    order = rng.permutation(np.sort(patients.index.to_numpy()))
    chosen = []
    for pid in order:
        if need == 0:
            break
        if patients[pid] <= need:
            chosen.append(pid)
            need -= int(patients[pid])
    if need:
        raise ParamError("split.official.sizes", count, f"a count that whole patients can make up for the {part} part "
                         f"(the closest reached: {count - need if take else count + need})")
    return np.asarray(chosen if take else sorted(set(order) - set(chosen)))


def official_counts(index: pd.DataFrame, sizes: list[int], rng: np.random.Generator) -> np.ndarray:
    """Part number (0 train, 1 val, 2 test, -1 unused) of each image: exact counts within the official lists."""
    test = index["image"].isin(md.read_official_split()["test"]).to_numpy()
    per_patient = index.groupby("patient_id").size()
    train_val = per_patient.loc[np.unique(index.loc[~test, "patient_id"])]
    val = draw_exact(train_val, sizes[1], rng, "val")
    train = draw_exact(train_val.drop(val), sizes[0], rng, "train")
    test_patients = draw_exact(per_patient.loc[np.unique(index.loc[test, "patient_id"])], sizes[2], rng, "test")
    pid = index["patient_id"]
    return np.select([test & pid.isin(test_patients), ~test & pid.isin(val), ~test & pid.isin(train)], [2, 1, 0], -1)


def split(index: pd.DataFrame, config: SplitConfig) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng([config.seed, 4])
    if config.drop_no_finding:
        index = index[index["labels"] != labels.NO_FINDING]
    if config.fraction_of == "all":
        index = subset_patients(index, config.fraction, rng)
    strata = patient_strata(index) if config.stratify and config.method != "random" else None  # random: no groups
    if config.method == "random":
        order = rng.permutation(len(index))
        if config.counts:
            if sum(config.sizes) > len(index):
                raise ParamError("split.random.sizes", config.sizes,
                                 f"image counts that add up to at most the {len(index)} images there are")
            cuts = np.cumsum(config.sizes)
        else:
            cuts = np.round(np.cumsum(config.sizes) * len(index)).astype(int)
        part = np.zeros(len(index), dtype=int)
        part[order[cuts[0]:cuts[1]]] = 1
        part[order[cuts[1]:cuts[2]]] = 2
        part[order[cuts[2]:]] = -1  # counts that leave images over: unused
    elif config.method == "patient":
        where = assign_patients(pd.Series(np.sort(index["patient_id"].unique())), config.sizes, rng, strata)
        part = index["patient_id"].map(where).to_numpy()
    elif config.counts:
        part = official_counts(index, config.sizes, rng)
    else:
        official = md.read_official_split()
        test = index["image"].isin(official["test"]).to_numpy()
        train_val = np.sort(index.loc[~test, "patient_id"].unique())
        where = assign_patients(pd.Series(train_val), [1 - config.val_fraction, config.val_fraction], rng, strata)
        part = np.where(test, 2, index["patient_id"].map(where).fillna(0).to_numpy()).astype(int)
    parts = {name: index[part == i].reset_index(drop=True) for i, name in enumerate(PARTS)}
    if config.fraction_of == "train":  # after every draw above: validation and test are the whole data's
        parts["train"] = subset_patients(parts["train"], config.fraction, rng).reset_index(drop=True)
    empty = [name for name, rows in parts.items() if rows.empty]
    if empty:  # found here, not later in train or evaluate
        key, value = ("split.official.val_fraction", config.val_fraction) if config.method == "official" \
            and not config.counts and "test" not in empty else (f"split.{config.method}.sizes", config.sizes)
        raise ParamError(key, value, f"settings that leave images in every part: the {' and '.join(empty)} part "
                         f"of {len(index)} images ({config.method} split) would be empty")
    return parts


def summarize(parts: dict[str, pd.DataFrame]) -> dict:
    seen: dict[int, set[str]] = {}
    for name, frame in parts.items():
        for pid in frame["patient_id"].unique():
            seen.setdefault(int(pid), set()).add(name)
    return {
        **{name: {"images": len(frame), "patients": int(frame["patient_id"].nunique())} for name, frame in parts.items()},
        "patients_in_more_than_one_part": sum(len(s) > 1 for s in seen.values()),
        "positives": {name: labels.counts(frame["labels"]) for name, frame in parts.items()},
    }


def main(params_path: str = PARAMS_FILE, cropped: Path = Path("data/crop"), out: Path = Path("data/split"),
         metrics: Path = Path("metrics/split.json")) -> None:
    config = check(load(params_path))
    parts = split(read_csv(cropped / "index.csv"), config)
    for name, frame in parts.items():
        write_csv(out / f"{name}.csv", frame)
    summary = summarize(parts)
    write_json(metrics, summary)
    print(f"split ({config.method}): " + ", ".join(f"{n} {summary[n]['images']} images / {summary[n]['patients']} patients"
                                               for n in PARTS)
          + f"; {summary['patients_in_more_than_one_part']} patients in more than one part")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.split")
