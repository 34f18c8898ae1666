import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from pneumoscan import reader
from pneumoscan.errors import ImageReadError


@pytest.fixture(scope="module")
def grey(xray_files: list[Path]) -> np.ndarray:
    return np.asarray(Image.open(xray_files[0]).convert("L"))


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_real_jpeg_reads_as_2d_uint8(xray_files: list[Path]) -> None:
    image = reader.read_image(xray_files[0])
    assert image.dtype == np.uint8 and image.shape == (224, 224)
    assert 20 < image.mean() < 235  # a real radiograph, not blank


@pytest.mark.parametrize(
    ("name", "make", "tolerance"),
    [
        ("png8", lambda g: _encode(Image.fromarray(g), "PNG"), 0),
        ("png16", lambda g: _encode(Image.fromarray(g.astype(np.uint16) * 257), "PNG"), 0),
        ("rgb_png", lambda g: _encode(Image.fromarray(np.stack([g] * 3, -1)), "PNG"), 1),
        (
            "rgba_png",
            lambda g: _encode(
                Image.fromarray(np.stack([g] * 3 + [np.full_like(g, 255)], -1)), "PNG"
            ),
            1,
        ),
        ("la_png", lambda g: _encode(Image.fromarray(g).convert("LA"), "PNG"), 0),
        ("palette_png", lambda g: _encode(Image.fromarray(g).convert("P"), "PNG"), 8),
        (
            "rgb_jpeg",
            lambda g: _encode(Image.fromarray(np.stack([g] * 3, -1)), "JPEG", quality=98),
            6,
        ),
    ],
)
def test_every_format_gives_the_same_greyscale(
    grey: np.ndarray, name: str, make, tolerance: int
) -> None:
    image = reader.read_image(make(grey), name=name)
    assert image.shape == grey.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - grey).mean() <= tolerance + 0.5


def test_full_range_sixteen_bit_png_spans_all_levels() -> None:
    values = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    image = reader.read_image(_encode(Image.fromarray(values), "PNG"))
    assert image.min() == 0 and image.max() == 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize(
    ("name", "widen"),
    [
        ("10-bit, shifted", lambda v: v * 4),
        ("12-bit, shifted", lambda v: v * 16),
        ("12-bit, bits repeated", lambda v: v * 16 + v // 16),
        ("14-bit, shifted", lambda v: v * 64),
        ("16-bit, shifted", lambda v: v * 256),
        ("16-bit, bits repeated", lambda v: v * 257),
    ],
)
def test_sixteen_bit_files_holding_fewer_bits_come_back_exactly(
    grey: np.ndarray, fmt: str, name: str, widen
) -> None:
    """A detector's 10-14 bits in a 16-bit PNG or TIFF: scaled by what the file holds, not by
    the container's 65535 (which gave a 12-bit film back nearly black, in 16 grey levels)."""
    data = _encode(Image.fromarray(widen(grey.astype(np.uint16))), fmt)
    assert np.array_equal(reader.read_image(data, name=name), grey)


def test_tiff_variants_digitisers_write(grey: np.ndarray) -> None:
    """Compressed 16-bit, 32-bit integer and [0, 1] floating point TIFF, and a TIFF whose second
    page is a thumbnail of the first: each is the film."""
    wide = Image.fromarray(grey.astype(np.uint16) * 16)
    for name, data in {
        "lzw": _encode(wide, "TIFF", compression="tiff_lzw"),
        "deflate": _encode(wide, "TIFF", compression="tiff_adobe_deflate"),
        "int32": _encode(Image.fromarray(grey.astype(np.int32) * 16), "TIFF"),
        "float": _encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
        "thumbnail": _encode(
            Image.fromarray(grey), "TIFF", save_all=True, append_images=[wide.resize((32, 32))]
        ),
    }.items():
        assert np.abs(reader.read_image(data, name=name).astype(int) - grey).max() <= 1, name
    pages = _encode(Image.fromarray(grey), "TIFF", save_all=True, append_images=[wide])
    with pytest.raises(ImageReadError, match="multi-frame"):  # two full pages: which one?
        reader.read_image(pages, name="stack.tif")


def test_a_cut_multipage_tiff_is_an_image_or_one_clear_error(grey: np.ndarray) -> None:
    """Pillow raised TypeError ("Missing dimensions") for some cuts of a two-page TIFF."""
    data = _encode(
        Image.fromarray(grey), "TIFF", save_all=True, append_images=[Image.fromarray(grey[:9])]
    )
    errors = 0
    for cut in range(9, len(data), 101):
        try:
            assert reader.read_image(data[:cut], name="cut.tif").shape == grey.shape
        except ImageReadError as exc:
            assert str(exc).startswith("cut.tif: ") and "\n" not in str(exc)
            errors += 1
    assert errors


def _png_with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """Insert a chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    chunk = struct.pack(">I", len(body)) + kind + body
    chunk += struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return png[:33] + chunk + png[33:]


def test_a_png_declaring_its_significant_bits_is_scaled_by_them(grey: np.ndarray) -> None:
    """sBIT 14 says white is 16383, though this (dark) film reaches only 1020."""
    png = _encode(Image.fromarray(grey.astype(np.uint16) * 4), "PNG")
    assert np.array_equal(reader.read_image(png), grey)  # undeclared: 10 bits, from its pixels
    declared = reader.read_image(_png_with_chunk(png, b"sBIT", bytes([14])))
    assert np.array_equal(declared, grey // 16)
    # A declaration its pixels break (sBIT 8, values up to 1020) is not believed.
    assert np.array_equal(reader.read_image(_png_with_chunk(png, b"sBIT", bytes([8]))), grey)


def test_a_tiff_declaring_its_largest_value_is_scaled_by_it(grey: np.ndarray) -> None:
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[281] = 16383  # MaxSampleValue
    tiff = _encode(Image.fromarray(grey.astype(np.uint16) * 4), "TIFF", tiffinfo=tags)
    assert np.array_equal(reader.read_image(tiff), grey // 16)


@pytest.mark.parametrize(("orientation", "stored"), [(3, 2), (6, 1), (8, 3)])
def test_exif_orientation_turns_the_image_upright(
    grey: np.ndarray, orientation: int, stored: int
) -> None:
    """A phone's photograph of a film is stored turned, with the turn in its EXIF tag."""
    upright = grey[:, 40:]  # not square, so a wrong turn changes the shape
    turned = Image.fromarray(np.rot90(upright, stored).copy())
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 100})):
        image = reader.read_image(_encode(turned, fmt, exif=exif, **options))
        assert image.shape == upright.shape
        assert np.abs(image.astype(int) - upright).mean() < 1.5, fmt


