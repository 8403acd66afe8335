"""The NIH reference files (tracked by git under data/reference/) and the image index format.

Every index file the stages write has at least the columns of INDEX_COLUMNS, one row per image.
"""

from __future__ import annotations

import re
import zlib
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
# A Data_Entry-style CSV (NIH's, Kaggle's sample_labels.csv, a hospital's own export): the columns the
# stages need, and those kept when present (nothing downstream reads them; missing ones stay empty).
REQUIRED_COLUMNS = {
    "Image Index": "image",
    "Patient ID": "patient_id",
    "View Position": "view",
    "Finding Labels": "labels",
}
OPTIONAL_COLUMNS = {"Follow-up #": "follow_up", "Patient Age": "age", "Patient Gender": "sex"}
INT64_MAX = str(2 ** 63 - 1)  # the largest patient ID (pandas and numpy keep them as 64-bit integers)
_AGE = re.compile(r"^\s*(\d+)\s*([YMDymd]?)\s*$")  # 57 (v2020), 060Y (2017 files), a few 011M or 005D


def is_nih_metadata(path: str | Path) -> bool:
    """Whether data.metadata names NIH's own metadata (data/reference), rather than a user's CSV."""
    return Path(path).resolve() == (REFERENCE / METADATA_FILE).resolve()


def read_metadata(path: str | Path | None = None) -> pd.DataFrame:
    """A Data_Entry-style CSV as an index: image, patient_id, follow_up, view, labels (plus age and sex),
    sorted by image. None = NIH's (data/reference), otherwise the user's own (params: data.metadata).

    Checked whole, each problem one line naming the file (and the line): the columns of REQUIRED_COLUMNS
    (those of OPTIONAL_COLUMNS may be missing), nothing empty in them but View Position, image names
    given once, whole-number patient IDs (at most 2 ** 63 - 1). Ages become whole years (Kaggle's 060Y -> 60).
    """
    path = Path(path).expanduser() if path else REFERENCE / METADATA_FILE
    raw = _read_csv(path)
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if missing:
        shown = ", ".join(list(raw.columns[:8]) + (["..."] if len(raw.columns) > 8 else []))
        raise StageError(f"{path}: no column {', '.join(missing)} (its header: {shown}); a Data_Entry-style CSV "
                         f"has the columns {', '.join(REQUIRED_COLUMNS)} (and optionally {', '.join(OPTIONAL_COLUMNS)}), "
                         "comma-separated")
    raw = raw[[column for column in [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS] if column in raw.columns]]
    raw = raw.apply(lambda column: column.str.strip())
    for column in ("Image Index", "Patient ID", "Finding Labels"):
        _no_empty(path, raw, column)
    _unique_names(path, raw["Image Index"])
    frame = pd.DataFrame({
        "image": raw["Image Index"],
        "patient_id": _patient_ids(path, raw),
        "follow_up": _whole_numbers(raw.get("Follow-up #"), len(raw)),
        "view": raw["View Position"],
        "labels": _labels(raw),
        "age": _years(raw.get("Patient Age"), len(raw)),
        "sex": raw["Patient Gender"] if "Patient Gender" in raw.columns else "",
    })
    return frame.sort_values("image", ignore_index=True)


def _read_csv(path: Path) -> pd.DataFrame:
    """Every cell as text (column names stripped); a file that is not a CSV is one line naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the metadata CSV is not there (data.metadata)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError,
            zlib.error) as error:  # OSError: unreadable, or a .gz that is not gzip'd
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageError(f"{path}: not a readable Data_Entry-style CSV ({reason})") from None
    raw.columns = [str(column).strip() for column in raw.columns]
    if len(raw.columns) == 1 and "\t" in raw.columns[0]:
        raise StageError(f"{path}: the columns are separated by tabs; a Data_Entry-style CSV is comma-separated")
    return raw


def _line(raw: pd.DataFrame, row: int) -> str:
    """Where a row is, for an error: its line in the file (the header is line 1) and its image."""
    name = raw["Image Index"].iloc[row] if "Image Index" in raw.columns else ""
    return f"line {row + 2}" + (f" ({name})" if name else "")


def _no_empty(path: Path, raw: pd.DataFrame, column: str) -> None:
    empty = (raw[column] == "").to_numpy().nonzero()[0]
    if len(empty):
        hint = " (write No Finding for an image without findings)" if column == "Finding Labels" else ""
        more = f" and {len(empty) - 1} more rows" if len(empty) > 1 else ""
        raise StageError(f"{path}, {_line(raw, empty[0])}{more}, column {column}: empty{hint}")


def _unique_names(path: Path, names: pd.Series) -> None:
    twice = sorted(set(names[names.duplicated()]))
    if twice:
        shown = ", ".join(twice[:5]) + (", ..." if len(twice) > 5 else "")
        raise StageError(f"{path}, column Image Index: {len(twice)} image names are listed more than once "
                         f"({shown}); each image needs exactly one row")


def _patient_ids(path: Path, raw: pd.DataFrame) -> pd.Series:
    text = raw["Patient ID"]
    digits, fits = _whole(text)
    bad = (~digits).to_numpy().nonzero()[0]
    if len(bad):
        raise StageError(f"{path}, {_line(raw, bad[0])}, column Patient ID: {text.iloc[bad[0]]!r} is not a whole "
                         "number (patients are numbered, as in NIH's metadata: 1, 2, ...)")
    big = (~fits).to_numpy().nonzero()[0]
    if len(big):
        more = f" (and {len(big) - 1} more rows)" if len(big) > 1 else ""
        raise StageError(f"{path}, {_line(raw, big[0])}{more}, column Patient ID: {text.iloc[big[0]]} is too large "
                         f"(at most {INT64_MAX}); number the patients 1, 2, ... as NIH's metadata does")
    return text.astype("int64")


def _whole(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Which cells are whole numbers in the digits 0-9, and which of those fit a 64-bit integer."""
    digits = text.str.fullmatch(r"[0-9]+")
    short = text.str.lstrip("0")
    width = short.str.len()
    fits = digits & ((width < len(INT64_MAX)) | ((width == len(INT64_MAX)) & (short <= INT64_MAX)))
    return digits, fits


def _whole_numbers(text: pd.Series | None, rows: int) -> pd.Series:
    """Whole numbers, empty where not given or not one (or too large for a 64-bit integer)."""
    if text is None:
        return pd.Series(pd.NA, index=range(rows), dtype="Int64")
    return text.where(_whole(text)[1]).astype("Int64")


def _years(text: pd.Series | None, rows: int) -> pd.Series:
    """Ages in whole years (empty where not given or not readable): 57, 060Y -> 60, 011M -> 0."""
    if text is None:
        return pd.Series(pd.NA, index=range(rows), dtype="Int64")
    if _whole(text)[1].all():  # NIH's v2020 file: whole years already
        return text.astype("int64").astype("Int64")
    parts = text.str.extract(_AGE)
    number = pd.to_numeric(parts[0].where(parts[0].str.len() <= 6), errors="coerce")  # no age has more digits
    per_year = parts[1].str.upper().map({"": 1, "Y": 1, "M": 12, "D": 365})
    return (number // per_year).astype("Int64")


def _labels(raw: pd.DataFrame) -> pd.Series:
    """Finding Labels as NIH writes them, spaces around | dropped. The names are checked by the download
    stage (check_labels), which imports cxr14/labels.py: filter reads this module and needs no labels."""
    return raw["Finding Labels"].str.replace(r"\s*\|\s*", "|", regex=True)


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
