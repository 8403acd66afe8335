"""Scoring heatmaps against boxes, as Wang et al. (ChestX-ray8, CVPR 2017) score theirs; and the crop's geometry.

- Geometry: the crop stage keeps the centered square of side `fraction` x the shorter side and resizes
  it to `size` pixels; `Crop` maps boxes and points between the original image's pixels and the
  packed image's, both ways (a box partly outside the square is clipped to it).
- Boxes from a heatmap (Wang et al.'s "B-Box generation"): the heatmap scaled to [0, 1] (their [0, 255]),
  binarised at each threshold (theirs: 60 and 180 of 255), one box around each connected region.
- Scores of a true box: the best IoBB (intersection over the predicted box's area) and the best IoU
  over the predicted boxes; a true box is localized at T when its score exceeds T (accuracy = the
  share of true boxes localized). The pointing game: the centre of the heatmap's highest cell (at its
  own grid, before upsampling) lies inside a true box of that finding (per image and finding).
Boxes are [x, y, w, h] rows (NIH's form) in pixels, x right and y down, a pixel i spanning [i, i + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Wang et al. 2017, Table 3: accuracy of their heatmap boxes on NIH's 984 boxes (ResNet-50, their best model).
WANG_2017 = {
    "iobb": {
        "0.1": {"Atelectasis": 0.7277, "Cardiomegaly": 0.9931, "Effusion": 0.7124, "Infiltration": 0.7886,
                "Mass": 0.4352, "Nodule": 0.1645, "Pneumonia": 0.7500, "Pneumothorax": 0.4591},
        "0.25": {"Atelectasis": 0.5500, "Cardiomegaly": 0.9794, "Effusion": 0.5424, "Infiltration": 0.5772,
                 "Mass": 0.2823, "Nodule": 0.0506, "Pneumonia": 0.5583, "Pneumothorax": 0.3469},
    },
}


@dataclass(frozen=True)
class Crop:
    """The crop stage's transform of one image: `width` x `height` original pixels -> `size` x `size` packed."""

    width: float
    height: float
    fraction: float
    size: int

    @property
    def side(self) -> float:
        return self.fraction * min(self.width, self.height)

    @property
    def origin(self) -> tuple[float, float]:
        """The square's top-left corner in original pixels (as cxr14.images.crop_resize places it)."""
        return (self.width - self.side) / 2, (self.height - self.side) / 2

    @property
    def scale(self) -> float:
        """Packed pixels per original pixel."""
        return self.size / self.side

    def to_packed(self, boxes: np.ndarray) -> np.ndarray:
        """Original [x, y, w, h] -> packed, clipped to the packed image (a box wholly outside: w = h = 0)."""
        corners = _corners(boxes)
        left, top = self.origin
        corners = (corners - [left, top, left, top]) * self.scale
        return _boxes(np.clip(corners, 0, self.size))

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Packed [x, y, w, h] -> original pixels."""
        boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
        left, top = self.origin
        return np.column_stack([boxes[:, 0] / self.scale + left, boxes[:, 1] / self.scale + top,
                                boxes[:, 2] / self.scale, boxes[:, 3] / self.scale])

    def point_to_original(self, point: tuple[float, float] | None) -> tuple[float, float] | None:
        if point is None:
            return None
        left, top = self.origin
        return point[0] / self.scale + left, point[1] / self.scale + top


def _corners(boxes: np.ndarray) -> np.ndarray:
    """[x, y, w, h] -> [x0, y0, x1, y1]."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    return np.column_stack([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]])


def _boxes(corners: np.ndarray) -> np.ndarray:
    """[x0, y0, x1, y1] -> [x, y, w, h]."""
    return np.column_stack([corners[:, :2], np.maximum(corners[:, 2:] - corners[:, :2], 0)])


