"""Stage 1, download: put the images and their metadata in data/raw.

- `nih`: the 12 official archives from the archive table (a user can point it at a mirror's; the
  whole table is checked before any transfer), resumable (HTTP Range on a .part file), retried with
  backoff, renamed into place only when complete (size, MD5, and a gzip'd tar holding the table's
  number of images), several at a time. A complete archive on disk is never deleted or fetched again.
- `local`: a copy the user already has (archives and PNGs in any layout, both read), read in place;
  an image found twice is an error, never a race between workers. Its images are listed by NIH's
  metadata, or by the user's own Data_Entry-style CSV (data.metadata: Kaggle's sample_labels.csv, a
  hospital's export), checked whole before any image is read.
- `synthetic`: an NIH-shaped synthetic data set (see cxr14/synthetic.py), written as NIH-named archives.

Outputs: data/raw/metadata.csv (the images that are there), data/raw/sources.csv (where they are),
data/raw/bboxes.csv (NIH's box list, in its format: its radiologists' boxes of the images found, or the
synthetic signs' extents),
data/raw/archives/ (synthetic archives, or hard links to the downloads in data/.download), metrics/download.json (how many of the
metadata's images were found and how many are missing, how many images of a local folder the metadata
does not list, and the labels with fewer than FEW_POSITIVES positive images: each is also a warning).
"""

from __future__ import annotations

import difflib
import gzip
import io
import os
import shutil
import sys
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr14 import boxes, labels, progress, synthetic
from cxr14 import metadata as md
from cxr14.atomic import atomic_path, write_csv, write_json
from cxr14.fetch import DISK_ERRNOS, DownloadError, digest, file_size, resume
from cxr14.images import ArchiveError, list_archive, scan_local
from cxr14.params import PARAMS_FILE, ParamError, Section, StageError, load, section, seed
from cxr14.stage import worker_process

RAW = Path("data/raw")
STORE = Path("data/.download")  # NIH's archives as fetched, partial or verified: outside every DVC output
SOURCES = ("nih", "local", "synthetic")
LOCAL_NOTE = "LOCAL_SOURCE.txt"  # in data/raw/archives when data.source is local
FEW_POSITIVES = 10  # fewer positive images of a label than this: its AUROC is undefined or noise (a warning, not a setting)


@dataclass
class DataConfig:
    source: str
    local_dir: str | None
    metadata: str  # NIH's data/reference/Data_Entry_2017_v2020.csv.gz, or the user's own CSV (source local)
    archives_table: str
    archives: list[str] | None  # None = all
    verify_md5: bool
    workers: int
    retries: int
    backoff_seconds: float
    timeout_seconds: float
    images: int
    image_size: int
    min_positives_per_label: int
    max_images_per_patient: int
    seed: int


