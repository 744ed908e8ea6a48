"""Decoding: image bytes to float32 pixels in [0, 1], with one decoder per format.

Each decoder takes an optional `max_side`: given one, it shrinks the image so its longer side is at
most max_side while the pixels are still integers (libjpeg's DCT scaling, a JPEG 2000 resolution
level, an integer box average), which is the worker's cheap path (`decode_reduced`, see
docs/decoding.md); without one it decodes at full size with no reduction (`decode_image`). Both
start from an `ImageProbe`: given one (the consumer probes in its parent process), the header is
not read again. Anything that cannot be decoded raises `ImageDecodeError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from shared.imaging.dicom import (
    COLOUR_PHOTOMETRICS,
    GREY_PHOTOMETRICS,
    PALETTE_PHOTOMETRIC,
    DicomFacts,
    int_element,
    read_pixel_data,
    safe_code,
    safe_uid_name,
)
from shared.imaging.formats import ImageProbe, probe
from shared.imaging.limits import ImageDecodeError
from shared.imaging.preprocess import fit_within

# The fastest installed plugin per syntax, measured by benchmarks/cpu_cost.py (docs/decoding.md);
# pydicom's own order is kept for the rest. GDCM for JPEG Lossless rather than the GPL-3.0 libjpeg.
PREFERRED_PLUGINS: dict[str, str] = {
    pydicom.uid.JPEGLosslessSV1: "gdcm",
    pydicom.uid.JPEGLossless: "gdcm",
    pydicom.uid.JPEGLSLossless: "pyjpegls",
    pydicom.uid.JPEGLSNearLossless: "pyjpegls",
    pydicom.uid.RLELossless: "pylibjpeg",
}
_JPEG2000_SYNTAXES = frozenset({pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000})
_JPEG_REDUCED_FLAGS = {
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
}


@dataclass(frozen=True)
class ReducedImage:
    """A decoded image already shrunk for everything downstream, and the size it was decoded at."""

    image: np.ndarray  # float32 in [0, 1]: HxW for grey sources, HxWx3 RGB for colour ones
    original_size: tuple[int, int]  # (height, width) of the full-size first frame
    format: str  # "png", "jpeg", "tiff" or "dicom"


def decode_image(data: bytes, *, probed: ImageProbe | None = None) -> np.ndarray:
    """Decode PNG, JPEG, TIFF or DICOM bytes at full size to a float32 HxWx3 RGB array in [0, 1]."""
    image = _decode(data, None, probed).image
    return image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)


def decode_reduced(data: bytes, max_side: int, *, probed: ImageProbe | None = None) -> ReducedImage:
    """Decode and shrink so the longer side is at most max_side, reducing while pixels are integers.

    The result matches `fit_within(decode_image(data), max_side)`: the same size, values within
    ~0.002 on average (the shrinking filter differs slightly; model inputs made from it are within
    ~0.015 of the old ones, see docs/decoding.md), for a fraction of the CPU time and memory. Grey
    sources stay single-channel: `preprocess`, `to_uint8` and the overlay functions accept HxW.
    Multi-frame DICOM: the first frame. `probed`: `probe(data)`, when the caller has it already.
    """
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    return _decode(data, max_side, probed)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a file and decode it with `decode_image` (OSError propagates unchanged)."""
    return decode_image(Path(path).read_bytes())


