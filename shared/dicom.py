"""DICOM header facts for selection and PACS bookkeeping, read without touching patient data.

`dicom_header` parses only the tags listed in `_HEADER_TAGS` (never names, IDs, dates) and stops
before the pixels; `selection_reason` says, from those facts alone, why a valid image is not a
frontal chest radiograph, so the worker can mark the scan `skipped` instead of classifying it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.imaging import ImageDecodeError, _read_dicom, _safe_code, sniff_format

# Study/series/instance UIDs identify images, not people; they are needed to write results back
# to a PACS. Nothing that names, dates or locates the patient is read.
_HEADER_TAGS = [
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "PatientOrientation",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "Manufacturer",  # a device maker, not patient data: lungcam's own results are recognised by it
]

FRONTAL_CHEST_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = ("CHEST",)
LATERAL_VIEWS = ("LL", "RL", "LATERAL")


@dataclass(frozen=True)
class DicomHeader:
    """The header facts used for selection and PACS bookkeeping; strings are stripped, "" when absent."""

    modality: str
    body_part_examined: str
    view_position: str
    image_laterality: str
    patient_orientation: tuple[str, ...]  # e.g. ("P", "F"): image directions, not patient data
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    number_of_frames: int  # 1 when the element is absent
    manufacturer: str = ""


def dicom_header(data: bytes) -> DicomHeader | None:
    """Header facts of a DICOM file (with or without preamble); None for anything that is not DICOM.

    Raises ImageDecodeError (kind "corrupt") when the file looks like DICOM but its header does not parse.
    Only the header is read: a deflated data set is inflated up to its pixel data, through a bounded stream.
    """
    data = bytes(data)
    try:
        if sniff_format(data) != "dicom":
            return None
    except ImageDecodeError:
        return None
    dataset = _read_dicom(data, _HEADER_TAGS, pixels=False)
    orientation = dataset.get("PatientOrientation")
    return DicomHeader(
        modality=_text(dataset.get("Modality")),
        body_part_examined=_text(dataset.get("BodyPartExamined")),
        view_position=_text(dataset.get("ViewPosition")),
        image_laterality=_text(dataset.get("ImageLaterality")),
        patient_orientation=tuple(_text(v) for v in _as_list(orientation)),
        sop_class_uid=_text(dataset.get("SOPClassUID")),
        sop_instance_uid=_text(dataset.get("SOPInstanceUID")),
        study_instance_uid=_text(dataset.get("StudyInstanceUID")),
        series_instance_uid=_text(dataset.get("SeriesInstanceUID")),
        rows=_integer(dataset.get("Rows")),
        columns=_integer(dataset.get("Columns")),
        number_of_frames=_integer(dataset.get("NumberOfFrames")) or 1,
        manufacturer=_text(dataset.get("Manufacturer")),
    )


def selection_reason(
    header: DicomHeader | None,
    *,
    modalities: Iterable[str] = FRONTAL_CHEST_MODALITIES,
    body_parts: Iterable[str] = CHEST_BODY_PARTS,
    lateral_views: Iterable[str] = LATERAL_VIEWS,
) -> str | None:
    """Why this image is not a frontal chest radiograph, or None when it should be classified.

    Non-DICOM inputs (header None) carry no such facts and are always classified. A missing
    BodyPartExamined or ViewPosition does not skip (many CR/DX writers leave them empty); a
    missing Modality does, as Modality is mandatory. Reasons quote only code strings.
    """
    if header is None:
        return None
    allowed = tuple(m.upper() for m in modalities)
    if header.modality.upper() not in allowed:
        return f"not a radiograph: modality {_safe_code(header.modality)} (classified: {', '.join(allowed)})"
    parts = tuple(p.upper() for p in body_parts)
    if header.body_part_examined and header.body_part_examined.upper() not in parts:
        return f"not a chest image: body part {_safe_code(header.body_part_examined)} (classified: {', '.join(parts)})"
    if header.view_position.upper() in tuple(v.upper() for v in lateral_views):
        return f"lateral view ({_safe_code(header.view_position)}): only frontal (PA/AP) views are classified"
    return None


def _text(value: object) -> str:
    """A DICOM value as a stripped string ("" when absent)."""
    return "" if value is None else str(value).strip()


def _integer(value: object) -> int:
    """A DICOM integer value, 0 when absent or malformed."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _as_list(value: object) -> list[object]:
    """A multi-valued element as a list (pydicom gives a scalar for VM 1 and None when absent)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]
