"""The training loop: optimizers, loss weights, resuming, NaN guard, DDP; dvclive logging."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cxr14.params import ParamError, load
from cxr14.training import TrainState, score_of
from stages import crop, train

from .conftest import REPO, params_with, write_params


@pytest.fixture
def pipeline(tiny_pipeline, tmp_path, monkeypatch):
    """A private copy of the tiny pipeline's outputs, as the working directory."""
    shutil.copytree(tiny_pipeline, tmp_path / "p", symlinks=True)
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def fit(folder, changes, out="data/train", live="metrics/train", **kwargs):
    params = load(write_params(folder, changes))
    return train.fit(params, folder / "data/crop/images.npy", folder / "data/resample/train.csv",
                     folder / "data/split/val.csv", folder / out, folder / live, **kwargs)


def logged(folder, live="metrics/train"):
    return json.loads((folder / live / "metrics.json").read_text())


def test_training_logs_per_label_auroc_and_writes_the_best_model(pipeline):
    state = fit(pipeline, {"train": {"epochs": 2}})
    metrics = logged(pipeline)
    for key in ("train_loss", "val_loss", "auroc_micro", "auroc_macro", "lr", "images_per_second"):
        assert key in metrics
    assert set(metrics["auroc"]) <= set(train.tasks.Task("multilabel14", "Fibrosis", 1).names)
    assert len(metrics["auroc"]) >= 10
    assert (pipeline / "metrics/train/plots/metrics/auroc/Effusion.tsv").exists()
    saved = torch.load(pipeline / "data/train/model.pt", weights_only=False)
    assert saved["epoch"] == state.best_epoch and saved["names"][0] == "Atelectasis"


@pytest.mark.parametrize("optimizer, kind", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_each_optimizer_is_the_one_asked_for(pipeline, optimizer, kind, monkeypatch):
    made = []
    real = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    fit(pipeline, {"train": {"epochs": 1, "optimizer": optimizer, "sgd": {"lr": 0.01, "nesterov": True}}})
    assert all(isinstance(o, kind) for o in made)
    if optimizer == "sgd":
        assert made[-1].param_groups[0]["nesterov"] and made[-1].param_groups[0]["lr"] == 0.01


def test_adam_then_sgd_switches_from_the_best_weights(pipeline, monkeypatch):
    made, lines = [], []
    real = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda phase, *a: made.append(phase) or real(phase, *a))
    state = fit(pipeline, {"train": {"epochs": 3, "optimizer": "adam_then_sgd", "switch": {"epoch": 2}}},
                log=lines.append)
    assert made[0] == "adam" and made[-1] == "sgd"
    assert state.phase == "sgd"
    switch = [line for line in lines if "switched from Adam to SGD after epoch 2" in line]
    assert switch and "from the weights of epoch" in switch[0]
    saved = torch.load(pipeline / "data/train/checkpoint.pt", weights_only=False)
    assert "momentum_buffer" in next(iter(saved["optimizer"]["state"].values()))


def test_adam_then_sgd_switches_early_on_a_plateau(pipeline, monkeypatch):
    lines = []
    scores = iter([0.6, 0.5, 0.5, 0.5, 0.5])
    monkeypatch.setattr(train.metrics, "auroc", lambda *a: {"per_label": {}, "micro": 0.5, "macro": next(scores)})
    fit(pipeline, {"train": {"epochs": 5, "optimizer": "adam_then_sgd", "switch": {"epoch": 4, "patience": 2}}},
        log=lines.append)
    assert any("switched from Adam to SGD after epoch 3, from the weights of epoch 1" in line for line in lines)


def test_class_weights_scale_each_label_loss_as_by_hand():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    weights = torch.tensor([1.0, 14.0, 0.5])
    p = torch.sigmoid(logits)
    by_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)) * weights
    assert torch.allclose(train.loss_fn(logits, y, weights, None, "per_label"), by_hand.mean())
    assert not torch.allclose(train.loss_fn(logits, y, torch.ones(3), None, "per_label"), by_hand.mean())


