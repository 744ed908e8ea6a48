"""Queueing scans: the Celery app configuration, a `scans` row first, then one small message per scan id.

The API, the operator tools and the consumer all publish through here; nothing here consumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from celery import Celery
from kombu.entity import Exchange, Queue
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Priority, Status
from shared.scans import NewScan, add_scans, mark_scans, resubmit_scans
from shared.settings import Settings

CLASSIFY_TASK = "lungcam.classify"
# One queue per priority, named after it.
STAT_QUEUE: str = Priority.STAT.value
ROUTINE_QUEUE: str = Priority.ROUTINE.value
# Listed in the order a worker drains them: every stat message before any routine one.
QUEUES = (STAT_QUEUE, ROUTINE_QUEUE)


def broker_url_for(settings: Settings) -> str:
    """The configured broker URL, or the embedded Redis under the data folder."""
    if settings.broker_url:
        return settings.broker_url
    from shared.embedded_redis import start_embedded_redis

    return start_embedded_redis(settings.resolved_data_dir())


def make_app(settings: Settings, *, broker_url: str | None = None) -> Celery:
    """A Celery app configured for lungcam; publishing and consuming share this configuration."""
    app = Celery("lungcam", broker=broker_url or broker_url_for(settings))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in SQL, not in a result backend
        # kombu's Queue and Exchange are not annotated.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue=ROUTINE_QUEUE,
        task_default_exchange=ROUTINE_QUEUE,
        task_default_routing_key=ROUTINE_QUEUE,
        # Ack after the batch is written, so a worker that dies mid-batch loses nothing: its
        # unacked messages go back to the queue. celery-batches acks late requests when the
        # batch *returns*, even if it raised, so failures are retried explicitly in the task.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # celery-batches buffers messages inside the consumer until it has `batch_size` of them;
        # prefetch must cover one batch being processed plus the next one filling, or the buffer
        # never reaches the flush size and every batch waits for the flush timer instead.
        # (prefetch = multiplier x concurrency = one batch per pipeline slot.)
        worker_prefetch_multiplier=settings.batch_size,
        worker_concurrency=settings.pipeline_depth,
        worker_pool="threads",  # never fork once TensorFlow has started; threads share the loaded models
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Redis redelivers an unacked message after this long *even while its batch is still
            # running*: it must exceed the slowest batch, or work is done twice (harmless because
            # the task is idempotent, but wasteful). Recovery from a crashed worker does not wait
            # for it: leases and the reconciler (worker.consumer.reconciler) handle that.
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu scans for expired unacked messages every interval x throttle seconds (100 s by
            # default); scanning every 10 s bounds how long a crashed worker's scans sit idle.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # "priority": BRPOP lists the queues in QUEUES order every time, so stat goes first.
            "queue_order_strategy": "priority",
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@dataclass
class SubmitResult:
    """Which scans were queued by a submission and which already existed."""

    queued: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)


def publish(
    app: Celery, scan_id: str, priority: str, *, attempt: int = 0, force: bool = False, countdown: float | None = None
) -> None:
    """Send one classify message for a scan to the queue of its priority."""
    if priority not in QUEUES:
        raise ValueError(f"priority must be one of {QUEUES}, not {priority!r}")
    app.send_task(
        CLASSIFY_TASK,
        args=[scan_id],
        kwargs={"attempt": attempt, "force": force},
        queue=str(priority),  # a Priority member goes out as its plain value
        countdown=countdown,
    )


def submit_scans(
    sessions: sessionmaker[Session],
    app: Celery,
    scans: Sequence[NewScan],
    *,
    batch_id: str | None = None,
    batch_name: str | None = None,
    force: bool = False,
    rescreen: bool = False,
) -> SubmitResult:
    """Record scans as queued and publish them; existing scans are re-queued only with force or rescreen.

    force: classify again with every served model. rescreen: move existing scans into this batch and
    queue them without force, so workers run only the served models a scan has no result from.
    """
    result = SubmitResult()
    move = force or rescreen
    with sessions.begin() as session:
        inserted = set(add_scans(session, scans, batch_id, batch_name=batch_name))
        if move:
            # A forced re-submission replaces the scan's source and priority and moves it into
            # this batch, so the batch's progress and report include it.
            existing = [scan for scan in scans if scan.scan_id not in inserted]
            resubmit_scans(session, existing, batch_id)
            mark_scans(session, [scan.scan_id for scan in existing], Status.QUEUED)
    # Rows are committed before messages go out, so a worker never sees an id it cannot find.
    # If publishing fails after the commit, the scans stay `queued`: the workers' reconciler re-sends
    # them once they have had no live message for LUNGCAM_REQUEUE_AFTER_S.
    for scan in scans:
        if scan.scan_id in inserted or move:
            publish(app, scan.scan_id, scan.priority, force=force and scan.scan_id not in inserted)
            result.queued.append(scan.scan_id)
        else:
            result.already.append(scan.scan_id)
    return result
