"""The preprocessing between the image reader and a network, recorded in every model.json.

The reader (`reader.load`) turns any file into an 8-bit greyscale frame of the model's input
size; `unit_range` scales it to what a network takes. `record` is what model.json says about
both, and `check` refuses a model whose record this reader cannot reproduce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan import reader
from pneumoscan.errors import PneumoscanError

RESIZE = (
    f"whole frame squashed to a square, no crop: frames over {reader.DATASET_SIDE} px "
    f"first to {reader.DATASET_SIDE} px (Lanczos), then to input_size (bilinear)"
)
INTENSITY = "8-bit greyscale / 255 -> [0, 1], one channel; the network standardises"


def unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 frames shaped (N, S, S) -> float32 (N, 1, S, S) in [0, 1]: every network's input."""
    return np.asarray(images, dtype=np.float32)[:, None] / 255.0


def record(input_size: int) -> dict:
    """What model.json says about the preprocessing this reader applies."""
    return {
        "reader_version": reader.VERSION,
        "reader": "any format -> 8-bit greyscale (pneumoscan.reader.read_image)",
        "resize": RESIZE,
        "input_size": input_size,
        "intensity": INTENSITY,
    }


def check(meta: dict, folder: Path) -> None:
    """Refuse a model trained on preprocessing this reader does not apply.

    A record without `reader_version` was written before the version was stored: by reader 1,
    whose preprocessing this one applies.
    """
    saved = meta.get("preprocessing", {})
    if "reader_version" not in saved:
        return
    expected = record(int(meta["input_size"]))
    for key, value in saved.items():
        if key in expected and value != expected[key]:
            raise PneumoscanError(
                f"{folder}: the model was trained with preprocessing {key} {value!r}; this "
                f"pneumoscan applies {expected[key]!r} and cannot reproduce it"
            )
