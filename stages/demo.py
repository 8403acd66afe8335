"""The demo: the whole pipeline through DVC, offline, on the embedded synthetic data set.

DEMO holds the small settings in one place (image count, pixel size, backbone, epochs), as `-S`
overrides of params.yaml; `cxr demo` runs them as a DVC experiment named `demo` in a temporary
directory (`dvc exp run --temp`), so the user's params.yaml and workspace stay as they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

# Sized for a 2-core CPU: about 3 minutes of training (resnet18 from scratch, 64 px).
DEMO = {
    "data.source": "synthetic",
    "data.synthetic.images": 3000,
    "data.synthetic.image_size": 128,
    "data.synthetic.min_positives_per_label": 150,
    "crop.size": 64,
    "model.backbone": "resnet18",
    "model.pretrained": "none",
    "model.head.hidden": [],
    "model.head.dropout": 0.0,
    "train.epochs": 8,
    "train.batch_size": 32,
    "train.optimizer": "adam",
    "train.early_stopping_patience": None,
    "evaluate.bootstrap": 200,
}


def overrides(settings: dict = DEMO) -> list[str]:
    """`key=value` strings for `dvc exp run -S`, values in YAML flow style."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in settings.items()]


def run(name: str = "demo", extra: list[str] = ()) -> int:
    if not Path("dvc.yaml").exists():
        raise FileNotFoundError("run the demo from the repository root (where dvc.yaml is)")
    subprocess.run(["dvc", "exp", "remove", name], capture_output=True)  # rerunning replaces it
    command = ["dvc", "exp", "run", "--temp", "-n", name]
    for item in [*overrides(), *extra]:
        command += ["-S", item]
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command)
    if done.returncode:
        return done.returncode
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True)
    result = experiment_metrics(json.loads(shown.stdout), name, "metrics/evaluate.json")
    from stages.evaluate import print_table
    from stages.tasks import Task

    task = result.get("task") or {}
    print_table(Task(**task) if task else _task_of(result), result)
    print(f"\nThe experiment `{name}` is saved: `dvc exp show`, `dvc metrics diff {name}`, `dvc exp apply {name}`.")
    return 0


def _task_of(result: dict):
    from stages.tasks import Task

    names = tuple(result["auroc"])
    kind = "multilabel15" if len(names) == 15 else "binary" if len(names) == 1 else "multilabel14"
    return Task(kind=kind, target=names[0] if kind == "binary" else "Fibrosis", negatives_per_positive=1.0)


def experiment_metrics(shown: list, name: str, path: str) -> dict:
    """One metrics file of a named experiment, out of `dvc exp show --json`."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if exp.get("name") == name:
                for rev in exp.get("revs") or []:
                    data = rev.get("data") or {}
                    metrics = data.get("metrics", {}).get(path, {}).get("data")
                    if metrics:
                        return metrics
    sys.exit(f"no metrics {path} found for the experiment {name}")
