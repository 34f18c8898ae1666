"""Fuzzing the one image reader: whatever the bytes, only ImageReadError ever leaves it."""

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_bytes, dicom_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate

from pneumoscan import reader
from pneumoscan.errors import ImageReadError

SECONDS_PER_FILE = 2.0
# A longer run when asked for: PNEUMOSCAN_FUZZ_EXAMPLES=5000 pytest tests/test_reader_fuzz.py
EXAMPLES = int(os.environ.get("PNEUMOSCAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Without a .dcm name only the DICM marker makes bytes DICOM; with one, pydicom parses anything.
NAMES = st.sampled_from(["fuzzed", "fuzzed.dcm"])


@pytest.fixture(scope="module")
def seeds(xray_files: list[Path]) -> dict[str, bytes]:
    """Valid files of each format, built from a real X-ray, for the mutations to start from."""
    grey = np.asarray(Image.open(xray_files[0]).convert("L"))
    png = io.BytesIO()
    Image.fromarray(grey).save(png, "PNG")
    png16 = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(png16, "PNG")
    tiff16 = io.BytesIO()  # a digitiser's 12 bits in 16, compressed
    Image.fromarray(grey.astype(np.uint16) * 16).save(tiff16, "TIFF", compression="tiff_lzw")
    tiff_pages = io.BytesIO()  # the film and a thumbnail page
    thumbnail = Image.fromarray(grey).resize((32, 32))
    Image.fromarray(grey).save(tiff_pages, "TIFF", save_all=True, append_images=[thumbnail])
    progressive = io.BytesIO()
    Image.fromarray(grey).save(progressive, "JPEG", progressive=True)
    jpeg_frame = dicom_dataset(grey)
    jpeg_frame.PixelData = encapsulate([xray_files[0].read_bytes()])
    jpeg_frame["PixelData"].VR = "OB"
    jpeg_frame.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    deflated = dicom_dataset(grey)
    deflated.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    rle = dicom_dataset(grey)
    rle.compress(uid.RLELossless)
    return {
        "jpeg": xray_files[0].read_bytes(),
        "progressive_jpeg": progressive.getvalue(),
        "png": png.getvalue(),
        "png16": png16.getvalue(),
        "tiff16": tiff16.getvalue(),
        "tiff_pages": tiff_pages.getvalue(),
        "dicom": dicom_bytes(dicom_dataset(grey.astype(np.uint16) * 16, bits_stored=12)),
        "dicom_jpeg": dicom_bytes(jpeg_frame),
        "dicom_deflated": dicom_bytes(deflated),
        "dicom_rle": dicom_bytes(rle),
    }


def _read_safely(data: bytes, name: str) -> None:
    """Read; any outcome but an image or ImageReadError fails, and so does a slow read."""
    start = time.perf_counter()
    try:
        image = reader.read_image(data, name=name)
    except ImageReadError as exc:
        message = str(exc)
        assert message.startswith("fuzzed") and "\n" not in message
    else:
        assert image.dtype == np.uint8 and image.ndim == 2
        assert image.size <= reader.MAX_PIXELS
    assert time.perf_counter() - start < SECONDS_PER_FILE


@FUZZ
@given(st.binary(max_size=4096), NAMES)
def test_random_bytes(data: bytes, name: str) -> None:
    _read_safely(data, name)


@FUZZ
@given(
    kind=st.sampled_from(
        [
            "jpeg",
            "progressive_jpeg",
            "png",
            "png16",
            "tiff16",
            "tiff_pages",
            "dicom",
            "dicom_jpeg",
            "dicom_deflated",
            "dicom_rle",
        ]
    ),
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12
    ),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    name=NAMES,
)
def test_mutated_real_files(
    seeds: dict[str, bytes], kind: str, edits: list, cut: float | None, name: str
) -> None:
    data = bytearray(seeds[kind])
    for where, value in edits:  # overwrite bytes, headers included
        data[int(where * len(data))] = value
    if cut is not None:  # and truncate anywhere
        data = data[: int(cut * len(data))]
    _read_safely(bytes(data), name)
