"""The reconciler: re-queues scans whose lease expired and re-sends queued scans that have no live message.

Every worker runs one in a background thread; a Redis `SET NX PX` lock lets one of them act per
interval. Each scan is re-sent at its own priority. Processing is idempotent (a finished scan is
skipped, a scan under another live lease is skipped), so a message too many costs a skip.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared.broker_state import BrokerSnapshot, NotRedis, RedisBroker
from shared.models import utcnow
from shared.queueing import publish
from shared.scans import expired_lease_ids, give_up_expired, requeue_expired, stale_queued, stamp_published
from shared.settings import Settings

log = logging.getLogger(__name__)

LOCK_KEY = "lungcam:reconciler"
# Scans handled per pass and kind; a larger backlog is worked through over the next passes.
PASS_LIMIT = 2000


@dataclass
class ReconcileReport:
    """What one pass did (counts only ever reach the logs)."""

    expired: list[str] = field(default_factory=list)  # lease expired: re-queued
    gave_up: list[str] = field(default_factory=list)  # lease expired max_attempts times: failed
    lost: list[str] = field(default_factory=list)  # queued without a live message: re-sent
    restored: int = 0  # of those, put back at the head of their queue rather than published anew

    def __bool__(self) -> bool:
        return bool(self.expired or self.gave_up or self.lost)


class Reconciler:
    """One pass every reconcile_interval_s, by whichever worker takes the lock first."""

    def __init__(self, app: Celery, sessions: sessionmaker[Session], settings: Settings, owner: str) -> None:
        """Publish through app, read and repair scans through sessions; owner names this worker in the lock."""
        self.app = app
        self.sessions = sessions
        self.settings = settings
        self.owner = owner
        self.broker = RedisBroker(app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run passes in a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._loop, name="lungcam-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        # The first pass runs at once: a worker restarted after a crash recovers without waiting.
        while not self._stop.is_set():
            try:
                if self._take_turn():
                    report = self.run_once()
                    if report:
                        log.info(
                            "reconciler: %d expired leases re-queued, %d given up, %d lost messages re-sent (%d restored)",
                            len(report.expired),
                            len(report.gave_up),
                            len(report.lost),
                            report.restored,
                        )
            except Exception as exc:  # noqa: BLE001 - broker or database down: try again next interval
                log.warning("reconciler pass skipped: %s", type(exc).__name__)
            self._stop.wait(self.settings.reconcile_interval_s)

    def _take_turn(self) -> bool:
        """The fleet-wide lock, held for one interval (not released: it also spaces the passes)."""
        try:
            return self.broker.try_lock(LOCK_KEY, self.owner, int(self.settings.reconcile_interval_s * 1000))
        except NotRedis:
            return True  # an in-memory broker serves one process

    def run_once(self, now: dt.datetime | None = None) -> ReconcileReport:
        """One pass: expired leases first, then queued scans without a live message."""
        now = now or utcnow()
        try:
            snapshot: BrokerSnapshot | None = self.broker.snapshot()
        except NotRedis:
            snapshot = None  # cannot see messages: re-send by age alone (duplicates cost a skip)
        report = ReconcileReport()
        expired = self._requeue_expired(now, report)
        self._resend(expired, snapshot, report, now.timestamp(), hold_limit_s=0.0)
        lost = self._claim_lost(now, snapshot)
        report.lost = [scan_id for scan_id, _ in lost]
        self._resend(lost, snapshot, report, now.timestamp(), hold_limit_s=self.settings.requeue_after_s)
        return report

    def _requeue_expired(self, now: dt.datetime, report: ReconcileReport) -> list[tuple[str, str]]:
        """Fail scans that used up max_attempts, set the other expired-lease scans back to queued."""
        # Rows claimed before leases existed have none: give them the visibility timeout, as before.
        legacy_cutoff = now - dt.timedelta(seconds=self.settings.visibility_timeout_s)
        with self.sessions.begin() as session:
            ids = expired_lease_ids(session, now, legacy_cutoff, PASS_LIMIT)
            if not ids:
                return []
            report.gave_up = give_up_expired(session, ids, now, legacy_cutoff, self.settings.max_attempts)
            rows = requeue_expired(session, ids, now, legacy_cutoff)
        report.expired = [scan_id for scan_id, _ in rows]
        return rows

    def _claim_lost(self, now: dt.datetime, snapshot: BrokerSnapshot | None) -> list[tuple[str, str]]:
        """Queued scans older than requeue_after_s without a live message, stamped as published now."""
        grace = self.settings.requeue_after_s
        cutoff = now - dt.timedelta(seconds=grace)
        epoch = now.timestamp()
        with self.sessions.begin() as session:
            # Oldest first, so a large backlog is repaired in submission order over several passes.
            candidates = stale_queued(session, cutoff, limit=PASS_LIMIT * 5)
            ids = [
                scan_id for scan_id, _ in candidates if snapshot is None or not snapshot.is_live(scan_id, epoch, grace)
            ][:PASS_LIMIT]
            if not ids:
                return []
            # Conditional on "still queued and stale", so a scan claimed meanwhile is left alone.
            return stamp_published(session, ids, now, sent_before=cutoff)

    def _resend(
        self,
        scans: list[tuple[str, str]],
        snapshot: BrokerSnapshot | None,
        report: ReconcileReport,
        epoch: float,
        *,
        hold_limit_s: float,
    ) -> None:
        """Per scan: a waiting message is enough; a held one goes back to the head of its queue; else publish anew."""
        stale: dict[str, list[str]] = {}
        for scan_id, _priority in scans:
            if snapshot is not None and scan_id not in snapshot.waiting:
                # hold_limit 0: the holder's lease expired, so it is gone; otherwise only messages held too long.
                stale[scan_id] = [
                    m.tag
                    for m in snapshot.held.get(scan_id, ())
                    if epoch - max(m.delivered_at, m.eta or 0.0) >= hold_limit_s
                ]
        restored = self.broker.restore(tag for tags in stale.values() for tag in tags) if stale else set()
        for scan_id, priority in scans:
            if snapshot is not None and scan_id in snapshot.waiting:
                continue
            if restored.intersection(stale.get(scan_id, ())):
                report.restored += 1
                continue
            # A scan stays queued in SQL if this fails, so the next pass tries again.
            publish(self.app, scan_id, priority)
