"""Turning validated ScanIn bodies into stored uploads, `scans` rows and classify messages."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Status
from shared.errors import SubmissionError
from shared.models import Scan
from shared.queueing import SubmitResult, submit_scans
from shared.scans import NewScan, dicom_received_ids, existing_scan_ids
from shared.sources import SourcePolicy
from shared.store import ObjectStore, scan_key
from worker.api.models import ScanIn


class ImageTooLarge(SubmissionError):
    """An uploaded image decodes to more bytes than the API accepts."""

    def __init__(self, field: str, size: int, limit: int) -> None:
        """Name the field and the limit (not the scan id: messages may reach logs)."""
        super().__init__(
            f"{field} decodes to {size} bytes, over the limit of {limit} bytes (LUNGCAM_API_MAX_IMAGE_BYTES)"
        )


class ReceivedOverDicom(SubmissionError):
    """A submission names a scan received from a modality or PACS: only the DICOM path may replace it."""

    def __init__(self, count: int) -> None:
        """Say how many (not which: ids may be linked to a patient and messages may reach logs)."""
        super().__init__(
            f"{count} of the submitted scan ids belong to images received over DICOM (C-STORE or a DICOMweb "
            "pull); they can be replaced only by the DICOM path, not through the API (with or without force)"
        )


def check_image_sizes(scans: Sequence[ScanIn], limit: int, *, in_batch: bool) -> None:
    """Raise ImageTooLarge for the first upload whose decoded size exceeds limit."""
    for index, scan in enumerate(scans):
        if scan.image is not None and len(scan.image) > limit:
            field = f"scans[{index}].image_base64" if in_batch else "image_base64"
            raise ImageTooLarge(field, len(scan.image), limit)


def _source_uri(scan: ScanIn) -> str:
    """Where the worker reads the scan: the upload's key in the configured store, or the given s3:// URI."""
    return scan_key(scan.scan_id) if scan.image is not None else str(scan.source_uri)


def submit(
    sessions: sessionmaker[Session],
    celery: Celery,
    store: ObjectStore,
    scans: Sequence[ScanIn],
    *,
    batch_id: str | None = None,
    batch_name: str | None = None,
    upload_threads: int = 8,
    sources: SourcePolicy | None = None,
) -> SubmitResult:
    """Store uploads, record the scans and publish them; an existing scan is queued again only if forced.

    With a source policy, every source_uri is checked first: one refused source refuses the whole
    submission (SourceNotAllowed) before anything is stored, recorded or published.
    """
    if sources is not None:
        for scan in scans:
            if scan.source_uri is not None:
                sources.check(scan.source_uri)
    with sessions() as session:
        existing = existing_scan_ids(session, [scan.scan_id for scan in scans])
        received = dicom_received_ids(session, sorted(existing))
    if received:
        # Replacing it would change the image behind results filed in the PACS under its patient and study.
        raise ReceivedOverDicom(len(received))
    # An existing scan's image is left alone unless forced: overwriting it would silently change
    # the input behind a finished result.
    uploads = [scan for scan in scans if scan.image is not None and (scan.scan_id not in existing or scan.force)]
    # Uploads go first, so no message is ever published for an image that is not in the store yet.
    if uploads:
        with ThreadPoolExecutor(max_workers=max(1, min(upload_threads, len(uploads)))) as pool:
            # list() re-raises the first failed upload here, before anything is recorded.
            list(pool.map(lambda scan: store.put(scan_key(scan.scan_id), scan.image or b""), uploads))
    result = SubmitResult()
    for force in (False, True):
        group = [scan for scan in scans if scan.force is force]
        if not group:
            continue
        rows = [NewScan(s.scan_id, _source_uri(s), s.priority) for s in group]
        part = submit_scans(sessions, celery, rows, batch_id=batch_id, batch_name=batch_name, force=force)
        result.queued.extend(part.queued)
        result.already.extend(part.already)
    return result


def current_status(sessions: sessionmaker[Session], scan_id: str) -> Status:
    """The scan's status now (queued if the row vanished in between, which only a delete could cause)."""
    with sessions() as session:
        status = session.scalar(select(Scan.status).where(Scan.scan_id == scan_id))
    return Status(status) if status else Status.QUEUED
