"""Stage 8, localize: where the model looks, scored against the boxes of NIH's BBox_List_2017.

For every test image (data/split/test.csv) that has boxes (data/raw/bboxes.csv: NIH's radiologist boxes, or
the synthetic signs' extents), the heatmap of each boxed finding (localize.method: Grad-CAM, or plain CAM
where the network allows it) is mapped back through the crop to the original image's pixels and scored
as Wang et al. (ChestX-ray8, CVPR 2017) score theirs: boxes around the heatmap's regions above each
threshold, a true box localized when its best IoBB (or IoU) exceeds T; and the pointing game (the
centre of the heatmap's highest cell inside a true box). A seeded random heatmap at the same grid, through
the same pipeline, is the baseline beside it. Test images without boxes are skipped and counted; so are
findings the model does not predict (a binary task's other findings).

Outputs: metrics/localize.json (per finding and averaged over findings; Wang et al.'s figures beside),
plots/localize/ (gallery.json and images/*.png, a gallery of overlays: the image, the heatmap, the true
boxes in green and the heatmap's boxes in red; the best, a typical and the worst image of each finding by IoU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import ImageDraw

from cxr14 import backbones, boxes, cam, gpus, localize, model_file, models, packed_images, progress
from cxr14.atomic import atomic_path, read_csv, write_json
from cxr14.batches import prepare
from cxr14.params import PARAMS_FILE, ParamError, Section, check_number, load, section, seed
from cxr14.runtime import DEVICES, decide

NIH_SIDE = 1024  # NIH's PNGs, and the coordinates of its box list, are 1024 x 1024 pixels
KINDS = ("best", "typical", "worst")
GALLERY_IMAGES = "images"  # plots/localize/images/*.png: an image plot in dvc.yaml


@dataclass
class LocalizeConfig:
    method: str
    thresholds: list[float]       # heatmap binarisation, shares of its maximum
    iobb_thresholds: list[float]  # T(IoBB)
    iou_thresholds: list[float]   # T(IoU)
    findings: list[str]
    gallery: int                  # images of each kind (best, typical, worst) per finding
    batch_size: int
    device: str
    seed: int
    fraction: float               # crop.fraction: the crop to invert
    original_side: int            # the original images' side: NIH's 1024, or data.synthetic.image_size


def _fractions(section: Section, name: str) -> list[float]:
    values = section.get(name)
    valid = "a non-empty list of numbers between 0 and 1, such as [0.1, 0.25, 0.5]"
    if not isinstance(values, list) or not values:
        raise ParamError(section.key(name), values, valid)
    try:
        return [check_number(section.key(name), v, low=0, high=1) for v in values]
    except ParamError:
        raise ParamError(section.key(name), values, valid) from None


def check(params: dict) -> LocalizeConfig:
    settings = section(params, "localize")
    method = settings.choice("method", cam.METHODS)
    findings = settings.get("findings")
    if not isinstance(findings, list) or not findings or any(f not in boxes.BOXED_FINDINGS for f in findings):
        raise ParamError("localize.findings", findings, "a non-empty list of NIH's boxed findings: "
                         + ", ".join(boxes.BOXED_FINDINGS))
    config = LocalizeConfig(
        method=method,
        thresholds=_fractions(settings, "thresholds"),
        iobb_thresholds=_fractions(settings, "iobb_thresholds"),
        iou_thresholds=_fractions(settings, "iou_thresholds"),
        findings=findings,
        gallery=settings.number("gallery", low=0, integer=True),
        batch_size=settings.number("batch_size", low=1, integer=True),
        device=settings.choice("device", DEVICES),
        seed=seed(params),
        fraction=section(params, "crop").number("fraction", low=0, high=1, low_open=True),
        original_side=_original_side(params),
    )
    settings.finish()
    model = models.check(params)
    if method == "cam" and (model.hidden or model.top not in backbones.get(model.backbone).cam_tops):
        raise ParamError("localize.method", "cam", "gradcam: plain CAM needs the pooled conv features followed by one "
                         f"linear layer, and the model has model.head.hidden = {model.hidden}, model.top = {model.top} "
                         f"({model.backbone}); set model.head.hidden: [] (and model.top: pooled for "
                         f"{' and '.join(backbones.pooled_for_cam())}) or use gradcam")
    return config


def _original_side(params: dict) -> int:
    data = section(params, "data")
    if data.get("source") == "synthetic":
        return data.section("synthetic").number("image_size", low=8, integer=True)
    return NIH_SIDE


def load_model(path: Path, device: str) -> tuple[model_file.TrainedModel, torch.device]:
    """The trained model, its network in eval mode in fp32 (gradients want it) on localize.device; that device."""
    trained = model_file.load(path)
    where = decide(device, "fp32", key="localize.device").device
    trained.net.to(where)
    return trained, where


def pairs_to_score(test: pd.DataFrame, truth: pd.DataFrame, names: list[str], findings: list[str]) -> tuple[pd.DataFrame, dict]:
    """The (image, finding) pairs to score: test images with boxes of a wanted finding that the model predicts."""
    wanted = truth[truth["label"].isin(findings)]
    in_test = wanted[wanted["image"].isin(set(test["image"]))]
    predicted = in_test[in_test["label"].isin(names)]
    pairs = predicted[["image", "label"]].drop_duplicates().merge(test[["image", "row"]], on="image")
    counts = {
        "test_images": len(test),
        "test_images_with_boxes": int(in_test["image"].nunique()),
        "test_images_without_boxes": len(test) - int(in_test["image"].nunique()),
        "boxes_listed": len(wanted),
        "boxes_not_in_test": len(wanted) - len(in_test),
        "findings_not_predicted": sorted(set(findings) - set(names)),
    }
    return pairs.sort_values(["label", "image"], ignore_index=True), counts


def heatmaps(model: model_file.TrainedModel, images, pairs: pd.DataFrame, device: torch.device,
             method: str) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's heatmap at the target layer's grid [n, h, w], and upsampled to the packed side S [n, S, S]."""
    x = torch.from_numpy(np.ascontiguousarray(images[pairs["row"].to_numpy()])).unsqueeze(1).to(device)
    grid = cam.class_heatmaps(model.net, model.config.backbone, prepare(x, model.input_size, None, None),
                              [model.names.index(n) for n in pairs["label"]], method, upsample=False)
    return grid.cpu().numpy(), _resize(grid, images.shape[-1]).cpu().numpy()


