"""DICOMweb: a client with lungcam's credentials, and `lungcam ingest dicomweb+http(s)://...` (QIDO-RS, WADO-RS).

The pull finds instances with QIDO-RS (filters are any `Keyword=value` QIDO accepts: StudyDate ranges,
Modality, ...), skips those already recorded (a scan's id is its SOP Instance UID, so running the same
pull again retrieves nothing twice) and lungcam's own results, retrieves the rest with WADO-RS, writes
each to the store and queues them all as one batch.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import db
from shared.errors import SubmissionError
from shared.settings import Settings
from shared.store import ObjectStore, scan_key

log = logging.getLogger("lungcam.dicomweb")

SCHEME_PREFIX = "dicomweb+"
PAGE = 500
CHUNK = 50
# Instances lungcam wrote (its SR and Secondary Capture results) are never pulled back in.
OWN_MANUFACTURER = "lungcam"
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
         "SOPClassUID": "00080016", "Manufacturer": "00080070"}


def is_dicomweb(source: str) -> bool:
    """Whether an ingest source names a DICOMweb service (dicomweb+http:// or dicomweb+https://)."""
    return source.startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


def base_url(source: str) -> str:
    """The service's HTTP base URL (the dicomweb+ scheme prefix removed, no trailing slash)."""
    if not is_dicomweb(source):
        raise SubmissionError("a DICOMweb source is dicomweb+http(s)://host/path")
    return source[len(SCHEME_PREFIX):].rstrip("/")


def client_for(source: str, settings: Settings, *, timeout: float = 60.0) -> Any:
    """A DICOMwebClient for source with LUNGCAM_DICOMWEB_TOKEN (bearer) or USERNAME/PASSWORD (basic)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if settings.dicomweb_token is not None:
        session.headers["Authorization"] = f"Bearer {settings.dicomweb_token.get_secret_value()}"
    elif settings.dicomweb_username:
        password = settings.dicomweb_password.get_secret_value() if settings.dicomweb_password else ""
        session.auth = (settings.dicomweb_username, password)
    return DICOMwebClient(base_url(source), session=session, timeout=timeout)


def parse_filters(items: list[str] | None) -> dict[str, str]:
    """`Keyword=value` pairs as a QIDO-RS search filter mapping."""
    filters: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmissionError(f"--filter takes Keyword=value (e.g. Modality=DX), not {item!r}")
        filters[key.strip()] = value.strip()
    return filters


def _value(record: dict, keyword: str) -> str | None:
    values = record.get(_TAGS[keyword], {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class RemoteInstance:
    """One instance found by QIDO-RS."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str


def search_instances(client: Any, filters: dict[str, str]) -> list[RemoteInstance]:
    """Every image instance matching filters (paged), lungcam's own results excluded."""
    from worker.pacs.listener import IMAGE_SOP_CLASSES

    found: list[RemoteInstance] = []
    offset = 0
    while True:
        page = client.search_for_instances(
            search_filters=dict(filters), limit=PAGE, offset=offset, fields=list(_TAGS)
        )
        for record in page:
            ids = [_value(record, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")]
            if not all(ids) or ids[3] not in IMAGE_SOP_CLASSES or _value(record, "Manufacturer") == OWN_MANUFACTURER:
                continue
            found.append(RemoteInstance(*ids))  # type: ignore[arg-type]
        if len(page) < PAGE:
            break
        offset += len(page)
    unique = {instance.sop_uid: instance for instance in found}
    return list(unique.values())


def _known(sessions: sessionmaker[Session], scan_ids: list[str]) -> set[str]:
    known: set[str] = set()
    with sessions() as session:
        for start in range(0, len(scan_ids), 500):
            chunk = scan_ids[start : start + 500]
            known.update(session.scalars(select(db.Scan.scan_id).where(db.Scan.scan_id.in_(chunk))))
    return known


def _encode(dataset: Any) -> bytes:
    """A retrieved data set as a Part 10 file (the store keeps files that the worker's decoder reads)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class PullResult:
    """What a pull did: the batch, scans queued, instances already known, and own results skipped."""

    batch_id: str
    found: int = 0
    queued: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: int = 0


def pull(
    source: str,
    filters: dict[str, str],
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    app: Celery,
    batch_name: str | None = None,
    force: bool = False,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    client: Any = None,
) -> PullResult:
    """Find instances by QIDO-RS, retrieve the new ones by WADO-RS, store and queue them as one batch."""
    from shared.queueing import submit_scans

    client = client or client_for(source, settings)
    instances = search_instances(client, filters)
    result = PullResult(batch_id=uuid.uuid4().hex, found=len(instances))
    if on_total:
        on_total(len(instances))
    known = set() if force else _known(sessions, [i.sop_uid for i in instances])
    result.already = [i.sop_uid for i in instances if i.sop_uid in known]
    if on_progress and result.already:
        on_progress(len(result.already))
    todo = [i for i in instances if i.sop_uid not in known]
    pending: list[dict] = []

    def flush() -> None:
        if pending:
            submitted = submit_scans(sessions, app, list(pending), batch_id=result.batch_id, batch_name=batch_name, force=force)
            result.queued += submitted.queued
            result.already += submitted.already
            if on_progress:
                on_progress(len(pending))
            pending.clear()

    for instance in todo:
        dataset = client.retrieve_instance(instance.study_uid, instance.series_uid, instance.sop_uid)
        if str(dataset.get("Manufacturer", "")) == OWN_MANUFACTURER:
            result.skipped += 1
            if on_progress:
                on_progress(1)
            continue
        key = scan_key(instance.sop_uid)
        store.put(key, _encode(dataset), "application/dicom")
        pending.append({
            "scan_id": instance.sop_uid, "source_uri": key, "priority": db.ROUTINE,
            "study_uid": instance.study_uid, "series_uid": instance.series_uid, "sop_instance_uid": instance.sop_uid,
        })
        if len(pending) >= CHUNK:
            flush()
    flush()
    return result