def test_keras_class_weights_weigh_each_image_by_its_first_positive_label():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-0.3, 0.2, 0.9], [0.1, 0.1, 0.1]])
    y = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    weights = torch.tensor([2.0, 14.0, 0.5])
    p = torch.sigmoid(logits)
    per_image = (-(y * torch.log(p) + (1 - y) * torch.log(1 - p))).mean(dim=1)
    # argmax of each multi-hot row: label 1, label 0, label 2, and label 0 for the all-negative row
    by_hand = (per_image * torch.tensor([14.0, 2.0, 0.5, 2.0])).mean()
    assert torch.allclose(train.loss_fn(logits, y, weights, None, "keras"), by_hand)
    assert not torch.allclose(train.loss_fn(logits, y, weights, None, "per_label"), by_hand)


def test_keras_weighting_is_refused_for_one_output():
    with pytest.raises(ParamError) as caught:
        train.check(params_with({"task": {"kind": "binary"}, "train": {"class_weighting": "keras"}}))
    assert caught.value.key == "train.class_weighting"


def test_how_archives_are_fetched_does_not_stop_a_resume(pipeline):
    with pytest.raises(KeyboardInterrupt):
        fit(pipeline, {"train": {"epochs": 2}}, after_epoch=kill_after_first_epoch)
    assert resumes(pipeline, {"train": {"epochs": 2}, "data": {"download": {"workers": 1, "retries": 9}}})


def test_pos_weight_auto_is_negatives_over_positives():
    task = train.tasks.Task("binary", "Fibrosis", 1.0)
    config = train.check(params_with({"task": {"kind": "binary"}, "train": {"pos_weight": "auto"}}))[2]
    y = np.array([[1], [0], [0], [0]], dtype=np.float32)
    _, pos_weight = train.loss_weights(task, config, y, "cpu")
    assert pos_weight.tolist() == [3.0]


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(pipeline):
    settings = {"train": {"epochs": 3, "optimizer": "adam_then_sgd", "switch": {"epoch": 2}}}
    fit(pipeline, settings, out="a", live="live_a")

    def kill(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(pipeline, settings, out="b", live="live_b", after_epoch=kill)
    lines = []
    fit(pipeline, settings, out="b", live="live_b", log=lines.append)
    assert any("resuming after epoch 2" in line for line in lines)
    a, b = logged(pipeline, "live_a"), logged(pipeline, "live_b")
    a.pop("images_per_second"), b.pop("images_per_second")
    assert a == b
    model_a = torch.load(pipeline / "a/model.pt", weights_only=False)["state_dict"]
    model_b = torch.load(pipeline / "b/model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    steps = (pipeline / "live_b/plots/metrics/train_loss.tsv").read_text().split("\n")[1:]
    assert [line.split("\t")[0] for line in steps if line] == ["0", "1", "2"]


def test_processes_must_match_the_launch(pipeline):
    with pytest.raises(ParamError, match="train.processes = 2 .* torchrun"):
        fit(pipeline, {"train": {"processes": 2}})


def kill_after_first_epoch(epoch):
    if epoch == 1:
        raise KeyboardInterrupt


def resumes(folder, settings) -> bool:
    lines = []
    fit(folder, settings, log=lines.append)
    return any("resuming" in line for line in lines)


def test_a_recropped_array_starts_afresh_instead_of_resuming(pipeline):
    settings = {"train": {"epochs": 2}}
    with pytest.raises(KeyboardInterrupt):
        fit(pipeline, settings, after_epoch=kill_after_first_epoch)
    changed = {**settings, "crop": {"fraction": 0.6}}
    crop.main(write_params(pipeline, changed))  # same shape, other pixels
    assert not resumes(pipeline, changed)


def test_new_pixels_of_the_same_shape_and_time_start_afresh(pipeline):
    """The fingerprint reads the packed array's content, not only its shape (or its modification time)."""
    settings = {"train": {"epochs": 2}}
    with pytest.raises(KeyboardInterrupt):
        fit(pipeline, settings, after_epoch=kill_after_first_epoch)
    path = pipeline / "data/crop/images.npy"
    before = path.stat()
    array = np.load(path, mmap_mode="r+")
    array[:] = 255 - array
    array.flush()
    del array
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not resumes(pipeline, settings)


def test_the_same_inputs_resume(pipeline):
    settings = {"train": {"epochs": 2}}
    with pytest.raises(KeyboardInterrupt):
        fit(pipeline, settings, after_epoch=kill_after_first_epoch)
    assert resumes(pipeline, settings)


def test_changed_params_start_afresh_instead_of_resuming(pipeline):
    with pytest.raises(KeyboardInterrupt):
        fit(pipeline, {"train": {"epochs": 2}}, after_epoch=kill_after_first_epoch)
    assert not resumes(pipeline, {"train": {"epochs": 2, "adam": {"lr": 0.0005}}})


def test_a_nan_loss_stops_with_the_epoch_and_step(pipeline, monkeypatch):
    real, calls = train.loss_fn, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "loss_fn", poisoned)
    with pytest.raises(FloatingPointError, match="became nan at epoch 1, step 3"):
        fit(pipeline, {"train": {"epochs": 2}})


@pytest.mark.e2e
def test_two_process_ddp_writes_the_same_metric_keys(pipeline):
    fit(pipeline, {"train": {"epochs": 1}})
    single = logged(pipeline)
    params = write_params(pipeline, {"train": {"epochs": 1, "processes": 2}})
    shutil.rmtree(pipeline / "metrics/train")
    (pipeline / "data/train/checkpoint.pt").unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "stages.train", "--params", params],  # starts its two workers
                          cwd=pipeline, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    double = logged(pipeline)
    assert sorted(double) == sorted(single)
    assert sorted(double["auroc"]) == sorted(single["auroc"])


