"""Where the model looks: heatmaps, the crop's inverse geometry, Wang et al.'s box scores, the synthetic box
list, and the localize stage (a model trained on the synthetic signs points at them; a split without boxed
test images gives empty metrics)."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr14 import boxes, cam, localize, models, synthetic
from cxr14.images import crop_resize
from stages import crop, download, filter, resample, split, train
from stages import localize as localize_stage

from .conftest import make_project, write_params

# ---------------------------------------------------------------- geometry: the crop and its inverse


def test_a_box_maps_to_the_packed_image_and_back_within_a_pixel():
    geometry = localize.Crop(width=1024, height=1024, fraction=0.75, size=300)
    box = np.array([[300.0, 400.0, 120.0, 80.0]])
    packed = geometry.to_packed(box)
    assert np.allclose(packed, [[(300 - 128) * 300 / 768, (400 - 128) * 300 / 768, 120 * 300 / 768, 80 * 300 / 768]])
    assert np.abs(geometry.to_original(packed) - box).max() < 1


def test_a_box_partly_outside_the_square_is_clipped_to_it_both_ways():
    geometry = localize.Crop(width=1024, height=1024, fraction=0.75, size=300)  # the square is [128, 896]
    box = np.array([[50.0, 800.0, 200.0, 200.0]])  # x 50..250, y 800..1000
    packed = geometry.to_packed(box)
    assert packed[0, 0] == 0 and packed[0, 1] + packed[0, 3] == pytest.approx(300)
    assert np.abs(geometry.to_original(packed) - [[128, 800, 122, 96]]).max() < 1
    assert np.all(geometry.to_packed(np.array([[0.0, 0.0, 100.0, 100.0]]))[0, 2:] == 0)  # wholly outside


def test_the_geometry_is_the_crop_stages_own_on_a_non_square_image():
    """A bright box drawn in an original image lands where to_packed says, after the crop stage's crop_resize."""
    width, height, fraction, size = 400, 300, 0.8, 120
    original = np.zeros((height, width), dtype=np.uint8)
    original[120:180, 140:220] = 255  # x 140..220, y 120..180
    packed = crop_resize(Image.fromarray(original), fraction, size)
    rows, columns = np.nonzero(packed > 127)
    found = [columns.min(), rows.min(), columns.max() + 1 - columns.min(), rows.max() + 1 - rows.min()]
    expected = localize.Crop(width, height, fraction, size).to_packed(np.array([[140.0, 120.0, 80.0, 60.0]]))[0]
    assert np.abs(np.array(found) - expected).max() <= 1


def test_a_point_maps_back_to_the_original_pixels():
    geometry = localize.Crop(width=128, height=128, fraction=0.75, size=64)  # square [16, 112], 1.5 px a pixel
    assert geometry.point_to_original((32.0, 0.0)) == (64.0, 16.0)
    assert geometry.point_to_original(None) is None


# ---------------------------------------------------------------- scores on hand-made heatmaps and boxes


def test_iobb_is_the_share_of_the_predicted_box_inside_the_true_box():
    truth = np.array([10.0, 10.0, 20.0, 20.0])
    predicted = np.array([[15.0, 15.0, 5.0, 5.0], [0.0, 10.0, 20.0, 20.0], [50.0, 50.0, 5.0, 5.0]])
    assert localize.iobb(predicted, truth).tolist() == [1.0, 0.5, 0.0]


def test_iou_is_intersection_over_union():
    truth = np.array([0.0, 0.0, 10.0, 10.0])
    predicted = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    assert localize.iou(predicted, truth) == pytest.approx([1.0, 50 / 150, 100 / 400])


def test_no_predicted_box_scores_zero():
    assert localize.best(localize.iobb(np.zeros((0, 4)), np.array([0.0, 0.0, 5.0, 5.0]))) == 0.0


def test_thresholding_gives_one_box_per_connected_region_at_each_threshold():
    heatmap = np.zeros((20, 30))
    heatmap[2:6, 3:9] = 1.0     # a strong region
    heatmap[10:15, 20:28] = 0.5  # a weaker one
    found = localize.heatmap_boxes(heatmap, [0.3, 0.7])
    assert sorted(map(tuple, found.tolist())) == [(3, 2, 6, 4), (3, 2, 6, 4), (20, 10, 8, 5)]


