"""Crop-stage throughput against a plain one-file-at-a-time PIL loop, on 1024x1024 NIH-like PNGs.

    python benchmarks/crop_throughput.py [--images 240] [--size 300] [--fraction 0.75]

Makes synthetic NIH-shaped archives (1024x1024 8-bit PNGs, two archives), then times
  1. the crop stage's reader (PNGs decoded straight out of the tar.gz, no extraction) with 1 and N processes,
  2. a plain loop: extract the archives, then open, crop and resize one file at a time with PIL.
Prints images per second and per core for each. Figures are from synthetic images, not NIH's.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from cxr14 import metadata, synthetic
from cxr14 import params as P
from cxr14.atomic import write_csv
from stages import crop

REPO = Path(__file__).resolve().parents[1]


def make_archives(folder: Path, count: int) -> pd.DataFrame:
    rows = metadata.read_metadata().iloc[:count]
    for part, chunk in enumerate(np.array_split(np.arange(count), 2), start=1):
        with tarfile.open(folder / f"images_{part:03d}.tar.gz", "w:gz") as archive:
            for i in chunk:
                png = synthetic.encode_png(synthetic.render(rows.iloc[i], 1024, seed=0))
                info = tarfile.TarInfo(f"images/{rows.iloc[i]['image']}")
                info.size = len(png)
                archive.addfile(info, io.BytesIO(png))
    return rows


def stage(folder: Path, rows: pd.DataFrame, workers: int, size: int, fraction: float) -> float:
    (folder / "raw").mkdir(exist_ok=True)
    write_csv(folder / "raw/sources.csv", pd.DataFrame(
        {"kind": "tar", "path": sorted(str(p) for p in folder.glob("*.tar.gz")), "image": ""}))
    (folder / "filter").mkdir(exist_ok=True)
    write_csv(folder / "filter/index.csv", rows)
    params = P.apply(P.load(REPO / P.PARAMS_FILE), {"crop.fraction": fraction, "crop.size": size, "crop.workers": workers})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    crop.main(str(folder / "params.yaml"), raw=folder / "raw", filtered=folder / "filter", out=folder / "crop",
              metrics=folder / "crop.json")
    return time.perf_counter() - started


def plain_loop(folder: Path, size: int, fraction: float) -> tuple[float, float]:
    started = time.perf_counter()
    extracted = folder / "extracted"
    for archive in sorted(folder.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(extracted, filter="data")
    extraction = time.perf_counter() - started
    started = time.perf_counter()
    out = []
    for path in sorted(extracted.rglob("*.png")):
        image = Image.open(path).convert("L")
        side = fraction * min(image.size)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        image = image.crop((round(left), round(top), round(left + side), round(top + side)))
        out.append(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)))
    return extraction, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--fraction", type=float, default=0.75)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"making {args.images} synthetic 1024x1024 PNGs in 2 archives ...", flush=True)
        rows = make_archives(folder, args.images)
        results = {f"crop stage, {w} process{'es' if w > 1 else ''}": (stage(folder, rows, w, args.size, args.fraction), w)
                   for w in sorted({1, cores})}
        extraction, loop = plain_loop(folder, args.size, args.fraction)
        results["plain PIL loop on extracted files, 1 process"] = (loop, 1)
        results["plain PIL loop incl. extracting the archives"] = (loop + extraction, 1)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores; "
          f"{args.images} images, center {args.fraction:.0%} -> {args.size}px")
    print(f"{'method':<50} {'images/s':>9} {'per core':>9}")
    for name, (seconds, workers) in results.items():
        print(f"{name:<50} {args.images / seconds:>9.1f} {args.images / seconds / workers:>9.1f}")


if __name__ == "__main__":
    main()
