"""Queueing scans: a `scans` row first, then one small message carrying only the scan id."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import db
from worker.celery_app import CLASSIFY_TASK, QUEUES


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
) -> SubmitResult:
    """Record scans as queued and publish them; existing scans are re-queued only with force."""
    result = SubmitResult()
    with sessions.begin() as session:
        inserted = set(db.add_scans(session, scans, batch_id, batch_name=batch_name))
        if force:
            # A forced re-submission replaces the scan's source and priority and moves it into
            # this batch, so the batch's progress and report include it.
            for scan in scans:
                if scan["scan_id"] in inserted:
                    continue
                values = {"source_uri": scan["source_uri"], "priority": scan.get("priority") or db.ROUTINE}
                if batch_id is not None:
                    values["batch_id"] = batch_id
                session.execute(update(db.Scan).where(db.Scan.scan_id == scan["scan_id"]).values(**values))
            db.mark_scans(session, [s["scan_id"] for s in scans if s["scan_id"] not in inserted], db.QUEUED)
    # Rows are committed before messages go out, so a worker never sees an id it cannot find.
    # If publishing fails after the commit, the scans stay `queued`: `requeue_stale` re-sends them.
    for scan in scans:
        scan_id = scan["scan_id"]
        if scan_id in inserted or force:
            publish(app, scan_id, scan.get("priority") or db.ROUTINE, force=force and scan_id not in inserted)
            result.queued.append(scan_id)
        else:
            result.already.append(scan_id)
    return result


def requeue_stale(sessions: sessionmaker[Session], app: Celery, *, older_than_s: float) -> list[str]:
    """Re-publish scans still `queued` after older_than_s seconds (lost messages); the task is idempotent."""
    cutoff = db.utcnow() - dt.timedelta(seconds=older_than_s)
    with sessions() as session:
        stale = session.execute(
            select(db.Scan.scan_id, db.Scan.priority).where(db.Scan.status == db.QUEUED, db.Scan.submitted_at < cutoff)
        ).all()
    for scan_id, priority in stale:
        publish(app, scan_id, priority)
    return [scan_id for scan_id, _ in stale]
