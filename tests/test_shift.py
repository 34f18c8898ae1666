"""The shift views, and the bundled models' invariance to exposure and DICOM encoding on real
X-rays (issue 19: the same label, and a probability within 0.05)."""

from pathlib import Path

import numpy as np
import pytest

from pneumoscan import reader, runtime, shift

TOLERANCE = 0.05


def test_each_view_keeps_an_8_bit_image_and_the_dicom_encodings_read_back_exactly(
    xray_files: list[Path],
) -> None:
    image = reader.read_image(xray_files[0])
    for name, view in {**shift.VIEWS, **shift.INVARIANT}.items():
        out = view(image)
        assert out.dtype == np.uint8 and out.ndim == 2, name
    for name in ("dicom-12bit-window", "dicom-monochrome1"):
        assert np.array_equal(shift.INVARIANT[name](image), image), name
    # Inverted over its own range, the image comes back as itself plus one offset.
    moved = shift.INVARIANT["dicom-monochrome1-own-range"](image).astype(int) - image
    assert len(np.unique(moved)) <= 2


@pytest.mark.parametrize("name", ["ensemble", "dense", "cnn", "transfer"])
def test_a_bundled_model_keeps_its_answer_under_exposure_and_encoding(
    name: str, xray_files: list[Path]
) -> None:
    model = runtime.load(name)
    originals = [reader.read_image(f) for f in xray_files]
    threshold = model.threshold("detection")

    def scored(images: list[np.ndarray]) -> np.ndarray:
        return model.probabilities(np.stack([reader.resize(im, model.input_size) for im in images]))

    base = scored(originals)
    for transform, view in shift.INVARIANT.items():
        moved = scored([view(im) for im in originals])
        change = np.abs(moved - base)
        assert change.max() <= TOLERANCE, f"{transform}: probability moved by {change.max():.3f}"
        assert ((moved >= threshold) == (base >= threshold)).all(), f"{transform}: label flipped"
