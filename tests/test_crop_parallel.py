"""The crop stage on every core: readers per archive, a pool of decoders, the same pixels as one image at a time."""

import io
import multiprocessing
import os
import re
import struct
import tarfile
import threading
import time
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr14 import packed_images, parallel_crop
from cxr14.atomic import read_csv, write_csv
from cxr14.images import crop_resize, open_image
from cxr14.params import StageError
from stages import crop

from .conftest import write_params


def gray(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth shapes plus noise: every row differs, so a misplaced row shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = 128 + 60 * np.sin(x / (5 + seed % 7)) * np.cos(y / 9) + rng.normal(0, 12, (height, width))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def rechunk(data: bytes, chunk: int) -> bytes:
    """The same PNG with its image data split into IDAT chunks of `chunk` bytes (libpng writes 8 KiB ones)."""
    position, head, stream, tail = 8, [], b"", []
    while position < len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = data[position:position + 12 + length]
        if kind == b"IDAT":
            stream += body[8:-4]
        else:
            (tail if stream else head).append(body)
        position += 12 + length
    idats = [struct.pack(">I", len(part)) + b"IDAT" + part + struct.pack(">I", zlib.crc32(b"IDAT" + part))
             for part in (stream[i:i + chunk] for i in range(0, len(stream), chunk))]
    return data[:8] + b"".join(head + idats + tail)


def varied_pngs(count: int, seed: int = 0) -> dict[str, bytes]:
    """NIH-like 8-bit gray PNGs of several shapes, a few in other modes, some with many small IDAT chunks."""
    shapes = [(160, 160), (200, 150), (150, 200), (97, 131)]
    pngs = {}
    for i in range(count):
        width, height = shapes[i % len(shapes)]
        image = Image.fromarray(gray(width, height, seed + i))
        if i % 9 == 4:
            image = image.convert("RGB")
        elif i % 9 == 7:
            image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)  # 16-bit
        data = png(image, optimize=i % 2 == 0)
        pngs[f"{seed + i:08d}_000.png"] = rechunk(data, 200) if i % 3 == 0 else data
    return pngs


