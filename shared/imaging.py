"""Decoding and preprocessing of chest X-rays, shared verbatim by the trainer and the workers.

Every input (PNG, JPEG, DICOM) becomes a float32 HxWx3 RGB array in [0, 1]; `preprocess` then
resizes it to the model's input. Anything that cannot be decoded raises `ImageDecodeError`, whose
message is short, safe to store in the `scans.error` column, and never contains patient data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.pixels
from pydicom.uid import UID


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; str(err) is a short, human-readable reason (no patient data)."""


# Checked against the header before any pixel buffer is allocated, so a 1 KB file claiming
# 30000x30000 pixels costs nothing. Large enough for any detector (the biggest are ~4300x4300).
MAX_IMAGE_SIDE: int = 16384
MAX_IMAGE_PIXELS: int = 120_000_000

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
]
_DICOM_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
# pydicom converts the YBR family to RGB while decoding (pixel_array's default as_rgb=True).
_DICOM_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})


def sniff_format(data: bytes) -> str:
    """Return "png", "jpeg" or "dicom" from the leading bytes, or raise ImageDecodeError."""
    if len(data) == 0:
        raise ImageDecodeError("empty input")
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:3] == _JPEG_SIGNATURE:
        return "jpeg"
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    # An HTML/XML error page from a store is the usual culprit; say so without echoing content.
    if _looks_like_text(data[:512]):
        raise ImageDecodeError("not an image (unrecognised header, looks like text)")
    raise ImageDecodeError("not an image (unrecognised header)")


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes to a float32 HxWx3 RGB array in [0, 1]."""
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
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    height, width = image.shape[:2]
    # INTER_AREA averages the source pixels when shrinking (no aliasing of fine rib and noise
    # texture); when enlarging it degenerates to nearest-neighbour, so linear is used instead.
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (size, size), interpolation=interpolation)
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


# --- PNG and JPEG -------------------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG after checking the size in its IHDR chunk."""
    width, height = _png_size(data)
    _check_size(width, height)
    return _decode_with_opencv(data, "png")


def _decode_jpeg(data: bytes) -> np.ndarray:
    """Decode a JPEG after checking its SOF size and that the scan data is complete."""
    width, height, scan_start = _jpeg_header(data)
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