def _decode(data: bytes, max_side: int | None, probed: ImageProbe | None) -> ReducedImage:
    """The one decoder path: probe (unless given), check the limits, decode with the format's decoder."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    probed = probed or probe(data)
    try:
        probed.check()
        image, original_size = _DECODERS[probed.format](data, probed, max_side)
    except ImageDecodeError:
        raise
    except Exception as exc:
        # Callers catch exactly one error type. Only the exception's type goes into the message:
        # third-party messages may quote header values we do not control.
        raise ImageDecodeError(f"truncated or corrupt {probed.format} ({type(exc).__name__})") from exc
    return ReducedImage(image=image, original_size=original_size, format=probed.format)


# --- shrinking integer pixels ---------------------------------------------------------------------


def _reduce_integer(
    pixels: np.ndarray, max_side: int | None, full_scale: float, original: tuple[int, int] | None = None
) -> np.ndarray:
    """Shrink integer pixels (HxW or HxWxC) to fit max_side (None: no reduction), then scale to float32 [0, 1].

    The bulk of the shrinking is an integer-factor box average, OpenCV's fast INTER_AREA path
    (~10x cheaper than a fractional factor at full size); the fractional remainder runs on the
    small image, in float32. The output size is exactly `fit_within`'s for the `original`
    (height, width), which differs from pixels.shape after a JPEG reduced decode.
    """
    height, width = original or pixels.shape[:2]
    scale = 1.0 if max_side is None else max_side / max(height, width)
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
    unit: np.ndarray = pixels.astype(np.float32) / np.float32(full_scale)
    return unit


def _fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """`fit_within`, or the image unchanged when there is no reduction."""
    return image if max_side is None else fit_within(image, max_side)


def _widen_uint8(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """uint8 -> uint16 times 257 (v/255 == 257v/65535) when it will be shrunk, so the box average keeps sub-level precision."""
    if pixels.dtype != np.uint8 or max_side is None or max(pixels.shape[:2]) <= max_side:
        return pixels
    widened: np.ndarray = np.multiply(pixels, np.uint16(257), dtype=np.uint16)
    return widened


# --- PNG, JPEG and TIFF -------------------------------------------------------------------------


def _decode_raster(data: bytes, probed: ImageProbe, max_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG, TIFF and JPEG through OpenCV; JPEG via libjpeg's DCT scaling (1/2, 1/4, 1/8) when at least twice max_side."""
    fmt, flags, original = probed.format, cv2.IMREAD_UNCHANGED, None
    if probed.jpeg is not None:
        # Older libjpeg builds return a half-grey image with only a warning for a truncated file;
        # a missing end-of-image marker after the first scan is the cheap, reliable tell.
        if data.find(b"\xff\xd9", probed.jpeg.scan_start) == -1:
            raise ImageDecodeError("truncated or corrupt jpeg (no end-of-image marker)")
        original = (probed.height, probed.width)
        longest = max(probed.width, probed.height)
        factor = 1 if max_side is None else next((f for f in (8, 4, 2) if longest // f >= max_side), 1)
        if factor > 1:
            flags = _JPEG_REDUCED_FLAGS[(factor, probed.jpeg.components == 1)]
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if pixels is None or pixels.size == 0:
        raise ImageDecodeError(f"truncated or corrupt {fmt}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(f"unsupported {fmt} pixel type {pixels.dtype}", kind="unsupported")
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):  # grey, grey + alpha
        pixels = pixels[:, :, 0]
    elif pixels.ndim == 3 and pixels.shape[2] == 4:  # BGRA: drop alpha
        pixels = pixels[:, :, :3]
    elif not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ImageDecodeError(f"unsupported {fmt} channel layout {pixels.shape}", kind="unsupported")
    size = original or pixels.shape[:2]
    pixels = _widen_uint8(pixels, max_side)
    unit = _reduce_integer(pixels, max_side, 255.0 if pixels.dtype == np.uint8 else 65535.0, original)
    return (unit[:, :, ::-1].copy() if unit.ndim == 3 else unit), size  # OpenCV order is BGR


# --- DICOM --------------------------------------------------------------------------------------


def _decode_dicom(data: bytes, probed: ImageProbe, max_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """First frame; grey values go through one lookup (or saturating affine) pass, then shrink.

    Grey JPEG 2000 at least twice max_side is decoded at a reduced resolution level (`_jpeg2000_reduced`).
    Without max_side, grey values are computed exactly in float (no uint16 table).
    """
    assert probed.dicom is not None, "a DICOM probe carries its header"
    dataset, photometric = _dicom_dataset(data, probed.dicom)
    invert = photometric == "MONOCHROME1"
    if max_side is not None:
        reduced = _jpeg2000_reduced(dataset, photometric, max_side)
        if reduced is not None:
            pixels, original = reduced
            mapped = _dicom_grey_to_uint16(pixels, dataset, invert=invert)
            if mapped is not None:
                return _reduce_integer(mapped, max_side, 65535.0, original), original
    pixels = _dicom_first_frame(dataset)
    expected_ndim = 2 if photometric in GREY_PHOTOMETRICS or photometric == PALETTE_PHOTOMETRIC else 3
    if pixels.ndim != expected_ndim or (expected_ndim == 3 and pixels.shape[2] != 3):
        raise ImageDecodeError(f"corrupt DICOM ({photometric} pixels of shape {pixels.shape})")
    original = pixels.shape[:2]
    if photometric in GREY_PHOTOMETRICS:
        mapped = None if max_side is None else _dicom_grey_to_uint16(pixels, dataset, invert=invert)
        if mapped is None:  # full size, or 32-bit or float data: the exact float path
            return _fit(_dicom_grey_to_unit(pixels, dataset, invert=invert), max_side), original
        return _reduce_integer(mapped, max_side, 65535.0), original
    rgb, full_scale = _dicom_colour(pixels, dataset, photometric)
    if rgb.dtype == np.uint8 and max_side is not None and max(rgb.shape[:2]) > max_side:
        rgb, full_scale = _widen_uint8(rgb, max_side), full_scale * 257.0
    if rgb.dtype in (np.uint8, np.uint16):
        return np.clip(_reduce_integer(rgb, max_side, full_scale), 0.0, 1.0), original
    unit = np.clip(rgb.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)
    return _fit(unit, max_side), original


def _dicom_dataset(data: bytes, facts: DicomFacts) -> tuple[pydicom.Dataset, str]:
    """The header's elements with the pixel data (still encoded) and the photometric interpretation, checked."""
    element = facts.pixel_element
    if element is not None and element.tag != 0x7FE00010:
        raise ImageDecodeError("unsupported DICOM pixel data (float pixel data)", kind="unsupported")
    # Declared size, photometric and pixel data length are checked before the pixels are read.
    dataset = read_pixel_data(data, facts)
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in GREY_PHOTOMETRICS | COLOUR_PHOTOMETRICS | {PALETTE_PHOTOMETRIC}:
        raise ImageDecodeError(
            f"unsupported DICOM photometric interpretation {safe_code(photometric)}", kind="unsupported"
        )
    return dataset, photometric


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
    if UID(dataset.file_meta.TransferSyntaxUID) not in _JPEG2000_SYNTAXES or photometric not in GREY_PHOTOMETRICS:
        return None
    rows, columns = int_element(dataset, "Rows"), int_element(dataset, "Columns")
    if int(dataset.get("SamplesPerPixel") or 1) != 1 or max(rows, columns) // 2 < max_side:
        return None
    try:
        from openjpeg.utils import get_parameters
        from PIL import Image

        frame = next(
            pydicom.encaps.generate_frames(
                dataset.PixelData, number_of_frames=max(int_element(dataset, "NumberOfFrames"), 1)
            )
        )
        facts = get_parameters(frame, 0 if frame[:2] == b"\xff\x4f" else None)
        precision, signed = int(facts["precision"]), bool(facts["is_signed"])
        levels = _jpeg2000_levels(frame)
    except Exception:  # noqa: BLE001 - anything unusual takes the full decode, which reports its own errors
        return None
    if (int(facts["rows"]), int(facts["columns"])) != (rows, columns) or int(facts["samples_per_pixel"]) != 1:
        return None
    if precision > 16 or signed != bool(int_element(dataset, "PixelRepresentation")):
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


def _dicom_colour(pixels: np.ndarray, dataset: pydicom.Dataset, photometric: str) -> tuple[np.ndarray, float]:
    """RGB pixels (palette indices looked up) and the value that maps to 1.0."""
    if photometric == PALETTE_PHOTOMETRIC:
        try:
            rgb = apply_color_lut(pixels, dataset)
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
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as exc:  # video and other syntaxes pydicom has no decoder class for
        raise ImageDecodeError(
            f"unsupported DICOM transfer syntax: {safe_uid_name(transfer_syntax)}", kind="unsupported"
        ) from exc
    if not decoder.is_available:
        raise ImageDecodeError(
            f"unsupported DICOM transfer syntax: {safe_uid_name(transfer_syntax)} (no decoder installed)",
            kind="unsupported",
        )
    preferred = PREFERRED_PLUGINS.get(transfer_syntax)
    if preferred in decoder.available_plugins:
        try:
            return pixel_array(dataset, index=0, decoding_plugin=preferred)
        except Exception:  # noqa: BLE001 - the other plugins may still manage a layout this one declines
            pass  # their error is the one reported
    try:
        # as_rgb (the default) converts the YBR family to RGB, leaving PALETTE COLOR as indices.
        return pixel_array(dataset, index=0)
    except Exception as exc:
        if not transfer_syntax.is_compressed:
            raise ImageDecodeError("truncated or corrupt DICOM pixel data") from exc
        name = safe_uid_name(transfer_syntax)
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
    values = apply_modality_lut(pixels, dataset)
    try:
        values = apply_voi_lut(values, dataset, index=0)
    except ValueError:
        # A malformed window (zero width, unknown function) should not cost the scan: the
        # min-max stretch still gives a usable image.
        pass
    return np.asarray(values, dtype=np.float64)


def _dicom_grey_to_uint16(pixels: np.ndarray, dataset: pydicom.Dataset, *, invert: bool) -> np.ndarray | None:
    """`_dicom_grey_to_unit` times 65535 as uint16, via a table over the stored values; None for >16-bit data.

    The table is built with the very same pydicom functions on np.arange(min, max + 1), so it holds
    exactly the full-size path's numbers. A table that is a clipped straight line (rescale + linear
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
        looked_up: np.ndarray = np.concatenate([np.zeros(low, np.uint16), table])[pixels]
        return looked_up
    # Signed data: a 2**bits table indexed by the unsigned view of the same bytes.
    bits = pixels.dtype.itemsize * 8
    full = np.zeros(2**bits, dtype=np.uint16)
    full[np.arange(low, high + 1) % 2**bits] = table
    signed_looked_up: np.ndarray = full[pixels.view(np.dtype(f"u{pixels.dtype.itemsize}"))]
    return signed_looked_up


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


# One decoder per format; each takes the probe and max_side (None: full size).
_DECODERS: dict[str, Callable[[bytes, ImageProbe, int | None], tuple[np.ndarray, tuple[int, int]]]] = {
    "png": _decode_raster,
    "jpeg": _decode_raster,
    "tiff": _decode_raster,
    "dicom": _decode_dicom,
}
