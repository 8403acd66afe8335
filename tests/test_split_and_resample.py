"""Split methods (random, patient, official, subsets) and resampling to per-label targets."""

import json

import numpy as np
import pandas as pd
import pytest

from cxr14 import labels, metadata
from cxr14.params import ParamError, load
from stages import resample, split

from .conftest import write_params


@pytest.fixture(scope="module")
def index():
    """A 5,930-image slice of the real metadata, with rows as a crop index would have them."""
    rows = metadata.read_metadata()
    rows = rows[rows["patient_id"] <= 1600].reset_index(drop=True)
    return rows.assign(row=np.arange(len(rows)))


def run_split(project, index, settings):
    return split.split(index, split.check(load(write_params(project, {"split": settings}))))


def patients_in_several(parts):
    return split.summarize(parts)["patients_in_more_than_one_part"]


def test_patient_split_has_no_patient_in_two_parts(project, index):
    parts = run_split(project, index, {"method": "patient", "patient": {"sizes": [0.7, 0.1, 0.2]}})
    assert patients_in_several(parts) == 0
    assert sum(len(p) for p in parts.values()) == len(index)
    share = len(parts["test"]["patient_id"].unique()) / index["patient_id"].nunique()
    assert 0.17 < share < 0.23


def test_random_split_takes_image_counts_and_reports_the_leak(project, index):
    parts = run_split(project, index, {"method": "random", "random": {"sizes": [2000, 500, 1000]}})
    assert [len(parts[p]) for p in split.PARTS] == [2000, 500, 1000]
    assert patients_in_several(parts) > 50  # image-level splits leak patients, as the report's did


def test_random_split_counts_beyond_the_data_are_refused(project, index):
    with pytest.raises(ParamError, match="at most the"):
        run_split(project, index, {"method": "random", "random": {"sizes": [5000, 1000, 1000]}})


def test_official_split_keeps_nih_test_list_and_carves_validation_by_patient(project, index):
    parts = run_split(project, index, {"method": "official", "official": {"sizes": None, "val_fraction": 0.15}})
    official = metadata.read_official_split()
    assert set(parts["test"]["image"]) == set(index["image"]) & official["test"]
    assert set(parts["train"]["image"]) | set(parts["val"]["image"]) == set(index["image"]) & official["train_val"]
    assert patients_in_several(parts) == 0
    assert len(parts["val"]) > 0


def test_official_split_takes_exact_counts_by_patient_within_each_list(project, index):
    official = metadata.read_official_split()
    in_test = index["image"].isin(official["test"])
    sizes = [int((~in_test).sum()) - 700, 600, int(in_test.sum()) - 3]  # nearly all: the hard case for whole patients
    parts = run_split(project, index, {"method": "official", "official": {"sizes": sizes}})
    assert [len(parts[p]) for p in split.PARTS] == sizes
    assert set(parts["test"]["image"]) <= official["test"]
    assert set(parts["train"]["image"]) | set(parts["val"]["image"]) <= official["train_val"]
    assert patients_in_several(parts) == 0
    for rows in parts.values():  # whole patients: every image of a drawn patient is in its part
        assert rows.groupby("patient_id").size().equals(index[index["patient_id"].isin(rows["patient_id"])]
                                                        .groupby("patient_id").size())


def test_official_counts_beyond_a_list_name_the_key(project, index):
    with pytest.raises(ParamError) as caught:
        run_split(project, index, {"method": "official", "official": {"sizes": [100, 100, len(index)]}})
    assert caught.value.key == "split.official.sizes" and "for the test part" in str(caught.value)


def test_no_finding_images_can_be_dropped_before_splitting(project, index):
    parts = run_split(project, index, {"method": "official", "official": {"sizes": None}, "drop_no_finding": True})
    kept = pd.concat(parts.values())
    assert not (kept["labels"] == labels.NO_FINDING).any()
    assert len(kept) == (index["labels"] != labels.NO_FINDING).sum()


def test_fraction_keeps_whole_patients(project, index):
    parts = run_split(project, index, {"method": "patient", "fraction": 0.1})
    kept = pd.concat(parts.values())
    assert abs(kept["patient_id"].nunique() - 0.1 * index["patient_id"].nunique()) <= 1
    for pid, rows in kept.groupby("patient_id"):
        assert len(rows) == (index["patient_id"] == pid).sum()