def _jpeg_header(data: bytes) -> tuple[int, int, int]:
    """Width, height and the offset of the first start-of-scan marker, by walking the markers."""
    pos = 2
    size: tuple[int, int] | None = None
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
        if marker in _JPEG_SOF_MARKERS and pos + 9 <= len(data):
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            size = (width, height)
        if marker == _JPEG_SOS:
            if size is None:
                break
            return size[0], size[1], pos
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
        raise ImageDecodeError(f"unsupported {fmt} pixel type {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    elif pixels.ndim == 3 and pixels.shape[2] == 2:  # grey + alpha
        rgb = np.repeat(pixels[:, :, :1], 3, axis=2)
    elif pixels.ndim == 3 and pixels.shape[2] in (3, 4):  # OpenCV order is BGR(A)
        rgb = pixels[:, :, 2::-1]
    else:
        raise ImageDecodeError(f"unsupported {fmt} channel layout {pixels.shape}")
    return np.ascontiguousarray(rgb, dtype=np.float32) / np.float32(scale)


# --- DICOM --------------------------------------------------------------------------------------


def _decode_dicom(data: bytes) -> np.ndarray:
    """Decode the first frame of a DICOM file to display values, then to RGB float32."""
    dataset = pydicom.dcmread(BytesIO(data), specific_tags=_DICOM_PIXEL_TAGS)
    if "PixelData" not in dataset:
        raise ImageDecodeError("DICOM has no pixel data")
    _check_size(int(dataset.get("Columns") or 0), int(dataset.get("Rows") or 0))
    photometric = str(dataset.get("PhotometricInterpretation") or "").strip().upper()
    if photometric not in _DICOM_GREY | _DICOM_COLOUR:
        raise ImageDecodeError(f"unsupported DICOM photometric interpretation {photometric or '(missing)'}")

    pixels = _dicom_first_frame(dataset)
    if photometric in _DICOM_GREY:
        if pixels.ndim != 2:
            raise ImageDecodeError(f"corrupt DICOM ({photometric} pixels of shape {pixels.shape})")
        grey = _dicom_grey_to_unit(pixels, dataset, invert=photometric == "MONOCHROME1")
        return np.repeat(grey[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"corrupt DICOM ({photometric} pixels of shape {pixels.shape})")
    # Colour DICOMs are secondary captures (screenshots); their values are already display values.
    max_value = float(2 ** int(dataset.get("BitsStored") or 8) - 1)
    return np.clip(pixels.astype(np.float32) / np.float32(max_value), 0.0, 1.0)


def _dicom_first_frame(dataset: pydicom.Dataset) -> np.ndarray:
    """Decode only frame 0, turning decoder failures into a reason that names the transfer syntax."""
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        return pydicom.pixels.pixel_array(dataset, index=0)
    except Exception as exc:
        if transfer_syntax is None or not UID(transfer_syntax).is_compressed:
            raise ImageDecodeError("truncated or corrupt DICOM pixel data") from exc
        name = UID(transfer_syntax).name
        if not _dicom_decoder_available(UID(transfer_syntax)):
            raise ImageDecodeError(f"unsupported DICOM transfer syntax: {name} (no decoder installed)") from exc
        raise ImageDecodeError(f"corrupt DICOM pixel data ({name})") from exc


def _dicom_decoder_available(transfer_syntax: UID) -> bool:
    """Whether any installed pydicom plugin can decode this transfer syntax."""
    try:
        return bool(pydicom.pixels.get_decoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def _dicom_grey_to_unit(pixels: np.ndarray, dataset: pydicom.Dataset, *, invert: bool) -> np.ndarray:
    """Apply modality LUT, VOI LUT/window, MONOCHROME1 inversion and min-max scaling."""
    values = pydicom.pixels.apply_modality_lut(pixels, dataset)
    try:
        values = pydicom.pixels.apply_voi_lut(values, dataset, index=0)
    except ValueError:
        # A malformed window (zero width, unknown function) should not cost the scan: the
        # min-max stretch below still gives a usable image.
        pass
    values = np.asarray(values, dtype=np.float64)
    if invert:  # MONOCHROME1: the lowest value is displayed white
        values = -values
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ImageDecodeError("corrupt DICOM (non-finite pixel values)")
    if high <= low:  # a constant image carries no contrast; zeros rather than 0/0 = NaN
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


# --- helpers ------------------------------------------------------------------------------------


def _check_size(width: int, height: int) -> None:
    """Refuse empty or absurd dimensions before any pixel buffer is allocated."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size: {width}x{height}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageDecodeError(f"image too large: {width}x{height} exceeds {MAX_IMAGE_SIDE}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"image too large: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")


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
    "dicom": _decode_dicom,
}


# --- manifest-driven preprocessing (version 2: intensity standardisation) ------------------------

# Intensity standardisation methods of preprocessing version 2 (applied to the grey image).
INTENSITY_METHODS: tuple[str, ...] = ("none", "equalize", "clahe", "zscore", "percentile")


def robust_preprocessing(
    *,
    intensity: str = "clahe",
    working_size: int = 256,
    crop_fraction: float = 0.0,
    blur_sigma: float = 0.0,
    clahe_clip_limit: float = 2.0,
    clahe_tiles: int = 8,
) -> dict[str, Any]:
    """The manifest entry of a version-2 preprocessing (grey, square working size, intensity standardised).

    Steps, in this order: grey = mean of the decoded RGB; crop `crop_fraction` of the side from every
    edge (borders carry burnt-in labels, markers and collimation); resize to working_size (area when
    shrinking, linear when enlarging); intensity standardisation; optional Gaussian blur (sigma in
    working-size pixels, to remove sharpness and resolution cues); resize to the model's input;
    grey replicated to RGB in [0, 1].
    """
    if intensity not in INTENSITY_METHODS:
        raise ValueError(f"unknown intensity method {intensity!r}; choose one of {INTENSITY_METHODS}")
    if working_size < 16:
        raise ValueError(f"working size must be at least 16, got {working_size}")
    if not 0.0 <= crop_fraction < 0.4:
        raise ValueError(f"crop fraction must be in [0, 0.4), got {crop_fraction}")
    if blur_sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {blur_sigma}")
    return {
        **PREPROCESSING,
        "version": 2,
        "steps": "grey (mean of RGB); crop; resize to working_size; intensity; blur; resize to input; grey to RGB",
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

    Version 1 (or no entry, as in old bundles) is exactly `preprocess(image, size)`; version 2 is
    described in `robust_preprocessing`. Unknown versions raise ValueError rather than guess.
    """
    version = int((preprocessing or {}).get("version", 1))
    if version == 1:
        return preprocess(image, size)
    if version != 2:
        raise ValueError(f"unsupported preprocessing version {version} (this code knows 1 and 2)")
    spec = preprocessing or {}
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
    working = _resize_square(grey, int(spec.get("working_size", 256)))
    working = _standardise_intensity(working, spec)
    sigma = float(spec.get("blur_sigma", 0.0))
    if sigma > 0:
        working = cv2.GaussianBlur(working, (0, 0), sigmaX=sigma)
    resized = _resize_square(working, size)
    return np.repeat(np.clip(resized, 0.0, 1.0)[:, :, None], 3, axis=2).astype(np.float32, copy=False)


def preprocessing_key(preprocessing: dict[str, Any] | None, size: int) -> str:
    """A stable key for caching preprocessed inputs: bundles with equal keys take the same array."""
    import json

    version = int((preprocessing or {}).get("version", 1))
    if version == 1:
        return f"v1:{size}"
    return f"v{version}:{size}:{json.dumps(preprocessing, sort_keys=True)}"


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
