"""Kills leave no process behind and no temporary file for good; one stage of a workspace runs at a time, and one
DVC run's params stay as they began; a full or read-only disk is one line."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from cxr14.atomic import atomic_path
from cxr14.params import StageError
from stages import crop

from .conftest import REPO, preset_overrides, working_tree_copy, write_params

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler of its own for the signal (/proc: SigCgt)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; it waits only for its parent to read its status


def wait_until(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def pipeline(tiny_pipeline, tmp_path, monkeypatch):
    shutil.copytree(tiny_pipeline, tmp_path / "p", symlinks=True)
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def blocked_crop(folder: Path) -> Path:
    """Point the crop stage at an archive that is a named pipe: its workers block reading it until killed."""
    fifo = folder / "stalled.tar.gz"
    os.mkfifo(fifo)
    sources = folder / "data/raw/sources.csv"
    shutil.copy(sources, folder / "sources.good.csv")
    pd.DataFrame({"kind": ["tar"], "path": [str(fifo)], "image": [""]}).to_csv(sources, index=False)
    return Path(write_params(folder, {"crop": {"workers": 2}}))


def temporary_arrays(folder: Path) -> list[Path]:
    return sorted((folder / "data/crop").glob(".images.npy.tmp*"))


def test_kill_9_of_crop_ends_its_workers_and_the_next_run_removes_its_temporary_array(pipeline):
    params = blocked_crop(pipeline)
    stage = subprocess.Popen([sys.executable, "-m", "stages.crop", "--params", str(params)], cwd=pipeline, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: temporary_arrays(pipeline) and len(children(stage.pid)) >= 1)
        workers = children(stage.pid)
        # Pool.terminate() ends workers with SIGTERM: they must not run the stage's own SIGTERM handler
        # (inherited through fork, it unwinds Python and once left a worker waiting forever).
        assert all(not catches(pid, signal.SIGTERM) for pid in workers) and catches(stage.pid, signal.SIGTERM)
        stage.kill()
        stage.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 10), "workers outlived the stage"
    finally:
        stage.kill()
    assert temporary_arrays(pipeline)  # kill -9 runs no cleanup ...
    shutil.copy(pipeline / "sources.good.csv", pipeline / "data/raw/sources.csv")
    crop.main(str(params))
    assert not temporary_arrays(pipeline)  # ... the next run removes it
    assert (pipeline / "data/crop/images.npy").exists()


def test_a_stage_whose_parent_is_killed_stops_and_cleans_up(pipeline):
    """As when `dvc exp run` is killed with -9: the stage ends too, removing its temporary output."""
    params = blocked_crop(pipeline)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-m", "stages.crop", "--params", {str(params)!r}])
        print(child.pid, flush=True)
        child.wait()
    """)], cwd=pipeline, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        stage = int(parent.stdout.readline())
        assert wait_until(lambda: temporary_arrays(pipeline) and children(stage))
        workers = children(stage)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_until(lambda: not alive(stage), 10), "the stage outlived its parent"
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 10), "workers outlived the stage"
        assert wait_until(lambda: not temporary_arrays(pipeline), 5)
    finally:
        parent.kill()


