"""`lungcam dicom-listen`: a C-STORE SCP (with C-ECHO) that stores, records and queues each received image.

A C-STORE is answered with success only after the instance passed the header checks the worker's
decoder applies (declared size, pixel data present and as long as declared, photometric, a decoder
for its transfer syntax), is in the store and its `scans` row is committed; what fails the checks
gets 0xC210, and when the store, the database or the broker cannot be reached the answer is 0xA700
(out of resources), so the sender keeps the image and retries. Non-image SOP classes are refused
(0x0122), instances without usable UIDs cannot be understood (0xC000). The received bytes are never
decoded here: a deflated data set is read through the shared bounded inflater.

The network side is bounded (docs/pacs.md): a PDU cap, a cap on bytes before an association is
accepted, an idle timeout per connection, a limit on concurrent associations and optional allow-lists
of calling AE titles and peer addresses. Nothing here logs patient data: log lines carry SOP class
names, AE titles, statuses and a short hash of the scan id, never header values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

from celery import Celery
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Priority, Status
from shared.imaging.dicom import decodable_transfer_syntaxes
from shared.imaging.formats import check_image_header, probe
from shared.imaging.limits import ImageDecodeError
from shared.models import Scan, utcnow
from shared.scans import NewScan
from shared.settings import Settings
from shared.store import ObjectStore, scan_key

log = logging.getLogger("lungcam.dicom-listen")

# The C-STORE statuses the listener answers. pynetdicom names status codes only in its tables
# (pynetdicom.status.GENERAL_STATUS and STORAGE_SERVICE_CLASS_STATUS: code -> category and meaning), not
# as constants, so each is one constant here; the comment is pynetdicom's meaning, then lungcam's use.
SUCCESS = 0x0000  # Success
SOP_CLASS_NOT_SUPPORTED = 0x0122  # "Refused: SOP Class Not Supported": not an image lungcam classifies
OUT_OF_RESOURCES = 0xA700  # "Refused: Out of Resources": store, database or broker down; the sender retries
CANNOT_UNDERSTAND = 0xC000  # "Cannot Understand": no usable SOP Instance / Study / Series UID
CANNOT_DECODE = 0xC210  # "Cannot Understand" (0xCxxx): the data set does not parse or fails the header checks
# An A-ASSOCIATE-RQ with every storage SOP class and a dozen transfer syntaxes each is ~40 KB: a
# peer may send at most this much before its association is accepted.
MAX_BYTES_BEFORE_ACCEPTANCE = 256 * 1024
# The Manufacturer of the SR and Secondary Capture lungcam sends (worker.pacs.objects.MANUFACTURER).
OWN_MANUFACTURER = "lungcam"

# What lungcam classifies: chest radiographs (CR, DX for presentation and for processing) and
# Secondary Capture (digitised films). Every other storage SOP class is accepted at negotiation so
# the sender gets a clear C-STORE refusal status rather than a missing presentation context.
IMAGE_SOP_CLASSES: dict[str, str] = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX for presentation",
    DigitalXRayImageStorageForProcessing: "DX for processing",
    SecondaryCaptureImageStorage: "Secondary Capture",
}


def scan_id_for_instance(sop_instance_uid: str) -> str:
    """The scan id of a DICOM instance: its SOP Instance UID (digits and dots, at most 64 characters)."""
    return sop_instance_uid


def log_ref(scan_id: str) -> str:
    """A short, non-reversible reference to a scan for log lines (UIDs can be linked to a patient)."""
    return hashlib.sha256(scan_id.encode()).hexdigest()[:10]


def day_batch_id(now: dt.datetime | None = None) -> tuple[str, str]:
    """The batch a received instance joins: one per UTC day, so `lungcam results dicom-YYYYMMDD` lists a day."""
    now = now or utcnow()
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

    def priority_for(self, calling_ae: str, called_ae: str) -> Priority:
        """stat when the calling or called AE title is one of LUNGCAM_DICOM_STAT_AE_TITLES.

        With an allow-list (LUNGCAM_DICOM_ALLOWED_AETS) only a listed calling AE title can be stat:
        an unlisted caller never reaches here, and naming yourself LUNGCAM_STAT is no shortcut.
        """
        stat_titles = set(self.settings.stat_ae_title_list())
        allowed = self.settings.allowed_aet_list()
        if allowed and calling_ae.strip() not in allowed:
            return Priority.ROUTINE
        return (
            Priority.STAT
            if (calling_ae.strip() in stat_titles or called_ae.strip() in stat_titles)
            else Priority.ROUTINE
        )

    def receive(self, data: bytes, *, sop_uid: str, study_uid: str, series_uid: str, priority: Priority) -> int:
        """Store, record and queue one instance; the DIMSE status to answer."""
        from shared.queueing import publish, submit_scans

        scan_id = scan_id_for_instance(sop_uid)
        ref = log_ref(scan_id)
        try:
            with self.sessions() as session:
                known = session.execute(
                    select(Scan.status, Scan.sop_instance_uid).where(Scan.scan_id == scan_id)
                ).first()
            status, received = known if known is not None else (None, None)
        except Exception as exc:  # noqa: BLE001 - any database failure is "out of resources" to the sender
            log.warning("scan %s: database unavailable (%s): answering 0xA700", ref, type(exc).__name__)
            return OUT_OF_RESOURCES
        if status is not None and received is not None:
            # A re-sent instance: already recorded. Re-publish only if it may never have been queued.
            if status == Status.QUEUED:
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
        scan = NewScan(
            scan_id,
            scan_key(scan_id),
            priority,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_instance_uid=sop_uid,
        )
        try:
            # Commits the row, then publishes: a publish failure leaves the row queued, and the
            # sender's retry (or `lungcam requeue`) re-publishes it.
            # force: a scan uploaded under this UID by other means is replaced by the instance received over DICOM.
            submit_scans(
                self.sessions, self.app, [scan], batch_id=batch_id, batch_name=batch_name, force=status is not None
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("scan %s: database or broker unavailable (%s): answering 0xA700", ref, type(exc).__name__)
            return OUT_OF_RESOURCES
        log.info("scan %s: stored and queued (%s)", ref, priority)
        return SUCCESS


def handle_store(event: Any, receiver: Receiver) -> int:
    """EVT_C_STORE handler: refuse non-images, check the header and UIDs, then store, record and queue."""
    context = event.context
    sop_class = str(context.abstract_syntax)
    calling = event.assoc.requestor.ae_title
    called = event.assoc.requestor.primitive.called_ae_title if event.assoc.requestor.primitive else ""
    if sop_class not in IMAGE_SOP_CLASSES:
        name = getattr(UID(sop_class), "name", sop_class)
        log.warning("refused a %s instance from %s (not an image lungcam classifies): 0x0122", name, calling)
        return SOP_CLASS_NOT_SUPPORTED
    kind = IMAGE_SOP_CLASSES[sop_class]
    try:
        # The instance as received: the data set's bytes, unchanged, behind a file meta header. It is
        # never decoded here (pynetdicom's event.dataset would inflate a deflated one whole).
        data = event.encoded_dataset(include_meta=True)
        probed = probe(data)  # the one header parse: UIDs below, the size guard after
        header = probed.dicom_header
        if header is None:
            raise ImageDecodeError("not a DICOM data set")
    except Exception as exc:  # noqa: BLE001 - a data set that does not parse
        log.warning("a %s instance from %s does not decode (%s): 0xC210", kind, calling, type(exc).__name__)
        return CANNOT_DECODE
    sop_uid = valid_uid(header.sop_instance_uid)
    study_uid = valid_uid(header.study_instance_uid)
    series_uid = valid_uid(header.series_instance_uid)
    if not (sop_uid and study_uid and series_uid) or len(sop_uid) > 64:
        log.warning("a %s instance from %s lacks a valid SOP Instance, Study or Series UID: 0xC000", kind, calling)
        return CANNOT_UNDERSTAND
    if (header.sop_class_uid or sop_class) != sop_class:
        log.warning("a %s instance from %s has a different SOP Class UID than its context: 0xC000", kind, calling)
        return CANNOT_UNDERSTAND
    if header.manufacturer == OWN_MANUFACTURER:
        # lungcam's own Grad-CAM Secondary Capture routed back by the PACS: acknowledged, never classified.
        log.info("ignored a lungcam result instance from %s", calling)
        return SUCCESS
    try:
        # The worker's decoder would refuse it: say so now, while the sender still has the image.
        check_image_header(data, verify_pixel_data=True, probed=probed)
    except ImageDecodeError as exc:
        # The reason names sizes and code strings only (ImageDecodeError never carries patient data).
        log.warning("a %s instance from %s cannot be classified (%s): 0xC210", kind, calling, exc)
        return CANNOT_DECODE
    priority = receiver.priority_for(calling, called)
    return receiver.receive(data, sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid, priority=priority)


def handle_echo(event: Any) -> int:
    """EVT_C_ECHO handler: always success (the listener is up)."""
    return SUCCESS


def make_ae(settings: Settings) -> Any:
    """The Application Entity: Verification plus every storage SOP class (non-images get 0x0122), with its limits.

    Each storage class is offered with exactly the transfer syntaxes the shared decoder reads, so
    what is accepted can be classified.
    """
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom creates SOP classes at import

    ae = AE(ae_title=settings.dicom_ae_title)
    # Calls to the stat AE titles reach this same listener: any called AE title is accepted, and
    # the title decides the priority (docs/pacs.md).
    ae.require_called_aet = False
    # pynetdicom rejects other calling AE titles itself (A-ASSOCIATE-RJ, "calling AE title not recognised").
    ae.require_calling_aet = settings.allowed_aet_list()
    ae.add_supported_context(Verification)
    syntaxes = decodable_transfer_syntaxes()
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None  # set on every predefined context
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.maximum_pdu_size = settings.dicom_max_pdu_bytes
    ae.maximum_associations = settings.dicom_max_associations
    # acse_timeout is the ARTIM timer: how long a connection may wait to send its A-ASSOCIATE-RQ
    # (idle connections used to hold association slots for 30 s); network_timeout closes an
    # established association that goes silent.
    ae.acse_timeout = settings.dicom_idle_timeout_s
    ae.network_timeout = settings.dicom_idle_timeout_s
    ae.dimse_timeout = max(settings.dicom_idle_timeout_s, 30.0)
    return ae


def _guarded_socket_class() -> type:
    """pynetdicom's AssociationSocket with a cap on what one PDU (and the bytes before acceptance) may announce.

    pynetdicom reads a PDU by allocating whatever length its header announces: a peer announcing a
    4 GB PDU and streaming zeros would grow the process by a gigabyte every few seconds. This one
    drops the connection instead, before reading the body.
    """
    from pynetdicom.transport import AssociationSocket

    class GuardedSocket(AssociationSocket):
        pre_acceptance_bytes = 0
        dropped = False

        def recv(self, nr_bytes: int) -> bytearray:
            """Read nr_bytes, or drop the connection if they exceed what this association may send."""
            assoc = self.assoc
            if assoc.is_established:
                # The peer must keep P-DATA PDUs within the maximum length the listener announced
                # (plus the PDV item header and some slack for lenient senders).
                limit, what = (assoc.acceptor.maximum_length or 0) + 1024, "PDU"
                over = nr_bytes > limit
            else:
                self.pre_acceptance_bytes += nr_bytes
                limit, what = MAX_BYTES_BEFORE_ACCEPTANCE, "before acceptance"
                over = self.pre_acceptance_bytes > limit
            if over:
                if self.dropped:
                    return bytearray()
                self.dropped = True
                log.warning(
                    "dropped a connection from %s: %d bytes announced, over the %s limit of %d bytes",
                    _peer(self),
                    nr_bytes,
                    what,
                    limit,
                )
                self._drop()
                return bytearray()
            return super().recv(nr_bytes)

        def _drop(self) -> None:
            """Shut the connection now: pynetdicom then sees a closed transport (Evt17) and ends the association."""
            if self.socket is not None:
                try:
                    self.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return GuardedSocket


def _peer(assoc_socket: Any) -> str:
    """The peer address of an association socket, for log lines."""
    try:
        return str(assoc_socket.socket.getpeername()[0])
    except (OSError, AttributeError, TypeError):
        return "?"


def _server_class(settings: Settings) -> type:
    """pynetdicom's threaded server with the peer allow-list, guarded sockets and socket-level idle timeouts."""
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    networks = settings.allowed_peer_networks()
    guarded = _guarded_socket_class()
    idle = settings.dicom_idle_timeout_s

    class GuardedRequestHandler(RequestHandler):
        def _create_association(self) -> Any:
            """pynetdicom's acceptor, on a socket that enforces the PDU caps and the idle timeout."""
            assoc = super()._create_association()
            # A recv blocked on a silent peer (a PDU header and then nothing) ends after the idle timeout.
            self.request.settimeout(idle)
            assoc.dul.socket.__class__ = guarded
            return assoc

    class GuardedServer(ThreadedAssociationServer):
        # socketserver's default backlog of 5 makes a burst of connections wait for SYN retries.
        request_queue_size = 64

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["request_handler"] = GuardedRequestHandler
            super().__init__(*args, **kwargs)

        def verify_request(self, request: Any, client_address: Any) -> bool:
            """Close connections from addresses outside LUNGCAM_DICOM_ALLOWED_PEERS at once."""
            if not networks:
                return True
            try:
                address = ipaddress.ip_address(client_address[0])
            except (ValueError, TypeError, IndexError):
                return False
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            if any(address in network for network in networks):
                return True
            log.warning("refused a connection from %s (not in LUNGCAM_DICOM_ALLOWED_PEERS)", address)
            return False

    return GuardedServer


