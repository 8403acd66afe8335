"""Stage 6, train: a torchvision backbone with the configured head, per-label AUROC logged by dvclive.

Every variant of the report is a params value: task (cxr14/tasks.py), backbone/head/weights
(cxr14/models.py), optimizer (adam, sgd, adam_then_sgd: Adam until train.switch.epoch or a plateau,
then SGD from the best weights), schedule (plateau or cosine), class weights and pos_weight.
A checkpoint is written each epoch; a killed run restarted on the same inputs (params, data, code:
cxr14/training.py fingerprint) resumes from it, and on the CPU ends with the same metrics as an
uninterrupted run. Runs under `torchrun` with DistributedDataParallel when WORLD_SIZE > 1.

Outputs: data/train/model.pt (best by train.select_by), data/train/checkpoint.pt (for resuming),
metrics/train/ (dvclive: metrics.json and per-epoch curves).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from dvclive import Live

from cxr14 import backbones, gpus, metrics, model_file, models, packed_images, tasks
from cxr14.atomic import atomic_path, read_csv
from cxr14.batches import Augment, Batches, batch_order
from cxr14.params import PARAMS_FILE, ParamError, StageError, check_number, load, section, training_seed
from cxr14.runtime import DEVICES, PRECISIONS, Runtime, decide, predict
from cxr14.stage import under_torchrun
from cxr14.training import (
    CLASS_WEIGHTING,
    OPTIMIZERS,
    SCHEDULES,
    SELECT_BY,
    TrainConfig,
    TrainState,
    fingerprint,
    loss_fn,
    loss_weights,
    make_optimizer,
    make_scheduler,
    score_of,
    step_scheduler,
    train_one_epoch,
)

MODEL_FILE, CHECKPOINT_FILE = "model.pt", "checkpoint.pt"


def check(params: dict) -> tuple[tasks.Task, models.ModelConfig, TrainConfig]:
    task, model = tasks.check(params), models.check(params)
    s = section(params, "train")
    adam, sgd, switch, schedule, augment = (s.section(k) for k in ("adam", "sgd", "switch", "schedule", "augment"))
    class_weights = s.get("class_weights") or {}
    if not isinstance(class_weights, dict):
        raise ParamError("train.class_weights", class_weights, "a mapping of label to loss weight, such as {Hernia: 14.0}")
    for name, weight in class_weights.items():
        if name not in task.names:
            raise ParamError(f"train.class_weights.{name}", weight,
                             f"a label the task {task.kind} predicts: " + ", ".join(task.names))
        check_number(f"train.class_weights.{name}", weight, low=0)
    scale = augment.get("scale")
    if not (isinstance(scale, list) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        raise ParamError("train.augment.scale", scale, "[low, high] with 0 < low <= high <= 1, such as [0.8, 1.0]")
    augmentation = Augment(tuple(scale), augment.boolean("flip"), augment.number("rotate_degrees", low=0, high=180))
    config = TrainConfig(
        epochs=s.number("epochs", low=1, integer=True),
        batch_size=s.number("batch_size", low=1, integer=True),
        steps_per_epoch=s.optional_number("steps_per_epoch", low=1, integer=True),
        optimizer=s.choice("optimizer", OPTIMIZERS),
        adam_lr=adam.number("lr", low=0, low_open=True),
        sgd_lr=sgd.number("lr", low=0, low_open=True),
        momentum=sgd.number("momentum", low=0, high=1),
        nesterov=sgd.boolean("nesterov"),
        switch_epoch=switch.number("epoch", low=1, integer=True),
        switch_patience=switch.number("patience", low=1, integer=True),
        weight_decay=s.number("weight_decay", low=0),
        schedule=schedule.choice("kind", SCHEDULES),
        plateau_factor=schedule.number("factor", low=0, high=1, low_open=True),
        plateau_patience=schedule.number("patience", low=0, integer=True),
        early_stopping_patience=s.optional_number("early_stopping_patience", low=1, integer=True),
        class_weights={k: float(v) for k, v in class_weights.items()},
        class_weighting=s.choice("class_weighting", CLASS_WEIGHTING),
        pos_weight=s.choice("pos_weight", ("none", "auto")),
        augment=augmentation if augment.boolean("enabled") else None,
        select_by=s.choice("select_by", SELECT_BY),
        precision=s.choice("precision", PRECISIONS),
        compile=s.boolean("compile"),
        device=s.choice("device", DEVICES),
        processes=s.number("processes", low=1, integer=True),
        seed=training_seed(params),
    )
    if config.class_weighting == "keras" and task.kind == "binary":  # one output: its argmax is always 0
        raise ParamError("train.class_weighting", "keras", "per_label for task.kind binary (Keras' rule needs one "
                         "output per class; with one output every image would get the same weight)")
    if config.optimizer == "adam_then_sgd" and config.switch_epoch >= config.epochs:
        raise ParamError("train.switch.epoch", config.switch_epoch,
                         f"an epoch before train.epochs ({config.epochs}) for adam_then_sgd")
    for settings in (adam, sgd, switch, schedule, augment, s):
        settings.finish()
    return task, model, config


@dataclass
class Parts:
    """What a run trains and validates on: the packed images and the rows of each part with their targets."""
    images: np.ndarray
    train: pd.DataFrame
    y_train: np.ndarray
    val: pd.DataFrame
    y_val: np.ndarray
    size: int  # the side the network sees


@dataclass
class Run:
    """The objects a run changes as it goes."""
    net: torch.nn.Module
    runner: torch.nn.Module  # net, compiled and/or wrapped in DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    best_weights: dict | None
    resumed: bool


def fit(params: dict, images_path: Path, train_csv: Path, val_csv: Path, out: Path, live_dir: Path,
        log=print, after_epoch=None) -> TrainState:
    """Train as params say; `after_epoch(epoch)` runs once each epoch's checkpoint is written."""
    task, model_config, config = check(params)
    runtime = set_up(config)
    parts = load_parts(task, model_config, config, images_path, train_csv, val_csv)
    fetched = [models.WEIGHTS_DIR / "weights.json"] if model_config.pretrained == "imagenet" else []
    stamp = fingerprint(params, images_path, [train_csv, val_csv, *fetched])
    run = build_or_resume(task, model_config, config, runtime, parts, out / CHECKPOINT_FILE, stamp, log)
    live = Live(str(live_dir), resume=run.resumed, save_dvc_exp=False, dvcyaml=None) if runtime.lead else None
    weights, pos_weight = loss_weights(task, config, parts.y_train, runtime.device)
    loss_of = partial(loss_fn, weights=weights, pos_weight=pos_weight, weighting=config.class_weighting)
    auxiliary_weight = backbones.get(model_config.backbone).auxiliary_loss_weight
    generator = torch.Generator(device=runtime.device)
    val_batches = Batches(parts.images, parts.val["row"].to_numpy(), parts.y_val,
                          batch_order(len(parts.val), config.batch_size, None), runtime.device)
    save_best = partial(save_model, params, task, model_config, config, parts.size, out / MODEL_FILE)
    while not run.state.finished(config):
        epoch = run.state.epoch
        # Everything random in an epoch is seeded from (seed, epoch): a resumed run repeats it exactly.
        torch.manual_seed(config.seed * 100_003 + epoch)
        generator.manual_seed(config.seed * 100_019 + epoch)
        title = f"epoch {epoch + 1}/{config.epochs} ({run.state.phase})"
        train_loss, rate = train_one_epoch(run.runner, run.optimizer, epoch_batches(parts, config, runtime, epoch),
                                           parts.size, config.augment, generator, loss_of, auxiliary_weight, runtime,
                                           epoch, title)
        val_loss, scores = validate(run.net, val_batches, parts.size, task, runtime)
        lr = run.optimizer.param_groups[0]["lr"]
        decide_epoch(run, config, runtime, val_loss, scores, save_best, log)
        if runtime.lead:
            log_epoch(live, run.state, {"train_loss": train_loss, "val_loss": val_loss, "auroc_micro": scores["micro"],
                                        "auroc_macro": scores["macro"], "lr": lr, "images_per_second": rate,
                                        **{f"auroc/{n}": v for n, v in scores["per_label"].items()}}, log)
            save_checkpoint(run, stamp, run.state.finished(config), out / CHECKPOINT_FILE)
        if after_epoch is not None:
            after_epoch(run.state.epoch)
    if runtime.lead and run.state.should_stop(config):
        log(f"train: early stop after epoch {run.state.epoch}: no improvement for {run.state.bad_epochs} epochs")
    if live is not None:
        live.end()
    if runtime.world > 1:
        dist.barrier()
    return run.state


