"""The weights stage: torchvision's ImageNet weights fetched once, checked against the SHA-256 prefix in
their name, resumable, atomic; against a local HTTP server serving a small stand-in file."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from cxr14 import models
from cxr14.fetch import DownloadError
from cxr14.params import ParamError, load
from stages import weights

from .conftest import params_with, working_tree_copy, write_params

STAND_IN = bytes(range(256)) * 600  # 150 KiB: many blocks, so a transfer can be cut in the middle
PREFIX = hashlib.sha256(STAND_IN).hexdigest()[:8]
NAME = f"standin-{PREFIX}.pth"


@pytest.fixture
def stand_in(monkeypatch, tmp_path, server):
    """torchvision's weights of every backbone named NAME (its URL on download.pytorch.org), the server
    serving STAND_IN under that name, and torch's own cache an empty folder."""
    official = SimpleNamespace(DEFAULT=SimpleNamespace(url=f"https://download.pytorch.org/models/{NAME}"))
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda backbone: official)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    server.files[f"/{NAME}"] = STAND_IN
    return server


def imagenet_params(project, server, **download):
    settings = {"retries": 2, "backoff_seconds": 0.01, "timeout_seconds": 5, **download}
    return write_params(project, {"model": {"pretrained": "imagenet"}, "weights": {"mirror": f"{server.url}/"},
                                  "data": {"download": settings}})


FETCHED = "data/weights/checkpoints/" + NAME


def test_the_weights_are_fetched_checked_and_described(project, stand_in):
    weights.main(imagenet_params(project, stand_in))
    assert (project / FETCHED).read_bytes() == STAND_IN
    described = json.loads((project / "data/weights/weights.json").read_text())
    assert described["sha256"] == hashlib.sha256(STAND_IN).hexdigest() and described["file"] == NAME
    assert described["url"] == f"{stand_in.url}/{NAME}"
    assert not list((project / "data/.weights-download").iterdir())  # nothing half-written left behind


def test_weights_in_place_are_not_fetched_again(project, stand_in):
    params = imagenet_params(project, stand_in)
    weights.main(params)
    stand_in.requests.clear()
    weights.main(params)
    assert stand_in.requests == []


def test_a_file_whose_hash_does_not_match_its_name_is_refused_and_deleted(project, stand_in):
    stand_in.files[f"/{NAME}"] = STAND_IN[:-1] + b"x"
    with pytest.raises(DownloadError, match=f"SHA-256 [0-9a-f]{{64}} does not start with {PREFIX}.*never used"):
        weights.main(imagenet_params(project, stand_in))
    assert not (project / FETCHED).exists()
    assert not (project / "data/.weights-download" / f"{NAME}.part").exists()


def test_a_cut_transfer_is_resumed_with_a_range_request(project, stand_in):
    stand_in.cut_first_after = 40_000
    weights.main(imagenet_params(project, stand_in))
    assert (project / FETCHED).read_bytes() == STAND_IN
    assert stand_in.requests == [(f"/{NAME}", None), (f"/{NAME}", "bytes=40000-")]


def test_a_server_that_keeps_cutting_off_leaves_the_part_for_the_next_run(project, stand_in):
    stand_in.cut_every_after = 0  # headers, then nothing: no try brings a byte
    with pytest.raises(DownloadError, match="gave up after 3 tries .* is kept for resuming.*torch-hub/checkpoints"):
        weights.main(imagenet_params(project, stand_in))
    assert not (project / FETCHED).exists()
    stand_in.cut_every_after = None
    stand_in.cut_first_after = 1000
    weights.main(imagenet_params(project, stand_in))
    assert (project / FETCHED).read_bytes() == STAND_IN


def test_a_part_that_is_already_whole_is_taken_once_checked(project, stand_in):
    part = project / "data/.weights-download" / f"{NAME}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(STAND_IN)  # the run died between the last byte and the rename
    weights.main(imagenet_params(project, stand_in))
    assert (project / FETCHED).read_bytes() == STAND_IN
    assert stand_in.requests == [(f"/{NAME}", f"bytes={len(STAND_IN)}-")]  # answered 416: nothing more to send


def test_a_copy_in_torchs_own_cache_is_used_instead_of_a_download(project, stand_in, tmp_path):
    cached = tmp_path / "torch-hub" / "checkpoints" / NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(STAND_IN)
    weights.main(imagenet_params(project, stand_in))
    assert (project / FETCHED).read_bytes() == STAND_IN and stand_in.requests == []


def test_pretrained_none_fetches_nothing_and_says_so(project, stand_in):
    weights.main(write_params(project, {"model": {"pretrained": "none"}, "weights": {"mirror": stand_in.url}}))
    assert json.loads((project / "data/weights/weights.json").read_text())["pretrained"] == "none"
    assert stand_in.requests == []


