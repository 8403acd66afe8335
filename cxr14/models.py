"""Networks: a torchvision backbone by name (cxr14/backbones.py), its classifier replaced by the configured head.

This module imports torch and torchvision only inside the functions that use them: the weights stage reads
the model's settings without them (its run with model.pretrained none takes 0.5 s, not 4).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cxr14 import backbones
from cxr14.backbones import TOPS
from cxr14.params import ParamError, Section, section

if TYPE_CHECKING:
    from torch import nn

BACKBONES = tuple(backbones.BACKBONES)
PRETRAINED = ("imagenet", "none")
WEIGHTS_DIR = Path("data/weights")  # the weights stage's output (stages/weights.py)


@dataclass
class ModelConfig:
    backbone: str
    pretrained: str
    top: str  # replace_last | pooled (see create_model)
    hidden: list[int]
    dropout: float
    input_size: int | None  # None: the backbone's own (299 for inception_v3), or else the packed array's


def check(params: dict) -> ModelConfig:
    settings = section(params, "model")
    backbone, pretrained = _backbone(settings)
    head = settings.section("head")
    hidden = head.get("hidden")
    if not isinstance(hidden, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ParamError("model.head.hidden", hidden, "a list of layer sizes such as [256, 50], or [] for one linear layer")
    config = ModelConfig(
        backbone=backbone,
        pretrained=pretrained,
        top=settings.choice("top", TOPS),
        hidden=hidden,
        dropout=head.number("dropout", low=0, high=1, high_open=True),  # 1 drops every feature
        input_size=settings.optional_number("input_size", low=16, integer=True),
    )
    head.finish()
    settings.finish()
    return config


def check_backbone(params: dict) -> tuple[str, str]:
    """model.backbone and model.pretrained, and no other key: all the weights stage reads (so dvc.yaml declares
    only these two for it, and a new head does not rerun it)."""
    return _backbone(section(params, "model"))


def _backbone(section: Section) -> tuple[str, str]:
    return section.choice("backbone", BACKBONES), section.choice("pretrained", PRETRAINED)


def input_size(config: ModelConfig, packed_size: int) -> int:
    """The side of the images the network sees: resized on the device from the packed array's."""
    import torchvision  # here, not at the top: the weights stage and `cxr check` then start without torch

    size = config.input_size or backbones.get(config.backbone).input_size or packed_size
    low = torchvision.models.get_model_weights(config.backbone).DEFAULT.meta.get("min_size", (1, 1))[0]
    if size < low:
        raise ParamError("model.input_size", size, f"at least {low} pixels for {config.backbone}")
    return size


def weights_file(backbone: str, folder: Path) -> Path:
    """Where the weights stage puts torchvision's ImageNet weights of `backbone` (torch.hub's layout)."""
    import torchvision

    return Path(folder) / "checkpoints" / Path(torchvision.models.get_model_weights(backbone).DEFAULT.url).name


def imagenet_weights(backbone: str, folder: Path):
    """torchvision's ImageNet weights of `backbone`, as the weights stage left them in `folder`: this never downloads."""
    import torchvision

    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    path = weights_file(backbone, folder)
    if not path.exists():
        raise ParamError(
            "model.pretrained", "imagenet",
            f"weights on disk: {path} is missing; run the weights stage first (`dvc repro weights` or `cxr weights`: "
            f"it fetches {path.name} from {weights.url}), or set model.pretrained: none to train {backbone} "
            "from scratch")
    return weights


@contextmanager
def _hub_dir(folder: Path) -> Iterator[None]:
    """torch.hub's folder set to `folder` for a while: torchvision then loads (and hash-checks) the file there."""
    import torch

    before = torch.hub.get_dir()
    torch.hub.set_dir(str(folder))
    try:
        yield
    finally:
        torch.hub.set_dir(before)


def head(features: int, hidden: list[int], dropout: float, outputs: int) -> nn.Sequential:
    """Dropout + Linear + ReLU for each hidden size, then the output layer (logits)."""
    from torch import nn

    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Dropout(dropout), nn.Linear(features, size), nn.ReLU(inplace=True)]
        features = size
    if dropout and hidden:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(features, outputs))
    return nn.Sequential(*layers)


def create_model(config: ModelConfig, outputs: int, size: int, weights_dir: Path = WEIGHTS_DIR) -> nn.Module:
    """The backbone with the head on top; `size` is the input side (see inception_v3); ImageNet weights
    (model.pretrained: imagenet) from `weights_dir`, where the weights stage put them.

    top replace_last: torchvision's classifier with its last Linear replaced by the head (VGG16 keeps
    its two 4096-wide layers). top pooled: the whole classifier replaced by the head on the globally
    average-pooled conv features, as Keras' include_top=False, pooling='avg' (VGG16: 512 features).
    For the backbones whose classifier is one Linear on pooled features (DenseNets, ResNets,
    InceptionV3) the two are the same network."""
    import torchvision
    from torch import nn

    backbone = backbones.get(config.backbone)
    weights = imagenet_weights(config.backbone, weights_dir) if config.pretrained == "imagenet" else None
    options = backbone.options(size, weights is not None) if backbone.options else {}
    with _hub_dir(Path(weights_dir)):
        model = torchvision.models.get_model(config.backbone, weights=weights, **options)
    classifier = model.get_submodule(backbone.classifier)
    if config.top == "pooled" and not isinstance(classifier, nn.Linear):
        if backbone.global_pool:
            features = backbone.global_pool(model)
        else:
            features = next(m for m in classifier.modules() if isinstance(m, nn.Linear)).in_features
        setattr(model, backbone.classifier, head(features, config.hidden, config.dropout, outputs))
    else:
        name, last = [(n, m) for n, m in classifier.named_modules() if isinstance(m, nn.Linear)][-1]
        parent = classifier.get_submodule(name.rpartition(".")[0]) if name else model
        setattr(parent, name.rpartition(".")[2] or backbone.classifier,
                head(last.in_features, config.hidden, config.dropout, outputs))
    auxiliary = getattr(model, backbone.auxiliary) if backbone.auxiliary else None
    if auxiliary is not None:  # None where the builder left it out (inception_v3 below 299 px)
        auxiliary.fc = nn.Linear(auxiliary.fc.in_features, outputs)
    return model
