"""Stage 6, train: a torchvision backbone with the configured head, per-label AUROC logged by dvclive.

Every variant of the report is a params value: task (tasks.py), backbone/head/weights (models.py),
optimizer (adam, sgd, adam_then_sgd: Adam until train.switch.epoch or a plateau, then SGD from the
best weights), schedule (plateau or cosine), class weights and pos_weight against imbalance.
A checkpoint is written each epoch; a killed run restarted with the same params and data resumes
from it (and on the CPU, with a fixed seed, ends with the same metrics as an uninterrupted run).
Runs under `torchrun` with DistributedDataParallel when WORLD_SIZE > 1.

Outputs: data/train/model.pt (best by train.select_by), data/train/checkpoint.pt (for resuming),
metrics/train/ (dvclive: metrics.json and per-epoch curves).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dvclive import Live

from stages import metrics as M
from stages import models, packed_images, progress, tasks
from stages import params as P
from stages.atomic import atomic_path, read_csv
from stages.batches import Augment, Batches, batch_order, prepare

OPTIMIZERS = ("adam", "sgd", "adam_then_sgd")
SCHEDULES = ("plateau", "cosine", "none")
SELECT_BY = ("auroc_macro", "loss")


@dataclass
class TrainConfig:
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
    pos_weight: str
    augment: Augment | None
    select_by: str
    precision: str
    compile: bool
    device: str
    processes: int
    seed: int


def check(params: dict) -> tuple[tasks.Task, models.ModelConfig, TrainConfig]:
    task, model = tasks.check(params), models.check(params)
    s = P.Section(params.get("train"), "train")
    adam, sgd, switch, schedule, augment = (s.section(k) for k in ("adam", "sgd", "switch", "schedule", "augment"))
    class_weights = s.get("class_weights", {}) or {}
    if not isinstance(class_weights, dict):
        raise P.ParamError("train.class_weights", class_weights, "a mapping of label to loss weight, such as {Hernia: 14.0}")
    for name, weight in class_weights.items():
        if name not in task.names:
            raise P.ParamError(f"train.class_weights.{name}", weight,
                               f"a label the task {task.kind} predicts: " + ", ".join(task.names))
        P.check_number(f"train.class_weights.{name}", weight, low=0)
    scale = augment.get("scale", [0.8, 1.0])
    if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        raise P.ParamError("train.augment.scale", scale, "[low, high] with 0 < low <= high <= 1, such as [0.8, 1.0]")
    config = TrainConfig(
        epochs=s.number("epochs", 10, low=1, integer=True),
        batch_size=s.number("batch_size", 32, low=1, integer=True),
        steps_per_epoch=s.optional_number("steps_per_epoch", None, low=1, integer=True),
        optimizer=s.choice("optimizer", OPTIMIZERS, "adam"),
        adam_lr=adam.number("lr", 1e-3, low=0, low_open=True),
        sgd_lr=sgd.number("lr", 1e-2, low=0, low_open=True),
        momentum=sgd.number("momentum", 0.9, low=0, high=1),
        nesterov=sgd.boolean("nesterov", False),
        switch_epoch=switch.number("epoch", 10, low=1, integer=True),
        switch_patience=switch.number("patience", 2, low=1, integer=True),
        weight_decay=s.number("weight_decay", 0.0, low=0),
        schedule=schedule.choice("kind", SCHEDULES, "plateau"),
        plateau_factor=schedule.number("factor", 0.1, low=0, high=1, low_open=True),
        plateau_patience=schedule.number("patience", 1, low=0, integer=True),
        early_stopping_patience=s.optional_number("early_stopping_patience", None, low=1, integer=True),
        class_weights={k: float(v) for k, v in class_weights.items()},
        pos_weight=s.choice("pos_weight", ("none", "auto"), "none"),
        augment=Augment(tuple(scale), augment.boolean("flip", True),
                        augment.number("rotate_degrees", 5.0, low=0, high=180))
        if augment.boolean("enabled", True) else None,
        select_by=s.choice("select_by", SELECT_BY, "auroc_macro"),
        precision=s.choice("precision", ("auto", "fp32", "bf16"), "auto"),
        compile=s.boolean("compile", False),
        device=s.choice("device", ("auto", "cpu", "cuda"), "auto"),
        processes=s.number("processes", 1, low=1, integer=True),
        seed=P.seed(params),
    )
    if config.optimizer == "adam_then_sgd" and config.switch_epoch >= config.epochs:
        raise P.ParamError("train.switch.epoch", config.switch_epoch,
                           f"an epoch before train.epochs ({config.epochs}) for adam_then_sgd")
    for section in (adam, sgd, switch, schedule, augment, s):
        section.finish()
    return task, model, config


# ---------------------------------------------------------------- pieces

def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise P.ParamError("train.device", "cuda", "auto or cpu: no CUDA device is visible")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def loss_weights(task: tasks.Task, config: TrainConfig, y_train: np.ndarray, device) -> tuple:
    """Per-label loss weights (train.class_weights) and positive weights (train.pos_weight: auto)."""
    weights = torch.tensor([config.class_weights.get(n, 1.0) for n in task.names], dtype=torch.float32, device=device)
    pos_weight = None
    if config.pos_weight == "auto":
        positives = y_train.sum(axis=0)
        ratio = np.where(positives > 0, (len(y_train) - positives) / np.maximum(positives, 1), 1.0)
        pos_weight = torch.tensor(ratio, dtype=torch.float32, device=device)
    return weights, pos_weight


def loss_fn(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, pos_weight) -> torch.Tensor:
    per_label = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight, reduction="none")
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


@torch.inference_mode()
def predict(net, batches: Batches, size: int, autocast: dict, channels_last: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(targets, probabilities, mean BCE) over a part, in its row order."""
    net.eval()
    ys, ps = [], []
    for x, y, _ in batches:
        with torch.autocast(**autocast):
            logits = net(prepare(x, size, None, None, channels_last))
        ps.append(torch.sigmoid(logits.float()).cpu())
        ys.append(y.cpu())
    y, p = torch.cat(ys).numpy(), torch.cat(ps).double().numpy()
    loss = float(F.binary_cross_entropy(torch.from_numpy(p).clamp(1e-7, 1 - 1e-7), torch.from_numpy(y).double()))
    return y, p, loss


