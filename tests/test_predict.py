"""`cxr predict` on a user's images: PNG (grey, RGBA), JPEG and DICOM files and folders, prepared as the model's
training images were; unreadable files reported one by one."""

import errno
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from cxr14 import models, predict
from cxr14.batches import prepare
from cxr14.images import crop_resize
from stages import train

from .conftest import params_with

FRACTION, CROP, INPUT = 0.5, 24, 32  # a model trained on 50% center crops packed at 24 px, seen at 32 px


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small untrained network saved the way the train stage saves its best model."""
    params = params_with({"crop": {"fraction": FRACTION, "pixels": CROP}, "model": {"input_size": INPUT}})
    task, model_config, config = train.check(params)
    torch.manual_seed(0)
    net = models.create_model(model_config, len(task.names), INPUT)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    train.save_model(params, task, model_config, config, INPUT, path, net.state_dict(), 1)
    return path


@pytest.fixture(scope="module")
def predictor(model_file):
    return predict.load_model(str(model_file), "cpu")


def xray(seed=0, shape=(60, 80)):
    """A grey uint8 image with structure (a bright blob off center, a gradient, noise), not square."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    blob = 120 * np.exp(-((rows - shape[0] * 0.4) ** 2 + (cols - shape[1] * 0.6) ** 2) / 60)
    return np.clip(40 + cols * 1.2 + blob + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)


def save_png(path, pixels, mode=None):
    Image.fromarray(pixels, mode=mode).save(path)
    return path


def write_dicom(path, stored, photometric="MONOCHROME2", bits=12, window=None, rescale=None):
    """A single-frame 16-bit-allocated DICOM file with a preamble, as a modality would write it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.save_as(path, enforce_file_format=True)
    return path


def network_on(pixels, model_file):
    """The probabilities computed here by hand: the model's crop, resized to its input, through its network."""
    saved = torch.load(model_file, weights_only=False)
    net = models.create_model(models.ModelConfig(**saved["model"]), len(saved["names"]), INPUT)
    net.load_state_dict(saved["state_dict"])
    packed = torch.from_numpy(crop_resize(Image.fromarray(pixels), FRACTION, CROP).copy())[None, None]
    with torch.no_grad():
        return torch.sigmoid(net.eval()(prepare(packed, INPUT, None, None))).double()[0].numpy()


def run(predictor, files, **kwargs):
    return predict.predict(predictor, [Path(f) for f in files], 4, show_progress=False, **kwargs)


def test_an_image_is_prepared_with_the_crop_and_sizes_its_model_was_trained_with(predictor, tmp_path):
    path = save_png(tmp_path / "a.png", xray())
    assert (predictor.fraction, predictor.crop_size, predictor.input_size) == (FRACTION, CROP, INPUT)
    prepared = predictor.preprocess(predict.read_image(path))
    assert prepared.shape == (CROP, CROP)
    assert np.array_equal(prepared, crop_resize(Image.open(path), FRACTION, CROP))


def test_a_png_gets_the_networks_probabilities_on_that_crop(predictor, model_file, tmp_path):
    pixels = xray()
    [result] = run(predictor, [save_png(tmp_path / "a.png", pixels)])
    assert result.error is None
    assert np.allclose(result.probabilities, network_on(pixels, model_file), atol=1e-6)


def test_an_rgba_png_predicts_as_its_grey_image(predictor, tmp_path):
    pixels = xray()
    rgba = np.dstack([pixels, pixels, pixels, np.random.default_rng(1).integers(0, 256, pixels.shape, dtype=np.uint8)])
    grey, colour = run(predictor, [save_png(tmp_path / "grey.png", pixels), save_png(tmp_path / "rgba.png", rgba, "RGBA")])
    assert np.array_equal(grey.probabilities, colour.probabilities)


