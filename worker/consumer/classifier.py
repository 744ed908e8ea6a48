"""The batch pipeline: fetch, decode, one Grad-CAM pass per model, overlays, one SQL transaction."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import LungcamError
from shared import db
from shared.bundle import Bundle, load_bundle
from shared.gradcam import GradCam
from shared.imaging import ImageDecodeError, decode_image, fit_within, preprocess, to_uint8
from shared.overlay import overlay_png
from shared.settings import Settings
from shared.store import ObjectNotFound, ObjectStore, StoreError, overlay_key
from shared.sources import NOT_READABLE, SourceFetcher, SourceNotAllowed

log = logging.getLogger(__name__)

DISPLAY_MAX_SIDE = 1024
TRANSIENT_ERRORS = (StoreError, OperationalError, DBAPIError, ConnectionError, TimeoutError)


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


@dataclass
class BatchOutcome:
    """What happened to each scan id of one batch."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # scan id -> reason (permanent)
    retry: dict[str, str] = field(default_factory=dict)  # scan id -> reason (transient)
    skipped: list[str] = field(default_factory=list)  # already done, or unknown id


@dataclass
class _Decoded:
    inputs: dict[int, np.ndarray]  # input size -> preprocessed float32 image
    display: np.ndarray  # uint8 image, longest side <= DISPLAY_MAX_SIDE, for the overlay