def hold_the_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from cxr14.stage import workspace_lock
        with workspace_lock("train"):
            print("held", flush=True)
            time.sleep(60)
    """)], cwd=folder, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_stage_in_a_workspace_stops_naming_the_running_one(pipeline):
    params = write_params(pipeline)
    holder = hold_the_lock(pipeline)
    try:
        before = (pipeline / "data/filter/index.csv").stat().st_mtime_ns
        done = subprocess.run([sys.executable, "-m", "stages.filter", "--params", params], cwd=pipeline, env=ENV,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert f"the stage train (pid {holder.pid}" in done.stderr and "dvc exp run --temp" in done.stderr
        assert "Traceback" not in done.stderr
        assert (pipeline / "data/filter/index.csv").stat().st_mtime_ns == before  # it did nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_frees_the_workspace(pipeline):
    params = write_params(pipeline)
    holder = hold_the_lock(pipeline)
    holder.kill()
    holder.wait()
    done = subprocess.run([sys.executable, "-m", "stages.filter", "--params", params], cwd=pipeline, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_temporary_files_of_live_writers_are_left_alone(tmp_path):
    target = tmp_path / "out.csv"
    live = tmp_path / f".out.csv.tmp{os.getppid()}"  # the test runner's parent: alive
    dead = tmp_path / ".out.csv.tmp999999999"
    live.write_text("writing")
    dead.write_text("left by a kill")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert live.exists() and not dead.exists() and target.read_text() == "new"


def test_crop_stops_before_any_work_when_the_disk_cannot_hold_the_array(pipeline, monkeypatch):
    params = write_params(pipeline, {"crop": {"pixels": 48}})
    before = (pipeline / "data/crop/images.npy").stat().st_mtime_ns
    monkeypatch.setattr(crop.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StageError) as caught:
        crop.main(params)
    assert "data/crop/images.npy needs" in str(caught.value) and "1,000 free" in str(caught.value)
    assert (pipeline / "data/crop/images.npy").stat().st_mtime_ns == before and not temporary_arrays(pipeline)


def test_a_worker_killed_under_crop_stops_it_with_a_message(pipeline):
    params = blocked_crop(pipeline)
    stage = subprocess.Popen([sys.executable, "-m", "stages.crop", "--params", str(params)], cwd=pipeline, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: temporary_arrays(pipeline) and children(stage.pid))
        time.sleep(0.5)  # the workers have said who they are
        os.kill(min(children(stage.pid)), signal.SIGKILL)  # as the out-of-memory killer would
        _, err = stage.communicate(timeout=30)
        assert stage.returncode == 1 and "crop worker process" in err and "died" in err
    finally:
        stage.kill()
    assert not temporary_arrays(pipeline)


# ---------------------------------------------------------------- a full disk or a read-only folder: one line, exit 1

def run_read_only(folder: Path, protect: str, command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` in `folder` with `folder/protect` mounted read-only, in a mount namespace of an
    unprivileged user namespace (chmod does not stop root, whom the tests may run as)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) to make a folder read-only")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && cd "$PWD" && shift && exec "$@"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder / protect), *command], cwd=folder,
                          env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("protect, path", [(".", "data/.stage.lock"), ("metrics", "metrics/filter.json")],
                         ids=["read-only workspace", "read-only metrics folder"])
def test_a_read_only_folder_stops_a_stage_in_one_line(pipeline, protect, path):
    params = write_params(pipeline)
    done = run_read_only(pipeline, protect, [sys.executable, "-m", "stages.filter", "--params", params])
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error in stage filter: cannot write {path}: Read-only file system; "
                                        "make it writable and run again"]


def test_a_disk_full_after_the_array_is_one_line_naming_the_index(pipeline, monkeypatch, capsys):
    """The disk fills while crop writes index.csv, after its array: pandas' flush raises ENOSPC naming no file."""
    from cxr14 import stage

    params = write_params(pipeline, {"crop": {"pixels": 24}})
    real = pd.DataFrame.to_csv

    def full_disk(frame, path=None, *args, **kwargs):
        if "index.csv" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    assert stage.run("stages.crop", params) == 1
    assert capsys.readouterr().err.splitlines() == ["error in stage crop: cannot write data/crop/index.csv: No space "
                                                    "left on device; free some space and run again"]
    assert not list((pipeline / "data/crop").glob(".*.tmp*"))


# ---------------------------------------------------------------- params.yaml may not change under a DVC run

def filter_error_when(meanwhile, pipeline, monkeypatch, capsys) -> tuple[str, list[str]]:
    """Run the filter stage through the runner with `meanwhile(params)` as its main: (params, stderr lines)."""
    from cxr14 import stage
    from stages import filter as filter_stage

    params = write_params(pipeline)
    monkeypatch.setattr(filter_stage, "main", meanwhile)
    assert stage.run("stages.filter", params) == 1
    return params, capsys.readouterr().err.splitlines()


def test_a_stage_stops_when_its_params_file_changes_while_it_runs(pipeline, monkeypatch, capsys):
    from stages import filter as filter_stage

    real = filter_stage.main

    def meanwhile(path):
        real(path)
        write_params(pipeline, {"filter": {"views": ["PA"]}})  # as a second `dvc exp run -S` in this workspace does

    params, lines = filter_error_when(meanwhile, pipeline, monkeypatch, capsys)
    assert len(lines) == 1 and lines[0].startswith(
        f'error in stage filter: {params} changed while the stage ran: filter.views was ["PA", "AP"] when it started '
        'and is now ["PA"]. Another `dvc exp run` or an edit in this workspace?')
    assert "dvc exp run --temp" in lines[0]


