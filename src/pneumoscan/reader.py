"""One image reader for everything: any supported file becomes an 8-bit greyscale array.

Training, evaluation and prediction all go through `read_image` and `resize`, so the
pixels a model sees cannot drift between the code paths.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan.errors import ImageReadError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.uid import UID

MAX_PIXELS = 50_000_000  # ~7000x7000: larger than any radiograph, smaller than a bomb
MIN_SIDE = 16
MAX_JPEG_SCANS = 100  # encoders write about 10; each scan re-decodes the whole image
MAX_INFLATED = 4 * MAX_PIXELS  # bytes: a deflated DICOM of 16-bit grey or 8-bit RGB at the limit
# What a model records (preprocess.py): bump when the pixels of an 8-bit image change, as
# every training image is; a model folder then refuses a reader that cannot reproduce it.
VERSION = 1
# Keys the decode cache (data.py): bump when any file's pixels change. 2: 16-bit PNG and
# TIFF, and DICOM without a window, scaled by the bits they hold; EXIF orientation applied.
CACHE_VERSION = 2
DATASET_SIDE = 224  # every training image is 224x224 (the originals squashed with Lanczos)
_UNSUPPORTED = "not a supported image (use JPEG, PNG, TIFF or DICOM)"
# pydicom's warnings can quote patient data: DICOM is parsed with them off, one file at a time.
_DICOM_LOCK = threading.Lock()
_BROKEN_DICOM = "broken or truncated DICOM file; export it again from the PACS or modality"


def read_image(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Read a JPEG, PNG or TIFF (8/16-bit, grey, RGB, palette, alpha) or DICOM into 2-D uint8."""
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
    try:
        if _is_dicom(data, label):
            return _decode_dicom(data, label)
        return _decode_pil(data, label)
    except MemoryError:
        # Bombs are refused from their headers before this: this is a real image, too large now.
        raise ImageReadError(f"{label}: not enough memory to decode this image") from None


def _decode_pil(data: bytes, label: str) -> np.ndarray:
    # Pillow warns of what it tolerates (corrupt EXIF, a size under our own pixel limit): nothing
    # a user could act on. Filters are process-wide, so this one is added, never toggled (that
    # would race between decode threads), and added again each time in case a caller's
    # catch_warnings() dropped it; adding an existing filter only moves it to the front.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "EPS":
            # Pillow renders EPS by running Ghostscript on it: a program, not an image.
            raise ImageReadError(f"{label}: {_UNSUPPORTED}")
        _check_header(img, label)
        if img.format in ("JPEG", "MPO"):
            _check_jpeg_scans(data, label)
        img.load()
        return to_grey_uint8(_upright(img), data)
    except (ImageReadError, MemoryError):
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"{label}: image exceeds the limit of {MAX_PIXELS:,} pixels; refused"
        ) from None
    except UnidentifiedImageError:
        if data.startswith((b"\xff\xd8", b"\x89PNG")):  # a JPEG or PNG signature, then garbage
            raise ImageReadError(
                f"{label}: broken or truncated image (unreadable header)"
            ) from None
        raise ImageReadError(f"{label}: {_UNSUPPORTED}") from None
    except Exception as exc:  # Pillow's decoders raise many types (TypeError for a cut TIFF)
        raise ImageReadError(f"{label}: broken or truncated image ({exc})") from None


def _is_dicom(data: bytes, label: str) -> bool:
    if data[128:132] == b"DICM":
        return True
    # Old files without the preamble exist. Forced parsing "succeeds" on almost any bytes,
    # so trust it only when the name says DICOM and pixel data turns up.
    if Path(label).suffix.lower() not in (".dcm", ".dicom"):
        return False
    try:
        with quiet_pydicom():
            return "PixelData" in _parse_dicom(data, label)
    except (ImageReadError, MemoryError):
        raise
    except Exception:
        return False


