"""The Celery task: classify scan ids in batches (celery-batches), with explicit retries and backoff.

Nothing happens at import: `bind_classify_task(app, classifier, settings)` registers the task on an
app built by `shared.queueing.make_app`, once the worker has loaded its models (Celery's
"app factory" pattern, tasks bound late).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps
from celery.utils.time import get_exponential_backoff_interval
from celery_batches import Batches
from sqlalchemy.exc import SQLAlchemyError

from shared.queueing import CLASSIFY_TASK, QUEUES, ROUTINE_QUEUE, publish
from shared.scans import fail_unfinished, requeue_scans
from shared.settings import Settings
from worker.consumer.classifier import BatchOutcome, ScanClassifier
from worker.consumer.transient import describe, is_transient, traceback_without_messages

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0
MAX_BACKOFF_S = 300.0


def backoff_seconds(attempt: int) -> float:
    """Delay of the n-th retry: random ("full jitter") up to 1, 2, 4, ... s, capped at MAX_BACKOFF_S.

    The jitter spreads retries of scans that failed together (a store outage) instead of re-sending them in step.
    """
    # Celery's helper counts whole units: milliseconds give the jitter sub-second steps.
    delay_ms = get_exponential_backoff_interval(
        round(BACKOFF_BASE_S * 1000), max(0, attempt - 1), round(MAX_BACKOFF_S * 1000), full_jitter=True
    )
    return float(delay_ms) / 1000


def backoff_bound_seconds(attempt: int) -> float:
    """The longest backoff_seconds(attempt) can be."""
    return min(MAX_BACKOFF_S, BACKOFF_BASE_S * 2.0 ** max(0, attempt - 1))


def queue_of(request: Any) -> str:
    """The queue a request came from (its priority), so a retry never demotes a stat scan."""
    routing_key = (request.delivery_info or {}).get("routing_key")
    return routing_key if routing_key in QUEUES else ROUTINE_QUEUE


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
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError):
                # Database errors' text carries the statement's parameters (scan ids): their traceback without it.
                log.error(
                    "batch of %d scans failed before any was claimed: %s\n%s",
                    len(by_id),
                    type(exc).__name__,
                    traceback_without_messages(exc),
                )
            else:
                log.exception("batch of %d scans failed before any was claimed: %s", len(by_id), type(exc).__name__)
            outcome = BatchOutcome(retry={scan_id: describe(exc) for scan_id in by_id})
            if not is_transient(exc):
                outcome = self._fail(outcome.retry)
        self._retry_or_fail(outcome, by_id)
        log.info(
            "batch: %d done, %d not selected (skipped), %d failed, %d to retry, %d passed over",
            len(outcome.done),
            len(outcome.not_selected),
            len(outcome.failed),
            len(outcome.retry),
            len(outcome.passed_over),
        )
        return {"done": len(outcome.done), "failed": len(outcome.failed), "retry": len(outcome.retry)}

    def _fail(self, reasons: dict[str, str]) -> BatchOutcome:
        """Record scans failed for a permanent reason; if even that cannot be written, leave them to their leases."""
        try:
            with self.classifier.sessions.begin() as session:
                failed = set(fail_unfinished(session, reasons))
        except Exception as exc:  # noqa: BLE001 - see below
            # Not re-published: a database that cannot take the failure would make that a loop. Claimed
            # scans keep their (no longer renewed) lease, which expires; the reconciler takes it from there.
            log.error(
                "could not record %d failed scans (%s); leaving them to the reconciler",
                len(reasons),
                type(exc).__name__,
            )
            return BatchOutcome()
        return BatchOutcome(failed={scan_id: reason for scan_id, reason in reasons.items() if scan_id in failed})

    def _retry_or_fail(self, outcome: BatchOutcome, requests: dict[str, Any]) -> None:
        """Re-publish transient failures to their own queue with backoff; past the retry limit, fail them."""
        max_retries = self.settings.task_max_retries
        exhausted: dict[str, str] = {}
        retries: dict[str, tuple[str, int, bool]] = {}
        for scan_id, reason in outcome.retry.items():
            request = requests[scan_id]
            attempt = int(request.kwargs.get("attempt", 0)) + 1
            if attempt > max_retries:
                exhausted[scan_id] = f"gave up after {max_retries} retries: {reason}"
            else:
                retries[scan_id] = (queue_of(request), attempt, bool(request.kwargs.get("force")))
        if retries:
            self._requeue_claimed(outcome, retries)
            for scan_id, (queue, attempt, force) in retries.items():
                try:
                    publish(self.app, scan_id, queue, attempt=attempt, force=force, countdown=backoff_seconds(attempt))
                except Exception as exc:  # noqa: BLE001 - the scan is queued in SQL: the reconciler re-sends it
                    log.warning("could not publish a retry (%s); the reconciler will re-send it", type(exc).__name__)
        if exhausted:
            recorded = self._fail(exhausted).failed
            outcome.failed.update(recorded)
            for scan_id in recorded:
                outcome.retry.pop(scan_id, None)

    def _requeue_claimed(self, outcome: BatchOutcome, retries: dict[str, Any]) -> None:
        """Give this worker's leases on retried scans back (queued, published now), before publishing."""
        mine = [scan_id for scan_id in retries if scan_id in set(outcome.claimed)]
        if not mine:
            return
        try:
            with self.classifier.sessions.begin() as session:
                requeue_scans(session, mine, worker_id=self.classifier.leases.worker_id)
        except Exception as exc:  # noqa: BLE001 - the scans keep an expiring lease; the retry message still goes out
            log.warning("could not mark %d scans queued for retry: %s", len(mine), type(exc).__name__)


class RearmBatchFlush(bootsteps.StartStopStep):  # type: ignore[misc]  # celery has no type information
    """Re-arms celery-batches' flush timer each time the consumer (re)connects to the broker."""

    # Celery clears the event loop's timer after a lost broker connection, but celery-batches keeps
    # the handle of its flush timer and only starts a new one while it has none: without this, after
    # a reconnect a partial batch waits until batch_size messages have arrived, perhaps for ever.
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        """Drop the stale handle; flush what is buffered on a fresh timer."""
        task = parent.app.tasks.get(CLASSIFY_TASK)
        if task is None or not hasattr(task, "_tref"):
            return
        stale, task._tref = task._tref, None
        if stale is not None and parent.timer is not None:
            stale.cancel()
            task._tref = parent.timer.call_repeatedly(task.flush_interval, task._do_flush)


def bind_classify_task(app: Celery, classifier: ScanClassifier, settings: Settings) -> Any:
    """Register the batched classify task on app, served by classifier; returns the task."""
    runner = BatchRunner(app, classifier, settings)
    app.steps["consumer"].add(RearmBatchFlush)

    @app.task(  # type: ignore[untyped-decorator]  # celery has no type information
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
