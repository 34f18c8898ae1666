"""Views of an X-ray as another hospital's equipment would give it: exposure, windowing,
sharpness, noise, framing. Each view maps an 8-bit greyscale image to another.

The exposure views measure invariance (`bench/exposure.py`); all of them fit the outer tier of
the domain check, the distance beyond which an image is no chest X-ray at all (`guard`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

View = Callable[[np.ndarray], np.ndarray]


def _levels(image: np.ndarray, f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.clip(np.rint(f(image.astype(np.float64))), 0, 255).astype(np.uint8)


def offset(delta: float) -> View:
    return lambda image: _levels(image, lambda x: x + delta)


def gain(factor: float) -> View:
    return lambda image: _levels(image, lambda x: x * factor)


def gamma(power: float) -> View:
    return lambda image: _levels(image, lambda x: 255.0 * (x / 255.0) ** power)


def _blur(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(2)))


def _noise(image: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(int(image.sum()) % (2**32))  # the same noise for the same image
    return _levels(image, lambda x: x + rng.normal(0.0, 12.0, x.shape))


def _crop(image: np.ndarray) -> np.ndarray:
    h, w = image.shape
    return image[h // 8 : h - h // 16, w // 10 : w - w // 10]


def _rotate(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(8, resample=Image.Resampling.BILINEAR))


def _low_contrast(image: np.ndarray) -> np.ndarray:
    return _levels(image, lambda x: 64.0 + 0.5 * x)


# A different exposure, detector or window: the invariance the models are held to.
EXPOSURE: dict[str, View] = {
    "offset+20": offset(20),
    "offset-20": offset(-20),
    "gain0.85": gain(0.85),
    "gain1.15": gain(1.15),
    "gamma0.8": gamma(0.8),
    "gamma1.25": gamma(1.25),
}
# Everything else that makes a chest X-ray from elsewhere look unlike the training films.
VIEWS: dict[str, View] = {
    **EXPOSURE,
    "blur": _blur,
    "noise": _noise,
    "crop": _crop,
    "rotate8": _rotate,
    "low-contrast": _low_contrast,
}
