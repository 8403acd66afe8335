"""The NIH reference files (tracked by git under data/reference/) and the image index format.

Every index file the stages write has at least the columns of INDEX_COLUMNS, one row per image.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from cxr14.params import StageError

REFERENCE = Path("data/reference")
METADATA_FILE = "Data_Entry_2017_v2020.csv.gz"
ARCHIVES_FILE = "nih_image_archives.tsv"
BLACKLIST_DIR = "azure_blacklist"
BLACKLISTS = {
    "non_pa_ap_view": "blacklist_non_PA_AP_view.csv",
    "lower_quality": "blacklist_other_images_with_lower_quality.csv",
    "rotated": "blacklist_rotated_images.csv",
}
ARCHIVE_COLUMNS = ("archive", "url", "bytes", "md5", "images")
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
    """The archive table: archive, url, bytes, md5, images (one row per archive, in NIH's order).

    Checked whole before any transfer: a tab-separated file with those columns, each archive named
    once, `bytes` and `images` whole numbers, `md5` 32 hex digits or empty (a mirror without MD5s).
    MD5s come back in lower case, "" where the table gives none; the file's path is in `table.attrs`.
    """
    path = Path(path) if path else REFERENCE / ARCHIVES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the archive table is not there (data.download.archives_table)")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise StageError(f"{path}: not a tab-separated archive table: {str(error).strip().splitlines()[0]}") from None
    table.columns = [str(c).strip() for c in table.columns]
    if len(table.columns) == 1 and "," in table.columns[0]:
        raise StageError(f"{path}: the columns are separated by commas; the archive table is tab-separated "
                         f"(columns {', '.join(ARCHIVE_COLUMNS)})")
    missing = [c for c in ARCHIVE_COLUMNS if c not in table.columns]
    if missing:
        raise StageError(f"{path}: no column {', '.join(missing)}; the header must name "
                         f"{', '.join(ARCHIVE_COLUMNS)} (tab-separated)")
    table = table[list(ARCHIVE_COLUMNS)].apply(lambda column: column.str.strip())
    for line, row in enumerate(table.itertuples(index=False), start=2):
        where = f"{path}, line {line} ({row.archive or 'no archive name'})"
        if not row.archive or "/" in row.archive:
            raise StageError(f"{where}, column archive: {row.archive!r} is not a file name")
        if not row.url:
            raise StageError(f"{where}, column url: empty")
        for column, what in (("bytes", "a whole number of bytes, such as 3562107 (not 3.5MB)"),
                             ("images", "a whole number of images")):
            value = getattr(row, column)
            if not value.isdigit() or int(value) == 0:
                raise StageError(f"{where}, column {column}: {value!r} is not {what}")
        if row.md5 and not re.fullmatch(r"[0-9a-fA-F]{32}", row.md5):
            raise StageError(f"{where}, column md5: {row.md5!r} is not 32 hex digits (leave it empty for no MD5)")
    twice = sorted(set(table["archive"][table["archive"].duplicated()]))
    if twice:
        raise StageError(f"{path}, column archive: {', '.join(twice)} named more than once")
    table = table.astype({"bytes": "int64", "images": "int64"}).assign(md5=table["md5"].str.lower())
    table.attrs["path"] = str(path)
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
        raise StageError(f"{table.attrs.get('path', 'the archive table')}, column images: adds up to "
                         f"{int(table['images'].sum()):,} images, the metadata lists {len(names):,}")
    archive = table["archive"].repeat(table["images"].to_numpy()).to_numpy()
    return pd.Series(archive, index=names.to_numpy(), name="archive")
