"""`lungcam dicom-listen`: a C-STORE SCP (with C-ECHO) that stores, records and queues each received image.

A C-STORE is answered with success only after the instance is in the store and its `scans` row is
committed; when the store, the database or the broker cannot be reached it answers 0xA700 (out of
resources), so the sender keeps the image and retries. Non-image SOP classes are refused (0x0122),
instances without usable UIDs cannot be understood (0xC000). Nothing here logs patient data: log lines
carry SOP class names, AE titles, statuses and a short hash of the scan id, never header values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from celery import Celery
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import db
from shared.settings import Settings
from shared.store import ObjectStore, scan_key

log = logging.getLogger("lungcam.dicom-listen")

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122  # refused: not an image lungcam classifies
OUT_OF_RESOURCES = 0xA700  # store, database or broker unavailable: the sender keeps the image and retries
CANNOT_UNDERSTAND = 0xC000  # no usable SOP Instance / Study / Series UID
CANNOT_DECODE = 0xC210  # the data set does not parse
# The Manufacturer of the SR and Secondary Capture lungcam sends (worker.pacs.objects.MANUFACTURER).
OWN_MANUFACTURER = "lungcam"

# What lungcam classifies: chest radiographs (CR, DX for presentation and for processing) and
# Secondary Capture (digitised films). Every other storage SOP class is accepted at negotiation so
# the sender gets a clear C-STORE refusal status rather than a missing presentation context.
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}


def scan_id_for_instance(sop_instance_uid: str) -> str:
    """The scan id of a DICOM instance: its SOP Instance UID (digits and dots, at most 64 characters)."""
    return sop_instance_uid


def log_ref(scan_id: str) -> str:
    """A short, non-reversible reference to a scan for log lines (UIDs can be linked to a patient)."""
    return hashlib.sha256(scan_id.encode()).hexdigest()[:10]


def day_batch_id(now: dt.datetime | None = None) -> tuple[str, str]:
    """The batch a received instance joins: one per UTC day, so `lungcam results dicom-YYYYMMDD` lists a day."""
    now = now or db.utcnow()
    return f"dicom-{now:%Y%m%d}", f"received by DICOM on {now:%Y-%m-%d}"


def valid_uid(value: Any) -> str | None:
    """value as a string if it is a valid UID, else None."""
    text = str(value or "").strip()
    return text if text and UID(text).is_valid else None


@dataclass
class Receiver:
    """Records received instances: store first, then the `scans` row, then the queue message."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    app: Celery

    def priority_for(self, calling_ae: str, called_ae: str) -> str:
        """stat when the calling or called AE title is one of LUNGCAM_DICOM_STAT_AE_TITLES."""
        stat_titles = set(self.settings.stat_ae_title_list())
        return db.STAT if (calling_ae.strip() in stat_titles or called_ae.strip() in stat_titles) else db.ROUTINE

    def receive(self, data: bytes, *, sop_uid: str, study_uid: str, series_uid: str, priority: str) -> int:
        """Store, record and queue one instance; the DIMSE status to answer."""
        from shared.queueing import publish, submit_scans

        scan_id = scan_id_for_instance(sop_uid)
        ref = log_ref(scan_id)
        try:
            with self.sessions() as session:
                known = session.execute(
                    select(db.Scan.status, db.Scan.sop_instance_uid).where(db.Scan.scan_id == scan_id)
                ).first()
            status, received = known if known is not None else (None, None)
        except Exception as exc:  # noqa: BLE001 - any database failure is "out of resources" to the sender
            log.warning("scan %s: database unavailable (%s): answering 0xA700", ref, type(exc).__name__)
            return OUT_OF_RESOURCES
        if status is not None and received is not None:
            # A re-sent instance: already recorded. Re-publish only if it may never have been queued.
            if status == db.QUEUED:
                try:
                    publish(self.app, scan_id, priority)
                except Exception as exc:  # noqa: BLE001
                    log.warning("scan %s: broker unavailable (%s): answering 0xA700", ref, type(exc).__name__)
                    return OUT_OF_RESOURCES
            log.info("scan %s: already known (%s), not recorded again", ref, status)
            return SUCCESS
        try:
            self.store.put(scan_key(scan_id), data, "application/dicom")
        except Exception as exc:  # noqa: BLE001 - StoreError, OSError, botocore errors
            log.warning("scan %s: store unavailable (%s): answering 0xA700", ref, type(exc).__name__)
            return OUT_OF_RESOURCES
        batch_id, batch_name = day_batch_id()
        scan = {
            "scan_id": scan_id, "source_uri": scan_key(scan_id), "priority": priority,
            "study_uid": study_uid, "series_uid": series_uid, "sop_instance_uid": sop_uid,
        }
        try:
            # Commits the row, then publishes: a publish failure leaves the row queued, and the
            # sender's retry (or `lungcam requeue`) re-publishes it.
            # force: a scan uploaded under this UID by other means is replaced by the instance received over DICOM.
            submit_scans(self.sessions, self.app, [scan], batch_id=batch_id, batch_name=batch_name, force=status is not None)
        except Exception as exc:  # noqa: BLE001
            log.warning("scan %s: database or broker unavailable (%s): answering 0xA700", ref, type(exc).__name__)
            return OUT_OF_RESOURCES
        log.info("scan %s: stored and queued (%s)", ref, priority)
        return SUCCESS


