"""Crop-stage throughput against a plain one-file-at-a-time PIL loop, on 1024x1024 NIH-like PNGs, in one run.

    python benchmarks/crop_throughput.py [--images 240] [--archives 2] [--distinct 48] [--processes N]
                                                      [--repeats 2] [--size 300] [--fraction 0.75]

Makes synthetic NIH-shaped archives (1024x1024 8-bit PNGs; fewer archives than cores, as NIH's 12 are on a big
machine), then times, in turns and best of --repeats (other work on the machine only ever slows a run down):
  1. the crop stage (PNGs decoded straight out of the tar.gz, no extraction) with 1 decoder process and with N
     (default: one per core),
  2. a plain loop: open, crop and resize one extracted file at a time with PIL (extraction timed apart).
Prints images per second, per core (images/s over the cores in use) and per CPU-second (user + system time
of the stage and all its processes: the figure least moved by other work on the machine), the ratio
stage / plain, and an estimate for the full NIH set. Figures are from synthetic images, not NIH's.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's code, installed or not

from cxr14 import metadata, synthetic  # noqa: E402
from cxr14.atomic import write_csv  # noqa: E402
from cxr14.params import PARAMS_FILE, apply, load  # noqa: E402
from stages import crop  # noqa: E402

NIH_IMAGES = 112_120


def render_png(row: pd.Series) -> bytes:
    return synthetic.encode_png(synthetic.render_with_boxes(row, 1024, seed=0)[0])


def write_archive(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w:gz", compresslevel=6) as archive:  # gzip's own default level
        for name, png in members:
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(png)
            archive.addfile(info, io.BytesIO(png))


def make_archives(folder: Path, count: int, archives: int, distinct: int) -> pd.DataFrame:
    """`count` images named as NIH's first rows, in `archives` tar.gz; `distinct` different PNGs among them (a
    synthetic 1024 px image takes ~0.3 s to make; each member is still decoded on its own), made on every core."""
    rows = metadata.read_metadata().iloc[:count]
    with ProcessPoolExecutor() as pool:
        pngs = list(pool.map(render_png, (rows.iloc[i] for i in range(min(distinct, count)))))
        members = [(rows.iloc[i]["image"], pngs[i % len(pngs)]) for i in range(count)]
        list(pool.map(write_archive, [folder / f"images_{part:03d}.tar.gz" for part in range(1, archives + 1)],
                      [[members[i] for i in chunk] for chunk in np.array_split(np.arange(count), archives)]))
    return rows


def cpu_seconds() -> float:
    """User + system time of this process and of its finished child processes."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of run()."""
    cpu, started = cpu_seconds(), time.perf_counter()
    run()
    return time.perf_counter() - started, cpu_seconds() - cpu


def stage(folder: Path, rows: pd.DataFrame, workers: int, size: int, fraction: float) -> tuple[float, float]:
    (folder / "raw").mkdir(exist_ok=True)
    write_csv(folder / "raw/sources.csv", pd.DataFrame(
        {"kind": "tar", "path": sorted(str(p) for p in folder.glob("*.tar.gz")), "image": ""}))
    (folder / "filter").mkdir(exist_ok=True)
    write_csv(folder / "filter/index.csv", rows)
    params = apply(load(REPO / PARAMS_FILE), {"crop.fraction": fraction, "crop.pixels": size, "crop.workers": workers})
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return timed(lambda: crop.main(str(folder / "params.yaml"), raw=folder / "raw", filtered=folder / "filter",
                                   out=folder / "crop", metrics=folder / "crop.json"))


def extract(folder: Path) -> None:
    for archive in sorted(folder.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(folder / "extracted", filter="data")


def plain_loop(extracted: Path, size: int, fraction: float) -> None:
    out = []
    for path in sorted(extracted.rglob("*.png")):
        image = Image.open(path).convert("L")
        side = fraction * min(image.size)
        left, top = (image.width - side) / 2, (image.height - side) / 2
        image = image.crop((round(left), round(top), round(left + side), round(top + side)))
        out.append(np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)))


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--archives", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=48, help="different PNGs among the images")
    parser.add_argument("--processes", type=int, default=cores, help="decoders of the second stage run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--fraction", type=float, default=0.75)
    args = parser.parse_args()
    one, many = "crop stage, 1 decoder process", f"crop stage, {args.processes} decoder processes"
    plain, plain_all = "plain PIL loop on extracted files, 1 process", "plain PIL loop incl. extracting the archives"
    best = {}  # name: [wall, cpu] seconds, each the least of the repeats

    def keep(name, seconds):
        best[name] = [min(pair) for pair in zip(best.get(name, seconds), seconds)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"making {args.images} synthetic 1024x1024 PNGs ({args.distinct} different) in {args.archives} "
              "archives ...", flush=True)
        rows = make_archives(folder, args.images, args.archives, args.distinct)
        extraction = timed(lambda: extract(folder))
        for _ in range(args.repeats):
            keep(one, stage(folder, rows, 1, args.size, args.fraction))
            keep(many, stage(folder, rows, args.processes, args.size, args.fraction))
            keep(plain, timed(lambda: plain_loop(folder / "extracted", args.size, args.fraction)))
        best[plain_all] = [a + b for a, b in zip(best[plain], extraction)]
    used = {one: 1, many: min(args.processes, cores), plain: 1, plain_all: 1}
    print(f"\nmachine: {platform.platform()}, {platform.processor() or platform.machine()}, {cores} cores; "
          f"{args.images} images in {args.archives} archives, center {args.fraction:.0%} -> {args.size}px; "
          f"best of {args.repeats}")
    print(f"{'method':<48} {'images/s':>9} {'per core':>9} {'per CPU-s':>10}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<48} {args.images / wall:>9.1f} {args.images / wall / used[name]:>9.1f} "
              f"{args.images / cpu:>10.1f}")
    print("(per core: images/s over the cores in use; the 1-decoder run's archive readers use a second core)")
    per_core = args.images / best[many][0] / used[many]
    per_cpu = args.images / best[many][1]
    print(f"stage ({args.processes} decoders) / plain loop, per core: {per_core / (args.images / best[plain][0]):.2f}; "
          f"per CPU-second: {best[plain][1] / best[many][1]:.2f}")
    print(f"full NIH set on 16 cores ~ {NIH_IMAGES:,} / (16 x {per_cpu:.1f} images per CPU-second) = "
          f"{NIH_IMAGES / (16 * per_cpu) / 60:.1f} min, archives read from the page cache or a fast disk "
          f"(from the wall clock here: {NIH_IMAGES / (16 * per_core) / 60:.1f} min)")

if __name__ == "__main__":
    main()
