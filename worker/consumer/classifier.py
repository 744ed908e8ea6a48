"""The batch pipeline, in four stages that each return a typed value.

1. claim: in one transaction, pass over scans that are finished, unknown or leased elsewhere, and claim
   the rest under this worker's lease -> `ClaimedBatch` of `ClaimedScan`s (source, models still needed).
2. prepare: on the I/O threads, fetch each scan, apply the DICOM selection rule, decode once -> `Prepared`.
3. infer: one Grad-CAM pass per model over each window of batch_size scans, overlays rendered and
   stored -> `Inferred`.
4. record: predictions and final statuses in one SQL transaction (scan by scan if the database
   refuses it) -> `Recorded`.

`ScanClassifier.process` runs them under the claimed scans' leases and returns a `BatchOutcome` built
from the stages' values.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import ModelKey, Status
from shared.engine import make_engine, make_session_factory, require_current_schema
from shared.errors import LungcamError
from shared.imaging.dicom import selection_reason
from shared.imaging.formats import probe
from shared.imaging.inputs import decode_side
from shared.imaging.limits import ImageDecodeError
from shared.imaging.preprocess import DISPLAY_MAX_SIDE
from shared.models import Prediction, Scan, utcnow
from shared.overlay import OVERLAY_FORMATS, cam_note, encode_overlay
from shared.scans import PredictionRow, claim_scans, mark_scans, record_batch_models, upsert_predictions
from shared.settings import Settings
from shared.sources import NOT_READABLE, SourceFetcher, SourceNotAllowed
from shared.store import ObjectNotFound, ObjectStore, StoreError, overlay_key
from worker.consumer.budget import PixelBudget
from worker.consumer.decoding import DecodePool, decode_processes
from worker.consumer.leases import LeaseKeeper
from worker.consumer.served import ServedModel, load_served_models, require_models_configured
from worker.consumer.transient import describe, is_transient

log = logging.getLogger(__name__)

# An overlay being stored, by (scan id, model): two versions of one model name are two overlays.
OverlayUploads = dict[tuple[str, ModelKey], Future[None]]


class NotSelected(Exception):
    """A valid image that its DICOM header says is not a frontal chest radiograph (it ends `skipped`)."""


# --- the stages' values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedScan:
    """A scan claimed under this worker's lease: where its image is and which served models it still needs."""

    scan_id: str
    source_uri: str
    # Every served model, or (screened before with some of them) only those it has no result from.
    needed: frozenset[ModelKey]


@dataclass(frozen=True)
class ClaimedBatch:
    """What the claim stage took: the scans leased to this worker now, and the ids it passed over."""

    scans: tuple[ClaimedScan, ...]
    passed_over: tuple[str, ...]  # finished, leased elsewhere or unknown: nothing is written for them

    @property
    def scan_ids(self) -> list[str]:
        """The claimed scans' ids."""
        return [scan.scan_id for scan in self.scans]


@dataclass
class _Decoded:
    inputs: dict[str, np.ndarray]  # input key (preprocessing and size) -> preprocessed float32 image
    display: np.ndarray  # uint8 image (grey or RGB), longest side <= DISPLAY_MAX_SIDE, for the overlay


@dataclass(frozen=True)
class PreparedScan:
    """A claimed scan decoded for the models: their inputs and the display image its overlays are drawn on."""

    claimed: ClaimedScan
    images: _Decoded

    @property
    def scan_id(self) -> str:
        """The scan's id."""
        return self.claimed.scan_id


@dataclass(frozen=True)
class Prepared:
    """What the prepare stage made of the claimed scans."""

    scans: tuple[PreparedScan, ...]  # ready for the models
    not_selected: dict[str, str]  # scan id -> why its header says it is not a frontal chest film
    failed: dict[str, str]  # scan id -> patient-free reason it cannot be classified
    retry: dict[str, str]  # scan id -> the outage that stopped it


@dataclass(frozen=True)
class Inferred:
    """What the infer stage made of the prepared scans."""

    done: tuple[str, ...]  # every needed model ran and every overlay is stored
    rows: tuple[PredictionRow, ...]  # the prediction rows of the done scans
    failed: dict[str, str]
    retry: dict[str, str]


@dataclass(frozen=True)
class Recorded:
    """What the record stage wrote, and what it could not write for an outage (retry)."""

    done: tuple[str, ...]
    failed: dict[str, str]
    not_selected: dict[str, str]
    retry: dict[str, str]


