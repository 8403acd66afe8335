"""Where the images are and how to read them: tar.gz archives read as streams, and loose PNG files;
and the center crop every model's images get (the crop stage's, and `cxr predict`'s on your own files).

A source list (data/raw/sources.csv) has one row per archive (`kind` tar) or per PNG file
(`kind` png, with its image name). Archives are never extracted: members are decoded in memory.
"""

from __future__ import annotations

import fnmatch
import io
import os
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from isal import igzip, isal_zlib
from PIL import Image

from cxr14.params import StageError

ARCHIVE_GLOB = "images_*.tar.gz"


def scan_local(directory: str | Path) -> pd.DataFrame:
    """Sources in a folder the user already has: NIH archives and PNGs in any layout (Kaggle's too), both read.

    Every folder under it is read (links to folders are not followed); one that cannot be listed (its
    permissions, an I/O error) stops the scan with a StageError naming it: its images would be left out.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"data.local_dir = {str(directory)!r} is not a folder")
    archives, pngs, unreadable = [], [], []
    for folder, _, files in os.walk(directory, onerror=unreadable.append):
        for name in files:
            if fnmatch.fnmatchcase(name, ARCHIVE_GLOB):
                archives.append(Path(folder, name))
            elif fnmatch.fnmatchcase(name.lower(), "*.png"):  # a hospital's export may say .PNG
                pngs.append(Path(folder, name))
    if unreadable:
        raise _unreadable_folders(directory, unreadable)
    archives, pngs = sorted(archives), sorted(pngs)
    if not archives and not pngs:
        raise FileNotFoundError(f"data.local_dir = {str(directory)!r} holds no *.png files and no {ARCHIVE_GLOB} archives")
    return pd.concat([pd.DataFrame({"kind": "tar", "path": [str(p) for p in archives], "image": ""}),
                      pd.DataFrame({"kind": "png", "path": [str(p) for p in pngs], "image": [p.name for p in pngs]})],
                     ignore_index=True)


def _unreadable_folders(directory: Path, errors: list[OSError]) -> StageError:
    """One line for the folders os.walk could not list: the first few (relative to `directory`) and how many."""
    def where(error: OSError) -> str:
        path = Path(error.filename) if error.filename else directory
        return "." if path == directory else os.path.relpath(path, directory)

    errors = sorted(errors, key=lambda error: str(error.filename))  # os.walk's order is the file system's
    shown = ", ".join(where(error) for error in errors[:3]) + (f" and {len(errors) - 3} more" if len(errors) > 3 else "")
    reasons = sorted({error.strerror or type(error).__name__ for error in errors})
    folders = "1 folder" if len(errors) == 1 else f"{len(errors)} folders"
    return StageError(f"data.local_dir = {str(directory)!r}: {folders} in it cannot be read ({'; '.join(reasons)}): "
                      f"{shown}; the images there would be left out. Make them readable (chmod -R u+rX, or their "
                      "owner) or move them out of the folder, and run again")


DEPTHS = (8, 10, 12, 14, 16)  # the sample depths of X-ray detectors and their exports
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_gray(image: Image.Image) -> np.ndarray:
    """Any PNG mode as one uint8 channel: 16-bit scaled down from its real depth (see sample_depth), colour
    converted to luminance, alpha dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.int64)
        top = 2 ** sample_depth(int(pixels.max(initial=0)), image.info.get("sbit")) - 1
        return (np.clip(pixels, 0, top) * (255 / top)).round().astype(np.uint8)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        return np.clip(pixels, 0, 255).round().astype(np.uint8)
    if image.mode in ("LA", "La"):
        image = image.getchannel("L")
    elif image.mode != "L":
        image = image.convert("L")  # palette, RGB(A), CMYK: luminance, alpha ignored
    return np.asarray(image, dtype=np.uint8)


