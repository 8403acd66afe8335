"""The model file: what train writes, evaluate, localize and predict read back as the same network; a file
that is not one, or lacks a field, is refused naming what is wrong. And the backbone registry: what it says
of each backbone is what the built network is."""

import pytest
import torch

from cxr14 import backbones, cam, model_file, models, tasks
from cxr14.params import ParamError
from stages import localize, train

from .conftest import params_with


def saved_model(path, changes=None):
    params = params_with(changes)
    task, model_config, config = train.check(params)
    torch.manual_seed(0)
    net = models.create_model(model_config, len(task.names), 32)
    train.save_model(params, task, model_config, config, 32, path, net.state_dict(), 3)
    return net.eval(), params


def test_a_model_file_loads_as_the_network_that_was_saved(tmp_path):
    net, params = saved_model(tmp_path / "model.pt", {"crop.fraction": 0.5, "crop.pixels": 24})
    trained = model_file.load(tmp_path / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(trained.net(x), net(x)) and not trained.net.training
    assert trained.config == models.check(params)  # the tests' params: model.pretrained none
    assert trained.task == {"kind": "multilabel14", "target": "Fibrosis", "negatives_per_positive": 1.0}
    assert trained.names == tasks.check(params).names and trained.input_size == 32 and trained.epoch == 3
    assert (trained.crop_fraction, trained.crop_pixels, trained.source) == (0.5, 24, str(tmp_path / "model.pt"))


def test_a_file_that_is_not_a_model_file_is_refused(tmp_path):
    (tmp_path / "notes.pt").write_text("not a model")
    with pytest.raises(model_file.ModelFileError, match="notes.pt is not a model file torch can read"):
        model_file.load(tmp_path / "notes.pt")


def test_a_model_file_missing_a_field_names_it(tmp_path):
    saved_model(tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    del saved["task"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(model_file.ModelFileError, match="does not record task: .*dvc repro train"):
        model_file.load(tmp_path / "old.pt")


@pytest.mark.parametrize("backbone", list(backbones.BACKBONES))
def test_the_registry_says_what_each_built_backbone_is(backbone):
    """Its layers exist, plain CAM is defined exactly under the model.top values it lists (and localize's check
    says so), and inception_v3's auxiliary output is there at its default input side."""
    entry = backbones.get(backbone)
    for top in backbones.TOPS:
        config = models.ModelConfig(backbone, "none", top, [], 0.0, None)
        net = models.create_model(config, 3, models.input_size(config, 80))
        for method in cam.METHODS:
            assert cam.target_layer(net, backbone, method) is not None
        assert (cam.cam_weights(net, backbone) is not None) == (top in entry.cam_tops), top
        params = params_with({"localize.method": "cam", "model.backbone": backbone, "model.top": top,
                              "model.head.hidden": []})
        if top in entry.cam_tops:
            localize.check(params)
        else:
            with pytest.raises(ParamError, match="plain CAM needs"):
                localize.check(params)
    assert (entry.auxiliary is not None) == (backbone == "inception_v3")
    if entry.auxiliary:
        assert getattr(net, entry.auxiliary).fc.out_features == 3 and entry.input_size == 299