def test_the_threshold_is_a_share_of_the_maps_maximum_and_a_zero_map_has_no_box():
    heatmap = np.zeros((10, 10))
    heatmap[4:6, 4:6] = 0.2  # scaled to its maximum: the region passes 0.5
    assert localize.heatmap_boxes(heatmap, [0.5]).tolist() == [[4, 4, 2, 2]]
    assert localize.heatmap_boxes(np.zeros((10, 10)), [0.5]).shape == (0, 4)


def test_accuracy_counts_the_scores_above_each_threshold():
    assert localize.accuracy(np.array([0.05, 0.2, 0.3, 0.6]), [0.1, 0.25, 0.5]) == {"0.1": 0.75, "0.25": 0.5, "0.5": 0.25}
    assert localize.accuracy(np.array([]), [0.1]) == {"0.1": None}


def test_pointing_is_the_maximum_inside_a_true_box():
    heatmap = np.zeros((10, 10))
    heatmap[7, 2] = 1.0
    point = localize.peak(heatmap)
    assert point == (2.5, 7.5)
    assert localize.inside(point, np.array([[0.0, 6.0, 4.0, 4.0]]))
    assert not localize.inside(point, np.array([[5.0, 0.0, 4.0, 4.0]]))
    assert localize.peak(np.zeros((4, 4))) is None and not localize.inside(None, np.array([[0.0, 0.0, 4.0, 4.0]]))


def test_a_flat_top_points_at_its_centre():
    heatmap = np.zeros((8, 8))
    heatmap[0:4, 0:2] = 1.0
    assert localize.peak(heatmap) == (1.0, 2.0)


def test_the_random_baseline_is_seeded_per_image():
    first = localize.random_heatmaps([0, 1, 2], (3, 4), seed=5)
    assert first.shape == (3, 3, 4) and first.min() >= 0 and first.max() < 1
    assert np.array_equal(localize.random_heatmaps([1], (3, 4), seed=5)[0], first[1])
    assert not np.array_equal(localize.random_heatmaps([1], (3, 4), seed=6)[0], first[1])


# ---------------------------------------------------------------- heatmaps


def small_net(hidden=(), backbone="resnet18", top="replace_last", outputs=3):
    torch.manual_seed(0)
    return models.create_model(models.ModelConfig(backbone, "none", top, list(hidden), 0.0, None), outputs, 64)


def test_heatmaps_are_unit_maps_at_the_input_side_and_leave_the_model_as_it_was():
    net = small_net().train()
    images = torch.randn(4, 3, 64, 64)
    maps = cam.class_heatmaps(net, "resnet18", images, [0, 1, 2, 0])
    assert maps.shape == (4, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert cam.class_heatmaps(net, "resnet18", images, [0, 1, 2, 0], upsample=False).shape == (4, 2, 2)


def test_for_pooled_features_under_one_linear_layer_gradcam_is_cam():
    """With global average pooling then one linear layer, Grad-CAM's weights are the classifier's (over h x w)."""
    net = small_net()
    images = torch.randn(2, 3, 64, 64)
    gradcam = cam.class_heatmaps(net, "resnet18", images, [1, 2], "gradcam", upsample=False)
    plain = cam.class_heatmaps(net, "resnet18", images, [1, 2], "cam", upsample=False)  # min-max scaled: compare after ReLU
    raw = cam._cam(net, "resnet18", images, [1, 2])[:, 0].clamp(min=0)
    assert torch.allclose(gradcam, raw / raw.flatten(1).amax(1)[:, None, None], atol=1e-4)
    assert plain.min() == 0 and plain.max() == 1


def test_plain_cam_is_refused_under_hidden_layers():
    net = small_net(hidden=[8])
    assert cam.cam_weights(net, "resnet18") is None
    with pytest.raises(ValueError, match="model.head.hidden"):
        cam.class_heatmaps(net, "resnet18", torch.randn(1, 3, 64, 64), [0], "cam")


@pytest.mark.parametrize("backbone", ["densenet121", "vgg16", "efficientnet_b0", "mobilenet_v3_small"])
def test_every_backbone_family_has_a_target_layer(backbone):
    net = small_net(backbone=backbone, top="pooled")
    assert cam.class_heatmaps(net, backbone, torch.randn(2, 3, 64, 64), [0, 1]).shape == (2, 64, 64)
    assert cam.cam_weights(net, backbone) is not None


def test_an_overlay_is_an_rgb_image_of_the_images_size():
    picture = cam.overlay(np.full((32, 32), 128, dtype=np.uint8), np.linspace(0, 1, 64).reshape(8, 8))
    assert picture.mode == "RGB" and picture.size == (32, 32)
    pixels = np.asarray(picture).astype(int)
    assert pixels[-1, -1, 0] > pixels[-1, -1, 2] and pixels[0, 0, 2] >= pixels[0, 0, 0]  # hot red, cold blue


# ---------------------------------------------------------------- the box list


def test_nih_box_list_is_read_with_its_eight_findings():
    listed = boxes.read(boxes.REFERENCE)
    assert len(listed) == 984 and listed["image"].nunique() == 880
    assert set(listed["label"]) == set(boxes.BOXED_FINDINGS)  # NIH writes Infiltrate; read as Infiltration


def test_a_box_list_written_is_read_back(tmp_path):
    frame = pd.DataFrame({"image": ["a.png"], "label": ["Mass"], "x": [1.5], "y": [2.0], "w": [3.0], "h": [4.0]})
    boxes.write(tmp_path / "b.csv", frame)
    assert (tmp_path / "b.csv").read_text().splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h]"
    pd.testing.assert_frame_equal(boxes.read(tmp_path / "b.csv"), frame)


