"""One image reader for everything: any supported file becomes an 8-bit greyscale array.

Training, evaluation and prediction all go through `read_image` and `resize`, so the
pixels a model sees cannot drift between the code paths.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pneumoscan.errors import ImageReadError

MAX_PIXELS = 50_000_000  # ~7000x7000: larger than any radiograph, smaller than a bomb
MIN_SIDE = 16


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read a JPEG or PNG (8/16-bit, grey, RGB, palette, alpha) into a 2-D uint8 array."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{label}: is a folder, not an image file") from None
    except OSError as exc:
        raise ImageReadError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(f"{label}: file is empty")
    return _decode_pil(data, label)


def _decode_pil(data: bytes, label: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_header(img, label)
            img.load()
            return to_grey_uint8(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(f"{label}: image is too large to be a radiograph; refused") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{label}: not a supported image (use JPEG, PNG or DICOM)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{label}: broken or truncated image ({exc})") from None


def _check_header(img: Image.Image, label: str) -> None:
    """Refuse from the header alone, before a single pixel is decoded."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"{label}: {width}x{height} pixels exceeds the limit of {MAX_PIXELS:,}; refused"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(f"{label}: {width}x{height} pixels is too small to be a chest X-ray")
    if getattr(img, "n_frames", 1) > 1:
        raise ImageReadError(f"{label}: animated or multi-frame image; give a single frame")


def to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to 8-bit greyscale, scaling high bit depths by their full range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32)
        return _scale(arr, 65535.0)
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.int64).astype(np.float32)
        return _scale(arr, 65535.0 if arr.max() > 255 else 255.0)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return _scale(arr - lo, max(hi - lo, 1e-6))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).copy()


def _scale(arr: np.ndarray, full: float) -> np.ndarray:
    return np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Squash the whole frame to size x size (no crop), as the data set itself was made."""
    if image.shape == (size, size):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def load(source: str | Path | bytes, size: int, name: str | None = None) -> np.ndarray:
    """Read and resize: the model-ready uint8 array of one file."""
    return resize(read_image(source, name=name), size)
