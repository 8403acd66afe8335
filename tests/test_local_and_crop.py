"""`local` sources read in place (archives or a Kaggle-style PNG folder), and the crop stage."""

import errno
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cxr14 import images, metadata, packed_images, parallel_crop
from cxr14.atomic import read_csv
from cxr14.images import ArchiveError, crop_resize, iter_archive, list_archive, scan_local, to_gray
from cxr14.params import StageError
from stages import crop, download, filter

from .conftest import write_params


@pytest.fixture
def nih_copy(project, tmp_path_factory):
    """A user's local copy: synthetic NIH archives in a folder outside the project."""
    download.main(write_params(project, {"data": {"synthetic": {"images": 120}}}))
    folder = tmp_path_factory.mktemp("nih_copy")
    for archive in sorted((project / "data/raw/archives").glob("*.tar.gz"))[:3]:
        shutil.copy(archive, folder / archive.name)
    return folder


def kaggle_layout(archives_folder, target):
    """Kaggle's layout: images_001/images/*.png ... beside the CSV."""
    for archive in sorted(archives_folder.glob("*.tar.gz")):
        folder = target / archive.name.removesuffix(".tar.gz") / "images"
        folder.mkdir(parents=True)
        for name, data in iter_archive(archive):
            (folder / name).write_bytes(data)
    (target / "Data_Entry_2017.csv").write_text("ignored\n")
    return target


def run_to_crop(project, changes):
    params = write_params(project, changes)
    for stage in (download, filter, crop):
        stage.main(params)
    return read_csv(project / "data/crop/index.csv"), packed_images.load(project / "data/crop/images.npy")


def test_local_archives_are_read_in_place(project, nih_copy):
    index, images = run_to_crop(project, {"data": {"source": "local", "local_dir": str(nih_copy)}})
    sources = read_csv(project / "data/raw/sources.csv")
    assert set(sources["path"]) == {str(p) for p in nih_copy.glob("*.tar.gz")}
    assert [p.name for p in (project / "data/raw/archives").iterdir()] == [download.LOCAL_NOTE]  # nothing copied
    expected = set()
    for archive in nih_copy.glob("*.tar.gz"):
        expected |= {name for name, _ in iter_archive(archive)}
    assert set(read_csv(project / "data/raw/metadata.csv")["image"]) == expected
    assert len(index) == len(images) and images.shape[1:] == (32, 32)


def test_kaggle_folder_gives_the_same_array_as_the_archives(project, nih_copy, tmp_path_factory):
    index_a, images_a = run_to_crop(project, {"data": {"source": "local", "local_dir": str(nih_copy)}})
    images_a = np.array(images_a)
    kaggle = kaggle_layout(nih_copy, tmp_path_factory.mktemp("kaggle"))
    index_b, images_b = run_to_crop(project, {"data": {"source": "local", "local_dir": str(kaggle)}})
    assert list(index_a["image"]) == list(index_b["image"])
    assert np.array_equal(images_a, np.array(images_b))


def test_an_empty_local_folder_is_a_clear_error(project, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="no \\*.png files and no images_\\*.tar.gz"):
        download.main(write_params(project, {"data": {"source": "local", "local_dir": str(empty)}}))


def test_unreadable_folders_in_a_local_folder_stop_the_scan_naming_them(tmp_path, monkeypatch):
    """Tests run as root, whom chmod 000 does not stop: listing these folders fails here as it would for a user."""
    locked = [tmp_path / "b" / f"locked_{i}" for i in range(1, 5)]
    for folder in [tmp_path / "a", *locked]:
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{folder.name}.png")
    listing = os.scandir

    def scandir(path="."):
        if Path(path) in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StageError, match=r"4 folders in it cannot be read \(Permission denied\): b/locked_1, b/locked_2, "
                                         r"b/locked_3 and 1 more; the images there would be left out\. Make them readable"
                       ) as caught:
        scan_local(tmp_path)
    assert "\n" not in str(caught.value)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16"])