def _decode_dicom(data: bytes, label: str) -> np.ndarray:
    """Modality LUT, then VOI window, scaled to 8 bits; MONOCHROME1 flipped so air is dark.

    Messages never quote header values beyond geometry and encoding: headers hold patient data.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with quiet_pydicom():
            ds = _parse_dicom(data, label)
            _check_dicom_header(ds, label)
            # Frame 0 only: surplus pixel bytes would otherwise come back as extra frames.
            ds.pixel_array_options(index=0)
            pixels = ds.pixel_array
            lowest, highest = _stored_range(ds, pixels)
            if ds.SamplesPerPixel == 3:
                values = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
                ends = np.array([lowest, highest], dtype=np.float64)
            else:
                values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
                # The display range is wherever the same pipeline sends the storable extremes.
                ends = apply_voi_lut(apply_modality_lut(np.array([lowest, highest]), ds), ds)
                if ds.PhotometricInterpretation == "MONOCHROME1":
                    # Invert before scaling, so 8-bit data stored in more bits comes back exactly.
                    values = float(np.min(ends)) + float(np.max(ends)) - values
            return _stretch(values, ends)
    except (ImageReadError, MemoryError):
        raise
    except Exception:
        # pydicom raises many types for malformed files, and their text can quote header values.
        raise ImageReadError(f"{label}: {_BROKEN_DICOM}") from None


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings, log and value checks: their text can quote patient data.

    One thread at a time: warning filters, loggers and pydicom's settings are process-wide,
    and a save-and-restore in two threads at once would race (one thread's restore unmuting
    another's read).
    """
    from pydicom.config import disable_value_validation, logger

    with _DICOM_LOCK:
        # A level above CRITICAL also mutes pydicom's child loggers, which inherit it.
        level = logger.level
        logger.setLevel(logging.CRITICAL + 1)
        try:
            with warnings.catch_warnings(), disable_value_validation():
                warnings.simplefilter("ignore")
                yield
        finally:
            logger.setLevel(level)


def _parse_dicom(data: bytes, label: str) -> Dataset:
    # Imported here, not at the top: pydicom costs start-up time that JPEG and PNG users skip.
    import pydicom
    from pydicom import uid

    _check_inflated_size(data, label)
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        # Files without a meta header are always uncompressed, in the encoding parsing found.
        implicit, little_endian = ds.original_encoding
        if implicit:
            ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
        elif little_endian:
            ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
    return ds


def _check_inflated_size(data: bytes, label: str) -> None:
    """pydicom inflates a deflated data set whole, however large: measure it first, in pieces."""
    from pydicom import uid
    from pydicom.filereader import read_dataset, read_preamble

    fp = io.BytesIO(data)
    read_preamble(fp, force=True)
    # pydicom reads the file meta this way too (explicit VR, or implicit where it finds that).
    meta = read_dataset(fp, False, True, stop_when=lambda tag, *_: tag.group != 2)
    if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data)
    inflated = 0
    # Deflate expands 1032-fold at most, so a 16 kB piece inflates to 17 MB at most.
    for piece in range(fp.tell(), len(data), 1 << 14):
        inflated += len(inflater.decompress(view[piece : piece + (1 << 14)]))
        if inflated > MAX_INFLATED:
            raise ImageReadError(
                f"{label}: deflated DICOM data expands past {MAX_INFLATED:,} bytes; refused"
            )


