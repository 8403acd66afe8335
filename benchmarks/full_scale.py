"""All 112,120 metadata rows through every stage, with tiny synthetic images: does anything grow faster than the data?

    python benchmarks/full_scale.py [--size 32] [--backbone mobilenet_v3_small] [--steps 50] [--keep DIR]

A temporary project folder (data/reference linked) gets params.yaml + the overrides below: the synthetic
set at NIH's full size (112,120 images, one per metadata row, NIH's patients and labels), `--size`
pixels, NIH's official split, the report's 14-label resampling targets, one training epoch of `--steps`
batches of 64 on a small model from scratch, evaluate with the committed 1,000 bootstrap rounds on the
whole official test list (~25,000 images), and localize where the stage exists. Each stage runs as
dvc.yaml runs it (`python -m stages.NAME`) under /usr/bin/time: wall seconds and peak resident memory
(the stage or its largest worker process) are printed as a table, with the machine and the disk space of
the stage's outputs in dvc.yaml (each file once, as DVC's hard-linked cache would hold it). The images are
synthetic; the times say how the code scales with NIH's row count, not how long NIH's pixels take.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr14.params import PARAMS_FILE, apply, load  # noqa: E402

REPORT_TARGETS = {"Cardiomegaly": 3500, "Consolidation": 3500, "Edema": 3500, "Emphysema": 3500, "Fibrosis": 3500,
                  "Hernia": 2500, "Pleural_Thickening": 3500, "Pneumonia": 3500, "No Finding": 30000}


def full_scale_params(args) -> dict:
    committed = load(REPO / PARAMS_FILE)
    return apply(committed, {
        "data.source": "synthetic",
        "data.synthetic.images": 112_120,
        "data.synthetic.image_size": args.size,
        "data.synthetic.min_positives_per_label": 0,
        "data.synthetic.max_images_per_patient": 200,
        "crop.pixels": args.size,
        "crop.workers": 0,
        "split.method": "official",
        "resample.targets": REPORT_TARGETS,
        "model.backbone": args.backbone,
        "model.pretrained": "none",
        "model.head.hidden": [],
        "train.epochs": 1,
        "train.batch_size": 64,
        "train.steps_per_epoch": args.steps,
        "train.optimizer": "adam",
        "train.device": "cpu",
        "evaluate.device": "cpu",
        "evaluate.batch_size": 256,
    })


def stages() -> list[str]:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [re.search(r"-m (\S+)", stage["cmd"]).group(1) for stage in pipeline.values()]


def outputs(module: str) -> list[str]:
    """The paths dvc.yaml lists as the stage's outs, metrics and plots (and the download stage's store)."""
    name = module.removeprefix("stages.")
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    paths = [next(iter(e)) if isinstance(e, dict) else e for key in ("outs", "metrics", "plots")
             for e in stage.get(key, [])]
    return paths + (["data/.download"] if name == "download" else [])


def disk_bytes(folder: Path, paths: list[str]) -> int:
    """Bytes on disk of `paths` under `folder`, each file once however many links it has."""
    seen, total = set(), 0
    for path in paths:
        root = folder / path
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        for file in files:
            stat = file.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def run_stage(module: str, folder: Path) -> tuple[float, float, int]:
    """Wall seconds and peak resident MiB of `python -m module` in `folder`."""
    report = folder / ".time"
    started = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), sys.executable, "-m", module],
                          cwd=folder, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.monotonic() - started
    if done.returncode:
        print(done.stdout[-3000:])
        raise SystemExit(f"{module} failed (exit {done.returncode})")
    last = [line for line in done.stdout.splitlines() if line.strip() and "━" not in line][-3:]
    for line in last:
        print(f"    {line[:150]}")
    return wall, int(report.read_text().split()[-1]) / 1024, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenet_v3_small")
    parser.add_argument("--steps", type=int, default=50, help="training batches (of 64) in the one epoch")
    parser.add_argument("--keep", type=Path, help="a folder to run in and keep (default: a temporary one)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="cxr14-full-scale-"))
    (folder / "data").mkdir(parents=True, exist_ok=True)
    if not (folder / "data" / "reference").exists():
        (folder / "data" / "reference").symlink_to(REPO / "data" / "reference")
    (folder / "params.yaml").write_text(yaml.safe_dump(full_scale_params(args)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; folder {folder}")
    rows, total = [], 0.0
    try:
        for module in stages():
            print(f"{module} ...", flush=True)
            wall, peak, _ = run_stage(module, folder)
            rows.append((module.removeprefix("stages."), wall, peak, disk_bytes(folder, outputs(module))))
            total += wall
    finally:
        print("\nstage        wall s   peak RSS MiB   outputs on disk MiB")
        for name, wall, peak, size in rows:
            print(f"{name:<12} {wall:7.1f}   {peak:8.0f}       {size / 2**20:10.1f}")
        print(f"{'all':<12} {sum(r[1] for r in rows):7.1f}")
        print("(synthetic images at full NIH row count; times measure the code's scaling, not NIH's pixels)")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