def start_listener(receiver: Receiver, host: str, port: int) -> Any:
    """Start the SCP in background threads; returns the server (call .shutdown())."""
    from pynetdicom import _config, evt

    # pynetdicom's standard handlers log each DIMSE message (identifiers included) and can decode
    # received data sets: off, so nothing is decoded before the checks and no header value is logged.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = make_ae(receiver.settings)
    handlers = [(evt.EVT_C_STORE, handle_store, [receiver]), (evt.EVT_C_ECHO, handle_echo)]
    server = ae.make_server((host, port), evt_handlers=handlers, server_class=_server_class(receiver.settings))
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it from there
    thread = threading.Thread(target=server.serve_forever, name="dicom-listen", daemon=True)
    thread.start()
    return server


def run_listener(host: str, port: int | None = None) -> int:
    """`lungcam dicom-listen`: serve until SIGTERM or Ctrl-C."""
    from worker.runtime import open_services

    services = open_services()
    receiver = Receiver(services.settings, services.sessions, services.store, services.celery())
    port = port or services.settings.dicom_port
    # pynetdicom logs association details (and, at DEBUG, whole data sets): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    server = start_listener(receiver, host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = services.settings
    log.info(
        "listening as %s on %s:%d (stat AE titles: %s; calling AE titles: %s; peers: %s)",
        settings.dicom_ae_title,
        host,
        port,
        ",".join(settings.stat_ae_title_list()) or "none",
        ",".join(settings.allowed_aet_list()) or "any",
        settings.dicom_allowed_peers or "any",
    )
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        services.close()
    log.info("stopped")
    return 0
