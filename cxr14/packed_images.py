"""Packed image arrays: one uint8 array [N, size, size] in a .npy file, memory-mapped by readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGES_FILE = "images.npy"


def create(path: Path, count: int, size: int) -> np.memmap:
    """A new array on disk (at a temporary path; the caller renames it when it is complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size))


def open_for_writing(path: Path) -> np.memmap:
    return np.load(path, mmap_mode="r+")


def load(path: Path) -> np.memmap:
    """Read-only and memory-mapped: only the rows a batch touches are read from disk."""
    array = np.load(path, mmap_mode="r")
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"{path}: expected a uint8 array [N, size, size], found {array.dtype} {array.shape}")
    return array
