"""Fuzzing the one image reader: whatever the bytes, only ImageReadError ever leaves it."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_bytes, dicom_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumoscan import reader
from pneumoscan.errors import ImageReadError

SECONDS_PER_FILE = 2.0
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(xray_files: list[Path]) -> dict[str, bytes]:
    """Valid files of each format, built from a real X-ray, for the mutations to start from."""
    grey = np.asarray(Image.open(xray_files[0]).convert("L"))
    png = io.BytesIO()
    Image.fromarray(grey).save(png, "PNG")
    png16 = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(png16, "PNG")
    return {
        "jpeg": xray_files[0].read_bytes(),
        "png": png.getvalue(),
        "png16": png16.getvalue(),
        "dicom": dicom_bytes(dicom_dataset(grey.astype(np.uint16) * 16, bits_stored=12)),
    }


def _read_safely(data: bytes) -> None:
    """Read; any outcome but an image or ImageReadError fails, and so does a slow read."""
    start = time.perf_counter()
    try:
        image = reader.read_image(data, name="fuzzed")
    except ImageReadError as exc:
        message = str(exc)
        assert message.startswith("fuzzed") and "\n" not in message
    else:
        assert image.dtype == np.uint8 and image.ndim == 2
        assert image.size <= reader.MAX_PIXELS
    assert time.perf_counter() - start < SECONDS_PER_FILE


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _read_safely(data)


@FUZZ
@given(
    kind=st.sampled_from(["jpeg", "png", "png16", "dicom"]),
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12
    ),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_real_files(
    seeds: dict[str, bytes], kind: str, edits: list, cut: float | None
) -> None:
    data = bytearray(seeds[kind])
    for where, value in edits:  # overwrite bytes, headers included
        data[int(where * len(data))] = value
    if cut is not None:  # and truncate anywhere
        data = data[: int(cut * len(data))]
    _read_safely(bytes(data))