def test_any_png_mode_becomes_one_channel(mode):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        image = Image.fromarray(gray).convert(mode)
    decoded = Image.open(io.BytesIO(png_bytes(image)))
    out = crop_resize(decoded, 1.0, 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert np.abs(out.astype(int) - gray).max() <= 1


def png16(pixels: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit gray PNG of `pixels`, with an sBIT chunk of `sbit` significant bits when given."""
    info = PngImagePlugin.PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.mark.parametrize("stored, sbit, expected", [
    ([0, 2048, 4095], None, [0, 128, 255]),  # a hospital's 12-bit values, no sBIT: the data's own depth
    ([0, 512, 1023], 12, [0, 32, 64]),  # sBIT 12: 12-bit values, though this image reaches only 1023
    ([0, 32800, 65535], 12, [0, 128, 255]),  # sBIT 12, values scaled to 16 bits as the PNG specification has it
    ([0, 32768, 65535], None, [0, 128, 255]),  # a full-range 16-bit image: as before
], ids=["12-bit", "12-bit-sbit", "scaled-sbit", "16-bit"])
def test_a_16_bit_png_is_scaled_from_its_real_depth_in_crop(stored, sbit, expected):
    pixels = np.tile(np.repeat(np.array(stored), 16), (48, 1))  # three bands, 16 pixels wide
    out = parallel_crop.crop_png(png16(pixels, sbit), 1.0, 48)  # what the stage's decoders run on each PNG
    assert list(out[24, [8, 24, 40]]) == expected


def test_center_crop_keeps_the_middle():
    pixels = np.zeros((100, 100), dtype=np.uint8)
    pixels[25:75, 25:75] = 200  # the center half is bright, the border dark
    out = crop_resize(Image.fromarray(pixels), 0.5, 10)
    assert out[1:-1, 1:-1].min() == 200 and out.mean() > 180  # the filter's edge reaches just past the box
    assert crop_resize(Image.fromarray(pixels), 1.0, 10).min() == 0


def replace_member(archive, name, data):
    members = [(m, b) for m, b in iter_archive(archive)]
    with tarfile.open(archive, "w:gz") as tar:
        for member, body in members:
            body = data if member == name else body
            info = tarfile.TarInfo(f"images/{member}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def test_a_corrupt_png_is_an_error_naming_the_file(project, nih_copy):
    archive = sorted(nih_copy.glob("*.tar.gz"))[0]
    victim = next(iter_archive(archive))[0]
    replace_member(archive, victim, b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(StageError, match=f"1 unreadable images, e.g. {victim}.*crop.skip_unreadable"):
        run_to_crop(project, {"data": {"source": "local", "local_dir": str(nih_copy)}})
    assert not (project / "data/crop/images.npy").exists()  # nothing half-written left behind


def test_skip_unreadable_skips_and_counts(project, nih_copy):
    archive = sorted(nih_copy.glob("*.tar.gz"))[0]
    victim = next(iter_archive(archive))[0]
    replace_member(archive, victim, b"garbage")
    index, images = run_to_crop(project, {"data": {"source": "local", "local_dir": str(nih_copy)},
                                          "crop": {"skip_unreadable": True}})
    assert victim not in set(index["image"])
    assert json.loads((project / "metrics/crop.json").read_text())["skipped_unreadable"] == 1
    for row in index.itertuples():  # every indexed row holds its image
        assert images[row.row].any()


def test_crop_rows_hold_the_images_of_the_index(project, nih_copy):
    index, images = run_to_crop(project, {"data": {"source": "local", "local_dir": str(nih_copy)},
                                          "crop": {"fraction": 1.0, "pixels": 64}})
    originals = {}
    for archive in nih_copy.glob("*.tar.gz"):
        originals.update({name: to_gray(Image.open(io.BytesIO(data))) for name, data in iter_archive(archive)})
    for row in index.sample(5, random_state=0).itertuples():
        assert np.array_equal(images[row.row], originals[row.image])  # 64 px in, 64 px out, no crop


# ---------------------------------------------------------------- what a local folder holds, counted; duplicates stop

def download_local(project, folder):
    download.main(write_params(project, {"data": {"source": "local", "local_dir": str(folder)}}))
    return read_csv(project / "data/raw/metadata.csv"), json.loads((project / "metrics/download.json").read_text())


def test_loose_pngs_beside_archives_are_both_read_and_counted(project, nih_copy):
    archives = sorted(nih_copy.glob("*.tar.gz"))
    loose = dict(iter_archive(archives[0]))
    archives[0].unlink()  # its images now lie loose beside the other archives
    for name, data in loose.items():
        (nih_copy / name).write_bytes(data)
    in_archives = {name for archive in archives[1:] for name, _ in iter_archive(archive)}
    kept, counts = download_local(project, nih_copy)
    assert set(kept["image"]) == set(loose) | in_archives
    total = len(metadata.read_metadata())
    assert counts["found"] == len(kept) and counts["missing"] == total - len(kept)
    assert (counts["archives"], counts["png_files"]) == (len(archives) - 1, len(loose))


def duplicate_cases():
    def two_archives(folder):
        (folder / "again").mkdir()
        shutil.copy(sorted(folder.glob("*.tar.gz"))[0], folder / "again")
        return "again/images_00"

    def archive_and_png(folder):
        name, data = next(iter_archive(sorted(folder.glob("*.tar.gz"))[0]))
        (folder / name).write_bytes(data)
        return name

    def two_folders(folder):
        archive = sorted(folder.glob("*.tar.gz"))[0]
        name, data = next(iter_archive(archive))
        archive.unlink()
        for sub in ("a", "b"):
            (folder / sub).mkdir()
            (folder / sub / name).write_bytes(data)
        return f"{name} in a/{name} and b/{name}"

    return [two_archives, archive_and_png, two_folders]


@pytest.mark.parametrize("make_duplicate", duplicate_cases(), ids=lambda f: f.__name__)
def test_an_image_found_twice_is_an_error_listing_it(project, nih_copy, make_duplicate):
    shown = make_duplicate(nih_copy)
    before = (project / "data/raw/sources.csv").read_text()  # the synthetic run's, that made the copy
    with pytest.raises(StageError, match=r"images are there more than once, so which copy is read would depend on "
                                         r"timing: .*" + re.escape(shown)) as caught:
        download_local(project, nih_copy)
    assert "\n" not in str(caught.value)
    assert (project / "data/raw/sources.csv").read_text() == before  # stopped before crop could race


def test_a_truncated_local_archive_is_named(project, nih_copy):
    archive = sorted(nih_copy.glob("*.tar.gz"))[1]
    archive.write_bytes(archive.read_bytes()[:-500])
    with pytest.raises(StageError, match=f"{re.escape(str(archive))} is not a complete gzip'd tar"):
        download_local(project, nih_copy)


@pytest.mark.parametrize("read", [list_archive, lambda path: list(iter_archive(path))], ids=["list", "iterate"])
def test_an_archive_that_cannot_be_opened_is_not_called_incomplete(tmp_path, monkeypatch, read):
    archive = tmp_path / "images_001.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("images/00000001_000.png")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x89PNG"))

    def denied(path, *args, **kwargs):  # what open() raises for a file without read permission (not as root)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(images.igzip, "open", denied)
    with pytest.raises(ArchiveError, match=f"{re.escape(str(archive))} cannot be read \\(Permission denied\\): check its "
                                           "permissions") as caught:
        read(archive)
    assert "complete" not in str(caught.value) and "Fetch" not in str(caught.value)


def test_local_keeps_downloaded_archives_of_the_workspace(project, nih_copy):
    folder = project / "data/raw/archives"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "images_001.tar.gz").write_bytes(b"hours of download")
    (folder / ".images_001.tar.gz.verified").write_text("17 - 4999")
    download_local(project, nih_copy)
    assert (folder / "images_001.tar.gz").read_bytes() == b"hours of download"
