"""DICOMweb: a client with lungcam's credentials, and `lungcam ingest dicomweb+http(s)://...` (QIDO-RS, WADO-RS).

The pull finds instances with QIDO-RS (filters are any `Keyword=value` QIDO accepts: StudyDate ranges,
Modality, ...), skips those already recorded (a scan's id is its SOP Instance UID, so running the same
pull again retrieves nothing twice) and lungcam's own results, retrieves the rest with WADO-RS, writes
each to the store and queues them all as one batch.

The server is not trusted: searching stops at a page cap and when a page repeats (a server that ignores
`offset`), the whole pull has a deadline (a stalled or trickling server ends it), every answer is read
in bounded pieces with a byte cap (a 1 GB part is refused, never buffered), UIDs that are not UIDs are
refused, and one instance that cannot be retrieved is recorded as a failed scan with what the server
did, without stopping the others. Each instance is stored and its row committed before the next one,
so a pull that stops for any reason leaves nothing stored without its row, and running it again
retrieves what is missing (failed retrievals included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Priority, Status
from shared.errors import SubmissionError
from shared.models import Scan
from shared.scans import NewScan, add_scans, mark_scans
from shared.settings import Settings
from shared.store import ObjectStore, scan_key

log = logging.getLogger("lungcam.dicomweb")

SCHEME_PREFIX = "dicomweb+"
PAGE = 500
DEFAULT_MAX_PAGES = 200  # 100,000 instances; more needs --filter (e.g. StudyDate ranges) or --max-pages
DEFAULT_DEADLINE_S = 24 * 3600.0
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 60.0  # silence between two pieces of an answer; a stalled server fails here
READ_PIECE = 64 * 1024
MAX_SEARCH_BYTES = 64 * 1024 * 1024  # one QIDO-RS page (500 records are about 1 MB)
MAX_PART_HEADER_BYTES = 64 * 1024  # a multipart preamble plus the first part's headers
# This many instances in a row that cannot be reached (not: answered with an error) end the pull.
MAX_UNREACHABLE_IN_A_ROW = 5
# The error of a scan whose retrieval failed; a later pull retries exactly these.
RETRIEVAL_FAILED = "DICOMweb retrieval failed: "
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Instances lungcam wrote (its SR and Secondary Capture results) are never pulled back in.
OWN_MANUFACTURER = "lungcam"
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "Manufacturer": "00080070",
}


def is_dicomweb(source: str) -> bool:
    """Whether an ingest source names a DICOMweb service (dicomweb+http:// or dicomweb+https://)."""
    return source.startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


def base_url(source: str) -> str:
    """The service's HTTP base URL (the dicomweb+ scheme prefix removed, no trailing slash)."""
    if not is_dicomweb(source):
        raise SubmissionError("a DICOMweb source is dicomweb+http(s)://host/path")
    return source[len(SCHEME_PREFIX) :].rstrip("/")


def session_for(settings: Settings) -> Any:
    """A requests.Session with LUNGCAM_DICOMWEB_TOKEN (bearer) or USERNAME/PASSWORD (basic)."""
    import requests

    session = requests.Session()
    if settings.dicomweb_token is not None:
        session.headers["Authorization"] = f"Bearer {settings.dicomweb_token.get_secret_value()}"
    elif settings.dicomweb_username:
        password = settings.dicomweb_password.get_secret_value() if settings.dicomweb_password else ""
        session.auth = (settings.dicomweb_username, password)
    return session


def client_for(source: str, settings: Settings, *, timeout: float = 60.0) -> Any:
    """A DICOMwebClient for source with lungcam's DICOMweb credentials (dicom-send's STOW-RS)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(base_url(source), session=session_for(settings), timeout=timeout)


def parse_filters(items: list[str] | None) -> dict[str, str]:
    """`Keyword=value` pairs as a QIDO-RS search filter mapping."""
    filters: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmissionError(f"--filter takes Keyword=value (e.g. Modality=DX), not {item!r}")
        filters[key.strip()] = value.strip()
    return filters


class PullError(SubmissionError):
    """The DICOMweb service did something the pull cannot go on with; the message says what, in one line."""


class InstanceError(Exception):
    """One instance could not be retrieved; the message says what the server did (it becomes the scan's error)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        """unreachable: no answer at all (a run of these ends the pull), rather than a refusal or a bad answer."""
        super().__init__(message)
        self.unreachable = unreachable


class _DeadlineReached(Exception):
    """The pull's deadline passed while waiting for or reading an answer."""


def valid_uid(value: object) -> str | None:
    """value if it is a DICOM UID (digits and dots, at most 64 characters), else None: '../x' is no UID."""
    text = str(value) if isinstance(value, (str, int)) else ""
    return text if 0 < len(text) <= 64 and _UID.fullmatch(text) else None


def _value(record: dict[str, Any], keyword: str) -> object:
    element = record.get(_TAGS[keyword])
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


@dataclass(frozen=True)
class RemoteInstance:
    """One instance found by QIDO-RS."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str


@dataclass
class _Http:
    """GETs against the service with an overall deadline, read in bounded pieces."""

    session: Any
    base: str
    deadline: float  # time.monotonic()

    def get(self, path: str, *, accept: str, params: dict[str, str] | None = None) -> Any:
        """Start a streamed GET; raises _DeadlineReached, or requests' errors."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineReached
        return self.session.get(
            self.base + path,
            params=params,
            headers={"Accept": accept},
            stream=True,
            timeout=(min(CONNECT_TIMEOUT_S, remaining), min(READ_TIMEOUT_S, remaining)),
        )

    def pieces(self, response: Any) -> Iterator[bytes]:
        """The body in pieces of at most READ_PIECE bytes, each one socket read; the deadline is checked between them."""
        raw = response.raw
        while True:
            if time.monotonic() > self.deadline:
                raise _DeadlineReached
            # read1: one read from the socket, so a server trickling a byte at a time cannot hold us past the deadline;
            # a compressed answer is inflated at most READ_PIECE bytes per call, and the caps count inflated bytes.
            piece = raw.read1(READ_PIECE, decode_content=True)
            if not piece:
                return
            yield piece

    def read_capped(self, response: Any, cap: int, what: str) -> bytes:
        """The whole body, refused (not read further) once it exceeds cap bytes."""
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise InstanceError(f"{what} declares {int(declared)} bytes, over the limit of {cap}")
        body = bytearray()
        for piece in self.pieces(response):
            body += piece
            if len(body) > cap:
                raise InstanceError(f"{what} is larger than the limit of {cap} bytes; not read further")
        return bytes(body)


def _search_page(http: _Http, filters: dict[str, str], limit: int, offset: int) -> list[dict[str, Any]]:
    """One QIDO-RS page as a list of records; PullError for anything else."""
    import requests

    params = {**filters, "limit": str(limit), "offset": str(offset), "includefield": ",".join(_TAGS.values())}
    where = f"at offset {offset}"
    try:
        with http.get("/instances", accept="application/dicom+json", params=params) as response:
            if response.status_code == 204:
                return []
            if response.status_code != 200:
                hint = (
                    " (credentials: LUNGCAM_DICOMWEB_USERNAME / LUNGCAM_DICOMWEB_PASSWORD or LUNGCAM_DICOMWEB_TOKEN)"
                    if response.status_code in (401, 403)
                    else ""
                )
                raise PullError(
                    f"{http.base} answered the search (QIDO-RS, {where}) with HTTP {response.status_code}{hint}"
                )
            try:
                body = http.read_capped(response, MAX_SEARCH_BYTES, "the search answer")
            except InstanceError as exc:
                raise PullError(f"{http.base}: {exc} (QIDO-RS, {where})") from None
    except requests.Timeout:
        if time.monotonic() >= http.deadline:
            raise _DeadlineReached from None
        raise PullError(
            f"{http.base} did not answer the search (QIDO-RS, {where}) within {READ_TIMEOUT_S:.0f} s"
        ) from None
    except requests.RequestException as exc:
        raise PullError(f"the DICOMweb service at {http.base} cannot be reached ({type(exc).__name__})") from None
    try:
        page = json.loads(body) if body.strip() else []
    except (ValueError, UnicodeDecodeError):
        raise PullError(f"{http.base} answered the search (QIDO-RS, {where}) with malformed JSON") from None
    if not isinstance(page, list) or not all(isinstance(record, dict) for record in page):
        raise PullError(f"{http.base} answered the search (QIDO-RS, {where}) with JSON that is not a list of records")
    return page


@dataclass
class SearchResult:
    """Image instances found, and records refused because their UIDs are not UIDs."""

    instances: list[RemoteInstance] = field(default_factory=list)
    refused: int = 0


def search_instances(
    http: _Http, filters: dict[str, str], *, page_size: int = PAGE, max_pages: int = DEFAULT_MAX_PAGES
) -> SearchResult:
    """Every image instance matching filters, page by page, lungcam's own results excluded.

    Stops with PullError when a page repeats what earlier pages returned (the server ignores `offset`)
    or when more than max_pages full pages match.
    """
    from worker.pacs.listener import IMAGE_SOP_CLASSES

    result = SearchResult()
    seen: dict[str, RemoteInstance] = {}
    every: set[str] = set()  # the SOP Instance UID (as given) of every record, images or not
    offset = 0
    for number in range(1, max_pages + 1):
        page = _search_page(http, filters, page_size, offset)
        new = 0
        for record in page:
            given = str(_value(record, "SOPInstanceUID"))
            new += given not in every
            every.add(given)
            sop_class = str(_value(record, "SOPClassUID") or "")
            if _value(record, "Manufacturer") == OWN_MANUFACTURER or sop_class not in IMAGE_SOP_CLASSES:
                continue
            uids = [valid_uid(_value(record, k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
            study, series, sop = uids
            if study is None or series is None or sop is None:
                result.refused += 1
                continue
            seen.setdefault(sop, RemoteInstance(study, series, sop, sop_class))
        if len(page) < page_size:
            result.instances = list(seen.values())
            return result
        if new == 0 and number > 1:
            raise PullError(
                f"{http.base} ignores the search's offset: page {number} repeats what earlier pages returned; "
                "stopped searching, nothing was retrieved (narrow the search with --filter so one page holds it)"
            )
        offset += len(page)
    raise PullError(
        f"more than {max_pages} pages of {page_size} instances match at {http.base}: nothing was retrieved; "
        "narrow the search with --filter (e.g. StudyDate=20200101-20200131) or raise --max-pages"
    )


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";,]+)"?', content_type, re.IGNORECASE)
    return match.group(1).strip().encode("latin-1") if match else None


def _first_part(http: _Http, response: Any, boundary: bytes, cap: int) -> tuple[str, bytes]:
    """The content type and bytes of the first part of a multipart answer, read with a byte cap."""
    delimiter = b"--" + boundary
    pieces = http.pieces(response)
    buffer = bytearray()
    while True:
        start = buffer.find(delimiter)
        head_end = buffer.find(b"\r\n\r\n", start) if start >= 0 else -1
        if head_end >= 0:
            break
        if len(buffer) > MAX_PART_HEADER_BYTES:
            raise InstanceError(
                f"WADO-RS answered a multipart body without part headers in its first {MAX_PART_HEADER_BYTES} bytes"
            )
        piece = next(pieces, None)
        if piece is None:
            raise InstanceError("WADO-RS answered a multipart body that ends before its first part")
        buffer += piece
    headers: dict[str, str] = {}
    for line in bytes(buffer[start + len(delimiter) : head_end]).decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    part_type = headers.get("content-type", "")
    if part_type and not part_type.lower().startswith("application/dicom"):
        raise InstanceError(f"WADO-RS answered a part of type {part_type.split(';')[0][:60]}, not DICOM")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise InstanceError(f"WADO-RS answered a part that declares {int(declared)} bytes, over the limit of {cap}")
    # The part ends at CRLF + delimiter; only the new tail is searched, so a large part costs one pass.
    closing = b"\r\n" + delimiter
    body = bytearray(buffer[head_end + 4 :])
    del buffer
    searched = 0
    while True:
        end = body.find(closing, searched)
        if end >= 0:
            return part_type, bytes(body[:end])
        if len(body) > cap + len(closing):
            raise InstanceError(
                f"WADO-RS answered a part larger than the limit of {cap} bytes "
                "(LUNGCAM_DICOMWEB_MAX_PART_BYTES); not read further"
            )
        searched = max(0, len(body) - len(closing))
        piece = next(pieces, None)
        if piece is None:
            raise InstanceError("WADO-RS answered a multipart body that ends inside its first part")
        body += piece


def retrieve_instance(http: _Http, instance: RemoteInstance, max_part_bytes: int) -> bytes:
    """The instance as a DICOM Part 10 file, checked to be the one asked for; InstanceError saying what went wrong."""
    import requests
    import urllib3

    path = f"/studies/{instance.study_uid}/series/{instance.series_uid}/instances/{instance.sop_uid}"
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    try:
        with http.get(path, accept=accept) as response:
            if response.status_code != 200:
                raise InstanceError(f"WADO-RS answered HTTP {response.status_code}")
            content_type = response.headers.get("Content-Type", "")
            if content_type.lower().startswith("multipart/"):
                boundary = _boundary(content_type)
                if boundary is None:
                    raise InstanceError("WADO-RS answered a multipart body without a boundary")
                _type, data = _first_part(http, response, boundary, max_part_bytes)
            elif content_type.lower().startswith("application/dicom"):
                data = http.read_capped(response, max_part_bytes, "WADO-RS's answer")
            else:
                raise InstanceError(
                    f"WADO-RS answered {content_type.split(';')[0][:60] or 'no content type'}, not DICOM"
                )
    except requests.Timeout:
        if time.monotonic() >= http.deadline:
            raise _DeadlineReached from None
        raise InstanceError(f"WADO-RS gave no answer within {READ_TIMEOUT_S:.0f} s", unreachable=True) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if time.monotonic() >= http.deadline:
            raise _DeadlineReached from None
        raise InstanceError(
            f"the service could not be reached or stopped answering ({type(exc).__name__})", unreachable=True
        ) from None
    return _checked_part10(data, instance)


def _checked_part10(data: bytes, instance: RemoteInstance) -> bytes:
    """data as a Part 10 file if it parses as the instance asked for, else InstanceError."""
    from pydicom.errors import InvalidDicomError

    from shared.imaging.dicom import read_dataset
    from shared.imaging.formats import check_image_header, sniff_format
    from shared.imaging.limits import ImageDecodeError

    # The shared size guard reads the header through a bounded stream: a deflate bomb is refused
    # before pydicom (which inflates a deflated data set whole) sees it. Parts that are not DICOM
    # at all are refused below, with that message.
    try:
        is_dicom = sniff_format(data) == "dicom"
    except ImageDecodeError:
        is_dicom = False
    if is_dicom:
        try:
            check_image_header(data, verify_pixel_data=True)
        except ImageDecodeError as exc:
            raise InstanceError(f"WADO-RS answered an instance that cannot be classified ({exc})") from None
    try:
        dataset = read_dataset(data)
        part10 = True
    except InvalidDicomError:
        part10 = False  # a bare data set (no preamble): re-encoded below if it parses
    except Exception:  # noqa: BLE001 - whatever pydicom raises, the part is not DICOM
        raise InstanceError("WADO-RS answered a part that does not parse as DICOM") from None
    if not part10:
        try:
            dataset = read_dataset(data, pixels=True, force=True)
            if "SOPInstanceUID" not in dataset or "SOPClassUID" not in dataset:
                raise ValueError("no SOP UIDs")
            data = _encode(dataset)
        except Exception:  # noqa: BLE001
            raise InstanceError("WADO-RS answered a part that does not parse as DICOM") from None
    if str(dataset.get("SOPInstanceUID", "")) != instance.sop_uid:
        raise InstanceError("WADO-RS answered another instance than the one asked for")
    if str(dataset.get("Manufacturer", "")) == OWN_MANUFACTURER:
        raise _OwnResult
    return data


class _OwnResult(Exception):
    """The instance is one of lungcam's own results: skipped, never classified."""


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


def pull_batch_id(source: str, filters: dict[str, str], name: str | None) -> str:
    """The batch of a pull: the same service, filters and name always give the same batch (a re-run completes it)."""
    key = json.dumps([base_url(source), sorted(filters.items()), name or ""])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class PullResult:
    """What a pull did: the batch, instances found, scans queued, already known, own results skipped, failures."""

    batch_id: str
    found: int = 0
    queued: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: int = 0
    failed: int = 0  # instances that could not be retrieved: recorded as failed scans with the reason
    refused: int = 0  # search records whose UIDs are not UIDs: nothing recorded

    def summary(self) -> str:
        """One line for the operator."""
        line = f"batch {self.batch_id}: {len(self.queued)} queued, {len(self.already)} already known"
        if self.skipped:
            line += f", {self.skipped} lungcam results skipped"
        if self.failed:
            line += f", {self.failed} could not be retrieved (failed scans with the reason: `lungcam results {self.batch_id}`)"
        if self.refused:
            line += f", {self.refused} search records refused (a UID that is not a UID)"
        return line


@dataclass
class _Row:
    status: str
    error: str | None
    received: bool  # carries a SOP Instance UID: recorded by the DICOM path


def _rows(sessions: sessionmaker[Session], scan_ids: list[str]) -> dict[str, _Row]:
    rows: dict[str, _Row] = {}
    with sessions() as session:
        for start in range(0, len(scan_ids), 500):
            chunk = scan_ids[start : start + 500]
            statement = select(Scan.scan_id, Scan.status, Scan.error, Scan.sop_instance_uid).where(
                Scan.scan_id.in_(chunk)
            )
            for scan_id, status, error, sop in session.execute(statement):
                rows[scan_id] = _Row(status, error, sop is not None)
    return rows


def _is_failed_retrieval(row: _Row | None) -> bool:
    return row is not None and row.status == Status.FAILED and (row.error or "").startswith(RETRIEVAL_FAILED)


def _record_failure(
    sessions: sessionmaker[Session],
    instance: RemoteInstance,
    reason: str,
    *,
    batch_id: str,
    batch_name: str | None,
    row: _Row | None,
) -> None:
    """A failed scan with what the server did, so `lungcam results` shows it and the next pull retries it."""
    if row is not None and not _is_failed_retrieval(row):
        return  # an upload under this UID (not yet replaced): left as it is
    with sessions.begin() as session:
        # No sop_instance_uid: nothing was received, so the listener or a later pull may still fill this row.
        add_scans(
            session,
            [
                NewScan(
                    instance.sop_uid,
                    scan_key(instance.sop_uid),
                    priority=Priority.ROUTINE,
                    study_uid=instance.study_uid,
                    series_uid=instance.series_uid,
                )
            ],
            batch_id,
            batch_name=batch_name,
        )
        mark_scans(session, [instance.sop_uid], Status.FAILED, error=(RETRIEVAL_FAILED + reason)[:500], finished=True)


def _search_within_deadline(
    http: _Http, filters: dict[str, str], *, page_size: int, max_pages: int, deadline_s: float
) -> SearchResult:
    """search_instances, with a deadline reached said as a PullError."""
    try:
        return search_instances(http, filters, page_size=page_size, max_pages=max_pages)
    except _DeadlineReached:
        raise PullError(
            f"the search (QIDO-RS) at {http.base} did not finish within the --deadline of {deadline_s:g} s "
            "(the server stalled or trickled); nothing was retrieved"
        ) from None


def _instances_to_retrieve(
    found: SearchResult, rows: dict[str, _Row], result: PullResult, *, force: bool
) -> list[RemoteInstance]:
    """The found instances not already known (those go to result.already), in order."""
    todo = []
    for instance in found.instances:
        row = rows.get(instance.sop_uid)
        # Known: recorded by the DICOM path and not a failed retrieval. An upload under the same UID is replaced.
        if not force and row is not None and row.received and not _is_failed_retrieval(row):
            result.already.append(instance.sop_uid)
        else:
            todo.append(instance)
    return todo


def _store_and_queue(
    instance: RemoteInstance,
    data: bytes,
    result: PullResult,
    *,
    store: ObjectStore,
    sessions: sessionmaker[Session],
    app: Celery,
    batch_name: str | None,
    force: bool,
) -> None:
    """Store one retrieved instance, then commit its row and send its message (nothing stored lacks a row)."""
    from shared.queueing import submit_scans

    store.put(scan_key(instance.sop_uid), data, "application/dicom")
    submitted = submit_scans(
        sessions,
        app,
        [
            NewScan(
                instance.sop_uid,
                scan_key(instance.sop_uid),
                priority=Priority.ROUTINE,
                study_uid=instance.study_uid,
                series_uid=instance.series_uid,
                sop_instance_uid=instance.sop_uid,
            )
        ],
        batch_id=result.batch_id,
        batch_name=batch_name,
        force=force,
    )
    result.queued += submitted.queued
    result.already += submitted.already


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
    deadline_s: float = DEFAULT_DEADLINE_S,
    max_pages: int = DEFAULT_MAX_PAGES,
    page_size: int = PAGE,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    session: Any = None,
) -> PullResult:
    """Find instances by QIDO-RS, retrieve the new ones by WADO-RS, store and queue each; PullError ends it in one line."""
    http = _Http(session or session_for(settings), base_url(source), time.monotonic() + deadline_s)
    result = PullResult(batch_id=pull_batch_id(source, filters, batch_name))
    found = _search_within_deadline(http, filters, page_size=page_size, max_pages=max_pages, deadline_s=deadline_s)
    result.found, result.refused = len(found.instances), found.refused
    if on_total:
        on_total(len(found.instances))
    rows = _rows(sessions, [i.sop_uid for i in found.instances])
    todo = _instances_to_retrieve(found, rows, result, force=force)
    if on_progress and result.already:
        on_progress(len(result.already))
    unreachable = 0
    for instance in todo:
        row = rows.get(instance.sop_uid)
        try:
            data = retrieve_instance(http, instance, settings.dicomweb_max_part_bytes)
        except _DeadlineReached:
            raise PullError(
                f"stopped at the --deadline of {deadline_s:g} s while retrieving from {http.base} (the server stalled or "
                f"trickled): {len(result.queued)} of {len(todo)} new instances stored and queued; run the same command "
                "again to retrieve the rest"
            ) from None
        except _OwnResult:
            result.skipped += 1
        except InstanceError as exc:
            result.failed += 1
            unreachable = unreachable + 1 if exc.unreachable else 0
            _record_failure(sessions, instance, str(exc), batch_id=result.batch_id, batch_name=batch_name, row=row)
            log.warning("an instance could not be retrieved: %s", exc)
            if unreachable >= MAX_UNREACHABLE_IN_A_ROW:
                raise PullError(
                    f"{http.base} stopped answering ({exc}) after {len(result.queued)} instances were stored and queued; "
                    "run the same command again to retrieve the rest"
                ) from None
        else:
            unreachable = 0
            _store_and_queue(
                instance,
                data,
                result,
                store=store,
                sessions=sessions,
                app=app,
                batch_name=batch_name,
                force=force or row is not None,
            )
        if on_progress:
            on_progress(1)
    return result
