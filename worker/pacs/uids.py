"""Deterministic UIDs of the DICOM objects lungcam sends, so a re-sent result replaces rather than duplicates."""

from __future__ import annotations

from pydicom.uid import generate_uid


def derived_uid(prefix: str, *parts: str) -> str:
    """A UID under prefix determined by parts (a SHA-512 of them, as pydicom's entropy_srcs does)."""
    return str(generate_uid(prefix=prefix, entropy_srcs=[str(part) for part in parts]))


def sr_instance_uid(prefix: str, sop_uid: str, model: str, version: str) -> str:
    """SOP Instance UID of the Structured Report on one source image by one model version."""
    return derived_uid(prefix, sop_uid, model, version, "sr")


def sc_instance_uid(prefix: str, sop_uid: str, model: str, version: str) -> str:
    """SOP Instance UID of the Grad-CAM Secondary Capture of one source image by one model version."""
    return derived_uid(prefix, sop_uid, model, version, "sc")


def sr_series_uid(prefix: str, study_uid: str, model: str, version: str) -> str:
    """One SR series per study and model version (its reports on every image of the study)."""
    return derived_uid(prefix, study_uid, model, version, "sr-series")


def sc_series_uid(prefix: str, study_uid: str, model: str, version: str) -> str:
    """One Secondary Capture series per study and model version."""
    return derived_uid(prefix, study_uid, model, version, "sc-series")
