"""The project's vocabulary: the values, rules and typed shapes every program shares, each defined once."""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from typing import Any, NamedTuple, TypedDict, cast

# --- models ----------------------------------------------------------------------------------------


class ModelKey(NamedTuple):
    """A served model as prediction rows, overlays and batch records name it: its bundle's name and version."""

    name: str
    version: str


# --- bundles ---------------------------------------------------------------------------------------
# A bundle's manifest.json, as the trainer writes it and shared.bundle reads it. TypedDicts, not
# classes: a manifest stays the plain JSON object it is on disk (tools, tests and older bundles read
# and write it as a dict), and mypy checks every key a program reads. Entries whose shape belongs to
# one module (preprocessing: shared.imaging; calibration, audit: shared.calibration; the trainer's
# config: trainer.config) stay dict[str, Any] here.


class ManifestSplit(TypedDict, total=False):
    """How the training run split its images (manifest["dataset"]["split"])."""

    test_fraction: float
    val_fraction: float
    seed: int
    group_by_patient: bool
    method: str
    n_patients_known: int
    n_train: int
    n_val: int
    n_test: int


class ManifestDataset(TypedDict, total=False):
    """The images the bundle was trained on (manifest["dataset"])."""

    hash: str
    n_images: int
    n_by_label: dict[str, int]
    n_skipped: int
    data_paths: list[str]
    split: ManifestSplit


class ManifestBackbone(TypedDict, total=False):
    """The packaged backbone a bundle started from or names instead of embedding (manifest["backbone"])."""

    weights: str
    sha256: str
    output_layer: str
    embedded: bool
    frozen: bool
    description: str
    file: str
    license: str
    package: str
    package_version: str


class _ManifestIdentity(TypedDict):
    """The keys every manifest has (shared.bundle.save_bundle refuses one without them)."""

    name: str
    version: str
    architecture: str
    input_size: int
    class_names: list[str]
    gradcam_layer: str


class Manifest(_ManifestIdentity, total=False):
    """A bundle's manifest.json: identity, preprocessing, model file and hash, training record, verdicts."""

    format_version: int
    model_file: str
    model_sha256: str
    created_at: str
    recipe: str
    weights: str
    preprocessing: dict[str, Any]  # shared.imaging's description; a bundle without it is version 1
    gradcam_smoothing_cells: float
    training: dict[str, Any]  # trainer.config.ResolvedConfig's fields, plus seconds and epochs_run
    dataset: ManifestDataset
    metrics: dict[str, Any]
    metrics_by_source: dict[str, dict[str, Any]]
    backbone: ManifestBackbone
    head: dict[str, Any]
    calibration: dict[str, Any]  # shared.calibration.OperatingPoint.to_manifest()
    leave_one_source_out: dict[str, Any]
    site_calibration: dict[str, Any]
    audit: dict[str, Any]  # trainer.audit.audit_record()
    demonstration: bool


class ManifestUpdate(TypedDict, total=False):
    """What may change in a published manifest (shared.bundle.update_manifest): the audit's verdict, the demo mark."""

    audit: dict[str, Any]
    demonstration: bool


# The keys a manifest must have; save_bundle checks them before writing.
MANIFEST_REQUIRED_KEYS: tuple[str, ...] = tuple(_ManifestIdentity.__annotations__)


def manifest_from_json(text: str | bytes) -> Manifest:
    """A manifest from manifest.json's text; ValueError when it is not JSON or not a JSON object."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    # The keys are not checked here: an older or partly written manifest still reads, and each reader
    # says what it lacks (save_bundle checks MANIFEST_REQUIRED_KEYS on the way in).
    return cast(Manifest, data)


def manifest_to_json(manifest: Manifest) -> bytes:
    """manifest.json's bytes: indented, keys sorted (stable diffs, the same bytes for the same manifest)."""
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


# --- scans -----------------------------------------------------------------------------------------

if sys.version_info >= (3, 11):
    from enum import StrEnum as _StrEnum
else:  # pragma: no cover - Python 3.10 has no enum.StrEnum

    class _StrEnum(str, Enum):
        """A str whose str() and format() are its value, as enum.StrEnum on Python 3.11+."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return str(self.value).__format__(format_spec)


class Status(_StrEnum):
    """Where a scan is in its life; members are plain strings, stored and compared as their values."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # A valid image that is not a frontal chest film by its DICOM header: not classified, not a failure.
    SKIPPED = "skipped"


# The statuses a scan ends in: nothing more happens to it unless it is submitted again.
FINISHED_STATUSES: tuple[Status, ...] = (Status.DONE, Status.FAILED, Status.SKIPPED)


class Priority(_StrEnum):
    """How urgent a scan is: every stat scan is classified before any routine one (queues bear these names)."""

    STAT = "stat"
    ROUTINE = "routine"


# The model's classes, in the order of its softmax outputs (bundles and datasets use these names).
CLASS_NAMES: tuple[str, ...] = ("covid", "normal")

# 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit: no '/', '\\', NUL or other
# control characters, so an id can never reach into another folder of the store (and '..' is refused too).
# Batch ids follow the same rule.
SCAN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCAN_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


def is_valid_scan_id(value: str) -> bool:
    """True if value matches SCAN_ID_PATTERN and has no '..'."""
    return SCAN_ID_PATTERN.fullmatch(value) is not None and ".." not in value
