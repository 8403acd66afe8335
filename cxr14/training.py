"""The pieces of the training loop (stages/train.py strings them together): the run's settings, its
state and the decisions taken on it, the loss, optimizers and schedules, one epoch, and the
fingerprint that lets a checkpoint resume only the run that wrote it."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr14 import imports, progress, tasks
from cxr14.batches import Augment, Batches, prepare
from cxr14.runtime import Runtime

OPTIMIZERS = ("adam", "sgd", "adam_then_sgd")
CLASS_WEIGHTING = ("per_label", "keras")
SCHEDULES = ("plateau", "cosine", "none")
SELECT_BY = ("auroc_macro", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section of params.yaml, checked (stages/train.py: check)."""
    epochs: int
    batch_size: int
    steps_per_epoch: int | None
    optimizer: str
    adam_lr: float
    sgd_lr: float
    momentum: float
    nesterov: bool
    switch_epoch: int
    switch_patience: int
    weight_decay: float
    schedule: str
    plateau_factor: float
    plateau_patience: int
    early_stopping_patience: int | None
    class_weights: dict[str, float]
    class_weighting: str  # per_label | keras
    pos_weight: str
    augment: Augment | None
    select_by: str
    precision: str
    compile: bool
    device: str
    processes: int
    seed: int


@dataclass(frozen=True)
class TrainState:
    """Where a run stands after `epoch` epochs. The decisions are pure: they read the state and the config."""
    phase: str                     # adam | sgd: the optimizer in use
    epoch: int = 0                 # epochs done
    best_score: float = -math.inf  # validation score of the best epoch (macro AUROC, or minus the loss)
    best_epoch: int = 0
    bad_epochs: int = 0            # epochs since the best one
    phase_bad_epochs: int = 0      # the same, counted from the start of this phase

    @classmethod
    def start(cls, config: TrainConfig) -> TrainState:
        return cls(phase="sgd" if config.optimizer == "sgd" else "adam")

    def after_epoch(self, score: float) -> TrainState:
        """The state once one more epoch has scored `score` on validation."""
        epoch = self.epoch + 1
        if score > self.best_score:
            return replace(self, epoch=epoch, best_score=score, best_epoch=epoch, bad_epochs=0, phase_bad_epochs=0)
        return replace(self, epoch=epoch, bad_epochs=self.bad_epochs + 1, phase_bad_epochs=self.phase_bad_epochs + 1)

    @property
    def improved(self) -> bool:
        """The last epoch is the best so far."""
        return self.epoch > 0 and self.best_epoch == self.epoch

    def should_switch(self, config: TrainConfig) -> bool:
        """adam_then_sgd: Adam hands over at train.switch.epoch or after a plateau of switch.patience epochs."""
        return (config.optimizer == "adam_then_sgd" and self.phase == "adam"
                and (self.epoch >= config.switch_epoch or self.phase_bad_epochs >= config.switch_patience))

    def switched(self) -> TrainState:
        return replace(self, phase="sgd", phase_bad_epochs=0)

    def should_stop(self, config: TrainConfig) -> bool:
        """Early stopping after early_stopping_patience epochs without a better score (adam_then_sgd: in SGD only)."""
        if config.early_stopping_patience is None or (config.optimizer == "adam_then_sgd" and self.phase != "sgd"):
            return False
        return self.bad_epochs >= config.early_stopping_patience

    def finished(self, config: TrainConfig) -> bool:
        return self.epoch >= config.epochs or self.should_stop(config)


def score_of(config: TrainConfig, val_loss: float, auroc_macro: float | None) -> float:
    """The validation score that picks the best epoch: higher is better."""
    return auroc_macro if config.select_by == "auroc_macro" and auroc_macro is not None else -val_loss


# ---------------------------------------------------------------- loss, optimizers, schedules

def loss_weights(task: tasks.Task, config: TrainConfig, y_train: np.ndarray, device) -> tuple:
    """Per-label loss weights (train.class_weights) and positive weights (train.pos_weight: auto)."""
    weights = torch.tensor([config.class_weights.get(n, 1.0) for n in task.names], dtype=torch.float32, device=device)
    pos_weight = None
    if config.pos_weight == "auto":
        positives = y_train.sum(axis=0)
        ratio = np.where(positives > 0, (len(y_train) - positives) / np.maximum(positives, 1), 1.0)
        pos_weight = torch.tensor(ratio, dtype=torch.float32, device=device)
    return weights, pos_weight