# ---------------------------------------------------------------- the steps of fit

def set_up(config: TrainConfig) -> Runtime:
    """Device, precision and memory format (cxr14/runtime.py), and the process group under torchrun."""
    runtime = decide(config.device, config.precision)
    if runtime.world != config.processes:
        raise ParamError("train.processes", config.processes,
                         f"the number of processes this run has ({runtime.world}): `python -m stages.train` starts "
                         "train.processes workers itself; under torchrun, use --nproc_per_node train.processes")
    if runtime.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
    torch.manual_seed(config.seed)
    return runtime


def load_parts(task: tasks.Task, model_config: models.ModelConfig, config: TrainConfig, images_path: Path,
               train_csv: Path, val_csv: Path) -> Parts:
    images = packed_images.load(images_path)
    train = tasks.select(read_csv(train_csv), task, "train", config.seed)
    val = tasks.select(read_csv(val_csv), task, "val", config.seed)
    if train.empty or val.empty:
        raise StageError(f"the task {task.kind} leaves {len(train)} training and {len(val)} validation images")
    return Parts(images, train, tasks.targets(train, task), val, tasks.targets(val, task),
                 models.input_size(model_config, images.shape[-1]))


def build_or_resume(task: tasks.Task, model_config: models.ModelConfig, config: TrainConfig, runtime: Runtime,
                    parts: Parts, checkpoint_path: Path, stamp: str, log) -> Run:
    """The network, optimizer and schedule: fresh, or as the checkpoint left them if it is this run's."""
    net = runtime.place(models.create_model(model_config, len(task.names), parts.size))
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False) if checkpoint_path.exists() else None
    resumed = saved is not None and saved.get("fingerprint") == stamp and not saved["complete"]
    state = TrainState(**saved["state"]) if resumed else TrainState.start(config)
    if resumed:
        net.load_state_dict(saved["model"])
    optimizer = make_optimizer(state.phase, net.parameters(), config)
    scheduler = make_scheduler(optimizer, config, config.epochs - state.epoch)
    if resumed:
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if runtime.lead:
            log(f"train: resuming after epoch {state.epoch} from {checkpoint_path}")
    runner = torch.compile(net) if config.compile else net
    if runtime.world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)
    return Run(net, runner, optimizer, scheduler, state, saved["best_weights"] if resumed else None, resumed)