# ---------------------------------------------------------------- the decisions, without a network

def config_of(changes):
    return train.check(params_with({"train": changes}))[2]


def test_a_better_score_is_the_new_best_and_resets_the_counts():
    state = TrainState(phase="adam").after_epoch(0.6).after_epoch(0.5)
    assert (state.epoch, state.best_epoch, state.bad_epochs, state.improved) == (2, 1, 1, False)
    state = state.after_epoch(0.7)
    assert (state.best_score, state.best_epoch, state.bad_epochs, state.phase_bad_epochs, state.improved) == (0.7, 3, 0, 0, True)


def test_adam_hands_over_to_sgd_at_the_switch_epoch():
    config = config_of({"optimizer": "adam_then_sgd", "epochs": 10, "switch": {"epoch": 3, "patience": 5}})
    state = TrainState.start(config)
    for score in (0.5, 0.6):
        state = state.after_epoch(score)
        assert not state.should_switch(config)
    assert state.after_epoch(0.7).should_switch(config)


def test_adam_hands_over_to_sgd_on_a_plateau():
    config = config_of({"optimizer": "adam_then_sgd", "epochs": 10, "switch": {"epoch": 9, "patience": 2}})
    state = TrainState.start(config).after_epoch(0.6).after_epoch(0.5)
    assert not state.should_switch(config)
    state = state.after_epoch(0.5)
    assert state.should_switch(config)
    switched = state.switched()
    assert switched.phase == "sgd" and switched.phase_bad_epochs == 0 and switched.bad_epochs == 2
    assert not switched.should_switch(config)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_single_optimizer_never_switches(optimizer):
    config = config_of({"optimizer": optimizer, "switch": {"epoch": 1, "patience": 1}})
    state = TrainState.start(config).after_epoch(0.5).after_epoch(0.4)
    assert state.phase == ("sgd" if optimizer == "sgd" else "adam") and not state.should_switch(config)


def test_early_stopping_waits_for_the_sgd_phase_of_adam_then_sgd():
    config = config_of({"optimizer": "adam_then_sgd", "epochs": 30, "early_stopping_patience": 2,
                        "switch": {"epoch": 20, "patience": 10}})
    state = TrainState.start(config).after_epoch(0.6).after_epoch(0.5).after_epoch(0.5)
    assert state.bad_epochs == 2 and not state.should_stop(config)
    assert state.switched().should_stop(config) and state.switched().finished(config)


def test_early_stopping_off_runs_every_epoch():
    config = config_of({"optimizer": "adam", "epochs": 3, "early_stopping_patience": None})
    state = TrainState.start(config)
    for _ in range(2):
        state = state.after_epoch(0.1)
        assert not state.finished(config)
    assert state.after_epoch(0.1).finished(config)


def test_the_score_is_macro_auroc_or_minus_the_loss():
    assert score_of(config_of({"select_by": "auroc_macro"}), 0.3, 0.8) == 0.8
    assert score_of(config_of({"select_by": "auroc_macro"}), 0.3, None) == -0.3  # no label with both classes
    assert score_of(config_of({"select_by": "loss"}), 0.3, 0.8) == -0.3
