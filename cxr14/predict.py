"""`cxr predict`: a trained model on your own images (PNG, JPEG and DICOM files, or folders of them).

The model is this workspace's data/train/model.pt, an experiment's or any revision's (read through DVC),
or a model file. Each image is prepared as the model's training images were, from what its model file
records: the center crop (crop.fraction) resized to the packed side (crop.pixels), then resized on the
device to the network's input side, as in evaluate. DICOM pixels go through the modality LUT
(RescaleSlope/Intercept), the VOI LUT or window, are scaled from that range to 8 bits, and MONOCHROME1 is
inverted. A file that cannot be read is reported by name, with why, and the others still run.
"""

from __future__ import annotations

import io
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr14 import model_file, progress
from cxr14.atomic import atomic_path, write_csv
from cxr14.batches import prepare
from cxr14.images import crop_resize, open_image, to_gray
from cxr14.params import StageError
from cxr14.runtime import Runtime, decide

MODEL_FILE = model_file.PATH
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")


class PredictError(StageError):
    """A model that cannot be loaded or a device that is not there: nothing can be predicted."""


class ImageError(ValueError):
    """One file that cannot be read as an image: reported with its name, the others still run."""


@dataclass
class Predictor:
    """A trained network and how its training images were prepared."""
    net: torch.nn.Module
    backbone: str      # model.backbone: where its heatmaps come from (cxr14/backbones.py)
    names: tuple[str, ...]
    fraction: float    # crop.fraction: the centered square's side over the shorter side
    crop_size: int     # crop.pixels: the side of the packed images
    input_size: int    # the side the network sees (resized on the device)
    runtime: Runtime
    source: str        # where the model came from, for messages

    def preprocess(self, gray: np.ndarray) -> np.ndarray:
        """A gray uint8 image as the crop stage packs it: [crop_size, crop_size] uint8."""
        return crop_resize(Image.fromarray(gray), self.fraction, self.crop_size)

    def batch(self, images: np.ndarray) -> torch.Tensor:
        """Packed images [B, S, S] uint8 -> the network's normalised input on its device."""
        x = torch.from_numpy(images).unsqueeze(1).to(self.runtime.device)
        return prepare(x, self.input_size, None, None, self.runtime.channels_last)

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Per-label probabilities [B, labels] (float64) of packed images, as evaluate computes them."""
        with self.runtime.autocast():
            logits = self.net(self.batch(images))
        return torch.sigmoid(logits.float()).double().cpu().numpy()


# ---------------------------------------------------------------- the model

def _model_source(model: str) -> tuple[Path | io.BytesIO, str]:
    """A model file path, or the bytes of data/train/model.pt in an experiment or git revision; and its name."""
    path = Path(model).expanduser()
    if path.is_file():
        return path, str(path)
    if path.suffix == ".pt" or path.is_dir():
        why = "a folder" if path.is_dir() else "no such file"
        raise PredictError(f"--model {model}: {why}; give a model file (the train stage writes {MODEL_FILE}: "
                           "run `dvc repro` first), an experiment's name (`dvc exp ls`) or a git revision")
    try:
        import dvc.api

        with dvc.api.open(MODEL_FILE, rev=model, mode="rb") as f:
            data = f.read()
    except Exception as error:  # DVC raises many kinds: no repository, unknown revision, file not in the revision
        raise PredictError(f"--model {model}: no such file, and {MODEL_FILE} cannot be read from an experiment or "
                           f"revision of that name ({type(error).__name__}: {error}); `dvc exp ls` lists the "
                           "experiments") from None
    return io.BytesIO(data), f"{MODEL_FILE} of {model}"


def read_model_file(model: str) -> tuple[dict, str]:
    """The saved dict of a model file path, or of data/train/model.pt in an experiment or git revision."""
    source, where = _model_source(model)
    try:
        return model_file.read(source, where), where
    except model_file.ModelFileError as error:
        raise PredictError(str(error)) from None


def load_model(model: str, device: str) -> Predictor:
    """The network of a model file (or an experiment's), on `device` (auto | cpu | cuda)."""
    source, where = _model_source(model)
    try:
        trained = model_file.load(source, where)
    except model_file.ModelFileError as error:
        raise PredictError(str(error)) from None
    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is visible; use auto or cpu")
    runtime = decide(device, trained.precision)
    return Predictor(runtime.place(trained.net).eval(), trained.config.backbone, trained.names, trained.crop_fraction,
                     trained.crop_pixels, trained.input_size, runtime, where)


# ---------------------------------------------------------------- the images

def _is_dicom(path: Path) -> bool:
    """DICOM by suffix, or by the 'DICM' marker after the 128-byte preamble (files named without a suffix)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _wanted(path: Path) -> bool:
    """In a folder: PNG, JPEG and DICOM files (hidden files left out; one that cannot be opened is tried, and
    its error reported)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    try:
        return path.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(path)
    except OSError:
        return True


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """The files to predict on, and the paths that give none (with why). A file named is always tried; in a
    folder (recursively, in sorted order) the PNG, JPEG and DICOM files are, by suffix or DICOM's marker."""
    files, problems = [], {}
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if _wanted(p)]
            if not found:
                problems[str(given)] = "a folder with no PNG, JPEG or DICOM files in it (searched recursively)"
            files += found
        else:
            problems[str(given)] = "no such file or folder"
    return list(dict.fromkeys(files)), problems  # a file named twice is predicted once


