"""Model inputs from image bytes: the one path the trainer and the workers share, so a model sees the same numbers in both.

A scan is decoded once, reduced to `decode_side` (the display image or the largest model input,
whichever is bigger), and each model input is derived from that reduced image as its bundle's
manifest says. The trainer calls `model_input` for one bundle; the worker `model_inputs` for all
the bundles it serves (worker.consumer.decoding).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from shared.imaging.decode import decode_reduced
from shared.imaging.formats import ImageProbe
from shared.imaging.preprocess import DISPLAY_MAX_SIDE, preprocess_for_manifest

# (key, the bundle's manifest["preprocessing"], input size): bundles with equal keys share one input.
InputSpec = tuple[str, dict[str, Any] | None, int]


def decode_side(input_sizes: Iterable[int]) -> int:
    """The side a scan is decoded at: the display image's or the largest model input's, whichever is bigger."""
    return max([DISPLAY_MAX_SIDE, *input_sizes])


def model_inputs(
    data: bytes, side: int, specs: Iterable[InputSpec], *, probed: ImageProbe | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Decode once at `side`, then derive each model input; returns them by key, and the reduced float image."""
    reduced = decode_reduced(data, side, probed=probed).image
    return {key: preprocess_for_manifest(reduced, spec, size) for key, spec, size in specs}, reduced


def model_input(data: bytes, preprocessing: dict[str, Any] | None, size: int) -> np.ndarray:
    """One bundle's float32 size x size x 3 input, exactly as a worker serving it computes it."""
    inputs, _reduced = model_inputs(data, decode_side([size]), [("input", preprocessing, size)])
    return inputs["input"]
