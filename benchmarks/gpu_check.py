"""One command for a CUDA machine: what this project promises there, each part with a time limit, one summary.

    python3 benchmarks/gpu_check.py                  # on the GPU machine: under 8 minutes in all
    python benchmarks/gpu_check.py --cpu-dry-run     # the same parts, tiny, on the CPU: checks the script itself

(a) benchmarks/gpu_train_throughput.py: the train stage against a bare model-only loop (densenet121, 224 px,
    batch 128, bf16): images/s of each and their ratio.
(b) a small `dvc exp run --temp` end to end (synthetic data, resnet18 at 64 px, 2 epochs) with
    train.device=cuda and evaluate.device=cuda: its test macro AUROC.
(c) two experiments at once on one GPU through DVC's queue (`cxr table run optimizer_15 --jobs 2`): both
    must succeed; with one GPU, a stage waits for the other's GPU lock (cxr14/gpus.py), and the summary says
    whether one did.
(d) benchmarks/crop_throughput.py on all cores: images/s of the crop stage and of a plain PIL loop.

A machine without dvc: the script installs dvc, dvclive, captum, pydicom and isal from a folder of wheels
carried with the checkout (`--wheels DIR`, else .gpu/wh, shared/wheels/cp312-dvc, ../shared/wheels/cp312-dvc;
../shared/wheels/README.md says how to carry them), with no network. (b) and (c) run in a scratch git
repository holding this checkout's files (tracked and untracked, as tests/conftest.py working_tree_copy does),
removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_FOLDERS = (REPO / ".gpu" / "wh", REPO / "shared" / "wheels" / "cp312-dvc", REPO.parent / "shared" / "wheels" / "cp312-dvc")
PINS = ("dvc==3.67.1", "dvclive==3.49.1")
# what pyproject.toml needs beyond the GPU machine's packages: Grad-CAM (localize, predict) and DICOM (predict)
EXTRAS = ("captum==0.9.0", "pydicom", "isal")
MODULES = ("dvc", "dvclive", "captum", "pydicom", "isal")

# Seconds each part may take: 60 + 90 + 100 + 120 + 110 = 480 s at most, 8 minutes (H100: 19, 72, 65, 82 s measured).
LIMITS = {"install": 60, "a": 90, "b": 100, "c": 120, "d": 110}


@dataclass
class Part:
    key: str
    title: str
    ok: bool = False
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run(command: list[str], limit: float, cwd: Path = REPO, env: dict | None = None) -> tuple[int, str, float]:
    """Run a command in its own process group, killed whole at the time limit: (exit code, output, seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=limit)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code, output = 124, output + f"\n(killed at the time limit, {limit:.0f} s)"
    return code, output, time.perf_counter() - started


def environment(folder: Path) -> dict:
    """PATH with `python` as this interpreter (dvc.yaml's commands say `python -m stages.X`; a machine may have
    only python3) and the scripts folders of this python, where pip puts `dvc` (DVC's queue starts it by name)."""
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    # a script, not a symlink: a symlink to a virtual environment's python starts the base python, without
    # the environment's packages (found beside the invoked path, not the resolved one)
    shim = folder / "bin" / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    scripts = [str(folder / "bin"), sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    return {**os.environ, "PATH": os.pathsep.join([*scripts, os.environ.get("PATH", "")])}


def importable(*modules: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}"], capture_output=True).returncode == 0


def install(part: Part, wheels: Path | None) -> None:
    """dvc, dvclive, captum, pydicom and isal from carried wheels, when this python lacks them (the GPU machine
    has no network); the wheels folder needs captum's, pydicom's and isal's too (`pip download` them beside
    DVC's: `pip download --only-binary=:all: --python-version 3.12 isal -d .gpu/wh`)."""
    if importable(*MODULES):
        part.ok, part.figures = True, [f"{', '.join(MODULES)} already installed"]
        return
    folder = next((f for f in ([wheels] if wheels else WHEEL_FOLDERS) if f and f.is_dir()), None)
    if folder is None:
        part.figures = ["dvc is not installed and no wheels folder was found: " + ", ".join(map(str, WHEEL_FOLDERS))
                        + " (../shared/wheels/README.md)"]
        return
    code, output, part.seconds = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                                      str(folder), *PINS, *EXTRAS], LIMITS["install"])
    # the project itself, for the `cxr` command; the stages run as `python -m stages.X` without it
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
        LIMITS["install"])
    part.ok = code == 0 and importable(*MODULES)
    part.figures = [f"installed {', '.join(PINS + EXTRAS)} from {folder}" if part.ok else f"pip failed: {output[-600:]}"]


