"""Decoding and preprocessing of chest X-rays, shared verbatim by the trainer and the workers.

Every input (PNG, JPEG, DICOM) becomes a float32 HxWx3 RGB array in [0, 1]; `preprocess` then
resizes it to the model's input. Anything that cannot be decoded raises `ImageDecodeError`, whose
message is short, safe to store in the `scans.error` column, and never contains patient data; its
`kind` says whether the file is "corrupt" or valid but "unsupported".

`decode_reduced` is the worker's cheaper entry point: it decodes, then shrinks to the largest size
anything downstream needs while the pixels are still integers (see docs/decoding.md).
`check_image_header` is the size guard every reader calls first: it refuses, from the header alone,
what declares more than the limits or less pixel data than its size; DICOM is read through pydicom's
element parsers over a bounded inflater, so a deflate bomb is refused before its bytes exist.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.encaps
import pydicom.pixels
import pydicom.uid
from pydicom.uid import UID

from shared.errors import LungcamError

DECODE_ERROR_KINDS = ("corrupt", "unsupported")


class ImageDecodeError(LungcamError, ValueError):
    """An image that cannot be decoded; str(err) is a short, human-readable reason (no patient data)."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        # "unsupported": a valid file we cannot decode (syntax, photometric, size); "corrupt": the
        # rest (truncated, garbage, not an image). The message always names the kind.
        if kind not in DECODE_ERROR_KINDS:
            raise ValueError(f"kind must be one of {DECODE_ERROR_KINDS}, got {kind!r}")
        if kind not in message:
            message = f"{kind}: {message}"
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickle with the kind (Celery and multiprocessing pickle exceptions)."""
        return (type(self), (str(self), self.kind))


# Checked against the header before any pixel buffer is allocated, so a 1 KB file claiming
# 30000x30000 pixels costs nothing. Large enough for any detector (the biggest are ~4300x4300).
MAX_IMAGE_SIDE: int = 16384
MAX_IMAGE_PIXELS: int = 120_000_000
# The pixel data a DICOM may declare (all frames, uncompressed: Rows x Columns x SamplesPerPixel x
# BitsAllocated/8 x NumberOfFrames). A 16-bit grey frame at MAX_IMAGE_PIXELS is 240 MB. Checked
# from the header before the pixel bytes are read or, for Deflated Explicit VR Little Endian,
# before they are inflated: a 1 MB deflate bomb declaring 1 GB costs nothing.
MAX_PIXEL_DATA_BYTES: int = 256 * 1024 * 1024
# Everything before the pixel data that a deflated data set may inflate to (overlays, private
# blobs); skipped elements are inflated in small chunks and dropped, so this bounds CPU, not memory.
MAX_DEFLATED_HEADER_BYTES: int = 64 * 1024 * 1024

# Written into every model manifest; bump "version" whenever the numbers a model sees change.
PREPROCESSING: dict[str, Any] = {
    "version": 1,
    "color": "RGB",
    "dtype": "float32",
    "scale": "0..1",
    "png_jpeg": "opencv IMREAD_UNCHANGED; 8-bit /255, 16-bit /65535; grey replicated to 3 channels; alpha dropped",
    "dicom": "first frame; modality_lut, voi_lut (window), monochrome1_inverted, min-max; RGB /(2**BitsStored-1)",
    "resize": "area when shrinking, linear when enlarging; aspect ratio not preserved",
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_DICOM_MAGIC_OFFSET = 128

# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9

# Only the elements needed to render pixels are parsed: patient and study identifiers never enter
# the decoder's dataset, so no warning, log line or repr made here can carry them. It also skips
# the work of parsing large private and overlay elements.
_DICOM_PIXEL_TAGS = [
    "PixelData",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
]
_DICOM_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom converts the YBR family to RGB while decoding (pixel_array's default as_rgb=True).
_DICOM_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_DICOM_PALETTE = "PALETTE COLOR"
# The fastest installed plugin per syntax, measured by benchmarks/cpu_cost.py (docs/decoding.md);
# pydicom's own order is kept for the rest. GDCM for JPEG Lossless rather than the GPL-3.0 libjpeg.
_PREFERRED_PLUGINS: dict[str, str] = {
    pydicom.uid.JPEGLosslessSV1: "gdcm",
    pydicom.uid.JPEGLossless: "gdcm",
    pydicom.uid.JPEGLSLossless: "pyjpegls",
    pydicom.uid.JPEGLSNearLossless: "pyjpegls",
    pydicom.uid.RLELossless: "pylibjpeg",
}
# Value representations that may follow a tag in an explicit-VR file (PS3.5 table 6.2-1).
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def sniff_format(data: bytes) -> str:
    """Return "png", "jpeg", "tiff" or "dicom" from the leading bytes, or raise ImageDecodeError."""
    if len(data) == 0:
        raise ImageDecodeError("empty input")
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:3] == _JPEG_SIGNATURE:
        return "jpeg"
    # "DICM" before TIFF: some DICOM files carry a TIFF header in their preamble (dual-format files).
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    if data[:4] in _TIFF_SIGNATURES:
        return "tiff"
    if _looks_like_bare_dicom(data):
        return "dicom"
    # An HTML/XML error page from a store is the usual culprit; say so without echoing content.
    if _looks_like_text(data[:512]):
        raise ImageDecodeError("not an image (unrecognised header, looks like text)")
    raise ImageDecodeError("not an image (unrecognised header)")


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG, JPEG, TIFF or DICOM bytes to a float32 HxWx3 RGB array in [0, 1]."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    fmt = sniff_format(data)
    try:
        return _DECODERS[fmt](data)
    except ImageDecodeError:
        raise
    except Exception as exc:
        # Callers catch exactly one error type. Only the exception's type goes into the message:
        # third-party messages may quote header values we do not control.
        raise ImageDecodeError(f"truncated or corrupt {fmt} ({type(exc).__name__})") from exc


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a file and decode it with `decode_image` (OSError propagates unchanged)."""
    return decode_image(Path(path).read_bytes())


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a decoded image to a float32 size x size x 3 array in [0, 1], as the models expect."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or 0 in image.shape:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    height, width = image.shape[:2]
    # INTER_AREA averages the source pixels when shrinking (no aliasing of fine rib and noise
    # texture); when enlarging it degenerates to nearest-neighbour, so linear is used instead.
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    # Channels are resized independently, so a grey image is resized once and then replicated:
    # the same numbers for a third of the work.
    resized = cv2.resize(image if image.shape[2] == 3 else image[:, :, 0], (size, size), interpolation=interpolation)
    if resized.ndim == 2:
        resized = np.repeat(resized[:, :, None], 3, axis=2)
    return np.clip(resized, 0.0, 1.0).astype(np.float32, copy=False)


def fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an image (area interpolation) so its longer side is at most max_side; smaller ones pass unchanged."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a [0, 1] float image to uint8 of the same shape, for display and overlays."""
    # np.clip maps NaN to NaN, so NaNs are zeroed first; convertScaleAbs then rounds and saturates in
    # one pass (several times faster than rint + clip + astype on full-size films).
    unit = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return cv2.convertScaleAbs(unit, alpha=255.0)


# --- reduced decoding (the worker's path) -------------------------------------------------------


@dataclass(frozen=True)
class ReducedImage:
    """A decoded image already shrunk for everything downstream, and the size it was decoded at."""

    image: np.ndarray  # float32 in [0, 1]: HxW for grey sources, HxWx3 RGB for colour ones
    original_size: tuple[int, int]  # (height, width) of the full-size first frame
    format: str  # "png", "jpeg", "tiff" or "dicom"


