"""Stage 3, crop: center crop and resize every kept image into one packed uint8 array.

PNGs are read straight out of the archives (never extracted) by parallel processes, one archive
or a chunk of loose files each, and written into the rows of a memory-mapped .npy.
Outputs: data/crop/images.npy [N, size, size], data/crop/index.csv (the filter index plus `row`),
metrics/crop.json.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr14 import packed_images, progress
from cxr14 import params as P
from cxr14.atomic import atomic_path, read_csv, write_csv, write_json
from cxr14.images import iter_sources, open_png, to_gray
from cxr14.stage import worker_process

PNG_CHUNK = 256


@dataclass
class CropConfig:
    fraction: float
    size: int
    workers: int
    skip_unreadable: bool


def check(params: dict) -> CropConfig:
    section = P.section(params, "crop")
    config = CropConfig(
        fraction=section.number("fraction", low=0, high=1, low_open=True),
        size=section.number("size", low=8, integer=True),
        workers=section.number("workers", low=0, integer=True),
        skip_unreadable=section.boolean("skip_unreadable"),
    )
    section.finish()
    return config


def crop_resize(image: Image.Image, fraction: float, size: int) -> np.ndarray:
    """The centered square of side `fraction` * the shorter side, resized to size x size, one channel."""
    if image.mode != "L":
        image = Image.fromarray(to_gray(image))
    width, height = image.size
    side = fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                           reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


_ticks = None  # each worker's end of the progress queue (set by _start_worker)


def _start_worker(ticks) -> None:
    global _ticks
    _ticks = ticks
    worker_process()  # dies with the stage, even on kill -9


def _crop_group(sources: pd.DataFrame, rows: dict[str, int], array_path: str, fraction: float,
                size: int) -> tuple[list[str], dict[str, str]]:
    """Worker: decode, crop and write the wanted images of some sources; return found and failed names."""
    array = packed_images.open_for_writing(Path(array_path))
    found, failed, pending = [], {}, 0
    try:
        for name, data in iter_sources(sources, set(rows)):
            found.append(name)
            try:
                array[rows[name]] = crop_resize(open_png(data), fraction, size)
            except Exception as error:  # PIL raises many kinds for a broken file
                failed[name] = f"{type(error).__name__}: {error}"
            pending += 1
            if pending == 32:
                _ticks.put(pending)
                pending = 0
    except (tarfile.TarError, EOFError, zlib.error) as error:
        where = ", ".join(sources["path"])
        raise P.StageError(f"{where} cannot be read through ({type(error).__name__}: {error}): the archive is "
                           "truncated or corrupt; fetch it again (a downloaded one: delete it and rerun download)") from None
    _ticks.put(pending)
    array.flush()
    return found, failed


def stop(pool: ProcessPoolExecutor) -> None:
    """End the workers at once (Ctrl-C, SIGTERM, an error): a worker busy with a 10,000-image archive would
    otherwise finish it first. (The executor keeps its processes in `_processes`; no public call kills them.)"""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def check_space(path: Path, needed: int) -> None:
    """Stop before any work when the disk cannot hold the packed array."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise P.StageError(f"{path} needs {needed:,} bytes and {folder} has {free:,} free: free some space "
                           "(or set crop.size smaller)")


def _groups(sources: pd.DataFrame) -> list[pd.DataFrame]:
    archives = [sources.iloc[[i]] for i in np.flatnonzero(sources["kind"] == "tar")]
    files = sources[sources["kind"] == "png"]
    return archives + [files.iloc[i:i + PNG_CHUNK] for i in range(0, len(files), PNG_CHUNK)]


def main(params_path: str = P.PARAMS_FILE, raw: Path = Path("data/raw"), filtered: Path = Path("data/filter"),
         out: Path = Path("data/crop"), metrics: Path = Path("metrics/crop.json")) -> None:
    config = check(P.load(params_path))
    index = read_csv(filtered / "index.csv")
    sources = pd.read_csv(raw / "sources.csv", dtype=str, keep_default_na=False)
    rows = {name: i for i, name in enumerate(index["image"])}
    groups = _groups(sources)
    workers = min(config.workers or os.cpu_count() or 1, max(len(groups), 1))
    failed: dict[str, str] = {}
    target = out / packed_images.IMAGES_FILE
    check_space(target, packed_images.nbytes(len(index), config.size))
    seen: dict[str, int] = {}
    with atomic_path(target) as tmp:
        try:
            packed_images.create(tmp, len(index), config.size).flush()
            ticks = multiprocessing.Queue()
            pool = ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(ticks,))
            try:
                with progress.items() as bar:
                    task = bar.add_task(f"crop {config.fraction:g} -> {config.size}px ({workers} processes)",
                                        total=len(index))
                    futures = [pool.submit(_crop_group, group, rows, str(tmp), config.fraction, config.size)
                               for group in groups]
                    while not all(f.done() for f in futures):
                        try:
                            bar.advance(task, ticks.get(timeout=0.1))
                        except queue.Empty:
                            pass
                    bar.update(task, completed=len(index))
                for future in futures:
                    names, errors = future.result()
                    for name in names:
                        seen[name] = seen.get(name, 0) + 1
                    failed.update(errors)
                pool.shutdown()
            except BrokenProcessPool:  # a worker killed (out of memory, a crashing decoder)
                raise P.StageError("a crop worker process died: out of memory? Set crop.workers lower and run "
                                   "again") from None
            finally:
                stop(pool)
        except OSError as error:  # a full or read-only disk, here or in a worker
            raise P.StageError(f"writing {tmp}: {error.strerror or error} (the packed array needs "
                               f"{packed_images.nbytes(len(index), config.size):,} bytes)") from None
        found = set(seen)
        twice = sorted(name for name, count in seen.items() if count > 1)
        if twice:  # which copy would win depends on worker timing: never guess
            raise P.StageError(f"{len(twice)} images are in more than one source listed in {raw / 'sources.csv'}, "
                               f"e.g. {twice[:5]}: keep one copy of each")
        missing = sorted(set(rows) - found)
        if missing:
            raise FileNotFoundError(f"{len(missing)} kept images are in no source listed in {raw / 'sources.csv'}, "
                                    f"e.g. {missing[:5]}")
        if failed and not config.skip_unreadable:
            name, why = next(iter(sorted(failed.items())))
            raise P.StageError(f"{len(failed)} unreadable images, e.g. {name}: {why}. "
                             "Set crop.skip_unreadable: true to skip them (the count is recorded).")
    kept = index.assign(row=np.arange(len(index)))[~index["image"].isin(failed)]
    write_csv(out / "index.csv", kept.reset_index(drop=True))
    write_json(metrics, {"images": len(kept), "skipped_unreadable": len(failed), "size": config.size,
                         "fraction": config.fraction, "skipped_examples": sorted(failed)[:10]})
    print(f"crop: {len(kept)} images at {config.size}px (center {config.fraction:.0%}); "
          f"{len(failed)} unreadable skipped")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.crop")
