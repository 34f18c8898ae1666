"""A corpus of nasty files, made here from a real X-ray: each is scored or gives its own error.

Each file goes through `reader.read_image` alone; the bombs again in a process whose memory is
capped; and the whole corpus in one `predict` batch between real X-rays.
"""

import io
import json
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import dicom_bytes, dicom_dataset
from PIL import Image
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from pneumoscan import model_folder, reader, screening
from pneumoscan.errors import ImageReadError

SECONDS_PER_FILE = 5.0  # the slowest refusal (a deflate bomb, inflated to 200 MB) takes ~0.5 s
MEMORY_LIMIT = 1536 << 20  # address space for the bomb reads; a normal read needs ~200 MB
BOMB_BYTES = 2 << 30  # what an unbounded decoder would allocate for each decompression bomb
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BROKEN = "broken or truncated image"
BROKEN_DICOM = "broken or truncated DICOM"
UNSUPPORTED = "not a supported image"
TOO_LARGE = "exceeds the limit"


@dataclass(frozen=True)
class Seeds:
    """A real X-ray, in the forms the cases start from."""

    jpeg: bytes  # as the data set ships it
    grey: np.ndarray

    @property
    def png(self) -> bytes:
        return _encode(Image.fromarray(self.grey), "PNG")

    @property
    def dicom(self) -> bytes:
        return dicom_bytes(dicom_dataset(self.grey))


@dataclass(frozen=True)
class Case:
    build: Callable[[Seeds], bytes]
    expect: str  # "scored", or a phrase the error message must hold
    like_xray: float | None = None  # when scored: the mean |difference| allowed from the X-ray
    bomb: bool = False  # also read under a memory limit


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _two_frames(s: Seeds, fmt: str) -> bytes:
    """The X-ray, then a black second frame: an animation."""
    frame = Image.new("L", (224, 224))
    return _encode(Image.fromarray(s.grey), fmt, save_all=True, append_images=[frame])


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, old
    return data.replace(old, new)


# --- PNG written by hand: any header, any chunk --------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(
    width: int, height: int, rows: np.ndarray, depth: int = 8, colour: int = 0, extra: bytes = b""
) -> bytes:
    """A PNG of `rows` (one uint8 row of packed samples per scanline), `extra` chunks first."""
    scanlines = np.hstack([np.zeros((len(rows), 1), np.uint8), rows])  # filter type 0 each
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + extra
        + _chunk(b"IDAT", zlib.compress(scanlines.tobytes()))
        + _chunk(b"IEND", b"")
    )


def _grey_png(s: Seeds, extra: bytes) -> bytes:
    return _png(*s.grey.shape[::-1], s.grey, extra=extra)


def _sixteen_bit_png(s: Seeds, colour: int, samples: Callable[[np.ndarray], list]) -> bytes:
    """16-bit samples, 12 of them significant (sBIT), widened as the PNG standard asks."""
    twelve = s.grey.astype(np.uint16) * 16 + s.grey // 16
    wide = (twelve << 4) | (twelve >> 8)
    rows = np.stack(samples(wide), axis=-1).astype(">u2").view(np.uint8).reshape(len(wide), -1)
    return _png(*s.grey.shape[::-1], rows, depth=16, colour=colour, extra=_chunk(b"sBIT", b"\x0c"))


def _low_depth_png(s: Seeds, depth: int) -> bytes:
    """1, 2 or 4 bits per grey sample, packed as PNG packs them."""
    levels = s.grey >> (8 - depth)
    bits = np.unpackbits(levels[..., None], axis=-1)[..., 8 - depth :]
    rows = np.packbits(bits.reshape(len(levels), -1), axis=1)
    return _png(*s.grey.shape[::-1], rows, depth=depth)