def sample_depth(largest: int, sbit: tuple[int, ...] | None = None) -> int:
    """The bits a 16-bit (or 32-bit integer) gray image's values really use: its white is 2 ** bits - 1.

    A hospital's export often writes 12-bit values (0-4095) into a 16-bit PNG; scaled from 65535 they
    would come out almost black. So: with an sBIT chunk of s significant bits (its first value; see
    open_image), values up to 2 ** s - 1 are s-bit values (bits = s), and larger ones are scaled to 16
    bits as the PNG specification has it (bits = 16). Without one: the smallest of 8, 10, 12, 14 and
    16 bits that holds the image's largest value (max 3000 -> 12 bits, white 4095; max 40000 -> 16).
    Larger values (a 32-bit image) are clipped at 16 bits. An export's images are so scaled alike as
    long as each reaches above the next smaller depth, as X-rays do (bone, labels, the collimator's edge)."""
    bits = sbit[0] if sbit else 0
    if 1 <= bits <= 16:
        return bits if largest < 2 ** bits else 16
    return next((depth for depth in DEPTHS if largest < 2 ** depth), 16)


def png_significant_bits(stream: BinaryIO) -> tuple[int, ...] | None:
    """The values of a PNG's sBIT chunk (significant bits per channel), read from its chunks before the
    image data; None for a file without one or not a PNG. Pillow reads the chunk but keeps nothing of it."""
    if stream.read(8) != PNG_SIGNATURE:
        return None
    while len(head := stream.read(8)) == 8:
        length, kind = struct.unpack(">I4s", head)
        if kind == b"sBIT":
            data = stream.read(length)
            return tuple(data) if len(data) == length and length else None
        if kind in (b"IDAT", b"IEND"):  # sBIT comes before the image data or not at all
            return None
        stream.seek(length + 4, os.SEEK_CUR)  # the chunk's data and CRC
    return None


def open_image(source: bytes | str | Path) -> Image.Image:
    """Image.open of a file's bytes or path (not yet decoded); a PNG's sBIT chunk in info["sbit"], for to_gray."""
    named = isinstance(source, (str, os.PathLike))
    image = Image.open(source if named else io.BytesIO(source))
    if image.format == "PNG":
        with open(source, "rb") if named else io.BytesIO(source) as stream:
            sbit = png_significant_bits(stream)
        if sbit:
            image.info["sbit"] = sbit
    return image


def crop_box(width: int, height: int, fraction: float) -> tuple[float, float, float, float]:
    """The centered square of side `fraction` * the shorter side: (left, top, right, bottom)."""
    side = fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def resize_box(image: Image.Image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The `box` of a one-channel image resized to size x size (bilinear, as NIH-trained models saw it)."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def crop_resize(image: Image.Image, fraction: float, size: int) -> np.ndarray:
    """The centered square of side `fraction` * the shorter side, resized to size x size, one channel."""
    if image.mode != "L":
        image = Image.fromarray(to_gray(image))
    return resize_box(image, crop_box(*image.size, fraction), size)


class ArchiveError(StageError):
    """An archive that cannot be read: not a complete gzip'd tar (a download cut short, a web page saved as
    .tar.gz: `damaged`), or a file the system will not read (its permissions, an I/O error)."""


def _unreadable(path: str | Path, error: BaseException) -> ArchiveError:
    if isinstance(error, OSError) and error.errno is not None:  # the system's error (gzip's own have no errno)
        reason = f"cannot be read ({error.strerror or error})"
        unreadable = ArchiveError(f"{path} {reason}: check its permissions (ls -l) and its disk, and run again")
        damaged = False
    else:
        reason = f"not a complete gzip'd tar ({type(error).__name__}: {error})"
        unreadable = ArchiveError(f"{path} is {reason}; a transfer cut short? Fetch it again")
        damaged = True
    unreadable.reason, unreadable.damaged = reason, damaged  # kept through pickling (a worker process raises it)
    return unreadable


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, isal_zlib.error, OSError)  # BadGzipFile is an OSError


def iter_archive(path: str | Path, wanted: set[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """(image name, PNG bytes) for each member of a tar.gz whose base name is wanted (or all)."""
    try:
        with igzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if wanted is not None and name not in wanted:
                    continue
                data = archive.extractfile(member).read()
                yield name, data
    except FileNotFoundError:
        raise
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None


def list_archive(path: str | Path) -> list[str]:
    """The image names in a tar.gz (reads it through once: gzip allows no index); a cut one is an ArchiveError."""
    try:
        with igzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            return [member.name.rsplit("/", 1)[-1] for member in archive if member.isfile()]
    except FileNotFoundError:
        raise
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from None