def epoch_batches(parts: Parts, config: TrainConfig, runtime: Runtime, epoch: int) -> Batches:
    """This process's shuffled batches of the epoch. Whole batches only (a last batch of one image breaks
    batch norm), unless there is less than one."""
    order = batch_order(len(parts.train), config.batch_size, [config.seed, epoch], runtime.rank, runtime.world,
                        drop_last=len(parts.train) >= config.batch_size * runtime.world)
    if config.steps_per_epoch:
        order = order[:config.steps_per_epoch]
    return Batches(parts.images, parts.train["row"].to_numpy(), parts.y_train, order, runtime.device)


def validate(net, batches: Batches, size: int, task: tasks.Task, runtime: Runtime) -> tuple[float, dict]:
    """(validation loss, AUROC per label, micro and macro): computed by the lead process, shared with the rest."""
    result: list = [None]
    if runtime.lead:
        y, p, loss = predict(net, batches, size, runtime)
        result = [(loss, metrics.auroc(y, p, task.names))]
    if runtime.world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def decide_epoch(run: Run, config: TrainConfig, runtime: Runtime, val_loss: float, scores: dict, save_best, log) -> None:
    """The epoch's decisions (TrainState): keep the best weights, step the schedule, switch from Adam to SGD."""
    score = score_of(config, val_loss, scores["macro"])
    run.state = run.state.after_epoch(score)
    if run.state.improved:
        run.best_weights = copy.deepcopy({k: v.cpu() for k, v in run.net.state_dict().items()})
        if runtime.lead:
            save_best(run.best_weights, run.state.epoch)
    step_scheduler(run.scheduler, config, score, val_loss)
    if run.state.should_switch(config):
        if run.best_weights is not None:
            run.net.load_state_dict(run.best_weights)  # SGD starts from the best weights so far
        run.state = run.state.switched()
        run.optimizer = make_optimizer("sgd", run.net.parameters(), config)
        run.scheduler = make_scheduler(run.optimizer, config, config.epochs - run.state.epoch)
        if runtime.lead:
            log(f"train: switched from Adam to SGD after epoch {run.state.epoch}, "
                f"from the weights of epoch {run.state.best_epoch}")