def heatmap_boxes(heatmap: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Boxes [K, 4] around the connected regions of the heatmap at or above each threshold (a share of its
    maximum, the heatmap scaled to [0, 1] first), every threshold's boxes together. A flat zero map has none."""
    heatmap = np.asarray(heatmap, dtype=float)
    peak = heatmap.max() if heatmap.size else 0.0
    found = []
    if peak > 0:
        for threshold in thresholds:
            regions, count = ndimage.label(heatmap / peak >= threshold)
            for rows, columns in ndimage.find_objects(regions)[:count]:
                found.append([columns.start, rows.start, columns.stop - columns.start, rows.stop - rows.start])
    return np.asarray(found, dtype=float).reshape(-1, 4)


def intersection(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Areas [K] of the predicted boxes [K, 4] within one true box [4]."""
    p, t = _corners(predicted), _corners(truth)[0]
    w = np.clip(np.minimum(p[:, 2], t[2]) - np.maximum(p[:, 0], t[0]), 0, None)
    h = np.clip(np.minimum(p[:, 3], t[3]) - np.maximum(p[:, 1], t[1]), 0, None)
    return w * h


def iobb(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Intersection over each predicted box's own area (Wang et al.'s IoBB)."""
    predicted = np.asarray(predicted, dtype=float).reshape(-1, 4)
    area = predicted[:, 2] * predicted[:, 3]
    return np.divide(intersection(predicted, truth), area, out=np.zeros(len(predicted)), where=area > 0)


def iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Intersection over union of each predicted box with the true box."""
    predicted = np.asarray(predicted, dtype=float).reshape(-1, 4)
    truth = np.asarray(truth, dtype=float).reshape(4)
    inter = intersection(predicted, truth)
    union = predicted[:, 2] * predicted[:, 3] + truth[2] * truth[3] - inter
    return np.divide(inter, union, out=np.zeros(len(predicted)), where=union > 0)


def best(scores: np.ndarray) -> float:
    """The best score over the predicted boxes; 0 when there are none."""
    return float(np.max(scores)) if len(scores) else 0.0


def peak(heatmap: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the centre of the heatmap's highest pixel; None for a map without any (all zero: no evidence).
    A flat top (bilinear upsampling makes one at the border) counts as the centre of its pixels, not its first."""
    heatmap = np.asarray(heatmap, dtype=float)
    top = heatmap.max() if heatmap.size else 0.0
    if top <= 0:
        return None
    rows, columns = np.nonzero(heatmap >= top)
    return float(columns.mean()) + 0.5, float(rows.mean()) + 0.5


def inside(point: tuple[float, float] | None, boxes: np.ndarray) -> bool:
    """Whether the point (x, y) lies in any of the boxes [K, 4]; no point is in none."""
    if point is None:
        return False
    x, y = point
    c = _corners(boxes)
    return bool(np.any((c[:, 0] <= x) & (x <= c[:, 2]) & (c[:, 1] <= y) & (y <= c[:, 3])))


def accuracy(scores: np.ndarray, thresholds: list[float]) -> dict[str, float | None]:
    """The share of scores above each threshold T, keyed by T as written (None without scores)."""
    scores = np.asarray(scores, dtype=float)
    return {f"{t:g}": (float(np.mean(scores > t)) if len(scores) else None) for t in thresholds}


def random_heatmaps(keys: list[int], grid: tuple[int, int], seed: int) -> np.ndarray:
    """The baseline: a uniform random map [len(keys), h, w] at a heatmap's own grid (the target layer's), each
    seeded by (seed, its key); upsampled as a real heatmap is, its blobs have a real heatmap's size."""
    return np.stack([np.random.default_rng([seed, 12, int(k)]).random(grid) for k in keys]) if len(keys) else \
        np.zeros((0, *grid))


def table_rows(result: dict, findings: list[str]) -> list[list[str]]:
    """The localization table's rows (a header first): per finding and the mean over findings, ours beside the
    random map's and Wang et al.'s figures."""
    model, rand, wang = result["model"], result["random"], result["wang_2017"]["iobb"]

    def figure(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [["finding", "boxes", "IoBB>0.1", "random", "Wang", "IoBB>0.25", "random", "Wang", "IoU>0.5", "random",
             "pointing", "random"]]
    for name in [f for f in findings if f in model["boxes"]] + ["mean"]:
        count = model["boxes"].get(name, sum(model["boxes"].values()))
        row = [name, str(count)]
        for t in ("0.1", "0.25"):
            reference = wang[t].get(name) if name != "mean" else \
                float(np.mean([wang[t][f] for f in findings if f in model["boxes"]]))
            row += [figure(model["accuracy_iobb"].get(t, {}).get(name)), figure(rand["accuracy_iobb"].get(t, {}).get(name)),
                    figure(reference)]
        row += [figure(model["accuracy_iou"].get("0.5", {}).get(name)), figure(rand["accuracy_iou"].get("0.5", {}).get(name)),
                figure(model["pointing"].get(name)), figure(rand["pointing"].get(name))]
        rows.append(row)
    return rows


MEANINGFUL_GRID = 7  # heatmap cells a side below which the localization table is not printed (DenseNet at 224 px: 7)


def print_table(result: dict, findings: list[str], title: str = "localization") -> None:
    """metrics/localize.json as a table (see table_rows); or its note when nothing was scored."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    if not result["boxes_scored"]:
        console.print(f"{title}: {result['note']}")
        return
    grid = result.get("heatmap_grid") or [MEANINGFUL_GRID] * 2
    if min(grid) < MEANINGFUL_GRID:  # the demo's 64 px resnet18: 2 x 2 cells cannot place a box
        console.print(f"{title}: not shown: the heatmap is a {grid[0]} x {grid[1]} grid, too coarse to place a box "
                      f"(at least {MEANINGFUL_GRID} x {MEANINGFUL_GRID} is needed: CheXNet's DenseNet-121 at 224 px). "
                      "Its scores are still in metrics/localize.json and plots/localize/; train at a larger "
                      "crop.pixels (or model.input_size) to see where the model looks.")
        return
    header, *rows = table_rows(result, findings)
    table = Table(title=f"{title} ({result['method']}): {result['boxes_scored']} boxes on {result['images_scored']} test "
                        "images; accuracy of the heatmap's boxes, a random map's, Wang et al. 2017's (NIH, ResNet-50)")
    for column in header:
        table.add_column(column, justify="left" if column == "finding" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
