"""What the project knows of each torchvision backbone, in one place: adding a backbone is one entry in BACKBONES.

An entry says how to build the network (torchvision's builder of that name, with any options it needs), which
module its pooled conv features feed (the classifier that model.top and the head replace), where its heatmaps
come from (the Grad-CAM layer; plain CAM's layer, what the forward applies after it, and under which model.top
CAM is defined), its default input side, and any auxiliary output that training adds to the loss. It is read by
cxr14.models (building), cxr14.cam (heatmaps), the localize stage's check and the train stage (the loss).

This module imports torch only inside the functions that use it: the weights stage reads the names without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

TOPS = ("replace_last", "pooled")


def _relu(features: torch.Tensor) -> torch.Tensor:
    from torch.nn import functional

    return functional.relu(features)


def _vgg_global_pool(model: nn.Module) -> int:
    """VGG16 under model.top pooled: its 7x7 pooling (which feeds fc6) becomes global average pooling, which
    feeds the head instead, as Keras' include_top=False, pooling='avg'; returns the 512 pooled features."""
    from torch import nn

    model.avgpool = nn.AdaptiveAvgPool2d(1)
    return [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels


def _inception_options(size: int, pretrained: bool) -> dict:
    """Its auxiliary head (a second loss in training) is sized for 299 px: smaller inputs train without it."""
    return {"aux_logits": size >= BACKBONES["inception_v3"].input_size, "init_weights": not pretrained}


@dataclass(frozen=True)
class Backbone:
    classifier: str                # the module the globally pooled conv features feed (torchvision's name)
    gradcam_layer: str             # the module whose maps Grad-CAM weights: the last conv block
    cam_layer: str                 # the maps plain CAM weights: those the global pooling averages
    cam_tops: tuple[str, ...]      # the model.top values under which plain CAM is defined (with model.head.hidden [])
    after_cam_layer: Callable | None = None  # what the forward applies between cam_layer and the pooling
    input_size: int | None = None  # the input side when model.input_size is null; None: the packed images' side
    auxiliary: str | None = None   # a second classifier on an inner layer: its logits come second in training
    auxiliary_loss_weight: float = 0.0  # its loss's weight beside the main one
    options: Callable[[int, bool], dict] | None = None  # builder options, from (input side, ImageNet weights or not)
    global_pool: Callable[[nn.Module], int] | None = None  # model.top pooled, where the classifier does not take
    # the pooled features as they are: make the network pool globally, return the feature count


def _densenet() -> Backbone:
    # ... denseblock4, norm5; the forward applies a ReLU after it
    return Backbone("classifier", "features", "features", TOPS, after_cam_layer=_relu)


def _resnet() -> Backbone:
    return Backbone("fc", "layer4", "layer4", TOPS)


BACKBONES: dict[str, Backbone] = {
    "densenet121": _densenet(),
    "densenet169": _densenet(),
    "densenet201": _densenet(),
    # Grad-CAM: the last ReLU's 14x14 maps; CAM: the max-pooled 7x7 ones. model.top replace_last keeps fc6 and
    # fc7 (4096 wide) between them and the head, where CAM is not defined.
    "vgg16": Backbone("classifier", "features.29", "features", ("pooled",), global_pool=_vgg_global_pool),
    # torchvision's reference training weighs the auxiliary loss 0.4
    "inception_v3": Backbone("fc", "Mixed_7c", "Mixed_7c", TOPS, input_size=299, auxiliary="AuxLogits",
                             auxiliary_loss_weight=0.4, options=_inception_options),
    "resnet50": _resnet(),
    # ... the 1x1 conv to 1280 channels with its SiLU
    "efficientnet_b0": Backbone("classifier", "features", "features", TOPS),
    "resnet18": _resnet(),
    # ... the 1x1 conv to 576 channels with its Hardswish; replace_last keeps a 1024-wide layer before the head
    "mobilenet_v3_small": Backbone("classifier", "features", "features", ("pooled",)),
}


def get(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r} is not known: known backbones are " + ", ".join(BACKBONES))
    return BACKBONES[name]


def pooled_for_cam() -> list[str]:
    """The backbones under which plain CAM needs model.top pooled (for the messages that say so)."""
    return [name for name, backbone in BACKBONES.items() if "replace_last" not in backbone.cam_tops]
