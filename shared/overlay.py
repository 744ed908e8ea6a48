"""Overlay rendering: a JET-coloured Grad-CAM map blended on the X-ray, encoded as PNG, JPEG or WebP."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from shared.imaging.preprocess import DISPLAY_MAX_SIDE, fit_within


class OverlayFormat(NamedTuple):
    """How an overlay format is encoded and stored."""

    opencv_extension: str  # what cv2.imencode is told, e.g. ".jpg"
    content_type: str  # e.g. "image/jpeg"
    file_extension: str  # of the stored object, e.g. ".jpg"


class EncodedOverlay(NamedTuple):
    """An encoded overlay: its bytes, content type and file extension (such as ".png")."""

    body: bytes
    content_type: str
    extension: str


# PNG is lossless and the default; JPEG and WebP are lossy but several times smaller (see
# docs/decoding.md for measured sizes and costs).
OVERLAY_FORMATS: dict[str, OverlayFormat] = {
    "png": OverlayFormat(".png", "image/png", ".png"),
    "jpeg": OverlayFormat(".jpg", "image/jpeg", ".jpg"),
    "webp": OverlayFormat(".webp", "image/webp", ".webp"),
}
# Overlays are looked at, not measured: quality high enough that the heat map's edges stay clean.
JPEG_QUALITY = 90
WEBP_QUALITY = 80
PNG_COMPRESSION = 1  # zlib level: overlays are written once per scan, speed beats a few KB


def render_overlay(
    image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4, max_side: int = DISPLAY_MAX_SIDE
) -> np.ndarray:
    """Blend a [0,1] map over an image (float [0,1] or uint8, grey or RGB); returns RGB uint8."""
    return _blend(image, cam, alpha=alpha, max_side=max_side, bgr=False)


def _blend(image: np.ndarray, cam: np.ndarray, *, alpha: float, max_side: int, bgr: bool) -> np.ndarray:
    """`render_overlay` in RGB or, for OpenCV's encoders, directly in BGR (saves two conversions)."""
    # Overlays are for reading, not diagnosis: cap the size so encoding and upload stay cheap.
    display = fit_within(_to_rgb_uint8(image), max_side)  # grey stays grey-valued, so also valid BGR
    if bgr and image.ndim == 3 and image.shape[2] >= 3:
        display = cv2.cvtColor(display, cv2.COLOR_RGB2BGR)
    heat = cv2.resize(np.clip(cam, 0.0, 1.0).astype(np.float32), (display.shape[1], display.shape[0]))
    heat_bgr = cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)
    return cv2.addWeighted(
        display, 1.0 - alpha, heat_bgr if bgr else cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB), alpha, 0.0
    )


def encode_png(rgb: np.ndarray, compression: int = PNG_COMPRESSION) -> bytes:
    """Encode an RGB uint8 image as PNG (low compression: overlays are written once per scan)."""
    return encode_rgb(rgb, "png", png_compression=compression)


def encode_rgb(
    rgb: np.ndarray,
    fmt: str = "png",
    *,
    png_compression: int = PNG_COMPRESSION,
    jpeg_quality: int = JPEG_QUALITY,
    webp_quality: int = WEBP_QUALITY,
) -> bytes:
    """Encode an RGB uint8 image as "png", "jpeg" or "webp" bytes."""
    if fmt not in OVERLAY_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(OVERLAY_FORMATS)}, got {fmt!r}")
    return _encode_bgr(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), fmt, png_compression, jpeg_quality, webp_quality)


