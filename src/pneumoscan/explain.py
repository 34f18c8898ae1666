"""Heatmaps: where in the X-ray a convolutional model found its evidence of pneumonia.

The model's graph gives, with each logit, its class activation map (`models.head_logits_and_map`:
Grad-CAM of the head's last spatial layer, which for a head ending in global average pooling
and a linear unit is a weighted sum of that layer's maps), so no gradients and no torch are
needed. `heatmap` turns that signed map into the evidence for the label shown; `overlay_png`
draws it over the full-resolution X-ray with the result as a caption, for a person to look at.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneumoscan.report import shown_probability

# Matplotlib's "jet" colour map, (position, value) per channel as its segment data gives it, so
# that the plain install draws the familiar Grad-CAM colours without matplotlib.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB in [0, 1] (shape + (3,)), as matplotlib's 256-colour "jet"."""
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack(
        [np.interp(levels, *zip(*_JET[c], strict=True)) for c in ("red", "green", "blue")], 1
    )
    index = np.clip((np.asarray(values, dtype=np.float64) * 256).astype(np.int64), 0, 255)
    return table[index]


def heatmap(cam: np.ndarray, positive: bool = True) -> np.ndarray:
    """The evidence in a class activation map: float32 (S, S) in [0, 1].

    `cam` is the model's signed map (`ModelCard.raw_scores(..., maps=True)`), in logit units.
    `positive` (a PNEUMONIA result, or no label) shows the evidence for PNEUMONIA; otherwise
    the evidence for NORMAL, the negated map: the PNEUMONIA map of a clear chest is often empty.
    As Grad-CAM, the negative part is dropped and the rest scaled to [0, 1].
    """
    evidence = np.maximum(cam if positive else -cam, 0.0).astype(np.float32)
    evidence -= evidence.min()
    return evidence / (evidence.max() + 1e-7)


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
    height, width = original.shape
    # Small images are enlarged too: at 224 pixels (the data set's size) a caption is unreadable.
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = np.asarray(
        Image.fromarray(original).resize(size, Image.Resampling.LANCZOS), dtype=np.float32
    )
    cam_image = Image.fromarray(np.asarray(cam, dtype=np.float32))
    cam_resized = np.clip(np.asarray(cam_image.resize(size, Image.Resampling.BILINEAR)), 0, 1)
    colours = jet(cam_resized) * 255.0
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