def score_all(model: model_file.TrainedModel, images, pairs: pd.DataFrame, device: torch.device, truth: pd.DataFrame,
              crop: localize.Crop, config: LocalizeConfig, bar, task) -> tuple[pd.DataFrame, pd.DataFrame, tuple[int, int]]:
    """Scores of the heatmaps and of the random baseline, batch by batch (no heatmap is kept), and the heatmap grid."""
    grid = feature_grid(model, device, config.method)
    grouped = boxes_by_pair(truth)
    ours, chance = [], []
    for start in range(0, len(pairs), config.batch_size):
        chunk = pairs.iloc[start:start + config.batch_size]
        keys = list(range(start, start + len(chunk)))
        ours.append(score(chunk, keys, *heatmaps(model, images, chunk, device, config.method), grouped, crop, config))
        noise = localize.random_heatmaps(keys, grid, config.seed)
        chance.append(score(chunk, keys, noise, _resize(torch.from_numpy(noise).float(), images.shape[-1]).numpy(),
                            grouped, crop, config))
        bar.advance(task)
    return pd.concat(ours, ignore_index=True), pd.concat(chance, ignore_index=True), grid


def feature_grid(model: model_file.TrainedModel, device: torch.device, method: str) -> tuple[int, int]:
    """The spatial size of the heatmap's layer for the network's input side (the random baseline is drawn at it)."""
    seen = []
    layer = cam.target_layer(model.net, model.config.backbone, method)
    handle = layer.register_forward_hook(lambda m, a, output: seen.append(output.shape[-2:]))
    try:
        with torch.no_grad():
            model.net(torch.zeros(1, 3, model.input_size, model.input_size, device=device))
    finally:
        handle.remove()
    return tuple(int(v) for v in seen[0])


