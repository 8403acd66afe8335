"""The NIH download path, against a local HTTP server (127.0.0.1) that serves a small NIH and misbehaves on request.

The small NIH: the first 90 rows of the real metadata, in three archives of 20, 30 and 40 images
(incompressible 2 KiB members, so a transfer takes many blocks), with its own archive table.
"""

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr14 import boxes, images, metadata
from cxr14 import fetch as fetch_module
from cxr14.atomic import read_csv
from cxr14.params import StageError
from stages import download

from .conftest import REPO, working_tree_copy, write_params

NAMES = ["images_001.tar.gz", "images_002.tar.gz", "images_003.tar.gz"]
COUNTS = [20, 30, 40]
def make_archive(names, seed=0) -> bytes:
    """A gzip'd tar of NIH's layout (images/<name>), 2 KiB of noise a member: the download never decodes them."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            data = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def archives(project):
    """A small NIH in the project's data/reference: its metadata, and its archives by name."""
    real = REPO / "data/reference"
    reference = project / "data/reference"
    reference.unlink()  # the link to the repository's reference files
    reference.mkdir()
    rows = pd.read_csv(real / metadata.METADATA_FILE).sort_values("Image Index").head(sum(COUNTS))
    rows.to_csv(reference / metadata.METADATA_FILE, index=False)
    (reference / metadata.BLACKLIST_DIR).symlink_to(real / metadata.BLACKLIST_DIR)
    (reference / boxes.REFERENCE.name).symlink_to(real / boxes.REFERENCE.name)  # NIH's box list
    names = list(rows["Image Index"])
    bounds = np.cumsum([0, *COUNTS])
    built = {name: make_archive(names[a:b], seed=i) for i, (name, a, b) in enumerate(zip(NAMES, bounds, bounds[1:]))}
    write_table(reference / metadata.ARCHIVES_FILE, "http://127.0.0.1:9/unused", built)
    return built


def write_table(path, base_url, archives, **columns):
    """An archive table for `archives`: their URLs under `base_url`, sizes, MD5s, counts; `columns` replace columns."""
    table = pd.DataFrame({"archive": list(archives), "url": [f"{base_url}/{n}" for n in archives],
                          "bytes": [len(b) for b in archives.values()],
                          "md5": [hashlib.md5(b).hexdigest() for b in archives.values()], "images": COUNTS})
    for name, values in columns.items():
        table[name] = values
    table.to_csv(path, sep="\t", index=False)
    return path


def mirror_table(project, server, archives, **columns):
    """The archives served by `server`, and a mirror's table for them."""
    for name, body in archives.items():
        server.files[f"/{name}"] = body
    return write_table(project / "mirror.tsv", server.url, archives, **columns)


def nih_params(project, table, **download_settings):
    return write_params(project, {"data": {"source": "nih", "download": {
        "archives_table": str(table), "archives": "all", "backoff_seconds": 0.01, "timeout_seconds": 10,
        **download_settings}}})


def fetch(server, target, body, md5=None, images=COUNTS[1], **settings):
    """download.fetch of `server`'s /a.tar.gz, with quick test settings."""
    settings = {"retries": 5, "backoff": 0.01, "timeout": 10, **settings}
    return download.fetch(f"{server.url}/a.tar.gz", target, len(body), md5, images, **settings)


ARCHIVES = "data/raw/archives"  # the stage's output: hard links to the archives in STORE
STORE = "data/.download"  # where downloads are fetched, partial and verified, outside every DVC output


# ---------------------------------------------------------------- what already held

def test_downloads_verify_and_index_the_archives(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table, workers=2))
    folder = project / STORE
    assert sorted(p.name for p in folder.glob("*.tar.gz")) == NAMES
    for name, body in archives.items():
        assert (folder / name).read_bytes() == body
    assert not list(folder.glob("*.part"))
    kept = read_csv(project / "data/raw/metadata.csv")
    assert len(kept) == sum(COUNTS)
    assert json.loads((project / "metrics/download.json").read_text())["found"] == sum(COUNTS)


def second_run_fetches_nothing(project, server, table) -> bool:
    download.main(nih_params(project, table))
    server.requests.clear()
    download.main(nih_params(project, table))
    return server.requests == []