def test_resize_squashes_whole_frame() -> None:
    wide = np.zeros((100, 300), np.uint8)
    wide[:, 150:] = 255
    out = reader.resize(wide, 64)
    assert out.shape == (64, 64)
    assert out[:, :28].max() == 0 and out[:, 36:].min() == 255


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_files_raise_one_clear_error(tmp_path: Path, xray_files: list[Path]) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    truncated = tmp_path / "truncated.jpeg"
    truncated.write_bytes(xray_files[0].read_bytes()[:600])
    tiny = tmp_path / "tiny.png"
    Image.new("L", (1, 1)).save(tiny)
    animated = tmp_path / "anim.gif"
    frames = [Image.new("L", (64, 64), v) for v in (0, 128)]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(60000, 60000))
    big = tmp_path / "big.png"
    big.write_bytes(_png_header_only(9000, 9000))  # under Pillow's own limit, over ours
    cases = {
        empty: "empty",
        text: "not a supported image",
        truncated: "truncated",
        tiny: "too small",
        animated: "multi-frame",
        bomb: "exceeds the limit",
        big: "exceeds the limit",
        tmp_path / "missing.png": "not found",
        tmp_path: "folder",
    }
    for path, phrase in cases.items():
        with pytest.raises(ImageReadError) as info:
            reader.read_image(path)
        message = str(info.value)
        assert phrase in message and str(path) in message and "\n" not in message


def test_reading_in_threads_leaves_warnings_and_logging_as_they_were(
    grey: np.ndarray, xray_files: list[Path]
) -> None:
    """Decoding runs in threads; process-wide state toggled per read would race and stick."""
    import logging
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from helpers import dicom_bytes, dicom_dataset

    sources = [xray_files[0].read_bytes(), dicom_bytes(dicom_dataset(grey))] * 40
    reader.read_image(sources[0])  # the reader's own Pillow filter is in place from here on
    filters, level = list(warnings.filters), logging.getLogger("pydicom").level
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(reader.read_image, sources))
    assert all(np.array_equal(image, images[i % 2]) for i, image in enumerate(images))
    assert warnings.filters == filters
    assert logging.getLogger("pydicom").level == level
    with pytest.warns(UserWarning, match="still heard"):
        warnings.warn("still heard", UserWarning, stacklevel=1)
