"""The demo: the whole pipeline through DVC, offline, on the embedded synthetic data set.

DEMO holds the small settings in one place (image count, pixel size, backbone, epochs), as `-S`
overrides of params.yaml; `cxr demo` runs them as a DVC experiment named `demo` in a temporary
directory (`dvc exp run --temp`), so the user's params.yaml and workspace stay as they were.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

# Sized for a 2-core CPU: about 3 minutes of training (resnet18 from scratch, 64 px).
DEMO = {
    "data.source": "synthetic",
    "data.synthetic.images": 3000,
    "data.synthetic.image_size": 128,
    "data.synthetic.min_positives_per_label": 150,
    "crop.size": 64,
    "split.fraction": 1.0,
    "split.sizes": [0.7, 0.1, 0.2],
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
    print_result(name)
    print(f"\nThe experiment `{name}` is saved: `dvc exp show`, `dvc metrics diff {name}`, `dvc exp apply {name}`.")
    return 0


def print_result(name: str) -> None:
    """The per-label test AUROC table of a named experiment, read through DVC."""
    import dvc.api

    from stages import tasks
    from stages.evaluate import print_table

    result = json.loads(dvc.api.read("metrics/evaluate.json", rev=name))
    print_table(tasks.check(dvc.api.params_show(rev=name)), result)