def _resize(maps: torch.Tensor, side: int) -> torch.Tensor:
    if maps.shape[-1] == side:
        return maps
    return F.interpolate(maps[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]


def pointer(grid_map: np.ndarray, side: int) -> tuple[float, float] | None:
    """Where a heatmap points, in packed pixels: the centre of its highest cell at its own grid."""
    point = localize.peak(grid_map)
    return None if point is None else (point[0] * side / grid_map.shape[1], point[1] * side / grid_map.shape[0])


def boxes_by_pair(truth: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """The true boxes [K, 4] of each (image, finding)."""
    return {key: rows[["x", "y", "w", "h"]].to_numpy() for key, rows in truth.groupby(["image", "label"])}


def score(pairs: pd.DataFrame, keys: list[int], grid_maps: np.ndarray, maps: np.ndarray,
          grouped: dict[tuple[str, str], np.ndarray], crop: localize.Crop, config: LocalizeConfig) -> pd.DataFrame:
    """One row per true box: its best IoBB and IoU over the boxes of the heatmap (upsampled: `maps`), and whether
    the heatmap (at its grid) points into a box of that finding (the same for every box of the pair)."""
    rows = []
    for i, key, pair in zip(range(len(pairs)), keys, pairs.itertuples(index=False)):
        true = grouped[(pair.image, pair.label)]
        predicted = crop.to_original(localize.heatmap_boxes(maps[i], config.thresholds))
        hit = localize.inside(crop.point_to_original(pointer(grid_maps[i], maps.shape[-1])), true)
        for box in true:
            rows.append({"pair": key, "image": pair.image, "label": pair.label,
                         "iobb": localize.best(localize.iobb(predicted, box)),
                         "iou": localize.best(localize.iou(predicted, box)), "pointing": hit})
    return pd.DataFrame(rows, columns=["pair", "image", "label", "iobb", "iou", "pointing"])


def summarize(scores: pd.DataFrame, findings: list[str], config: LocalizeConfig) -> dict:
    """Per finding and the mean over findings: accuracy at each T(IoBB) and T(IoU), mean IoBB and IoU, pointing."""
    present = [f for f in findings if f in set(scores["label"])]
    out: dict = {"boxes": {f: int((scores["label"] == f).sum()) for f in present}}
    per = {f: scores[scores["label"] == f] for f in present}

    def with_mean(values: dict) -> dict:
        kept = [v for v in values.values() if v is not None]
        return {**values, "mean": float(np.mean(kept)) if kept else None}

    out["pointing"] = with_mean({f: float(rows.drop_duplicates("pair")["pointing"].mean()) for f, rows in per.items()})
    for kind, thresholds in (("iobb", config.iobb_thresholds), ("iou", config.iou_thresholds)):
        by_t = {f: localize.accuracy(rows[kind].to_numpy(), thresholds) for f, rows in per.items()}
        out[f"accuracy_{kind}"] = {f"{t:g}": with_mean({f: by_t[f][f"{t:g}"] for f in present}) for t in thresholds}
        out[f"mean_{kind}"] = with_mean({f: float(rows[kind].mean()) for f, rows in per.items()})
    return out


def gallery_picks(scores: pd.DataFrame, count: int) -> list[tuple[str, str, int]]:
    """(finding, kind, pair) for the best, a typical (median) and the worst pairs of each finding by IoU."""
    picks = []
    per_pair = scores.groupby(["label", "pair"], as_index=False)["iou"].max()
    for label, rows in per_pair.groupby("label"):
        ordered = rows.sort_values(["iou", "pair"], ascending=[False, True])["pair"].tolist()
        middle = max(0, len(ordered) // 2 - count // 2)
        chosen = {"best": ordered[:count], "typical": ordered[middle:middle + count], "worst": ordered[::-1][:count]}
        picks += [(label, kind, pair) for kind in KINDS for pair in chosen[kind]]
    return picks


def draw(image: np.ndarray, heatmap: np.ndarray, point, true: np.ndarray, predicted: np.ndarray, caption: str,
         scale: int):
    """The overlay at `scale` x the packed side: true boxes green, the heatmap's boxes red, where it points a white cross."""
    picture = cam.overlay(image, heatmap)
    picture = picture.resize((picture.width * scale, picture.height * scale))
    pen = ImageDraw.Draw(picture)
    for boxes_, color, width in ((predicted, (255, 40, 40), 1), (true, (40, 255, 40), 2)):
        for x, y, w, h in boxes_ * scale:
            if w > 0 and h > 0:
                pen.rectangle([x, y, x + w - 1, y + h - 1], outline=color, width=width)
    if point is not None:
        px, py = point[0] * scale, point[1] * scale
        pen.line([px - 4, py, px + 4, py], fill=(255, 255, 255))
        pen.line([px, py - 4, px, py + 4], fill=(255, 255, 255))
    pen.text((3, 2), caption, fill=(255, 255, 255))
    return picture


def write_gallery(folder: Path, picks: list[tuple[str, str, int]], grid_maps: np.ndarray, maps: np.ndarray,
                  pairs: pd.DataFrame, images, truth: pd.DataFrame, scores: pd.DataFrame, crop: localize.Crop,
                  config: LocalizeConfig) -> list[dict]:
    """The picked pairs' overlays as PNGs in folder/images (their heatmaps at their grid and upsampled, in the
    order of `picks`), and gallery.json listing them. A file is named by finding, kind and number, not by the
    image, so that `dvc plots diff` shows two experiments' overlays side by side (dvc.yaml's image plot)."""
    pictures = folder / GALLERY_IMAGES
    if pictures.exists():
        for old in pictures.glob("*.png"):
            old.unlink()
    pictures.mkdir(parents=True, exist_ok=True)
    grouped = boxes_by_pair(truth)
    scale = max(1, 256 // images.shape[-1])
    listed = []
    for (label, kind, pair), grid_map, heatmap in zip(picks, grid_maps, maps):
        row = pairs.iloc[pair]
        true = crop.to_packed(grouped[(row.image, label)])
        predicted = localize.heatmap_boxes(heatmap, config.thresholds)
        mine = scores[scores["pair"] == pair]
        number = sum(e["finding"] == label and e["kind"] == kind for e in listed) + 1
        entry = {"file": f"{GALLERY_IMAGES}/{label}_{kind}_{number}.png", "image": row.image, "finding": label,
                 "kind": kind, "iou": float(mine["iou"].max()), "iobb": float(mine["iobb"].max()),
                 "pointing": bool(mine["pointing"].any())}
        caption = f"{label} ({kind}) {Path(row.image).stem}: IoU {entry['iou']:.2f}, IoBB {entry['iobb']:.2f}"
        with atomic_path(folder / entry["file"]) as tmp:
            draw(images[row.row], heatmap, pointer(grid_map, heatmap.shape[-1]), true, predicted, caption,
                 scale).save(tmp, format="PNG")
        listed.append(entry)
    write_json(folder / "gallery.json", {"method": config.method, "images": listed})
    return listed


def empty_result(config: LocalizeConfig, counts: dict, note: str) -> dict:
    return {"method": config.method, **counts, "boxes_scored": 0, "note": note,
            "model": {}, "random": {}, "wang_2017": localize.WANG_2017}


def main(params_path: str = PARAMS_FILE, cropped: Path = Path("data/crop"), split_dir: Path = Path("data/split"),
         raw: Path = Path("data/raw"), model_path: Path = Path(model_file.PATH),
         metrics_path: Path = Path("metrics/localize.json"), gallery_dir: Path = Path("plots/localize")) -> None:
    config = check(load(params_path))
    truth = boxes.read(raw / "bboxes.csv")
    test = read_csv(split_dir / "test.csv")
    images = packed_images.load(cropped / packed_images.IMAGES_FILE)
    crop = localize.Crop(config.original_side, config.original_side, config.fraction, images.shape[-1])
    with gpus.held(config.device, 1, "localize.device"):
        model, device = load_model(model_path, config.device)
        names = list(model.names)
        pairs, counts = pairs_to_score(test, truth, names, config.findings)
        truth = truth[truth["label"].isin(config.findings)]
        for name in counts["findings_not_predicted"]:
            print(f"localize: {name} is not one of the model's outputs ({', '.join(names)}): its boxes are skipped")
        if pairs.empty:
            note = ("no test image has a box of a finding the model predicts" if counts["test_images_with_boxes"]
                    else "no test image has a box: nothing to score")
            result = empty_result(config, counts, note)
            write_json(metrics_path, result)
            write_gallery(gallery_dir, [], [], [], pairs, images, truth, None, crop, config)
            print(f"localize: {note} ({counts['test_images']} test images; {counts['boxes_listed']} boxes listed, "
                  f"{counts['boxes_not_in_test']} of them on images outside the test part)")
            return
        with progress.items() as bar:
            task = bar.add_task(f"localize: {config.method} heatmaps", total=-(-len(pairs) // config.batch_size))
            scores, random_scores, grid = score_all(model, images, pairs, device, truth, crop, config, bar, task)
        picks = gallery_picks(scores, config.gallery)
        chosen = pairs.iloc[[pair for _, _, pair in picks]]
        drawn = [heatmaps(model, images, chosen.iloc[i:i + config.batch_size], device, config.method)
                 for i in range(0, len(chosen), config.batch_size)]
    result = {"method": config.method, **counts, "boxes_scored": len(scores), "images_scored": int(pairs["image"].nunique()),
              "heatmap_grid": list(grid), "note": "",
              "model": summarize(scores, config.findings, config),
              "random": summarize(random_scores, config.findings, config),
              "wang_2017": localize.WANG_2017}
    write_json(metrics_path, result)
    write_gallery(gallery_dir, picks, [g for grid_maps, _ in drawn for g in grid_maps],
                  [m for _, maps in drawn for m in maps], pairs, images, truth, scores, crop, config)
    localize.print_table(result, config.findings)
    print(f"localize: {counts['test_images_without_boxes']} test images without boxes skipped; "
          f"{counts['boxes_not_in_test']} listed boxes are on images outside the test part")

if __name__ == "__main__":
    from cxr14.stage import command_line

    command_line("stages.localize")
