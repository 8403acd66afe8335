"""Running a stage from the command line: `python -m stages.<name> [--params FILE]` (dvc.yaml's form)
or `cxr <name>`.

- A failure the user can act on is one red line and an exit code, never a traceback: 2 for a bad
  value in params.yaml, 1 for a failure of the stage (a missing input, a NaN loss, a full disk).
- One stage at a time in a workspace: a lock file (data/.stage.lock) held while the stage runs; a
  second stage stops at once, naming the one that runs. A killed holder frees it (the kernel drops
  the lock with the process).
- A stage dies with its parent: killing `dvc exp run` (even with kill -9) ends the stage and, through
  the same mechanism in each worker, its worker processes, instead of leaving them writing outputs.
- The params file may not change under a run: a stage stops when it changed while the stage ran, or
  since the first stage of the same `dvc repro` / `dvc exp run` started (a second `dvc exp run -S` in
  the same workspace rewrites params.yaml before DVC refuses it; the run going on would then train on
  its values and record them for outputs made with others).
- A full disk or a folder that cannot be written, in any stage, is one line naming the path (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
import yaml

from cxr14.atomic import write_json
from cxr14.params import PARAMS_FILE, ParamError, StageError, flatten, parse

LOCK_FILE = Path("data/.stage.lock")
# What each running `dvc repro` / `dvc exp run` found in the params file when its first stage started: one
# small file per DVC process (data/ is outside git and every DVC output), removed once that process has ended.
SEEN_DIR = Path("data/.params-seen")
# A write that the user can fix on the disk: full, over quota, read-only, not writable by this user.
DISK_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EROFS: "make it writable",
               errno.EACCES: "make it writable", errno.EPERM: "make it writable"}
ONE_AT_A_TIME = ("One workspace runs one experiment at a time: run several side by side with `dvc exp run --temp` "
                 "or DVC's queue (`dvc exp run --queue ...`, then `dvc queue start`)")
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op elsewhere)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent was gone before the request took effect (PID 1 may be the real one)
        os.kill(os.getpid(), sig)


def worker_process() -> None:
    """The initializer of a stage's worker processes: they die with the stage (even on kill -9), and
    SIGTERM (Pool.terminate) takes its default action rather than the stage's handler inherited
    through fork, which unwinds Python and once left a worker waiting forever on a queue's thread."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: temporary outputs are removed, worker pools terminated


