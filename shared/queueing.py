"""Queueing scans: the Celery app configuration, a `scans` row first, then one small message per scan id.

The API, the operator tools and the consumer all publish through here; nothing here consumes.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import db
from shared.settings import Settings

CLASSIFY_TASK = "lungcam.classify"
STAT_QUEUE = "stat"
ROUTINE_QUEUE = "routine"
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
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
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


def publish(app: Celery, scan_id: str, priority: str, *, attempt: int = 0, force: bool = False, countdown: float | None = None) -> None:
    """Send one classify message for a scan to the queue of its priority."""
    if priority not in QUEUES:
        raise ValueError(f"priority must be one of {QUEUES}, not {priority!r}")
    app.send_task(
        CLASSIFY_TASK,
        args=[scan_id],
        kwargs={"attempt": attempt, "force": force},
        queue=priority,
        countdown=countdown,
    )


def submit_scans(
    sessions: sessionmaker[Session],
    app: Celery,
    scans: list[dict],
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
        inserted = set(db.add_scans(session, scans, batch_id, batch_name=batch_name))
        if move:
            # A forced re-submission replaces the scan's source and priority and moves it into
            # this batch, so the batch's progress and report include it.
            for scan in scans:
                if scan["scan_id"] in inserted:
                    continue
                values: dict[str, object] = {
                    "source_uri": scan["source_uri"],
                    "priority": scan.get("priority") or db.ROUTINE,
                    # The reconciler's grace period counts from here, not from the first submission.
                    "published_at": db.utcnow(),
                }
                if batch_id is not None:
                    values["batch_id"] = batch_id
                # An instance received over DICOM replacing the scan brings its UIDs (its provenance) along.
                values.update({name: scan[name] for name in db.DICOM_UID_FIELDS if scan.get(name)})
                session.execute(update(db.Scan).where(db.Scan.scan_id == scan["scan_id"]).values(**values))
            db.mark_scans(session, [s["scan_id"] for s in scans if s["scan_id"] not in inserted], db.QUEUED)
    # Rows are committed before messages go out, so a worker never sees an id it cannot find.
    # If publishing fails after the commit, the scans stay `queued`: the workers' reconciler re-sends
    # them once they have had no live message for LUNGCAM_REQUEUE_AFTER_S.
    for scan in scans:
        scan_id = scan["scan_id"]
        if scan_id in inserted or move:
            publish(app, scan_id, scan.get("priority") or db.ROUTINE, force=force and scan_id not in inserted)
            result.queued.append(scan_id)
        else:
            result.already.append(scan_id)
    return result


@dataclass
class RequeueResult:
    """What `lungcam requeue` did: scans published anew, held messages moved back, scans left alone (live)."""

    published: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)


def requeue_stale(sessions: sessionmaker[Session], app: Celery, *, older_than_s: float) -> RequeueResult:
    """Re-send scans still `queued` after older_than_s seconds that have no live message in the broker.

    A scan whose message waits in a queue, or is held by a consumer for less than older_than_s, is left
    alone (re-sending it would only duplicate it); a message held longer goes back to the head of its
    queue; a scan without any message is published anew. A broker that cannot be inspected (not Redis)
    gets every stale scan published, as before (the task is idempotent: a duplicate costs a skip).
    """
    from shared.broker_state import NotRedis, RedisBroker  # imports this module: not at the top

    cutoff = db.utcnow() - dt.timedelta(seconds=older_than_s)
    last_sent = func.coalesce(db.Scan.published_at, db.Scan.submitted_at, type_=db.UTCDateTime)
    with sessions() as session:
        stale = session.execute(
            select(db.Scan.scan_id, db.Scan.priority).where(db.Scan.status == db.QUEUED, last_sent < cutoff)
        ).all()
    result = RequeueResult()
    if not stale:
        return result
    broker = RedisBroker(app)
    try:
        snapshot = broker.snapshot()
    except NotRedis:
        snapshot = None
    now = time.time()
    held_too_long: dict[str, list[str]] = {}
    to_publish: list[tuple[str, str]] = []
    for scan_id, priority in stale:
        if snapshot is not None and snapshot.is_live(scan_id, now, older_than_s):
            result.live.append(scan_id)
            continue
        tags = [m.tag for m in snapshot.held.get(scan_id, ())] if snapshot is not None else []
        if tags:
            held_too_long[scan_id] = tags
        to_publish.append((scan_id, priority))
    restored = broker.restore(tag for tags in held_too_long.values() for tag in tags) if held_too_long else set()
    with sessions.begin() as session:
        # The reconciler's grace period counts from this re-send, so it does not send the same scans again at once.
        ids = [scan_id for scan_id, _ in to_publish]
        session.execute(update(db.Scan).where(db.Scan.scan_id.in_(ids), db.Scan.status == db.QUEUED)
                        .values(published_at=db.utcnow()).execution_options(synchronize_session=False))
    for scan_id, priority in to_publish:
        if restored.intersection(held_too_long.get(scan_id, ())):
            result.restored.append(scan_id)
            continue
        publish(app, scan_id, priority)
        result.published.append(scan_id)
    return result
