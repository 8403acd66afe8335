"""Where and how a network runs, decided once for train and evaluate alike: device, precision,
memory format, and the process's place under torchrun; plus inference over a part."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxr14.batches import Batches, prepare
from cxr14.params import ParamError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool            # autocast to bfloat16 (auto: on CUDA)
    channels_last: bool   # NHWC tensors: faster convolutions on CUDA
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        """The process that logs, validates and writes files (rank 0)."""
        return self.rank == 0

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def place(self, net: torch.nn.Module) -> torch.nn.Module:
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def decide(device: str, precision: str, key: str = "train.device") -> Runtime:
    """The runtime for a `device` choice (auto | cpu | cuda) and a `precision` (auto | fp32 | bf16)."""
    rank, world, local_rank = distributed()
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamError(key, "cuda", "auto or cpu: no CUDA device is visible")
    if device != "cpu" and torch.cuda.is_available():  # the GPUs this stage holds (cxr14/gpus.py): its own
        chosen = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    else:
        chosen = torch.device("cpu")
    bf16 = precision == "bf16" or (precision == "auto" and chosen.type == "cuda")
    return Runtime(chosen, bf16, chosen.type == "cuda", rank, world, local_rank)


@torch.inference_mode()
def predict(net: torch.nn.Module, batches: Batches, size: int, runtime: Runtime) -> tuple[np.ndarray, np.ndarray, float]:
    """(targets, probabilities, mean BCE) over a part, in its row order."""
    net.eval()
    ys, ps = [], []
    for x, y, _ in batches:
        with runtime.autocast():
            logits = net(prepare(x, size, None, None, runtime.channels_last))
        ps.append(torch.sigmoid(logits.float()).cpu())
        ys.append(y.cpu())
    y, p = torch.cat(ys).numpy(), torch.cat(ps).double().numpy()
    loss = float(F.binary_cross_entropy(torch.from_numpy(p).clamp(1e-7, 1 - 1e-7), torch.from_numpy(y).double()))
    return y, p, loss
