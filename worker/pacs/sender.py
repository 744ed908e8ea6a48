"""`lungcam dicom-send`: send each done DICOM scan's results to the PACS as an SR and a Secondary Capture.

A loop of its own rather than a step of the consumer: the GPU workers stay unaware of PACS
destinations, a PACS that is down never holds up classification (results wait in SQL and are retried
with backoff), sending is CPU-light work that one small process does for all workers, and a new
destination or a re-send needs no re-classification. The state of every (scan, model, version,
destination) is a `result_sends` row: `sent`, `retry` (with the next attempt time) or `failed` (after
LUNGCAM_DICOM_SEND_MAX_ATTEMPTS). A re-classified scan (newer prediction than the send) is sent again,
under the same derived UIDs, so the PACS replaces rather than duplicates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydicom.dataset import Dataset
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Status
from shared.errors import LungcamError, SettingsError
from shared.models import SEND_FAILED, SEND_PENDING, SEND_RETRY, SEND_SENT, Prediction, ResultSend, Scan, utcnow
from shared.settings import Settings
from shared.store import ObjectStore

log = logging.getLogger("lungcam.dicom-send")

MAX_BACKOFF_S = 3600.0
BATCH = 50


class SendError(LungcamError):
    """The destination refused or did not take an instance."""


class Transport(Protocol):
    """Sends DICOM instances to one destination."""

    label: str

    def send(self, datasets: list[Dataset]) -> None:
        """Send all datasets or raise."""
        ...


@dataclass
class StowTransport:
    """DICOMweb STOW-RS (POST {base}/studies)."""

    client: Any
    label: str

    def send(self, datasets: list[Dataset]) -> None:
        response = self.client.store_instances(datasets)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise SendError(f"STOW-RS refused {len(failed)} instance(s): failure reason {', '.join(reasons)}")


@dataclass
class CStoreTransport:
    """DIMSE C-STORE to AET@host:port, one association per send."""

    called_ae: str
    host: str
    port: int
    calling_ae: str
    label: str

    def send(self, datasets: list[Dataset]) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise SendError(f"C-STORE association to {self.label} was not accepted")
        try:
            for dataset in datasets:
                self._check_stored(assoc.send_c_store(dataset))
        finally:
            assoc.release()

    def _check_stored(self, status: Dataset | None) -> None:
        """Raise SendError unless the C-STORE status says stored: success, or a warning (0x0001, 0xBxxx)."""
        from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

        if status is None or "Status" not in status:
            # pynetdicom answers an empty data set when the association aborted or the reply timed out.
            raise SendError(f"C-STORE to {self.label}: no answer (association aborted or timed out)")
        code = int(status.Status)
        if code_to_category(code) not in (STATUS_SUCCESS, STATUS_WARNING):
            raise SendError(f"C-STORE to {self.label} answered 0x{code:04X}")


def transport_for(settings: Settings) -> Transport:
    """The transport of LUNGCAM_DICOM_DESTINATION: dicomweb+http(s)://... or dicom://AET@host:port."""
    destination = settings.dicom_destination.strip()
    if not destination:
        raise SettingsError(
            "LUNGCAM_DICOM_DESTINATION is unset: set dicomweb+http(s)://host/path or dicom://AET@host:port"
        )
    if destination.startswith("dicomweb+"):
        from worker.pacs.dicomweb import base_url, client_for

        parts = urlsplit(base_url(destination))
        # The label is what result_sends rows record: no credentials, no query.
        label = f"dicomweb+{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
        return StowTransport(client_for(destination, settings), label)
    if destination.startswith("dicom://"):
        parts = urlsplit(destination)
        if not (parts.username and parts.hostname and parts.port):
            raise SettingsError("LUNGCAM_DICOM_DESTINATION: a C-STORE destination is dicom://AET@host:port")
        label = f"dicom://{parts.username}@{parts.hostname}:{parts.port}"
        return CStoreTransport(parts.username, parts.hostname, parts.port, settings.dicom_calling_ae_title, label)
    raise SettingsError("LUNGCAM_DICOM_DESTINATION must start with dicomweb+http://, dicomweb+https:// or dicom://")