def read_image(path: str | Path) -> np.ndarray:
    """A PNG, JPEG (or other PIL-readable) or DICOM file as one gray uint8 channel [H, W]."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageError("an empty file")
    if _is_dicom(path):
        return read_dicom(path)
    try:
        image = open_image(path)  # a 16-bit PNG's sBIT chunk too: to_gray scales from its real depth
    except UnidentifiedImageError:
        raise ImageError("not a PNG, JPEG or DICOM image") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # a truncated or corrupt file
        raise ImageError(f"a {image.format} file that cannot be decoded ({error})") from None
    return to_gray(ImageOps.exif_transpose(image))  # a photographed film keeps its camera orientation


def read_dicom(path: str | Path) -> np.ndarray:
    """A single-frame DICOM image as gray uint8: modality LUT (RescaleSlope/Intercept), VOI LUT or window,
    scaled to 0-255 from the range those map the stored bit depth to, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=Path(path).suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise ImageError(f"not a readable DICOM file ({type(error).__name__}: {error})") from None
    if "PixelData" not in ds:
        raise ImageError("a DICOM file without an image (no PixelData)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"a DICOM file of {frames} frames: one image per file is expected")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # a compressed transfer syntax without its decoder, a cut file
        raise ImageError(f"its DICOM pixels cannot be decoded ({type(error).__name__}: {error})") from None
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("SamplesPerPixel", 1)) != 1:  # colour (pydicom gives RGB): to luminance as any RGB image
        rgb = np.clip(pixels.astype(np.float64) * (255 / (2 ** bits - 1)), 0, 255).round().astype(np.uint8)
        return to_gray(Image.fromarray(rgb, mode="RGB"))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"PhotometricInterpretation {photometric} for one sample per pixel: expected MONOCHROME1 or 2")
    # The stored range's two ends, through the same transforms: the range the windowed values can take.
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1])
    try:
        values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
        low, high = np.sort(apply_voi_lut(apply_modality_lut(ends, ds), ds).astype(np.float64))
    except Exception as error:  # a malformed LUT or window
        raise ImageError(f"its DICOM LUT or window cannot be applied ({type(error).__name__}: {error})") from None
    if not high > low:
        raise ImageError(f"its DICOM values span no range ({low} to {high})")
    gray = np.clip((values - low) * (255 / (high - low)), 0, 255).round().astype(np.uint8)
    return 255 - gray if photometric == "MONOCHROME1" else gray


# ---------------------------------------------------------------- predicting

@dataclass
class Result:
    file: str
    probabilities: np.ndarray | None  # [labels], None when the file could not be read
    error: str | None = None
    heatmaps: list[str] | None = None


def predict(predictor: Predictor, files: Sequence[Path], batch_size: int, heatmaps: Path | None = None,
            top: int = 1, show_progress: bool = True) -> list[Result]:
    """Probabilities for each file, in order; each unreadable file's error is kept and printed on stderr.
    With `heatmaps`, a Grad-CAM overlay PNG of each image's `top` most probable labels is written there."""
    results: list[Result] = []
    stems = _unique_stems(files) if heatmaps is not None else {}

    def prepared(path: Path) -> np.ndarray | str:
        try:
            return predictor.preprocess(read_image(path))
        except Exception as error:  # decoders raise many kinds: each is this file's error, not the run's
            return str(error) if isinstance(error, ImageError) else f"cannot be read ({type(error).__name__}: {error})"

    # Decoding a 1024-pixel PNG takes longer than the network on it: threads decode a batch at once.
    with progress.items(disable=not show_progress) as bar, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        task = bar.add_task(f"predict ({predictor.runtime.device.type})", total=math.ceil(len(files) / batch_size))
        for start in range(0, len(files), batch_size):
            chunk, images, done = files[start:start + batch_size], [], []
            for path, outcome in zip(chunk, pool.map(prepared, chunk)):
                if isinstance(outcome, str):
                    print(f"error: {path}: {outcome}", file=sys.stderr)
                    done.append(Result(str(path), None, outcome))
                else:
                    images.append(outcome)
                    done.append(Result(str(path), None))
            if images:
                packed = np.stack(images)
                p = predictor.probabilities(packed)
                readable = [r for r in done if r.error is None]
                for result, row in zip(readable, p):
                    result.probabilities = row
                if heatmaps is not None:
                    write_heatmaps(predictor, packed, p, [stems[Path(r.file)] for r in readable], heatmaps, top,
                                   readable)
            results += done
            bar.advance(task)
    return results


