"""Writes that are all or nothing: a process that dies (kill -9, Ctrl-C, out of memory) never leaves a file that
looks complete. Nothing is fsynced: after a power loss, a file renamed into place in the last seconds may read
as zeros (the crop stage's packed array too); rerun its stage (`dvc repro -f -s NAME`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Delete the temporary files of `path` left by killed processes (kill -9 runs no cleanup)."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    Temporary files of earlier, killed writers of the same path are deleted first. An OSError of the
    write (a full disk) names `path`, not the temporary file (nor nothing, as a failed flush does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.errno is not None and error.filename2 is None and error.filename in (None, str(tmp), tmp):
            error.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Index files keep every column as written: image names and labels stay strings."""
    return pd.read_csv(path, dtype={"image": str, "labels": str, "patient_id": int}, keep_default_na=False)
