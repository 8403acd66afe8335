"""The demo: the whole pipeline through DVC, offline, on the embedded synthetic data set.

DEMO holds the small settings (presets/demo.yaml: image count, pixel size, backbone, epochs), as `-S`
overrides of params.yaml; `cxr demo` runs them as a DVC experiment named `demo` in a temporary
directory (`dvc exp run --temp`), so the user's params.yaml and workspace stay as they were.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from experiments import presets

DEMO = presets.load("demo")
# A table's image counts do not fit the demo's ~3,000 images: at smoke scale they become these fractions
# (random, patient) or NIH's lists as they are (official); see presets/demo.yaml.
SMOKE_FRACTIONS = DEMO["split.random.sizes"]


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _lookup(params: dict, key: str):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def overrides(settings: dict = DEMO, params: dict | None = None) -> list[str]:
    """`key=value` strings for `dvc exp run -S` (Hydra's override grammar), values in YAML flow style.

    Entries of a mapping param that params.yaml does not list yet (resample.targets.Hernia,
    train.class_weights.No Finding) go in as one mapping, `++resample.targets={Hernia:2500}`, which
    DVC merges into the existing one; that form also takes label names with spaces.
    """
    if params is None:
        params = yaml.safe_load(Path("params.yaml").read_text()) if Path("params.yaml").exists() else {}
    out, grouped = [], {}
    for key, value in settings.items():
        parent, _, leaf = key.rpartition(".")
        if parent and _lookup(params, key) is _ABSENT and isinstance(_lookup(params, parent), dict):
            grouped.setdefault(parent, {})[leaf] = value
        else:
            out.append(f"{key}={_flow(value)}")
    for parent, mapping in grouped.items():
        out.append(f"++{parent}={{" + ",".join(f"{k}:{_flow(v)}" for k, v in mapping.items()) + "}")
    return out


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
    """The per-label test AUROC table of a named experiment and its localization table, read through DVC."""
    import dvc.api

    from cxr14 import localize, tasks
    from cxr14.metrics import print_table

    params = dvc.api.params_show(rev=name)
    result = json.loads(dvc.api.read("metrics/evaluate.json", rev=name))
    print_table(tasks.check(params), result)
    located = json.loads(dvc.api.read("metrics/localize.json", rev=name))
    localize.print_table(located, params["localize"]["findings"],
                         title="localization on SYNTHETIC data (Wang et al.'s figures are NIH's)")
