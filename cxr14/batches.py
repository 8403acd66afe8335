"""Feeding a model from the packed uint8 array so that the accelerator never waits for data.

A background thread gathers each batch's rows from the memory-mapped array (uint8, one channel:
four times less to move than float, three times less than RGB), pins it, and queues it; the copy
to the device is asynchronous. Augmentation (random resized crop, flip, small rotation) then runs
on the device as one affine resampling per image, and the gray channel is expanded to the three
channels the backbones expect only there.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet's channel statistics, averaged: the same gray value goes to all three channels.
GRAY_MEAN, GRAY_STD = 0.449, 0.226


@dataclass
class Augment:
    scale: tuple[float, float]  # fraction of the image side kept by the random crop
    flip: bool
    rotate_degrees: float


def batch_order(count: int, batch_size: int, seed: list[int] | None, rank: int = 0, world: int = 1,
                drop_last: bool = False) -> list[np.ndarray]:
    """Positions for each batch: shuffled from `seed` (or in order), this rank's share of them."""
    order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
    if world > 1:
        per_rank = count // world
        order = order[rank * per_rank:(rank + 1) * per_rank] if drop_last else order[rank::world]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


class Batches:
    """Iterate (images uint8 [B, 1, S, S], targets float32 [B, L], positions) on `device`."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, order: list[np.ndarray],
                 device: torch.device, prefetch: int = 4):
        self.images, self.rows, self.targets, self.order = images, rows, targets, order
        self.device, self.prefetch = device, prefetch
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.order)

    def _gather(self, positions: np.ndarray):
        positions = positions[np.argsort(self.rows[positions], kind="stable")]  # sequential reads
        x = torch.from_numpy(np.ascontiguousarray(self.images[self.rows[positions]])).unsqueeze(1)
        y = torch.from_numpy(self.targets[positions])
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, positions

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for positions in self.order:
                    if stop.is_set():
                        return
                    ready.put(self._gather(positions))
                ready.put(None)
            except BaseException as error:  # hand the failure to the consumer
                ready.put(error)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y, positions = item
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), positions
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)


def prepare(x: torch.Tensor, size: int, augment: Augment | None, generator: torch.Generator | None,
            channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 1, S, S] -> normalized float [B, 3, size, size], augmented when `augment` is given."""
    x = x.float().div_(255)
    batch = x.shape[0]
    if augment is not None:
        device = x.device
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
        side = augment.scale[0] + (augment.scale[1] - augment.scale[0]) * rand(batch)
        angle = (rand(batch) * 2 - 1) * math.radians(augment.rotate_degrees)
        flip = torch.where(rand(batch) < 0.5, -1.0, 1.0) if augment.flip else torch.ones(batch, device=device)
        shift = (rand(batch, 2) * 2 - 1) * (1 - side).unsqueeze(1)
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                             torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [batch, 1, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.sub_(GRAY_MEAN).div_(GRAY_STD).expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
