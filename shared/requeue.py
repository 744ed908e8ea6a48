"""`lungcam requeue`: re-send queued scans that have no live message in the broker (and only those)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared.broker_state import NotRedis, RedisBroker
from shared.models import utcnow
from shared.queueing import publish
from shared.scans import stale_queued, stamp_published


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
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    with sessions() as session:
        stale = stale_queued(session, cutoff)
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
        stamp_published(session, [scan_id for scan_id, _ in to_publish], utcnow())
    for scan_id, priority in to_publish:
        if restored.intersection(held_too_long.get(scan_id, ())):
            result.restored.append(scan_id)
            continue
        publish(app, scan_id, priority)
        result.published.append(scan_id)
    return result