def write_archive(path, pngs: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in pngs.items():
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def crop_folder(folder, archives: list[dict[str, bytes]], loose: dict[str, bytes] | None = None, **crop_params):
    """Run the crop stage on archives and loose files made here; return the index and the packed array."""
    sources, names = [], []
    for i, pngs in enumerate(archives, start=1):
        write_archive(folder / f"images_{i:03d}.tar.gz", pngs)
        sources.append(("tar", str(folder / f"images_{i:03d}.tar.gz"), ""))
        names += list(pngs)
    for name, data in (loose or {}).items():
        (folder / name).write_bytes(data)
        sources.append(("png", str(folder / name), name))
        names.append(name)
    (folder / "raw").mkdir()
    write_csv(folder / "raw/sources.csv", pd.DataFrame(sources, columns=["kind", "path", "image"]))
    (folder / "filter").mkdir()
    order = sorted(names, key=lambda name: zlib.crc32(name.encode()))  # not the order of the archives
    write_csv(folder / "filter/index.csv", pd.DataFrame({"image": order, "patient_id": range(len(order))}))
    crop.main(write_params(folder, {"crop": crop_params}), raw=folder / "raw", filtered=folder / "filter",
              out=folder / "crop", metrics=folder / "crop.json")
    return read_csv(folder / "crop/index.csv"), np.array(packed_images.load(folder / "crop/images.npy"))



def whole_decode(data: bytes, fraction: float, size: int) -> np.ndarray:
    """Pillow's decode of the whole PNG, then crop_resize: what crop_png falls back to, and must equal."""
    image = open_image(data)
    image.load()
    return crop_resize(image, fraction, size)

@pytest.mark.parametrize("fraction, size", [(0.75, 16), (1.0, 64), (0.5, 120), (0.75, 300)],
                         ids=["reduce", "whole", "enlarge", "nih"])
def test_crop_png_gives_the_pixels_of_crop_resize(fraction, size):
    pngs = {**varied_pngs(12), "1024x1024.png": png(Image.fromarray(gray(1024, 1024, 5)))}
    for name, data in pngs.items():
        assert np.array_equal(parallel_crop.crop_png(data, fraction, size), whole_decode(data, fraction, size)), name


@pytest.mark.parametrize("cut", [0.5, 0.95, 0.999])
def test_a_cut_png_fails_as_the_whole_decode_does(cut):
    data = png(Image.fromarray(gray(160, 200, 1)))
    data = data[:int(len(data) * cut)]
    with pytest.raises(Exception) as whole:
        whole_decode(data, 0.75, 32)
    with pytest.raises(type(whole.value), match=re.escape(str(whole.value))):
        parallel_crop.crop_png(data, 0.75, 32)


@pytest.mark.parametrize("fraction", [0.75, 1.0])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_damaged_image_data_gives_what_the_whole_decode_gives(where, fraction):
    """Bytes overwritten inside the compressed rows (the chunk's CRC made right again), also below the rows a
    75% crop of a tall image reads: the fast path raises Pillow's error, or gives Pillow's pixels where the
    damage still inflates."""
    data = rechunk(png(Image.fromarray(gray(300, 400, 2))), 1 << 20)  # one IDAT chunk
    length, = struct.unpack_from(">I", data, 33)  # the IDAT after the 8-byte signature and the 25-byte IHDR
    body = bytearray(data[41:41 + length])
    spot = int(length * where)
    body[spot:spot + 8] = b"\xff" * 8
    damaged = data[:41] + bytes(body) + struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body))) + data[45 + length:]
    try:
        whole = whole_decode(damaged, fraction, 32)
    except Exception as error:
        with pytest.raises(type(error), match=re.escape(str(error))):
            parallel_crop.crop_png(damaged, fraction, 32)
    else:
        assert np.array_equal(parallel_crop.crop_png(damaged, fraction, 32), whole)


@pytest.mark.parametrize("header", [b"\x88\x1c", b"\x78\x20"], ids=["window-too-big", "preset-dictionary"])
def test_a_zlib_header_zlib_refuses_is_left_to_pillow(header):
    """ISA-L reads some headers that zlib (and so Pillow) refuses: those PNGs are decoded by Pillow, whose error
    they get."""
    data = rechunk(png(Image.fromarray(gray(120, 100, 3))), 1 << 20)
    length, = struct.unpack_from(">I", data, 33)
    body = header + data[43:41 + length]
    assert (body[0] << 8 | body[1]) % 31 == 0  # right check bits: only the window or the dictionary is wrong
    bad = data[:33] + struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body)) \
        + data[45 + length:]
    with pytest.raises(Exception) as whole:
        whole_decode(bad, 0.75, 32)
    with pytest.raises(type(whole.value), match=re.escape(str(whole.value))):
        parallel_crop.crop_png(bad, 0.75, 32)


def test_many_decoders_on_one_big_and_one_small_archive_give_the_images_one_at_a_time(tmp_path):
    big, small, loose = varied_pngs(70), varied_pngs(3, seed=100), varied_pngs(5, seed=200)
    index, images = crop_folder(tmp_path, [big, small], loose, fraction=0.75, pixels=48, workers=5)
    every = {**big, **small, **loose}
    kept = read_csv(tmp_path / "filter/index.csv")
    assert index.drop(columns="row").equals(kept) and list(index["row"]) == list(range(len(every)))
    for row in index.itertuples():
        assert np.array_equal(images[row.row], whole_decode(every[row.image], 0.75, 48)), row.image


def test_a_png_bigger_than_a_slot_travels_alone_and_is_cropped(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel_crop, "SLOT_BYTES", 20_000)  # smaller than some of these PNGs, larger than others
    pngs = varied_pngs(30)
    assert min(map(len, pngs.values())) < 20_000 < max(map(len, pngs.values()))
    index, images = crop_folder(tmp_path, [pngs], fraction=1.0, pixels=40, workers=3)
    for row in index.itertuples():
        assert np.array_equal(images[row.row], whole_decode(pngs[row.image], 1.0, 40)), row.image


