"""Views of an X-ray as another hospital's equipment would give it: exposure, windowing,
sharpness, noise, framing. Each view maps an 8-bit greyscale image to another.

The exposure views and the DICOM encodings (`INVARIANT`) are what a model must not change its
answer for (`bench/exposure.py`); all the views fit calibration, the operating points and the
outer tier of the domain check (postfit.py).
"""

from __future__ import annotations

import io
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


def dx_dataset(pixels: np.ndarray, photometric: str, bits: int, **attrs):
    """A DX image (pydicom FileDataset) holding `pixels`, with `attrs` set on it."""
    from pydicom import uid
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _dicom(pixels: np.ndarray, photometric: str, bits: int, **attrs) -> bytes:
    buffer = io.BytesIO()
    dx_dataset(pixels, photometric, bits, **attrs).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _read(encoded: bytes) -> np.ndarray:
    from pneumoscan import reader

    return reader.read_image(encoded)


def windowed_12bit(image: np.ndarray) -> np.ndarray:
    """The image as a 12-bit DICOM with a VOI window over its range, read back."""
    wide = image.astype(np.uint16) * 16 + 8
    return _read(_dicom(wide, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096))


def monochrome1_full(image: np.ndarray) -> np.ndarray:
    """The image as MONOCHROME1 inverted over the full 8 bits, read back."""
    return _read(_dicom((255 - image).astype(np.uint8), "MONOCHROME1", 8))


def monochrome1_own_range(image: np.ndarray) -> np.ndarray:
    """The image as 12-bit MONOCHROME1 inverted over its own pixel range, read back."""
    wide = image.astype(np.uint16) * 16
    inverted = (int(wide.max()) + int(wide.min()) - wide).astype(np.uint16)
    return _read(_dicom(inverted, "MONOCHROME1", 12))


# What a model must not change its answer for: exposure, and how a DICOM file encodes the image.
INVARIANT: dict[str, View] = {
    **EXPOSURE,
    "dicom-12bit-window": windowed_12bit,
    "dicom-monochrome1": monochrome1_full,
    "dicom-monochrome1-own-range": monochrome1_own_range,
}