def _check_dicom_header(ds: Dataset, label: str) -> None:
    """Refuse from the header alone, before a single pixel is decoded."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise ImageReadError(
            f"{label}: DICOM file has no pixel data (not an image, or cut short);"
            " give the full image file"
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    if rows * columns * frames > MAX_PIXELS:
        raise ImageReadError(
            f"{label}: {columns}x{rows}x{frames} pixels exceeds the limit of {MAX_PIXELS:,};"
            " refused"
        )
    if frames > 1:
        raise ImageReadError(f"{label}: multi-frame DICOM ({frames} frames); give a single frame")
    if min(rows, columns) < MIN_SIDE:
        raise ImageReadError(f"{label}: {columns}x{rows} pixels is too small to be a chest X-ray")
    greyscale = ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")
    if ds.get("SamplesPerPixel", 1) == 1 and not greyscale:
        raise ImageReadError(
            f"{label}: DICOM colour encoding not supported; give a greyscale or RGB image"
        )
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        # A malformed UID field could hold any text; only a well-formed UID is safe to show.
        shown = f"{syntax.name} ({syntax})" if syntax.is_valid else "(malformed UID)"
        raise ImageReadError(
            f"{label}: DICOM transfer syntax {shown} cannot be decoded here;"
            " export it uncompressed (Explicit VR Little Endian)"
        )
    if syntax.is_encapsulated and syntax != uid.RLELossless:  # RLE frames carry no size
        _check_frame_header(ds, syntax, label)


def _check_frame_header(ds: Dataset, syntax: UID, label: str) -> None:
    """Decoders size their output from a compressed frame's own header: it must match the DICOM's."""
    from pydicom import uid
    from pydicom.encaps import get_frame

    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    found = _frame_geometry(frame, j2k=syntax in uid.JPEG2000TransferSyntaxes)
    if found is None:
        raise ImageReadError(f"{label}: {_BROKEN_DICOM}")
    declared = int(ds.Columns), int(ds.Rows), int(ds.get("SamplesPerPixel", 1))
    if found[:2] != declared[:2] or found[2] > declared[2]:
        raise ImageReadError(
            f"{label}: compressed frame ({found[0]}x{found[1]}, {found[2]} per pixel) does not"
            f" match the DICOM header ({declared[0]}x{declared[1]}, {declared[2]} per pixel);"
            " refused"
        )
    if syntax in uid.JPEGTransferSyntaxes:
        _check_jpeg_scans(frame, label)


_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG's and JPEG-LS's


def _frame_geometry(frame: bytes, j2k: bool) -> tuple[int, int, int] | None:
    """Columns, rows and samples per pixel from a JPEG, JPEG-LS or JPEG 2000 frame header."""
    try:
        if j2k:
            siz = frame.index(b"\xff\x4f\xff\x51") + 2  # the codestream opens with SOC, then SIZ
            width, height, left, top = struct.unpack_from(">4I", frame, siz + 6)
            (samples,) = struct.unpack_from(">H", frame, siz + 38)
            return width - left, height - top, samples
        at = 2  # after SOI, segments (each with its length) until the start of frame
        while frame[at] == 0xFF:
            marker = frame[at + 1]
            if marker in _SOF_MARKERS:
                rows, columns, samples = struct.unpack_from(">HHB", frame, at + 5)
                return columns, rows, samples
            if marker == 0xFF:  # a fill byte
                at += 1
                continue
            at += 2 + struct.unpack_from(">H", frame, at + 2)[0]
    except (ValueError, IndexError, struct.error):
        pass
    return None


def _stored_range(ds: Dataset, pixels: np.ndarray) -> tuple[int, int]:
    """The range the stored values can span: BitsStored's, but where no VOI window or LUT says
    how to show unsigned data, the fewest of 8, 10, 12, 14 or 16 bits that hold its brightest
    pixel, if fewer: exports often declare 16 bits stored for a detector's 12, and the film
    would come back nearly black (as 16-bit PNG and TIFF are read, `_full_scale`)."""
    bits = int(ds.BitsStored)
    if ds.get("PixelRepresentation", 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if "WindowCenter" not in ds and "VOILUTSequence" not in ds and pixels.size:
        bits = min(bits, _bits_held(float(pixels.max())))
    return 0, 2**bits - 1


def _bits_held(top: float) -> int:
    """The fewest of 8, 10, 12, 14 or 16 bits (or more) that hold `top`, as detectors write them."""
    bits = max(8, int(top).bit_length())
    return bits + bits % 2


def _stretch(values: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Map the range's levels onto 256 as a bit shift does; a degenerate range uses the data's.

    A shift (floor of value * 256 / levels) gives back 8-bit data stored in more bits exactly,
    whichever way it was widened: v * 16 in 12 bits, or v * 257 in 16 bits.
    """
    lo, hi = float(np.min(ends)), float(np.max(ends))
    if np.isfinite([lo, hi]).all() and lo != hi:
        shifted = np.floor((np.asarray(values, dtype=np.float64) - lo) * (256 / (hi - lo + 1)))
        return np.clip(shifted, 0, 255).astype(np.uint8)
    lo, hi = float(values.min()), float(values.max())
    return _scale(values - lo, (hi - lo) or 1.0)