@dataclass(frozen=True)
class BatchOutcome:
    """What one `ScanClassifier.process` call did with each scan id it was given.

    `not_selected` scans end with status skipped (Status.SKIPPED); `passed_over` ones were not touched at all.
    """

    done: tuple[str, ...] = ()  # recorded done
    not_selected: dict[str, str] = field(default_factory=dict)  # recorded skipped: why not a frontal chest film
    failed: dict[str, str] = field(default_factory=dict)  # recorded failed, with this patient-free reason
    retry: dict[str, str] = field(default_factory=dict)  # not recorded: a transient reason, to be re-published
    passed_over: tuple[str, ...] = ()  # not claimed: finished, leased elsewhere, or an unknown id
    claimed: tuple[str, ...] = ()  # held under this worker's lease during the call


def _unprepared(exc: Exception) -> tuple[str, bool]:
    """The patient-free reason a scan could not be prepared, and whether it is worth a retry (an outage)."""
    if isinstance(exc, ImageDecodeError):
        return f"undecodable image: {exc}", False
    if isinstance(exc, (ObjectNotFound, SourceNotAllowed)):
        return NOT_READABLE, False
    if isinstance(exc, StoreError) and not exc.transient:
        # Denied, or no such bucket: worded like a missing key, so errors reveal nothing of the store.
        return NOT_READABLE, False
    if is_transient(exc):
        return f"store unavailable: {describe(exc)}", True
    log.warning("could not prepare a scan: %s", type(exc).__name__, exc_info=not isinstance(exc, LungcamError))
    return f"could not prepare image: {describe(exc)}", False


def _database_unavailable(exc: Exception) -> str:
    """The retry reason for a database outage (the type only: its message carries the statement's scan ids)."""
    return f"database unavailable: {type(exc).__name__}"


