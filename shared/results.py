"""Reading results back: one scan with its predictions, a batch's progress, a batch's scans.

Scans come back as ORM rows with their predictions loaded, readable after the session closes
(sessions do not expire on commit); the API turns them into response models in one step.

By default a scan's predictions are those of the model versions its batch was screened with
(`batch_models`, recorded by the workers), so re-screening a folder with other models never mixes
their verdicts in; `all_models=True` returns every prediction, and `ModelKey`s in
`batch_model_keys` tell which are current.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, false, or_, select
from sqlalchemy.orm import Session, selectinload

from shared.domain import FINISHED_STATUSES
from shared.models import Batch, Prediction, Scan
from shared.scans import batch_counts, batch_model_versions


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
        """Scans that are done, failed or skipped."""
        return sum(self.counts.get(status, 0) for status in FINISHED_STATUSES)

    @property
    def complete(self) -> bool:
        """True when no scan is queued or running."""
        return self.finished == self.total

    @property
    def progress(self) -> float:
        """Fraction of scans finished (1.0 for an empty batch)."""
        return self.finished / self.total if self.total else 1.0


ModelKey = tuple[str, str]


def batch_model_keys(session: Session, batch_id: str | None) -> list[ModelKey]:
    """(name, version) of the models a batch was screened with (empty for none recorded)."""
    if batch_id is None:
        return []
    return [(row.model_name, row.model_version) for row in batch_model_versions(session, batch_id)]


def demonstration_keys(session: Session, batch_id: str) -> set[ModelKey]:
    """The batch's models whose bundles are demonstration models."""
    return {(row.model_name, row.model_version) for row in batch_model_versions(session, batch_id) if row.demonstration}


def _predictions(models: list[ModelKey] | None) -> Any:
    """Load a scan's predictions, only those of `models` when given (None: all of them)."""
    if models is None:
        return selectinload(Scan.predictions)
    match = or_(*(and_(Prediction.model_name == name, Prediction.model_version == version) for name, version in models))
    return selectinload(Scan.predictions.and_(match if models else false()))


def get_scan(session: Session, scan_id: str, *, all_models: bool = False) -> Scan | None:
    """One scan with its predictions (its batch's models unless all_models), or None."""
    batch_id = session.scalar(select(Scan.batch_id).where(Scan.scan_id == scan_id))
    models = batch_model_keys(session, batch_id)
    option = _predictions(None if all_models or not models else models)
    return session.scalars(
        select(Scan).where(Scan.scan_id == scan_id).options(option).execution_options(populate_existing=True)
    ).first()


def get_batch_progress(session: Session, batch_id: str) -> BatchProgress | None:
    """A batch's counts per status, or None if there is no such batch."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return None
    return BatchProgress(batch.batch_id, batch.name, batch.submitted_at, batch_counts(session, batch_id))


def list_batch_scans(session: Session, batch_id: str, *, all_models: bool = False) -> list[Scan]:
    """Every scan of a batch with its predictions (the batch's models unless all_models), ordered by scan id."""
    models = batch_model_keys(session, batch_id)
    # A batch with no models recorded (screened before batches recorded them) shows everything.
    option = _predictions(None if all_models or not models else models)
    scans = session.scalars(
        select(Scan)
        .where(Scan.batch_id == batch_id)
        .order_by(Scan.scan_id)
        .options(option, selectinload(Scan.result_sends))
        .execution_options(populate_existing=True)
    )
    return list(scans)
