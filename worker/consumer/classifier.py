"""The batch pipeline: fetch, decode, one Grad-CAM pass per model, overlays, one SQL transaction."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.bundle import Bundle, load_bundle
from shared.dicom import dicom_header, selection_reason
from shared.domain import Status
from shared.engine import make_engine, make_session_factory, require_current_schema
from shared.errors import LungcamError
from shared.gradcam import GradCam
from shared.imaging import ImageDecodeError, check_image_header, preprocessing_key
from shared.models import Prediction, Scan, utcnow
from shared.overlay import OVERLAY_FORMATS, cam_note, encode_overlay
from shared.scans import PredictionRow, claim_scans, mark_scans, record_batch_models, upsert_predictions
from shared.settings import Settings
from shared.sources import NOT_READABLE, SourceFetcher, SourceNotAllowed
from shared.store import ObjectNotFound, ObjectStore, StoreError, overlay_key
from worker.consumer.budget import PixelBudget
from worker.consumer.decoding import DecodePool, available_cores
from worker.consumer.leases import LeaseKeeper
from worker.consumer.transient import describe, is_transient

log = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 1024


class NoModelsConfigured(LungcamError, RuntimeError):
    """The worker was started without any model bundle to serve."""


@dataclass
class ServedModel:
    """A loaded bundle with its compiled Grad-CAM pass."""

    bundle: Bundle
    gradcam: GradCam

    @property
    def covid_index(self) -> int:
        """Output index of the covid class."""
        return self.bundle.class_names.index("covid")

    @property
    def input_key(self) -> str:
        """Which preprocessed input this model takes (bundles with the same key share one array)."""
        return preprocessing_key(self.bundle.preprocessing, self.bundle.input_size)

    @property
    def key(self) -> tuple[str, str]:
        """(name, version): what a prediction row and a batch record name the model by."""
        return self.bundle.name, self.bundle.version

    @property
    def demonstration(self) -> bool:
        """Whether the bundle's manifest says it is a demonstration model (trained on synthetic images)."""
        return bool(self.bundle.manifest.get("demonstration"))


