"""The model file (data/train/model.pt): the one place that writes it and reads it back.

The train stage writes its best network with what is needed to rebuild and run it as it was trained: its
weights, the model settings (backbone, top, head), the task and its label names, the side the network sees,
the training precision, the epoch, and the whole params (so the crop it was trained on: crop.fraction,
crop.pixels). evaluate, localize and `cxr predict` read it through `load`, which rebuilds the network; a file
that is not a model file, one missing a field, or weights that do not fit the network it records is a
ModelFileError that says which and what to do. (The train stage's checkpoint, for resuming, is its own.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import torch

from cxr14 import models, tasks
from cxr14.atomic import atomic_path
from cxr14.params import StageError

PATH = "data/train/model.pt"  # the train stage's output, in the workspace or in an experiment (dvc.yaml)
FIELDS = ("state_dict", "model", "task", "names", "input_size", "precision", "epoch", "params")


class ModelFileError(StageError):
    """A model file that cannot be used: not one, missing a field, or weights that do not fit its network."""


@dataclass
class TrainedModel:
    """A model file's network (on the CPU, in eval mode) and what the file records with it."""
    net: torch.nn.Module
    config: models.ModelConfig
    task: dict              # cxr14.tasks.Task as a dict (kind, target, negatives_per_positive)
    names: tuple[str, ...]  # the label of each output
    input_size: int         # the side the network sees
    precision: str          # train.precision
    epoch: int
    params: dict            # the params of the run that trained it
    source: str             # where it came from, for messages

    @property
    def crop_fraction(self) -> float:
        return float(self.params["crop"]["fraction"])

    @property
    def crop_pixels(self) -> int:
        return int(self.params["crop"]["pixels"])


def save(path: str | Path, weights: dict, task: tasks.Task, config: models.ModelConfig, input_size: int,
         precision: str, epoch: int, params: dict) -> None:
    """Write the model file at `path` (atomically: a temporary name, renamed when complete)."""
    saved = {"state_dict": weights, "model": asdict(config), "task": asdict(task), "names": list(task.names),
             "input_size": input_size, "precision": precision, "epoch": epoch, "params": params}
    with atomic_path(Path(path)) as tmp:
        torch.save(saved, tmp)


def read(source: str | Path | IO[bytes], where: str | None = None) -> dict:
    """The saved dict of a model file (a path or an open binary file), every field checked to be there."""
    where = where or str(source)
    try:
        saved = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many kinds: not a zip, a truncated file, an unpickling error
        raise ModelFileError(f"{where} is not a model file torch can read ({type(error).__name__}: {error})") from None
    crop = ((saved.get("params") if isinstance(saved, dict) else None) or {}).get("crop") or {}
    missing = sorted(set(FIELDS) - set(saved)) if isinstance(saved, dict) else sorted(FIELDS)
    missing += [f"params.crop.{k}" for k in ("fraction", "pixels") if k not in crop]
    if missing:
        raise ModelFileError(f"{where} does not record {', '.join(missing)}: it was not written by this project's "
                             "train stage (or by an older version of it); train it again (`dvc repro train`)")
    return saved


def load(source: str | Path | IO[bytes], where: str | None = None) -> TrainedModel:
    """The network a model file records (backbone, head, labels), rebuilt with its weights: on the CPU, in
    eval mode. Weights that do not fit it (another backbone's, another label count's) are a ModelFileError
    saying what the file records and what they hold."""
    where = where or str(source)
    saved = read(source, where)
    recorded = saved["model"] if isinstance(saved["model"], dict) else {}
    names = saved["names"]
    described = (f"model.backbone {recorded.get('backbone')}, model.top {recorded.get('top')}, model.head.hidden "
                 f"{recorded.get('hidden')}, {len(names)} labels")
    try:
        config = models.ModelConfig(**{**recorded, "pretrained": "none"})  # the weights are the file's own
        net = models.create_model(config, len(names), int(saved["input_size"]))
    except Exception as error:  # a backbone this version does not know, a missing setting: many kinds
        raise ModelFileError(f"{where} records a network that cannot be built ({described}: {type(error).__name__}: "
                             f"{error}); was it written by another version of this project? Train it again "
                             "(`dvc repro train`)") from None
    weights = saved["state_dict"]
    mismatch = _mismatch(net.state_dict(), weights, len(names)) if isinstance(weights, dict) else \
        f"its state_dict is a {type(weights).__name__}, not a network's weights"
    if not mismatch:
        try:
            net.load_state_dict(weights)
        except RuntimeError as error:  # what _mismatch does not look at (a tensor that is not one)
            mismatch = str(error).strip().splitlines()[-1].strip()
    if mismatch:
        raise ModelFileError(f"{where}: its weights do not fit the network it records ({described}): {mismatch}. "
                             "Was the file changed or put together by hand? Use the model the train stage wrote "
                             "(`dvc repro train`)")
    return TrainedModel(net.eval(), config, saved["task"], tuple(names), int(saved["input_size"]), saved["precision"],
                        saved["epoch"], saved["params"], where)


def _mismatch(expected: dict, given: dict, labels: int) -> str:
    """What differs between a network's weights and a file's, in words ('' when they fit)."""
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        return (f"{len(missing)} of the network's {len(expected)} weight tensors are not in the file"
                + (f" (such as {missing[0]})" if missing else "")
                + f", and {len(unexpected)} of the file's {len(given)} are not in the network"
                + (f" (such as {unexpected[0]})" if unexpected else "")
                + ": the weights of another backbone or head")
    shapes = {name: (tuple(given[name].shape), tuple(tensor.shape)) for name, tensor in expected.items()
              if hasattr(given[name], "shape") and tuple(given[name].shape) != tuple(tensor.shape)}
    if not shapes:
        return ""
    last = [name for name, tensor in expected.items() if name.endswith(".weight") and tensor.ndim == 2][-1]
    if last in shapes and shapes[last][0][0] != labels:
        return f"the file names {labels} labels, and its weights' last layer ({last}) has {shapes[last][0][0]} outputs"
    name, (held, wanted) = next(iter(shapes.items()))
    more = f" (and {len(shapes) - 1} more tensors differ)" if len(shapes) > 1 else ""
    return f"{name} is {list(held)} in the file, {list(wanted)} in the network{more}"