def test_a_mirror_that_is_not_a_url_is_refused():
    with pytest.raises(ParamError) as caught:
        weights.check(params_with({"weights": {"mirror": "ftp://example.org/models"}}))
    assert caught.value.key == "weights.mirror" and "http(s)://" in caught.value.valid


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_check_says_where_to_put_weights_it_cannot_reach(stand_in):
    config = weights.check(params_with({"model": {"pretrained": "imagenet"},
                                        "weights": {"mirror": f"http://127.0.0.1:{closed_port()}"}}))
    with pytest.raises(ParamError) as caught:
        weights.reachable(config)
    assert caught.value.key == "model.pretrained"
    assert "cannot be reached" in caught.value.valid and f"torch-hub/checkpoints/{NAME}" in caught.value.valid


def test_the_check_passes_when_the_server_has_them(project, stand_in):
    weights.reachable(weights.check(load(imagenet_params(project, stand_in))))
    assert stand_in.requests == [(f"/{NAME}", "bytes=0-0")]


def test_training_loads_the_fetched_file_not_torchs_cache(tmp_path):
    """A file at data/weights/checkpoints/<torchvision's name> is what create_model loads."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))  # empty: torchvision would download into it
    try:
        imagenet = torchvision.models.mobilenet_v3_small(num_classes=1000)
        path = models.weights_file("mobilenet_v3_small", tmp_path / "weights")
        path.parent.mkdir(parents=True)
        torch.save(imagenet.state_dict(), path)
        config = models.ModelConfig("mobilenet_v3_small", "imagenet", "replace_last", [], 0.0, None)
        net = models.create_model(config, 14, 64, weights_dir=tmp_path / "weights")
        assert torch.equal(net.features[0][0].weight, imagenet.features[0][0].weight)
        assert torch.hub.get_dir() == str(tmp_path / "torch-hub")  # torch's own setting is left as it was
    finally:
        torch.hub.set_dir(before)


def test_training_without_the_weights_stage_says_to_run_it(tmp_path):
    config = models.ModelConfig("densenet121", "imagenet", "replace_last", [], 0.0, None)
    with pytest.raises(ParamError) as caught:
        models.create_model(config, 14, 64, weights_dir=tmp_path)
    assert "densenet121-a639ec97.pth" in caught.value.valid and "dvc repro weights" in caught.value.valid


@pytest.mark.e2e
def test_dvc_repro_without_network_stops_at_the_check_in_seconds_before_any_download(tmp_path):
    clone = working_tree_copy(tmp_path / "clone")
    text = (clone / "params.yaml").read_text()
    (clone / "params.yaml").write_text(text.replace("  mirror: null", f"  mirror: http://127.0.0.1:{closed_port()}"))
    started = time.monotonic()
    done = subprocess.run(["dvc", "repro"], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "TORCH_HOME": str(tmp_path / "no-torch-home")})
    assert done.returncode != 0 and time.monotonic() - started < 60
    assert "model.pretrained" in done.stderr and "cannot be reached" in done.stderr
    assert not (clone / "data/raw").exists()  # the 45 GB download never started


@pytest.mark.e2e
def test_dvc_repro_fetches_the_weights_from_a_stand_in_host_once_and_caches_them(tmp_path, server):
    """`dvc repro weights` of a fresh copy with the committed params (ImageNet weights) against a local server
    standing in for torchvision's host: fetched and checked; not fetched again by a second `dvc repro`, nor
    when the output is deleted (DVC restores it from its cache)."""
    clone = working_tree_copy(tmp_path / "clone")
    text = (clone / "params.yaml").read_text()
    assert "pretrained: imagenet" in text
    (clone / "params.yaml").write_text(text.replace("  mirror: null", f"  mirror: {server.url}"))
    server.files[f"/{NAME}"] = STAND_IN
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch-home"), "CXR14_STAND_IN_WEIGHTS": NAME,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "standin_site"),
                                                       os.environ.get("PYTHONPATH")]))}

    def repro(*args):
        done = subprocess.run(["dvc", "repro", *args], cwd=clone, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    repro("weights")
    assert (clone / FETCHED).read_bytes() == STAND_IN
    assert [path for path, _ in server.requests if path == f"/{NAME}"]  # the check's probe and the download
    assert not (clone / "data/raw").exists()  # weights need no download
    server.requests.clear()
    assert "didn't change" in repro("weights") and server.requests == []
    shutil.rmtree(clone / "data/weights")
    repro("weights")
    assert (clone / FETCHED).read_bytes() == STAND_IN and server.requests == []