def handle_store(event: Any, receiver: Receiver) -> int:
    """EVT_C_STORE handler: refuse non-images, check UIDs, then store, record and queue."""
    context = event.context
    sop_class = str(context.abstract_syntax)
    calling = event.assoc.requestor.ae_title
    called = event.assoc.requestor.primitive.called_ae_title if event.assoc.requestor.primitive else ""
    if sop_class not in IMAGE_SOP_CLASSES:
        name = getattr(UID(sop_class), "name", sop_class)
        log.warning("refused a %s instance from %s (not an image lungcam classifies): 0x0122", name, calling)
        return SOP_CLASS_NOT_SUPPORTED
    try:
        dataset = event.dataset
        sop_uid = valid_uid(dataset.get("SOPInstanceUID"))
        study_uid = valid_uid(dataset.get("StudyInstanceUID"))
        series_uid = valid_uid(dataset.get("SeriesInstanceUID"))
        # The instance as received: the data set's bytes, unchanged, behind a file meta header.
        data = event.encoded_dataset(include_meta=True)
    except Exception as exc:  # noqa: BLE001 - a data set that does not decode
        log.warning("a %s instance from %s does not decode (%s): 0xC210", IMAGE_SOP_CLASSES[sop_class], calling, type(exc).__name__)
        return CANNOT_DECODE
    if not (sop_uid and study_uid and series_uid) or len(sop_uid) > 64:
        log.warning("a %s instance from %s lacks a valid SOP Instance, Study or Series UID: 0xC000", IMAGE_SOP_CLASSES[sop_class], calling)
        return CANNOT_UNDERSTAND
    if str(dataset.get("SOPClassUID", sop_class)) != sop_class:
        log.warning("a %s instance from %s has a different SOP Class UID than its context: 0xC000", IMAGE_SOP_CLASSES[sop_class], calling)
        return CANNOT_UNDERSTAND
    if str(dataset.get("Manufacturer", "")) == OWN_MANUFACTURER:
        # lungcam's own Grad-CAM Secondary Capture routed back by the PACS: acknowledged, never classified.
        log.info("ignored a lungcam result instance from %s", calling)
        return SUCCESS
    priority = receiver.priority_for(calling, called)
    return receiver.receive(data, sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, priority=priority)


def handle_echo(event: Any) -> int:
    """EVT_C_ECHO handler: always success (the listener is up)."""
    return SUCCESS


def make_ae(settings: Settings) -> Any:
    """The Application Entity: Verification plus every storage SOP class (non-images get 0x0122)."""
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=settings.dicom_ae_title)
    # Calls to the stat AE titles reach this same listener: any called AE title is accepted, and
    # the title decides the priority (docs/pacs.md).
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    ae.maximum_associations = 16
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    return ae


def start_listener(receiver: Receiver, host: str, port: int) -> Any:
    """Start the SCP in background threads; returns the server (call .shutdown())."""
    from pynetdicom import evt

    ae = make_ae(receiver.settings)
    handlers = [(evt.EVT_C_STORE, handle_store, [receiver]), (evt.EVT_C_ECHO, handle_echo)]
    return ae.start_server((host, port), block=False, evt_handlers=handlers)


def run_listener(host: str, port: int | None = None) -> int:
    """`lungcam dicom-listen`: serve until SIGTERM or Ctrl-C."""
    from worker.pacs.services import open_services

    services = open_services()
    assert services.app is not None
    receiver = Receiver(services.settings, services.sessions, services.store, services.app)
    port = port or services.settings.dicom_port
    # pynetdicom logs association details (and, at DEBUG, whole data sets): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    server = start_listener(receiver, host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("listening as %s on %s:%d (stat AE titles: %s)", services.settings.dicom_ae_title, host, port,
             ",".join(services.settings.stat_ae_title_list()) or "none")
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        services.engine.dispose()
    log.info("stopped")
    return 0