def check(params: dict) -> DataConfig:
    data = section(params, "data")
    source = data.choice("source", SOURCES)
    local_dir = data.get("local_dir")
    if source == "local" and not (isinstance(local_dir, str) and local_dir.strip()):
        raise ParamError("data.local_dir", local_dir, "the folder holding your NIH archives or PNGs (data.source is local)")
    if source == "local" and not Path(local_dir).expanduser().is_dir():
        raise ParamError("data.local_dir", local_dir, "the folder holding your NIH archives or PNGs (data.source is "
                                                      "local), but there is no folder there")
    metadata = tracked_file(data, "metadata", "the path of NIH's metadata (data/reference/Data_Entry_2017_v2020.csv.gz) "
                                              "or of your own Data_Entry-style CSV")
    if source != "local" and not md.is_nih_metadata(metadata):
        raise ParamError("data.metadata", metadata, f"NIH's metadata, {md.REFERENCE / md.METADATA_FILE}, with data.source "
                                                    f"{source} (its images are NIH's, listed by NIH's metadata); your own "
                                                    "CSV goes with data.source local")
    dl = data.section("download")
    archives = dl.get("archives")
    if archives != "all" and not (isinstance(archives, list) and all(isinstance(a, str) for a in archives)):
        raise ParamError("data.download.archives", archives, "all, or a list of archive names such as [images_001.tar.gz]")
    table_path = tracked_file(dl, "archives_table", "the path of the archive table, such as "
                                                    "data/reference/nih_image_archives.tsv")
    if source == "nih" and archives != "all":  # the table is small: names it lacks are found now, not in the stage
        table = md.read_archive_table(table_path)
        unknown = sorted(set(archives) - set(table["archive"]))
        if unknown:
            listed = list(table["archive"])
            raise ParamError("data.download.archives", unknown if len(unknown) > 1 else unknown[0],
                             f"names from {table_path}: "
                             + ", ".join(listed[:3]) + (f", ... {listed[-1]}" if len(listed) > 3 else ""))
    syn = data.section("synthetic")
    config = DataConfig(
        source=source, local_dir=local_dir, metadata=metadata,
        archives_table=table_path,
        archives=None if archives == "all" else archives,
        verify_md5=dl.boolean("verify_md5"),
        workers=dl.number("workers", low=1, integer=True),
        retries=dl.number("retries", low=0, integer=True),
        backoff_seconds=dl.number("backoff_seconds", low=0),
        timeout_seconds=dl.number("timeout_seconds", low=0, low_open=True),
        images=syn.number("images", low=1, integer=True),
        image_size=syn.number("image_size", low=32, integer=True),
        min_positives_per_label=syn.number("min_positives_per_label", low=0, integer=True),
        max_images_per_patient=syn.number("max_images_per_patient", low=1, integer=True),
        seed=seed(params),
    )
    for settings in (dl, syn, data):
        settings.finish()
    return config


def tracked_file(section: Section, name: str, valid: str) -> str:
    """A file that a param names and dvc.yaml makes a dep of this stage (`${data....}`), so that an edit of the
    file reruns it: it must be there, at a path DVC reads as the stage does (DVC does not expand ~)."""
    path = section.get(name)
    if not isinstance(path, str) or not path.strip():
        raise ParamError(section.key(name), path, valid)
    if path.startswith("~"):
        raise ParamError(section.key(name), path, f"{valid}, written out: DVC, which tracks the file, does not "
                                                  f"expand ~ ({Path(path).expanduser()})")
    if not Path(path).is_file():
        raise ParamError(section.key(name), path, f"{valid}, but no file is there")
    return path


# ---------------------------------------------------------------- nih: resumable, verified downloads

def _stamp_text(size: int, md5: str | None, images: int) -> str:
    return f"{size} {md5 or '-'} {images}"


def fetch(url: str, target: Path, size: int, md5: str | None, images: int, *, retries: int, backoff: float,
          timeout: float, report=lambda done: None, stop: threading.Event | None = None) -> Path:
    """Download `url` to `target` through `target.part` (resumed, retried: cxr14.fetch.resume); rename it
    into place only once it is complete: the table's size, the table's MD5 (when given), and a gzip'd tar
    that reads through to `images` images. A file already in place is checked, never deleted: one that
    fails a check goes back to .part. `report` is called with the bytes on disk so far; setting `stop`
    ends the transfer (Ctrl-C).
    """
    part = target.with_name(target.name + ".part")
    stamp = target.with_name(f".{target.name}.verified")
    if target.exists():
        have = target.stat().st_size
        if have != size:  # no run of this stage leaves that: the user's file, or the table changed
            raise DownloadError(f"{target} has {have:,} bytes, the table gives {size:,}: it is kept as it is; "
                                "move or delete it (or fix the table's bytes) and run again")
        if stamp.exists() and stamp.read_text() == _stamp_text(size, md5, images):
            report(size)
            return target
        os.replace(target, part)  # checked again below (verify_md5 turned on, say): hashed, not fetched
        stamp.unlink(missing_ok=True)
    resume(url, part, size, retries=retries, backoff=backoff, timeout=timeout, report=report, stop=stop,
           what="the archive", hint="check the URL in the archive table")
    _verify(part, target.name, md5, images)
    os.replace(part, target)
    stamp.write_text(_stamp_text(size, md5, images))
    return target