def _encode_bgr(
    bgr: np.ndarray,
    fmt: str,
    png_compression: int = PNG_COMPRESSION,
    jpeg_quality: int = JPEG_QUALITY,
    webp_quality: int = WEBP_QUALITY,
) -> bytes:
    """Encode a BGR uint8 image with OpenCV."""
    params = {
        # Huffman-only deflate with the SUB filter: about half the time of the default strategy
        # with adaptive filters at level 1, for ~25% larger files (measured in docs/decoding.md).
        "png": [
            cv2.IMWRITE_PNG_COMPRESSION,
            png_compression,
            cv2.IMWRITE_PNG_STRATEGY,
            cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
            cv2.IMWRITE_PNG_FILTER,
            cv2.IMWRITE_PNG_FILTER_SUB,
        ],
        "jpeg": [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality],
        "webp": [cv2.IMWRITE_WEBP_QUALITY, webp_quality],
    }[fmt]
    ok, buffer = cv2.imencode(OVERLAY_FORMATS[fmt].opencv_extension, bgr, params)
    if not ok:
        raise RuntimeError(f"{fmt.upper()} encoding failed")
    return buffer.tobytes()


def encode_overlay(
    image: np.ndarray,
    cam: np.ndarray,
    fmt: str = "png",
    *,
    alpha: float = 0.4,
    max_side: int = DISPLAY_MAX_SIDE,
) -> EncodedOverlay:
    """Render an overlay and encode it (its bytes, content type and file extension such as ".png")."""
    if fmt not in OVERLAY_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(OVERLAY_FORMATS)}, got {fmt!r}")
    spec = OVERLAY_FORMATS[fmt]
    bgr = _blend(image, cam, alpha=alpha, max_side=max_side, bgr=True)
    return EncodedOverlay(_encode_bgr(bgr, fmt), spec.content_type, spec.file_extension)


def overlay_png(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4, max_side: int = DISPLAY_MAX_SIDE) -> bytes:
    """Render an overlay and encode it as PNG bytes."""
    return encode_png(render_overlay(image, cam, alpha=alpha, max_side=max_side))


# Grad-CAM maps worth a comment (`cam_note`): cheap checks on the map and the model's input image,
# computed where the overlay is made and stored with the prediction. They flag, they do not judge.
FLAT_FRACTION = 0.8  # flat: this share of the map's cells at >= FLAT_LEVEL of its peak (or no peak at all)
FLAT_LEVEL = 0.6
BORDER_MIN_CELLS = 5  # coarser maps are all border; the border check needs at least 5x5 cells
DARK_LEVEL = 0.06  # outside the body: the peak cell's mean brightness (input in [0,1]) below this
BRIGHT_LEVEL = 0.97  # a marker or burned-in text: saturated pixels ...
BRIGHT_SHARE = 0.02  # ... covering at least this share of the peak cell ...
BRIGHT_MEDIAN = 0.75  # ... which is otherwise not bright (bone or a white-out is not a marker)


def cam_note(cam: np.ndarray, image: np.ndarray | None = None) -> str | None:
    """A short comment when a Grad-CAM map is flat or peaks at the border, outside the body or on a marker; else None.

    `cam` is the map in [0,1] (h x w cells) and `image` the model's input it was computed on (H x W or
    H x W x C, float in [0,1] or uint8), which covers the same field of view.
    """
    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    if peak <= 0.0 or float(np.mean(cam >= FLAT_LEVEL * peak)) >= FLAT_FRACTION:
        return "flat map: no region stands out"
    rows, cols = cam.shape
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    notes = []
    if min(rows, cols) >= BORDER_MIN_CELLS and (row in (0, rows - 1) or col in (0, cols - 1)):
        notes.append("peak at the image border")
    if image is not None:
        grey = np.asarray(image)
        grey = grey.mean(axis=2) if grey.ndim == 3 else grey.astype(np.float32)
        if np.asarray(image).dtype == np.uint8:
            grey = grey / 255.0
        height, width = grey.shape
        cell = grey[row * height // rows : (row + 1) * height // rows, col * width // cols : (col + 1) * width // cols]
        if cell.size:
            if float(cell.mean()) < DARK_LEVEL:
                notes.append("peak outside the body")
            elif float(np.mean(cell >= BRIGHT_LEVEL)) >= BRIGHT_SHARE and float(np.median(cell)) < BRIGHT_MEDIAN:
                notes.append("peak on a bright marker or text")
    return "; ".join(notes) or None


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = np.uint8(np.clip(image, 0.0, 1.0) * 255.0 + 0.5)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image[..., :3]