def test_batches_hold_at_most_batch_images_and_slot_bytes(monkeypatch):
    monkeypatch.setattr(parallel_crop, "SLOT_BYTES", 8000)
    members = [(f"{i}.png", bytes(size)) for i, size in enumerate([10, 5000, 3000, 9000, 20, 20] + [1] * 20)]
    batches = list(parallel_crop._batches(members))
    assert [name for batch in batches for name, _ in batch] == [name for name, _ in members]
    for batch in batches:
        assert len(batch) <= parallel_crop.BATCH_IMAGES
        assert len(batch) == 1 or sum(len(data) for _, data in batch) <= parallel_crop.SLOT_BYTES


def test_readers_stay_a_few_batches_ahead_of_the_decoders(tmp_path, monkeypatch):
    read, decoded = tmp_path / "read", tmp_path / "decoded"
    members, decode = parallel_crop.iter_archive, parallel_crop.crop_png

    def iter_archive(*args):  # the reader inherits it (fork): one byte per PNG read
        for member in members(*args):
            with open(read, "a") as handle:
                handle.write("x")
            yield member

    def crop_png(*args):  # the decoder notes how many PNGs were read when it takes the next one
        time.sleep(0.01)
        with open(decoded, "a") as handle:
            handle.write(f"{read.stat().st_size}\n")
        return decode(*args)

    monkeypatch.setattr(parallel_crop, "iter_archive", iter_archive)
    monkeypatch.setattr(parallel_crop, "crop_png", crop_png)
    crop_folder(tmp_path, [varied_pngs(80)], fraction=0.75, pixels=16, workers=1)
    ahead = max(count - i for i, count in enumerate(int(n) for n in decoded.read_text().split()))
    # every slot full, the batch the reader holds waiting for a slot, the PNG that starts the next one
    assert ahead <= (parallel_crop.slot_count(workers=1, readers=1) + 1) * parallel_crop.BATCH_IMAGES + 1 < 80


def test_one_archive_is_decoded_by_every_decoder(tmp_path, monkeypatch):
    log = tmp_path / "decoded_by"
    slow = parallel_crop.crop_png

    def crop_png(*args):  # the decoders inherit it (fork); slow enough that every decoder gets batches
        time.sleep(0.02)
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return slow(*args)

    monkeypatch.setattr(parallel_crop, "crop_png", crop_png)
    crop_folder(tmp_path, [varied_pngs(48)], fraction=0.75, pixels=32, workers=3)
    assert len(set(log.read_text().split())) == 3


def test_a_killed_reader_stops_the_stage_with_a_message(tmp_path):
    fifo = tmp_path / "images_002.tar.gz"
    os.mkfifo(fifo)  # a reader blocks opening it, until killed

    def kill_the_reader():
        for _ in range(200):
            readers = [p for p in multiprocessing.active_children() if p.name == f"reader of {fifo}"]
            if readers:
                time.sleep(0.2)
                os.kill(readers[0].pid, 9)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_reader)
    killer.start()
    (tmp_path / "raw").mkdir()
    write_csv(tmp_path / "raw/sources.csv", pd.DataFrame({"kind": ["tar"], "path": [str(fifo)], "image": [""]}))
    (tmp_path / "filter").mkdir()
    write_csv(tmp_path / "filter/index.csv", pd.DataFrame({"image": ["00000001_000.png"], "patient_id": [1]}))
    with pytest.raises(StageError, match=f"crop worker process \\(reader of {fifo}\\) died"):
        crop.main(write_params(tmp_path, {"crop": {"workers": 2}}), raw=tmp_path / "raw",
                  filtered=tmp_path / "filter", out=tmp_path / "crop", metrics=tmp_path / "crop.json")
    killer.join()
    assert not list((tmp_path / "crop").glob(".images.npy.tmp*"))  # nothing half-written left behind