def _verify(path: Path, name: str, md5: str | None, images: int) -> None:
    """The MD5 (when given), then a read through the whole gzip'd tar: raise DownloadError unless complete."""
    if md5:
        got = digest(path, "md5")
        if got != md5.lower():
            raise DownloadError(
                f"{name}: MD5 {got} does not match the table's {md5}. The download is kept as {path} "
                f"and never taken as complete. The table's MD5s are not confirmed against NIH: if you trust the "
                f"file, set data.download.verify_md5: false and run again; otherwise delete {path}.")
    try:
        found = len(list_archive(path))
    except ArchiveError as error:
        if not error.damaged:  # permissions, an I/O error: the file may be whole
            raise DownloadError(f"{name}: {path} {error.reason}: check its permissions (ls -l) and its disk, "
                                "and run again (it is kept)") from None
        raise DownloadError(f"{name}: {error.reason}, though it has the table's size; it is kept as {path} and "
                            "never taken as complete: the mirror's file or the table is wrong (delete it to "
                            "fetch it again)") from None
    if found != images:
        raise DownloadError(f"{name}: holds {found:,} images, the table gives {images:,}; it is kept as {path} "
                            "and never taken as complete: the mirror's file or the table is wrong")


def _link(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy where the two are on different file systems)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def download_nih(config: DataConfig, directory: Path, table: pd.DataFrame, store: Path = STORE) -> None:
    """Fetch the archives of the table (several at a time) into `store`, then hard-link them into `directory`.

    `store` (data/.download) belongs to no DVC output: DVC deletes data/raw/archives before it reruns this
    stage (a changed param or code), and a partial or verified archive there would go with it. Since the
    output is not persistent, DVC's run cache restores it in experiments instead of running the stage."""
    store.mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_synthetic(directory)
    needed = sum(int(row.bytes) - file_size(store / row.archive) - file_size(store / f"{row.archive}.part")
                 for row in table.itertuples(index=False) if file_size(store / row.archive) != row.bytes)
    free = shutil.disk_usage(store).free
    if needed > free:
        raise DownloadError(f"{store}: the archives need {needed:,} more bytes, {free:,} are free there; "
                            f"free some space (or make {store} a link to a larger disk) and run again")
    if config.verify_md5:
        for archive in table["archive"][table["md5"] == ""]:
            print(f"warning: {config.archives_table} gives no MD5 for {archive}: it is checked by its size "
                  "and by reading it through only", file=sys.stderr)
    errors, stop = [], threading.Event()
    with progress.transfer() as bar, ThreadPoolExecutor(config.workers) as pool:
        total = bar.add_task("all archives", total=int(table["bytes"].sum()))
        done = {}

        def reporter(task):
            def report(n):
                done[task] = n
                bar.update(task, completed=n)
                bar.update(total, completed=sum(done.values()))
            return report

        futures = [pool.submit(fetch, row.url, store / row.archive, int(row.bytes),
                               (row.md5 or None) if config.verify_md5 else None, int(row.images),
                               retries=config.retries, backoff=config.backoff_seconds, timeout=config.timeout_seconds,
                               report=reporter(bar.add_task(row.archive, total=int(row.bytes))), stop=stop)
                   for row in table.itertuples(index=False)]
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except DownloadError as error:
                    errors.append(str(error))
        except BaseException:  # Ctrl-C, SIGTERM: stop the other transfers too; their .part files stay for resuming
            stop.set()
            for future in futures:
                future.cancel()
            raise
    if errors:
        raise DownloadError(errors[0] if len(errors) == 1 else f"{len(errors)} archives failed: " + " | ".join(errors))
    for row in table.itertuples(index=False):
        _link(store / row.archive, directory / row.archive)


