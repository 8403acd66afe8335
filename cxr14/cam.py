"""Where a network looks: class activation heatmaps (Grad-CAM, plain CAM) and overlays for galleries.

Grad-CAM (Selvaraju et al. 2017, captum's LayerGradCam): the last conv block's feature maps weighted
by the spatially averaged gradients of the class logit, ReLU, upsampled to the input. Plain CAM
(Zhou et al. 2016; the heatmaps of Wang et al.'s ChestX-ray8): the feature maps weighted by the
classifier's weights for the class, which is exact only when the pooled conv features feed one linear
layer (model.head.hidden: []; for vgg16 and mobilenet_v3_small also model.top: pooled).
Each heatmap is scaled to [0, 1] per image: Grad-CAM by its maximum, CAM from its minimum to maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cxr14 import backbones

METHODS = ("gradcam", "cam")


def target_layer(model: nn.Module, backbone: str, method: str = "gradcam") -> nn.Module:
    """The module whose output the heatmap is made from (cxr14/backbones.py names it for each backbone)."""
    entry = backbones.get(backbone)
    return model.get_submodule(entry.gradcam_layer if method == "gradcam" else entry.cam_layer)


def cam_weights(model: nn.Module, backbone: str) -> torch.Tensor | None:
    """The [outputs, channels] weights of the one linear layer on the globally pooled conv features,
    or None when something else lies between them (hidden layers; VGG16's or MobileNet's own
    fully connected layers kept by model.top: replace_last): then plain CAM is not defined."""
    classifier = model.get_submodule(backbones.get(backbone).classifier)
    leaves = [m for m in classifier.modules() if not list(m.children())]
    linears = [m for m in leaves if isinstance(m, nn.Linear)]
    if len(linears) != 1 or any(not isinstance(m, (nn.Linear, nn.Dropout)) for m in leaves):
        return None
    return linears[0].weight


def class_heatmaps(model: nn.Module, backbone: str, images: torch.Tensor, labels: Sequence[int],
                   method: str = "gradcam", upsample: bool = True) -> torch.Tensor:
    """Heatmaps [N, H, W] in [0, 1] at the input's resolution: for image i, where output labels[i] looks.

    `model` is cxr14.models' network of `backbone` (model.backbone); `images` [N, C, H, W] are normalised as
    the model expects, on the model's device. The model is put in eval mode and left there; its parameters'
    gradients are not touched. upsample=False: the maps at the target layer's own grid [N, h, w] (each cell
    covers H / h x W / w input pixels)."""
    if method not in METHODS:
        raise ValueError(f"heatmap method {method!r} is not valid: expected one of {', '.join(METHODS)}")
    labels = [int(j) for j in labels]
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images: give one output index per image")
    model.eval()
    with torch.enable_grad():
        maps = _gradcam(model, backbone, images, labels) if method == "gradcam" else _cam(model, backbone, images, labels)
    if upsample:
        maps = F.interpolate(maps.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return _unit(maps.float()[:, 0], method)


def _gradcam(model: nn.Module, backbone: str, images: torch.Tensor, labels: list[int]) -> torch.Tensor:
    from captum.attr import LayerGradCam  # imported here: captum loads matplotlib, which the stages need only here

    layer = target_layer(model, backbone, "gradcam")
    inputs = images.detach().requires_grad_(True)  # so the layer's output carries gradients with frozen weights
    maps = LayerGradCam(model, layer).attribute(inputs, target=labels, relu_attributions=True)
    return maps.detach()


def _cam(model: nn.Module, backbone: str, images: torch.Tensor, labels: list[int]) -> torch.Tensor:
    weights = cam_weights(model, backbone)
    if weights is None:
        raise ValueError(f"plain CAM is not available for this {backbone}: it needs the globally pooled conv "
                         "features followed by one linear layer (model.head.hidden: [], and model.top: pooled for "
                         f"{' and '.join(backbones.pooled_for_cam())}); use gradcam")
    seen: list[torch.Tensor] = []
    handle = target_layer(model, backbone, "cam").register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    features = seen[0].float()
    after = backbones.get(backbone).after_cam_layer
    if after is not None:
        features = after(features)
    w = weights.detach().float()[torch.as_tensor(labels, device=weights.device)]  # [N, channels]
    return torch.einsum("nc,nchw->nhw", w, features).unsqueeze(1)


def _unit(maps: torch.Tensor, method: str) -> torch.Tensor:
    """Each map scaled to [0, 1]: Grad-CAM (already >= 0) by its maximum, CAM from minimum to maximum;
    a flat map becomes zeros."""
    flat = maps.flatten(1)
    low = flat.amin(1) if method == "cam" else torch.zeros(len(maps), device=maps.device)
    span = flat.amax(1) - low
    scaled = (maps - low[:, None, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None, None]
    return scaled.clamp_(0, 1)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray | torch.Tensor, alpha: float = 0.45) -> Image.Image:
    """A gray image [H, W] (uint8) under a heatmap [h, w] in [0, 1] (resized to the image), as an RGB PIL image:
    the heatmap in a blue-green-yellow-red ramp, more opaque where it is higher."""
    gray = np.asarray(image_uint8, dtype=np.float32) / 255
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != gray.shape:
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(gray.shape[::-1], Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0, 1)
    color = _ramp(heat)
    weight = (alpha * heat)[..., None]
    rgb = gray[..., None] * (1 - weight) + color * weight
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


def _ramp(value: np.ndarray) -> np.ndarray:
    """A jet-like colour ramp: 0 blue, 0.33 cyan-green, 0.66 yellow, 1 red."""
    stops = np.array([0, 1 / 3, 2 / 3, 1])
    colors = np.array([[0, 0, 1], [0, 1, 0.5], [1, 1, 0], [1, 0, 0]], dtype=np.float32)
    return np.stack([np.interp(value, stops, colors[:, c]) for c in range(3)], axis=-1)
