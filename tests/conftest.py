"""Shared test helpers: a small project folder with the reference files, params files, a tiny pipeline.

Every test's params are the repository's params.yaml + TEST_SCALE (presets/demo.yaml and test.yaml) + the
test's own changes, made by the one helper that the demo and the tables use too (cxr14.params.apply): no test
runs a default that params.yaml does not hold.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cxr14.params import PARAMS_FILE, apply, flatten, load
from experiments import presets

REPO = Path(__file__).resolve().parents[1]

# The demo's small settings, smaller still (presets/demo.yaml, presets/test.yaml): a test overrides what it checks.
TEST_SCALE = presets.load("demo", "test")


def preset_overrides(*names: str, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The named presets merged (presets/NAME.yaml) as `key=value` items of `dvc exp run -S` (and `cxr table run
    -S`), without the keys under `leave_out` (such as "data.")."""
    from experiments.demo import overrides

    settings = {k: v for k, v in presets.load(*names).items() if not k.startswith(leave_out)}
    return overrides(settings, load(REPO / PARAMS_FILE))


def params_with(changes: dict | None = None) -> dict:
    """params.yaml + TEST_SCALE + `changes` (nested, such as {"train": {"epochs": 1}}, or dotted keys)."""
    return apply(apply(load(REPO / PARAMS_FILE), TEST_SCALE), flatten(changes or {}))


def write_params(folder: Path, changes: dict | None = None) -> str:
    path = Path(folder) / "params.yaml"
    path.write_text(yaml.safe_dump(params_with(changes)))
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


def working_tree_copy(folder: Path) -> Path:
    """A new git repository at `folder` holding this checkout's working tree as one commit: tracked files
    as they are now (uncommitted edits too) and untracked files that git does not ignore. End-to-end
    tests run DVC there, so they test the code being edited, not only the last commit."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    folder.mkdir(parents=True)
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is left out, as in the tree
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    for command in (["init", "-q"], ["config", "user.name", "test"], ["config", "user.email", "test@example.invalid"],
                    ["add", "-A"], ["commit", "-q", "-m", "working tree under test"]):
        subprocess.run(["git", *command], cwd=folder, check=True, capture_output=True)
    return folder


@pytest.fixture
def server():
    """A local HTTP server (127.0.0.1) with Range support that misbehaves on request (tests/http_server.py)."""
    from .http_server import Server

    s = Server()
    yield s
    s.stop()
