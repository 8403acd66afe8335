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
    """A value in a params file that cannot be used. The checks see only the loaded values, so the
    message says params.yaml until whoever read the file names it: `in_file(path)` (the stage runner
    and `cxr check` do, with the file given by --params)."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid, self.file = key, value, valid, None
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.file or PARAMS_FILE}: {self.key} = {self.value!r} is not valid: expected {self.valid}"

    def in_file(self, path: str | Path) -> ParamError:
        """Name `path` as the file the value came from, unless a file is named already."""
        if self.file is None:
            self.file = str(path)
            self.args = (self._message(),)
        return self

    def __str__(self) -> str:
        return self.args[0]


class ParamsFileError(ParamError):
    """The params file cannot be read (not YAML, not text, a key given twice): the message names the
    file, and the line and column where there is one."""

    def __init__(self, path: Path, problem: str):
        self.key, self.value, self.valid, self.file, self.problem = "(file)", None, "valid YAML", str(path), problem
        ValueError.__init__(self, self._message())

    def _message(self) -> str:
        return f"{self.file}: {self.problem}"


# The sections of params.yaml (every stage reads some of them); anything else at the top level is a typo.
SECTIONS = ("seed", "run_seed", "data", "filter", "crop", "split", "resample", "task", "model", "weights", "train",
            "evaluate", "localize")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers, as DVC reads params.yaml: `lr: 1e-4` is a number (YAML 1.1 makes it a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def load(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the repository root or pass --params")
    try:
        raw = path.read_bytes()
    except OSError as error:  # a folder, an unreadable file
        raise ParamsFileError(path, f"cannot be read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ParamsFileError(path, f"line {line}: byte 0x{raw[error.start]:02x} is not UTF-8 text: a params file "
                                    "is a YAML text file (a binary file given as params?)") from None
    try:
        data = parse(text, path) or {}
    except yaml.reader.ReaderError as error:  # a character YAML does not allow: most likely a binary file
        line = text[:error.position].count("\n") + 1
        raise ParamsFileError(path, f"line {line}: character #x{error.character:04x} is not allowed in YAML "
                                    f"({error.reason}): a params file is a YAML text file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsFileError(path, where + str(getattr(error, "problem", None) or error)) from None
    if not isinstance(data, dict):
        raise ParamError("(top level)", data, "a mapping of sections").in_file(path)
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ParamError(str(unknown[0]), data[unknown[0]],
                         "no such section: the sections are " + ", ".join(SECTIONS)).in_file(path)
    return data


def parse(text: str, path: str | Path) -> Any:
    """The YAML text of params file `path` as DVC reads it (YAML 1.2 numbers, no key given twice): yaml.load's
    steps, with the keys checked before the values are built."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, Path(path))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "", done: set | None = None) -> None:
    """A key given twice in one mapping: YAML keeps the last silently (DVC's reader refuses the file)."""
    done = set() if done is None else done
    if id(node) in done:  # an alias of a node seen already
        return
    done.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, path, f"{prefix.removesuffix('.')}[{i}].", done)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[tuple[str, str], yaml.Mark] = {}
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            name = f"{prefix}{key.value}"
            first = seen.setdefault((key.tag, key.value), key.start_mark)
            if first is not key.start_mark:
                mark = key.start_mark
                raise ParamsFileError(path, f"line {mark.line + 1}, column {mark.column + 1}: the key {name} is "
                                            f"given twice (first on line {first.line + 1}); YAML would keep only "
                                            "the last: keep one")
            _refuse_duplicate_keys(value, path, name + ".", done)


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


def training_seed(params: dict) -> int:
    """The seed of one training run's randomness (initialisation, augmentation, batch order, resampling and the
    binary task's negatives): `seed` for run_seed 1, `seed + run_seed - 1` for the others. The split and the
    test set follow `seed` alone, so the runs of `cxr table run --seeds N` are compared on the same images."""
    if "run_seed" not in params:
        raise ParamError("run_seed", None, f"a value: the key is missing (see {PARAMS_FILE} in the repository)")
    return seed(params) + int(check_number("run_seed", params["run_seed"], low=1, integer=True)) - 1


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
