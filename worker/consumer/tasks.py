"""The Celery task: classify scan ids in batches (celery-batches), with explicit retries and backoff.

Nothing happens at import: `bind_classify_task(app, classifier, settings)` registers the task on an
app built by `shared.queueing.make_app`, once the worker has loaded its models (Celery's
"app factory" pattern, tasks bound late).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery_batches import Batches

from shared import db
from shared.queueing import CLASSIFY_TASK, ROUTINE_QUEUE, publish
from shared.settings import Settings
from worker.consumer.classifier import BatchOutcome, ScanClassifier

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff for the n-th retry (1, 2, 4, ... capped at MAX_BACKOFF_S)."""
    return min(MAX_BACKOFF_S, 2.0 ** max(0, attempt - 1))


class BatchRunner:
    """Runs one celery-batches flush through the classifier and re-publishes what should be retried."""

    def __init__(self, app: Celery, classifier: ScanClassifier, settings: Settings) -> None:
        """Publish retries through app; classify with classifier."""
        self.app = app
        self.classifier = classifier
        self.settings = settings

    def run(self, requests: list[Any]) -> dict[str, int]:
        """Classify a batch of requests (each request's args are [scan_id])."""
        by_id = {request.args[0]: request for request in requests}
        force = {scan_id for scan_id, request in by_id.items() if request.kwargs.get("force")}
        try:
            outcome = self.classifier.process(list(by_id), force=force)
        except Exception as exc:  # noqa: BLE001 - celery-batches acks a batch that raised: retry explicitly
            log.exception("batch of %d scans failed; retrying each", len(by_id))
            outcome = BatchOutcome(retry={scan_id: f"{type(exc).__name__}: {exc}" for scan_id in by_id})
        self._retry_or_fail(outcome, by_id)
        log.info(
            "batch: %d done, %d failed, %d to retry, %d skipped",
            len(outcome.done), len(outcome.failed), len(outcome.retry), len(outcome.skipped),
        )
        return {"done": len(outcome.done), "failed": len(outcome.failed), "retry": len(outcome.retry)}

    def _retry_or_fail(self, outcome: BatchOutcome, requests: dict[str, Any]) -> None:
        """Re-publish transient failures with backoff; past the retry limit, fail them with the reason."""
        max_retries = self.settings.task_max_retries
        exhausted: dict[str, str] = {}
        for scan_id, reason in outcome.retry.items():
            request = requests[scan_id]
            attempt = int(request.kwargs.get("attempt", 0)) + 1
            queue = (request.delivery_info or {}).get("routing_key") or ROUTINE_QUEUE
            if attempt > max_retries:
                exhausted[scan_id] = f"gave up after {max_retries} retries: {reason}"
                continue
            # Published before this batch's messages are acked, so a crash in between loses nothing.
            publish(
                self.app, scan_id, queue, attempt=attempt,
                force=bool(request.kwargs.get("force")), countdown=backoff_seconds(attempt),
            )
        if not exhausted:
            return
        try:
            with self.classifier.sessions.begin() as session:
                for scan_id, reason in exhausted.items():
                    db.mark_scans(session, [scan_id], db.FAILED, error=reason, finished=True)
        except Exception:  # noqa: BLE001 - the database itself is down: keep the scans alive instead
            log.exception("could not mark %d scans failed; re-queueing them", len(exhausted))
            for scan_id in exhausted:
                publish(self.app, scan_id, ROUTINE_QUEUE, attempt=max_retries, countdown=MAX_BACKOFF_S)


def bind_classify_task(app: Celery, classifier: ScanClassifier, settings: Settings) -> Any:
    """Register the batched classify task on app, served by classifier; returns the task."""
    runner = BatchRunner(app, classifier, settings)

    @app.task(
        base=Batches,
        name=CLASSIFY_TASK,
        flush_every=settings.batch_size,
        flush_interval=settings.batch_flush_ms / 1000.0,
        acks_late=True,
    )
    def classify(requests: list[Any]) -> dict[str, int]:
        """Classify a batch of scan ids."""
        return runner.run(requests)

    return classify