def scratch_repository(folder: Path) -> Path:
    """A git repository holding this checkout's files as one commit (DVC experiments need one)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode == 0:
        names = [n for n in listed.stdout.decode().split("\0") if n and not n.startswith((".gpu/", "shared/"))]
    else:  # a copy without .git: every file but outputs and carried folders
        skip = {".git", ".gpu", "shared", "__pycache__", ".pytest_cache", "dvc_plots"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not skip & set(p.relative_to(REPO).parts)
                 and (p.relative_to(REPO).parts[0] != "data" or p.relative_to(REPO).parts[1:2] == ("reference",))]
    for name in names:
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    for command in (["init", "-q"], ["config", "user.name", "gpu-check"], ["config", "user.email", "gpu@example.invalid"],
                    ["add", "-A"], ["commit", "-q", "-m", "gpu check"]):
        subprocess.run(["git", *command], cwd=folder, check=True, capture_output=True)
    return folder


def small_settings(dry: bool) -> dict:
    """The settings of a small synthetic run on CUDA (presets/gpu_check.yaml), or, for the dry run, at the smoke
    scale on the CPU (presets/smoke.yaml): on top of the demo's."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from experiments import presets

    device = "cpu" if dry else "cuda"
    return {**presets.load("smoke" if dry else "gpu_check"), "train.device": device, "evaluate.device": device}


def part_a(part: Part, dry: bool, env: dict) -> None:
    sizes = ["--device", "cpu", "--backbone", "resnet18", "--steps", "4", "--batch", "8", "--size", "64"] if dry else []
    code, output, part.seconds = run([sys.executable, "benchmarks/gpu_train_throughput.py", *sizes], LIMITS["a"], env=env)
    found = {key: re.search(rf"{key}:\s+([\d.%]+)", output) for key in ("train stage", "model-only loop", "stage / model-only")}
    part.figures = [f"{key} {m.group(1)}{'' if key.startswith('stage /') else ' images/s'}" for key, m in found.items() if m]
    device = re.search(r"^device: ([^;]+)", output, re.M)
    part.figures += [f"on {device.group(1)}"] if device else []
    ratio = found["stage / model-only"]
    part.ok = code == 0 and ratio is not None and (dry or float(ratio.group(1).rstrip("%")) >= 90)
    if not part.ok:
        part.figures.append(output[-800:])


def evaluated(repo: Path, experiment: str, env: dict) -> str:
    code = (f"import json, dvc.api; r = json.loads(dvc.api.read('metrics/evaluate.json', rev={experiment!r})); "
            "print(r['auroc_macro'], r['images'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    return done.stdout.strip()


def part_b(part: Part, dry: bool, repo: Path, env: dict) -> None:
    import yaml

    sys.path.insert(0, str(REPO))
    from experiments.demo import DEMO, overrides

    settings = overrides({**DEMO, **small_settings(dry)}, yaml.safe_load((REPO / "params.yaml").read_text()))
    command = ["dvc", "exp", "run", "--temp", "-n", "gpu-check", *[a for item in settings for a in ("-S", item)]]
    code, output, part.seconds = run(command, LIMITS["b"], cwd=repo, env=env)
    result = evaluated(repo, "gpu-check", env) if code == 0 else ""
    part.ok = code == 0 and bool(result)
    if part.ok:
        auroc, images = result.split()
        part.figures = [f"test macro AUROC {float(auroc):.3f} on {images} test images (synthetic data)",
                        f"train.device={'cpu' if dry else 'cuda'}"]
    else:
        part.figures = [output[-1200:]]


def part_c(part: Part, dry: bool, repo: Path, env: dict) -> None:
    small = [a for k, v in small_settings(dry).items() for a in ("-S", f"{k}={v}")]
    command = [sys.executable, "-m", "cli", "table", "run", "optimizer_15", "--demo", *small, "--jobs", "2"]
    code, output, part.seconds = run(command, LIMITS["c"], cwd=repo, env=env)
    if code == 124:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True)
    summary = re.search(r"table optimizer_15: .*", output)
    logs = "".join(subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True,
                                  text=True).stdout for name in ("optimizer_15-adam", "optimizer_15-sgd"))
    waits = logs.count("waiting for 1 free GPU")
    part.ok = code == 0 and summary is not None and "2 run, 0 kept, 0 failed" in summary.group(0)
    part.figures = [summary.group(0) if summary else "no summary line",
                    f"a stage waited for the other's GPU: {'yes' if waits else 'no'} ({waits} waits)"
                    + (" (CPU: no locks)" if dry else "")]
    if not part.ok:
        part.figures.append(output[-1200:])