def test_a_verified_archive_is_not_fetched_again(project, server, archives):
    assert second_run_fetches_nothing(project, server, mirror_table(project, server, archives))


def test_a_smaller_archive_list_keeps_verified_archives_on_disk(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table))
    download.main(nih_params(project, table, archives=["images_001.tar.gz"]))
    assert (project / ARCHIVES / "images_002.tar.gz").exists()  # 4 GB of real data is not thrown away
    sources = read_csv(project / "data/raw/sources.csv")
    assert [p.rsplit("/", 1)[1] for p in sources["path"]] == ["images_001.tar.gz"]
    counts = json.loads((project / "metrics/download.json").read_text())
    assert (counts["found"], counts["missing"]) == (COUNTS[0], sum(COUNTS) - COUNTS[0])


def test_a_cut_transfer_is_resumed_with_a_range_request(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.cut_first_after = len(body) // 2
    target = project / "a.tar.gz"
    fetch(server, target, body, hashlib.md5(body).hexdigest())
    assert target.read_bytes() == body
    assert server.requests[0] == ("/a.tar.gz", None)
    assert server.requests[1] == ("/a.tar.gz", f"bytes={len(body) // 2}-")


def test_a_part_left_by_an_earlier_run_is_resumed(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    (project / "a.tar.gz.part").write_bytes(body[:1000])
    fetch(server, project / "a.tar.gz", body, hashlib.md5(body).hexdigest())
    assert (project / "a.tar.gz").read_bytes() == body
    assert server.requests == [("/a.tar.gz", "bytes=1000-")]


def test_a_part_that_is_also_a_hard_link_is_copied_before_it_is_appended_to(project, server, archives):
    """A verified archive taken back to .part is also DVC's cache object (a hard link): the cache keeps its bytes."""
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    cache_object = project / "cache-object"
    cache_object.write_bytes(body[:1000])
    os.link(cache_object, project / "a.tar.gz.part")
    fetch(server, project / "a.tar.gz", body)
    assert (project / "a.tar.gz").read_bytes() == body
    assert cache_object.read_bytes() == body[:1000]


def test_md5_mismatch_is_a_clear_error_and_never_complete(project, server, archives):
    table = mirror_table(project, server, archives, md5="0" * 32)
    with pytest.raises(download.DownloadError, match="MD5 .* does not match .*verify_md5: false"):
        download.main(nih_params(project, table))
    folder = project / STORE
    assert not list(folder.glob("images_00?.tar.gz"))
    assert (folder / "images_001.tar.gz.part").exists()
    server.requests.clear()
    download.main(nih_params(project, table, verify_md5=False))  # the user trusts the file: no new transfer
    assert server.requests == []
    assert (folder / "images_001.tar.gz").read_bytes() == archives["images_001.tar.gz"]


def test_404_names_the_url(project, server):
    with pytest.raises(download.DownloadError, match=r"/a.tar.gz: HTTP 404"):
        fetch(server, project / "m.tar.gz", b"0123456789")
    assert not (project / "m.tar.gz").exists()
    assert len(server.requests) == 1  # a 404 is not retried


def test_a_server_that_ignores_range_is_a_clear_error(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.ignore_range = True
    (project / "a.tar.gz.part").write_bytes(body[:1000])
    with pytest.raises(download.DownloadError, match="ignored the Range request"):
        fetch(server, project / "a.tar.gz", body)
    assert not (project / "a.tar.gz").exists()
    assert (project / "a.tar.gz.part").read_bytes() == body[:1000]


def test_ctrl_c_leaves_no_file_taken_as_complete(project, server, archives):
    table = mirror_table(project, server, archives)
    server.delay = 0.5  # a transfer of ~10 s: the signal lands in the middle of it
    params = nih_params(project, table, workers=1, archives=["images_002.tar.gz"])
    # Ctrl-C's handler set in the child: a shell starts background jobs with SIGINT ignored, and CI may be one
    code = f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " \
           f"from stages import download; download.main({params!r})"
    child = subprocess.Popen([sys.executable, "-c", code],
                             cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    part = project / STORE / "images_002.tar.gz.part"
    deadline = time.time() + 60
    while not (part.exists() and part.stat().st_size >= 4096) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert child.poll() is None, f"the download ended before the signal: {child.stderr.read()[-2000:]}"
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) != 0
    final = project / ARCHIVES / "images_002.tar.gz"
    assert not final.exists()
    assert 0 < part.stat().st_size < len(archives["images_002.tar.gz"])
    server.delay = 0
    download.main(params)
    assert final.read_bytes() == archives["images_002.tar.gz"]
    assert not part.exists()


def test_unknown_archive_name_is_refused(project, server, archives):
    table = mirror_table(project, server, archives)
    with pytest.raises(Exception, match="images_013.tar.gz"):
        download.main(nih_params(project, table, archives=["images_013.tar.gz"]))
    assert server.requests == []


# ---------------------------------------------------------------- 1: a corrupt archive is never complete

def test_a_web_page_instead_of_the_archive_names_the_real_cause(project, server, archives):
    table = mirror_table(project, server, archives, md5="")
    page = b"<html><body>Quota exceeded: this file was downloaded too many times today.</body></html>"
    server.pages["/images_002.tar.gz"] = page
    size = len(archives["images_002.tar.gz"])
    with pytest.raises(download.DownloadError,
                       match=f"images_002.tar.gz: the server sent {len(page)} bytes of text/html, expected {size:,} bytes"):
        download.main(nih_params(project, table, verify_md5=False))
    folder = project / STORE
    assert not (folder / "images_002.tar.gz").exists()
    assert not (folder / "images_002.tar.gz.part").exists()  # the page is not taken for a start of the archive
    assert (folder / "images_001.tar.gz").exists()  # the other archives are fine
    assert server.requests.count(("/images_002.tar.gz", None)) == 1  # not retried: it would not help


def test_a_web_page_answering_a_range_request_is_not_blamed_on_the_range(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.pages["/a.tar.gz"] = page = b"<html>quota exceeded</html>"
    (project / "a.tar.gz.part").write_bytes(body[:1000])
    with pytest.raises(download.DownloadError, match=f"sent {len(page)} bytes of text/html") as caught:
        fetch(server, project / "a.tar.gz", body)
    assert "Range" not in str(caught.value)
    assert (project / "a.tar.gz.part").read_bytes() == body[:1000]


def test_a_gzip_cut_short_is_never_complete_even_without_md5(project, server, archives):
    cut = {**archives, "images_002.tar.gz": archives["images_002.tar.gz"][:-300]}  # the mirror's own table agrees
    table = mirror_table(project, server, cut, md5="")
    with pytest.raises(download.DownloadError,
                       match="images_002.tar.gz: not a complete gzip'd tar .*, though it has the table's size"):
        download.main(nih_params(project, table, verify_md5=False))
    folder = project / STORE
    assert not (folder / "images_002.tar.gz").exists()
    assert (folder / "images_002.tar.gz.part").read_bytes() == cut["images_002.tar.gz"]  # kept, never complete
    assert not (project / "data/raw/sources.csv").exists()  # crop never sees it


def test_an_archive_that_cannot_be_read_is_not_called_incomplete(project, server, archives, monkeypatch):
    body = archives["images_002.tar.gz"]
    target = project / "a.tar.gz"
    target.write_bytes(body)  # whole, but not yet checked by this stage (no stamp)

    def denied(path, *args, **kwargs):  # what open() raises for a file without read permission (not as root)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(images.igzip, "open", denied)
    with pytest.raises(download.DownloadError, match=r"a.tar.gz: .*a.tar.gz.part cannot be read \(Permission denied\): "
                                                     r"check its permissions") as caught:
        fetch(server, target, body)
    assert "complete" not in str(caught.value) and "fetch it again" not in str(caught.value)
    assert server.requests == []  # the file was whole: nothing fetched


def test_an_archive_with_fewer_images_than_the_table_is_never_complete(project, server, archives):
    short = {**archives, "images_001.tar.gz": make_archive([f"{i:08d}_000.png" for i in range(19)])}
    table = mirror_table(project, server, short)
    with pytest.raises(download.DownloadError, match="images_001.tar.gz: holds 19 images, the table gives 20"):
        download.main(nih_params(project, table))
    assert not (project / ARCHIVES / "images_001.tar.gz").exists()


# ---------------------------------------------------------------- 2: a complete archive is never deleted

def test_turning_md5_checks_on_hashes_the_archives_and_fetches_nothing(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table, verify_md5=False))
    server.requests.clear()
    download.main(nih_params(project, table, verify_md5=True))
    assert server.requests == []
    for name, body in archives.items():
        assert (project / ARCHIVES / name).read_bytes() == body


def test_an_upper_case_md5_is_the_same_md5(project, server, archives):
    table = mirror_table(project, server, archives,
                         md5=[hashlib.md5(b).hexdigest().upper() for b in archives.values()])
    assert second_run_fetches_nothing(project, server, table)


def test_a_file_larger_than_the_table_is_an_error_that_keeps_it(project, server, archives):
    table = mirror_table(project, server, archives)
    folder = project / STORE
    folder.mkdir(parents=True)
    too_long = archives["images_002.tar.gz"] + b"junk" * 10
    (folder / "images_002.tar.gz.part").write_bytes(too_long)
    for _ in range(2):  # the same error each run: nothing deleted, nothing fetched
        with pytest.raises(download.DownloadError, match="images_002.tar.gz.part holds .* more than the"):
            download.main(nih_params(project, table, archives=["images_002.tar.gz"]))
        assert (folder / "images_002.tar.gz.part").read_bytes() == too_long
    assert server.requests == []


def test_a_file_in_place_of_another_size_is_an_error_that_keeps_it(project, server, archives):
    table = mirror_table(project, server, archives)
    folder = project / STORE
    folder.mkdir(parents=True)
    (folder / "images_001.tar.gz").write_bytes(b"not this one")
    with pytest.raises(download.DownloadError, match="images_001.tar.gz has 12 bytes, the table gives"):
        download.main(nih_params(project, table, archives=["images_001.tar.gz"]))
    assert (folder / "images_001.tar.gz").read_bytes() == b"not this one"


def test_synthetic_archives_never_replace_downloaded_ones(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table))
    with pytest.raises(StageError, match="holds archives this stage did not write"):
        download.main(write_params(project, {"data": {"source": "synthetic"}}))
    for name, body in archives.items():
        assert (project / ARCHIVES / name).read_bytes() == body
        assert (project / STORE / name).read_bytes() == body


def test_downloads_survive_dvc_deleting_the_output_and_are_linked_again_without_a_transfer(project, server, archives):
    """DVC deletes data/raw/archives before it reruns the stage (a changed param): the downloads stay in the store."""
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table))
    shutil.rmtree(project / ARCHIVES)
    server.requests.clear()
    download.main(nih_params(project, table, workers=2))
    assert server.requests == []
    for name, body in archives.items():
        assert (project / ARCHIVES / name).read_bytes() == body
        assert os.path.samefile(project / ARCHIVES / name, project / STORE / name)  # a link, not a copy


