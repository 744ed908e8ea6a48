"""Reading results back: one scan with its predictions, a batch's progress, a batch's rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from shared import db


@dataclass
class PredictionView:
    """One model's verdict, as shown to users."""

    model_name: str
    model_version: str
    label: str
    p_covid: float
    overlay_key: str | None
    inference_ms: float | None


@dataclass
class ScanView:
    """A scan's status and predictions."""

    scan_id: str
    status: str
    priority: str
    batch_id: str | None
    error: str | None
    submitted_at: dt.datetime
    finished_at: dt.datetime | None
    attempts: int
    source_uri: str
    predictions: list[PredictionView] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        data = asdict(self)
        data["submitted_at"] = self.submitted_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return data


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


def _view(scan: db.Scan) -> ScanView:
    return ScanView(
        scan_id=scan.scan_id,
        status=scan.status,
        priority=scan.priority,
        batch_id=scan.batch_id,
        error=scan.error,
        submitted_at=scan.submitted_at,
        finished_at=scan.finished_at,
        attempts=scan.attempts,
        source_uri=scan.source_uri,
        predictions=[
            PredictionView(p.model_name, p.model_version, p.label, p.p_covid, p.overlay_key, p.inference_ms)
            for p in scan.predictions
        ],
    )


def get_scan(session: Session, scan_id: str) -> ScanView | None:
    """One scan with its predictions, or None."""
    scan = session.scalars(
        select(db.Scan).where(db.Scan.scan_id == scan_id).options(selectinload(db.Scan.predictions))
    ).first()
    return _view(scan) if scan else None


def get_batch_progress(session: Session, batch_id: str) -> BatchProgress | None:
    """A batch's counts per status, or None if there is no such batch."""
    batch = session.get(db.Batch, batch_id)
    if batch is None:
        return None
    return BatchProgress(batch.batch_id, batch.name, batch.submitted_at, db.batch_counts(session, batch_id))


def list_batch_scans(session: Session, batch_id: str) -> list[ScanView]:
    """Every scan of a batch with its predictions, ordered by scan id."""
    scans = session.scalars(
        select(db.Scan)
        .where(db.Scan.batch_id == batch_id)
        .order_by(db.Scan.scan_id)
        .options(selectinload(db.Scan.predictions))
    )
    return [_view(scan) for scan in scans]