def _check_header(img: Image.Image, label: str) -> None:
    """Refuse from the header alone, before a single pixel is decoded."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"{label}: {width}x{height} pixels exceeds the limit of {MAX_PIXELS:,}; refused"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageReadError(f"{label}: {width}x{height} pixels is too small to be a chest X-ray")
    # An MPO is a camera JPEG whose extra images (thumbnail, depth, gain map) follow the picture;
    # a TIFF's later pages may be previews of the first (`_has_only_previews`).
    if getattr(img, "n_frames", 1) > 1 and img.format != "MPO" and not _has_only_previews(img):
        raise ImageReadError(f"{label}: animated or multi-frame image; give a single frame")


def _has_only_previews(img: Image.Image, most: int = 8) -> bool:
    """A TIFF whose later pages (a few) are each smaller than its first: scanners and converters
    add thumbnails or reduced-resolution copies. The first page is the image; left selected."""
    if img.format != "TIFF" or img.n_frames > most:
        return False
    width, height = img.size
    try:
        for page in range(1, img.n_frames):
            img.seek(page)
            if img.size[0] * img.size[1] >= width * height:
                return False
        img.seek(0)
        return True
    except Exception:  # a page that cannot be reached: not a file to guess about
        return False


def _check_jpeg_scans(data: bytes, label: str) -> None:
    """Refuse a JPEG whose scans would take minutes: a few kB can hold thousands of them.

    Counting FF DA is exact for the image data (an FF in compressed data is followed by 00 or a
    restart marker); metadata quoting it can only make the count larger.
    """
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise ImageReadError(
            f"{label}: {scans} JPEG scans exceeds the limit of {MAX_JPEG_SCANS}; refused"
        )


def _upright(img: Image.Image) -> Image.Image:
    """Turn the image as its EXIF orientation says (a phone's photograph of a film carries one).

    An orientation Pillow cannot read leaves the image as stored: the pixels are still good.
    """
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)  # in place: a copy would lose `img.format`
    return img


def to_grey_uint8(img: Image.Image, data: bytes = b"") -> np.ndarray:
    """Convert any PIL mode to 8-bit greyscale; high bit depths by the bits the file holds.

    `data` (the file's bytes) lets a PNG say its significant bits (`sBIT`).
    """
    if img.mode.startswith("I"):  # 16- and 32-bit integer grey
        arr = np.asarray(img).astype(np.float64)
        arr -= min(float(arr.min()), 0.0)  # signed data: its lowest value is black
        return _stretch(arr, np.array([0.0, _full_scale(img, data, float(arr.max()))]))
    if img.mode == "F":  # floating point: [0, 1] as written, else the data's own range
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        return _scale(arr - lo, max(hi - lo, 1e-6))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8).copy()


def _full_scale(img: Image.Image, data: bytes, top: float) -> float:
    """The largest value the pixels were written to reach: white.

    A 16-bit PNG or TIFF often holds 10, 12 or 14 bits of a detector or digitiser (0-4095 in a
    0-65535 container); scaled by the container's range, that film would come back nearly black
    in 16 grey levels. In order: the bits the file declares (PNG `sBIT`, TIFF `MaxSampleValue`),
    if its pixels keep to them; else the fewest of 8, 10, 12, 14 or 16 bits (or more, for
    32-bit data) that hold its brightest pixel, as detectors write them. Scaled as DICOM is
    (`_stretch`), 8-bit data stored as v * 257 or v * 256 (v * 16 in 12 bits) comes back exactly.
    """
    declared = None
    if img.format == "PNG":
        bits = _png_significant_bits(data)
        declared = 2.0**bits - 1 if bits else None
    elif img.format == "TIFF":
        declared = img.tag_v2.get(281)  # MaxSampleValue
        if isinstance(declared, tuple):
            declared = max(declared, default=None)
    if declared and declared >= top:
        return float(declared)
    return 2.0 ** _bits_held(top) - 1


def _png_significant_bits(data: bytes) -> int | None:
    """The grey sample's significant bits from a PNG's `sBIT` chunk (before `IDAT`), if any."""
    at = 8  # after the signature: chunks of length, type, data and CRC
    while at + 9 <= len(data):
        (length,) = struct.unpack_from(">I", data, at)
        kind = data[at + 4 : at + 8]
        if kind == b"sBIT" and length >= 1:
            return data[at + 8] if 1 <= data[at + 8] <= 16 else None
        if kind == b"IDAT":
            return None
        at += 12 + length
    return None


def _scale(arr: np.ndarray, full: float) -> np.ndarray:
    return np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Squash the whole frame to size x size (no crop), as the data set itself was made.

    A frame larger than the data set's 224 px is first brought to 224 px the way the data set's
    images were made from their originals (Lanczos), so a full-resolution radiograph reaches
    the model through the same resampling as the training images did.
    """
    if image.shape == (size, size):
        return image
    pil = Image.fromarray(image)
    if size <= DATASET_SIDE < max(image.shape):
        pil = pil.resize((DATASET_SIDE, DATASET_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def load(source: str | Path | bytes, size: int, name: str | None = None) -> np.ndarray:
    """Read and resize: the model-ready uint8 array of one file."""
    return resize(read_image(source, name=name), size)
