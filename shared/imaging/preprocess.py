"""Preprocessing: a decoded image to a model's input, exactly as a bundle's manifest says.

`preprocess` is version 1 (resize only); `robust_preprocessing` describes versions 2 to 4 (grey,
crop, square, intensity standardisation, blur, lung mask) and `preprocess_for_manifest` applies any
of them. The trainer and the workers both go through here (via `shared.imaging.inputs`), so a model
sees the same numbers in training and in service. The constants import without OpenCV (the
training CLI's argument parser uses them): cv2 is imported inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

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
# The longest side of the image kept for display: overlays are drawn at most this large, and the
# worker never decodes smaller than this (nor than its largest model input: `inputs.decode_side`).
DISPLAY_MAX_SIDE = 1024


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a decoded image to a float32 size x size x 3 array in [0, 1], as the models expect."""
    import cv2

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
    import cv2

    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a [0, 1] float image to uint8 of the same shape, for display and overlays."""
    import cv2

    # np.clip maps NaN to NaN, so NaNs are zeroed first; convertScaleAbs then rounds and saturates in
    # one pass (several times faster than rint + clip + astype on full-size films).
    unit = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return cv2.convertScaleAbs(unit, alpha=255.0)


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
    import cv2

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
    import cv2

    height, width = grey.shape[:2]
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(grey, (size, size), interpolation=interpolation).astype(np.float32, copy=False)


def _standardise_intensity(grey: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    import cv2

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
        standardised: np.ndarray = out.astype(np.float32) / np.float32(255.0)
        return standardised
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
    stretched: np.ndarray = np.clip((grey - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return stretched
