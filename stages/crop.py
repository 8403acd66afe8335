"""Stage 3, crop: center crop and resize every kept image into one packed uint8 array.

PNGs are read straight out of the archives (never extracted) and decoded on every core (cxr14/parallel_crop.py:
a reader process per archive, `crop.workers` decoder processes, 0 = one per core).
Outputs: data/crop/images.npy [N, size, size], data/crop/index.csv (the filter index plus `row`),
metrics/crop.json.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr14 import packed_images, parallel_crop, progress
from cxr14.atomic import atomic_path, read_csv, write_csv, write_json
from cxr14.params import PARAMS_FILE, StageError, load, section


@dataclass
class CropConfig:
    fraction: float
    pixels: int
    workers: int
    skip_unreadable: bool


def check(params: dict) -> CropConfig:
    settings = section(params, "crop")
    config = CropConfig(
        fraction=settings.number("fraction", low=0, high=1, low_open=True),
        pixels=settings.number("pixels", low=8, integer=True),
        workers=settings.number("workers", low=0, integer=True),
        skip_unreadable=settings.boolean("skip_unreadable"),
    )
    settings.finish()
    return config


def check_space(path: Path, needed: int) -> None:
    """Stop before any work when the disk cannot hold the packed array."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StageError(f"{path} needs {needed:,} bytes and {folder} has {free:,} free: free some space "
                         "(or set crop.pixels smaller)")


def main(params_path: str = PARAMS_FILE, raw: Path = Path("data/raw"), filtered: Path = Path("data/filter"),
         out: Path = Path("data/crop"), metrics: Path = Path("metrics/crop.json")) -> None:
    config = check(load(params_path))
    index = read_csv(filtered / "index.csv")
    sources = pd.read_csv(raw / "sources.csv", dtype=str, keep_default_na=False)
    rows = {name: i for i, name in enumerate(index["image"])}
    # No more decoders than batches (a small data set); readers: one per archive.
    workers = max(1, min(config.workers or os.cpu_count() or 1, math.ceil(len(index) / parallel_crop.BATCH_IMAGES)))
    target = out / packed_images.IMAGES_FILE
    check_space(target, packed_images.nbytes(len(index), config.pixels))
    with atomic_path(target) as tmp:
        try:
            packed_images.create(tmp, len(index), config.pixels).flush()
            seen, failed = parallel_crop.crop_sources(sources, rows, tmp, config.fraction, config.pixels, workers,
                                                       progress.items())
        except OSError as error:  # a full or read-only disk, here or in a worker
            raise StageError(f"writing {tmp}: {error.strerror or error} (the packed array needs "
                             f"{packed_images.nbytes(len(index), config.pixels):,} bytes)") from None
        twice = sorted(name for name, count in seen.items() if count > 1)
        if twice:  # which copy would win depends on worker timing: never guess
            raise StageError(f"{len(twice)} images are in more than one source listed in {raw / 'sources.csv'}, "
                             f"e.g. {twice[:5]}: keep one copy of each")
        missing = sorted(set(rows) - set(seen))
        if missing:
            raise FileNotFoundError(f"{len(missing)} kept images are in no source listed in {raw / 'sources.csv'}, "
                                    f"e.g. {missing[:5]}")
        if failed and not config.skip_unreadable:
            name, why = next(iter(sorted(failed.items())))
            raise StageError(f"{len(failed)} unreadable images, e.g. {name}: {why}. "
                             "Set crop.skip_unreadable: true to skip them (the count is recorded).")
    kept = index.assign(row=np.arange(len(index)))[~index["image"].isin(failed)]
    write_csv(out / "index.csv", kept.reset_index(drop=True))
    write_json(metrics, {"images": len(kept), "skipped_unreadable": len(failed), "pixels": config.pixels,
                         "fraction": config.fraction, "skipped_examples": sorted(failed)[:10]})
    print(f"crop: {len(kept)} images at {config.pixels}px (center {config.fraction:.0%}); "
          f"{len(failed)} unreadable skipped")


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.crop")
