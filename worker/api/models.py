"""Request and response bodies of the HTTP API (pydantic); requests reject unknown fields."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from shared.domain import SCAN_ID_PATTERN, Priority, Status

# s3://bucket/key, bucket per S3 naming rules (lower case, digits, '.', '-'; 3 to 63 characters).
S3_URI_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00]+$")
MAX_BATCH_SCANS = 10_000


def decode_strict_base64(value: object) -> bytes:
    """The bytes of strict base64 text; refuses stray characters, partial groups and an empty result."""
    if not isinstance(value, str):
        raise ValueError("image_base64 must be a base64 string")
    try:
        # validate=True alone still accepts surplus '=' padding; whole 4-character groups are required.
        if len(value) % 4:
            raise binascii.Error("length is not a multiple of 4")
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image_base64 is not valid base64") from None
    if not decoded:
        raise ValueError("image_base64 decodes to an empty image")
    return decoded


# Base64 text on the wire, its decoded bytes in Python: decoded once, when the request is validated.
Base64Image = Annotated[
    bytes,
    BeforeValidator(decode_strict_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


class ScanIn(BaseModel):
    """One scan to classify: an uploaded image (base64) or a reference to an image already in S3."""

    model_config = ConfigDict(extra="forbid")

    scan_id: str = Field(
        description="1-128 letters, digits, '.', '_' or '-', starting with a letter or digit; no '..'."
    )
    source_uri: str | None = Field(default=None, description="s3://bucket/key of an image already in a store.")
    image: Base64Image | None = Field(
        default=None,
        alias="image_base64",
        description="The image file (PNG, JPEG or DICOM), base64-encoded.",
    )
    priority: Priority = Field(
        default=Priority.ROUTINE, description="'stat' scans are classified before 'routine' ones."
    )
    force: bool = Field(default=False, description="Classify again even if the scan already exists.")

    @field_validator("scan_id")
    @classmethod
    def _check_scan_id(cls, value: str) -> str:
        """Refuse ids that are not one safe store-key segment."""
        if not SCAN_ID_PATTERN.fullmatch(value):
            raise ValueError(
                "scan_id must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if ".." in value:
            raise ValueError("scan_id may not contain '..'")
        return value

    @field_validator("source_uri")
    @classmethod
    def _check_source_uri(cls, value: str | None) -> str | None:
        """Accept only s3://bucket/key: a local path would let a client make the server read its own files."""
        if value is None:
            return None
        if not S3_URI_PATTERN.fullmatch(value):
            raise ValueError(
                "source_uri must be s3://bucket/key; local paths and file:// URIs are not accepted over HTTP "
                "(upload the image as image_base64 instead)"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ScanIn:
        """Require exactly one of source_uri and image_base64."""
        if (self.source_uri is None) == (self.image is None):
            raise ValueError("give exactly one of source_uri or image_base64")
        return self


class BatchIn(BaseModel):
    """Many scans submitted together; their progress is read back by batch id."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=256, description="A label for people; not unique.")
    scans: list[ScanIn] = Field(min_length=1, max_length=MAX_BATCH_SCANS)

    @model_validator(mode="after")
    def _unique_scan_ids(self) -> BatchIn:
        """Refuse a batch that names a scan twice (which of the two would it be?)."""
        seen: set[str] = set()
        duplicates: list[str] = []
        for scan in self.scans:
            if scan.scan_id in seen:
                duplicates.append(scan.scan_id)
            seen.add(scan.scan_id)
        if duplicates:
            shown = ", ".join(repr(scan_id) for scan_id in duplicates[:5])
            more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
            raise ValueError(f"duplicate scan_id in scans: {shown}{more}")
        return self


class ScanSubmitted(BaseModel):
    """What happened to one submitted scan."""

    scan_id: str
    status: Status
    queued: bool = Field(description="False if the scan already existed and was not queued again (no force).")


class BatchSubmitted(BaseModel):
    """What happened to a submitted batch."""

    batch_id: str
    queued: int = Field(description="Scans queued for classification.")
    already: int = Field(description="Scans that already existed and were not queued again (no force).")


class PredictionOut(BaseModel):
    """One model's verdict on a scan (built from a `predictions` row)."""

    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    model_name: str
    model_version: str
    label: str = Field(description="covid, normal, or indeterminate (inside the bundle's band).")
    p_covid: float = Field(description="Calibrated by the bundle's temperature; label compares it with threshold.")
    threshold: float | None = Field(
        default=None, description="The bundle's operating point (None: before calibration was recorded)."
    )
    inference_ms: float | None
    cam_note: str | None = Field(
        default=None,
        description="A comment on the Grad-CAM map when it is flat or peaks at the border, outside the body or on a "
        "bright marker (None: nothing to say, or a result from before this was recorded).",
    )
    # The store key stays internal; the context's `overlay_link` turns it into overlay_url.
    overlay_key: str | None = Field(default=None, exclude=True)
    overlay_url: str | None = Field(
        default=None, description="Grad-CAM overlay image; a time-limited URL that needs no bearer token."
    )
    older_model: bool = Field(
        default=False,
        description="True for a model the scan's batch was not screened with (shown only with all_models=true).",
    )

    @model_validator(mode="after")
    def _link_overlay(self, info: ValidationInfo) -> PredictionOut:
        """Fill overlay_url and older_model from the link maker and current models in the validation context."""
        context = info.context or {}
        link = context.get("overlay_link")
        if self.overlay_key and link is not None and self.overlay_url is None:
            self.overlay_url = link(self.overlay_key)
        current = context.get("current_models")
        if current:
            self.older_model = (self.model_name, self.model_version) not in current
        return self


class ScanOut(BaseModel):
    """A scan's status and predictions (its internal source location is not shown), built from a `scans` row."""

    model_config = ConfigDict(from_attributes=True)

    scan_id: str
    status: Status
    priority: Priority
    batch_id: str | None
    error: str | None
    submitted_at: dt.datetime
    finished_at: dt.datetime | None
    attempts: int
    predictions: list[PredictionOut]


class StatusCounts(BaseModel):
    """Scans per status (skipped: a valid image that is not a frontal chest film; not a failure)."""

    queued: int
    running: int
    done: int
    failed: int
    skipped: int


class BatchOut(BaseModel):
    """A batch's progress."""

    batch_id: str
    name: str | None
    submitted_at: dt.datetime
    counts: StatusCounts
    total: int
    progress: float = Field(ge=0.0, le=1.0, description="Fraction of scans done, failed or skipped.")
    complete: bool = Field(description="True when no scan is queued or running.")


class Health(BaseModel):
    """Liveness answer."""

    status: Literal["ok"]


class CheckResult(BaseModel):
    """One dependency's readiness."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """Readiness of the API's dependencies."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, CheckResult]


class ErrorOut(BaseModel):
    """An error answer; detail says what is wrong."""

    detail: str
