"""The Celery task: classify scan ids in batches (celery-batches), with explicit retries and backoff."""

from __future__ import annotations

import logging

from celery_batches import Batches

from shared import db
from shared.settings import get_settings
from worker.celery_app import CLASSIFY_TASK, ROUTINE_QUEUE, make_app
from worker.classifier import BatchOutcome, ScanClassifier
from worker.queueing import publish

log = logging.getLogger(__name__)

settings = get_settings()
app = make_app(settings)
_classifier: ScanClassifier | None = None
MAX_BACKOFF_S = 300.0


def install_classifier(classifier: ScanClassifier) -> None:
    """Give the task the classifier the worker loaded before it started consuming."""
    global _classifier
    _classifier = classifier


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff for the n-th retry (1, 2, 4, ... capped at MAX_BACKOFF_S)."""
    return min(MAX_BACKOFF_S, 2.0 ** max(0, attempt - 1))


@app.task(
    base=Batches,
    name=CLASSIFY_TASK,
    flush_every=settings.batch_size,
    flush_interval=settings.batch_flush_ms / 1000.0,
    acks_late=True,
)
def classify(requests: list) -> dict[str, int]:
    """Classify a batch of scan ids (each request's args are [scan_id])."""
    if _classifier is None:
        raise RuntimeError("the classify task runs only in a `lungcam worker` process")
    by_id = {request.args[0]: request for request in requests}
    force = {scan_id for scan_id, request in by_id.items() if request.kwargs.get("force")}
    try:
        outcome = _classifier.process(list(by_id), force=force)
    except Exception as exc:  # noqa: BLE001 - celery-batches acks a batch that raised: retry explicitly
        log.exception("batch of %d scans failed; retrying each", len(by_id))
        outcome = BatchOutcome(retry={scan_id: f"{type(exc).__name__}: {exc}" for scan_id in by_id})
    _retry_or_fail(outcome, by_id)
    log.info(
        "batch: %d done, %d failed, %d to retry, %d skipped",
        len(outcome.done), len(outcome.failed), len(outcome.retry), len(outcome.skipped),
    )
    return {"done": len(outcome.done), "failed": len(outcome.failed), "retry": len(outcome.retry)}


def _retry_or_fail(outcome: BatchOutcome, requests: dict) -> None:
    """Re-publish transient failures with backoff; past the retry limit, fail them with the reason."""
    exhausted: dict[str, str] = {}
    for scan_id, reason in outcome.retry.items():
        request = requests[scan_id]
        attempt = int(request.kwargs.get("attempt", 0)) + 1
        queue = (request.delivery_info or {}).get("routing_key") or ROUTINE_QUEUE
        if attempt > settings.task_max_retries:
            exhausted[scan_id] = f"gave up after {settings.task_max_retries} retries: {reason}"
            continue
        # Published before this batch's messages are acked, so a crash in between loses nothing.
        publish(app, scan_id, queue, attempt=attempt, force=bool(request.kwargs.get("force")), countdown=backoff_seconds(attempt))
    if not exhausted:
        return
    try:
        with _classifier.sessions.begin() as session:
            for scan_id, reason in exhausted.items():
                db.mark_scans(session, [scan_id], db.FAILED, error=reason, finished=True)
    except Exception:  # noqa: BLE001 - the database itself is down: keep the scans alive instead
        log.exception("could not mark %d scans failed; re-queueing them", len(exhausted))
        for scan_id in exhausted:
            publish(app, scan_id, ROUTINE_QUEUE, attempt=settings.task_max_retries, countdown=MAX_BACKOFF_S)