@dataclass
class BatchOutcome:
    """What happened to each scan id of one batch."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # scan id -> reason (permanent, recorded)
    retry: dict[str, str] = field(default_factory=dict)  # scan id -> reason (transient)
    skipped: list[str] = field(default_factory=list)  # already done, held by another lease, or unknown id
    claimed: list[str] = field(default_factory=list)  # marked running under this worker's lease
    not_selected: dict[str, str] = field(default_factory=dict)  # scan id -> why it is not a frontal chest film


class NotSelected(Exception):
    """A valid image that its DICOM header says is not a frontal chest radiograph (it ends `skipped`)."""


@dataclass
class _Decoded:
    inputs: dict[str, np.ndarray]  # input key (preprocessing and size) -> preprocessed float32 image
    display: np.ndarray  # uint8 image (grey or RGB), longest side <= DISPLAY_MAX_SIDE, for the overlay


def require_models_configured(settings: Settings) -> list[str]:
    """The bundle URIs of LUNGCAM_MODELS; raises NoModelsConfigured when there are none."""
    uris = settings.model_uris()
    if not uris:
        raise NoModelsConfigured(
            "no model bundles configured: set LUNGCAM_MODELS to one or more bundle folders or s3:// prefixes"
        )
    return uris


def load_served_models(settings: Settings) -> list[ServedModel]:
    """Load and verify every bundle in LUNGCAM_MODELS and warm up its compiled pass."""
    uris = require_models_configured(settings)
    served = []
    for uri in uris:
        bundle = load_bundle(uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        gradcam = bundle.gradcam(positive_gradients_only=settings.positive_gradients_only)
        started = time.perf_counter()
        gradcam.warm_up(settings.batch_size)
        log.info("model %s/%s ready (warm-up %.1f s)", bundle.name, bundle.version, time.perf_counter() - started)
        warning = bundle.audit_warning
        if warning:
            log.warning("model %s/%s: %s", bundle.name, bundle.version, warning)
        served.append(ServedModel(bundle, gradcam))
    return served


class ScanClassifier:
    """Classifies batches of scan ids end to end; safe to call from several threads at once."""

    def __init__(
        self,
        models: list[ServedModel],
        store: ObjectStore,
        sessions: sessionmaker[Session],
        settings: Settings,
        leases: LeaseKeeper | None = None,
    ):
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
        self._decode_side = max([DISPLAY_MAX_SIDE, *(size for _key, _spec, size in self._input_specs)])
        self.budget = PixelBudget(settings.decode_pixel_budget)
        self.decoder = DecodePool(decode_processes(settings))
        self._overlay_extension = OVERLAY_FORMATS[settings.overlay_format][2].lstrip(".")
        # Scans that need only some of the served models (screened before with others): scan id -> models.
        self._needed: dict[str, set[tuple[str, str]]] = {}
        self._needed_lock = threading.Lock()

    def close(self) -> None:
        """Stop the I/O threads, the decode processes and the lease heartbeat."""
        self.executor.shutdown(wait=True)
        self.decoder.close()
        self.leases.stop()

    def process(self, scan_ids: list[str], *, force: set[str] | frozenset[str] = frozenset()) -> BatchOutcome:
        """Classify scans; returns what was done, what failed for good and what should be retried."""
        outcome = BatchOutcome()
        ids = list(dict.fromkeys(scan_ids))
        try:
            sources = self._claim(ids, force, outcome)
        except Exception as exc:
            if not is_transient(exc):
                raise
            outcome.retry.update({scan_id: f"database unavailable: {type(exc).__name__}" for scan_id in ids})
            return outcome
        if not sources:
            return outcome
        outcome.claimed = list(sources)
        self.leases.hold(outcome.claimed)
        try:
            self._classify_claimed(sources, outcome)
        finally:
            self.leases.release(outcome.claimed)
            with self._needed_lock:
                for scan_id in outcome.claimed:
                    self._needed.pop(scan_id, None)
        return outcome

    def _classify_claimed(self, sources: dict[str, str], outcome: BatchOutcome) -> None:
        """Fetch, decode, infer, upload and record the claimed scans, sorting each into the outcome."""
        decoding = {scan_id: self.executor.submit(self._fetch_and_decode, uri) for scan_id, uri in sources.items()}
        decoded: dict[str, _Decoded] = {}
        failed: dict[str, str] = {}
        for scan_id, future in decoding.items():
            try:
                decoded[scan_id] = future.result()
            except NotSelected as exc:
                outcome.not_selected[scan_id] = str(exc)
            except ImageDecodeError as exc:
                failed[scan_id] = f"undecodable image: {exc}"
            except (ObjectNotFound, SourceNotAllowed):
                failed[scan_id] = NOT_READABLE
            except StoreError as exc:
                if exc.transient:
                    outcome.retry[scan_id] = f"store unavailable: {describe(exc)}"
                else:
                    # Denied, or no such bucket: worded like a missing key, so errors reveal nothing of the store.
                    failed[scan_id] = NOT_READABLE
            except Exception as exc:
                if is_transient(exc):
                    outcome.retry[scan_id] = f"store unavailable: {describe(exc)}"
                else:
                    log.warning(
                        "could not prepare a scan: %s", type(exc).__name__, exc_info=not isinstance(exc, LungcamError)
                    )
                    failed[scan_id] = f"could not prepare image: {describe(exc)}"
        try:
            rows, uploads = self._infer_and_render(decoded)
        except Exception as exc:
            log.exception("model pass failed for %d scans", len(decoded))
            target = outcome.retry if is_transient(exc) else failed
            target.update({scan_id: f"model pass failed: {describe(exc)}" for scan_id in decoded})
            rows, uploads, decoded = [], {}, {}
        for (scan_id, _model), future in uploads.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - sorted into retry or failed below
                if scan_id in failed or scan_id in outcome.retry:
                    continue
                if is_transient(exc):
                    outcome.retry[scan_id] = f"overlay upload failed: {describe(exc)}"
                else:
                    failed[scan_id] = f"overlay upload failed: {describe(exc)}"
        done = [scan_id for scan_id in decoded if scan_id not in outcome.retry and scan_id not in failed]
        done_ids = set(done)
        rows = [row for row in rows if row.scan_id in done_ids]
        self._record_outcome(rows, done, failed, outcome)

    def _record_outcome(
        self, rows: list[PredictionRow], done: list[str], failed: dict[str, str], outcome: BatchOutcome
    ) -> None:
        """Record in one transaction; if the database refuses it (not an outage), scan by scan."""
        not_selected = outcome.not_selected
        try:
            self._record(rows, done, failed, not_selected)
            outcome.done, outcome.failed = done, failed
            return
        except Exception as exc:  # noqa: BLE001 - sorted below: transient errors retry, others fail the scans
            if is_transient(exc):
                unrecorded = [*done, *failed, *not_selected]
                outcome.retry.update({scan_id: f"database unavailable: {type(exc).__name__}" for scan_id in unrecorded})
                outcome.not_selected = {}
                return
            log.warning("batch write refused (%s); recording %d scans one by one", type(exc).__name__, len(done))
        failed = dict(failed)
        for scan_id in done:
            try:
                self._record([row for row in rows if row.scan_id == scan_id], [scan_id], {})
                outcome.done.append(scan_id)
            except Exception as exc:  # noqa: BLE001 - sorted into retry or failed
                if is_transient(exc):
                    outcome.retry[scan_id] = f"database unavailable: {type(exc).__name__}"
                else:
                    failed[scan_id] = f"could not record result: {describe(exc)}"
        try:
            self._record([], [], failed, not_selected)
            outcome.failed = failed
        except Exception as exc:  # noqa: BLE001 - their leases expire and the reconciler re-queues them
            if is_transient(exc):
                outcome.retry.update(
                    {scan_id: f"database unavailable: {type(exc).__name__}" for scan_id in [*failed, *not_selected]}
                )
                outcome.not_selected = {}
            else:
                log.error("could not record %d failed scans: %s", len(failed), type(exc).__name__)

    def _claim(self, scan_ids: list[str], force: set[str] | frozenset[str], outcome: BatchOutcome) -> dict[str, str]:
        """Load the scans' sources, skip finished or leased ones, and claim the rest under a lease (one transaction)."""
        expected = {(m.bundle.name, m.bundle.version) for m in self.models}
        with self.sessions.begin() as session:
            scans = {s.scan_id: s for s in session.scalars(select(Scan).where(Scan.scan_id.in_(scan_ids)))}
            have: dict[str, set[tuple[str, str]]] = {}
            for scan_id, name, version in session.execute(
                select(Prediction.scan_id, Prediction.model_name, Prediction.model_version).where(
                    Prediction.scan_id.in_(scan_ids)
                )
            ):
                have.setdefault(scan_id, set()).add((name, version))
            now = utcnow()
            sources = {}
            needed: dict[str, set[tuple[str, str]]] = {}
            complete: list[str] = []
            unknown = 0
            for scan_id in scan_ids:
                scan = scans.get(scan_id)
                missing = expected - have.get(scan_id, set())
                if scan is None:
                    unknown += 1
                    outcome.skipped.append(scan_id)
                elif scan_id in force:
                    sources[scan_id] = scan.source_uri
                elif scan.status == Status.SKIPPED:
                    # Not a frontal chest film: a redelivered message changes nothing.
                    outcome.skipped.append(scan_id)
                elif expected and not missing and scan.status in (Status.DONE, Status.QUEUED):
                    # Finished work redelivered, or re-screened with models it already has: nothing to run.
                    outcome.skipped.append(scan_id)
                    if scan.status == Status.QUEUED:
                        complete.append(scan_id)
                elif self._leased_elsewhere(scan, now):
                    # A duplicate message (restored or re-published) while a live worker still works on it.
                    outcome.skipped.append(scan_id)
                else:
                    sources[scan_id] = scan.source_uri
                    if missing != expected:
                        # Has results from some of the served models already: run only the others.
                        needed[scan_id] = missing
            if unknown:
                log.warning("%d messages for unknown scan ids ignored", unknown)
            claimed = claim_scans(session, list(sources), self.leases.worker_id, self.settings.lease_s, take_over=force)
            # Another worker claimed some of them since they were read: theirs now.
            mine = set(claimed)
            outcome.skipped.extend(scan_id for scan_id in sources if scan_id not in mine)
            mark_scans(session, complete, Status.DONE, finished=True)
            # Which model versions each batch was screened with: what results and reports show by default.
            batches = {scans[scan_id].batch_id for scan_id in [*claimed, *complete] if scans[scan_id].batch_id}
            record_batch_models(session, batches, [(*m.key, m.demonstration) for m in self.models])
        with self._needed_lock:
            self._needed.update({scan_id: models for scan_id, models in needed.items() if scan_id in mine})
        return {scan_id: sources[scan_id] for scan_id in claimed}

    def _leased_elsewhere(self, scan: Scan, now: dt.datetime) -> bool:
        """Whether a live lease on scan belongs to another worker or to another batch of this one."""
        if scan.status != Status.RUNNING or scan.lease_expires_at is None or scan.lease_expires_at <= now:
            return False
        return scan.worker_id != self.leases.worker_id or self.leases.holds(scan.scan_id)

    def _fetch_and_decode(self, source_uri: str) -> _Decoded:
        """Fetch, check the DICOM header, decode once at reduced size under the pixel budget, derive inputs and display."""
        data = self.fetcher.fetch(source_uri)
        settings = self.settings
        reason = selection_reason(
            dicom_header(data),
            modalities=settings.csv_list(settings.classify_modalities),
            body_parts=settings.csv_list(settings.classify_body_parts),
            lateral_views=settings.csv_list(settings.lateral_views),
        )
        if reason:
            raise NotSelected(reason)
        # The shared size guard: a header declaring more than the limits (a deflate bomb) fails here,
        # before a pixel is inflated or decoded.
        with self.budget.admit(check_image_header(data)):
            inputs, display = self.decoder.decode(data, self._decode_side, self._input_specs)
        return _Decoded(inputs, display)

    def _infer_and_render(
        self, decoded: dict[str, _Decoded]
    ) -> tuple[list[PredictionRow], dict[tuple[str, str], Future]]:
        rows: list[PredictionRow] = []
        uploads: dict[tuple[str, str], Future] = {}
        ids = list(decoded)
        for start in range(0, len(ids), self.settings.batch_size):
            chunk = ids[start : start + self.settings.batch_size]
            for model in self.models:
                bundle = model.bundle
                with self._needed_lock:
                    chunk = [
                        scan_id
                        for scan_id in ids[start : start + self.settings.batch_size]
                        if model.key in self._needed.get(scan_id, {model.key})
                    ]
                if not chunk:
                    continue
                batch = np.stack([decoded[scan_id].inputs[model.input_key] for scan_id in chunk])
                with self._model_lock:
                    started = time.perf_counter()
                    probabilities, cams = model.gradcam(batch)
                    elapsed_ms = (time.perf_counter() - started) * 1000.0
                # The bundle's operating point decides: calibrated p_covid against its threshold (and band),
                # not argmax (a bundle without calibration has T=1 and threshold 0.5, which is argmax).
                operating_point = bundle.operating_point
                p_calibrated, labels = operating_point.predict(probabilities[:, model.covid_index])
                for index, scan_id in enumerate(chunk):
                    key = overlay_key(bundle.name, bundle.version, scan_id, self._overlay_extension)
                    uploads[(scan_id, bundle.name)] = self.executor.submit(
                        self._render_and_upload, decoded[scan_id].display, cams[index], key
                    )
                    rows.append(
                        PredictionRow(
                            scan_id=scan_id,
                            model_name=bundle.name,
                            model_version=bundle.version,
                            label=labels[index],
                            p_covid=float(p_calibrated[index]),
                            threshold=float(operating_point.threshold),
                            overlay_key=key,
                            # Computed beside the overlay, on the map and the input it was made from.
                            cam_note=cam_note(cams[index], batch[index]),
                            inference_ms=elapsed_ms / len(chunk),
                        )
                    )
        return rows, uploads

    def _render_and_upload(self, display: np.ndarray, cam: np.ndarray, key: str) -> None:
        body, content_type, _extension = encode_overlay(
            display, cam, self.settings.overlay_format, max_side=DISPLAY_MAX_SIDE
        )
        self.store.put(key, body, content_type)

    def _record(
        self,
        rows: list[PredictionRow],
        done: list[str],
        failed: dict[str, str],
        not_selected: dict[str, str] | None = None,
    ) -> None:
        """Write predictions and final statuses in one transaction."""
        with self.sessions.begin() as session:
            upsert_predictions(session, rows)
            mark_scans(session, done, Status.DONE, finished=True)
            for scan_id, reason in failed.items():
                mark_scans(session, [scan_id], Status.FAILED, error=reason, finished=True)
            for scan_id, reason in (not_selected or {}).items():
                mark_scans(session, [scan_id], Status.SKIPPED, error=reason, finished=True)


def decode_processes(settings: Settings) -> int:
    """LUNGCAM_DECODE_PROCESSES, or by default one per core on a GPU worker and none on a CPU-only one.

    Measured (benchmarks/throughput.py, 2 cores, CPU-only): decode processes compete with the model
    for the same cores and cost IPC, so the pipeline ran 10% slower with them; on a GPU host the
    cores are free for decoding, which holds the GIL, so processes are what use them.
    """
    if settings.decode_processes is not None:
        return settings.decode_processes
    on_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1")
    return available_cores() if on_gpu else 0


def classifier_from_settings(settings: Settings) -> ScanClassifier:
    """Check the configuration and the database schema (cheap, so first), then load the served models."""
    from shared.store import store_from_settings

    require_models_configured(settings)
    engine = make_engine(settings.resolved_database_url())
    require_current_schema(engine)
    classifier = ScanClassifier(
        load_served_models(settings), store_from_settings(settings), make_session_factory(engine), settings
    )
    classifier.decoder.warm_up()
    return classifier
