"""Reading params.yaml: every stage checks its own sections before doing any work.

A bad value stops the stage with an error that names the key, the value and what is valid;
a key that no stage reads (a typo) is an error too, not a silent no-op.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
_MISSING = object()


class StageError(RuntimeError):
    """A failure the user can act on (a bad download, an unreadable image): shown as one clear line."""


class ParamError(ValueError):
    """A value in params.yaml that cannot be used."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"params.yaml: {key} = {value!r} is not valid: expected {valid}")


def load(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the repository root or pass --params")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamError("(top level)", data, "a mapping of sections")
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

    def get(self, name: str, default: Any = _MISSING) -> Any:
        self.read.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise ParamError(self.key(name), None, "a value (the key is missing)")
        return default

    def section(self, name: str) -> Section:
        return Section(self.get(name, {}), self.key(name))

    def choice(self, name: str, options: Iterable[str], default: Any = _MISSING) -> str:
        options = tuple(options)
        value = self.get(name, default)
        if value not in options:
            raise ParamError(self.key(name), value, "one of " + ", ".join(map(str, options)))
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ParamError(self.key(name), value, "true or false")
        return value

    def number(self, name: str, default: Any = _MISSING, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, integer: bool = False) -> float | int:
        value = self.get(name, default)
        return check_number(self.key(name), value, low=low, high=high, low_open=low_open, integer=integer)

    def optional_number(self, name: str, default: Any = None, **limits) -> float | int | None:
        value = self.get(name, default)
        return None if value is None else check_number(self.key(name), value, **limits)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            name = unknown[0]
            raise ParamError(self.key(name), self.data[name],
                             "no such key: known keys here are " + ", ".join(sorted(self.read)))


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> float | int:
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    valid = kind + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ParamError(key, value, valid)
    if math.isnan(value) or (low is not None and (value <= low if low_open else value < low)):
        raise ParamError(key, value, valid)
    if high is not None and value > high:
        raise ParamError(key, value, valid)
    return int(value) if integer else float(value)


def seed(params: dict) -> int:
    return int(check_number("seed", params.get("seed", 0), low=0, integer=True))
