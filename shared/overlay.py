"""Overlay rendering: a JET-coloured Grad-CAM map blended on the X-ray, encoded as PNG."""

from __future__ import annotations

import cv2
import numpy as np

from shared.imaging import fit_within

DEFAULT_MAX_SIDE = 1024


def render_overlay(
    image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4, max_side: int = DEFAULT_MAX_SIDE
) -> np.ndarray:
    """Blend a [0,1] map over an image (float [0,1] or uint8, grey or RGB); returns RGB uint8."""
    # Overlays are for reading, not diagnosis: cap the size so encoding and upload stay cheap.
    display = fit_within(_to_rgb_uint8(image), max_side)
    heat = cv2.resize(np.clip(cam, 0.0, 1.0).astype(np.float32), (display.shape[1], display.shape[0]))
    heat_rgb = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(display, 1.0 - alpha, heat_rgb, alpha, 0.0)


def encode_png(rgb: np.ndarray, compression: int = 1) -> bytes:
    """Encode an RGB uint8 image as PNG (low compression: overlays are written once per scan)."""
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def overlay_png(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4, max_side: int = DEFAULT_MAX_SIDE) -> bytes:
    """Render an overlay and encode it as PNG bytes."""
    return encode_png(render_overlay(image, cam, alpha=alpha, max_side=max_side))


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        image = np.uint8(np.clip(image, 0.0, 1.0) * 255.0 + 0.5)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image[..., :3]