def require_models_configured(settings: Settings) -> list[str]:
    """The bundle URIs of LUNGCAM_MODELS; raises NoModelsConfigured when there are none."""
    uris = settings.model_uris()
    if not uris:
        raise NoModelsConfigured("no model bundles configured: set LUNGCAM_MODELS to one or more bundle folders or s3:// prefixes")
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
    ):
        self.models = models
        self.store = store
        self.sessions = sessions
        self.settings = settings
        self.fetcher = SourceFetcher(store, settings)
        self.executor = ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix="lungcam-io")
        # One model pass at a time: with two batches in flight, one runs on the device while the
        # other is fetched, decoded, rendered and written by the I/O threads.
        self._model_lock = threading.Lock()
        self._input_sizes = sorted({m.bundle.input_size for m in models})

    def close(self) -> None:
        """Stop the I/O threads."""
        self.executor.shutdown(wait=True)

    def process(self, scan_ids: list[str], *, force: set[str] | frozenset[str] = frozenset()) -> BatchOutcome:
        """Classify scans; returns what was done, what failed for good and what should be retried."""
        outcome = BatchOutcome()
        try:
            sources = self._claim(list(dict.fromkeys(scan_ids)), force, outcome)
        except TRANSIENT_ERRORS as exc:
            outcome.retry.update({scan_id: f"database unavailable: {type(exc).__name__}" for scan_id in scan_ids})
            return outcome
        if not sources:
            return outcome
        decoding = {scan_id: self.executor.submit(self._fetch_and_decode, uri) for scan_id, uri in sources.items()}
        decoded: dict[str, _Decoded] = {}
        for scan_id, future in decoding.items():
            try:
                decoded[scan_id] = future.result()
            except ImageDecodeError as exc:
                outcome.failed[scan_id] = f"undecodable image: {exc}"
            except (ObjectNotFound, SourceNotAllowed):
                outcome.failed[scan_id] = NOT_READABLE
            except TRANSIENT_ERRORS as exc:
                outcome.retry[scan_id] = f"store unavailable: {type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - one bad scan must not sink its batch
                log.exception("unexpected error preparing a scan")
                outcome.failed[scan_id] = f"could not prepare image: {type(exc).__name__}"
        rows, uploads = self._infer_and_render(decoded)
        for (scan_id, _model), future in uploads.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - store errors are transient: retry the scan
                outcome.retry.setdefault(scan_id, f"overlay upload failed: {type(exc).__name__}: {exc}")
        rows = [row for row in rows if row["scan_id"] not in outcome.retry]
        outcome.done = [scan_id for scan_id in decoded if scan_id not in outcome.retry]
        try:
            self._record(rows, outcome)
        except TRANSIENT_ERRORS as exc:
            for scan_id in outcome.done + list(outcome.failed):
                outcome.retry[scan_id] = f"database unavailable: {type(exc).__name__}"
            outcome.done, outcome.failed = [], {}
        return outcome

    def _claim(self, scan_ids: list[str], force: set[str] | frozenset[str], outcome: BatchOutcome) -> dict[str, str]:
        """Load the scans' sources, skip finished ones, and mark the rest running (one transaction)."""
        expected = {(m.bundle.name, m.bundle.version) for m in self.models}
        with self.sessions.begin() as session:
            scans = {s.scan_id: s for s in session.scalars(select(db.Scan).where(db.Scan.scan_id.in_(scan_ids)))}
            have: dict[str, set[tuple[str, str]]] = {}
            for scan_id, name, version in session.execute(
                select(db.Prediction.scan_id, db.Prediction.model_name, db.Prediction.model_version).where(
                    db.Prediction.scan_id.in_(scan_ids)
                )
            ):
                have.setdefault(scan_id, set()).add((name, version))
            sources = {}
            for scan_id in scan_ids:
                scan = scans.get(scan_id)
                if scan is None:
                    log.warning("message for unknown scan id %s ignored", scan_id)
                    outcome.skipped.append(scan_id)
                elif scan.status == db.DONE and expected <= have.get(scan_id, set()) and scan_id not in force:
                    # A redelivered message for finished work (e.g. after a visibility timeout).
                    outcome.skipped.append(scan_id)
                else:
                    sources[scan_id] = scan.source_uri
            db.mark_scans(session, list(sources), db.RUNNING)
        return sources

    def _fetch_and_decode(self, source_uri: str) -> _Decoded:
        image = decode_image(self.fetcher.fetch(source_uri))
        inputs = {size: preprocess(image, size) for size in self._input_sizes}
        display = to_uint8(fit_within(image, DISPLAY_MAX_SIDE))
        return _Decoded(inputs, display)

    def _infer_and_render(self, decoded: dict[str, _Decoded]) -> tuple[list[dict], dict[tuple[str, str], Future]]:
        rows: list[dict] = []
        uploads: dict[tuple[str, str], Future] = {}
        ids = list(decoded)
        for start in range(0, len(ids), self.settings.batch_size):
            chunk = ids[start : start + self.settings.batch_size]
            for model in self.models:
                bundle = model.bundle
                batch = np.stack([decoded[scan_id].inputs[bundle.input_size] for scan_id in chunk])
                with self._model_lock:
                    started = time.perf_counter()
                    probabilities, cams = model.gradcam(batch)
                    elapsed_ms = (time.perf_counter() - started) * 1000.0
                for index, scan_id in enumerate(chunk):
                    key = overlay_key(bundle.name, bundle.version, scan_id)
                    uploads[(scan_id, bundle.name)] = self.executor.submit(
                        self._render_and_upload, decoded[scan_id].display, cams[index], key
                    )
                    p_covid = float(probabilities[index, model.covid_index])
                    rows.append(
                        {
                            "scan_id": scan_id,
                            "model_name": bundle.name,
                            "model_version": bundle.version,
                            "label": bundle.class_names[int(np.argmax(probabilities[index]))],
                            "p_covid": p_covid,
                            "overlay_key": key,
                            "inference_ms": elapsed_ms / len(chunk),
                        }
                    )
        return rows, uploads

    def _render_and_upload(self, display: np.ndarray, cam: np.ndarray, key: str) -> None:
        self.store.put(key, overlay_png(display, cam, max_side=DISPLAY_MAX_SIDE), "image/png")

    def _record(self, rows: list[dict], outcome: BatchOutcome) -> None:
        """Write predictions and final statuses in one transaction."""
        with self.sessions.begin() as session:
            db.upsert_predictions(session, rows)
            db.mark_scans(session, outcome.done, db.DONE, finished=True)
            for scan_id, reason in outcome.failed.items():
                db.mark_scans(session, [scan_id], db.FAILED, error=reason, finished=True)


def classifier_from_settings(settings: Settings) -> ScanClassifier:
    """Check the configuration and the database schema (cheap, so first), then load the served models."""
    from shared.store import store_from_settings

    require_models_configured(settings)
    engine = db.make_engine(settings.resolved_database_url())
    db.require_current_schema(engine)
    return ScanClassifier(load_served_models(settings), store_from_settings(settings), db.make_session_factory(engine), settings)