@pytest.mark.parametrize("method", ["official", "patient", "random"])
def test_fraction_of_train_cuts_only_the_training_part(project, index, method):
    """split.fraction_of: train keeps validation and test those of the whole data's split (a 10% training part
    evaluated on the full run's test images); all (the default) cuts the data set first, so every part shrinks."""
    whole = run_split(project, index, {"method": method})
    tenth = run_split(project, index, {"method": method, "fraction": 0.1, "fraction_of": "train"})
    for part in ("val", "test"):
        assert tenth[part].equals(whole[part]), part
    kept = tenth["train"]
    assert set(kept["image"]) < set(whole["train"]["image"])
    if method != "random":  # the training part's patients, whole (random leaks patients into the other parts)
        assert abs(kept["patient_id"].nunique() - 0.1 * whole["train"]["patient_id"].nunique()) <= 1
        for pid, rows in kept.groupby("patient_id"):
            assert len(rows) == (whole["train"]["patient_id"] == pid).sum()
    everything = run_split(project, index, {"method": method, "fraction": 0.1, "fraction_of": "all"})
    assert len(everything["test"]) < 0.3 * len(whole["test"])  # the test set is cut too


def test_fraction_of_is_all_or_train(project, index):
    with pytest.raises(ParamError) as caught:
        run_split(project, index, {"fraction_of": "test"})
    assert caught.value.key == "split.fraction_of" and "all, train" in str(caught.value)


def test_stratified_split_spreads_rare_labels(project, index):
    parts = run_split(project, index, {"method": "patient", "stratify": True})
    for name in ("Hernia", "Pneumonia", "Fibrosis"):
        positives = [labels.counts(parts[p]["labels"])[name] for p in split.PARTS]
        assert all(n > 0 for n in positives), (name, positives)


def test_split_stage_writes_parts_and_counts(project, index):
    (project / "data/crop").mkdir(parents=True)
    index.to_csv(project / "data/crop/index.csv", index=False)
    split.main(write_params(project, {"split": {"method": "patient"}}))
    summary = json.loads((project / "metrics/split.json").read_text())
    for part in split.PARTS:
        frame = pd.read_csv(project / f"data/split/{part}.csv")
        assert summary[part]["images"] == len(frame)
        assert summary[part]["patients"] == frame["patient_id"].nunique()
    assert summary["patients_in_more_than_one_part"] == 0


def test_resample_hits_its_targets(index):
    targets = {"Hernia": 60, "Pneumonia": 150, "No Finding": 800}
    after = resample.resample(index, targets, seed=0)
    before_counts, counts = labels.counts(index["labels"]), labels.counts(after["labels"])
    assert counts["No Finding"] == 800  # never co-occurs, so undersampling is exact
    assert counts["Hernia"] >= 60 and counts["Pneumonia"] >= 150
    assert counts["Hernia"] - 60 <= counts["Hernia"] - before_counts["Hernia"]
    assert set(after["image"]) <= set(index["image"])  # copies of real rows, nothing invented


def test_resample_undersamples_a_finding_exactly_when_nothing_else_is_added(index):
    after = resample.resample(index, {"Infiltration": 300}, seed=0)
    assert labels.counts(after["labels"])["Infiltration"] == 300


def test_resample_without_targets_is_the_identity(index):
    assert resample.resample(index, {}, seed=0).equals(index)


def test_resample_stage_writes_the_report_table(project, index):
    (project / "data/split").mkdir(parents=True)
    index.to_csv(project / "data/split/train.csv", index=False)
    resample.main(write_params(project, {"resample": {"targets": {"Hernia": 50}}}))
    table = json.loads((project / "metrics/resample.json").read_text())["labels"]
    assert table["Hernia"]["target"] == 50 and table["Hernia"]["after"] >= 50
    assert table["Atelectasis"]["target"] == "same"
    assert len(pd.read_csv(project / "data/resample/train.csv")) > len(index) - 1


def test_unique_counts_are_images_with_that_label_alone():
    frame = pd.Series(["Hernia", "Hernia|Mass", "No Finding", "Mass", "Mass", "Effusion|Mass|Nodule"])
    counts = resample.unique_counts(frame)
    assert (counts["Hernia"], counts["Mass"], counts["No Finding"], counts["Nodule"]) == (1, 2, 1, 0)
    assert set(counts) == set(labels.ALL_LABELS)


def test_resample_metrics_hold_the_reports_unique_label_counts_before_and_after(project, index):
    """The report's 15-label resampling table has 'Total occurrence of a unique label in original dataset'
    beside the label counts: images whose only label is that one."""
    (project / "data/split").mkdir(parents=True)
    index.to_csv(project / "data/split/train.csv", index=False)
    resample.main(write_params(project, {"resample": {"targets": {"Hernia": 50, "No Finding": 800}}}))
    table = json.loads((project / "metrics/resample.json").read_text())["labels"]
    after = pd.read_csv(project / "data/resample/train.csv")
    for name in ("Hernia", "Effusion", "No Finding"):
        assert table[name]["unique_before"] == int((index["labels"] == name).sum())
        assert table[name]["unique_after"] == int((after["labels"] == name).sum())
        assert table[name]["unique_before"] <= table[name]["before"]
    assert table["No Finding"]["unique_before"] == table["No Finding"]["before"]
    assert table["No Finding"]["unique_after"] == 800