def backoff_s(settings: Settings, attempts: int) -> float:
    """Delay before attempt number attempts+1: random ("full jitter") up to the base doubled per failed attempt, at most an hour.

    The jitter spreads the retries of many results that failed together (a destination that was down).
    """
    from celery.utils.time import get_exponential_backoff_interval

    # Celery's helper counts whole units: milliseconds keep sub-second bases and steps.
    delay_ms = get_exponential_backoff_interval(
        round(settings.dicom_send_backoff_s * 1000), max(attempts - 1, 0), round(MAX_BACKOFF_S * 1000), full_jitter=True
    )
    return float(delay_ms) / 1000


def backoff_bound_s(settings: Settings, attempts: int) -> float:
    """The longest backoff_s can be after that many failed attempts."""
    return min(settings.dicom_send_backoff_s * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF_S)


@dataclass
class SendCounts:
    """What one pass did."""

    sent: int = 0
    retry: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return self.sent + self.retry + self.failed


def _ref(scan_id: str) -> str:
    return hashlib.sha256(scan_id.encode()).hexdigest()[:10]


class Sender:
    """Finds results due for sending, builds the DICOM objects and sends them to one destination."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ObjectStore,
        transport: Transport,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
    ):
        """Send to transport; clock (UTC, timezone-aware) decides what is due and when a retry is."""
        from shared.sources import SourceFetcher

        self.clock = clock
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.transport = transport
        self.fetcher = SourceFetcher(store, settings)

    def due(self, session: Session, limit: int = BATCH) -> list[tuple[Scan, Prediction, ResultSend | None]]:
        """Done DICOM scans' predictions never sent here, due for a retry, or re-classified since sent."""
        now = self.clock()
        send = ResultSend
        statement = (
            select(Scan, Prediction, send)
            .join(Prediction, Prediction.scan_id == Scan.scan_id)
            .outerjoin(
                send,
                and_(
                    send.scan_id == Scan.scan_id,
                    send.model_name == Prediction.model_name,
                    send.model_version == Prediction.model_version,
                    send.destination == self.transport.label,
                ),
            )
            .where(
                Scan.status == Status.DONE,  # skipped and failed scans send nothing
                Scan.sop_instance_uid.is_not(None),  # PNG/JPEG and uploads have no DICOM context
                or_(
                    send.id.is_(None),
                    and_(
                        send.state.in_((SEND_PENDING, SEND_RETRY)),
                        or_(send.next_attempt_at.is_(None), send.next_attempt_at <= now),
                    ),
                    and_(send.state.in_((SEND_SENT, SEND_FAILED)), Prediction.created_at > send.updated_at),
                ),
            )
            .order_by(Scan.finished_at, Scan.scan_id, Prediction.model_name)
            .limit(limit)
        )
        return [tuple(row) for row in session.execute(statement).all()]  # type: ignore[misc]

    def build(self, scan: Scan, prediction: Prediction) -> list[Dataset]:
        """The SR (and, with an overlay, the Secondary Capture) of one prediction."""
        from worker.pacs.objects import build_results, build_sr, overlay_pixels, read_source

        source = read_source(self.fetcher.fetch(scan.source_uri))
        if str(source.get("SOPInstanceUID", "")) != scan.sop_instance_uid:
            raise SendError("the stored instance's SOP Instance UID differs from the scan's")
        # Patient and study attributes come from this stored original; it must be the instance that was received.
        if scan.study_uid and str(source.get("StudyInstanceUID", "")) != scan.study_uid:
            raise SendError("the stored instance's Study Instance UID differs from the one received")
        prefix = self.settings.dicom_uid_prefix
        if not prediction.overlay_key:
            return [
                build_sr(
                    source,
                    model=prediction.model_name,
                    version=prediction.model_version,
                    label=prediction.label,
                    p_covid=prediction.p_covid,
                    uid_prefix=prefix,
                )
            ]
        overlay = overlay_pixels(self.store.get(prediction.overlay_key))
        objects = build_results(
            source,
            overlay,
            model=prediction.model_name,
            version=prediction.model_version,
            label=prediction.label,
            p_covid=prediction.p_covid,
            uid_prefix=prefix,
        )
        return [objects.sr, objects.sc]

    def run_once(self, limit: int = BATCH) -> SendCounts:
        """Send what is due (at most limit results); one result_sends update per result."""
        counts = SendCounts()
        with self.sessions() as session:
            work = self.due(session, limit)
            session.expunge_all()
        for scan, prediction, row in work:
            attempts = (row.attempts if row and row.state in (SEND_PENDING, SEND_RETRY) else 0) + 1
            values: dict[str, Any] = {"attempts": attempts, "updated_at": self.clock()}
            try:
                datasets = self.build(scan, prediction)
                self.transport.send(datasets)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
                reason = f"{type(exc).__name__}: {exc}"[:500]
                final = attempts >= self.settings.dicom_send_max_attempts
                values.update(
                    state=SEND_FAILED if final else SEND_RETRY,
                    last_error=reason,
                    next_attempt_at=None
                    if final
                    else self.clock() + dt.timedelta(seconds=backoff_s(self.settings, attempts)),
                )
                counts.failed += final
                counts.retry += not final
                counts.errors.append(type(exc).__name__)
                log.warning(
                    "scan %s, %s %s: send attempt %d failed (%s)%s",
                    _ref(scan.scan_id),
                    prediction.model_name,
                    prediction.model_version,
                    attempts,
                    type(exc).__name__,
                    "; giving up" if final else "",
                )
            else:
                values.update(
                    state=SEND_SENT,
                    last_error=None,
                    next_attempt_at=None,
                    sent_at=self.clock(),
                    sr_uid=str(datasets[0].SOPInstanceUID),
                    sc_uid=str(datasets[1].SOPInstanceUID) if len(datasets) > 1 else None,
                )
                counts.sent += 1
                log.info(
                    "scan %s, %s %s: sent to %s",
                    _ref(scan.scan_id),
                    prediction.model_name,
                    prediction.model_version,
                    self.transport.label,
                )
            self._record(scan.scan_id, prediction, values)
        return counts

    def _record(self, scan_id: str, prediction: Prediction, values: dict[str, Any]) -> None:
        # One dicom-send per destination (docs/pacs.md), so select-then-write does not race.
        with self.sessions.begin() as session:
            row = session.scalar(
                select(ResultSend).where(
                    ResultSend.scan_id == scan_id,
                    ResultSend.model_name == prediction.model_name,
                    ResultSend.model_version == prediction.model_version,
                    ResultSend.destination == self.transport.label,
                )
            )
            if row is None:
                row = ResultSend(
                    scan_id=scan_id,
                    model_name=prediction.model_name,
                    model_version=prediction.model_version,
                    destination=self.transport.label,
                )
                session.add(row)
            for key, value in values.items():
                setattr(row, key, value)

    def run_forever(self, stop: threading.Event) -> None:
        """Pass after pass until stop is set; waits LUNGCAM_DICOM_SEND_INTERVAL_S when nothing was due."""
        while not stop.is_set():
            try:
                counts = self.run_once()
            except Exception as exc:  # noqa: BLE001 - a database outage: keep the loop, try again later
                log.warning(
                    "pass failed (%s); retrying in %.0f s", type(exc).__name__, self.settings.dicom_send_interval_s
                )
                counts = SendCounts()
            if counts.handled == 0:
                stop.wait(self.settings.dicom_send_interval_s)


def run_sender(once: bool = False) -> int:
    """`lungcam dicom-send [--once]`."""
    import signal

    from worker.runtime import open_services

    services = open_services(with_app=False)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    transport = transport_for(services.settings)
    sender = Sender(services.settings, services.sessions, services.store, transport)
    try:
        if once:
            total = SendCounts()
            while True:
                counts = sender.run_once()
                total.sent, total.retry, total.failed = (
                    total.sent + counts.sent,
                    total.retry + counts.retry,
                    total.failed + counts.failed,
                )
                if counts.handled == 0 or counts.sent == 0:
                    break
            print(f"dicom-send: {total.sent} sent, {total.retry} to retry, {total.failed} failed ({transport.label})")
            return 0 if total.retry + total.failed == 0 else 1
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        log.info("sending results to %s every %.0f s", transport.label, services.settings.dicom_send_interval_s)
        try:
            sender.run_forever(stop)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        services.close()