def test_a_stage_that_fails_while_its_params_change_names_the_change_first(pipeline, monkeypatch, capsys):
    """A second `dvc exp run` also resets the workspace's outputs: the first run's stage fails on a file gone."""
    def meanwhile(path):
        write_params(pipeline, {"filter": {"views": ["PA"]}})
        raise FileNotFoundError("data/raw/metadata.csv is gone")

    params, lines = filter_error_when(meanwhile, pipeline, monkeypatch, capsys)
    assert len(lines) == 1 and lines[0].startswith(
        f'error in stage filter: {params} changed while the stage ran: filter.views was ["PA", "AP"] when it started '
        'and is now ["PA"] (and the stage failed: data/raw/metadata.csv is gone). Another `dvc exp run`')


def test_a_stage_stops_when_the_params_changed_since_the_first_stage_of_its_dvc_run(pipeline, monkeypatch, capsys):
    from cxr14 import stage

    params = write_params(pipeline)
    run = ["999999991-1"]  # the DVC process running the stages (not alive: its record goes once another run starts)
    monkeypatch.setattr(stage, "dvc_run", lambda: run[0])
    assert stage.run("stages.filter", params) == 0
    write_params(pipeline, {"crop": {"pixels": 24}})  # between two stages of the same run
    assert stage.run("stages.split", params) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error in stage split: {params} changed during this DVC run: crop.pixels was 32 when the stage filter started "
        "and is now 24. Another `dvc exp run` or an edit in this workspace?")
    run[0] = "999999992-1"  # the next `dvc exp run`: its own values
    assert stage.run("stages.split", params) == 0
    assert [p.name for p in (pipeline / "data/.params-seen").iterdir()] == ["999999992-1.json"]


def test_a_stage_finds_the_dvc_process_that_runs_it():
    """DVC runs a stage's command through a shell, both with DVC_STAGE set: the first ancestor without it is DVC."""
    code = "from cxr14.stage import dvc_run; print(dvc_run())"
    env = {**ENV, "DVC_STAGE": "filter"}
    done = subprocess.run(["bash", "-c", f"{sys.executable} -c '{code}'; true"], env=env, capture_output=True, text=True)
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rpartition(")")[2].split()[19]
    assert done.stdout.strip() == f"{os.getpid()}-{start}", done.stderr
    outside = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert outside.stdout.strip() == "None"


SMOKE = preset_overrides("demo", "smoke")
SECOND_WRITER = """import yaml
params = yaml.safe_load(open("params.yaml"))
params["filter"]["views"] = ["PA"]
open("params.yaml", "w").write(yaml.safe_dump(params))
"""


@pytest.mark.e2e
def test_a_dvc_run_whose_params_change_between_stages_stops_naming_the_change(tmp_path):
    """A second `dvc exp run -S` in the workspace writes params.yaml while the first runs: here a second command
    of the download stage does it, after the stage itself, so the filter stage is the first to find it."""
    folder = working_tree_copy(tmp_path / "repo")
    (folder / "second_writer.py").write_text(SECOND_WRITER)
    dvc_yaml = (folder / "dvc.yaml").read_text()
    one_command = "    cmd: python -m stages.download\n"
    assert one_command in dvc_yaml
    (folder / "dvc.yaml").write_text(dvc_yaml.replace(
        one_command, "    cmd:\n      - python -m stages.download\n      - python second_writer.py\n"))
    for command in (["add", "-A"], ["commit", "-q", "-m", "a second writer of params.yaml"]):
        subprocess.run(["git", *command], cwd=folder, check=True, capture_output=True)
    command = ["dvc", "exp", "run", *[a for o in SMOKE for a in ("-S", o)], "filter"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Running stage 'filter'" in out, out[-3000:]
    assert ('error in stage filter: params.yaml changed during this DVC run: filter.views was ["PA", "AP"] when the '
            'stage check started and is now ["PA"]') in out, out[-3000:]
    assert "dvc exp run --temp" in out and "Traceback" not in out