def loss_fn(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, pos_weight,
            weighting: str) -> torch.Tensor:
    """Binary cross-entropy averaged over labels and images, with class weights applied as `weighting` says:

    per_label: each label's term times its label's weight.
    keras: each image's mean loss times one weight, that of its argmax label, which on multi-hot targets is
    its first positive label (label 0 for an image with none): what Keras' `class_weight` does with them.
    """
    per_label = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight, reduction="none")
    if weighting == "keras":
        return (per_label.mean(dim=1) * weights[y.argmax(dim=1)]).mean()
    return (per_label * weights).mean()


def make_optimizer(phase: str, parameters, config: TrainConfig) -> torch.optim.Optimizer:
    if phase == "adam":
        return torch.optim.Adam(parameters, lr=config.adam_lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.sgd_lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def make_scheduler(optimizer, config: TrainConfig, epochs_left: int):
    if config.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if config.select_by == "auroc_macro" else "min",
            factor=config.plateau_factor, patience=config.plateau_patience)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs_left, 1))
    return None


def step_scheduler(scheduler, config: TrainConfig, score: float, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score if config.select_by == "auroc_macro" else val_loss)
    elif scheduler is not None:
        scheduler.step()


# ---------------------------------------------------------------- one epoch

def train_one_epoch(runner, optimizer, batches: Batches, size: int, augment: Augment | None, generator,
                    loss_of, auxiliary_weight: float, runtime: Runtime, epoch: int, title: str) -> tuple[float, float]:
    """One pass over `batches`: (mean training loss, images per second over all processes). A network with an
    auxiliary output (cxr14/backbones.py) gives (logits, auxiliary logits) in training: its loss counts
    `auxiliary_weight` times."""
    runner.train()
    losses: list[torch.Tensor] = []
    seen, started = 0, time.perf_counter()
    with progress.items(disable=not runtime.lead) as bar:
        task = bar.add_task(title, total=len(batches))
        for step, (x, y, _) in enumerate(batches):
            with runtime.autocast():
                output = runner(prepare(x, size, augment, generator, runtime.channels_last))
            if isinstance(output, tuple):  # inception_v3 in training: (logits, aux_logits)
                loss = loss_of(output[0], y) + auxiliary_weight * loss_of(output[1], y)
            else:
                loss = loss_of(output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            seen += len(x)
            if step % 10 == 9 or step == len(batches) - 1:  # a sync every 10 steps, not every step
                check_finite(losses, epoch, step)
                bar.update(task, completed=step + 1, description=f"{title} loss {losses[-1].item():.4f}")
    runtime.synchronize()
    return float(torch.stack(losses).mean()), seen * runtime.world / (time.perf_counter() - started)


def check_finite(losses: list[torch.Tensor], epoch: int, step: int) -> None:
    finite = torch.isfinite(torch.stack(losses[-10:]))
    if not bool(finite.all()):
        first = len(losses) - len(finite) + int((~finite).nonzero()[0])
        raise FloatingPointError(
            f"the training loss became {losses[first].item()} at epoch {epoch + 1}, step {first + 1}: "
            "stopped. Try a lower learning rate (train.adam.lr / train.sgd.lr) or train.precision: fp32.")


# ---------------------------------------------------------------- resuming only the same run

# The params sections that shape the train stage's inputs and its run; evaluate's do not.
FINGERPRINT_SECTIONS = ("seed", "run_seed", "data", "filter", "crop", "split", "resample", "task", "model", "train")
SAMPLED_ROWS = 64


def fingerprint(params: dict, packed: Path, files: list[Path], code_module: str = "stages.train") -> str:
    """A hash of everything a checkpoint depends on, cheap for a 10 GB packed array.

    The params of the train stage and of every stage upstream; the full bytes of the index files and
    of the code that `code_module` imports; for the packed array its size, shape, modification time and
    SAMPLED_ROWS rows spread over it (a rewritten array has a new time, and new crops new pixels).
    """
    shaping = {k: params.get(k) for k in FINGERPRINT_SECTIONS}
    if isinstance(shaping.get("data"), dict):  # how the archives are fetched changes no byte of them
        download = {k: v for k, v in (shaping["data"].get("download") or {}).items() if k in ("archives_table", "archives")}
        shaping["data"] = {**shaping["data"], "download": download}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode())
    for name in imports.project_files(code_module):
        digest.update(name.encode() + (imports.ROOT / name).read_bytes())
    for path in files:
        digest.update(Path(path).read_bytes())
    array = np.load(packed, mmap_mode="r")
    stat = Path(packed).stat()
    digest.update(f"{array.shape} {stat.st_size} {stat.st_mtime_ns}".encode())
    for row in np.unique(np.linspace(0, len(array) - 1, min(SAMPLED_ROWS, len(array))).astype(int)):
        digest.update(np.ascontiguousarray(array[row]).tobytes())
    return digest.hexdigest()
