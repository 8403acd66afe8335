"""Shared test helpers: a small project folder with the reference files, params files, a tiny pipeline."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Small settings every test starts from; a test overrides what it checks.
BASE = {
    "seed": 3,
    "data": {"source": "synthetic", "synthetic": {"images": 400, "image_size": 64, "min_positives_per_label": 12,
                                                  "max_images_per_patient": 10}},
    "filter": {"blacklist": True},
    "crop": {"fraction": 0.75, "size": 32, "workers": 2},
    "split": {"method": "patient", "sizes": [0.6, 0.2, 0.2]},
    "resample": {"targets": {}},
    "task": {"kind": "multilabel14"},
    "model": {"backbone": "resnet18", "pretrained": "none", "head": {"hidden": [], "dropout": 0.0}},
    "train": {"epochs": 2, "batch_size": 32, "optimizer": "adam", "augment": {"enabled": True}},
    "evaluate": {"bootstrap": 50, "batch_size": 64},
}


def merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_params(folder: Path, changes: dict | None = None, base: dict = BASE) -> str:
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(merge(base, changes or {})))
    return str(path)


def make_project(folder: Path) -> Path:
    """A folder laid out like the repository: data/reference beside the stages' outputs."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    link = folder / "data" / "reference"
    if not link.exists():
        link.symlink_to(REPO / "data" / "reference")
    return folder


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """download (synthetic) -> filter -> crop -> split -> resample, once for the session: read it, don't change it."""
    from stages import crop, download, filter, resample, split

    folder = make_project(tmp_path_factory.mktemp("tiny"))
    here = os.getcwd()
    os.chdir(folder)
    try:
        params = write_params(folder)
        for stage in (download, filter, crop, split, resample):
            stage.main(params)
    finally:
        os.chdir(here)
    return folder
