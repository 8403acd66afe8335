"""One GPU per running stage, machine-wide: several experiments at once (DVC's queue, `cxr table run
--jobs N`) never share a GPU, and wait for one when all are taken.

Each GPU has a lock file in LOCK_DIR, one folder for the whole machine (queued experiments run in
temporary copies of the repository, so a folder under data/ would be one per copy). A stage that
runs on GPUs takes as many locks as it has processes (train.processes), all or none, and holds them
while it runs; the kernel drops them when the process ends, even on kill -9. The stage then sees only
its own GPUs (CUDA_VISIBLE_DEVICES, set before CUDA is initialised), so its device index 0 (its
workers' local ranks under torchrun) is a GPU no other stage uses. A stage on the CPU takes no lock.

Stages that share the CPU split its cores: `cxr table run --jobs N` sets JOBS_VARIABLE on DVC's queue
workers, and each stage then runs torch on cores // N threads (unless OMP_NUM_THREADS says otherwise).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from cxr14.params import ParamError

LOCK_DIR = Path.home() / ".cache" / "cxr14" / "gpu-locks"
JOBS_VARIABLE = "CXR14_JOBS"  # how many stages share this machine's CPU cores
POLL_SECONDS = 5.0  # how often a stage waiting for a GPU tries again


def visible() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them ("0", "1", ... when unset).
    torch.cuda.device_count() asks NVML, which leaves CUDA uninitialised, so CUDA_VISIBLE_DEVICES can
    still be narrowed afterwards."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in listed.split(",") if name.strip()][:count]


def _lock_file(lock_dir: Path, gpu: str) -> Path:
    return lock_dir / f"gpu-{gpu.replace('/', '_')}.lock"


def try_claim(gpus: list[str], count: int, lock_dir: Path = LOCK_DIR, holder: str = "") -> list | None:
    """Lock `count` of `gpus` (the first free ones) and return them with their open lock files, or None, holding
    nothing, when fewer are free: a stage that wants two GPUs never sits on one while it waits."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = []  # (name, open lock file)
    for gpu in gpus:
        handle = open(_lock_file(lock_dir, gpu), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(holder or f"pid {os.getpid()}")
        handle.flush()
        held.append((gpu, handle))
        if len(held) == count:
            return held
    _release(held)
    return None


def _release(handles: list) -> None:
    for _, handle in handles:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def holders(gpus: list[str], lock_dir: Path = LOCK_DIR) -> list[str]:
    """Who holds each GPU, as its lock file says (for the waiting message)."""
    out = []
    for gpu in gpus:
        path = _lock_file(lock_dir, gpu)
        text = path.read_text().strip() if path.exists() else ""
        out.append(f"GPU {gpu}: {text or 'free'}")
    return out


@contextlib.contextmanager
def claim(gpus: list[str], count: int, lock_dir: Path = LOCK_DIR, poll: float = POLL_SECONDS,
          holder: str = "", log=partial(print, flush=True)) -> Iterator[list[str]]:
    """Hold `count` of `gpus` (their names) while the block runs; wait, saying so once, while they are taken."""
    waited = False
    while (handles := try_claim(gpus, count, lock_dir, holder)) is None:
        if not waited:
            log(f"waiting for {count} free GPU{'s' * (count > 1)} of {len(gpus)}; in use: "
                + "; ".join(holders(gpus, lock_dir)))
            waited = True
        time.sleep(poll)
    try:
        yield [gpu for gpu, _ in handles]
    finally:
        _release(handles)


def threads_per_job(cores: int, jobs: int) -> int:
    return max(1, cores // max(1, jobs))


def share_cpu() -> None:
    """Run torch on this stage's share of the cores when JOBS_VARIABLE says several stages share them.
    An explicit OMP_NUM_THREADS wins (torchrun sets it to 1 for its workers). On the CPU the thread
    count changes the order of floating-point sums, so figures differ in their last digits from a run
    on another thread count; the same thread count gives the same figures."""
    jobs = os.environ.get(JOBS_VARIABLE)
    if jobs and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads_per_job(len(os.sched_getaffinity(0)), int(jobs)))


@contextlib.contextmanager
def held(device: str, count: int, key: str, lock_dir: Path = LOCK_DIR, poll: float = POLL_SECONDS,
         log=partial(print, flush=True)) -> Iterator[list[str]]:
    """The devices of one stage for as long as it runs: `count` GPUs of their own (device auto or cuda,
    when any is visible), seen as cuda:0 ... cuda:count-1; none on the CPU (device cpu, or no GPU).
    `key` is the param that asks for `count` (train.processes), named when fewer GPUs are visible.
    Call before anything initialises CUDA."""
    share_cpu()
    gpus = [] if device == "cpu" else visible()
    if not gpus:  # the CPU: nothing to share out (device cuda without a GPU: runtime.decide says so)
        yield []
        return
    if count > len(gpus):
        raise ParamError(key, count, f"at most {len(gpus)}: the GPUs visible here ({', '.join(gpus)})")
    holder = f"pid {os.getpid()} in {Path.cwd()}, since {time.strftime('%H:%M:%S')}"
    with claim(gpus, count, lock_dir, poll, holder, log) as mine:
        if torch.cuda.is_initialized():  # too late to narrow what CUDA sees (stages called in one process): select
            if count > 1:
                raise RuntimeError("cxr14.gpus.held: CUDA is already initialised; claim several GPUs before using CUDA")
            previous = torch.cuda.current_device()
            torch.cuda.set_device(gpus.index(mine[0]))
            try:
                yield mine
            finally:
                torch.cuda.set_device(previous)
            return
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # read when CUDA starts; torchrun's workers inherit it
        try:
            yield mine
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
