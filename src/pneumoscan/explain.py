"""Grad-CAM heatmaps: where in the X-ray a convolutional model found its evidence of pneumonia.

`heatmap` computes the map on the model-ready image; `overlay_png` draws it over the
full-resolution X-ray with the result as a caption, for a person to look at.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from pneumoscan import model_folder, preprocess
from pneumoscan.errors import PneumoscanError
from pneumoscan.models import MeanOfHeads
from pneumoscan.report import shown_probability


class _OneLogit(nn.Module):
    """The network as grad-cam expects a classifier: scores shaped (N, C), here C = 1."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The frozen trunk's output carries no gradient. Making it a leaf that requires one lets
        # gradients reach the head's activations whatever the parameters' requires_grad flags
        # are, and stops back-propagation there instead of running it through the trunk.
        logits = []
        for member in self.network.members:  # a mixture's members; else the network itself
            features = member.trunk(x).detach().requires_grad_(True)
            logits.append(member.head(features))
        return torch.stack(logits).mean(0)


def target_layers(network: nn.Module) -> list[nn.Module]:
    """The last spatial activation of each head (of each member's, for a joined model).

    Grad-CAM averages their maps, each scaled to the input's size.
    """
    layers = []
    for member in network.members:
        heads = member.head.heads if isinstance(member.head, MeanOfHeads) else [member.head]
        layers += [target_layer(h) for h in heads]
    return layers


def target_layer(head: nn.Sequential) -> nn.Module:
    """The last spatial activation of the head: the module feeding its global pooling.

    Max-pooling layers just before it are skipped: they only halve the map's resolution.
    """
    layers = list(head)
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        raise PneumoscanError("heatmaps need a model whose head ends in global average pooling")
    index = pools[-1] - 1
    while index > 0 and isinstance(layers[index], nn.MaxPool2d):
        index -= 1
    return layers[index]


def heatmap(
    model: model_folder.LoadedModel, image: np.ndarray, label: str | None = None
) -> np.ndarray:
    """Grad-CAM map of the evidence for `label` (default PNEUMONIA): float32 (S, S) in [0, 1].

    `image` is the model-ready uint8 (S, S) array. For a NORMAL result the map shows the
    evidence for NORMAL (the negated logit): the PNEUMONIA map of a clear chest is often empty.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    model.check_heatmaps()
    size = model.input_size
    if image.shape != (size, size):
        raise PneumoscanError(
            f"heatmap: image is {'x'.join(map(str, image.shape))}, the model needs {size}x{size}"
            " (read it with reader.load(path, model.input_size))"
        )
    network = model.network
    layers = target_layers(network)
    x = torch.from_numpy(preprocess.unit_range(image[None]))
    # GradCAM switches the network to eval mode; the caller's modes are put back afterwards.
    modes = [(m, m.training) for m in network.modules()]
    cam = None
    try:
        # Gradients are needed even when the caller scores under torch.no_grad().
        with torch.enable_grad(), GradCAM(model=_OneLogit(network), target_layers=layers) as gc:
            positive = label is None or label == model.class_names[1]
            cam = gc(input_tensor=x, targets=[BinaryClassifierOutputTarget(int(positive))])
    finally:
        for module, training in modes:
            module.training = training
        # Backward filled the head's .grad tensors; a heatmap should leave nothing behind.
        for p in network.parameters():
            p.grad = None
    if cam is None:
        # GradCAM's __exit__ prints and swallows an IndexError instead of raising it.
        raise PneumoscanError("heatmap: Grad-CAM failed on this model")
    return np.clip(cam[0], 0.0, 1.0).astype(np.float32)


def overlay_png(
    original: np.ndarray,
    cam: np.ndarray,
    probability: float,
    label: str | None,
    threshold: float,
    max_side: int = 512,
) -> bytes:
    """The X-ray, scaled to `max_side`, with the heatmap blended over it and a caption: PNG bytes.

    `original` is the full-resolution greyscale image; `label` None means the image was not
    scored (not a chest X-ray).
    """
    import matplotlib

    height, width = original.shape
    # Small images are enlarged too: at 224 pixels (the data set's size) a caption is unreadable.
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = np.asarray(
        Image.fromarray(original).resize(size, Image.Resampling.LANCZOS), dtype=np.float32
    )
    cam_image = Image.fromarray(np.asarray(cam, dtype=np.float32))
    cam_resized = np.clip(np.asarray(cam_image.resize(size, Image.Resampling.BILINEAR)), 0, 1)
    colours = matplotlib.colormaps["jet"](cam_resized)[..., :3] * 255.0
    alpha = 0.4
    blended = (1 - alpha) * grey[..., None] + alpha * colours
    canvas = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    outcome = label if label is not None else "not scored: not a chest X-ray"
    shown = shown_probability(probability, digits=2)
    _caption(canvas, f"P(pneumonia) {shown} (threshold {threshold:.2f}) -> {outcome}")
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _caption(canvas: Image.Image, text: str) -> None:
    """White text on a dark strip across the bottom, sized to fit the width."""
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas, "RGBA")
    margin = max(2, width // 64)
    font_size = max(8, height // 24)
    font = ImageFont.load_default(size=font_size)
    while font_size > 8 and draw.textlength(text, font=font) > width - 2 * margin:
        font_size -= 1
        font = ImageFont.load_default(size=font_size)
    left, top, _, bottom = draw.textbbox((0, 0), text, font=font)
    strip = bottom - top + 2 * margin
    # Translucent so the lung bases under the strip still show faintly.
    draw.rectangle((0, height - strip, width, height), fill=(0, 0, 0, 200))
    draw.text((margin - left, height - strip + margin - top), text, font=font, fill="white")
