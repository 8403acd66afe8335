"""The NIH reference files (tracked by git under data/reference/) and the image index format.

Every index file the stages write has at least the columns of INDEX_COLUMNS, one row per image.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

REFERENCE = Path("data/reference")
METADATA_FILE = "Data_Entry_2017_v2020.csv.gz"
ARCHIVES_FILE = "nih_image_archives.tsv"
BLACKLIST_DIR = "azure_blacklist"
BLACKLISTS = {
    "non_pa_ap_view": "blacklist_non_PA_AP_view.csv",
    "lower_quality": "blacklist_other_images_with_lower_quality.csv",
    "rotated": "blacklist_rotated_images.csv",
}
INDEX_COLUMNS = ["image", "patient_id", "follow_up", "view", "labels"]
_NIH_COLUMNS = {
    "Image Index": "image",
    "Patient ID": "patient_id",
    "Follow-up #": "follow_up",
    "View Position": "view",
    "Finding Labels": "labels",
}


def read_metadata(path: str | Path | None = None) -> pd.DataFrame:
    """NIH's Data_Entry CSV as an index: image, patient_id, follow_up, view, labels (plus age and sex)."""
    path = Path(path) if path else REFERENCE / METADATA_FILE
    raw = pd.read_csv(path, dtype={"Image Index": str, "Finding Labels": str})
    frame = raw.rename(columns={**_NIH_COLUMNS, "Patient Age": "age", "Patient Gender": "sex"})
    return frame[INDEX_COLUMNS + ["age", "sex"]].sort_values("image", ignore_index=True)


def read_archive_table(path: str | Path | None = None) -> pd.DataFrame:
    """The archive table: archive, url, bytes, md5, images (one row per archive, in NIH's order)."""
    path = Path(path) if path else REFERENCE / ARCHIVES_FILE
    table = pd.read_csv(path, sep="\t", dtype={"archive": str, "url": str, "md5": str})
    missing = {"archive", "url", "bytes", "md5", "images"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; expected archive, url, bytes, md5, images")
    return table


def read_blacklists(directory: str | Path | None = None) -> dict[str, set[str]]:
    """The Azure blacklist, by reason: one image name per line, no header."""
    directory = Path(directory) if directory else REFERENCE / BLACKLIST_DIR
    return {reason: set((directory / name).read_text().split()) for reason, name in BLACKLISTS.items()}


def read_official_split(directory: str | Path | None = None) -> dict[str, set[str]]:
    directory = Path(directory) if directory else REFERENCE
    return {part: set((directory / f"{part}_list.txt").read_text().split()) for part in ("train_val", "test")}


def archive_of_each_image(metadata: pd.DataFrame, table: pd.DataFrame) -> pd.Series:
    """Which archive holds each image: NIH packed the images in name order, `images` per archive."""
    names = metadata["image"].sort_values(ignore_index=True)
    if int(table["images"].sum()) != len(names):
        raise ValueError(f"the archive table lists {int(table['images'].sum())} images, the metadata {len(names)}")
    archive = table["archive"].repeat(table["images"].to_numpy()).to_numpy()
    return pd.Series(archive, index=names.to_numpy(), name="archive")
