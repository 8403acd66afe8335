"""Reading params.yaml: every stage checks its own sections before doing any work.

params.yaml is the only place a default lives: the code carries none, so a missing key is an
error naming it. A bad value stops the stage with an error that names the key, the value and
what is valid; a key that no stage reads (a typo) is an error too, not a silent no-op.
Tests, the demo and the tables' smoke scale all make their params as params.yaml + `apply(overrides)`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"


class StageError(RuntimeError):
    """A failure the user can act on (a bad download, an unreadable image): shown as one clear line."""


class ParamError(ValueError):
    """A value in params.yaml that cannot be used."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"params.yaml: {key} = {value!r} is not valid: expected {valid}")


class ParamsFileError(ParamError):
    """params.yaml cannot be read as YAML: the message names the file, line and column."""

    def __init__(self, path: Path, problem: str):
        ValueError.__init__(self, f"{path}: {problem}")
        self.key, self.value, self.valid = "(file)", None, "valid YAML"


# The sections of params.yaml (every stage reads some of them); anything else at the top level is a typo.
SECTIONS = ("seed", "data", "filter", "crop", "split", "resample", "task", "model", "weights", "train", "evaluate",
            "localize")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers, as DVC reads params.yaml: `lr: 1e-4` is a number (YAML 1.1 makes it a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the repository root or pass --params")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsFileError(path, where + str(getattr(error, "problem", None) or error)) from None
    if not isinstance(data, dict):
        raise ParamError("(top level)", data, "a mapping of sections")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ParamError(str(unknown[0]), data[unknown[0]], "no such section: the sections are " + ", ".join(SECTIONS))
    return data


class Section:
    """One section of params.yaml, read key by key with checks; `finish()` rejects unread keys."""

    def __init__(self, data: Any, prefix: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ParamError(prefix, data, "a mapping of keys")
        self.data, self.prefix, self.read = data, prefix, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str) -> Any:
        self.read.add(name)
        if name not in self.data:
            raise ParamError(self.key(name), None, f"a value: the key is missing (see {PARAMS_FILE} in the repository)")
        return self.data[name]

    def section(self, name: str) -> Section:
        return Section(self.get(name), self.key(name))

    def choice(self, name: str, options: Iterable[str]) -> str:
        options = tuple(options)
        value = self.get(name)
        if value not in options:
            raise ParamError(self.key(name), value, "one of " + ", ".join(map(str, options)))
        return value

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, bool):
            raise ParamError(self.key(name), value, "true or false")
        return value

    def number(self, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
        return check_number(self.key(name), self.get(name), low=low, high=high, low_open=low_open,
                            high_open=high_open, integer=integer)

    def optional_number(self, name: str, **limits) -> float | int | None:
        """A number, or null (the key must still be there)."""
        value = self.get(name)
        return None if value is None else check_number(self.key(name), value, **limits)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            name = unknown[0]
            raise ParamError(self.key(name), self.data[name],
                             "no such key: known keys here are " + ", ".join(sorted(self.read)))


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    valid = kind + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ParamError(key, value, valid)
    if math.isnan(value) or (low is not None and (value <= low if low_open else value < low)):
        raise ParamError(key, value, valid)
    if high is not None and (value >= high if high_open else value > high):
        raise ParamError(key, value, valid)
    return int(value) if integer else float(value)


def section(params: dict, name: str) -> Section:
    """A top-level section of params.yaml (data, crop, train, ...), which must be there."""
    if name not in params:
        raise ParamError(name, None, f"a section: it is missing (see {PARAMS_FILE} in the repository)")
    return Section(params[name], name)


def seed(params: dict) -> int:
    if "seed" not in params:
        raise ParamError("seed", None, f"a value: the key is missing (see {PARAMS_FILE} in the repository)")
    return int(check_number("seed", params["seed"], low=0, integer=True))


def apply(params: dict, overrides: dict[str, Any]) -> dict:
    """A copy of `params` with dotted keys set, as `dvc exp run -S key=value` sets them: the last part
    of the key is replaced (a mapping value too); the sections above it are kept, or made."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = copy.deepcopy(value)
    return out


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}; an empty mapping stays a value."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
