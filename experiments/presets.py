"""Small-scale settings in one place: presets/NAME.yaml, each a mapping of dotted params keys to values, as
`dvc exp run -S KEY=VALUE` takes them (overrides of params.yaml, which holds every default).

    demo       `cxr demo` and `cxr table run --demo`
    test       the tests' scale, on top of demo (tests/conftest.py)
    smoke      the runs through DVC in the end-to-end tests and the GPU check's dry run, on top of demo
    gpu_check  the GPU check on a GPU, on top of demo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxr14.params import parse

FOLDER = Path(__file__).resolve().parents[1] / "presets"


def load(*names: str) -> dict[str, Any]:
    """The named presets merged in order, later ones winning: load("demo", "smoke")."""
    merged: dict[str, Any] = {}
    for name in names:
        path = FOLDER / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in FOLDER.glob("*.yaml")))
            raise FileNotFoundError(f"{path}: no such preset; the presets are {known}")
        settings = parse(path.read_text(), path) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: expected a mapping of dotted keys (train.epochs: 2) to values")
        merged.update(settings)
    return merged
