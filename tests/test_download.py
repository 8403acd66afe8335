"""The NIH download path, against a local HTTP server serving synthetic archives."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from cxr14 import metadata
from cxr14.atomic import read_csv
from stages import download

from .conftest import REPO, write_params


class Server:
    """Serves `files` over HTTP with Range support, and misbehaves on request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_first_after: int | None = None  # close the first transfer after this many bytes
        self.ignore_range = False
        self.delay = 0.0  # seconds per 4 KiB block
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                wanted = self.headers.get("Range")
                server.requests.append((self.path, wanted))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_first_after is not None:
                    payload, server.cut_first_after = payload[:server.cut_first_after], None
                for i in range(0, len(payload), 4096):
                    if server.delay:
                        time.sleep(server.delay)
                    try:
                        self.wfile.write(payload[i:i + 4096])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def archives(project):
    """Two small synthetic archives, named and numbered as NIH's first two."""
    download.main(write_params(project, {"data": {"synthetic": {"images": 150}}}))
    folder = project / "data/raw/archives"
    return {name: (folder / name).read_bytes() for name in ("images_001.tar.gz", "images_002.tar.gz")}


def mirror_table(project, server, archives, md5=None):
    """The real archive table with a mirror's URLs, sizes and MD5s for the archives served."""
    table = metadata.read_archive_table()
    for name, body in archives.items():
        server.files[f"/{name}"] = body
        row = table["archive"] == name
        table.loc[row, "url"] = f"{server.url}/{name}"
        table.loc[row, "bytes"] = len(body)
        table.loc[row, "md5"] = md5 or hashlib.md5(body).hexdigest()
    path = project / "mirror.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


def nih_params(project, table, **download_settings):
    return write_params(project, {"data": {"source": "nih", "download": {
        "archives_table": str(table), "archives": ["images_001.tar.gz", "images_002.tar.gz"],
        "backoff_seconds": 0.01, **download_settings}}})


def test_downloads_verify_and_index_the_archives(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table, workers=2))
    folder = project / "data/raw/archives"
    assert sorted(p.name for p in folder.glob("*.tar.gz")) == sorted(archives)
    for name, body in archives.items():
        assert (folder / name).read_bytes() == body
    assert not list(folder.glob("*.part"))
    kept = read_csv(project / "data/raw/metadata.csv")
    where = metadata.archive_of_each_image(metadata.read_metadata(), metadata.read_archive_table())
    assert set(where.loc[kept["image"]]) == set(archives)
    assert len(kept) == 4999 + 10000  # what the two real archives hold


def test_a_verified_archive_is_not_fetched_again(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table))
    server.requests.clear()
    download.main(nih_params(project, table))
    assert server.requests == []


def test_a_smaller_archive_list_keeps_verified_archives_on_disk(project, server, archives):
    table = mirror_table(project, server, archives)
    download.main(nih_params(project, table))
    download.main(nih_params(project, table, archives=["images_001.tar.gz"]))
    assert (project / "data/raw/archives/images_002.tar.gz").exists()  # 4 GB of real data is not thrown away
    sources = read_csv(project / "data/raw/sources.csv")
    assert [p.rsplit("/", 1)[1] for p in sources["path"]] == ["images_001.tar.gz"]


def test_a_cut_transfer_is_resumed_with_a_range_request(project, server, archives):
    body = archives["images_002.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.cut_first_after = len(body) // 2
    target = project / "a.tar.gz"
    download.fetch(f"{server.url}/a.tar.gz", target, len(body), hashlib.md5(body).hexdigest(), backoff=0.01)
    assert target.read_bytes() == body
    assert server.requests[0] == ("/a.tar.gz", None)
    assert server.requests[1] == ("/a.tar.gz", f"bytes={len(body) // 2}-")


def test_a_part_left_by_an_earlier_run_is_resumed(project, server, archives):
    body = archives["images_001.tar.gz"]
    server.files["/a.tar.gz"] = body
    (project / "a.tar.gz.part").write_bytes(body[:1000])
    download.fetch(f"{server.url}/a.tar.gz", project / "a.tar.gz", len(body), hashlib.md5(body).hexdigest())
    assert (project / "a.tar.gz").read_bytes() == body
    assert server.requests == [("/a.tar.gz", "bytes=1000-")]


def test_md5_mismatch_is_a_clear_error_and_never_complete(project, server, archives):
    table = mirror_table(project, server, archives, md5="0" * 32)
    with pytest.raises(download.DownloadError, match="MD5 .* does not match .*verify_md5: false"):
        download.main(nih_params(project, table))
    folder = project / "data/raw/archives"
    assert not list(folder.glob("images_00?.tar.gz"))
    assert (folder / "images_001.tar.gz.part").exists()
    download.main(nih_params(project, table, verify_md5=False))  # the user trusts the file: no new transfer
    assert (folder / "images_001.tar.gz").read_bytes() == archives["images_001.tar.gz"]


def test_404_names_the_url(project, server):
    with pytest.raises(download.DownloadError, match=r"/missing.tar.gz: HTTP 404"):
        download.fetch(f"{server.url}/missing.tar.gz", project / "m.tar.gz", 10, None, backoff=0.01)
    assert not (project / "m.tar.gz").exists()
    assert len(server.requests) == 1  # a 404 is not retried


def test_a_server_that_ignores_range_is_a_clear_error(project, server, archives):
    body = archives["images_001.tar.gz"]
    server.files["/a.tar.gz"] = body
    server.ignore_range = True
    (project / "a.tar.gz.part").write_bytes(body[:1000])
    with pytest.raises(download.DownloadError, match="ignored the Range request"):
        download.fetch(f"{server.url}/a.tar.gz", project / "a.tar.gz", len(body), None)
    assert not (project / "a.tar.gz").exists()
    assert (project / "a.tar.gz.part").read_bytes() == body[:1000]


def test_ctrl_c_leaves_no_file_taken_as_complete(project, server, archives):
    table = mirror_table(project, server, archives)
    server.delay = 0.2
    params = nih_params(project, table, workers=1, archives=["images_002.tar.gz"])
    child = subprocess.Popen([sys.executable, "-c", f"from stages import download; download.main({params!r})"],
                             cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    part = project / "data/raw/archives/images_002.tar.gz.part"
    deadline = time.time() + 60
    while not (part.exists() and part.stat().st_size >= 4096) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) != 0
    final = project / "data/raw/archives/images_002.tar.gz"
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
    assert isinstance(pd.read_csv(table, sep="\t"), pd.DataFrame)
