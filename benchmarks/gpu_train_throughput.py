"""Training throughput of the real train stage against a bare model-only loop, on one GPU.

    python benchmarks/gpu_train_throughput.py            # densenet121, 224 px, batch 128, ~300 steps
    python benchmarks/gpu_train_throughput.py --device cpu --steps 4 --batch 8 --size 64   # a dry run here

1. The train stage (`stages.train.fit`) on a synthetic packed uint8 array in a temporary folder:
   memory-mapped batches through pinned memory on a background thread, augmentation on the device,
   bf16 autocast, channels_last. Two epochs; the second epoch's images/s is reported (the first
   includes cuDNN's autotuning).
2. A model-only loop: the same network, batch, precision and memory format on random tensors that
   are already on the device (no data loading, no augmentation).
Prints both, their ratio and the device. dvclive is replaced by a no-op logger where it is not
installed (the GPU machine has no dvc): it logs once per epoch, outside the timed steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _no_op_dvclive() -> None:
    try:
        import dvclive  # noqa: F401
    except ImportError:
        class Live:
            def __init__(self, *args, **kwargs):
                self.step = 0

            def __getattr__(self, name):
                return lambda *args, **kwargs: None

        sys.modules["dvclive"] = types.SimpleNamespace(Live=Live)


def packed_data(folder: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    array = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(images, size, size))
    for start in range(0, images, 1024):
        array[start:start + 1024] = rng.integers(0, 256, (min(1024, images - start), size, size), dtype=np.uint8)
    array.flush()
    names = ["Atelectasis", "Effusion", "No Finding", "Cardiomegaly|Effusion", "Hernia", "Mass|Nodule"]
    rows = pd.DataFrame({"image": [f"{i:08d}_000.png" for i in range(images)], "patient_id": np.arange(images),
                         "follow_up": 0, "view": "PA", "labels": [names[i % len(names)] for i in range(images)],
                         "row": np.arange(images)})
    rows.to_csv(folder / "train.csv", index=False)
    rows.iloc[:512].to_csv(folder / "val.csv", index=False)


def stage_throughput(folder: Path, args) -> float:
    from cxr14.params import PARAMS_FILE, apply, load
    from stages import train

    params = apply(load(REPO / PARAMS_FILE), {
        "seed": 0, "task.kind": "multilabel14", "model.backbone": args.backbone, "model.pretrained": "none",
        "model.head.hidden": [256, 50], "model.head.dropout": 0.1, "model.input_size": None, "train.epochs": 2,
        "train.batch_size": args.batch, "train.steps_per_epoch": args.steps // 2, "train.optimizer": "adam",
        "train.early_stopping_patience": None, "train.device": args.device, "train.compile": args.compile,
        "train.precision": "auto", "train.processes": 1})
    seen = []
    train.fit(params, folder / "images.npy", folder / "train.csv", folder / "val.csv", folder / "out", folder / "live",
              log=lambda line: (print(line, flush=True), seen.append(line)))
    last = [line for line in seen if "images/s" in line][-1]
    return float(last.rsplit(",", 1)[1].split()[0])


def model_only_throughput(args) -> float:
    from cxr14 import models, runtime

    run = runtime.decide(args.device, "auto")  # as the stage decides: bf16 and channels_last on CUDA
    config = models.ModelConfig(args.backbone, "none", "replace_last", [256, 50], 0.1, None)
    size = models.input_size(config, args.size)
    net = run.place(models.create_model(config, 14, size))
    net = torch.compile(net) if args.compile else net
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.randn(args.batch, 3, size, size, device=run.device)
    x = x.contiguous(memory_format=torch.channels_last) if run.channels_last else x
    y = torch.randint(0, 2, (args.batch, 14), device=run.device).float()
    cuda = run.device.type == "cuda"

    def step():
        with run.autocast():
            out = net(x)
            if isinstance(out, tuple):  # inception_v3 in training: (logits, aux_logits), as the stage's loss
                loss = F.binary_cross_entropy_with_logits(out[0].float(), y) + 0.4 * F.binary_cross_entropy_with_logits(
                    out[1].float(), y)
            else:
                loss = F.binary_cross_entropy_with_logits(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(max(3, args.steps // 10)):
        step()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    timed = args.steps // 2
    for _ in range(timed):
        step()
    if cuda:
        torch.cuda.synchronize()
    return timed * args.batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the stage, over two epochs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    _no_op_dvclive()
    torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        packed_data(folder, args.batch * (args.steps // 2), args.size)
        stage = stage_throughput(folder, args)
    bare = model_only_throughput(args)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"\ndevice: {name}; torch {torch.__version__}; {args.backbone}, {args.size} px, batch {args.batch}, "
          f"bf16 autocast and channels_last on CUDA{', torch.compile' if args.compile else ''}")
    print(f"train stage:      {stage:8.1f} images/s")
    print(f"model-only loop:  {bare:8.1f} images/s")
    print(f"stage / model-only: {stage / bare:.1%}")


if __name__ == "__main__":
    main()
