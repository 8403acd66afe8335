"""Packed image arrays: one uint8 array [N, size, size] in a .npy file, memory-mapped by readers."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

IMAGES_FILE = "images.npy"


def nbytes(count: int, size: int) -> int:
    """The size on disk of a packed array, its .npy header included (at most 4 KiB)."""
    return count * size * size + 4096


def create(path: Path, count: int, size: int) -> np.memmap:
    """A new array on disk (at a temporary path; the caller renames it when it is complete). Its blocks are
    reserved at once, so a full disk is an error here rather than a crash (SIGBUS) on a later write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size))
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a file system without it
                raise
    return array


def open_for_writing(path: Path) -> np.memmap:
    return np.load(path, mmap_mode="r+")


def load(path: Path) -> np.memmap:
    """Read-only and memory-mapped: only the rows a batch touches are read from disk."""
    array = np.load(path, mmap_mode="r")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"{path}: expected a uint8 array [N, size, size], found {array.dtype} {array.shape}")
    return array