def part_d(part: Part, dry: bool, env: dict) -> None:
    # 12 archives, as NIH has: with 2, two gzip readers feed 16 decoders and the readers set the pace (measured:
    # 953 images/s on 16 cores with 2 archives); 1,920 images (48 different ones): 16 decoders busy for seconds
    sizes = ["--images", "24", "--archives", "1", "--repeats", "1"] if dry else ["--images", "1920", "--archives",
                                                                                 "12", "--repeats", "1"]
    code, output, part.seconds = run([sys.executable, "benchmarks/crop_throughput.py", *sizes], LIMITS["d"],
                                     env={**env, "PYTHONPATH": str(REPO)})
    lines = output.splitlines()
    table = [line.strip() for line in lines if re.match(r"^(method|crop stage|plain|stage \()", line.strip())]
    part.ok = code == 0 and bool(table)
    part.figures = table or [output[-800:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: checks the script")
    parser.add_argument("--wheels", type=Path, help="a folder of dvc/dvclive wheels (../shared/wheels/README.md)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch repository")
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. bc (default: all)")
    args = parser.parse_args()
    if args.cpu_dry_run:  # a CPU is slower at everything, and the dry run checks the script, not the machine
        LIMITS.update({key: 4 * seconds for key, seconds in LIMITS.items()})
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="cxr-gpu-check-"))
    env = environment(scratch)
    parts = {key: Part(key, title) for key, title in (
        ("install", "dvc and dvclive"), ("a", "train stage vs model-only loop"), ("b", "dvc exp run end to end"),
        ("c", "two experiments at once, one GPU, DVC's queue"), ("d", "crop throughput, all cores"))}
    install(parts["install"], args.wheels)
    print(f"[install] {'ok' if parts['install'].ok else 'FAILED'}: {'; '.join(parts['install'].figures)}", flush=True)
    for key in "abcd":
        if key not in args.parts:
            parts[key].ok, parts[key].figures = True, ["not asked for (--parts)"]
    if "a" in args.parts:
        print("[a] train throughput ...", flush=True)
        part_a(parts["a"], args.cpu_dry_run, env)
    try:
        if parts["install"].ok and ("b" in args.parts or "c" in args.parts):
            repo = scratch_repository(scratch / "repo")
            if "b" in args.parts:
                print(f"[b] dvc exp run in {repo} ...", flush=True)
                part_b(parts["b"], args.cpu_dry_run, repo, env)
            if "c" in args.parts:
                print("[c] two at once through the queue ...", flush=True)
                part_c(parts["c"], args.cpu_dry_run, repo, env)
        elif not parts["install"].ok:
            parts["b"].figures = parts["c"].figures = ["skipped: no dvc"]
    finally:
        if args.keep:
            print(f"scratch repository kept: {scratch}")
        else:
            shutil.rmtree(scratch / "repo", ignore_errors=True)
    if "d" in args.parts:
        print("[d] crop throughput ...", flush=True)
        part_d(parts["d"], args.cpu_dry_run, env)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"\n== gpu_check{' (CPU dry run: tiny sizes)' if args.cpu_dry_run else ''}: {device}; torch {torch.__version__}; "
          f"python {sys.version.split()[0]}; {os.cpu_count()} cores ==")
    for part in parts.values():
        limit = LIMITS[part.key]
        print(f"{'(' + part.key + ')':<10}{part.title:<48} {'PASS' if part.ok else 'FAIL'}  ({part.seconds:.0f} s of {limit})")
        for figure in part.figures:
            print("      " + figure.replace("\n", "\n      "))
    passed = sum(p.ok for p in parts.values())
    print(f"total {time.perf_counter() - started:.0f} s; {passed}/{len(parts)} passed")
    return 0 if passed == len(parts) else 1


if __name__ == "__main__":
    sys.exit(main())