@pytest.mark.e2e
def test_after_dvc_repro_each_archive_is_on_disk_once(tmp_path, server):
    """`dvc repro download` of NIH's source: the download in data/.download, the output in data/raw/archives and
    DVC's cache object are one file (hard links: .dvc/config's cache.type puts hardlink first, so DVC links a
    run's output into its cache instead of copying it; 45 GB once, not twice)."""
    clone = working_tree_copy(tmp_path / "clone")
    reference = clone / "data/reference"
    rows = pd.read_csv(reference / metadata.METADATA_FILE).sort_values("Image Index").head(sum(COUNTS))
    rows.to_csv(reference / metadata.METADATA_FILE, index=False)
    bounds, names = np.cumsum([0, *COUNTS]), list(rows["Image Index"])
    built = {name: make_archive(names[a:b], seed=i) for i, (name, a, b) in enumerate(zip(NAMES, bounds, bounds[1:]))}
    table = mirror_table(clone, server, built)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"]["source"], params["model"]["pretrained"] = "nih", "none"  # no weights to reach
    params["data"]["download"].update(archives_table=str(table), archives="all", backoff_seconds=0.01)
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(["dvc", "repro", "download"], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "TORCH_HOME": str(tmp_path / "torch-home")})
    assert done.returncode == 0, done.stdout + done.stderr
    for name, body in built.items():
        md5 = hashlib.md5(body).hexdigest()
        copies = [clone / STORE / name, clone / ARCHIVES / name, clone / ".dvc/cache/files/md5" / md5[:2] / md5[2:]]
        assert copies[1].read_bytes() == body
        assert len({path.stat().st_ino for path in copies}) == 1, name