def _deflated_zeros(size: int, wbits: int, prefix: bytes = b"") -> bytes:
    """`prefix`, then `size` zero bytes, deflated in milliseconds: one 16 MiB block, repeated.

    The zlib checksum at the end is wrong: a reader that stops in time never gets there.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = packer.compress(prefix) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(1 << 24)) + packer.flush(zlib.Z_FULL_FLUSH)
    return head + block * (size >> 24) + packer.flush()


def _png_bomb(s: Seeds, kind: bytes, keyword: bytes) -> bytes:
    """A good picture whose compressed metadata chunk inflates to BOMB_BYTES."""
    return _grey_png(s, _chunk(kind, keyword + _deflated_zeros(BOMB_BYTES, zlib.MAX_WBITS)))


# --- JPEG ------------------------------------------------------------------------------------


def _sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    at = jpeg.index(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def _after_soi(jpeg: bytes, segments: bytes) -> bytes:
    return jpeg[:2] + segments + jpeg[2:]


def _scan_bomb(side: int = 2048, scans: int = 2000) -> bytes:
    """A progressive JPEG of a few kB whose last scan repeats: each one re-decodes the image."""
    jpeg = _encode(Image.new("L", (side, side), 100), "JPEG", progressive=True)
    last = jpeg[jpeg.rindex(b"\xff\xda") : -2]
    return jpeg[:-2] + last * scans + jpeg[-2:]


def _gif_screen_65535(s: Seeds) -> bytes:
    gif = _encode(Image.fromarray(s.grey), "GIF")
    return gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:]  # the logical screen's size


def _cmyk_k_only(s: Seeds) -> bytes:
    ink = np.zeros((*s.grey.shape, 4), np.uint8)
    ink[..., 3] = 255 - s.grey
    return _encode(Image.fromarray(ink, "CMYK"), "JPEG", quality=95)


# --- DICOM -----------------------------------------------------------------------------------


def _dicom(s: Seeds, pixels: np.ndarray | None = None, bits: int = 0, **attrs) -> bytes:
    return dicom_bytes(
        dicom_dataset(s.grey if pixels is None else pixels, bits_stored=bits, **attrs)
    )


def _widened(s: Seeds, bits: int, **attrs) -> bytes:
    """The X-ray stored in `bits` of 16, as a modality writes 10 to 16-bit data."""
    return _dicom(s, s.grey.astype(np.uint16) << (bits - 8), bits, **attrs)


def _without(s: Seeds, keyword: str) -> bytes:
    ds = dicom_dataset(s.grey)
    delattr(ds, keyword)
    return dicom_bytes(ds)


def _big_private_tag(s: Seeds) -> bytes:
    ds = dicom_dataset(s.grey)
    ds.private_block(0x0009, "NASTY", create=True).add_new(0x10, "OB", bytes(16 << 20))
    return dicom_bytes(ds)


def _encapsulated(pixels: np.ndarray, frame: bytes, syntax: str) -> bytes:
    ds = dicom_dataset(pixels)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return dicom_bytes(ds)


def _jpeg_frame(s: Seeds, size: int | None = None) -> bytes:
    jpeg = _encode(Image.fromarray(s.grey), "JPEG", quality=95)
    return _encapsulated(
        s.grey, _sof_size(jpeg, size, size) if size else jpeg, uid.JPEGBaseline8Bit
    )


def _patched_testdata(name: str, marker: bytes, offset: int, layout: str, *size: int) -> bytes:
    """One of pydicom's compressed files, its frame header rewritten to claim another size."""
    data = Path(get_testdata_file(name)).read_bytes()
    if not size:
        return data
    at = data.index(marker) + offset
    return data[:at] + struct.pack(layout, *size) + data[at + struct.calcsize(layout) :]


def _deflated(s: Seeds, zeros: int = 0) -> bytes:
    """A deflated DICOM; with `zeros`, its data set ends in a private element of that many."""
    ds = dicom_dataset(s.grey)
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    data = dicom_bytes(ds)
    if not zeros:
        return data
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]  # preamble, DICM, group length
    body = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    private = struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, zeros)
    return data[:meta_end] + _deflated_zeros(zeros, -zlib.MAX_WBITS, body + private)


def _scan_bomb_frame(s: Seeds) -> bytes:
    return _encapsulated(np.full((2048, 2048), 100, np.uint8), _scan_bomb(), uid.JPEGBaseline8Bit)


def _old_style(s: Seeds) -> bytes:
    """No preamble, no 'DICM', no file meta: found only by its .dcm name."""
    ds = dicom_dataset(s.grey)
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def _cut(kind: str, at: int) -> Callable[[Seeds], bytes]:
    """The seed of `kind` cut at `at` bytes (from the end when negative)."""
    return lambda s: getattr(s, kind)[:at]


def _half(kind: str) -> Callable[[Seeds], bytes]:
    return lambda s: getattr(s, kind)[: len(getattr(s, kind)) // 2]


_J2K = ("MR_small_jp2klossless.dcm", b"\xff\x4f\xff\x51", 8, ">II")  # SOC, SIZ: width, height
_JLS = ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 5, ">HH")  # SOF55: height, width
_FRAME_MISMATCH = "does not match the DICOM header"

