"""Running a stage from the command line: `python -m stages.<name> [--params FILE]` (dvc.yaml's form)
or `cxr <name>`.

- A failure the user can act on is one red line and an exit code, never a traceback: 2 for a bad
  value in params.yaml, 1 for a failure of the stage (a missing input, a NaN loss, a full disk).
- One stage at a time in a workspace: a lock file (data/.stage.lock) held while the stage runs; a
  second stage stops at once, naming the one that runs. A killed holder frees it (the kernel drops
  the lock with the process).
- A stage dies with its parent: killing `dvc exp run` (even with kill -9) ends the stage and, through
  the same mechanism in each worker, its worker processes, instead of leaving them writing outputs.
- A full disk or a folder that cannot be written, in any stage, is one line naming the path (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import importlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import typer

from cxr14.params import PARAMS_FILE, ParamError, StageError

LOCK_FILE = Path("data/.stage.lock")
# A write that the user can fix on the disk: full, over quota, read-only, not writable by this user.
DISK_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EROFS: "make it writable",
               errno.EACCES: "make it writable", errno.EPERM: "make it writable"}
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


def run(module: str, params: str = PARAMS_FILE) -> int:
    """Import `module` (stages.crop, ...), run its main(params) under the workspace lock (the processes
    torchrun starts run under their launcher's) and return the exit code."""
    name = module.rpartition(".")[2]
    try:
        if under_torchrun():
            importlib.import_module(module).main(params)
        else:
            with workspace_lock(name):
                importlib.import_module(module).main(params)
    except (ParamError, StageError, OSError, FloatingPointError) as error:
        code = failure(error, name, params)
        if code is None:
            raise
        return code
    return 0


def command_line(module: str) -> None:
    """The `if __name__ == "__main__"` of a stage module. The module is imported under its own name
    (not as __main__), so that the functions its worker processes run are found by that name."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=f"Run the stage {module}.")
    parser.add_argument("--params", "-p", default=PARAMS_FILE, help="the params file to read")
    params = parser.parse_args().params
    signal.signal(signal.SIGTERM, _terminate)
    die_with_parent()
    sys.exit(run(module, params))
