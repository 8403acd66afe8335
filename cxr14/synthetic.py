"""An NIH-shaped synthetic data set: real metadata rows, chest-like images with a sign per finding.

Whole patients are drawn from the real metadata (so follow-ups, views, label combinations and the
label imbalance behave as in NIH), optionally stratified so that every label has enough positives.
Each image is drawn from its own seed (the data set seed and the image name), so the same seed
gives the same bytes whatever the worker count. Every finding leaves its own visual sign, at a
strength drawn per image, on a chest whose anatomy is fixed per patient. Images on the Azure
blacklist come out rotated, degraded or as a lateral-like view, as they are in the real set.

`render_with_boxes` also gives the extent of each drawn sign of the eight findings that NIH boxed
(BBox_List_2017), in the image's pixel coordinates: what a radiologist would have boxed.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from cxr14.labels import FINDINGS, split_labels


def draw_patients(metadata: pd.DataFrame, images: int, min_positives: int, max_images_per_patient: int,
                  seed: int) -> pd.DataFrame:
    """Draw whole patients until `images` rows; first, the rarest labels up to `min_positives` each."""
    rng = np.random.default_rng([seed, 1])
    per_patient = metadata.groupby("patient_id")["image"].transform("size")
    pool = metadata[per_patient <= max_images_per_patient]
    patients = pool["patient_id"].unique()
    rng.shuffle(patients)
    order = {pid: i for i, pid in enumerate(patients)}
    chosen: list[int] = []
    taken: set[int] = set()
    total = 0
    if min_positives > 0:
        carries = {name: pool["labels"].str.contains(name, regex=False) for name in FINDINGS}
        for name in sorted(FINDINGS, key=lambda n: int(carries[n].sum())):
            have = int(pool.loc[pool["patient_id"].isin(taken), "labels"].str.contains(name, regex=False).sum())
            candidates = sorted(pool.loc[carries[name], "patient_id"].unique(), key=order.__getitem__)
            for pid in candidates:
                if have >= min_positives:
                    break
                if pid in taken:
                    continue
                rows = pool[pool["patient_id"] == pid]
                taken.add(pid)
                chosen.append(pid)
                have += int(rows["labels"].str.contains(name, regex=False).sum())
                total += len(rows)
    sizes = pool.groupby("patient_id").size()
    for pid in patients:
        if total >= images:
            break
        if pid in taken or total + sizes[pid] > images:
            continue
        taken.add(pid)
        chosen.append(pid)
        total += int(sizes[pid])
    return metadata[metadata["patient_id"].isin(taken)].sort_values("image", ignore_index=True)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _ellipse(u, v, cx, cy, ax, ay):
    return ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells))
    field = ndimage.zoom(coarse, size / cells, order=1)[:size, :size]
    return field / (np.abs(field).max() + 1e-6)


Box = tuple[str, float, float, float, float]  # finding, x, y, w, h: NIH's box list's columns, in pixels


def render_with_boxes(row: pd.Series, size: int, seed: int,
                      blacklist_reason: str | None = None) -> tuple[np.ndarray, list[Box]]:
    """One synthetic chest radiograph (uint8 [size, size]) and the box of each drawn sign of a boxed finding:
    the extent of the pixels the sign changed (Effusion: one box per side, Nodule: one per nodule), in
    pixel coordinates (x right, y down, a pixel spans [i, i + 1)). A lateral-like blacklisted image
    has no signs left to box; a rotated one has its boxes rotated with it."""
    anatomy = np.random.default_rng(_seed(seed, "patient", row["patient_id"]))
    rng = np.random.default_rng(_seed(seed, "image", row["image"]))
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    shift = rng.normal(0, 0.02, 2)
    v, u = np.meshgrid(axis - shift[1], axis - shift[0], indexing="ij")
    findings = set(split_labels(row["labels"]))
    signs: list[tuple[str, np.ndarray]] = []  # (finding, the mask of the pixels its sign changed)

    def strength():
        return rng.uniform(0.15, 1.0)

    # Anatomy, fixed per patient.
    body_w, lung_x = anatomy.uniform(0.8, 0.95), anatomy.uniform(0.36, 0.44)
    lung_a, lung_b, lung_y = anatomy.uniform(0.25, 0.31), anatomy.uniform(0.52, 0.6), anatomy.uniform(-0.08, 0.0)
    heart_a, heart_b = anatomy.uniform(0.2, 0.25), anatomy.uniform(0.16, 0.2)
    rib_freq, rib_phase = anatomy.uniform(14, 18), anatomy.uniform(0, 2 * np.pi)
    if "Emphysema" in findings:
        s = strength()
        lung_b *= 1 + 0.15 * s
        lung_a *= 1 + 0.1 * s

    img = np.full((size, size), 0.06)
    body = _ellipse(u, v, 0, 0.1, body_w, 1.15) < 1
    img[body] = 0.5
    lungs = []
    for side in (-1, 1):
        squash = 1.0
        if "Atelectasis" in findings and side == 1:
            squash = 0.9
        lung = _ellipse(u, v, side * lung_x, lung_y, lung_a * squash, lung_b * squash) < 1
        lungs.append(lung)
    lung_any = lungs[0] | lungs[1]
    lung_value = 0.22 - (0.1 * strength() if "Emphysema" in findings else 0.0)
    img[lung_any] = lung_value
    vessels = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 80)
    img += lung_any * vessels / (np.abs(vessels).max() + 1e-6) * 0.05
    ribs = (np.sin((v + 0.35 * u**2) * rib_freq + rib_phase) > 0.75) & body
    img += ribs * 0.09
    for side in (-1, 1):  # clavicles
        clav = np.abs(v - (-0.62 + 0.18 * np.abs(u))) < 0.025
        img += clav * (np.sign(u) == side) * (np.abs(u) < 0.55) * 0.2
    img[np.abs(u) < 0.06] += 0.18  # spine
    heart_scale = 1 + (0.5 * strength() if "Cardiomegaly" in findings else 0.0)
    heart = _ellipse(u, v, 0.07, 0.32, heart_a * heart_scale, heart_b * (1 + 0.4 * (heart_scale - 1))) < 1
    img[heart] = np.maximum(img[heart], 0.58)
    if "Cardiomegaly" in findings:
        signs.append(("Cardiomegaly", heart))
    img[(v > lung_y + lung_b * 0.9) & body & ~heart] += 0.1  # below the diaphragm

    def in_lung(rows=None):
        side = rng.choice((-1, 1)) if rows is None else rows
        cy = lung_y + rng.uniform(-0.5, 0.5) * lung_b
        cx = side * lung_x + rng.uniform(-0.5, 0.5) * lung_a
        return side, cx, cy

    if "Effusion" in findings:
        s = strength()
        for side in (-1, 1) if rng.random() < 0.5 else (rng.choice((-1, 1)),):
            level = lung_y + lung_b * (0.9 - 0.45 * s) - 0.15 * np.abs(u - side * lung_x)
            fluid = lungs[0 if side < 0 else 1] & (v > level)
            img[fluid] = img[fluid] + 0.04 + 0.16 * s
            signs.append(("Effusion", fluid))
    if "Nodule" in findings:
        s = strength()
        for _ in range(rng.integers(1, 4)):
            _, cx, cy = in_lung()
            nodule = _ellipse(u, v, cx, cy, 0.035, 0.035) < 1
            img += nodule * (0.15 + 0.25 * s)
            signs.append(("Nodule", nodule))
    if "Mass" in findings:
        s = strength()
        _, cx, cy = in_lung()
        r = rng.uniform(0.1, 0.15)
        mass = _ellipse(u, v, cx, cy, r, r * rng.uniform(0.8, 1.2)) < 1
        img += mass * (0.15 + 0.25 * s)
        signs.append(("Mass", mass))
    if "Atelectasis" in findings:
        s = strength()
        cy = lung_y + lung_b * rng.uniform(0.2, 0.5)
        band = np.abs((v - cy) - 0.3 * (u - lung_x)) < 0.03 + 0.02 * s
        img += band * lungs[1] * (0.05 + 0.12 * s)
        signs.append(("Atelectasis", band & lungs[1]))
    if "Consolidation" in findings:
        s = strength()
        _, cx, cy = in_lung()
        blob = 1 / (1 + np.exp(np.minimum((_ellipse(u, v, cx, cy, 0.17, 0.14) - 1) * 12, 50)))
        img += blob * lung_any * (0.15 + 0.2 * s)
    if "Edema" in findings:
        s = strength()
        for side in (-1, 1):
            haze = np.exp(-_ellipse(u, v, side * (lung_x - 0.15), lung_y + 0.1, 0.25, 0.3))
            img += haze * lung_any * (0.02 + 0.08 * s)
    if "Fibrosis" in findings:
        s = strength()
        net = (np.abs(np.sin(u * 45 + rng.uniform(0, 6))) < 0.25) | (np.abs(np.sin(v * 45 + rng.uniform(0, 6))) < 0.25)
        img += net * lung_any * (v < lung_y + 0.2) * (0.06 + 0.12 * s)
    if "Hernia" in findings:
        s = strength()
        bubble = _ellipse(u, v, 0.02, 0.42, 0.06 + 0.05 * s, 0.05 + 0.04 * s)
        img[bubble < 1] -= 0.1 + 0.2 * s
        img += (np.abs(bubble - 1) < 0.25) * (0.05 + 0.1 * s)
    if "Infiltration" in findings:
        s = strength()
        patches = _smooth_noise(rng, size, 10) > 0.35
        img += patches * lung_any * (0.06 + 0.12 * s)
        signs.append(("Infiltration", patches & lung_any))
    if "Pleural_Thickening" in findings:
        s = strength()
        side = rng.choice((-1, 1))
        lung = lungs[0 if side < 0 else 1]
        edge = lung & ~(_ellipse(u, v, side * lung_x, lung_y, lung_a - 0.04 - 0.03 * s, lung_b - 0.02) < 1)
        img += edge * (side * (u - side * lung_x) > 0) * (0.2 + 0.2 * s)
    if "Pneumonia" in findings:
        s = strength()
        _, cx, cy = in_lung()
        img += np.exp(-_ellipse(u, v, cx, cy, 0.16, 0.16) * 1.5) * lung_any * (0.1 + 0.2 * s)
        signs.append(("Pneumonia", (_ellipse(u, v, cx, cy, 0.16, 0.16) < 1) & lung_any))  # the haze within 1/e^1.5
        bronchus = np.abs((u - cx) * 2 - (v - cy)) < 0.015
        img -= bronchus * (_ellipse(u, v, cx, cy, 0.12, 0.12) < 1) * 0.12
    if "Pneumothorax" in findings:
        s = strength()
        side = rng.choice((-1, 1))
        lung = lungs[0 if side < 0 else 1]
        edge_x = side * (lung_x + lung_a * (0.55 - 0.6 * s))
        collapsed = lung & (side * (u - edge_x) > 0)
        img[collapsed] = img[collapsed] * (0.92 - 0.3 * s)
        edge = lung & (np.abs(u - edge_x) < 0.012)
        img += edge * (0.04 + 0.1 * s)
        signs.append(("Pneumothorax", collapsed | edge))

    # A text marker near the top-left edge, outside a 75% center crop.
    img[int(size * 0.05):int(size * 0.1), int(size * 0.05):int(size * 0.09)] = 0.95
    img[int(size * 0.09):int(size * 0.1), int(size * 0.05):int(size * 0.12)] = 0.95

    contrast, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    img = np.clip(img * contrast, 0, 1) ** gamma
    img = ndimage.gaussian_filter(img, size / 400) + rng.normal(0, 0.02, img.shape)
    if row["view"] == "AP":  # AP films are often dimmer with magnified hearts in real data; keep a hint
        img *= 0.95
    img, turns = _blacklisted(img, blacklist_reason, rng)
    boxes = [] if blacklist_reason == "non_pa_ap_view" else [
        (name, *_extent(np.rot90(mask, k=turns))) for name, mask in signs if mask.any()]
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), boxes


def _extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The box (x, y, w, h) of a mask's pixels: rows are y, columns x."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (float(columns[0]), float(rows[0]), float(columns[-1] + 1 - columns[0]), float(rows[-1] + 1 - rows[0]))


def _blacklisted(img: np.ndarray, reason: str | None, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The image as the blacklist reason degrades it, and how many quarter turns it was rotated by."""
    if reason == "rotated":
        turns = int(rng.integers(1, 4))
        return np.rot90(img, k=turns), turns
    if reason == "lower_quality":
        blurred = ndimage.gaussian_filter(img, img.shape[0] / 40)
        return 0.5 + (blurred - 0.5) * 0.3 + rng.normal(0, 0.12, img.shape), 0
    if reason == "non_pa_ap_view":  # a lateral-like view: one broad lung field, no pair
        size = img.shape[0]
        axis = np.linspace(-1, 1, size)
        v, u = np.meshgrid(axis, axis, indexing="ij")
        lateral = np.where(_ellipse(u, v, 0, 0.05, 0.7, 0.9) < 1, 0.5, 0.08)
        lateral[_ellipse(u, v, 0.1, -0.1, 0.45, 0.55) < 1] = 0.25
        return lateral + rng.normal(0, 0.03, img.shape), 0
    return img, 0


def encode_png(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