def fingerprint(params: dict, files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps({k: params.get(k) for k in ("seed", "task", "model", "train")},
                                       sort_keys=True, default=str).encode())
    for path in files:
        digest.update(path.read_bytes() if path.suffix == ".csv" else str(np.load(path, mmap_mode="r").shape).encode())
    return digest.hexdigest()


def save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------- the loop

def fit(params: dict, images_path: Path, train_csv: Path, val_csv: Path, out: Path, live_dir: Path,
        log=print, after_epoch=None) -> dict:
    """Train as params say; `after_epoch(epoch)` runs once each epoch's checkpoint is written."""
    task, model_config, config = check(params)
    rank, world, local_rank = distributed()
    if world != config.processes:
        raise P.ParamError("train.processes", config.processes,
                           f"the number of processes this run has ({world}): dvc.yaml starts the stage under "
                           "torchrun with train.processes; by hand, use torchrun --nproc_per_node N -m stages train")
    device = pick_device(config.device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    lead = rank == 0
    torch.manual_seed(config.seed)
    images = packed_images.load(images_path)
    train_rows = tasks.select(read_csv(train_csv), task, "train", config.seed)
    val_rows = tasks.select(read_csv(val_csv), task, "val", config.seed)
    if train_rows.empty or val_rows.empty:
        raise P.StageError(f"the task {task.kind} leaves {len(train_rows)} training and {len(val_rows)} validation images")
    y_train, y_val = tasks.targets(train_rows, task), tasks.targets(val_rows, task)
    size = models.input_size(model_config, images.shape[-1])

    net = models.create_model(model_config, len(task.names), size).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": bf16}
    runner = torch.compile(net) if config.compile else net
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(runner, device_ids=[local_rank] if device.type == "cuda" else None)
    weights, pos_weight = loss_weights(task, config, y_train, device)

    checkpoint_path, model_path = out / "checkpoint.pt", out / "model.pt"
    stamp = fingerprint(params, [images_path, train_csv, val_csv])
    state = {"epoch": 0, "phase": "sgd" if config.optimizer == "sgd" else "adam", "best_score": -np.inf,
             "best_epoch": -1, "bad_epochs": 0, "phase_bad_epochs": 0, "best_state": None}
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False) if checkpoint_path.exists() else None
    resume = saved is not None and saved["fingerprint"] == stamp and not saved["complete"]
    optimizer = make_optimizer(state["phase"], net.parameters(), config)
    scheduler = make_scheduler(optimizer, config, config.epochs)
    if resume:
        state = saved["state"]
        net.load_state_dict(saved["model"])
        optimizer = make_optimizer(state["phase"], net.parameters(), config)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler = make_scheduler(optimizer, config, config.epochs - state["epoch"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if lead:
            log(f"train: resuming after epoch {state['epoch']} from {checkpoint_path}")
    live = Live(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None) if lead else None
    generator = torch.Generator(device=device)
    val_batches = Batches(images, val_rows["row"].to_numpy(), y_val, batch_order(len(val_rows), config.batch_size, None),
                          device)

    for epoch in range(state["epoch"], config.epochs):
        # Everything random in an epoch is seeded from (seed, epoch): a resumed run repeats it exactly.
        torch.manual_seed(config.seed * 100_003 + epoch)
        generator.manual_seed(config.seed * 100_019 + epoch)
        # Whole batches only (a last batch of one image breaks batch norm), unless there is less than one.
        order = batch_order(len(train_rows), config.batch_size, [config.seed, epoch], rank, world,
                            drop_last=len(train_rows) >= config.batch_size * world)
        if config.steps_per_epoch:
            order = order[:config.steps_per_epoch]
        batches = Batches(images, train_rows["row"].to_numpy(), y_train, order, device)
        runner.train()
        losses: list[torch.Tensor] = []
        seen, started = 0, time.perf_counter()
        with progress.items(disable=not lead) as bar:
            bar_task = bar.add_task(f"epoch {epoch + 1}/{config.epochs} ({state['phase']})", total=len(batches))
            for step, (x, y, _) in enumerate(batches):
                with torch.autocast(**autocast):
                    output = runner(prepare(x, size, config.augment, generator, channels_last))
                if isinstance(output, tuple):  # inception_v3 in training: (logits, aux_logits)
                    loss = loss_fn(output[0], y, weights, pos_weight) + 0.4 * loss_fn(output[1], y, weights, pos_weight)
                else:
                    loss = loss_fn(output, y, weights, pos_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
                seen += len(x)
                if step % 10 == 9 or step == len(batches) - 1:
                    check_finite(losses, epoch, step)
                    bar.update(bar_task, completed=step + 1, description=f"epoch {epoch + 1}/{config.epochs} "
                               f"({state['phase']}) loss {losses[-1].item():.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        images_per_second = seen * world / (time.perf_counter() - started)
        train_loss = float(torch.stack(losses).mean())

        decision = [None]
        if lead:
            y, p, val_loss = predict(net, val_batches, size, autocast, channels_last)
            scores = M.auroc(y, p, task.names)
            score = scores["macro"] if config.select_by == "auroc_macro" and scores["macro"] is not None else -val_loss
            decision = [(val_loss, score, scores)]
        if world > 1:
            dist.broadcast_object_list(decision, src=0)
        val_loss, score, scores = decision[0]

        lr = optimizer.param_groups[0]["lr"]
        state["epoch"] = epoch + 1
        if score > state["best_score"]:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, phase_bad_epochs=0,
                         best_state=copy.deepcopy({k: v.cpu() for k, v in net.state_dict().items()}))
            if lead:
                save({"state_dict": state["best_state"], "task": asdict(task), "model": asdict(model_config),
                      "input_size": size, "names": list(task.names), "epoch": epoch + 1, "params": params},
                     model_path)
        else:
            state["bad_epochs"] += 1
            state["phase_bad_epochs"] += 1
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(score if config.select_by == "auroc_macro" else val_loss)
        elif scheduler is not None:
            scheduler.step()
        if config.optimizer == "adam_then_sgd" and state["phase"] == "adam" and (
                epoch + 1 >= config.switch_epoch or state["phase_bad_epochs"] >= config.switch_patience):
            net.load_state_dict(state["best_state"])  # SGD starts from the best weights so far
            state.update(phase="sgd", phase_bad_epochs=0)
            optimizer = make_optimizer("sgd", net.parameters(), config)
            scheduler = make_scheduler(optimizer, config, config.epochs - epoch - 1)
            if lead:
                log(f"train: switched from Adam to SGD after epoch {epoch + 1}, from the weights of epoch {state['best_epoch']}")
        stop = (config.early_stopping_patience is not None and state["bad_epochs"] >= config.early_stopping_patience
                and state["phase"] == ("sgd" if config.optimizer == "adam_then_sgd" else state["phase"]))
        complete = stop or epoch + 1 == config.epochs
        if lead:
            live.step = epoch
            for name, value in {"train_loss": train_loss, "val_loss": val_loss, "auroc_micro": scores["micro"],
                                "auroc_macro": scores["macro"], "lr": lr, "images_per_second": images_per_second,
                                **{f"auroc/{n}": v for n, v in scores["per_label"].items()}}.items():
                if value is not None:
                    live.log_metric(name, value)
            live.next_step()
            save({"fingerprint": stamp, "complete": complete, "state": state, "model": net.state_dict(),
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
                 checkpoint_path)
            log(f"train: epoch {epoch + 1}: loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val macro AUROC {scores['macro'] if scores['macro'] is None else round(scores['macro'], 4)}, "
                f"{images_per_second:.0f} images/s")
        if after_epoch is not None:
            after_epoch(epoch + 1)
        if stop:
            if lead:
                log(f"train: early stop after epoch {epoch + 1}: no improvement for {state['bad_epochs']} epochs")
            break
    if lead:
        live.end()
    if world > 1:
        dist.barrier()
    return state


def check_finite(losses: list[torch.Tensor], epoch: int, step: int) -> None:
    finite = torch.isfinite(torch.stack(losses[-10:]))
    if not bool(finite.all()):
        first = len(losses) - len(finite) + int((~finite).nonzero()[0])
        raise FloatingPointError(
            f"the training loss became {losses[first].item()} at epoch {epoch + 1}, step {first + 1}: "
            "stopped. Try a lower learning rate (train.adam.lr / train.sgd.lr) or train.precision: fp32.")


def main(params_path: str = P.PARAMS_FILE, cropped: Path = Path("data/crop"), resampled: Path = Path("data/resample"),
         split_dir: Path = Path("data/split"), out: Path = Path("data/train"), live_dir: Path = Path("metrics/train")) -> None:
    params = P.load(params_path)
    check(params)
    fit(params, cropped / packed_images.IMAGES_FILE, resampled / "train.csv", split_dir / "val.csv", out, live_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