CASES: dict[str, Case] = {
    # Nothing, or not an image at all.
    "zero-bytes.jpg": Case(lambda s: b"", "file is empty"),
    "notes.jpg": Case(lambda s: b"Referral: please screen this patient.\n", UNSUPPORTED),
    "zeros.dcm": Case(lambda s: bytes(4096), UNSUPPORTED),
    "postscript.jpg": Case(
        # Pillow would render it by running Ghostscript, which can loop forever.
        lambda s: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 512 512\n{} loop\n",
        UNSUPPORTED,
    ),
    "document.jpg": Case(lambda s: _encode(Image.fromarray(s.grey), "PDF"), UNSUPPORTED),
    # Truncated at several cut points.
    "jpeg-cut-at-2.jpg": Case(_cut("jpeg", 2), BROKEN),
    "jpeg-cut-at-20.jpg": Case(_cut("jpeg", 20), BROKEN),
    "jpeg-cut-at-100.jpg": Case(_cut("jpeg", 100), BROKEN),
    "jpeg-cut-at-600.jpg": Case(_cut("jpeg", 600), BROKEN),
    "jpeg-cut-in-half.jpg": Case(_half("jpeg"), BROKEN),
    "jpeg-without-end.jpg": Case(_cut("jpeg", -2), BROKEN),
    "png-cut-at-8.png": Case(_cut("png", 8), BROKEN),
    "png-cut-at-20.png": Case(_cut("png", 20), BROKEN),
    "png-cut-at-40.png": Case(_cut("png", 40), BROKEN),
    "png-cut-at-100.png": Case(_cut("png", 100), BROKEN),
    "png-cut-in-half.png": Case(_half("png"), BROKEN),
    "png-without-end.png": Case(_cut("png", -12), "scored", like_xray=0),  # all pixels there
    "dicom-cut-at-100.dcm": Case(_cut("dicom", 100), UNSUPPORTED),  # inside the preamble
    "dicom-cut-at-132.dcm": Case(_cut("dicom", 132), "no pixel data"),
    "dicom-cut-at-400.dcm": Case(_cut("dicom", 400), "no pixel data"),
    "dicom-cut-in-pixels.dcm": Case(_cut("dicom", -5000), BROKEN_DICOM),
    "dicom-cut-last-byte.dcm": Case(_cut("dicom", -1), BROKEN_DICOM),
    # Read by content, whatever the name says.
    "jpeg-named.png": Case(lambda s: s.jpeg, "scored", like_xray=0),
    "png-named.dcm": Case(lambda s: s.png, "scored", like_xray=0),
    "dicom-named.jpg": Case(lambda s: s.dicom, "scored", like_xray=0),
    "old-style-dicom.dcm": Case(_old_style, "scored", like_xray=0),
    # Huge headers around a good picture.
    "jpeg-200-comments.jpg": Case(
        lambda s: _after_soi(s.jpeg, (b"\xff\xfe\xff\xff" + bytes(65533)) * 200),
        "scored",
        like_xray=0,
    ),
    "jpeg-200-app-segments.jpg": Case(
        lambda s: _after_soi(
            s.jpeg,
            b"".join(bytes([0xFF, 0xE0 + n % 16]) + b"\xff\xff" + bytes(65533) for n in range(200)),
        ),
        "scored",
        like_xray=0,
    ),
    "jpeg-icc-in-255-parts.jpg": Case(
        lambda s: _after_soi(
            s.jpeg,
            b"".join(
                b"\xff\xe2\xff\xffICC_PROFILE\0" + bytes([n, 255]) + bytes(65519)
                for n in range(1, 256)
            ),
        ),
        "scored",
        like_xray=0,
    ),
    "jpeg-corrupt-exif.jpg": Case(
        lambda s: _after_soi(s.jpeg, b"\xff\xe1\x10\x00Exif\0\0MM\0*\0\0\0\x08" + b"\xff" * 4082),
        "scored",
        like_xray=0,
    ),
    "png-16-mb-text.png": Case(
        lambda s: _grey_png(s, _chunk(b"tEXt", b"Comment\0" + b"x" * (16 << 20))),
        "scored",
        like_xray=0,
    ),
    "png-ztxt-bomb.png": Case(lambda s: _png_bomb(s, b"zTXt", b"Comment\0\0"), BROKEN, bomb=True),
    "png-itxt-bomb.png": Case(
        lambda s: _png_bomb(s, b"iTXt", b"Comment\0\x01\0\0\0"), BROKEN, bomb=True
    ),
    "png-iccp-bomb.png": Case(lambda s: _png_bomb(s, b"iCCP", b"icc\0\0"), BROKEN, bomb=True),
    "dicom-16-mb-private-tag.dcm": Case(_big_private_tag, "scored", like_xray=0),
    # Too small, or just large enough.
    "1x1.png": Case(lambda s: _encode(Image.new("L", (1, 1)), "PNG"), "too small"),
    "16x1.png": Case(lambda s: _encode(Image.new("L", (16, 1)), "PNG"), "too small"),
    "1x16.jpg": Case(lambda s: _encode(Image.new("L", (1, 16)), "JPEG"), "too small"),
    "16x16.png": Case(lambda s: _encode(Image.new("L", (16, 16), 90), "PNG"), "scored"),
    "dicom-zero-rows.dcm": Case(lambda s: _dicom(s, Rows=0), "too small"),
    # More than one picture.
    "animated.gif": Case(lambda s: _two_frames(s, "GIF"), "multi-frame"),
    "animated.png": Case(lambda s: _two_frames(s, "PNG"), "multi-frame"),
    "apng-one-frame.png": Case(
        lambda s: _encode(Image.fromarray(s.grey), "PNG", save_all=True, append_images=[]),
        "scored",
        like_xray=0,
    ),
    # A camera JPEG with its thumbnail as a second image: the picture is the first.
    "camera-mpo.jpg": Case(
        lambda s: _encode(
            Image.fromarray(s.grey),
            "MPO",
            save_all=True,
            append_images=[Image.fromarray(s.grey[::4, ::4])],
            quality=95,
        ),
        "scored",
        like_xray=1,
    ),
    # Colour spaces and bit depths: an X-ray saved as CMYK or 16-bit is still an X-ray.
    "cmyk.jpg": Case(
        lambda s: _encode(Image.fromarray(s.grey).convert("CMYK"), "JPEG", quality=95),
        "scored",
        like_xray=1,
    ),
    "cmyk-from-rgb.jpg": Case(
        lambda s: _encode(
            Image.fromarray(s.grey).convert("RGB").convert("CMYK"), "JPEG", quality=95
        ),
        "scored",
        like_xray=1,
    ),
    "cmyk-black-ink-only.jpg": Case(_cmyk_k_only, "scored", like_xray=1),
    "16-bit-12-significant.png": Case(
        lambda s: _sixteen_bit_png(s, 0, lambda v: [v]), "scored", like_xray=1
    ),
    "16-bit-grey-alpha.png": Case(
        lambda s: _sixteen_bit_png(s, 4, lambda v: [v, np.full_like(v, 65535)]),
        "scored",
        like_xray=1,
    ),
    "16-bit-rgb.png": Case(
        lambda s: _sixteen_bit_png(s, 2, lambda v: [v] * 3), "scored", like_xray=1
    ),
    "1-bit.png": Case(lambda s: _low_depth_png(s, 1), "scored"),
    "2-bit.png": Case(lambda s: _low_depth_png(s, 2), "scored", like_xray=40),
    "4-bit.png": Case(lambda s: _low_depth_png(s, 4), "scored", like_xray=10),
    "palette.png": Case(
        lambda s: _encode(Image.fromarray(s.grey).convert("P"), "PNG"), "scored", like_xray=8
    ),
    "grey-alpha.png": Case(
        lambda s: _encode(Image.fromarray(s.grey).convert("LA"), "PNG"), "scored", like_xray=0
    ),
    "palette-claiming-16-bits.png": Case(
        lambda s: _png(224, 224, s.grey, depth=16, colour=3), BROKEN
    ),
    "png-bad-header-checksum.png": Case(
        lambda s: s.png[:29] + bytes([s.png[29] ^ 1]) + s.png[30:], BROKEN
    ),
    "jpeg-zero-width.jpg": Case(lambda s: _sof_size(s.jpeg, 0, 224), BROKEN),
    **{
        f"dicom-{bits}-bits-stored.dcm": Case(
            lambda s, bits=bits: _widened(s, bits), "scored", like_xray=0
        )
        for bits in (10, 12, 14, 16)
    },
    # High Bit is fixed at Bits Stored - 1 by the standard; pydicom reads as if it were.
    "dicom-high-bit-15-of-12.dcm": Case(
        lambda s: _widened(s, 12, HighBit=15), "scored", like_xray=0
    ),
    "dicom-high-bit-7-of-12.dcm": Case(lambda s: _widened(s, 12, HighBit=7), "scored", like_xray=0),
    "dicom-20-bits-stored-in-16.dcm": Case(lambda s: _widened(s, 12, BitsStored=20), BROKEN_DICOM),
    "dicom-bits-allocated-12.dcm": Case(lambda s: _widened(s, 12, BitsAllocated=12), BROKEN_DICOM),
    # DICOM with missing or broken tags.
    "dicom-without-pixels.dcm": Case(lambda s: _without(s, "PixelData"), "no pixel data"),
    "dicom-without-rows.dcm": Case(lambda s: _without(s, "Rows"), BROKEN_DICOM),
    "dicom-without-bits-stored.dcm": Case(lambda s: _without(s, "BitsStored"), BROKEN_DICOM),
    "dicom-rows-length-3.dcm": Case(
        lambda s: _replace_once(
            s.dicom, b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x10\x00US\x03\x00"
        ),
        "no pixel data",  # every tag after it is misread
    ),
    "dicom-rows-unknown-vr.dcm": Case(
        lambda s: _replace_once(s.dicom, b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00XX"), BROKEN_DICOM
    ),
    "dicom-pixels-short-of-rows.dcm": Case(lambda s: _dicom(s, Rows=448), BROKEN_DICOM),
    "dicom-unknown-photometric.dcm": Case(
        lambda s: _dicom(s, PhotometricInterpretation="MONOCHROME3"), "encoding not supported"
    ),
    "dicom-grey-claiming-3-samples.dcm": Case(lambda s: _dicom(s, SamplesPerPixel=3), BROKEN_DICOM),
    "dicom-negative-frames.dcm": Case(lambda s: _dicom(s, NumberOfFrames="-3"), BROKEN_DICOM),
    # Compressed DICOM, honest and not.
    "dicom-deflated.dcm": Case(_deflated, "scored", like_xray=0),
    "dicom-jpeg-frame.dcm": Case(_jpeg_frame, "scored", like_xray=2),
    "dicom-j2k-frame.dcm": Case(lambda s: _patched_testdata(*_J2K), "scored"),
    "dicom-jpeg-ls-frame.dcm": Case(lambda s: _patched_testdata(*_JLS), "scored"),
    # Bombs: a small file that claims, or inflates to, more than the pixel limit.
    "png-60000x60000.png": Case(
        lambda s: _png(60000, 60000, np.zeros((1, 1), np.uint8)), TOO_LARGE, bomb=True
    ),
    "jpeg-65500x65500.jpg": Case(lambda s: _sof_size(s.jpeg, 65500, 65500), TOO_LARGE, bomb=True),
    "gif-65535x65535.gif": Case(_gif_screen_65535, TOO_LARGE, bomb=True),
    "dicom-65535x65535.dcm": Case(
        lambda s: _dicom(s, s.grey[:16, :16], Rows=65535, Columns=65535), TOO_LARGE, bomb=True
    ),
    "dicom-million-frames.dcm": Case(
        lambda s: _dicom(s, NumberOfFrames=1_000_000), TOO_LARGE, bomb=True
    ),
    "dicom-deflate-bomb.dcm": Case(lambda s: _deflated(s, BOMB_BYTES), "expands past", bomb=True),
    "dicom-jpeg-frame-20000x20000.dcm": Case(
        lambda s: _jpeg_frame(s, 20000), _FRAME_MISMATCH, bomb=True
    ),
    "dicom-j2k-frame-30000x30000.dcm": Case(
        lambda s: _patched_testdata(*_J2K, 30000, 30000), _FRAME_MISMATCH, bomb=True
    ),
    "dicom-jpeg-ls-frame-30000x30000.dcm": Case(
        lambda s: _patched_testdata(*_JLS, 30000, 30000), _FRAME_MISMATCH, bomb=True
    ),
    # Time bombs: each of 2000 scans decodes the whole 2048x2048 image again (8 s in all).
    "jpeg-2000-scans.jpg": Case(lambda s: _scan_bomb(), "JPEG scans", bomb=True),
    "dicom-jpeg-frame-2000-scans.dcm": Case(_scan_bomb_frame, "JPEG scans", bomb=True),
}


@pytest.fixture(scope="module")
def seeds(xray_files: list[Path]) -> Seeds:
    jpeg = xray_files[0].read_bytes()
    return Seeds(jpeg, np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")))


@pytest.fixture(scope="module")
def corpus(seeds: Seeds, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nasty")
    for name, case in CASES.items():
        (root / name).write_bytes(case.build(seeds))
    return {name: root / name for name in CASES}


def _outcome(path: Path) -> tuple[str, np.ndarray | None]:
    try:
        return "scored", reader.read_image(path)
    except ImageReadError as exc:
        return str(exc), None


@pytest.mark.parametrize("name", CASES)
def test_each_file_is_scored_or_refused_in_one_clear_line(
    corpus: dict[str, Path], seeds: Seeds, name: str
) -> None:
    case, path = CASES[name], corpus[name]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the filters a user runs with
        outcome, image = _outcome(path)
    assert time.perf_counter() - start < SECONDS_PER_FILE
    assert not caught, [str(w.message) for w in caught]  # the result is all a user sees
    if case.expect != "scored":
        assert case.expect in outcome and str(path) in outcome and "\n" not in outcome
        return
    assert outcome == "scored" and image is not None
    assert image.dtype == np.uint8 and image.ndim == 2 and min(image.shape) >= reader.MIN_SIDE
    if case.like_xray is not None:
        assert image.shape == seeds.grey.shape
        assert np.abs(image.astype(int) - seeds.grey).mean() <= case.like_xray


_READ_UNDER_LIMIT = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
from pneumoscan import reader
from pneumoscan.errors import ImageReadError
for path in sys.argv[2:]:
    start = time.perf_counter()
    try:
        reader.read_image(path)
        outcome = "scored"
    except ImageReadError as exc:
        outcome = str(exc)
    print(json.dumps([path, outcome, time.perf_counter() - start]), flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux enforces RLIMIT_AS")
def test_bombs_are_refused_within_a_memory_and_time_limit(corpus: dict[str, Path]) -> None:
    # Good files of each decoder first: the limit leaves room for a normal read.
    controls = ["dicom-named.jpg", "png-named.dcm", "dicom-jpeg-frame.dcm", "dicom-j2k-frame.dcm"]
    bombs = [name for name, case in CASES.items() if case.bomb]
    paths = [str(corpus[name]) for name in controls + bombs]
    run = subprocess.run(
        [sys.executable, "-c", _READ_UNDER_LIMIT, str(MEMORY_LIMIT), *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]  # a crash, MemoryError or other exception
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [row[0] for row in rows] == paths
    for name, (_, outcome, seconds) in zip(controls + bombs, rows, strict=True):
        assert CASES[name].expect in outcome, (name, outcome)
        assert seconds < SECONDS_PER_FILE, (name, seconds)


def test_running_out_of_memory_is_said_plainly(
    seeds: Seeds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real image too large for the memory left: not 'broken', and no MemoryError."""

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(reader, "to_grey_uint8", no_memory)
    monkeypatch.setattr(reader, "_stretch", no_memory)
    for name, data in (("scan.png", seeds.png), ("scan.dcm", seeds.dicom)):
        with pytest.raises(ImageReadError, match=f"^{name}: not enough memory"):
            reader.read_image(data, name=name)


def test_one_batch_scores_the_good_and_reports_each_bad_in_order(
    corpus: dict[str, Path], xray_files: list[Path], tiny_models: dict[str, Path]
) -> None:
    model = model_folder.load(tiny_models["cnn"])
    nasty = list(corpus.values())
    half = len(nasty) // 2
    files = [xray_files[0], *nasty[:half], xray_files[1], *nasty[half:], xray_files[2]]
    expected = {str(corpus[name]): case.expect for name, case in CASES.items()}
    expected |= {str(f): "scored" for f in xray_files[:3]}
    results = list(screening.predict(model, files, batch_size=8))
    assert [r.file for r in results] == [str(f) for f in files]  # every file, in order
    for r in results:
        if expected[r.file] == "scored":
            assert r.error is None and r.probability is not None, r
        else:
            assert r.error and expected[r.file] in r.error and r.file in r.error, r
            assert "\n" not in r.error and r.probability is None and r.label is None