# ---------------------------------------------------------------- synthetic: NIH-named archives

def _write_archive(path: Path, rows: pd.DataFrame, size: int, seed: int, blacklist: dict[str, str]) -> list[tuple]:
    """One synthetic archive, byte-for-byte the same for the same rows and seed; the boxes of its images' signs."""
    signs = []
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=1) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for _, row in rows.iterrows():
            pixels, drawn = synthetic.render_with_boxes(row, size, seed, blacklist.get(row["image"]))
            signs += [(row["image"], *box) for box in drawn]
            png = synthetic.encode_png(pixels, 1)
            info = tarfile.TarInfo(f"images/{row['image']}")
            info.size, info.mtime, info.mode = len(png), 0, 0o644
            archive.addfile(info, io.BytesIO(png))
    return signs


def _remove_synthetic(directory: Path) -> None:
    """Synthetic archives of an earlier run (they carry NIH's names, and a marker beside them)."""
    for marker in directory.glob(".*.synthetic"):
        (directory / marker.name[1:].removesuffix(".synthetic")).unlink(missing_ok=True)
        marker.unlink()


def make_synthetic(config: DataConfig, directory: Path, metadata: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The drawn rows, and the box list of their signs (image, label, x, y, w, h)."""
    drawn = synthetic.draw_patients(metadata, config.images, config.min_positives_per_label,
                                    config.max_images_per_patient, config.seed)
    where = md.archive_of_each_image(metadata, md.read_archive_table(config.archives_table))
    drawn = drawn.assign(archive=where.loc[drawn["image"]].to_numpy())
    blacklist = {name: reason for reason, names in md.read_blacklists().items() for name in names}
    directory.mkdir(parents=True, exist_ok=True)
    downloads = sorted(p.name for p in directory.glob("*.part")) + sorted(
        p.name[1:].removesuffix(".verified") for p in directory.glob(".*.verified"))
    if downloads:  # the synthetic archives carry the same names: never overwrite hours of download
        raise StageError(f"{directory} holds downloaded NIH archives ({', '.join(downloads[:3])}"
                         f"{', ...' if len(downloads) > 3 else ''}) that synthetic archives of the same names "
                         "would replace: move them away, or run the synthetic set in another workspace "
                         "(dvc exp run --temp)")
    _remove_synthetic(directory)
    foreign = sorted(p.name for p in directory.glob("*.tar.gz") if not (directory / f".{p.name}.synthetic").exists())
    if foreign:  # a complete download whose stamp was never written (killed at that instant), or copied in by hand
        raise StageError(f"{directory} holds archives this stage did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): move them away, or run the synthetic set in "
                         "another workspace (dvc exp run --temp)")
    for stale in directory.glob(".*.synthetic"):
        stale.unlink()
    groups = list(drawn.groupby("archive"))
    with progress.items() as bar, ProcessPoolExecutor(min(os.cpu_count() or 1, len(groups)), initializer=worker_process) as pool:
        task = bar.add_task("synthetic images", total=len(drawn))
        futures = {pool.submit(_write_archive, directory / name, rows, config.image_size, config.seed, blacklist): len(rows)
                   for name, rows in groups}
        signs = []
        for future in as_completed(futures):
            signs += future.result()
            bar.advance(task, futures[future])
    for name, _ in groups:
        (directory / f".{name}.synthetic").write_text("written by data.source: synthetic\n")
    return drawn.drop(columns="archive"), pd.DataFrame(sorted(signs), columns=boxes.COLUMNS)


# ---------------------------------------------------------------- local: read in place

def where_local_images_are(sources: pd.DataFrame) -> dict[str, list[str]]:
    """Every image name of a user's folder and where it is: a PNG's path, or each archive holding it.
    Each archive is read through once (they may be partial or a mirror's; a cut one is an error), in parallel."""
    places: dict[str, list[str]] = {}
    for row in sources[sources["kind"] == "png"].itertuples(index=False):
        places.setdefault(row.image, []).append(row.path)
    paths = list(sources["path"][sources["kind"] == "tar"])
    if paths:
        workers = min(os.cpu_count() or 1, len(paths))
        with progress.items() as bar, ProcessPoolExecutor(workers, initializer=worker_process) as pool:
            task = bar.add_task("listing local archives", total=len(paths))
            for path, listed in zip(paths, pool.map(list_archive, paths)):
                for name in listed:
                    places.setdefault(name, []).append(path)
                bar.advance(task)
    return places


def check_no_duplicates(places: dict[str, list[str]], wanted: set[str], local_dir: str) -> None:
    """Two copies of an image would be read in whatever order the workers reach them: stop instead."""
    twice = sorted(name for name in wanted & set(places) if len(places[name]) > 1)
    if twice:
        root = Path(local_dir).expanduser().resolve()
        shown = "; ".join(f"{name} in " + " and ".join(os.path.relpath(p, root) for p in places[name])
                          for name in twice[:5])
        raise StageError(f"data.local_dir = {local_dir!r}: {len(twice)} images are there more than once, so which "
                         f"copy is read would depend on timing: {shown}{'; ...' if len(twice) > 5 else ''}. "
                         "Keep one copy of each (move the others out of the folder) and run again")


# ---------------------------------------------------------------- the stage

def read_nih(config: DataConfig, metadata: pd.DataFrame, directory: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = md.read_archive_table(config.archives_table)
    where = md.archive_of_each_image(metadata, table)  # the whole table is checked before any transfer
    if config.archives is not None:
        unknown = sorted(set(config.archives) - set(table["archive"]))
        if unknown:
            raise ParamError("data.download.archives", unknown, "names from " + config.archives_table)
        table = table[table["archive"].isin(config.archives)]
    download_nih(config, directory, table)
    found = metadata[where.loc[metadata["image"]].isin(table["archive"]).to_numpy()]
    return found, pd.DataFrame({"kind": "tar", "path": [str(directory / a) for a in table["archive"]], "image": ""})


def read_local(config: DataConfig, metadata: pd.DataFrame, directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The metadata's rows found in the user's folder, the folder's sources, and how many of its images
    the metadata does not list (ignored, but counted: a CSV that lacks rows shows up here)."""
    if directory.is_dir():
        _remove_synthetic(directory)  # downloaded NIH archives stay: they took hours
    sources = scan_local(config.local_dir)
    places = where_local_images_are(sources)
    check_no_duplicates(places, set(metadata["image"]), config.local_dir)
    found = metadata[metadata["image"].isin(places)]
    if found.empty:
        raise FileNotFoundError(f"data.local_dir = {config.local_dir!r}: none of its {len(places):,} images "
                                f"({', '.join(sorted(places)[:2])}, ...) is listed in {_none_listed_hint(config)}")
    return found, sources, len(set(places) - set(metadata["image"]))


def write_local_note(directory: Path, local_dir: str) -> None:
    """data/raw/archives is an output of every source (DVC fails a run whose declared output is missing, and
    crop depends on it); a local copy is read in place, so for it the folder holds this note, not archives."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCAL_NOTE).write_text(f"data.source local: the images are read in place from {local_dir} "
                                        f"({RAW / 'sources.csv'} lists where each is); no archive is copied here.\n")


def _none_listed_hint(config: DataConfig) -> str:
    if not md.is_nih_metadata(config.metadata):
        return (f"{config.metadata} (data.metadata): its Image Index column must hold the PNG file names, "
                "such as 00000001_000.png")
    csvs = sorted(str(p) for p in Path(config.local_dir).expanduser().rglob("*.csv"))
    hint = f" (such as {csvs[0]})" if len(csvs) == 1 else f" (one of {', '.join(csvs[:3])})" if csvs else ""
    return f"NIH's metadata: for images of your own, set data.metadata to your Data_Entry-style CSV{hint}"


def check_labels(metadata: pd.DataFrame, path: str) -> None:
    """Every name in Finding Labels is one of NIH's 15: a misspelt label would be dropped without a word."""
    names = metadata["labels"].str.split("|").explode()
    unknown = names[~names.isin(labels.ALL_LABELS)]
    if len(unknown):
        first, name = int(unknown.index[0]), unknown.iloc[0]
        others = unknown.index.nunique() - 1
        more = f" ({others} more images have unknown labels)" if others else ""
        lower = {label.lower(): label for label in labels.ALL_LABELS}
        close = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.85)  # case, spaces, typos
        hint = f" (did you mean {lower[close[0]]}?)" if close else ""
        raise StageError(f"{path}, the row of {metadata['image'].iloc[first]}, column Finding Labels: unknown label "
                         f"{name!r}{hint}{more}; the labels are {', '.join(labels.ALL_LABELS)}, separated by |")


def few_positives(found: pd.DataFrame) -> dict[str, int]:
    """The labels with fewer than FEW_POSITIVES positive images among those found, and how many each has."""
    return {name: n for name, n in labels.counts(found["labels"]).items() if n < FEW_POSITIVES}


def main(params_path: str = PARAMS_FILE, out: Path = RAW, metrics: Path = Path("metrics/download.json")) -> None:
    config = check(load(params_path))
    metadata = md.read_metadata(config.metadata)
    check_labels(metadata, config.metadata)
    archives_dir = out / "archives"
    unlisted = 0
    try:
        (archives_dir / LOCAL_NOTE).unlink(missing_ok=True)  # an earlier local run's, outside DVC
        if config.source == "synthetic":
            found, box_list = make_synthetic(config, archives_dir, metadata)
            sources = pd.DataFrame({"kind": "tar", "path": sorted(str(p) for p in archives_dir.glob("*.tar.gz")),
                                    "image": ""})
        elif config.source == "nih":
            found, sources = read_nih(config, metadata, archives_dir)
        else:
            found, sources, unlisted = read_local(config, metadata, archives_dir)
            write_local_note(archives_dir, config.local_dir)
        if config.source != "synthetic":  # NIH's radiologists' boxes of the images found
            box_list = boxes.read(boxes.REFERENCE)
            box_list = box_list[box_list["image"].isin(set(found["image"]))]
        few = few_positives(found)
        summary = {"source": config.source, "metadata_images": len(metadata), "found": len(found),
                   "missing": len(metadata) - len(found), "unlisted": unlisted,
                   "patients": int(found["patient_id"].nunique()),
                   "archives": int((sources["kind"] == "tar").sum()),
                   "png_files": int((sources["kind"] == "png").sum()), "few_positives": few}
        write_csv(out / "sources.csv", sources)
        write_csv(out / "metadata.csv", found.reset_index(drop=True))
        boxes.write(out / "bboxes.csv", box_list)
        write_json(metrics, summary)
    except OSError as error:  # a full or read-only disk: one line naming the path
        if error.errno not in DISK_ERRNOS:
            raise
        raise StageError(f"cannot write {error.filename or out}: {error.strerror}; free some space "
                         "(or make the folder writable) and run again") from None
    print(f"download ({config.source}): {summary['found']:,} of the metadata's {summary['metadata_images']:,} images "
          f"found, {summary['missing']:,} missing; {summary['patients']:,} patients in {summary['archives']} archives "
          f"and {summary['png_files']:,} PNG files" + (f"; {unlisted:,} images of data.local_dir are not in the "
                                                       "metadata (left out)" if unlisted else ""))
    for name, n in few.items():
        print(f"warning: only {n} of the {len(found):,} images found are labelled {name} (fewer than {FEW_POSITIVES}): "
              f"its AUROC will be undefined or unreliable", file=sys.stderr)


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.download")