def _unique_stems(files: Sequence[Path]) -> dict[Path, str]:
    """A name for each file's heatmaps: its stem, or stem-2, stem-3 ... where folders hold the same name."""
    seen: dict[str, int] = {}
    names = {}
    for path in files:
        count = seen[path.stem] = seen.get(path.stem, 0) + 1
        names[path] = path.stem if count == 1 else f"{path.stem}-{count}"
    return names


def write_heatmaps(predictor: Predictor, packed: np.ndarray, p: np.ndarray, stems: list[str], folder: Path,
                   top: int, results: list[Result]) -> None:
    """Grad-CAM overlays on the cropped images: folder/<stem>.<label>.png for each image's top labels."""
    from cxr14 import cam

    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :top]
    x = predictor.batch(packed)  # outside inference mode: Grad-CAM needs gradients
    for rank in range(order.shape[1]):
        maps = cam.class_heatmaps(predictor.net, predictor.backbone, x, order[:, rank].tolist(), method="gradcam")
        for i, (stem, result) in enumerate(zip(stems, results)):
            name = predictor.names[order[i, rank]]
            path = folder / f"{stem}.{name}.png"
            with atomic_path(path) as tmp:
                cam.overlay(packed[i], maps[i]).save(tmp, format="PNG")
            result.heatmaps = (result.heatmaps or []) + [str(path)]


def table(results: Sequence[Result], names: Sequence[str]) -> pd.DataFrame:
    """One row per file: its path, each label's probability at full precision (empty when unreadable), the
    error (empty when read), and the heatmap files when there are any."""
    frame = pd.DataFrame({"file": [r.file for r in results]})
    p = np.array([r.probabilities if r.probabilities is not None else np.full(len(names), np.nan) for r in results])
    for j, name in enumerate(names):
        frame[f"p_{name}"] = p[:, j] if len(results) else []
    frame["error"] = [r.error or "" for r in results]
    if any(r.heatmaps for r in results):
        frame["heatmaps"] = [";".join(r.heatmaps or []) for r in results]
    return frame


def cannot_write(path: str | Path, folder: bool = False) -> str | None:
    """Why the CSV `path` (with `folder`: a folder of files) cannot be written there, in words; None when it can.
    A folder that is not there yet is made, as the writes would make it; then a file is written in it and removed."""
    path = Path(path).expanduser()
    if not folder and path.is_dir():
        return "is a folder: give the CSV's file name (such as predictions.csv in it)"
    where = path if folder else path.parent
    there = next(p for p in [where, *where.parents] if p.exists() or p == p.parent)  # the deepest that exists
    if not there.is_dir():
        return f"cannot be written: {there} is a file, not a folder"
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as error:
        return f"cannot be written: {where} takes no new files ({error.strerror or error})"
    return None


def write(results: Sequence[Result], names: Sequence[str], out: str | Path) -> Path:
    write_csv(out, table(results, names))
    return Path(out)


def print_summary(results: Sequence[Result], names: Sequence[str], source: str, top: int = 3, rows: int = 50) -> None:
    """A table of each file's most probable labels (the first `rows` files; the CSV holds them all)."""
    import os

    from rich.console import Console
    from rich.table import Table

    read = sum(r.error is None for r in results)
    folder = os.path.commonpath([os.path.abspath(r.file) for r in results]) if results else ""
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
    summary = Table(title=f"{read} of {len(results)} images in {folder or '.'} predicted by {source}")
    summary.add_column("file", overflow="fold")
    for k in range(top):
        summary.add_column(f"top {k + 1}", justify="right")
    for result in results[:rows]:
        name = os.path.relpath(os.path.abspath(result.file), folder) if folder else result.file
        if result.error is not None:
            summary.add_row(name, f"[red]unreadable: {result.error}[/red]", *[""] * (top - 1))
            continue
        best = np.argsort(-result.probabilities, kind="stable")[:top]
        summary.add_row(name, *[f"{names[j]} {result.probabilities[j]:.3f}" for j in best])
    if len(results) > rows:
        summary.caption = f"... and {len(results) - rows} more: every file is in the CSV"
    Console().print(summary)
