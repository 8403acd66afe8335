"""Copies in NIH's format that are not NIH's archives: Kaggle's random sample (sample/images/*.png beside
sample_labels.csv) and a user's own images listed by a Data_Entry-style CSV (data.metadata), checked
whole with one-line errors; and the warning for labels with too few positive images."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr14 import labels, metadata, packed_images
from cxr14.atomic import read_csv
from cxr14.params import ParamError, StageError
from stages import crop, download, filter

from .conftest import params_with, write_params

# Kaggle's sample_labels.csv (and NIH's Data_Entry_2017.csv): ages written as 060Y
KAGGLE_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                 "View Position", "OriginalImageWidth", "OriginalImageHeight", "OriginalImagePixelSpacing_x",
                 "OriginalImagePixelSpacing_y"]


def write_pngs(folder, names, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        pixels = np.full((48, 48), (40 + 10 * i) % 256, dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / name)


def own_rows(count, labels_of=lambda i: "No Finding"):
    """A hospital's own images: names NIH never used, two images a patient."""
    return pd.DataFrame({"Image Index": [f"hosp_{i:04d}.png" for i in range(count)],
                         "Finding Labels": [labels_of(i) for i in range(count)],
                         "Follow-up #": [i % 2 for i in range(count)],
                         "Patient ID": [900000 + i // 2 for i in range(count)],
                         "Patient Age": [40 + i for i in range(count)],
                         "Patient Gender": ["F" if i % 3 else "M" for i in range(count)],
                         "View Position": ["PA" if i % 4 else "AP" for i in range(count)]})


@pytest.fixture
def own_copy(tmp_path_factory):
    """A hospital's 12 PNGs and their Data_Entry-style CSV: 3 images Effusion|Mass, 9 No Finding."""
    folder = tmp_path_factory.mktemp("hospital")
    rows = own_rows(12, lambda i: "Effusion|Mass" if i < 3 else "No Finding")
    write_pngs(folder / "png", rows["Image Index"])
    rows.to_csv(folder / "labels.csv", index=False)
    return folder


def download_own(project, folder, csv):
    download.main(write_params(project, {"data": {"source": "local", "local_dir": str(folder),
                                                  "metadata": str(csv)}}))
    return read_csv(project / "data/raw/metadata.csv"), json.loads((project / "metrics/download.json").read_text())


# ---------------------------------------------------------------- your own Data_Entry-style CSV

def test_own_metadata_lists_the_images(project, own_copy):
    kept, counts = download_own(project, own_copy, own_copy / "labels.csv")
    assert list(kept["image"]) == [f"hosp_{i:04d}.png" for i in range(12)]
    assert list(kept["labels"][:4]) == ["Effusion|Mass"] * 3 + ["No Finding"]
    assert (counts["metadata_images"], counts["found"], counts["missing"], counts["patients"]) == (12, 12, 0, 6)


def test_own_metadata_needs_only_the_four_columns_the_stages_read(project, own_copy):
    rows = pd.read_csv(own_copy / "labels.csv")
    rows[["Image Index", "Finding Labels", "Patient ID", "View Position"]].to_csv(own_copy / "labels.csv", index=False)
    kept, _ = download_own(project, own_copy, own_copy / "labels.csv")
    assert len(kept) == 12
    assert (kept["follow_up"] == "").all() and (kept["age"] == "").all()  # left empty, as read back from the CSV


def test_images_the_metadata_does_not_list_are_counted(project, own_copy):
    write_pngs(own_copy / "png", ["not_listed_1.png", "not_listed_2.png"])
    kept, counts = download_own(project, own_copy, own_copy / "labels.csv")
    assert len(kept) == 12 and counts["unlisted"] == 2


def test_a_metadata_row_without_its_image_is_counted_missing(project, own_copy):
    (own_copy / "png/hosp_0005.png").unlink()
    kept, counts = download_own(project, own_copy, own_copy / "labels.csv")
    assert "hosp_0005.png" not in set(kept["image"]) and (counts["found"], counts["missing"]) == (11, 1)


def bad_metadata_cases():
    """(what is wrong, how to make it from good rows, what the error says)."""
    def no_column(rows, path):
        rows.drop(columns="View Position").to_csv(path, index=False)

    def unknown_label(rows, path):
        rows.loc[5, "Finding Labels"] = "Effusion|Pneumonitis"
        rows.to_csv(path, index=False)

    def misspelt_label(rows, path):
        rows.loc[2, "Finding Labels"] = "pleural thickening"
        rows.to_csv(path, index=False)

    def duplicate_names(rows, path):
        rows.loc[7, "Image Index"] = rows.loc[3, "Image Index"]
        rows.loc[9, "Image Index"] = rows.loc[1, "Image Index"]
        rows.to_csv(path, index=False)

    def not_a_csv(rows, path):
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")

    def tab_separated(rows, path):
        rows.to_csv(path, index=False, sep="\t")

    def empty_labels(rows, path):
        rows.loc[4, "Finding Labels"] = ""
        rows.to_csv(path, index=False)

    def patient_not_a_number(rows, path):
        rows["Patient ID"] = rows["Patient ID"].astype(str)
        rows.loc[6, "Patient ID"] = "P-17"
        rows.to_csv(path, index=False)

    def patient_too_large(rows, path):  # more than a 64-bit integer holds
        rows["Patient ID"] = rows["Patient ID"].astype(str)
        rows.loc[3, "Patient ID"] = "99999999999999999999"
        rows.to_csv(path, index=False)

    all_labels = re.escape(", ".join(labels.ALL_LABELS))
    return [
        (no_column, r"labels\.csv: no column View Position \(its header: Image Index, Finding Labels, .*\); a "
                    r"Data_Entry-style CSV has the columns Image Index, Patient ID, View Position, Finding Labels"),
        (unknown_label, r"labels\.csv, the row of hosp_0005\.png, column Finding Labels: unknown label 'Pneumonitis'; "
                        rf"the labels are {all_labels}, separated by \|"),
        (misspelt_label, r"unknown label 'pleural thickening' \(did you mean Pleural_Thickening\?\)"),
        (duplicate_names, r"labels\.csv, column Image Index: 2 image names are listed more than once "
                          r"\(hosp_0001\.png, hosp_0003\.png\)"),
        (not_a_csv, r"labels\.csv: not a readable Data_Entry-style CSV \('utf-8' codec can't decode"),
        (tab_separated, r"labels\.csv: the columns are separated by tabs"),
        (empty_labels, r"labels\.csv, line 6 \(hosp_0004\.png\), column Finding Labels: empty \(write No Finding"),
        (patient_not_a_number, r"labels\.csv, line 8 \(hosp_0006\.png\), column Patient ID: 'P-17' is not a whole number"),
        (patient_too_large, r"labels\.csv, line 5 \(hosp_0003\.png\), column Patient ID: 99999999999999999999 is too "
                            r"large \(at most 9223372036854775807\)"),
    ]


@pytest.mark.parametrize("make_bad, message", bad_metadata_cases(), ids=lambda case: getattr(case, "__name__", ""))
def test_bad_own_metadata_is_one_line_naming_the_file(project, own_copy, make_bad, message):
    make_bad(pd.read_csv(own_copy / "labels.csv"), own_copy / "labels.csv")
    with pytest.raises(StageError, match=message) as caught:
        download_own(project, own_copy, own_copy / "labels.csv")
    assert "\n" not in str(caught.value) and str(own_copy / "labels.csv") in str(caught.value)
    assert not (project / "data/raw/metadata.csv").exists()


def test_own_metadata_goes_with_a_local_folder_only(own_copy):
    with pytest.raises(ParamError, match="data.metadata = .*expected NIH's metadata, .* with data.source synthetic"):
        download.check(params_with({"data": {"source": "synthetic", "metadata": str(own_copy / "labels.csv")}}))


@pytest.mark.parametrize("key", ["metadata", "download.archives_table"])
def test_a_file_named_in_params_is_written_as_dvc_reads_it(own_copy, key):
    """dvc.yaml makes it a dep of download (`${data.metadata}`), and DVC does not expand ~."""
    with pytest.raises(ParamError, match=f"data.{key} = '~/labels.csv' .*does not expand ~"):
        download.check(params_with({"data.source": "local", "data.local_dir": str(own_copy), f"data.{key}": "~/labels.csv"}))


def test_own_metadata_that_is_not_there_stops_the_check(own_copy):
    with pytest.raises(ParamError, match="data.metadata = .*no file is there"):
        download.check(params_with({"data": {"source": "local", "local_dir": str(own_copy),
                                             "metadata": str(own_copy / "lables.csv")}}))


def test_own_images_without_data_metadata_point_at_the_csv(project, own_copy):
    with pytest.raises(FileNotFoundError, match=r"none of its 12 images .* is listed in NIH's metadata: .*set "
                                                r"data\.metadata to your Data_Entry-style CSV \(such as .*labels\.csv\)"):
        download.main(write_params(project, {"data": {"source": "local", "local_dir": str(own_copy)}}))


def test_follow_ups_and_ages_too_large_for_a_number_are_left_empty(tmp_path):
    rows = own_rows(3).assign(**{"Follow-up #": ["1", "99999999999999999999", "2"],
                                 "Patient Age": ["99999999999999999999", "045Y", "99999999999999999999Y"]})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    read = metadata.read_metadata(tmp_path / "labels.csv")
    assert read["follow_up"].tolist() == [1, pd.NA, 2] and read["age"].tolist() == [pd.NA, 45, pd.NA]


# ---------------------------------------------------------------- a data set the filter keeps nothing of

@pytest.mark.parametrize("views, names, changes, says", [
    ("LL", None, {}, r"their views are LL 6; filter\.views = \['PA', 'AP'\] keeps 0, and the Azure blacklist "
                     r"\(filter\.blacklist: true\) removed 0 of those\. The models take frontal chest X-rays: "
                     r"filter\.views can name only PA and AP"),
    ("AP", None, {"filter": {"views": ["PA"]}}, r"their views are AP 6; filter\.views = \['PA'\] keeps 0, .*\. Add AP "
                                                r"to filter\.views"),
    ("PA", "blacklisted", {}, r"their views are PA 6; filter\.views = \['PA', 'AP'\] keeps 6, and the Azure blacklist "
                              r"\(filter\.blacklist: true\) removed 6 of those\. Set filter\.blacklist: false"),
], ids=["lateral-only", "views-left-out", "all-blacklisted"])
def test_a_filter_that_keeps_no_image_stops_saying_why(project, tmp_path_factory, views, names, changes, says):
    folder = tmp_path_factory.mktemp("nothing_kept")
    rows = own_rows(6).assign(**{"View Position": views})
    if names:  # NIH images of the Azure blacklist, as a hospital's export could hold
        rows["Image Index"] = sorted(set().union(*metadata.read_blacklists().values()))[:6]
    write_pngs(folder, rows["Image Index"])
    rows.to_csv(folder / "labels.csv", index=False)
    params = write_params(project, {"data": {"source": "local", "local_dir": str(folder),
                                             "metadata": str(folder / "labels.csv")}, **changes})
    download.main(params)
    with pytest.raises(StageError, match=r"no image is kept of the 6 in data/raw/metadata\.csv: " + says) as caught:
        filter.main(params)
    assert "\n" not in str(caught.value)
    assert not (project / "data/filter/index.csv").exists()


# ---------------------------------------------------------------- Kaggle's random sample

@pytest.fixture
def kaggle_sample(tmp_path_factory):
    """Kaggle's 'Random Sample of NIH Chest X-rays' in miniature: sample/images/*.png (grey and RGBA, as
    in the real sample) and sample_labels.csv with its header and 060Y ages; a lateral-free mix of views."""
    folder = tmp_path_factory.mktemp("kaggle_sample")
    nih = metadata.read_metadata()
    rows = pd.concat([nih[nih["view"] == "PA"].head(10), nih[nih["view"] == "AP"].head(4)]).sort_values("image")
    sample = pd.DataFrame({"Image Index": rows["image"], "Finding Labels": rows["labels"],
                           "Follow-up #": rows["follow_up"], "Patient ID": rows["patient_id"],
                           "Patient Age": [f"{age:03d}Y" for age in rows["age"]],
                           "Patient Gender": rows["sex"], "View Position": rows["view"],
                           "OriginalImageWidth": 2500, "OriginalImageHeight": 2048,
                           "OriginalImagePixelSpacing_x": 0.168, "OriginalImagePixelSpacing_y": 0.168})
    assert list(sample.columns) == KAGGLE_HEADER
    sample.to_csv(folder / "sample_labels.csv", index=False)
    names = list(sample["Image Index"])
    write_pngs(folder / "sample/images", names[::2])
    write_pngs(folder / "sample/images", names[1::2], mode="RGBA")
    return folder


def test_kaggle_sample_runs_through_download_filter_crop(project, kaggle_sample):
    params = write_params(project, {"data": {"source": "local", "local_dir": str(kaggle_sample),
                                             "metadata": str(kaggle_sample / "sample_labels.csv")}})
    for stage in (download, filter, crop):
        stage.main(params)
    listed = pd.read_csv(kaggle_sample / "sample_labels.csv")
    raw = read_csv(project / "data/raw/metadata.csv")
    assert list(raw["image"]) == sorted(listed["Image Index"])
    assert list(raw["age"].astype(int)) == [int(age[:-1]) for age in listed.sort_values("Image Index")["Patient Age"]]
    blacklisted = set().union(*metadata.read_blacklists().values())
    index = read_csv(project / "data/crop/index.csv")
    assert set(index["image"]) == set(listed["Image Index"]) - blacklisted
    images = packed_images.load(project / "data/crop/images.npy")
    assert images.shape == (len(index), 32, 32)


def test_kaggle_sample_needs_no_metadata_setting(project, kaggle_sample):
    """Its images are NIH's, so NIH's metadata lists them: data.metadata as params.yaml has it works too."""
    download.main(write_params(project, {"data": {"source": "local", "local_dir": str(kaggle_sample)}}))
    raw = read_csv(project / "data/raw/metadata.csv")
    assert set(raw["image"]) == set(pd.read_csv(kaggle_sample / "sample_labels.csv")["Image Index"])


def test_kaggle_ages_become_whole_years(tmp_path):
    rows = own_rows(4).assign(**{"Patient Age": ["060Y", "011M", "005D", "45"]})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    assert list(metadata.read_metadata(tmp_path / "labels.csv")["age"]) == [60, 0, 0, 45]


# ---------------------------------------------------------------- too few positives, said before training

def test_labels_with_few_positives_are_a_warning_and_a_metric(project, own_copy, capsys):
    _, counts = download_own(project, own_copy, own_copy / "labels.csv")  # 3 Effusion|Mass, 9 No Finding
    expected = {name: 3 if name in ("Effusion", "Mass") else 0 for name in labels.FINDINGS}
    expected["No Finding"] = 9
    assert counts["few_positives"] == expected
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 15
    assert "warning: only 3 of the 12 images found are labelled Effusion (fewer than 10): its AUROC will be " \
           "undefined or unreliable" in warnings


def test_enough_positives_give_no_warning(project, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("many")
    findings = sorted(labels.FINDINGS)
    rows = own_rows(150, lambda i: findings[i % 14] if i < 140 else "No Finding")  # 10 of each label
    write_pngs(folder, rows["Image Index"])
    rows.to_csv(folder / "labels.csv", index=False)
    _, counts = download_own(project, folder, folder / "labels.csv")
    assert counts["few_positives"] == {}
    assert "warning: only" not in capsys.readouterr().err
