"""The synthetic data set: NIH-shaped, deterministic, labelled as the real rows, blacklist degraded."""

import hashlib
import tarfile

import numpy as np
import pandas as pd

from cxr14 import labels, metadata, synthetic
from cxr14.atomic import read_csv
from cxr14.images import iter_archive, open_image, to_gray
from stages import download

from .conftest import write_params


def digest(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar.gz"))}


def test_same_seed_same_bytes(project):
    params = write_params(project, {"data": {"synthetic": {"images": 60}}})
    download.main(params)
    first = digest(project / "data/raw/archives")
    download.main(params)
    assert digest(project / "data/raw/archives") == first
    download.main(write_params(project, {"seed": 4, "data": {"synthetic": {"images": 60}}}))
    assert digest(project / "data/raw/archives") != first


def test_rows_are_real_metadata_rows_in_nih_named_archives(project):
    download.main(write_params(project, {"data": {"synthetic": {"images": 80}}}))
    drawn = read_csv(project / "data/raw/metadata.csv")
    real = metadata.read_metadata().set_index("image")
    for row in drawn.itertuples():
        assert real.loc[row.image, "labels"] == row.labels
        assert real.loc[row.image, "patient_id"] == row.patient_id
    where = metadata.archive_of_each_image(metadata.read_metadata(), metadata.read_archive_table())
    for archive in (project / "data/raw/archives").glob("*.tar.gz"):
        with tarfile.open(archive) as tar:
            names = [m.name for m in tar.getmembers()]
        assert all(n.startswith("images/") and n.endswith(".png") for n in names)
        assert {where[n.split("/")[1]] for n in names} == {archive.name}


def test_whole_patients_are_drawn():
    real = metadata.read_metadata()
    drawn = synthetic.draw_patients(real, 500, 0, 20, seed=1)
    for pid, rows in drawn.groupby("patient_id"):
        assert len(rows) == (real["patient_id"] == pid).sum()


def test_stratified_draw_gives_every_label_its_positives():
    drawn = synthetic.draw_patients(metadata.read_metadata(), 600, 40, 20, seed=1)
    counts = labels.counts(drawn["labels"])
    assert all(counts[name] >= 40 for name in labels.FINDINGS)
    plain = labels.counts(synthetic.draw_patients(metadata.read_metadata(), 600, 0, 20, seed=1)["labels"])
    assert plain["Hernia"] < 40  # without stratification a small draw holds almost no Hernia


def test_each_finding_changes_the_image():
    row = pd.Series({"image": "00000001_000.png", "patient_id": 1, "view": "PA", "labels": "No Finding"})
    clean = synthetic.render_with_boxes(row, 128, seed=0)[0].astype(int)
    for name in labels.FINDINGS:
        sick_row = row.copy().set_axis(row.index).replace("No Finding", name)
        sick = synthetic.render_with_boxes(sick_row, 128, seed=0)[0].astype(int)
        assert np.abs(sick - clean).mean() > 0.5, name


def test_blacklisted_images_come_out_rotated_or_degraded():
    row = pd.Series({"image": "00000001_000.png", "patient_id": 1, "view": "PA", "labels": "Effusion"})
    clean = synthetic.render_with_boxes(row, 96, seed=0)[0]
    rotated = synthetic.render_with_boxes(row, 96, seed=0, blacklist_reason="rotated")[0]
    assert any(np.array_equal(rotated, np.rot90(clean, k)) for k in (1, 2, 3))
    degraded = synthetic.render_with_boxes(row, 96, seed=0, blacklist_reason="lower_quality")[0].astype(float)
    assert np.corrcoef(degraded.ravel(), clean.ravel())[0, 1] < 0.9
    assert degraded.std() < clean.std()


def test_blacklisted_names_in_the_archives_are_the_degraded_ones(project):
    download.main(write_params(project, {"data": {"synthetic": {"images": 1500}}}))
    drawn = read_csv(project / "data/raw/metadata.csv")
    reason = {name: r for r, names in metadata.read_blacklists().items() for name in names}
    hits = drawn[drawn["image"].isin(reason)]
    assert len(hits) >= 3, "a 1500-image draw holds some blacklisted images"
    found = {}
    for archive in (project / "data/raw/archives").glob("*.tar.gz"):
        found.update({name: to_gray(open_image(data)) for name, data in iter_archive(archive, set(hits["image"]))})
    for _, row in hits.iterrows():
        assert np.array_equal(found[row["image"]], synthetic.render_with_boxes(row, 64, 3, reason[row["image"]])[0])
        assert not np.array_equal(found[row["image"]], synthetic.render_with_boxes(row, 64, 3, None)[0])
