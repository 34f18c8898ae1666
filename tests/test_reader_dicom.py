"""DICOM through the one image reader, on files built here from a real X-ray."""

import io
import logging
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import SECRETS, dicom_bytes, dicom_dataset
from PIL import Image
from pydicom import uid
from pydicom.config import IGNORE, debug
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.pixels.decoders.base import Decoder

from pneumoscan import reader
from pneumoscan.errors import ImageReadError


@pytest.fixture(scope="module")
def grey(xray_files: list[Path]) -> np.ndarray:
    return np.asarray(Image.open(xray_files[0]).convert("L"))


def _compressed(ds: FileDataset, syntax: uid.UID) -> bytes:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder here (pylibjpeg-openjpeg not installed)")
    ds.compress(syntax)
    return dicom_bytes(ds)


def _jpeg_baseline(grey: np.ndarray) -> bytes:
    """pydicom has no JPEG Baseline encoder: Pillow encodes, pydicom encapsulates."""
    jpeg = io.BytesIO()
    Image.fromarray(grey).save(jpeg, "JPEG", quality=95)
    ds = dicom_dataset(grey)
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    return dicom_bytes(ds)


def _voi_lut(grey: np.ndarray) -> bytes:
    """A VOI LUT that maps 12-bit values to 16-bit ones."""
    # 16-bit entries: pydicom 3.0.2 indexes an 8-bit LUT with uint8, so >256 entries wrap.
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 16])  # entries, first value, bits per entry
    lut.add_new("LUTData", "US", (np.arange(4096) // 16 * 257).tolist())
    return dicom_bytes(dicom_dataset(grey.astype(np.uint16) * 16, VOILUTSequence=[lut]))


def _surplus_pixel_bytes(grey: np.ndarray) -> bytes:
    """Enough extra bytes for a second frame, which pydicom warns about and would return."""
    ds = dicom_dataset(grey)
    ds.PixelData += bytes(grey.size)
    return dicom_bytes(ds)


def _without_meta_header(grey: np.ndarray) -> bytes:
    """An old-style file: no preamble, no 'DICM', no meta header."""
    ds = dicom_dataset(grey)
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


READABLE: dict[str, tuple[Callable[[np.ndarray], bytes], float]] = {
    "mono8": (lambda g: dicom_bytes(dicom_dataset(g)), 0),
    "mono16_bits12": (
        lambda g: dicom_bytes(dicom_dataset(g.astype(np.uint16) * 16, bits_stored=12)),
        1,
    ),
    "monochrome1": (lambda g: dicom_bytes(dicom_dataset(255 - g, "MONOCHROME1")), 0),
    # A linear rescale alone must not change the picture...
    "rescale": (
        lambda g: dicom_bytes(
            dicom_dataset(
                g.astype(np.uint16) * 16, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024
            )
        ),
        1,
    ),
    # ... but the window is in rescaled units, so skipping the rescale would wash it out.
    "rescale_then_window": (
        lambda g: dicom_bytes(
            dicom_dataset(
                g.astype(np.uint16) * 8 + 1000,
                RescaleSlope=0.5,
                RescaleIntercept=-500,
                WindowCenter=510,
                WindowWidth=1021,
            )
        ),
        1,
    ),
    # Full 16-bit range declared, 12 used: only the window makes it look right.
    "window": (
        lambda g: dicom_bytes(
            dicom_dataset(g.astype(np.uint16) * 16, WindowCenter=2040, WindowWidth=4081)
        ),
        1,
    ),
    # Declared 16 bits stored, 12 used, and no window: read by the bits its pixels hold.
    "bits16_holding12": (
        lambda g: dicom_bytes(dicom_dataset(g.astype(np.uint16) * 16, bits_stored=16)),
        0,
    ),
    "monochrome1_bits16_holding12": (
        lambda g: dicom_bytes(
            dicom_dataset((255 - g.astype(np.uint16)) * 16, "MONOCHROME1", bits_stored=16)
        ),
        1,
    ),
    "voi_lut_sequence": (_voi_lut, 0),
    "surplus_pixel_bytes": (_surplus_pixel_bytes, 0),
    "rgb": (lambda g: dicom_bytes(dicom_dataset(np.stack([g] * 3, -1), "RGB")), 1),
    "rle": (lambda g: _compressed(dicom_dataset(g), uid.RLELossless), 0),
    "jpeg2000_12bit": (
        lambda g: _compressed(
            dicom_dataset(g.astype(np.uint16) * 16, bits_stored=12), uid.JPEG2000Lossless
        ),
        1,
    ),
    "jpeg_baseline": (_jpeg_baseline, 2),
}


@pytest.mark.parametrize("variant", READABLE)
def test_every_dicom_variant_gives_the_same_greyscale(grey: np.ndarray, variant: str) -> None:
    make, tolerance = READABLE[variant]
    data = make(grey)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's warnings about tolerable quirks stay inside
        image = reader.read_image(data, name=f"{variant}.dcm")
    assert image.shape == grey.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - grey).mean() <= tolerance


def test_dicom_is_found_by_content_not_name(grey: np.ndarray, tmp_path: Path) -> None:
    odd_name = tmp_path / "scan.png"
    odd_name.write_bytes(dicom_bytes(dicom_dataset(grey)))
    assert np.array_equal(reader.read_image(odd_name), grey)


def test_file_without_meta_header_is_read_only_when_named_dicom(grey: np.ndarray) -> None:
    data = _without_meta_header(grey)
    assert data[128:132] != b"DICM"
    assert np.array_equal(reader.read_image(data, name="old.dcm"), grey)
    with pytest.raises(ImageReadError, match="not a supported image"):
        reader.read_image(data, name="old.bin")


def test_jpeg_ls_decodes_like_its_uncompressed_twin() -> None:
    # No JPEG-LS encoder is installed; pydicom ships this lossless pair instead.
    plain = reader.read_image(get_testdata_file("MR_small.dcm"))
    jpeg_ls = reader.read_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    assert plain.shape == (64, 64) and plain.std() > 10
    assert np.array_equal(plain, jpeg_ls)


def test_compressed_dicom_is_refused_plainly_without_its_decoder(
    grey: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _compressed(dicom_dataset(grey), uid.JPEG2000Lossless)
    monkeypatch.setattr(Decoder, "is_available", property(lambda _: False))
    with pytest.raises(ImageReadError) as info:
        reader.read_image(data, name="j2k.dcm")
    assert str(info.value) == (
        "j2k.dcm: DICOM transfer syntax JPEG 2000 Image Compression (Lossless Only)"
        " (1.2.840.10008.1.2.4.90) cannot be decoded here;"
        " export it uncompressed (Explicit VR Little Endian)"
    )


def _broken_length(grey: np.ndarray) -> bytes:
    """Rows claims 3 bytes instead of 2, so every tag after it is misread."""
    data = dicom_bytes(dicom_dataset(grey))
    rows = b"\x28\x00\x10\x00US\x02\x00"
    assert data.count(rows) == 1
    return data.replace(rows, b"\x28\x00\x10\x00US\x03\x00")


def _encapsulated(grey: np.ndarray, syntax: str) -> bytes:
    ds = dicom_dataset(grey)
    ds.PixelData = encapsulate([b"\xff\xd8 not really a codestream"])
    ds["PixelData"].VR = "OB"
    # A new element with validation off: the secret-bearing UID must not warn while building.
    ds.file_meta["TransferSyntaxUID"] = DataElement(
        0x00020010, "UI", syntax, validation_mode=IGNORE
    )
    return dicom_bytes(ds)


def _without_pixels(grey: np.ndarray) -> bytes:
    ds = dicom_dataset(grey)
    del ds.PixelData
    return dicom_bytes(ds)


BROKEN: dict[str, tuple[Callable[[np.ndarray], bytes], str]] = {
    "no_pixels.dcm": (_without_pixels, "no pixel data"),
    "cut_in_header.dcm": (lambda g: dicom_bytes(dicom_dataset(g))[:400], "no pixel data"),
    "cut_in_pixels.dcm": (lambda g: dicom_bytes(dicom_dataset(g))[:-5000], "truncated"),
    "broken_length.dcm": (_broken_length, "DICOM"),
    "huge.dcm": (
        lambda g: dicom_bytes(dicom_dataset(g[:16, :16], Rows=8000, Columns=8000)),
        "exceeds the limit",
    ),
    "two_frames.dcm": (
        lambda g: dicom_bytes(dicom_dataset(np.stack([g, g]), NumberOfFrames=2)),
        "multi-frame",
    ),
    "tiny.dcm": (lambda g: dicom_bytes(dicom_dataset(g[:8, :8])), "too small"),
    "palette.dcm": (lambda g: dicom_bytes(dicom_dataset(g, "PALETTE COLOR")), "not supported"),
    "mpeg2.dcm": (
        lambda g: _encapsulated(g, uid.MPEG2MPML),
        "MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100) cannot be decoded",
    ),
    "bad_codestream.dcm": (lambda g: _encapsulated(g, uid.JPEGBaseline8Bit), "broken"),
    "secret_syntax.dcm": (lambda g: _encapsulated(g, SECRETS[0]), "malformed UID"),
    "text.dcm": (lambda g: b"DICOM? no, just notes about DOE^JOHN", "not a supported image"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_bad_dicom_raises_one_clear_private_error(
    grey: np.ndarray, tmp_path: Path, name: str
) -> None:
    make, phrase = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(make(grey))
    with pytest.raises(ImageReadError) as info:
        reader.read_image(path)
    message = str(info.value)
    assert phrase in message and str(path) in message and "\n" not in message
    assert not any(secret in message for secret in SECRETS)


@pytest.mark.parametrize("name", ["cut_in_pixels.dcm", "broken_length.dcm", "secret_syntax.dcm"])
def test_patient_data_never_reaches_warnings_or_logs(
    grey: np.ndarray,
    name: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # An invalid date tempts pydicom's value validation into quoting it.
    data = BROKEN[name][0](grey).replace(b"19700101", SECRETS[0].encode())
    debug(True, default_handler=False)  # pydicom's debug log quotes every value it reads
    caplog.set_level(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ImageReadError) as info:
                reader.read_image(data, name=name)
        assert logging.getLogger("pydicom").level == logging.DEBUG  # restored after reading
    finally:
        debug(False, default_handler=False)
    assert not caught
    seen = [str(info.value), caplog.text, *capfd.readouterr()]
    assert not any(secret in text for secret in SECRETS for text in seen)


def test_reader_imports_pydicom_only_for_dicom() -> None:
    png = io.BytesIO()
    Image.new("L", (32, 32), 90).save(png, "PNG")
    code = (
        "import sys; from pneumoscan import reader; "
        f"reader.read_image({png.getvalue()!r}); "
        "assert 'pydicom' not in sys.modules, 'pydicom imported for a PNG'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