# ---------------------------------------------------------------- 3: retries and Ctrl-C

def test_tries_that_bring_bytes_do_not_use_up_the_retries(project, server, archives):
    body = archives["images_003.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.cut_every_after = 8192
    fetch(server, project / "a.tar.gz", body, images=COUNTS[2], retries=1)
    assert (project / "a.tar.gz").read_bytes() == body
    assert len(server.requests) > 4  # each cut, each resumed


def test_tries_without_progress_give_up_after_the_retries(project, server, archives):
    server.status = 503
    with pytest.raises(download.DownloadError, match="gave up after 3 tries in a row without progress"):
        fetch(server, project / "a.tar.gz", archives["images_002.tar.gz"], retries=2)
    assert len(server.requests) == 3


def test_a_mirror_that_stalls_early_in_every_response_is_given_up_after_the_retries(project, server, archives):
    """Each try brings 8 KiB, then nothing for timeout_seconds: more waiting than transferring counts as no progress."""
    body = archives["images_003.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.stall_every_after = 8192
    with pytest.raises(download.DownloadError, match=r"gave up after 3 tries in a row without progress \(no data for 0.5 s "
                                                     r".*\); 3 of them went silent for 0.5 s after less than 0.5 s of data"):
        fetch(server, project / "a.tar.gz", body, images=COUNTS[2], retries=2, timeout=0.5)
    assert len(server.requests) == 3  # not the dozen it takes to bring the file 8 KiB at a time
    assert (project / "a.tar.gz.part").read_bytes() == body[:3 * 8192]  # kept for resuming


def test_a_stall_after_data_flowed_longer_than_the_timeout_is_progress(project, server, archives):
    """A long transfer that stalls once in a while (each try brings as much as it waits for) is never given up."""
    body = archives["images_003.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.stall_every_after, server.delay = 16 * 4096, 0.05  # 0.8 s of data, then silence
    fetch(server, project / "a.tar.gz", body, images=COUNTS[2], retries=0, timeout=0.5)
    assert (project / "a.tar.gz").read_bytes() == body
    assert len(server.requests) == 2


def test_ctrl_c_acts_within_a_second_on_a_stalled_socket(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.stall_after = 4096
    stop, outcome = threading.Event(), {}
    part = project / "a.tar.gz.part"

    def run():
        try:
            fetch(server, project / "a.tar.gz", body, timeout=60, stop=stop)
        except BaseException as error:  # noqa: BLE001 - the test looks at what it was
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 10
    while _size(part) < 4096 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # stalled now
    stop.set()
    asked = time.monotonic()
    worker.join(timeout=5)
    assert time.monotonic() - asked < 1.0 and not worker.is_alive()
    assert isinstance(outcome["error"], KeyboardInterrupt)
    assert part.read_bytes() == body[:4096]  # kept for resuming


def test_a_stalled_socket_still_ends_after_timeout_seconds(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.stall_after = 4096
    started = time.monotonic()
    with pytest.raises(download.DownloadError, match=r"no data for 0.5 s .*\.part \(4,096 bytes\) is kept"):
        fetch(server, project / "a.tar.gz", body, timeout=0.5, retries=0)
    assert time.monotonic() - started < 5


def _size(path):
    return path.stat().st_size if path.exists() else 0


# ---------------------------------------------------------------- 6: the table is checked before any transfer

def _comma_separated(path, server, archives):
    write_table(path, server.url, archives)
    path.write_text(path.read_text().replace("\t", ","))


@pytest.mark.parametrize("fault, message", [
    (_comma_separated, r"mirror.tsv: the columns are separated by commas"),
    (lambda path, server, archives: write_table(path, server.url, archives).write_text(
        "\n".join(line.rsplit("\t", 1)[0] for line in path.read_text().splitlines())),
     r"mirror.tsv: no column images"),
    (lambda path, server, archives: write_table(path, server.url, archives, bytes=["3.5MB", "1", "2"]),
     r"mirror.tsv, line 2 \(images_001.tar.gz\), column bytes: '3.5MB' is not a whole number of bytes"),
    (lambda path, server, archives: write_table(path, server.url, archives, md5=["abc", "", ""]),
     r"mirror.tsv, line 2 \(images_001.tar.gz\), column md5: 'abc' is not 32 hex digits"),
    (lambda path, server, archives: write_table(path, server.url, archives, images=[20, 30, 41]),
     r"mirror.tsv, column images: adds up to 91 images, the metadata lists 90"),
])
def test_a_bad_archive_table_is_a_one_line_error_before_any_transfer(project, server, archives, fault, message):
    mirror_table(project, server, archives)
    table = project / "mirror.tsv"
    fault(table, server, archives)
    with pytest.raises(StageError, match=message) as caught:
        download.main(nih_params(project, table))
    assert "\n" not in str(caught.value)
    assert server.requests == []


def test_a_bad_table_through_the_command_line_is_one_line_and_no_traceback(project, server, archives):
    table = mirror_table(project, server, archives, bytes=["3.5MB", "1", "2"])
    params = nih_params(project, table)
    done = subprocess.run([sys.executable, "-m", "stages.download", "--params", params], cwd=project,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "3.5MB" in done.stderr


def test_an_empty_md5_column_means_no_md5_with_a_warning(project, server, archives, capsys):
    table = mirror_table(project, server, archives, md5="")
    download.main(nih_params(project, table))
    assert "warning:" in capsys.readouterr().err
    for name, body in archives.items():
        assert (project / ARCHIVES / name).read_bytes() == body


# ---------------------------------------------------------------- 6: a full or read-only disk

def test_too_little_free_space_is_an_error_before_any_transfer(project, server, archives, monkeypatch):
    table = mirror_table(project, server, archives)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    needed = sum(map(len, archives.values()))
    with pytest.raises(download.DownloadError, match=f"data/.download: the archives need {needed:,} more bytes, "
                                                     "1,000 are free there"):
        download.main(nih_params(project, table))
    assert server.requests == []


class FullDisk:
    """A file whose writes fail once `room` bytes are written (or at once): what open() gives on a full disk."""

    def __init__(self, path, mode, room):
        self.handle, self.room = open(path, mode), room

    def write(self, data):
        fits = data[:self.room]
        self.handle.write(fits)
        self.handle.flush()
        self.room -= len(fits)
        if len(fits) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_during_download_names_the_file_and_the_space_needed(project, server, archives, monkeypatch):
    table = mirror_table(project, server, archives)
    monkeypatch.setattr(fetch_module, "open", lambda path, mode="r": FullDisk(path, mode, 16384), raising=False)
    size = len(archives["images_003.tar.gz"])
    part = project / STORE / "images_003.tar.gz.part"
    with pytest.raises(download.DownloadError, match=f"cannot write {STORE}/images_003.tar.gz.part: "
                                                     f"No space left on device; it needs {size - 16384:,} more bytes"):
        download.main(nih_params(project, table, archives=["images_003.tar.gz"]))
    assert part.read_bytes() == archives["images_003.tar.gz"][:16384]  # kept for resuming
    assert len(server.requests) == 1  # not retried: another try would fail the same way
    monkeypatch.delattr(fetch_module, "open")
    download.main(nih_params(project, table, archives=["images_003.tar.gz"]))  # space freed: it resumes
    assert server.requests[-1] == ("/images_003.tar.gz", "bytes=16384-")


def test_a_read_only_folder_is_named(project, server, archives, monkeypatch):
    table = mirror_table(project, server, archives)

    def read_only(path, mode="r"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(fetch_module, "open", read_only, raising=False)
    with pytest.raises(download.DownloadError, match="cannot write .*images_001.tar.gz.part: Read-only file system"):
        download.main(nih_params(project, table, archives=["images_001.tar.gz"]))
