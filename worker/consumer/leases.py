"""Leases on claimed scans: a heartbeat thread renews them while their batch runs, so a dead worker's expire."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections import Counter

from sqlalchemy.orm import Session, sessionmaker

from shared.scans import renew_leases

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """host:pid:random, so a restarted container (same host name, pid 1 again) is a new holder."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class LeaseKeeper:
    """Holds the scan ids this worker is processing and renews their leases every lease_s/3."""

    def __init__(self, sessions: sessionmaker[Session], lease_s: float, worker_id: str | None = None) -> None:
        """Renew leases of lease_s seconds in the database behind sessions, as worker_id."""
        self.sessions = sessions
        self.lease_s = lease_s
        self.worker_id = worker_id or default_worker_id()
        # A Counter, because two in-flight batches of this worker may both hold a (duplicate) scan id.
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the heartbeat thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lungcam-leases", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat thread; held leases then expire on their own."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def holds(self, scan_id: str) -> bool:
        """Whether a batch of this worker is processing scan_id right now."""
        with self._lock:
            return self._held[scan_id] > 0

    def hold(self, scan_ids: list[str]) -> None:
        """Start renewing the leases of scan_ids (just claimed)."""
        self.start()
        with self._lock:
            self._held.update(scan_ids)

    def release(self, scan_ids: list[str]) -> None:
        """Stop renewing the leases of scan_ids (their batch ended)."""
        with self._lock:
            self._held.subtract(scan_ids)
            self._held = +self._held  # drop zero counts

    def renew_now(self) -> int:
        """Renew every held lease once; returns how many rows were renewed."""
        with self._lock:
            held = list(self._held)
        if not held:
            return 0
        with self.sessions.begin() as session:
            return renew_leases(session, held, self.worker_id, self.lease_s)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3.0):
            try:
                self.renew_now()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat only shortens the lease
                log.warning("could not renew leases: %s", type(exc).__name__)
