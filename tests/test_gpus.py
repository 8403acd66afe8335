"""One GPU per running stage (cxr14/gpus.py): machine-wide lock files, tested with a faked GPU count."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from cxr14 import gpus
from cxr14.params import ParamError

from .conftest import REPO


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_two_holders_get_different_gpus(tmp_path):
    with gpus.claim(["0", "1"], 1, tmp_path) as first, gpus.claim(["0", "1"], 1, tmp_path) as second:
        assert first == ["0"] and second == ["1"]


def stage(lock_dir, device="auto", seconds=60):
    """A stage in its own process on a machine with two GPUs (faked): it prints the GPUs it sees, then works."""
    code = ("import os, sys, time; from pathlib import Path; import torch; torch.cuda.device_count = lambda: 2\n"
            "from cxr14 import gpus\n"
            f"with gpus.held({device!r}, 1, 'train.processes', Path({str(lock_dir)!r})):\n"
            "    print(os.environ.get('CUDA_VISIBLE_DEVICES', 'cpu'), flush=True); time.sleep(%d)\n" % seconds)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def test_two_stages_at_once_each_see_a_gpu_of_their_own(tmp_path):
    first, second = stage(tmp_path), stage(tmp_path)
    try:
        assert sorted([first.stdout.readline().strip(), second.stdout.readline().strip()]) == ["0", "1"]
    finally:
        for process in (first, second):
            process.kill()
            process.wait()
            process.stdout.close()


def test_a_third_holder_waits_until_one_releases(tmp_path):
    said, got = [], []
    first = gpus.claim(["0", "1"], 1, tmp_path)
    assert first.__enter__() == ["0"]
    with gpus.claim(["0", "1"], 1, tmp_path):
        def third():
            with gpus.claim(["0", "1"], 1, tmp_path, poll=0.02, log=said.append) as mine:
                got.append(mine)

        waiter = threading.Thread(target=third)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and got == []
        assert len(said) == 1 and said[0].startswith("waiting for 1 free GPU of 2; in use: GPU 0: pid")
        first.__exit__(None, None, None)
        waiter.join(5)
        assert got == [["0"]]


def test_a_killed_holders_gpu_is_free_again(tmp_path):
    holder = stage(tmp_path)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert gpus.try_claim(["0"], 1, tmp_path) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with gpus.claim(["0"], 1, tmp_path, poll=0.02) as mine:
            assert mine == ["0"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_the_cpu_takes_no_lock(tmp_path, monkeypatch, two_gpus):
    with gpus.held("cpu", 1, "train.processes", tmp_path / "locks") as mine:
        assert mine == [] and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with gpus.held("auto", 1, "train.processes", tmp_path / "locks") as mine:
        assert mine == []
    assert not (tmp_path / "locks").exists()


def test_several_processes_take_as_many_gpus_all_or_none(tmp_path):
    with gpus.claim(["0", "1", "2"], 2, tmp_path) as pair:
        assert pair == ["0", "1"]
        assert gpus.try_claim(["0", "1", "2"], 2, tmp_path) is None  # one is free: not enough, and not kept
        with gpus.claim(["0", "1", "2"], 1, tmp_path) as single:
            assert single == ["2"]


def test_more_processes_than_gpus_is_a_param_error(tmp_path, two_gpus):
    with pytest.raises(ParamError, match="train.processes = 3 .* at most 2"):
        with gpus.held("auto", 3, "train.processes", tmp_path):
            pass


def test_gpus_are_named_as_cuda_visible_devices_names_them(tmp_path, monkeypatch, two_gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpus.visible() == ["2", "3"]
    with gpus.claim(["2", "3"], 1, tmp_path):  # GPU 2 is another stage's
        with gpus.held("auto", 1, "train.processes", tmp_path) as mine:
            assert mine == ["3"] and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize("cores, jobs, threads", [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 8, 2), (16, 3, 5)])
def test_jobs_sharing_the_cpu_split_its_cores(cores, jobs, threads):
    assert gpus.threads_per_job(cores, jobs) == threads


def test_the_job_count_reaches_torch_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv(gpus.JOBS_VARIABLE, str(len(os.sched_getaffinity(0))))
        gpus.share_cpu()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        gpus.share_cpu()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
