"""Chest X-ray images, shared verbatim by the trainer and the workers: one module per job.

- `limits`: `ImageDecodeError` and the size limits every header is held to.
- `dicom`: DICOM headers read once through a bounded inflater, pixel-data checks, selection rules.
- `formats`: sniffing, header size readers, and `probe` (sniff and parse a header once).
- `decode`: one decoder per format, at full size (`decode_image`) or reduced (`decode_reduced`).
- `preprocess`: a decoded image to a model's input, as a bundle's manifest says (no OpenCV at import).
- `inputs`: model inputs from bytes, the one path the trainer and the workers share.

The public names are re-exported here, imported on first use, so that importing one submodule (the
preprocessing constants, say) does not import OpenCV. The function `preprocess` is not re-exported:
`shared.imaging.preprocess` is its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.imaging.decode import ReducedImage, decode_image, decode_reduced, load_image
    from shared.imaging.dicom import (
        MAX_DEFLATED_HEADER_BYTES,
        MAX_PIXEL_DATA_BYTES,
        DicomHeader,
        decodable_transfer_syntaxes,
        selection_reason,
    )
    from shared.imaging.formats import ImageProbe, check_image_header, dicom_header, pixel_count, probe, sniff_format
    from shared.imaging.inputs import decode_side, model_input, model_inputs
    from shared.imaging.limits import DECODE_ERROR_KINDS, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, ImageDecodeError
    from shared.imaging.preprocess import (
        DISPLAY_MAX_SIDE,
        INTENSITY_METHODS,
        LUNG_BOX,
        LUNG_MASK_FILL,
        PREPROCESSING,
        PREPROCESSING_VERSIONS,
        SQUARE_METHODS,
        fit_within,
        lung_box_mask,
        preprocess_for_manifest,
        preprocessing_key,
        robust_preprocessing,
        to_uint8,
    )

_HOMES: dict[str, str] = {
    **dict.fromkeys(("ReducedImage", "decode_image", "decode_reduced", "load_image"), "decode"),
    **dict.fromkeys(
        (
            "MAX_DEFLATED_HEADER_BYTES",
            "MAX_PIXEL_DATA_BYTES",
            "DicomHeader",
            "decodable_transfer_syntaxes",
            "selection_reason",
        ),
        "dicom",
    ),
    **dict.fromkeys(
        ("ImageProbe", "check_image_header", "dicom_header", "pixel_count", "probe", "sniff_format"), "formats"
    ),
    **dict.fromkeys(("decode_side", "model_input", "model_inputs"), "inputs"),
    **dict.fromkeys(("DECODE_ERROR_KINDS", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "ImageDecodeError"), "limits"),
    **dict.fromkeys(
        (
            "DISPLAY_MAX_SIDE",
            "INTENSITY_METHODS",
            "LUNG_BOX",
            "LUNG_MASK_FILL",
            "PREPROCESSING",
            "PREPROCESSING_VERSIONS",
            "SQUARE_METHODS",
            "fit_within",
            "lung_box_mask",
            "preprocess_for_manifest",
            "preprocessing_key",
            "robust_preprocessing",
            "to_uint8",
        ),
        "preprocess",
    ),
}
__all__ = [
    "DECODE_ERROR_KINDS",
    "DISPLAY_MAX_SIDE",
    "INTENSITY_METHODS",
    "LUNG_BOX",
    "LUNG_MASK_FILL",
    "MAX_DEFLATED_HEADER_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "MAX_PIXEL_DATA_BYTES",
    "PREPROCESSING",
    "PREPROCESSING_VERSIONS",
    "SQUARE_METHODS",
    "DicomHeader",
    "ImageDecodeError",
    "ImageProbe",
    "ReducedImage",
    "check_image_header",
    "decodable_transfer_syntaxes",
    "decode_image",
    "decode_reduced",
    "decode_side",
    "dicom_header",
    "fit_within",
    "load_image",
    "lung_box_mask",
    "model_input",
    "model_inputs",
    "pixel_count",
    "preprocess_for_manifest",
    "preprocessing_key",
    "probe",
    "robust_preprocessing",
    "selection_reason",
    "sniff_format",
    "to_uint8",
]


def __getattr__(name: str) -> Any:
    """A public name of a submodule, imported on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