def test_a_jpeg_predicts_as_its_decoded_pixels(predictor, tmp_path):
    Image.fromarray(xray()).save(tmp_path / "a.jpg", quality=90)
    decoded = np.asarray(Image.open(tmp_path / "a.jpg").convert("L"))
    jpeg, png = run(predictor, [tmp_path / "a.jpg", save_png(tmp_path / "decoded.png", decoded)])
    assert jpeg.error is None and np.array_equal(jpeg.probabilities, png.probabilities)


def test_a_12_bit_png_predicts_as_its_8_bit_image(predictor, tmp_path):
    """A hospital's export: 12-bit values (0-4095) in a 16-bit PNG keep their contrast, as in the crop stage."""
    pixels = xray()
    twelve = save_png(tmp_path / "12-bit.png", np.round(pixels * (4095 / 255)).astype(np.uint16))
    assert np.array_equal(predict.read_image(twelve), pixels)
    from_twelve, from_eight = run(predictor, [twelve, save_png(tmp_path / "8-bit.png", pixels)])
    assert np.array_equal(from_twelve.probabilities, from_eight.probabilities)


def test_a_dicom_window_and_rescale_map_to_the_full_grey_range(tmp_path):
    # value = 2 * stored - 1000; LINEAR window 2000 / 1001: below 1499.5 black, above 2499.5 white
    stored = np.array([[1000, 1250, 1500], [1600, 1750, 2200]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, window=(2000, 1001), rescale=(2, -1000))
    value = 2.0 * stored - 1000
    expected = np.round(np.clip((value - 1999.5) / 1000 + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(predict.read_image(path), expected)
    assert predict.read_image(path).min() == 0 and predict.read_image(path).max() == 255


def test_a_dicom_without_a_window_is_scaled_by_its_bit_depth(tmp_path):
    stored = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, bits=12)
    assert list(predict.read_image(path)[0]) == [0, 64, 128, 255]  # round(v * 255 / 4095)


def test_a_monochrome1_dicom_predicts_as_the_inverted_monochrome2_one(predictor, tmp_path):
    stored = (xray().astype(np.uint16) * 16).astype(np.uint16)  # 12 bits
    m1 = write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", window=(2048, 3000))
    m2 = write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2", window=(2048, 3000))
    assert np.array_equal(predict.read_image(m1), 255 - predict.read_image(m2))
    inverted = save_png(tmp_path / "inverted.png", 255 - predict.read_image(m2))
    one, two, png = run(predictor, [m1, m2, inverted])
    assert np.array_equal(one.probabilities, png.probabilities)
    assert not np.array_equal(one.probabilities, two.probabilities)


def test_a_dicom_file_is_found_by_its_marker_without_a_suffix(tmp_path):
    stored = np.array([[0, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored)
    path.rename(tmp_path / "IM0001")
    assert list(predict.read_image(tmp_path / "IM0001")[0]) == [0, 255]


def test_a_folder_is_searched_recursively_for_png_jpeg_and_dicom(tmp_path):
    (tmp_path / "study/series").mkdir(parents=True)
    save_png(tmp_path / "study/a.PNG", xray())
    Image.fromarray(xray()).save(tmp_path / "study/series/b.jpeg")
    write_dicom(tmp_path / "study/series/IM0001", np.zeros((4, 4), np.uint16))
    (tmp_path / "study/notes.txt").write_text("not an image")
    files, problems = predict.find_images([tmp_path / "study"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["study/a.PNG", "study/series/IM0001",
                                                                  "study/series/b.jpeg"]
    assert problems == {}


def test_paths_that_give_no_image_are_named_with_why(tmp_path):
    (tmp_path / "empty").mkdir()
    files, problems = predict.find_images([tmp_path / "empty", tmp_path / "missing.png"])
    assert files == []
    assert "no PNG, JPEG or DICOM" in problems[str(tmp_path / "empty")]
    assert problems[str(tmp_path / "missing.png")] == "no such file or folder"


@pytest.mark.parametrize("content, why", [(b"just text, no image", "not a PNG, JPEG or DICOM image"),
                                          (b"", "an empty file"),
                                          ("truncated", "cannot be decoded")])
def test_an_unreadable_file_gets_its_own_error_and_the_others_still_run(predictor, tmp_path, capsys, content, why):
    good = save_png(tmp_path / "good.png", xray())
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:200] if content == "truncated" else content)
    first, broken, last = run(predictor, [good, bad, save_png(tmp_path / "last.png", xray(2))])
    assert first.error is None and last.error is None and broken.probabilities is None
    assert why in broken.error
    assert f"{bad}: {broken.error}" in capsys.readouterr().err


def test_a_dicom_that_is_not_one_is_reported(predictor, tmp_path):
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
    [result] = run(predictor, [tmp_path / "fake.dcm"])
    assert result.probabilities is None and "DICOM" in result.error


def test_the_csv_has_one_row_per_file_at_full_precision_and_the_errors(predictor, model_file, tmp_path):
    good = save_png(tmp_path / "good.png", xray())
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    result = CliRunner().invoke(app, ["predict", str(good), str(tmp_path / "bad.jpg"), "--model", str(model_file),
                                      "--out", str(tmp_path / "out.csv"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table.columns) == ["file", *[f"p_{n}" for n in predictor.names], "error"]
    assert list(table["file"]) == [str(good), str(tmp_path / "bad.jpg")]
    [expected] = run(predictor, [good])
    assert table.loc[0, [f"p_{n}" for n in predictor.names]].astype(float).tolist() == expected.probabilities.tolist()
    assert table.loc[0, "error"] == "" and table.loc[1, "error"] == "not a PNG, JPEG or DICOM image"
    assert "bad.jpg: not a PNG, JPEG or DICOM image" in result.stderr


def test_the_exit_status_is_an_error_only_when_no_file_could_be_read(model_file, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "bad.png"), str(tmp_path / "missing"),
                                      "--model", str(model_file), "--out", str(tmp_path / "out.csv")])
    assert result.exit_code == 1 and "no file could be read" in result.stderr
    assert pd.read_csv(tmp_path / "out.csv")["error"].notna().all()


def test_a_model_file_without_its_preparation_is_refused_clearly(model_file, tmp_path):
    saved = torch.load(model_file, weights_only=False)
    del saved["params"]["crop"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(predict.PredictError, match="does not record params.crop.fraction, params.crop.pixels"):
        predict.load_model(str(tmp_path / "old.pt"), "cpu")


def other_backbone(saved):
    config = models.ModelConfig(**{**saved["model"], "backbone": "mobilenet_v3_small"})
    saved["state_dict"] = models.create_model(config, len(saved["names"]), INPUT).state_dict()


def fewer_labels(saved):
    saved["names"] = saved["names"][:3]


@pytest.mark.parametrize("change, says", [
    (other_backbone, r"model\.backbone resnet18, model\.top replace_last, model\.head\.hidden \[\], 14 labels\): \d+ of the "
                     r"network's \d+ weight tensors are not in the file \(such as conv1\.weight\), and \d+ of the file's \d+ "
                     r"are not in the network \(such as features\.0\.0\.weight\): the weights of another backbone"),
    (fewer_labels, r", 3 labels\): the file names 3 labels, and its weights' last layer \(fc\.0\.weight\) has 14 outputs"),
], ids=["another-backbone", "another-label-count"])
def test_a_model_whose_weights_do_not_fit_its_network_is_exit_2_saying_what_differs(model_file, tmp_path, change, says):
    saved = torch.load(model_file, weights_only=False)
    change(saved)
    torch.save(saved, tmp_path / "odd.pt")
    result = CliRunner().invoke(app, ["predict", str(save_png(tmp_path / "a.png", xray())), "--model",
                                      str(tmp_path / "odd.pt"), "--out", str(tmp_path / "out.csv"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert re.search(f"error: {re.escape(str(tmp_path / 'odd.pt'))}: its weights do not fit the network it records \\(.*"
                     + says, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("option, target, says", [
    ("--out", "notes.txt/out.csv", r"cannot be written: .*notes\.txt is a file, not a folder"),
    ("--out", "folder", r"is a folder: give the CSV's file name"),
    ("--heatmaps", "notes.txt/heat", r"cannot be written: .*notes\.txt is a file, not a folder"),
], ids=["out-under-a-file", "out-a-folder", "heatmaps-under-a-file"])
def test_an_output_that_cannot_be_written_is_exit_2_before_any_prediction(model_file, tmp_path, option, target, says):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    paths = {"--out": str(tmp_path / "out.csv"), option: str(tmp_path / target)}
    result = CliRunner().invoke(app, ["predict", str(save_png(tmp_path / "a.png", xray())), "--model", str(model_file),
                                      "--device", "cpu", *[item for pair in paths.items() for item in pair]])
    assert result.exit_code == 2, result.output
    assert re.fullmatch(f"error: {option} {re.escape(str(tmp_path / target))}: {says}.*\n", result.stderr), result.stderr
    assert "predict:" not in result.stdout  # nothing was predicted, then lost


def test_an_out_folder_without_write_permission_is_exit_2(model_file, tmp_path, monkeypatch):
    """Tests run as root, whom permissions do not stop: writing in the folder fails here as it would for a user."""
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(predict.tempfile, "TemporaryFile", denied)
    result = CliRunner().invoke(app, ["predict", str(save_png(tmp_path / "a.png", xray())), "--model", str(model_file),
                                      "--device", "cpu", "--out", str(tmp_path / "out.csv")])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: --out {tmp_path / 'out.csv'}: cannot be written: {tmp_path} takes no new files " \
                            "(Permission denied)\n"


def test_a_missing_model_file_says_how_to_make_one(tmp_path):
    with pytest.raises(predict.PredictError, match="no such file.*dvc repro"):
        predict.load_model(str(tmp_path / "model.pt"), "cpu")


def test_heatmaps_overlay_each_images_top_labels(predictor, tmp_path):
    files = [save_png(tmp_path / "a.png", xray()), save_png(tmp_path / "b.png", xray(3))]
    results = run(predictor, files, heatmaps=tmp_path / "heat", top=2)
    for path, result in zip(files, results):
        best = [predictor.names[j] for j in np.argsort(-result.probabilities, kind="stable")[:2]]
        assert result.heatmaps == [str(tmp_path / "heat" / f"{path.stem}.{name}.png") for name in best]
        for written in result.heatmaps:
            image = Image.open(written)
            assert image.mode == "RGB" and image.size == (CROP, CROP)


def test_an_experiments_model_is_read_through_dvc_by_its_name(model_file, tmp_path, monkeypatch):
    import shutil
    import subprocess

    def sh(*command):
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)

    def save(epoch):
        saved = torch.load(model_file, weights_only=False)
        torch.save({**saved, "epoch": epoch}, tmp_path / predict.MODEL_FILE)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "test@example.invalid")
    sh("git", "config", "user.name", "test")
    sh("dvc", "init", "-q")
    (tmp_path / predict.MODEL_FILE).parent.mkdir(parents=True)
    shutil.copy(model_file, tmp_path / predict.MODEL_FILE)
    save(1)
    sh("dvc", "add", "-q", predict.MODEL_FILE)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "a first model")
    save(7)
    sh("dvc", "exp", "save", "-q", "-n", "longer")
    save(9)  # the workspace moves on: the experiment's file is still its own
    monkeypatch.chdir(tmp_path)
    assert predict.read_model_file("longer")[0]["epoch"] == 7
    assert predict.read_model_file("HEAD")[0]["epoch"] == 1
    assert predict.load_model("longer", "cpu").source == f"{predict.MODEL_FILE} of longer"
    with pytest.raises(predict.PredictError, match="nope: no such file, and .* cannot be read from an experiment"):
        predict.load_model("nope", "cpu")