class ScanClassifier:
    """Classifies batches of scan ids end to end; safe to call from several threads at once."""

    def __init__(
        self,
        models: list[ServedModel],
        store: ObjectStore,
        sessions: sessionmaker[Session],
        settings: Settings,
        leases: LeaseKeeper | None = None,
        decoder: DecodePool | None = None,
    ) -> None:
        """Serve models; read scans from store; record through sessions; decode in decoder (default: in-thread)."""
        self.models = models
        self.store = store
        self.sessions = sessions
        self.settings = settings
        self.leases = leases or LeaseKeeper(sessions, settings.lease_s)
        self.fetcher = SourceFetcher(store, settings)
        self.executor = ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix="lungcam-io")
        # One model pass at a time: with two batches in flight, one runs on the device while the
        # other is fetched, decoded, rendered and written by the I/O threads.
        self._model_lock = threading.Lock()
        # One preprocessed input per distinct (preprocessing, size) among the served bundles.
        self._input_specs = tuple(
            {m.input_key: (m.input_key, m.bundle.preprocessing, m.bundle.input_size) for m in models}.values()
        )
        # Decode once to the largest size anything needs: the display image or the biggest model input.
        self._decode_side = decode_side(size for _key, _spec, size in self._input_specs)
        self.budget = PixelBudget(settings.decode_pixel_budget)
        self.decoder = decoder if decoder is not None else DecodePool(decode_processes(settings, pinned_gpu=None))
        self._overlay_extension = OVERLAY_FORMATS[settings.overlay_format].file_extension.lstrip(".")

    def close(self) -> None:
        """Stop the I/O threads, the decode processes and the lease heartbeat."""
        self.executor.shutdown(wait=True)
        self.decoder.close()
        self.leases.stop()

    def process(self, scan_ids: list[str], *, force: Collection[str] = frozenset()) -> BatchOutcome:
        """Classify scans; returns what was done, what failed for good and what should be retried."""
        ids = list(dict.fromkeys(scan_ids))
        try:
            batch = self.claim(ids, force)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return BatchOutcome(retry=dict.fromkeys(ids, _database_unavailable(exc)))
        if not batch.scans:
            return BatchOutcome(passed_over=batch.passed_over)
        claimed = batch.scan_ids
        self.leases.hold(claimed)
        try:
            prepared = self.prepare(batch.scans)
            inferred = self.infer(prepared.scans)
            recorded = self.record(
                inferred.rows, inferred.done, {**prepared.failed, **inferred.failed}, prepared.not_selected
            )
        finally:
            self.leases.release(claimed)
        return BatchOutcome(
            done=recorded.done,
            not_selected=recorded.not_selected,
            failed=recorded.failed,
            retry={**prepared.retry, **inferred.retry, **recorded.retry},
            passed_over=batch.passed_over,
            claimed=tuple(claimed),
        )

    # --- claim ------------------------------------------------------------------------------------

    def claim(self, scan_ids: list[str], force: Collection[str] = frozenset()) -> ClaimedBatch:
        """Load the scans, pass over finished or leased ones, and claim the rest under a lease (one transaction)."""
        with self.sessions.begin() as session:
            scans = {s.scan_id: s for s in session.scalars(select(Scan).where(Scan.scan_id.in_(scan_ids)))}
            candidates, complete, passed_over = self._sort_for_claim(
                scan_ids, scans, self._results_by_scan(session, scan_ids), force
            )
            claimed = claim_scans(
                session, list(candidates), self.leases.worker_id, self.settings.lease_s, take_over=force
            )
            # Another worker claimed some of them since they were read: theirs now.
            mine = set(claimed)
            passed_over.extend(scan_id for scan_id in candidates if scan_id not in mine)
            mark_scans(session, complete, Status.DONE, finished=True)
            # Which model versions each batch was screened with: what results and reports show by default.
            batches = {batch for scan_id in [*claimed, *complete] if (batch := scans[scan_id].batch_id)}
            record_batch_models(session, batches, [(m.key.name, m.key.version, m.demonstration) for m in self.models])
        return ClaimedBatch(tuple(candidates[scan_id] for scan_id in claimed), tuple(passed_over))

    @staticmethod
    def _results_by_scan(session: Session, scan_ids: list[str]) -> dict[str, set[ModelKey]]:
        """The models each scan already has a prediction from."""
        have: dict[str, set[ModelKey]] = {}
        for scan_id, name, version in session.execute(
            select(Prediction.scan_id, Prediction.model_name, Prediction.model_version).where(
                Prediction.scan_id.in_(scan_ids)
            )
        ):
            have.setdefault(scan_id, set()).add(ModelKey(name, version))
        return have

    def _sort_for_claim(
        self,
        scan_ids: list[str],
        scans: dict[str, Scan],
        have: dict[str, set[ModelKey]],
        force: Collection[str],
    ) -> tuple[dict[str, ClaimedScan], list[str], list[str]]:
        """(scans to claim with the models each needs, queued scans already complete, ids passed over)."""
        expected = frozenset(model.key for model in self.models)
        now = utcnow()
        candidates: dict[str, ClaimedScan] = {}
        complete: list[str] = []
        passed_over: list[str] = []
        for scan_id in scan_ids:
            scan = scans.get(scan_id)
            missing = expected - have.get(scan_id, set())
            if scan is None:
                passed_over.append(scan_id)
            elif scan_id in force:
                candidates[scan_id] = ClaimedScan(scan_id, scan.source_uri, expected)
            elif scan.status == Status.SKIPPED:
                # Not a frontal chest film: a redelivered message changes nothing.
                passed_over.append(scan_id)
            elif expected and not missing and scan.status in (Status.DONE, Status.QUEUED):
                # Finished work redelivered, or re-screened with models it already has: nothing to run.
                passed_over.append(scan_id)
                if scan.status == Status.QUEUED:
                    complete.append(scan_id)
            elif self._leased_elsewhere(scan, now):
                # A duplicate message (restored or re-published) while a live worker still works on it.
                passed_over.append(scan_id)
            else:
                # With results from some of the served models already, it needs only the others.
                candidates[scan_id] = ClaimedScan(scan_id, scan.source_uri, missing)
        unknown = sum(1 for scan_id in scan_ids if scan_id not in scans)
        if unknown:
            log.warning("%d messages for unknown scan ids ignored", unknown)
        return candidates, complete, passed_over

    def _leased_elsewhere(self, scan: Scan, now: dt.datetime) -> bool:
        """Whether a live lease on scan belongs to another worker or to another batch of this one."""
        if scan.status != Status.RUNNING or scan.lease_expires_at is None or scan.lease_expires_at <= now:
            return False
        return scan.worker_id != self.leases.worker_id or self.leases.holds(scan.scan_id)

    # --- prepare ----------------------------------------------------------------------------------

    def prepare(self, scans: Sequence[ClaimedScan]) -> Prepared:
        """Fetch, select and decode the claimed scans on the I/O threads; sort out those that cannot go on."""
        pending = [(scan, self.executor.submit(self._fetch_and_decode, scan.source_uri)) for scan in scans]
        ready: list[PreparedScan] = []
        not_selected: dict[str, str] = {}
        failed: dict[str, str] = {}
        retry: dict[str, str] = {}
        for scan, future in pending:
            try:
                ready.append(PreparedScan(scan, future.result()))
            except NotSelected as exc:
                not_selected[scan.scan_id] = str(exc)
            except Exception as exc:  # noqa: BLE001 - sorted into retry or failed
                reason, transient = _unprepared(exc)
                (retry if transient else failed)[scan.scan_id] = reason
        return Prepared(tuple(ready), not_selected, failed, retry)

    def _fetch_and_decode(self, source_uri: str) -> _Decoded:
        """Fetch, read the header once (selection, size guard), decode once at reduced size under the pixel budget."""
        data = self.fetcher.fetch(source_uri)
        settings = self.settings
        # The one header parse of this scan: the selection rule, the size guard and the decoder all use it.
        probed = probe(data)
        reason = selection_reason(
            probed.dicom_header,
            modalities=settings.classify_modality_list(),
            body_parts=settings.classify_body_part_list(),
            lateral_views=settings.lateral_view_list(),
        )
        if reason:
            raise NotSelected(reason)
        # The shared size guard: a header declaring more than the limits (a deflate bomb) fails here,
        # before a pixel is inflated or decoded.
        with self.budget.admit(probed.check()):
            inputs, display = self.decoder.decode(data, self._decode_side, self._input_specs, probed=probed)
        return _Decoded(inputs, display)

    # --- infer ------------------------------------------------------------------------------------

    def infer(self, scans: Sequence[PreparedScan]) -> Inferred:
        """One Grad-CAM pass per model over the prepared scans, each scan's overlays rendered and stored."""
        try:
            rows, uploads = self._run_models(scans)
        except Exception as exc:
            log.exception("model pass failed for %d scans", len(scans))
            lost = dict.fromkeys([scan.scan_id for scan in scans], f"model pass failed: {describe(exc)}")
            return Inferred((), (), {}, lost) if is_transient(exc) else Inferred((), (), lost, {})
        return self._await_overlays(scans, rows, uploads)

    def _run_models(self, scans: Sequence[PreparedScan]) -> tuple[list[PredictionRow], OverlayUploads]:
        """Run every model over each window of batch_size scans, on the scans of the window that need it."""
        rows: list[PredictionRow] = []
        uploads: OverlayUploads = {}
        size = self.settings.batch_size
        for start in range(0, len(scans), size):
            window = scans[start : start + size]
            for model in self.models:
                chunk = [scan for scan in window if model.key in scan.claimed.needed]
                if chunk:
                    rows.extend(self._run_model(model, chunk, uploads))
        return rows, uploads

    def _run_model(self, model: ServedModel, chunk: list[PreparedScan], uploads: OverlayUploads) -> list[PredictionRow]:
        """One Grad-CAM pass of model over chunk: its prediction rows; its overlays are added to uploads."""
        batch = np.stack([scan.images.inputs[model.input_key] for scan in chunk])
        with self._model_lock:
            started = time.perf_counter()
            probabilities, cams = model.gradcam(batch)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
        # The bundle's operating point decides: calibrated p_covid against its threshold (and band),
        # not argmax (a bundle without calibration has T=1 and threshold 0.5, which is argmax).
        operating_point = model.bundle.operating_point
        p_calibrated, labels = operating_point.predict(probabilities[:, model.covid_index])
        rows: list[PredictionRow] = []
        for index, scan in enumerate(chunk):
            key = overlay_key(model.key.name, model.key.version, scan.scan_id, self._overlay_extension)
            uploads[(scan.scan_id, model.key)] = self.executor.submit(
                self._render_and_upload, scan.images.display, cams[index], key
            )
            rows.append(
                PredictionRow(
                    scan_id=scan.scan_id,
                    model_name=model.key.name,
                    model_version=model.key.version,
                    label=labels[index],
                    p_covid=float(p_calibrated[index]),
                    threshold=float(operating_point.threshold),
                    overlay_key=key,
                    cam_note=cam_note(cams[index], batch[index]),
                    inference_ms=elapsed_ms / len(chunk),
                )
            )
        return rows

    def _render_and_upload(self, display: np.ndarray, cam: np.ndarray, key: str) -> None:
        """Draw cam over the display image and store it under key."""
        body, content_type, _extension = encode_overlay(
            display, cam, self.settings.overlay_format, max_side=DISPLAY_MAX_SIDE
        )
        self.store.put(key, body, content_type)

    def _await_overlays(
        self, scans: Sequence[PreparedScan], rows: list[PredictionRow], uploads: OverlayUploads
    ) -> Inferred:
        """Wait for every overlay; a scan is done only when all of its overlays are stored (first error wins)."""
        failed: dict[str, str] = {}
        retry: dict[str, str] = {}
        for (scan_id, _model), future in uploads.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - sorted into retry or failed
                if scan_id not in failed and scan_id not in retry:
                    (retry if is_transient(exc) else failed)[scan_id] = f"overlay upload failed: {describe(exc)}"
        done = tuple(scan.scan_id for scan in scans if scan.scan_id not in failed and scan.scan_id not in retry)
        done_ids = set(done)
        return Inferred(done, tuple(row for row in rows if row.scan_id in done_ids), failed, retry)

    # --- record -----------------------------------------------------------------------------------

    def record(
        self,
        rows: Sequence[PredictionRow],
        done: Sequence[str],
        failed: dict[str, str],
        not_selected: dict[str, str],
    ) -> Recorded:
        """Record predictions and final statuses in one transaction; if the database refuses it, scan by scan."""
        try:
            self._write(rows, done, failed, not_selected)
            return Recorded(tuple(done), dict(failed), dict(not_selected), {})
        except Exception as exc:  # noqa: BLE001 - sorted below: transient errors retry, others fail the scans
            if is_transient(exc):
                return Recorded((), {}, {}, dict.fromkeys([*done, *failed, *not_selected], _database_unavailable(exc)))
            log.warning("batch write refused (%s); recording %d scans one by one", type(exc).__name__, len(done))
        return self._record_one_by_one(rows, done, failed, not_selected)

    def _record_one_by_one(
        self,
        rows: Sequence[PredictionRow],
        done: Sequence[str],
        failed: dict[str, str],
        not_selected: dict[str, str],
    ) -> Recorded:
        """Each done scan in a transaction of its own (a refused one fails), then the failed and not selected ones."""
        recorded: list[str] = []
        failed = dict(failed)
        retry: dict[str, str] = {}
        for scan_id in done:
            try:
                self._write([row for row in rows if row.scan_id == scan_id], [scan_id], {}, {})
                recorded.append(scan_id)
            except Exception as exc:  # noqa: BLE001 - sorted into retry or failed
                if is_transient(exc):
                    retry[scan_id] = _database_unavailable(exc)
                else:
                    failed[scan_id] = f"could not record result: {describe(exc)}"
        try:
            self._write([], [], failed, not_selected)
        except Exception as exc:  # noqa: BLE001 - their leases expire and the reconciler re-queues them
            if is_transient(exc):
                retry.update(dict.fromkeys([*failed, *not_selected], _database_unavailable(exc)))
                return Recorded(tuple(recorded), {}, {}, retry)
            log.error("could not record %d failed scans: %s", len(failed), type(exc).__name__)
            return Recorded(tuple(recorded), {}, dict(not_selected), retry)
        return Recorded(tuple(recorded), failed, dict(not_selected), retry)

    def _write(
        self,
        rows: Sequence[PredictionRow],
        done: Sequence[str],
        failed: dict[str, str],
        not_selected: dict[str, str],
    ) -> None:
        """Write predictions and final statuses in one transaction."""
        with self.sessions.begin() as session:
            upsert_predictions(session, list(rows))
            mark_scans(session, done, Status.DONE, finished=True)
            for scan_id, reason in failed.items():
                mark_scans(session, [scan_id], Status.FAILED, error=reason, finished=True)
            for scan_id, reason in not_selected.items():
                mark_scans(session, [scan_id], Status.SKIPPED, error=reason, finished=True)


def classifier_from_settings(settings: Settings, pinned_gpu: str | None = None) -> ScanClassifier:
    """Check the configuration and the database schema (cheap, so first), then load the served models.

    pinned_gpu (what `worker.consumer.gpu.pin_gpu` set; None: no GPU) sizes the decode processes.
    """
    from shared.store import store_from_settings

    require_models_configured(settings)
    engine = make_engine(settings.resolved_database_url())
    require_current_schema(engine)
    models = load_served_models(settings)
    classifier = ScanClassifier(
        models,
        store_from_settings(settings),
        make_session_factory(engine),
        settings,
        decoder=DecodePool(decode_processes(settings, pinned_gpu)),
    )
    classifier.decoder.warm_up()
    return classifier
