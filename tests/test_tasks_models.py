"""Label encodings of each task, and every backbone with the configured head."""

import pandas as pd
import pytest
import torch

from cxr14 import labels, models, tasks
from cxr14.batches import Augment, prepare
from cxr14.params import ParamError

ROWS = pd.DataFrame({"labels": ["No Finding", "Cardiomegaly|Effusion", "Hernia", "Fibrosis|Mass"]})


def task(kind, target="Fibrosis", negatives=1.0):
    return tasks.Task(kind, target, negatives)


def test_multilabel14_no_finding_is_all_zeros():
    y = tasks.targets(ROWS, task("multilabel14"))
    assert y.shape == (4, 14)
    assert y[0].sum() == 0
    assert y[1].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # Cardiomegaly (1), Effusion (4)
    assert y[3].tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]  # Fibrosis (6), Mass (9)


def test_multilabel15_puts_no_finding_at_index_10():
    y = tasks.targets(ROWS, task("multilabel15"))
    assert labels.ALL_LABELS[10] == "No Finding"
    assert y[0].tolist() == [0] * 10 + [1] + [0] * 4
    assert y[2].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # Hernia (7)


def test_findings_only_drops_no_finding_images_from_every_part():
    for part in ("train", "val", "test"):
        kept = tasks.select(ROWS, task("multilabel14_findings_only"), part, seed=0)
        assert list(kept["labels"]) == ["Cardiomegaly|Effusion", "Hernia", "Fibrosis|Mass"]


def test_binary_training_set_is_all_positives_plus_negatives_per_positive():
    rows = pd.DataFrame({"labels": ["Fibrosis"] * 3 + ["No Finding"] * 20 + ["Mass|Fibrosis"]})
    kept = tasks.select(rows, task("binary", negatives=2.0), "train", seed=0)
    y = tasks.targets(kept, task("binary", negatives=2.0))
    assert y.shape[1] == 1 and y.sum() == 4 and len(kept) == 4 + 8
    assert len(tasks.select(rows, task("binary"), "test", seed=0)) == len(rows)  # test keeps everything


@pytest.mark.parametrize("backbone, top", [(b, "replace_last") for b in models.BACKBONES] + [
    (b, "pooled") for b in ("vgg16", "efficientnet_b0", "mobilenet_v3_small")])  # where pooled is another network
def test_every_backbone_builds_and_trains_one_step(backbone, top):
    config = models.ModelConfig(backbone, "none", top, [16, 8], 0.1, None)
    size = models.input_size(config, 40)
    net = models.create_model(config, 14, size)
    x = torch.randint(0, 255, (2, 1, 40, 40), dtype=torch.uint8)
    net.train()
    out = net(prepare(x, size, Augment((0.8, 1.0), True, 5.0), torch.Generator().manual_seed(0)))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 14)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(2, 14))
    loss.backward()
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == 14 and head.weight.grad is not None


def test_inception_defaults_to_299_and_trains_without_its_auxiliary_head_below():
    assert models.input_size(models.ModelConfig("inception_v3", "none", "replace_last", [], 0.0, None), 64) == 299
    with pytest.raises(ParamError, match="at least 75 pixels for inception_v3"):
        models.input_size(models.ModelConfig("inception_v3", "none", "replace_last", [], 0.0, 64), 64)
    small = models.create_model(models.ModelConfig("inception_v3", "none", "replace_last", [], 0.0, 96), 14, 96).train()
    out = small(torch.zeros(2, 3, 96, 96))
    assert not isinstance(out, tuple) and out.shape == (2, 14)
    full = models.create_model(models.ModelConfig("inception_v3", "none", "replace_last", [], 0.0, None), 14, 299)
    assert full.AuxLogits is not None


def test_head_layers_follow_the_report():
    head = models.head(1024, [256, 50], 0.1, 14)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [256, 50, 14]
    assert [type(m).__name__ for m in models.head(1024, [], 0.0, 14)] == ["Linear"]  # CheXNet's


def test_gray_input_reaches_the_model_as_three_normalized_channels():
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = prepare(x, 8, None, None)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out, torch.full_like(out, (1 - 0.449) / 0.226))


def test_vgg16_pooled_is_keras_include_top_false_with_the_head_on_512_pooled_features():
    pooled = models.create_model(models.ModelConfig("vgg16", "none", "pooled", [256, 50], 0.0, None), 14, 64)
    linears = [m for m in pooled.classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 50), (50, 14)]
    assert isinstance(pooled.avgpool, torch.nn.AdaptiveAvgPool2d) and pooled.avgpool.output_size == 1


def test_vgg16_replace_last_keeps_torchvisions_4096_wide_layers():
    kept = models.create_model(models.ModelConfig("vgg16", "none", "replace_last", [256, 50], 0.0, None), 14, 64)
    linears = [(m.in_features, m.out_features) for m in kept.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(25088, 4096), (4096, 4096), (4096, 256), (256, 50), (50, 14)]


def test_densenet_is_the_same_network_either_way():
    shapes = [[tuple(p.shape) for p in models.create_model(
        models.ModelConfig("densenet121", "none", top, [256, 50], 0.0, None), 14, 64).parameters()]
        for top in models.TOPS]
    assert shapes[0] == shapes[1]
