"""DVC's run cache keys a stage by its command, deps and params, less every key named `size` or `nfiles`
at any depth (dvc/stage/cache.py: `dict_sha256(..., exclude=[size, nfiles])`). A param with such a name
would make two experiments that differ only in it share one cached result. These tests keep every
param of params.yaml and every setting of tables.yaml in the key, and show it through DVC."""

import subprocess

import numpy as np
import pytest
import yaml
from dvc.stage.cache import _get_cache_hash

from cxr14.params import PARAMS_FILE, apply, load

from .conftest import REPO, preset_overrides, working_tree_copy


def run_cache_key(params: dict) -> str:
    """The run-cache key DVC computes for a stage that declares these params (the shape of its dvc.lock entry)."""
    return _get_cache_hash({"cmd": "python -m stages.crop", "deps": [], "outs": [{"path": "out"}],
                            "params": {"params.yaml": params}}, key=True)


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, "x"]
    return f"{value}-changed"


def every_key() -> list[str]:
    """Each dotted key of params.yaml (mappings too) and each key that a table's column sets."""
    keys = set()

    def walk(node, prefix):
        for name, value in node.items():
            keys.add(prefix + str(name))
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")

    walk(load(REPO / PARAMS_FILE), "")
    for table in yaml.safe_load((REPO / "tables.yaml").read_text()).values():
        for part in (table, *table["columns"]):
            keys.update(part.get("set", {}), part.get("demo", {}))
    return sorted(keys)


@pytest.mark.parametrize("key", every_key())
def test_every_param_is_part_of_dvcs_run_cache_key(key):
    params = load(REPO / PARAMS_FILE)
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    other = apply(params, {key: changed(node.get(last))})
    assert run_cache_key(other) != run_cache_key(params), (
        f"{key}: DVC's run cache ignores this key's value; rename it (DVC drops every key named size or nfiles)")


def test_the_guard_catches_a_key_dvc_ignores():
    params = {"crop": {"size": 32, "fraction": 0.75}}
    assert run_cache_key(apply(params, {"crop.size": 24})) == run_cache_key(params)
    assert run_cache_key(apply(params, {"crop.fraction": 0.5})) != run_cache_key(params)


SMOKE = preset_overrides("demo", "smoke")


def crop_run(folder, pixels: int) -> str:
    command = ["dvc", "exp", "run", *[a for o in [*SMOKE, f"crop.pixels={pixels}"] for a in ("-S", o)], "crop"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.e2e
def test_experiments_differing_only_in_the_crop_side_get_arrays_of_their_own_side(tmp_path):
    folder = working_tree_copy(tmp_path / "repo")
    crop_run(folder, 32)
    assert np.load(folder / "data/crop/images.npy", mmap_mode="r").shape[1:] == (32, 32)
    out = crop_run(folder, 24)
    assert "Running stage 'crop'" in out
    assert np.load(folder / "data/crop/images.npy", mmap_mode="r").shape[1:] == (24, 24)
    out = crop_run(folder, 32)  # back to 32: now the run cache may restore the first run, and must restore 32
    assert "Stage 'crop' is cached - skipping run" in out
    assert np.load(folder / "data/crop/images.npy", mmap_mode="r").shape[1:] == (32, 32)
