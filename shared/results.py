"""Reading results back: one scan with its predictions, a batch's progress, a batch's scans.

Scans come back as ORM rows with their predictions loaded, readable after the session closes
(sessions do not expire on commit); the API turns them into response models in one step.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from shared import db


@dataclass
class BatchProgress:
    """Counts per status for a batch and how far along it is."""

    batch_id: str
    name: str | None
    submitted_at: dt.datetime
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """Number of scans in the batch."""
        return self.counts.get("total", 0)

    @property
    def finished(self) -> int:
        """Scans that are done or failed."""
        return self.counts.get(db.DONE, 0) + self.counts.get(db.FAILED, 0)

    @property
    def complete(self) -> bool:
        """True when no scan is queued or running."""
        return self.finished == self.total

    @property
    def progress(self) -> float:
        """Fraction of scans finished (1.0 for an empty batch)."""
        return self.finished / self.total if self.total else 1.0


def get_scan(session: Session, scan_id: str) -> db.Scan | None:
    """One scan with its predictions, or None."""
    return session.scalars(
        select(db.Scan).where(db.Scan.scan_id == scan_id).options(selectinload(db.Scan.predictions))
    ).first()


def get_batch_progress(session: Session, batch_id: str) -> BatchProgress | None:
    """A batch's counts per status, or None if there is no such batch."""
    batch = session.get(db.Batch, batch_id)
    if batch is None:
        return None
    return BatchProgress(batch.batch_id, batch.name, batch.submitted_at, db.batch_counts(session, batch_id))


def list_batch_scans(session: Session, batch_id: str) -> list[db.Scan]:
    """Every scan of a batch with its predictions, ordered by scan id."""
    scans = session.scalars(
        select(db.Scan)
        .where(db.Scan.batch_id == batch_id)
        .order_by(db.Scan.scan_id)
        .options(selectinload(db.Scan.predictions), selectinload(db.Scan.result_sends))
    )
    return list(scans)