def decode_reduced(data: bytes, max_side: int) -> ReducedImage:
    """Decode and shrink so the longer side is at most max_side, reducing while pixels are integers.

    The result matches `fit_within(decode_image(data), max_side)`: the same size, values within
    ~0.002 on average (the shrinking filter differs slightly; model inputs made from it are within
    ~0.015 of the old ones, see docs/decoding.md), for a fraction of the CPU time and memory. Grey
    sources stay single-channel: `preprocess`, `to_uint8` and the overlay functions accept HxW.
    Multi-frame DICOM: the first frame.
    """
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    fmt = sniff_format(data)
    try:
        image, original_size = _REDUCED_DECODERS[fmt](data, max_side)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"truncated or corrupt {fmt} ({type(exc).__name__})") from exc
    return ReducedImage(image=image, original_size=original_size, format=fmt)


def decodable_transfer_syntaxes() -> list[str]:
    """Every DICOM transfer syntax an installed decoder reads, uncompressed ones first (the listener offers exactly these)."""
    found = []
    for uid in pydicom.uid.AllTransferSyntaxes:
        try:
            available = pydicom.pixels.get_decoder(uid).is_available
        except NotImplementedError:  # video, JPIP and others pydicom has no decoder for
            continue
        if available:
            found.append(str(uid))
    return sorted(found, key=lambda uid: UID(uid).is_compressed)


def pixel_count(data: bytes) -> int:
    """Pixels the decoder will allocate (rows x columns x frames used), read from the header only.

    Counts without judging (a deflated DICOM's header is read through the bounded inflater);
    `check_image_header` also refuses what exceeds the limits.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    size = _raster_size(data, sniff_format(data))
    if size is None:
        dataset = _DicomReader(data).read_header([])
        size = _dicom_int(dataset, "Columns"), _dicom_int(dataset, "Rows")
    return size[0] * size[1]  # one frame: multi-frame files are decoded to their first frame only


def _raster_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or TIFF header; None for DICOM."""
    if fmt == "png":
        return _png_size(data)
    if fmt == "jpeg":
        width, height, _, _ = _jpeg_header(data)
        return width, height
    if fmt == "tiff":
        return _tiff_size(data)
    return None


def check_image_header(
    data: bytes, *, verify_pixel_data: bool = False, max_pixel_bytes: int = MAX_PIXEL_DATA_BYTES
) -> int:
    """The shared size guard: refuse, from the header alone, what would cost more than the limits; the pixels of one frame.

    PNG, JPEG and TIFF: the header's width and height against MAX_IMAGE_SIDE and MAX_IMAGE_PIXELS.
    DICOM: no pixel data, an unsupported photometric interpretation, a frame beyond those limits,
    declared pixel data (all frames) beyond max_pixel_bytes, or native pixel data shorter than
    Rows x Columns x SamplesPerPixel x BitsAllocated/8 x frames all raise ImageDecodeError. Nothing
    after the header is inflated unless verify_pixel_data, which also inflates a deflated data set's
    pixel data in small chunks, keeping none of it, to prove it is as long as declared. The DICOM
    listener, the worker's decode and the report's thumbnails call it; it takes a DICOMweb part's
    bytes as they are (with or without the 128-byte preamble) for the pull to call on each part.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    size = _raster_size(data, sniff_format(data))
    if size is None:
        reader = _DicomReader(data, max_pixel_bytes=max_pixel_bytes)
        reader.read_header([])
        facts = reader.check_pixel_data()
        if verify_pixel_data:
            reader.verify_pixel_data()
        return facts.rows * facts.columns
    _check_size(*size)
    return size[0] * size[1]  # one frame: multi-frame files are decoded to their first frame only


def _reduce_integer(
    pixels: np.ndarray, max_side: int, full_scale: float, original: tuple[int, int] | None = None
) -> np.ndarray:
    """Shrink integer pixels (HxW or HxWxC) to fit max_side, then scale to float32 [0, 1].

    The bulk of the shrinking is an integer-factor box average, OpenCV's fast INTER_AREA path
    (~10x cheaper than a fractional factor at full size); the fractional remainder runs on the
    small image, in float32. The output size is exactly `fit_within`'s for the `original`
    (height, width), which differs from pixels.shape after a JPEG reduced decode.
    """
    height, width = original or pixels.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return _to_unit(pixels, full_scale)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    height, width = pixels.shape[:2]
    factor = int(min(width / target[0], height / target[1]))
    if factor >= 2:
        # Cropping (at most factor-1 edge rows/columns) makes the factor exact; a view, not a copy.
        rows, columns = height - height % factor, width - width % factor
        pixels = cv2.resize(pixels[:rows, :columns], (columns // factor, rows // factor), interpolation=cv2.INTER_AREA)
    unit = _to_unit(pixels, full_scale)
    if unit.shape[1] == target[0] and unit.shape[0] == target[1]:
        return unit
    return cv2.resize(unit, target, interpolation=cv2.INTER_AREA)


def _to_unit(pixels: np.ndarray, full_scale: float) -> np.ndarray:
    """Integer pixels to float32 in [0, 1] (full_scale maps to 1)."""
    return pixels.astype(np.float32) * np.float32(1.0 / full_scale)


def _widen_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> uint16 times 257 (v/255 == 257v/65535), so the box average keeps sub-level precision."""
    return np.multiply(pixels, np.uint16(257), dtype=np.uint16)


def _reduce_opencv_pixels(
    pixels: np.ndarray, fmt: str, max_side: int, original: tuple[int, int] | None = None
) -> np.ndarray:
    """Reduce OpenCV output (grey, grey+alpha, BGR or BGRA; 8 or 16 bit) to float32 grey or RGB."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(f"unsupported {fmt} pixel type {pixels.dtype}", kind="unsupported")
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):  # grey, grey + alpha
        pixels = pixels[:, :, 0]
    elif pixels.ndim == 3 and pixels.shape[2] == 4:  # BGRA: drop alpha
        pixels = pixels[:, :, :3]
    elif not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ImageDecodeError(f"unsupported {fmt} channel layout {pixels.shape}", kind="unsupported")
    if pixels.dtype == np.uint8 and max(pixels.shape[:2]) > max_side:
        pixels = _widen_uint8(pixels)
    unit = _reduce_integer(pixels, max_side, 255.0 if pixels.dtype == np.uint8 else 65535.0, original)
    return unit[:, :, ::-1].copy() if unit.ndim == 3 else unit  # OpenCV order is BGR


def _reduced_png_or_tiff(data: bytes, max_side: int, fmt: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Full decode (these formats have no cheaper reduced mode), then reduce before widening to float."""
    width, height = _png_size(data) if fmt == "png" else _tiff_size(data)
    _check_size(width, height)
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise ImageDecodeError(f"truncated or corrupt {fmt}")
    return _reduce_opencv_pixels(pixels, fmt, max_side), pixels.shape[:2]