def save_model(params: dict, task: tasks.Task, model_config: models.ModelConfig, config: TrainConfig, size: int,
               path: Path, weights: dict, epoch: int) -> None:
    """The best model so far, with what evaluate needs to rebuild and run it as it was trained (cxr14/model_file.py)."""
    model_file.save(path, weights, task, model_config, size, config.precision, epoch, params)


def log_epoch(live: Live, state: TrainState, values: dict, log) -> None:
    live.step = state.epoch - 1
    for name, value in values.items():
        if value is not None:
            live.log_metric(name, value)
    live.next_step()
    macro = values["auroc_macro"]
    log(f"train: epoch {state.epoch}: loss {values['train_loss']:.4f}, val loss {values['val_loss']:.4f}, "
        f"val macro AUROC {'-' if macro is None else round(macro, 4)}, {values['images_per_second']:.0f} images/s")


def save_checkpoint(run: Run, stamp: str, complete: bool, path: Path) -> None:
    checkpoint = {"fingerprint": stamp, "complete": complete, "state": asdict(run.state), "best_weights": run.best_weights,
                  "model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
                  "scheduler": run.scheduler.state_dict() if run.scheduler else None}
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def main(params_path: str = PARAMS_FILE, cropped: Path = Path("data/crop"), resampled: Path = Path("data/resample"),
         split_dir: Path = Path("data/split"), out: Path = Path("data/train"), live_dir: Path = Path("metrics/train")) -> None:
    params = load(params_path)
    _, _, config = check(params)
    # A GPU of its own for each process while the stage runs (cxr14/gpus.py); torchrun's workers use their launcher's.
    with nullcontext() if under_torchrun() else gpus.held(config.device, config.processes, "train.processes"):
        if config.processes > 1 and not under_torchrun():
            launch(config.processes, params_path)  # this process becomes torchrun's agent; the workers come back here
            return
        fit(params, cropped / packed_images.IMAGES_FILE, resampled / "train.csv", split_dir / "val.csv", out, live_dir)
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(processes: int, params_path: str) -> None:
    """Several GPUs of one machine: torchrun's launcher, in this process, starts `processes` workers of this
    stage (DistributedDataParallel); each dies with it (cxr14/stage.py)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(["--standalone", f"--nproc_per_node={processes}", "-m", "stages.train", "--params", params_path])
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise StageError(f"training process {rank} failed: {getattr(failure, 'message', failure)}") from None

if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.train")
