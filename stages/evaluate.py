"""Stage 7, evaluate: the best checkpoint on the test part.

Writes metrics/evaluate.json (loss; per-label AUROC and AUPRC with micro/macro averages; 95%
bootstrap intervals resampled by patient; sensitivity, specificity, precision and F1 at thresholds
chosen on the validation part; expected calibration error per label, equal-width and equal-mass bins;
for `binary`, the report's confusion matrix and scores),
data/evaluate/predictions.csv, and plots/evaluate/ (dvclive: ROC and precision-recall curves per
label, the confusion matrix, per-label AUROC bars, precision and recall against threshold, reliability curves).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from dvclive import Live

from cxr14 import gpus, metrics, model_file, packed_images, tasks
from cxr14.atomic import read_csv, write_csv, write_json
from cxr14.batches import Batches, batch_order
from cxr14.params import PARAMS_FILE, ParamError, check_number, load, section, seed
from cxr14.runtime import DEVICES, Runtime, decide, predict

THRESHOLD_RULES = ("f1", "pr_crossing")


def check(params: dict) -> tuple[tasks.Task, dict]:
    task = tasks.check(params)
    settings = section(params, "evaluate")
    config = {
        "bootstrap": settings.number("bootstrap", low=0, integer=True),
        "threshold": threshold_rule(settings.get("threshold")),
        "batch_size": settings.number("batch_size", low=1, integer=True),
        "device": settings.choice("device", DEVICES),
        "calibration_bins": settings.number("calibration_bins", low=1, integer=True),
        "seed": seed(params),
    }
    settings.finish()
    return task, config


def threshold_rule(value) -> str | float:
    """evaluate.threshold: a rule that picks each label's threshold on validation, or one fixed number."""
    if value in THRESHOLD_RULES:
        return value
    valid = "one of " + ", ".join(THRESHOLD_RULES) + ", or a fixed threshold between 0 and 1 such as 0.91"
    if isinstance(value, str):
        raise ParamError("evaluate.threshold", value, valid)
    try:
        return check_number("evaluate.threshold", value, low=0, high=1, low_open=True)
    except ParamError:
        raise ParamError("evaluate.threshold", value, valid) from None


def load_model(path: Path, task: tasks.Task, device: str) -> tuple[torch.nn.Module, int, Runtime]:
    """The trained network, its input side, and the runtime to run it in: evaluate.device, and the
    precision it was trained with (train.precision, recorded in the model file)."""
    trained = model_file.load(path)
    if trained.task != asdict(task):
        raise ParamError("task", asdict(task), f"the task the model in {path} was trained for: {trained.task}")
    runtime = decide(device, trained.precision, key="evaluate.device")
    return runtime.place(trained.net).eval(), trained.input_size, runtime


