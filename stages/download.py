"""Stage 1, download: put the images and their metadata in data/raw.

- `nih`: the 12 official archives from the archive table (a user can point it at a mirror's),
  resumable (HTTP Range on a .part file), retried with backoff, checked for size and MD5, renamed
  into place only when complete, several at a time.
- `local`: a copy the user already has (archives, or PNGs in any layout), read in place.
- `synthetic`: an NIH-shaped synthetic data set (see stages/synthetic.py), written as NIH-named archives.

Outputs: data/raw/metadata.csv (the images that are there), data/raw/sources.csv (where they are),
data/raw/archives/ (downloaded or synthetic archives).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr14 import metadata as md
from cxr14 import params as P
from cxr14 import progress, synthetic
from cxr14.atomic import atomic_path, write_csv
from cxr14.images import list_archive, scan_local

RAW = Path("data/raw")
SOURCES = ("nih", "local", "synthetic")


@dataclass
class DataConfig:
    source: str
    local_dir: str | None
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
    data = P.section(params, "data")
    source = data.choice("source", SOURCES)
    local_dir = data.get("local_dir")
    if source == "local" and not local_dir:
        raise P.ParamError("data.local_dir", local_dir, "the folder holding your NIH archives or PNGs (data.source is local)")
    dl = data.section("download")
    archives = dl.get("archives")
    if archives != "all" and not (isinstance(archives, list) and all(isinstance(a, str) for a in archives)):
        raise P.ParamError("data.download.archives", archives, "all, or a list of archive names such as [images_001.tar.gz]")
    syn = data.section("synthetic")
    config = DataConfig(
        source=source, local_dir=local_dir,
        archives_table=dl.get("archives_table"),
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
        seed=P.seed(params),
    )
    for section in (dl, syn, data):
        section.finish()
    return config


# ---------------------------------------------------------------- nih: resumable, verified downloads

class DownloadError(P.StageError):
    pass


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, target: Path, size: int, md5: str | None, *, retries: int = 5, backoff: float = 2.0,
          timeout: float = 60, report=lambda done: None, stop: threading.Event | None = None) -> Path:
    """Download `url` to `target` through `target.part`; rename only once size (and MD5) check out.

    A .part left by an earlier run is resumed with an HTTP Range request. Connection errors and
    server errors (5xx) are retried with exponential backoff; 4xx and a wrong size or MD5 are not.
    `report` is called with the bytes on disk so far; setting `stop` ends the transfer (Ctrl-C).
    """
    part = target.with_name(target.name + ".part")
    stamp = target.with_name(f".{target.name}.verified")
    expected_stamp = f"{size} {md5 or '-'}"
    if target.exists() and target.stat().st_size == size and stamp.exists() and stamp.read_text() == expected_stamp:
        report(size)
        return target
    for stale in (target, stamp):
        stale.unlink(missing_ok=True)
    attempt = 0
    while (have := part.stat().st_size if part.exists() else 0) != size:
        report(have)
        if have > size:
            part.unlink()
            raise DownloadError(f"{part} held {have} bytes, more than the {size} the table gives for {url}: "
                                "deleted it; run again")
        try:
            _transfer(url, part, have, size, timeout, report, stop)
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason} (check the URL in the archive table)") from None
            if attempt >= retries:
                raise DownloadError(f"{url}: gave up after {retries + 1} tries: {error}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            if attempt >= retries:
                raise DownloadError(f"{url}: gave up after {retries + 1} tries: {error}") from None
        else:
            continue
        time.sleep(backoff * 2 ** attempt)
        attempt += 1
    report(size)
    if md5:
        got = _md5(part)
        if got != md5.lower():
            raise DownloadError(
                f"{target.name}: MD5 {got} does not match the table's {md5}. The download is kept as {part} "
                f"and never taken as complete. The table's MD5s are not confirmed against NIH: if you trust the "
                f"file, set data.download.verify_md5: false and run again; otherwise delete {part}.")
    os.replace(part, target)
    stamp.write_text(expected_stamp)
    return target


def _transfer(url: str, part: Path, have: int, size: int, timeout: float, report,
              stop: threading.Event | None) -> None:
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status != 206:
            raise DownloadError(
                f"{url}: the server ignored the Range request (HTTP {response.status}), so {part} "
                f"({have} bytes) cannot be resumed; delete it to start over, or use a mirror that supports resuming")
        if have:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: asked for bytes from {have}, the server sent {content_range!r}")
        with open(part, "ab") as handle:
            while block := response.read1(1 << 16):  # what has arrived, so progress and Ctrl-C are prompt
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt(f"download of {url} interrupted; {part} is kept for resuming")
                handle.write(block)
                have += len(block)
                report(have)
    if have < size:
        raise ConnectionError(f"connection closed after {have} of {size} bytes")


def download_nih(config: DataConfig, directory: Path) -> pd.DataFrame:
    """Fetch the archives of the table (several at a time) into `directory`; return the table's rows."""
    table = md.read_archive_table(config.archives_table)
    if config.archives is not None:
        unknown = sorted(set(config.archives) - set(table["archive"]))
        if unknown:
            raise P.ParamError("data.download.archives", unknown, "names from " + config.archives_table)
        table = table[table["archive"].isin(config.archives)]
    directory.mkdir(parents=True, exist_ok=True)
    for stray in directory.glob("*.tar.gz"):  # e.g. a synthetic archive of an earlier run; verified ones stay
        if stray.name not in set(table["archive"]) and not (directory / f".{stray.name}.verified").exists():
            stray.unlink()
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

        futures = [pool.submit(fetch, row.url, directory / row.archive, int(row.bytes),
                               row.md5 if config.verify_md5 else None, retries=config.retries,
                               backoff=config.backoff_seconds, timeout=config.timeout_seconds,
                               report=reporter(bar.add_task(row.archive, total=int(row.bytes))), stop=stop)
                   for row in table.itertuples(index=False)]
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except DownloadError as error:
                    errors.append(str(error))
        except KeyboardInterrupt:  # stop the other transfers too; their .part files stay for resuming
            stop.set()
            for future in futures:
                future.cancel()
            raise
    if errors:
        raise DownloadError("\n".join(errors))
    return table