def _reduced_jpeg(data: bytes, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """JPEG via libjpeg's DCT scaling (1/2, 1/4, 1/8) when the image is at least twice max_side."""
    width, height, scan_start, components = _jpeg_header(data)
    _check_size(width, height)
    if data.find(b"\xff\xd9", scan_start) == -1:
        raise ImageDecodeError("truncated or corrupt jpeg (no end-of-image marker)")
    factor = next((f for f in (8, 4, 2) if max(width, height) // f >= max_side), 1)
    if factor == 1:
        flags = cv2.IMREAD_UNCHANGED
    else:
        grey = components == 1
        flags = {
            (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
            (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
            (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
            (2, False): cv2.IMREAD_REDUCED_COLOR_2,
            (4, False): cv2.IMREAD_REDUCED_COLOR_4,
            (8, False): cv2.IMREAD_REDUCED_COLOR_8,
        }[(factor, grey)]
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if pixels is None or pixels.size == 0:
        raise ImageDecodeError("truncated or corrupt jpeg")
    return _reduce_opencv_pixels(pixels, "jpeg", max_side, (height, width)), (height, width)


def _reduced_dicom(data: bytes, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """First frame; grey values go through one lookup (or saturating affine) pass to uint16, then shrink.

    Grey JPEG 2000 at least twice max_side is decoded at a reduced resolution level (`_jpeg2000_reduced`).
    """
    dataset, photometric = _dicom_dataset(data)
    reduced = _jpeg2000_reduced(dataset, photometric, max_side)
    if reduced is not None:
        pixels, original = reduced
        mapped = _dicom_grey_to_uint16(pixels, dataset, invert=photometric == "MONOCHROME1")
        if mapped is not None:
            return _reduce_integer(mapped, max_side, 65535.0, original), original
    dataset, photometric, pixels = _dicom_pixels(data, (dataset, photometric))
    if photometric in _DICOM_GREY:
        mapped = _dicom_grey_to_uint16(pixels, dataset, invert=photometric == "MONOCHROME1")
        if mapped is None:  # 32-bit or float data: the exact float path, then shrink
            unit = _dicom_grey_to_unit(pixels, dataset, invert=photometric == "MONOCHROME1")
            return fit_within(unit, max_side), pixels.shape[:2]
        return _reduce_integer(mapped, max_side, 65535.0), pixels.shape[:2]
    rgb, full_scale = _dicom_colour(pixels, dataset, photometric)
    if rgb.dtype == np.uint8 and max(rgb.shape[:2]) > max_side:
        rgb, full_scale = _widen_uint8(rgb), full_scale * 257.0
    if rgb.dtype in (np.uint8, np.uint16):
        return np.clip(_reduce_integer(rgb, max_side, full_scale), 0.0, 1.0), pixels.shape[:2]
    unit = np.clip(rgb.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)
    return fit_within(unit, max_side), pixels.shape[:2]


_JPEG2000_SYNTAXES = frozenset({pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000})


def _jpeg2000_reduced(
    dataset: pydicom.Dataset, photometric: str, max_side: int
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Frame 0 of a grey JPEG 2000 data set at the lowest resolution level still at least max_side, or None.

    JPEG 2000 is a wavelet pyramid: discarding r resolution levels decodes a 2**r times smaller
    image (the low-pass band) for a fraction of the work and memory, as libjpeg's DCT scaling does
    for JPEG. OpenJPEG does it through Pillow's `reduce` (pylibjpeg-openjpeg's API has no such
    option). Stored values are returned (Pillow widens to 16 bits and offsets signed data), with the
    full (rows, columns). None, for the full decode, when the syntax, photometric, layout or the
    codestream's decomposition levels do not allow a reduction.
    """
    if UID(dataset.file_meta.TransferSyntaxUID) not in _JPEG2000_SYNTAXES or photometric not in _DICOM_GREY:
        return None
    rows, columns = _dicom_int(dataset, "Rows"), _dicom_int(dataset, "Columns")
    if int(dataset.get("SamplesPerPixel") or 1) != 1 or max(rows, columns) // 2 < max_side:
        return None
    try:
        from openjpeg.utils import get_parameters
        from PIL import Image

        frame = next(
            pydicom.encaps.generate_frames(
                dataset.PixelData, number_of_frames=max(_dicom_int(dataset, "NumberOfFrames"), 1)
            )
        )
        facts = get_parameters(frame, 0 if frame[:2] == b"\xff\x4f" else None)
        precision, signed = int(facts["precision"]), bool(facts["is_signed"])
        levels = _jpeg2000_levels(frame)
    except Exception:  # noqa: BLE001 - anything unusual takes the full decode, which reports its own errors
        return None
    if (int(facts["rows"]), int(facts["columns"])) != (rows, columns) or int(facts["samples_per_pixel"]) != 1:
        return None
    if precision > 16 or signed != bool(_dicom_int(dataset, "PixelRepresentation")):
        return None
    reduce = min(next(r for r in (3, 2, 1, 0) if max(rows, columns) >> r >= max_side), levels)
    if reduce == 0:
        return None
    try:
        with Image.open(BytesIO(frame)) as image:
            image.reduce = reduce  # Pillow's Jpeg2KImageFile: resolution levels to discard, set before load()
            image.load()
            pixels = np.asarray(image)
    except Exception:  # noqa: BLE001
        return None
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        return None
    if pixels.dtype == np.uint16 and precision < 16:
        pixels = pixels >> np.uint16(16 - precision)  # Pillow's I;16 holds value << (16 - precision)
    if signed:  # and offset by 2**(precision-1)
        pixels = (pixels.astype(np.int32) - (1 << (precision - 1))).astype(np.int16 if precision > 8 else np.int8)
    return np.ascontiguousarray(pixels), (rows, columns)


def _jpeg2000_levels(codestream: bytes) -> int:
    """Decomposition levels of a JPEG 2000 codestream's default coding style (COD marker), 0 if not found."""
    start = codestream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: a raw codestream (or inside a JP2 box)
    position = codestream.find(b"\xff\x52", max(start, 0))  # COD: Lcod(2) Scod(1) SGcod(4) then levels
    if start < 0 or position < 0 or position + 10 > len(codestream):
        return 0
    return codestream[position + 9]


# --- PNG, JPEG and TIFF -------------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG after checking the size in its IHDR chunk."""
    width, height = _png_size(data)
    _check_size(width, height)
    return _decode_with_opencv(data, "png")


def _decode_tiff(data: bytes) -> np.ndarray:
    """Decode a TIFF (first page; 8/16-bit grey or colour, as film digitisers write) after checking its size."""
    width, height = _tiff_size(data)
    _check_size(width, height)
    return _decode_with_opencv(data, "tiff")


def _decode_jpeg(data: bytes) -> np.ndarray:
    """Decode a JPEG after checking its SOF size and that the scan data is complete."""
    width, height, scan_start, _ = _jpeg_header(data)
    _check_size(width, height)
    # Older libjpeg builds return a half-grey image with only a warning for a truncated file;
    # a missing end-of-image marker after the first scan is the cheap, reliable tell.
    if data.find(b"\xff\xd9", scan_start) == -1:
        raise ImageDecodeError("truncated or corrupt jpeg (no end-of-image marker)")
    return _decode_with_opencv(data, "jpeg")


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG spec requires to come first."""
    # signature (8) + chunk length (4) + b"IHDR" (4) + width (4) + height (4)
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageDecodeError("truncated or corrupt png (no IHDR header)")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _tiff_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first IFD (ImageWidth 256, ImageLength 257), classic or BigTIFF."""
    order = "little" if data[:2] == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43
    # Classic: 4-byte IFD offset, 2-byte entry count, 12-byte entries with a 4-byte value field.
    # BigTIFF: 8-byte offset (at 8), 8-byte count, 20-byte entries with an 8-byte value field.
    offset_at, offset_size, count_size, entry_size, value_size = (8, 8, 8, 20, 8) if big else (4, 4, 2, 12, 4)
    ifd = int.from_bytes(data[offset_at : offset_at + offset_size], order)
    count = int.from_bytes(data[ifd : ifd + count_size], order)
    if ifd < 8 or ifd + count_size > len(data) or count == 0:
        raise ImageDecodeError("truncated or corrupt tiff (no image directory)")
    size: dict[int, int] = {}
    for index in range(min(count, 4096)):
        entry = ifd + count_size + index * entry_size
        if entry + entry_size > len(data):
            raise ImageDecodeError("truncated or corrupt tiff (short image directory)")
        tag = int.from_bytes(data[entry : entry + 2], order)
        if tag in (256, 257):
            field_type = int.from_bytes(data[entry + 2 : entry + 4], order)
            value = data[entry + entry_size - value_size : entry + entry_size]
            width_bytes = {3: 2, 4: 4, 16: 8}.get(field_type)  # SHORT, LONG, LONG8
            if width_bytes is None:
                raise ImageDecodeError("truncated or corrupt tiff (bad size field)")
            size[tag] = int.from_bytes(value[:width_bytes], order)
        if len(size) == 2:
            return size[256], size[257]
    raise ImageDecodeError("truncated or corrupt tiff (no image size)")


def _jpeg_header(data: bytes) -> tuple[int, int, int, int]:
    """Width, height, offset of the first start-of-scan marker and component count, by walking the markers."""
    pos = 2
    size: tuple[int, int, int] | None = None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageDecodeError("truncated or corrupt jpeg (bad marker)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == _JPEG_EOI:
            break
        segment_length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if segment_length < 2:
            raise ImageDecodeError("truncated or corrupt jpeg (bad segment length)")
        if marker in _JPEG_SOF_MARKERS and pos + 10 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            size = (width, height, data[pos + 9])
        if marker == _JPEG_SOS:
            if size is None:
                break
            return size[0], size[1], pos, size[2]
        pos += 2 + segment_length
    raise ImageDecodeError("truncated or corrupt jpeg (no frame header)")


def _decode_with_opencv(data: bytes, fmt: str) -> np.ndarray:
    """Decode with OpenCV, keeping bit depth and channels, and normalise to RGB float32."""
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise ImageDecodeError(f"truncated or corrupt {fmt}")
    if pixels.dtype == np.uint8:
        scale = 255.0
    elif pixels.dtype == np.uint16:
        scale = 65535.0
    else:
        raise ImageDecodeError(f"unsupported {fmt} pixel type {pixels.dtype}", kind="unsupported")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    elif pixels.ndim == 3 and pixels.shape[2] == 2:  # grey + alpha
        rgb = np.repeat(pixels[:, :, :1], 3, axis=2)
    elif pixels.ndim == 3 and pixels.shape[2] in (3, 4):  # OpenCV order is BGR(A)
        rgb = pixels[:, :, 2::-1]
    else:
        raise ImageDecodeError(f"unsupported {fmt} channel layout {pixels.shape}", kind="unsupported")
    return np.ascontiguousarray(rgb, dtype=np.float32) / np.float32(scale)


# --- DICOM --------------------------------------------------------------------------------------


def _decode_dicom(data: bytes) -> np.ndarray:
    """Decode the first frame of a DICOM file to display values, then to RGB float32."""
    dataset, photometric, pixels = _dicom_pixels(data)
    if photometric in _DICOM_GREY:
        grey = _dicom_grey_to_unit(pixels, dataset, invert=photometric == "MONOCHROME1")
        return np.repeat(grey[:, :, None], 3, axis=2)
    rgb, full_scale = _dicom_colour(pixels, dataset, photometric)
    return np.clip(rgb.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)


def _read_dicom(data: bytes, tags: list[str], *, pixels: bool) -> pydicom.Dataset:
    """Parse only `tags` (plus the file meta), with or without the 128-byte preamble.

    With pixels, the declared size is checked (`_DicomReader.check_pixel_data`) before the pixel
    data is read; a deflated data set is inflated through a bounded stream either way.
    """
    reader = _DicomReader(data)
    dataset = reader.read_header(tags)
    if pixels:
        reader.check_pixel_data()
        reader.read_pixel_data(dataset)
    return dataset


@dataclass(frozen=True)
class _PixelFacts:
    """What a DICOM header declares about its pixel data."""

    rows: int
    columns: int
    frame_bytes: int  # one frame, as the decoder allocates it
    declared_bytes: int  # all frames, uncompressed
    element_length: int  # the Pixel Data element's value length (0xFFFFFFFF: encapsulated)


class _DicomReader:
    """Reads a DICOM header, checks what it declares, and only then its pixel data.

    pydicom's own reader inflates a whole Deflated Explicit VR Little Endian data set into memory
    before reading a single element, so this one uses pydicom's element parsers (read_preamble,
    the file meta reader, read_dataset) over a `_BoundedInflater` instead.
    """

    _PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double float, Pixel Data
    _SIZE_TAGS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames", "PhotometricInterpretation")

    def __init__(self, data: bytes, *, max_pixel_bytes: int = MAX_PIXEL_DATA_BYTES) -> None:
        """Read the preamble and file meta, and open the data set's stream (inflating it if deflated)."""
        from pydicom.filereader import _read_file_meta_info, read_preamble

        self.data = data
        self.max_pixel_bytes = max_pixel_bytes
        self.bare = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] != b"DICM"
        self.pixel_tag: int | None = None
        self.pixel_vr: str | None = None
        self.pixel_length = 0
        self.facts: _PixelFacts | None = None
        self.header: pydicom.Dataset | None = None
        source = BytesIO(data)
        try:
            read_preamble(source, force=True)
            self.meta = _read_file_meta_info(source)
        except Exception as exc:
            raise ImageDecodeError(f"truncated or corrupt DICOM header ({type(exc).__name__})") from exc
        self.deflated = self.meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
        self.implicit, self.little = self._encoding(source)
        self.stream: Any = _BoundedInflater(data, source.tell(), MAX_DEFLATED_HEADER_BYTES) if self.deflated else source

    def _encoding(self, source: BytesIO) -> tuple[bool, bool]:
        """(implicit VR, little endian) from the transfer syntax, or guessed as pydicom does for a bare data set."""
        syntax = self.meta.get("TransferSyntaxUID")
        if syntax is not None:
            uid = UID(syntax)
            if uid == pydicom.uid.ImplicitVRLittleEndian:
                return True, True
            if uid == pydicom.uid.ExplicitVRBigEndian:
                return False, False
            return False, True  # explicit little endian, deflated and every encapsulated syntax
        start = source.tell()
        head = source.read(6)
        source.seek(start)
        if len(head) < 6:
            raise ImageDecodeError("truncated or corrupt DICOM (no transfer syntax)")
        implicit = head[4:6] not in _DICOM_VRS
        little = implicit or int.from_bytes(head[:2], "little") < 1024
        self.meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        )
        return implicit, little

    def read_header(self, tags: list[str]) -> pydicom.Dataset:
        """The listed elements (and the size elements) up to the pixel data, whose element header is noted, not read."""
        from pydicom.filereader import read_dataset
        from pydicom.tag import Tag

        wanted = [Tag(tag) for tag in {*tags, *self._SIZE_TAGS} if Tag(tag) not in self._PIXEL_TAGS]

        def at_pixels(tag: int, vr: str | None, length: int) -> bool:
            if tag in self._PIXEL_TAGS:
                self.pixel_tag, self.pixel_vr, self.pixel_length = int(tag), vr, length
                return True
            return False

        try:
            dataset = read_dataset(self.stream, self.implicit, self.little, stop_when=at_pixels, specific_tags=wanted)
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(f"truncated or corrupt DICOM header ({type(exc).__name__})") from exc
        dataset.file_meta = self.meta
        dataset.set_original_encoding(self.implicit, self.little, None)
        self.header = dataset
        return dataset

    def check_pixel_data(self) -> _PixelFacts:
        """Refuse missing pixel data, an unsupported photometric, and declared sizes beyond the limits."""
        dataset = self.header
        assert dataset is not None, "read_header first"
        if self.pixel_tag is None:
            if self.bare:
                # Without the "DICM" magic, pydicom (forced) reads almost any bytes as some dataset.
                raise ImageDecodeError("not an image (no DICOM preamble and no pixel data)")
            raise ImageDecodeError("DICOM has no pixel data", kind="unsupported")
        rows, columns = _dicom_int(dataset, "Rows"), _dicom_int(dataset, "Columns")
        _check_size(columns, rows)
        photometric = str(dataset.get("PhotometricInterpretation") or "").strip().upper()
        if "PhotometricInterpretation" in dataset and photometric not in _DICOM_GREY | _DICOM_COLOUR | {_DICOM_PALETTE}:
            raise ImageDecodeError(
                f"unsupported DICOM photometric interpretation {_safe_code(photometric)}", kind="unsupported"
            )
        samples = _dicom_int(dataset, "SamplesPerPixel") or 1
        default_bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(self.pixel_tag, 8)
        bits = _dicom_int(dataset, "BitsAllocated") or default_bits
        frames = max(_dicom_int(dataset, "NumberOfFrames"), 1)
        if bits not in (1, 8, 16, 32, 64) or not 1 <= samples <= 4:
            raise ImageDecodeError(
                f"unsupported DICOM pixel layout ({bits} bits, {samples} samples)", kind="unsupported"
            )
        frame_bits = rows * columns * samples * bits
        if photometric == "YBR_FULL_422" and self.pixel_length != 0xFFFFFFFF:
            frame_bits = frame_bits * 2 // 3  # native 4:2:2 stores two chroma samples per two pixels
        declared = (frame_bits * frames + 7) // 8
        if declared > self.max_pixel_bytes:
            raise ImageDecodeError(
                f"image too large: pixel data of {columns}x{rows} x {samples} samples x {bits} bits x {frames} frames "
                f"({declared / 2**20:.0f} MiB) exceeds {self.max_pixel_bytes / 2**20:.0f} MiB",
                kind="unsupported",
            )
        if self.pixel_length != 0xFFFFFFFF:
            # Native pixel data: the element must hold every declared frame (one odd pad byte allowed).
            if self.pixel_length < declared:
                raise ImageDecodeError(
                    f"corrupt DICOM pixel data: shorter than declared ({self.pixel_length} of {declared} bytes)"
                )
            if not self.deflated and self._value_start() + min(self.pixel_length, declared) > len(self.data):
                raise ImageDecodeError(
                    f"corrupt DICOM pixel data: truncated ({len(self.data) - self._value_start()} of {declared} bytes)"
                )
        self._check_syntax(bits)
        self.facts = _PixelFacts(rows, columns, (frame_bits + 7) // 8, declared, self.pixel_length)
        return self.facts

    def _check_syntax(self, bits: int) -> None:
        """Refuse a compressed syntax no installed decoder reads (before anything is stored or answered)."""
        syntax = UID(self.meta.TransferSyntaxUID)
        if not syntax.is_compressed:
            return
        try:
            available = pydicom.pixels.get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ImageDecodeError(
                f"unsupported DICOM transfer syntax: {_safe_uid_name(syntax)} (no decoder installed)",
                kind="unsupported",
            )
        if syntax == pydicom.uid.JPEGExtended12Bit and bits > 8:
            # Only the GPL libjpeg plugin, not a dependency, decodes 12-bit lossy JPEG (docs/decoding.md).
            raise ImageDecodeError(
                f"unsupported DICOM pixel data ({_safe_uid_name(syntax)}: no installed decoder handles it)",
                kind="unsupported",
            )

    def _value_start(self) -> int:
        """Where the pixel data's value starts (the stream is at its element header)."""
        long_header = not self.implicit and self.pixel_vr in ("OB", "OW", "OF", "OD", "UN", "OL", "OV")
        return int(self.stream.tell()) + (12 if long_header else 8)

    def read_pixel_data(self, dataset: pydicom.Dataset) -> None:
        """Add the pixel data element to dataset; nothing after it is read (or inflated)."""
        from pydicom.filereader import read_dataset
        from pydicom.tag import Tag

        facts = self.facts
        assert facts is not None, "check_pixel_data first"
        if self.deflated:
            # Native data only (deflate is not an encapsulated syntax): the element header, the declared
            # value and a pad byte; the stream ends there, so nothing after the pixel data is inflated.
            self.stream.cap = self.stream.tell() + 12 + facts.declared_bytes + 2
            self.stream.end_at_cap = True
        try:
            pixels = read_dataset(
                self.stream,
                self.implicit,
                self.little,
                stop_when=lambda tag, vr, length: tag not in self._PIXEL_TAGS,
                specific_tags=[Tag(self.pixel_tag)],
            )
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(f"truncated or corrupt DICOM pixel data ({type(exc).__name__})") from exc
        if facts.element_length != 0xFFFFFFFF:
            value = pixels.get(self.pixel_tag)
            if value is None or len(value.value or b"") < facts.declared_bytes:
                raise ImageDecodeError("corrupt DICOM pixel data: truncated")
        dataset.update(pixels)

    def verify_pixel_data(self) -> None:
        """Inflate a deflated data set's pixel data, keeping none of it, to prove it is as long as declared."""
        facts = self.facts
        assert facts is not None, "check_pixel_data first"
        if not self.deflated or facts.element_length == 0xFFFFFFFF:
            return
        start = self._value_start()
        self.stream.cap = start + facts.declared_bytes + 2
        self.stream.end_at_cap = True
        available = self.stream.skip_to(start + facts.declared_bytes) - start
        if available < facts.declared_bytes:
            raise ImageDecodeError(f"corrupt DICOM pixel data: truncated ({available} of {facts.declared_bytes} bytes)")


class _BoundedInflater:
    """A read-only, forward-mostly file object over the raw-deflate stream data[start:], inflated on demand.

    Never holds more than what the current read asks for plus a small window behind it (pydicom
    seeks back over an element header), and raises ImageDecodeError instead of inflating past `cap`.
    """

    _WINDOW = 64 * 1024  # bytes kept behind the position for pydicom's short seeks back
    _CHUNK = 1024 * 1024  # output inflated per step

    def __init__(self, data: bytes, start: int, cap: int) -> None:
        """Inflate data[start:] lazily, at most cap bytes."""
        self._source = memoryview(data)[start:]
        self._fed = 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._buffer_start = 0  # stream offset of _buffer[0]
        self._position = 0
        self._eof = False
        self.cap = cap
        self.end_at_cap = False  # True: the cap ends the stream; False: passing it is an error

    def tell(self) -> int:
        """The current stream offset."""
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move within the inflated stream (forward freely; back only inside the window)."""
        target = offset if whence == 0 else self._position + offset if whence == 1 else None
        if target is None:
            raise ImageDecodeError("corrupt DICOM (seek from the end of a deflated stream)")
        if target < self._buffer_start:
            raise ImageDecodeError("corrupt DICOM (seek back in a deflated stream)")
        self._position = target
        return target

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (fewer at the end of the stream)."""
        end = self.cap if size is None or size < 0 else self._position + size
        self._fill(end)
        offset = self._position - self._buffer_start
        chunk = bytes(self._buffer[offset : offset + max(end - self._position, 0)])
        self._position += len(chunk)
        self._trim()
        return chunk

    def skip_to(self, end: int) -> int:
        """Inflate and drop everything up to stream offset end; the offset reached (short at the end of the stream)."""
        while self._buffer_start + len(self._buffer) < end and not self._eof:
            self._position = self._buffer_start + len(self._buffer)
            self._trim()
            self._inflate(min(end - (self._buffer_start + len(self._buffer)), self._CHUNK))
        self._position = min(end, self._buffer_start + len(self._buffer))
        return self._position

    def _fill(self, end: int) -> None:
        """Inflate until the buffer reaches stream offset end (or the stream ends), dropping what lies behind."""
        while self._buffer_start + len(self._buffer) < end and not self._eof:
            if self._buffer_start + len(self._buffer) < self._position - self._WINDOW:
                self._trim()
            self._inflate(min(end - (self._buffer_start + len(self._buffer)), self._CHUNK))

    def _inflate(self, want: int) -> None:
        """Inflate up to want more bytes into the buffer, refusing to pass the cap."""
        if self._buffer_start + len(self._buffer) + 1 > self.cap:
            if self.end_at_cap:
                self._eof = True
                return
            raise ImageDecodeError(
                f"image too large: deflated data set inflates beyond {self.cap / 2**20:.0f} MiB", kind="unsupported"
            )
        want = min(want, self.cap - (self._buffer_start + len(self._buffer)))
        tail = self._inflater.unconsumed_tail
        if tail:
            source = tail
        elif self._fed < len(self._source):
            source = self._source[self._fed : self._fed + 65536]
            self._fed += len(source)
        else:
            self._buffer += self._inflater.flush()
            self._eof = True
            return
        try:
            self._buffer += self._inflater.decompress(source, want)
        except zlib.error as exc:
            raise ImageDecodeError("corrupt DICOM (bad deflate stream)") from exc
        if self._inflater.eof:
            self._eof = True

    def _trim(self) -> None:
        """Drop buffered bytes more than the window behind the position."""
        drop = min(self._position - self._WINDOW, self._buffer_start + len(self._buffer)) - self._buffer_start
        if drop > 0:
            del self._buffer[:drop]
            self._buffer_start += drop


def _dicom_int(dataset: pydicom.Dataset, keyword: str) -> int:
    """An integer element, 0 when absent or malformed."""
    try:
        return int(dataset.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _dicom_dataset(data: bytes) -> tuple[pydicom.Dataset, str]:
    """Parse the pixel-related tags (pixel data still encoded) and the photometric interpretation, checked."""
    # Declared size, photometric and pixel data length are checked before the pixels are read.
    dataset = _read_dicom(data, _DICOM_PIXEL_TAGS, pixels=True)
    if "PixelData" not in dataset:
        raise ImageDecodeError("unsupported DICOM pixel data (float pixel data)", kind="unsupported")
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in _DICOM_GREY | _DICOM_COLOUR | {_DICOM_PALETTE}:
        raise ImageDecodeError(
            f"unsupported DICOM photometric interpretation {_safe_code(photometric)}", kind="unsupported"
        )
    return dataset, photometric


def _dicom_pixels(
    data: bytes, parsed: tuple[pydicom.Dataset, str] | None = None
) -> tuple[pydicom.Dataset, str, np.ndarray]:
    """Parse the pixel-related tags and decode frame 0; checks size and photometric first."""
    dataset, photometric = parsed or _dicom_dataset(data)
    pixels = _dicom_first_frame(dataset)
    expected_ndim = 2 if photometric in _DICOM_GREY or photometric == _DICOM_PALETTE else 3
    if pixels.ndim != expected_ndim or (expected_ndim == 3 and pixels.shape[2] != 3):
        raise ImageDecodeError(f"corrupt DICOM ({photometric} pixels of shape {pixels.shape})")
    return dataset, photometric, pixels


def _dicom_colour(pixels: np.ndarray, dataset: pydicom.Dataset, photometric: str) -> tuple[np.ndarray, float]:
    """RGB pixels (palette indices looked up) and the value that maps to 1.0."""
    if photometric == _DICOM_PALETTE:
        try:
            rgb = pydicom.pixels.apply_color_lut(pixels, dataset)
        except Exception as exc:
            raise ImageDecodeError(f"corrupt DICOM palette ({type(exc).__name__})") from exc
        # Entries are 8 or 16 bit, as the descriptor's third value says (pydicom returns uint16 for both).
        bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        return rgb, float(2 ** (8 if bits == 8 else 16) - 1)
    # Colour DICOMs are secondary captures (screenshots); their values are already display values.
    return pixels, float(2 ** int(dataset.get("BitsStored") or 8) - 1)


def _dicom_first_frame(dataset: pydicom.Dataset) -> np.ndarray:
    """Decode only frame 0, turning decoder failures into a reason that names the transfer syntax."""
    transfer_syntax = UID(dataset.file_meta.TransferSyntaxUID)
    try:
        decoder = pydicom.pixels.get_decoder(transfer_syntax)
    except NotImplementedError as exc:  # video and other syntaxes pydicom has no decoder class for
        raise ImageDecodeError(
            f"unsupported DICOM transfer syntax: {_safe_uid_name(transfer_syntax)}", kind="unsupported"
        ) from exc
    if not decoder.is_available:
        raise ImageDecodeError(
            f"unsupported DICOM transfer syntax: {_safe_uid_name(transfer_syntax)} (no decoder installed)",
            kind="unsupported",
        )
    preferred = _PREFERRED_PLUGINS.get(transfer_syntax)
    if preferred in decoder.available_plugins:
        try:
            return pydicom.pixels.pixel_array(dataset, index=0, decoding_plugin=preferred)
        except Exception:  # noqa: BLE001 - the other plugins may still manage a layout this one declines
            pass  # their error is the one reported
    try:
        # as_rgb (the default) converts the YBR family to RGB, leaving PALETTE COLOR as indices.
        return pydicom.pixels.pixel_array(dataset, index=0)
    except Exception as exc:
        if not transfer_syntax.is_compressed:
            raise ImageDecodeError("truncated or corrupt DICOM pixel data") from exc
        name = _safe_uid_name(transfer_syntax)
        if _all_plugins_decline(exc):
            # e.g. 12-bit JPEG Extended, which only the GPL libjpeg plugin decodes (not installed).
            raise ImageDecodeError(
                f"unsupported DICOM pixel data ({name}: no installed decoder handles it)", kind="unsupported"
            ) from exc
        raise ImageDecodeError(f"corrupt DICOM pixel data ({name})") from exc


def _all_plugins_decline(exc: Exception) -> bool:
    """Whether pydicom's combined error says every plugin declined the format rather than failed on the data."""
    # pydicom raises one RuntimeError listing each plugin's reason on its own line; a plugin that
    # cannot handle a precision or sample layout says "does not support". Only this text is
    # inspected; it never reaches a message.
    reasons = [line for line in str(exc).splitlines()[1:] if line.strip()]
    return bool(reasons) and all("does not support" in line for line in reasons)


def _dicom_grey_to_unit(pixels: np.ndarray, dataset: pydicom.Dataset, *, invert: bool) -> np.ndarray:
    """Apply modality LUT, VOI LUT/window, MONOCHROME1 inversion and min-max scaling."""
    values = _dicom_display_values(pixels, dataset)
    if invert:  # MONOCHROME1: the lowest value is displayed white
        values = -values
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ImageDecodeError("corrupt DICOM (non-finite pixel values)")
    if high <= low:  # a constant image carries no contrast; zeros rather than 0/0 = NaN
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _dicom_display_values(pixels: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    """Modality LUT (rescale) then VOI LUT (window), as float64."""
    values = pydicom.pixels.apply_modality_lut(pixels, dataset)
    try:
        values = pydicom.pixels.apply_voi_lut(values, dataset, index=0)
    except ValueError:
        # A malformed window (zero width, unknown function) should not cost the scan: the
        # min-max stretch still gives a usable image.
        pass
    return np.asarray(values, dtype=np.float64)


def _dicom_grey_to_uint16(pixels: np.ndarray, dataset: pydicom.Dataset, *, invert: bool) -> np.ndarray | None:
    """`_dicom_grey_to_unit` times 65535 as uint16, via a table over the stored values; None for >16-bit data.

    The table is built with the very same pydicom functions on np.arange(min, max + 1), so it holds
    exactly the old path's numbers. A table that is a clipped straight line (rescale + linear
    window, the usual case) is applied as one saturating affine pass; any other is indexed.
    """
    if pixels.dtype not in (np.uint8, np.uint16, np.int8, np.int16):
        return None
    low, high = _value_range(pixels)
    stored = np.arange(low, high + 1, dtype=pixels.dtype)
    values = _dicom_display_values(stored, dataset)
    if invert:
        values = -values
    if not np.all(np.isfinite(values)):
        raise ImageDecodeError("corrupt DICOM (non-finite pixel values)")
    steps = np.diff(values)
    if not (np.all(steps >= 0) or np.all(steps <= 0)):
        # Min-max must be over values present in the image, which only a monotone table
        # guarantees at its ends; a non-monotone LUT sequence is rare, so a histogram is affordable.
        present = np.bincount((pixels.astype(np.int32) - low).ravel(), minlength=values.size) > 0
        span = values[present]
    else:
        span = values[[0, -1]]
    v_low, v_high = float(span.min()), float(span.max())
    if v_high <= v_low:
        return np.zeros(pixels.shape, dtype=np.uint16)
    unit = (values - v_low) / (v_high - v_low)
    line = _clipped_line(unit, low)
    if line is not None:
        alpha, beta = line
        return cv2.addWeighted(pixels, alpha * 65535.0, pixels, 0.0, beta * 65535.0, dtype=cv2.CV_16U)
    table = np.rint(np.clip(unit, 0.0, 1.0) * 65535.0).astype(np.uint16)
    if pixels.dtype.kind == "u" and low >= 0:
        # Index by the stored value directly (no offset subtraction, so no full-size temporary).
        return np.concatenate([np.zeros(low, np.uint16), table])[pixels]
    # Signed data: a 2**bits table indexed by the unsigned view of the same bytes.
    bits = pixels.dtype.itemsize * 8
    full = np.zeros(2**bits, dtype=np.uint16)
    full[np.arange(low, high + 1) % 2**bits] = table
    return full[pixels.view(np.dtype(f"u{pixels.dtype.itemsize}"))]


def _value_range(pixels: np.ndarray) -> tuple[int, int]:
    """Minimum and maximum stored value (OpenCV's single SIMD pass where it takes the type)."""
    if pixels.dtype == np.int8:
        return int(pixels.min()), int(pixels.max())
    low, high = cv2.minMaxLoc(pixels)[:2]
    return int(low), int(high)


def _clipped_line(unit: np.ndarray, first: int) -> tuple[float, float] | None:
    """(alpha, beta) with unit[i] == clip(alpha * (first + i) + beta, 0, 1) for all i, else None."""
    inside = np.flatnonzero((unit > 0.0) & (unit < 1.0))
    if inside.size < 2:
        return None
    i0, i1 = int(inside[0]), int(inside[-1])
    alpha = (unit[i1] - unit[i0]) / (i1 - i0)
    beta = unit[i0] - alpha * (first + i0)
    x = np.arange(first, first + unit.size, dtype=np.float64)
    if np.max(np.abs(np.clip(alpha * x + beta, 0.0, 1.0) - unit)) > 1e-7:
        return None
    return float(alpha), float(beta)


# --- helpers ------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    """Refuse empty or absurd dimensions before any pixel buffer is allocated."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size: {width}x{height}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageDecodeError(f"image too large: {width}x{height} exceeds {MAX_IMAGE_SIDE}", kind="unsupported")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image too large: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels", kind="unsupported"
        )


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM stream without preamble: a little-endian group 0002 or 0008 tag, then a VR or a sane length."""
    if len(data) < 12 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if data[4:6] in _DICOM_VRS:  # explicit VR little endian
        return True
    length = int.from_bytes(data[4:8], "little")  # implicit VR: a 4-byte value length
    return length == 0xFFFFFFFF or length <= len(data) - 8


def _safe_code(value: str) -> str:
    """A DICOM code string for a message, or a placeholder when it is not a plain code."""
    if not value:
        return "(missing)"
    return value if len(value) <= 16 and all(c.isalnum() or c in " _" for c in value) else "(non-standard value)"


def _safe_uid_name(uid: UID) -> str:
    """The registered name of a transfer syntax, or a placeholder for an unregistered UID."""
    return uid.name if uid.is_valid and uid.name != str(uid) else "unregistered transfer syntax"


def _looks_like_text(head: bytes) -> bool:
    """Whether the bytes are plausibly UTF-8 text (HTML, XML, JSON, a path...)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at the end of the sample.
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return bool(text) and all(char.isprintable() or char in "\r\n\t" for char in text)


_DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "png": _decode_png,
    "jpeg": _decode_jpeg,
    "tiff": _decode_tiff,
    "dicom": _decode_dicom,
}

_REDUCED_DECODERS: dict[str, Callable[[bytes, int], tuple[np.ndarray, tuple[int, int]]]] = {
    "png": lambda data, max_side: _reduced_png_or_tiff(data, max_side, "png"),
    "tiff": lambda data, max_side: _reduced_png_or_tiff(data, max_side, "tiff"),
    "jpeg": _reduced_jpeg,
    "dicom": _reduced_dicom,
}

# --- manifest-driven preprocessing (version 2: intensity standardisation; 3: aspect kept) ------

# Intensity standardisation methods of preprocessing versions 2 and 3 (applied to the grey image).
INTENSITY_METHODS: tuple[str, ...] = ("none", "equalize", "clahe", "zscore", "percentile")
# How a non-square film becomes square: "stretch" (version 2) distorts the anatomy, which a model
# could learn (in cxr-dev every normal is 512x512 and most covid films are not); "centre_crop"
# (version 3) keeps the proportions by cutting the longer side. Measured in benchmarks/results/
# loso.md: centre_crop leaned more on the area outside the lungs, so the robust recipe stretches.
SQUARE_METHODS: tuple[str, ...] = ("stretch", "centre_crop")
# (x0, y0, x1, y1) as fractions of the model input: where both lung fields lie on a PA/AP film that
# fills the frame (and on shared.synthetic's films). The shortcut audit blanks it; preprocessing
# version 4 keeps only it, so a model never sees borders, burnt-in labels or collimation.
LUNG_BOX: tuple[float, float, float, float] = (0.15, 0.10, 0.85, 0.85)
# What version 4 puts outside the lung box: mid-grey, the same constant for every image.
LUNG_MASK_FILL = 0.5
PREPROCESSING_VERSIONS: tuple[int, ...] = (1, 2, 3, 4)


def robust_preprocessing(
    *,
    intensity: str = "clahe",
    working_size: int = 256,
    crop_fraction: float = 0.0,
    blur_sigma: float = 0.0,
    square: str = "stretch",
    lung_mask: bool = False,
    clahe_clip_limit: float = 2.0,
    clahe_tiles: int = 8,
) -> dict[str, Any]:
    """The manifest entry of a version-2 (stretch), version-3 (centre crop) or version-4 (lung mask) preprocessing.

    Steps, in this order: grey = mean of the decoded RGB; crop `crop_fraction` of the side from every
    edge (borders carry burnt-in labels, markers and collimation); make it square (`square`: stretch
    in the resize, or cut the longer side to the shorter about the centre); resize to working_size
    (area when shrinking, linear when enlarging); intensity standardisation; optional Gaussian blur
    (sigma in working-size pixels, to remove sharpness and resolution cues); resize to the model's
    input; (version 4) everything outside LUNG_BOX set to LUNG_MASK_FILL; grey replicated to RGB in [0, 1].
    """
    if intensity not in INTENSITY_METHODS:
        raise ValueError(f"unknown intensity method {intensity!r}; choose one of {INTENSITY_METHODS}")
    if working_size < 16:
        raise ValueError(f"working size must be at least 16, got {working_size}")
    if not 0.0 <= crop_fraction < 0.4:
        raise ValueError(f"crop fraction must be in [0, 0.4), got {crop_fraction}")
    if blur_sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {blur_sigma}")
    if square not in SQUARE_METHODS:
        raise ValueError(f"unknown square method {square!r}; choose one of {SQUARE_METHODS}")
    # Version 2 manifests stay exactly as they were: no "square" key, no extra step.
    centre_crop = square == "centre_crop"
    steps = [
        "grey (mean of RGB)",
        "crop",
        *(["centre crop to square"] if centre_crop else []),
        "resize to working_size",
        "intensity",
        "blur",
        "resize to input",
        *(["keep only the lung box"] if lung_mask else []),
        "grey to RGB",
    ]
    version = 4 if lung_mask else 3 if centre_crop else 2
    mask = {"lung_box": list(LUNG_BOX), "lung_mask_fill": LUNG_MASK_FILL} if lung_mask else {}
    return {
        **PREPROCESSING,
        "version": version,
        "steps": "; ".join(steps),
        **({"square": square} if centre_crop or lung_mask else {}),
        **mask,
        "grey": "mean of RGB",
        "crop_fraction": float(crop_fraction),
        "working_size": int(working_size),
        "intensity": intensity,
        "clahe_clip_limit": float(clahe_clip_limit),
        "clahe_tiles": int(clahe_tiles),
        "clahe": "1st..99th percentile stretch, then OpenCV CLAHE on uint8 (clip limit, tiles x tiles grid)",
        "zscore_range": "(x - mean) / std, then (z + 3) / 6 clipped to [0, 1]",
        "percentile_range": "1st..99th percentile stretched to [0, 1]",
        "blur_sigma": float(blur_sigma),
    }


def preprocess_for_manifest(image: np.ndarray, preprocessing: dict[str, Any] | None, size: int) -> np.ndarray:
    """Preprocess a decoded image the way a bundle's manifest["preprocessing"] says, to size x size x 3.

    Version 1 (or no entry, as in old bundles) is exactly `preprocess(image, size)`; versions 2 to 4
    are described in `robust_preprocessing`. Unknown versions raise ValueError rather than guess.
    """
    version = int((preprocessing or {}).get("version", 1))
    if version == 1:
        return preprocess(image, size)
    if version not in PREPROCESSING_VERSIONS:
        raise ValueError(f"unsupported preprocessing version {version} (this code knows {PREPROCESSING_VERSIONS})")
    spec = preprocessing or {}
    square = spec.get("square", "stretch") if version >= 3 else "stretch"
    if square not in SQUARE_METHODS:
        raise ValueError(f"unknown square method {square!r}; choose one of {SQUARE_METHODS}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[2] in (1, 3):
        grey = image.mean(axis=2) if image.shape[2] == 3 else image[:, :, 0]
    elif image.ndim == 2:
        grey = image
    else:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if 0 in grey.shape:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    grey = np.ascontiguousarray(np.clip(grey, 0.0, 1.0), dtype=np.float32)
    crop = float(spec.get("crop_fraction", 0.0))
    if crop > 0:
        height, width = grey.shape
        dy, dx = int(round(height * crop)), int(round(width * crop))
        if height - 2 * dy >= 4 and width - 2 * dx >= 4:
            grey = grey[dy : height - dy, dx : width - dx]
    if square == "centre_crop":
        grey = _centre_square(grey)
    working = _resize_square(grey, int(spec.get("working_size", 256)))
    working = _standardise_intensity(working, spec)
    sigma = float(spec.get("blur_sigma", 0.0))
    if sigma > 0:
        working = cv2.GaussianBlur(working, (0, 0), sigmaX=sigma)
    resized = np.clip(_resize_square(working, size), 0.0, 1.0)
    if version == 4:
        inside = lung_box_mask(size, spec.get("lung_box", LUNG_BOX))
        resized[~inside] = float(spec.get("lung_mask_fill", LUNG_MASK_FILL))
    return np.repeat(resized[:, :, None], 3, axis=2).astype(np.float32, copy=False)


def lung_box_mask(size: int, box: Sequence[float] = LUNG_BOX) -> np.ndarray:
    """Boolean size x size mask, True inside the box (fractions x0, y0, x1, y1 of the side)."""
    x0, y0, x1, y1 = (int(round(float(v) * size)) for v in box)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def preprocessing_key(preprocessing: dict[str, Any] | None, size: int) -> str:
    """A stable key for caching preprocessed inputs: bundles with equal keys take the same array."""
    import json

    version = int((preprocessing or {}).get("version", 1))
    if version == 1:
        return f"v1:{size}"
    return f"v{version}:{size}:{json.dumps(preprocessing, sort_keys=True)}"


def _centre_square(grey: np.ndarray) -> np.ndarray:
    height, width = grey.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return grey[top : top + side, left : left + side]


def _resize_square(grey: np.ndarray, size: int) -> np.ndarray:
    height, width = grey.shape[:2]
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(grey, (size, size), interpolation=interpolation).astype(np.float32, copy=False)


def _standardise_intensity(grey: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    method = spec.get("intensity", "none")
    if method == "none":
        return grey
    if method in ("equalize", "clahe"):
        # CLAHE's clip limit keeps it close to identity on a flat histogram, so a dark film would
        # stay dark: stretch the 1st..99th percentiles to the full range first.
        pixels = to_uint8(_percentile_stretch(grey) if method == "clahe" else grey)
        if method == "equalize":
            out = cv2.equalizeHist(pixels)
        else:
            tiles = int(spec.get("clahe_tiles", 8))
            clahe = cv2.createCLAHE(clipLimit=float(spec.get("clahe_clip_limit", 2.0)), tileGridSize=(tiles, tiles))
            out = clahe.apply(pixels)
        return out.astype(np.float32) / np.float32(255.0)
    if method == "zscore":
        std = float(grey.std())
        z = (grey - float(grey.mean())) / std if std > 1e-6 else np.zeros_like(grey)
        return np.clip((z + 3.0) / 6.0, 0.0, 1.0).astype(np.float32)
    if method == "percentile":
        return _percentile_stretch(grey)
    raise ValueError(f"unknown intensity method {method!r}; choose one of {INTENSITY_METHODS}")


def _percentile_stretch(grey: np.ndarray) -> np.ndarray:
    low, high = np.percentile(grey, [1.0, 99.0])
    if high - low < 1e-6:
        return np.zeros_like(grey)
    return np.clip((grey - low) / (high - low), 0.0, 1.0).astype(np.float32)