def top_label_confusion(y: np.ndarray, p: np.ndarray, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The report's multi-label confusion matrix: each true label of an image against its top prediction."""
    top = p.argmax(axis=1)
    image, label = np.nonzero(y)
    return [names[j] for j in label], [names[j] for j in top[image]]


def evaluate(task: tasks.Task, config: dict, y_val, p_val, y, p, loss: float, patients: np.ndarray) -> dict:
    names = task.names
    roc, prc = metrics.auroc(y, p, names), metrics.auprc(y, p, names)
    result = {
        "images": len(y), "loss": loss,
        "auroc": roc["per_label"], "auroc_micro": roc["micro"], "auroc_macro": roc["macro"],
        "auprc": prc["per_label"], "auprc_macro": prc["macro"],
        "positives": {n: int(v) for n, v in zip(names, y.sum(axis=0))},
    }
    calibration = metrics.calibration(y, p, names, config["calibration_bins"])
    result.update({k: calibration[k] for k in ("ece", "ece_macro", "ece_adaptive", "ece_adaptive_macro")})
    if config["bootstrap"]:
        ci = metrics.bootstrap_auroc(y, p, patients, config["bootstrap"], config["seed"])
        result["auroc_ci"] = dict(zip(names, ci["per_label"]))
        result["auroc_macro_ci"] = ci["macro"]
    result["at_threshold"] = {
        n: metrics.at_threshold(y[:, j], p[:, j], metrics.choose_threshold(y_val[:, j], p_val[:, j], config["threshold"]))
        for j, n in enumerate(names)}
    if task.kind == "binary":
        scores = result["at_threshold"][task.target]
        result["binary"] = {"threshold": scores["threshold"], "accuracy": scores["accuracy"],
                            "precision": scores["precision"], "recall": scores["sensitivity"], "f1": scores["f1"],
                            "auroc": roc["per_label"][task.target],
                            "confusion": {k: scores[k] for k in ("tn", "fp", "fn", "tp")}}
    return result


def reliability_points(names: tuple[str, ...], y: np.ndarray, p: np.ndarray, bins: int) -> list[dict]:
    """Each label's equal-width reliability curve as rows (label, mean predicted, observed frequency, images)."""
    rows = []
    for j, name in enumerate(names):
        curve = metrics.reliability(y[:, j], p[:, j], bins)
        rows += [{"label": name, "mean_predicted": float(a), "observed": float(b), "images": int(n)}
                 for a, b, n in zip(curve["predicted"], curve["observed"], curve["count"])]
    return rows


def write_plots(live_dir: Path, task: tasks.Task, result: dict, y_val, p_val, y, p, bins: int) -> None:
    live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None)
    names = task.names
    for j, name in enumerate(names):
        if 0 < y[:, j].sum() < len(y):
            live.log_sklearn_plot("roc", y[:, j], p[:, j], name=f"roc/{name}", drop_intermediate=True)
            live.log_sklearn_plot("precision_recall", y[:, j], p[:, j], name=f"precision_recall/{name}",
                                  drop_intermediate=True)
    bars = [{"label": n, "auroc": round(v, 4)} for n, v in result["auroc"].items() if v is not None]
    live.log_plot("auroc_by_label", bars, x="auroc", y="label", template="bar_horizontal",
                  title="test AUROC by label")
    live.log_plot("calibration", reliability_points(names, y, p, bins), x="mean_predicted", y="observed",
                  template="reliability", title="test reliability: observed frequency by mean predicted probability")
    if task.kind == "binary":
        actual = np.where(y[:, 0] == 1, task.target, "other")
        predicted = np.where(p[:, 0] >= result["binary"]["threshold"], task.target, "other")
        live.log_sklearn_plot("confusion_matrix", actual.tolist(), predicted.tolist(), name="confusion_matrix")
    else:
        actual, predicted = top_label_confusion(y, p, names)
        live.log_sklearn_plot("confusion_matrix", actual, predicted, name="confusion_matrix")
    # The report picks the binary threshold from this curve; for several labels it pools them all.
    precision, recall, thresholds = metrics.precision_recall_curve(y_val.ravel(), p_val.ravel())
    step = max(1, len(thresholds) // 200)
    live.log_plot("threshold", [{"threshold": float(t), "precision": float(a), "recall": float(b)}
                                for t, a, b in zip(thresholds[::step], precision[::step], recall[::step])],
                  x="threshold", y=["precision", "recall"])
    live.end()


def main(params_path: str = PARAMS_FILE, cropped: Path = Path("data/crop"), split_dir: Path = Path("data/split"),
         model_path: Path = Path(model_file.PATH), out: Path = Path("data/evaluate"),
         metrics_path: Path = Path("metrics/evaluate.json"), live_dir: Path = Path("plots/evaluate")) -> None:
    task, config = check(load(params_path))
    with gpus.held(config["device"], 1, "evaluate.device"):  # a GPU of its own while it predicts (cxr14/gpus.py)
        net, size, runtime = load_model(model_path, task, config["device"])
        images = packed_images.load(cropped / packed_images.IMAGES_FILE)
        parts = {}
        for part in ("val", "test"):
            rows = tasks.select(read_csv(split_dir / f"{part}.csv"), task, part, config["seed"])
            batches = Batches(images, rows["row"].to_numpy(), tasks.targets(rows, task),
                              batch_order(len(rows), config["batch_size"], None), runtime.device)
            parts[part] = (rows, *predict(net, batches, size, runtime))
    (_, y_val, p_val, _), (test, y, p, loss) = parts["val"], parts["test"]
    result = evaluate(task, config, y_val, p_val, y, p, loss, test["patient_id"].to_numpy())
    predictions = test[["image", "patient_id", "labels"]].copy()
    for j, name in enumerate(task.names):
        predictions[f"p_{name}"] = p[:, j]  # full precision: every metric can be recomputed exactly
    write_csv(out / "predictions.csv", predictions)
    write_json(metrics_path, result)
    write_plots(live_dir, task, result, y_val, p_val, y, p, config["calibration_bins"])
    metrics.print_table(task, result)


if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.evaluate")