# ---------------------------------------------------------------- synthetic: NIH-named archives

def _write_archive(path: Path, rows: pd.DataFrame, size: int, seed: int, blacklist: dict[str, str]) -> int:
    """One synthetic archive, byte-for-byte the same for the same rows and seed."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=1) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for _, row in rows.iterrows():
            png = synthetic.encode_png(synthetic.render(row, size, seed, blacklist.get(row["image"])), 1)
            info = tarfile.TarInfo(f"images/{row['image']}")
            info.size, info.mtime, info.mode = len(png), 0, 0o644
            archive.addfile(info, io.BytesIO(png))
    return len(rows)


def make_synthetic(config: DataConfig, directory: Path, metadata: pd.DataFrame) -> pd.DataFrame:
    drawn = synthetic.draw_patients(metadata, config.images, config.min_positives_per_label,
                                    config.max_images_per_patient, config.seed)
    where = md.archive_of_each_image(metadata, md.read_archive_table(config.archives_table))
    drawn = drawn.assign(archive=where.loc[drawn["image"]].to_numpy())
    blacklist = {name: reason for reason, names in md.read_blacklists().items() for name in names}
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        stale.unlink()
    groups = list(drawn.groupby("archive"))
    with progress.items() as bar, ProcessPoolExecutor(min(os.cpu_count() or 1, len(groups))) as pool:
        task = bar.add_task("synthetic images", total=len(drawn))
        futures = [pool.submit(_write_archive, directory / name, rows, config.image_size, config.seed, blacklist)
                   for name, rows in groups]
        for future in as_completed(futures):
            bar.advance(task, future.result())
    return drawn.drop(columns="archive")


# ---------------------------------------------------------------- local: read in place

def list_local_archives(paths: pd.Series) -> set[str]:
    """What a user's archives hold (they may be partial or a mirror's): one pass through each, in parallel."""
    names: set[str] = set()
    with progress.items() as bar, ProcessPoolExecutor(min(os.cpu_count() or 1, len(paths))) as pool:
        task = bar.add_task("listing local archives", total=len(paths))
        for listed in pool.map(list_archive, paths):
            names.update(listed)
            bar.advance(task)
    return names


# ---------------------------------------------------------------- the stage

def main(params_path: str = P.PARAMS_FILE, out: Path = RAW) -> None:
    config = check(P.load(params_path))
    metadata = md.read_metadata()
    archives_dir = out / "archives"
    if config.source == "synthetic":
        metadata = make_synthetic(config, archives_dir, metadata)
        sources = pd.DataFrame({"kind": "tar", "path": sorted(str(p) for p in archives_dir.glob("*.tar.gz")), "image": ""})
    elif config.source == "nih":
        table = download_nih(config, archives_dir)
        where = md.archive_of_each_image(metadata, md.read_archive_table(config.archives_table))
        metadata = metadata[where.loc[metadata["image"]].isin(table["archive"]).to_numpy()]
        sources = pd.DataFrame({"kind": "tar", "path": [str(archives_dir / a) for a in table["archive"]], "image": ""})
    else:
        archives_dir.mkdir(parents=True, exist_ok=True)
        for stale in archives_dir.iterdir():
            stale.unlink()
        sources = scan_local(config.local_dir)
        present = set(sources["image"]) if (sources["kind"] == "png").all() else list_local_archives(sources["path"])
        metadata = metadata[metadata["image"].isin(present)]
        if metadata.empty:
            raise FileNotFoundError(f"data.local_dir = {config.local_dir!r}: none of its images is in the NIH metadata")
    write_csv(out / "sources.csv", sources)
    write_csv(out / "metadata.csv", metadata.reset_index(drop=True))
    print(f"download ({config.source}): {len(metadata)} images of {metadata['patient_id'].nunique()} patients "
          f"in {len(sources)} sources")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.download")