@contextlib.contextmanager
def workspace_lock(stage: str, path: Path = LOCK_FILE) -> Iterator[None]:
    """Hold the workspace's stage lock, or stop at once naming the stage that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another stage"
            raise StageError(
                f"{holder} is running in this workspace ({path}): one stage at a time. Wait for it to end, "
                "or run experiments side by side with `dvc exp run --temp` or DVC's queue "
                "(`dvc exp run --queue ...`, then `dvc queue start`)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"the stage {stage} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


# ---------------------------------------------------------------- the params file may not change under a run

BYTES = "(the file's bytes, SHA-256)"  # the snapshot of a file that is not a YAML mapping


def snapshot(params: str | os.PathLike) -> dict[str, Any] | None:
    """The values of the params file, flattened (train.epochs: 30), as JSON would keep them; a file that is
    not a YAML mapping: the SHA-256 of its bytes; None when there is no file to read (the stage says so)."""
    try:
        raw = Path(params).read_bytes()
    except OSError:
        return None
    try:
        data = parse(raw.decode("utf-8"), params)
    except (UnicodeDecodeError, yaml.YAMLError, ParamError):
        data = None
    if not isinstance(data, dict):
        return {BYTES: hashlib.sha256(raw).hexdigest()}
    return json.loads(json.dumps(flatten(data), default=str))


def difference(before: dict[str, Any], after: dict[str, Any] | None, when: str) -> str:
    """`train.epochs was 5 when ... and is now 7`, for the first key that differs."""
    if after is None:
        return f"it was there when {when} and is gone now"
    if BYTES in before or BYTES in after:
        return f"its bytes differ from those it had when {when}"
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key, ...) != after.get(key, ...)]
    if not changed:
        return "it is the same again now"

    def shown(values: dict, key: str) -> str:
        return json.dumps(values[key]) if key in values else "absent"

    key = changed[0]
    more = f" ({len(changed) - 1} more key{'s' if len(changed) > 2 else ''} changed)" if len(changed) > 1 else ""
    return f"{key} was {shown(before, key)} when {when} and is now {shown(after, key)}{more}"


def dvc_run() -> str | None:
    """The `dvc repro` or `dvc exp run` process that runs this stage, as "PID-START" (its process id and start
    time, /proc), or None outside DVC (or without /proc). DVC gives a stage's command DVC_STAGE in its
    environment; the shell it runs the command in has it too; the nearest ancestor without it is DVC."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return None
    marker = f"DVC_STAGE={stage}".encode()
    pid = os.getppid()
    try:
        while pid > 1:
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            if marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return f"{pid}-{stat[19]}"
            pid = int(stat[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _running(run: str) -> bool:
    pid, _, start = run.partition("-")
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19] == start
    except (OSError, IndexError):
        return False


def same_as_first_stage(stage: str, params: str | os.PathLike, now: dict[str, Any], run: str | None,
                        folder: Path = SEEN_DIR) -> None:
    """Within one DVC run: remember the params the first stage started with; stop a later stage that finds others."""
    if run is None:
        return
    record, key = folder / f"{run}.json", str(Path(params).resolve())
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        seen = {}
    first = seen.get(key)
    if first is None:
        for old in folder.glob("*.json"):  # the records of DVC runs that have ended
            if not _running(old.stem):
                old.unlink(missing_ok=True)
        write_json(record, {**seen, key: {"stage": stage, "values": now}})
    elif first["values"] != now:
        raise StageError(changed(params, "during this DVC run",
                                 difference(first["values"], now, f"the stage {first['stage']} started")))


def changed(params: str | os.PathLike, when: str, how: str, failed: str = "") -> str:
    return (f"{params} changed {when}: {how}{failed}. Another `dvc exp run` or an edit in this workspace? "
            f"{ONE_AT_A_TIME}. Check {params} and run again")


@contextlib.contextmanager
def params_unchanged(stage: str, params: str | os.PathLike) -> Iterator[None]:
    """Stop the stage when the params file changes while it runs, or changed since the first stage of the
    same DVC run started (a second `dvc exp run` in this workspace, or an edit). A stage that fails while
    its params change says so first: the second `dvc exp run` also resets the workspace's outputs, so the
    first one's stage may fail on a file gone from under it."""
    before = snapshot(params)
    if before is not None:
        same_as_first_stage(stage, params, before, dvc_run())
    try:
        yield
    except Exception as error:
        after = None if before is None else snapshot(params)
        if after == before:
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise StageError(changed(params, "while the stage ran", difference(before, after, "it started"),
                                 f" (and the stage failed: {first})")) from error
    if before is not None:
        after = snapshot(params)
        if after != before:
            raise StageError(changed(params, "while the stage ran", difference(before, after, "it started")))


# ---------------------------------------------------------------- running a stage

def disk_error(error: OSError) -> str | None:
    """One line for a write that the user can fix on the disk (full, read-only), or None for other errors."""
    hint = DISK_ERRNOS.get(error.errno)
    if hint is None:
        return None
    where = error.filename2 if error.filename is None else error.filename
    return f"cannot write {where or 'its outputs'}: {error.strerror or error}; {hint} and run again"


def failure(error: BaseException, stage: str, params: str | os.PathLike) -> int | None:
    """Say in one red line what stopped the stage, and return the exit code: 2 for a bad value in the
    params file, 1 for a failure of the stage; None for anything else (a bug: its traceback is wanted)."""
    if isinstance(error, ParamError):
        typer.secho(f"error: {error.in_file(params)}", fg="red", err=True)
        return 2
    if isinstance(error, (StageError, FileNotFoundError, FloatingPointError)):
        line = str(error)
    elif isinstance(error, OSError) and disk_error(error):
        line = disk_error(error)
    else:
        return None
    typer.secho(f"error in stage {stage}: {line}", fg="red", err=True)
    return 1


def run(module: str, params: str = PARAMS_FILE, lock: bool = True) -> int:
    """Import `module` (stages.crop, ...), run its main(params) under the workspace lock (unless `lock` is
    false) and the params check (the processes torchrun starts run under their launcher's) and return the
    exit code."""
    name = module.rpartition(".")[2]
    try:
        if under_torchrun():
            importlib.import_module(module).main(params)
        else:
            with workspace_lock(name) if lock else contextlib.nullcontext(), params_unchanged(name, params):
                importlib.import_module(module).main(params)
    except (ParamError, StageError, OSError, FloatingPointError) as error:
        code = failure(error, name, params)
        if code is None:
            raise
        return code
    return 0


def command_line(module: str, lock: bool = True) -> None:
    """The `if __name__ == "__main__"` of a stage module. The module is imported under its own name
    (not as __main__), so that the functions its worker processes run are found by that name."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=f"Run the stage {module}.")
    parser.add_argument("--params", "-p", default=PARAMS_FILE, help="the params file to read")
    params = parser.parse_args().params
    signal.signal(signal.SIGTERM, _terminate)
    die_with_parent()
    sys.exit(run(module, params, lock))