@pytest.mark.parametrize("finding", ["Mass", "Nodule"])
@pytest.mark.parametrize("image", ["00000001_000.png", "00000003_001.png"])
def test_a_synthetic_box_is_where_the_drawn_sign_changed_the_image(finding, image):
    """The same chest with and without the sign (the later random draws shift, so the whole image changes a
    little): the change is large inside the box and small in a ring just outside it."""
    row = pd.Series({"image": image, "patient_id": 1, "view": "PA", "labels": finding})
    healthy = row.copy().set_axis(row.index).replace(finding, "No Finding")
    clean = synthetic.render_with_boxes(healthy, 128, seed=0)[0].astype(float)
    sick, drawn = synthetic.render_with_boxes(row, 128, seed=0)
    assert [name for name, *_ in drawn] == [finding]
    x, y, w, h = (int(v) for v in drawn[0][1:])
    change = np.abs(sick - clean)
    ring = np.zeros(change.shape, dtype=bool)
    ring[max(y - 6, 0):y + h + 6, max(x - 6, 0):x + w + 6] = True
    ring[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = False
    assert change[y:y + h, x:x + w].mean() > 3 * change[ring].mean()


def test_synthetic_boxes_turn_with_a_rotated_image_and_a_lateral_one_has_none():
    row = pd.Series({"image": "00000001_000.png", "patient_id": 1, "view": "PA", "labels": "Nodule"})
    _, upright = synthetic.render_with_boxes(row, 96, seed=0)
    turned, rotated = synthetic.render_with_boxes(row, 96, seed=0, blacklist_reason="rotated")
    assert len(rotated) == len(upright) and [b[3] * b[4] for b in rotated] == [b[3] * b[4] for b in upright]
    assert synthetic.render_with_boxes(row, 96, seed=0, blacklist_reason="non_pa_ap_view")[1] == []


def test_the_download_stage_writes_the_synthetic_box_list(project):
    download.main(write_params(project, {"data": {"synthetic": {"images": 60}}}))
    listed = boxes.read(project / "data/raw/bboxes.csv")
    drawn = pd.read_csv(project / "data/raw/metadata.csv", dtype=str)
    carrying = {(r.image, f) for r in drawn.itertuples() for f in r.labels.split("|") if f in boxes.BOXED_FINDINGS}
    assert set(zip(listed["image"], listed["label"])) <= carrying
    assert len(set(zip(listed["image"], listed["label"]))) >= 0.9 * len(carrying)  # lateral-like images have none
    assert (listed[["x", "y"]] >= 0).all().all() and ((listed["x"] + listed["w"]) <= 64).all()


# ---------------------------------------------------------------- the stage


def run_localize(folder, params, out, raw=None):
    localize_stage.main(params, cropped=folder / "data/crop", split_dir=folder / "data/split",
                        raw=raw or folder / "data/raw", model_path=out / "model.pt",
                        metrics_path=out / "localize.json", gallery_dir=out / "gallery")
    return json.loads((out / "localize.json").read_text())


@pytest.fixture(scope="module")
def tiny_model(tiny_pipeline, tmp_path_factory):
    """One epoch on the session's tiny pipeline (32 px): a model.pt to run the stage with, quickly."""
    out = tmp_path_factory.mktemp("tiny_model")
    params = write_params(out, {"train.epochs": 1})
    train.main(params, cropped=tiny_pipeline / "data/crop", resampled=tiny_pipeline / "data/resample",
               split_dir=tiny_pipeline / "data/split", out=out, live_dir=out / "live")
    return tiny_pipeline, params, out


def test_the_stage_scores_every_boxed_test_image_beside_the_random_map(tiny_model):
    folder, params, out = tiny_model
    result = run_localize(folder, params, out)
    test = set(pd.read_csv(folder / "data/split/test.csv", dtype={"image": str})["image"])
    listed = boxes.read(folder / "data/raw/bboxes.csv")
    assert result["boxes_scored"] == int(listed["image"].isin(test).sum()) > 0
    assert result["test_images_without_boxes"] == len(test) - listed.loc[listed["image"].isin(test), "image"].nunique()
    for part in ("model", "random"):
        assert set(result[part]) == {"boxes", "pointing", "accuracy_iobb", "mean_iobb", "accuracy_iou", "mean_iou"}
        assert set(result[part]["accuracy_iobb"]) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
    assert result["wang_2017"]["iobb"]["0.1"]["Cardiomegaly"] == 0.9931
    gallery = json.loads((out / "gallery/gallery.json").read_text())["images"]
    assert {e["finding"] for e in gallery} == set(result["model"]["boxes"])
    assert all((out / "gallery" / e["file"]).exists() for e in gallery)


def test_a_split_without_boxed_test_images_gives_empty_metrics(tiny_model, tmp_path):
    folder, params, out = tiny_model
    test = set(pd.read_csv(folder / "data/split/test.csv", dtype={"image": str})["image"])
    listed = boxes.read(folder / "data/raw/bboxes.csv")
    boxes.write(tmp_path / "bboxes.csv", listed[~listed["image"].isin(test)])
    result = run_localize(folder, params, out, raw=tmp_path)
    assert result["boxes_scored"] == 0 and result["test_images_with_boxes"] == 0
    assert result["model"] == {} and result["random"] == {} and "no test image has a box" in result["note"]
    assert json.loads((out / "gallery/gallery.json").read_text())["images"] == []
    assert not list((out / "gallery").rglob("*.png"))  # an earlier run's overlays are gone


@pytest.fixture(scope="module")
def effusion_model(tmp_path_factory):
    """A one-against-all Effusion model (resnet18 from scratch, 64 px crops) trained through the stages on the
    synthetic set, whose Effusion sign is a bright fluid level at one or both lung bases (about 1,400 images
    drawn, so that some 130 test images carry the sign; a few minutes on 2 CPU cores)."""
    folder = make_project(tmp_path_factory.mktemp("effusion"))
    here = os.getcwd()
    os.chdir(folder)
    try:
        params = write_params(folder, {
            "data.synthetic.images": 800, "data.synthetic.image_size": 96, "data.synthetic.min_positives_per_label": 100,
            "crop.pixels": 64, "split.method": "patient", "split.patient.sizes": [0.5, 0.1, 0.4], "task.kind": "binary",
            "task.target": "Effusion",
            "train.epochs": 12})
        for stage in (download, filter, crop, split, resample, train):
            stage.main(params)
    finally:
        os.chdir(here)
    return folder, params


@pytest.mark.e2e
def test_a_model_trained_on_the_signs_points_at_them_far_more_often_than_a_random_map(effusion_model):
    folder, params = effusion_model
    result = run_localize(folder, params, folder / "data/train")
    assert result["boxes_scored"] >= 30
    ours, chance = result["model"]["pointing"]["Effusion"], result["random"]["pointing"]["Effusion"]
    assert ours >= chance + 0.25, (ours, chance)
    assert set(result["findings_not_predicted"]) == set(boxes.BOXED_FINDINGS) - {"Effusion"}  # a binary model


def test_the_check_refuses_plain_cam_under_hidden_layers():
    from cxr14.params import ParamError

    from .conftest import params_with

    with pytest.raises(ParamError, match="localize.method"):
        localize_stage.check(params_with({"localize.method": "cam", "model.head.hidden": [16]}))
    assert localize_stage.check(params_with({"localize.method": "cam"})).method == "cam"


def test_a_heatmap_grid_too_coarse_to_place_a_box_is_not_shown_as_a_table(capsys):
    result = {"boxes_scored": 10, "images_scored": 5, "method": "gradcam", "heatmap_grid": [2, 2], "note": ""}
    localize.print_table(result, ["Atelectasis"])
    printed = capsys.readouterr().out
    assert "not shown: the heatmap is a 2 x 2 grid" in printed and "IoBB" not in printed
