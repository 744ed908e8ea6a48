"""The scan repository: every write to `scans` (and the predictions and batch rows that go with it), and its queries.

Helpers run statements on the caller's session and never commit: the caller owns the transaction,
so a worker can upsert predictions and mark scans done atomically. Id lists are sent in chunks, so
IN (...) lists and multi-row VALUES stay under every driver's bound-parameter limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from shared.domain import Priority, Status
from shared.models import Batch, BatchModel, Prediction, Scan, UTCDateTime, utcnow

# Keeps IN (...) lists and multi-row VALUES well under every driver's bound-parameter limit.
_CHUNK = 500
# A scan that is not running holds no lease.
_NO_LEASE: dict[str, Any] = {"worker_id": None, "claimed_at": None, "lease_expires_at": None}

_T = TypeVar("_T")


@dataclass(frozen=True)
class NewScan:
    """A scan to record as queued: where its image is, how urgent it is, and its DICOM UIDs if it came over DICOM."""

    scan_id: str
    source_uri: str
    priority: Priority = Priority.ROUTINE
    # None: now. Given only by tests and imports that keep an original submission time.
    submitted_at: dt.datetime | None = None
    # Instances received from or pulled out of a PACS carry these; results go back to the PACS by them.
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        """Refuse an id the scans table cannot hold and a priority that is not one; store the priority as Priority."""
        if not self.scan_id or len(self.scan_id) > 128:
            raise ValueError("scan_id must be 1 to 128 characters")
        try:
            object.__setattr__(self, "priority", Priority(self.priority))
        except ValueError:
            raise ValueError(f"priority must be one of {[p.value for p in Priority]}, not {self.priority!r}") from None

    def dicom_uids(self) -> dict[str, str]:
        """The DICOM UIDs this scan carries (none for PNG/JPEG files and uploads)."""
        uids = {"study_uid": self.study_uid, "series_uid": self.series_uid, "sop_instance_uid": self.sop_instance_uid}
        return {name: uid for name, uid in uids.items() if uid}


@dataclass(frozen=True)
class PredictionRow:
    """One model's verdict on one scan, as upsert_predictions writes it."""

    scan_id: str
    model_name: str
    model_version: str
    label: str
    p_covid: float
    threshold: float | None = None
    overlay_key: str | None = None
    cam_note: str | None = None
    inference_ms: float | None = None
    # None: now.
    created_at: dt.datetime | None = field(default=None, compare=False)


_PREDICTION_UPDATED = ("label", "p_covid", "threshold", "overlay_key", "cam_note", "inference_ms", "created_at")


def _dialect_insert(session: Session) -> Any:
    """The dialect's insert() construct, which has on_conflict_* (SQLite and PostgreSQL only)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(f"upserts are implemented for sqlite and postgresql, not {name}")


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unique(scan_ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(scan_ids))


# --- recording scans and results ---


def ensure_batch(session: Session, batch_id: str, name: str | None = None) -> bool:
    """Create the batch row if missing; True if it was created."""
    insert = _dialect_insert(session)
    statement = (
        insert(Batch)
        .values(batch_id=batch_id, name=name, submitted_at=utcnow())
        .on_conflict_do_nothing(index_elements=["batch_id"])
        .returning(Batch.batch_id)
    )
    return session.execute(statement).first() is not None


def add_scans(
    session: Session, scans: Sequence[NewScan], batch_id: str | None, *, batch_name: str | None = None
) -> list[str]:
    """Insert new scans as queued (creating the batch if needed); returns the ids inserted, in input order."""
    if batch_id is not None:
        ensure_batch(session, batch_id, batch_name)
    now = utcnow()
    unique: dict[str, dict[str, Any]] = {}
    for scan in scans:
        # First occurrence wins, as it would have if the duplicates had come in separate calls.
        unique.setdefault(
            scan.scan_id,
            {
                "scan_id": scan.scan_id,
                "source_uri": scan.source_uri,
                "priority": scan.priority.value,
                "batch_id": batch_id,
                "status": Status.QUEUED.value,
                "attempts": 0,
                "submitted_at": scan.submitted_at or now,
                "study_uid": scan.study_uid,
                "series_uid": scan.series_uid,
                "sop_instance_uid": scan.sop_instance_uid,
            },
        )
    if not unique:
        return []
    insert = _dialect_insert(session)
    inserted: set[str] = set()
    for chunk in _chunks(list(unique.values())):
        # ON CONFLICT DO NOTHING rather than "select then insert": two ingests racing on the same id
        # both succeed, and RETURNING reports only the rows this call really created.
        statement = (
            insert(Scan).values(list(chunk)).on_conflict_do_nothing(index_elements=["scan_id"]).returning(Scan.scan_id)
        )
        inserted.update(session.execute(statement).scalars())
    return [scan_id for scan_id in unique if scan_id in inserted]


def resubmit_scans(session: Session, scans: Sequence[NewScan], batch_id: str | None) -> None:
    """Give existing scans the source and priority submitted again, stamp published_at, move them into batch_id."""
    now = utcnow()
    for scan in scans:
        values: dict[str, Any] = {
            "source_uri": scan.source_uri,
            "priority": scan.priority.value,
            # The reconciler's grace period counts from here, not from the first submission.
            "published_at": now,
        }
        if batch_id is not None:
            values["batch_id"] = batch_id
        # An instance received over DICOM replacing the scan brings its UIDs (its provenance) along.
        values.update(scan.dicom_uids())
        session.execute(update(Scan).where(Scan.scan_id == scan.scan_id).values(**values))


def upsert_predictions(session: Session, rows: Sequence[PredictionRow]) -> None:
    """Insert predictions, overwriting an existing row for the same (scan_id, model_name, model_version)."""
    if not rows:
        return
    now = utcnow()
    # Deduplicate within the call (last wins): PostgreSQL refuses to update one row twice in a statement.
    unique: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        unique[(row.scan_id, row.model_name, row.model_version)] = {
            "scan_id": row.scan_id,
            "model_name": row.model_name,
            "model_version": row.model_version,
            "label": row.label,
            "p_covid": row.p_covid,
            "threshold": row.threshold,
            "overlay_key": row.overlay_key,
            "cam_note": row.cam_note,
            "inference_ms": row.inference_ms,
            "created_at": row.created_at or now,
        }
    insert = _dialect_insert(session)
    for chunk in _chunks(list(unique.values())):
        statement = insert(Prediction).values(list(chunk))
        statement = statement.on_conflict_do_update(
            index_elements=["scan_id", "model_name", "model_version"],
            set_={name: statement.excluded[name] for name in _PREDICTION_UPDATED},
        )
        session.execute(statement)


def record_batch_models(session: Session, batch_ids: Iterable[str], models: Iterable[tuple[str, str, bool]]) -> None:
    """Note that these batches were screened with these (name, version, demonstration) models; idempotent."""
    rows = [
        {
            "batch_id": batch_id,
            "model_name": name,
            "model_version": version,
            "demonstration": demo,
            "recorded_at": utcnow(),
        }
        for batch_id in sorted(set(batch_ids))
        for name, version, demo in models
    ]
    if not rows:
        return
    insert = _dialect_insert(session)
    for chunk in _chunks(rows):
        session.execute(
            insert(BatchModel)
            .values(list(chunk))
            .on_conflict_do_nothing(index_elements=["batch_id", "model_name", "model_version"])
        )


# --- status changes and leases ---


def mark_scans(
    session: Session,
    scan_ids: Iterable[str],
    status: Status,
    *,
    error: str | None = None,
    finished: bool = False,
) -> None:
    """Set status and error of scans; finished stamps finished_at (else clears it); 'running' counts an attempt."""
    try:
        status = Status(status)
    except ValueError:
        raise ValueError(f"status must be one of {[s.value for s in Status]}, not {status!r}") from None
    values: dict[str, Any] = {
        "status": status.value,
        "error": error,
        "finished_at": utcnow() if finished else None,
    }
    if status is Status.RUNNING:
        # Each delivery that starts work is an attempt, so redeliveries and retries show up here.
        values["attempts"] = Scan.attempts + 1
    else:
        # Only a running scan holds a lease.
        values.update(_NO_LEASE)
    for chunk in _chunks(_unique(scan_ids)):
        # The default "auto" synchronisation updates Scan objects already loaded in this session,
        # which would otherwise keep showing the old status (sessions here do not expire on commit).
        session.execute(update(Scan).where(Scan.scan_id.in_(chunk)).values(**values))


def claim_scans(
    session: Session, scan_ids: Iterable[str], worker_id: str, lease_s: float, *, take_over: Iterable[str] = ()
) -> list[str]:
    """Mark scans running under worker_id's lease (lease_s from now), counting an attempt; returns those claimed.

    A scan under another worker's live lease is left alone (unless in take_over, e.g. forced): the
    condition is in the UPDATE, so two workers racing for one scan cannot both claim it.
    """
    now = utcnow()
    take_over = set(take_over)
    values = {
        "status": Status.RUNNING.value,
        "error": None,
        "finished_at": None,
        "attempts": Scan.attempts + 1,
        "worker_id": worker_id,
        "claimed_at": now,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
    }
    free = or_(
        Scan.status != Status.RUNNING.value,
        Scan.lease_expires_at.is_(None),
        Scan.lease_expires_at <= now,
        Scan.worker_id == worker_id,
    )
    claimed: set[str] = set()
    ids = _unique(scan_ids)
    for chunk in _chunks(ids):
        condition = or_(free, Scan.scan_id.in_([s for s in chunk if s in take_over])) if take_over else free
        statement = update(Scan).where(Scan.scan_id.in_(chunk), condition).values(**values).returning(Scan.scan_id)
        claimed.update(session.execute(statement.execution_options(synchronize_session=False)).scalars())
    return [scan_id for scan_id in ids if scan_id in claimed]


def renew_leases(session: Session, scan_ids: Iterable[str], worker_id: str, lease_s: float) -> int:
    """Extend worker_id's leases on scans it still holds (running, not taken over); returns how many."""
    expires = utcnow() + dt.timedelta(seconds=lease_s)
    renewed = 0
    for chunk in _chunks(_unique(scan_ids)):
        # An UPDATE's result is a CursorResult, which has the rowcount.
        result = cast(
            "CursorResult[Any]",
            session.execute(
                update(Scan)
                .where(Scan.scan_id.in_(chunk), Scan.status == Status.RUNNING.value, Scan.worker_id == worker_id)
                .values(lease_expires_at=expires)
                .execution_options(synchronize_session=False)
            ),
        )
        renewed += result.rowcount or 0
    return renewed


def fail_unfinished(session: Session, reasons: dict[str, str]) -> list[str]:
    """Mark scans failed with their reason unless they are done (a late failure never undoes a result)."""
    failed: list[str] = []
    for scan_id, reason in reasons.items():
        statement = (
            update(Scan)
            .where(Scan.scan_id == scan_id, Scan.status != Status.DONE.value)
            .values(status=Status.FAILED.value, error=reason, finished_at=utcnow(), **_NO_LEASE)
            .returning(Scan.scan_id)
            .execution_options(synchronize_session=False)
        )
        failed.extend(session.execute(statement).scalars())
    return failed


def requeue_scans(session: Session, scan_ids: Iterable[str], worker_id: str | None = None) -> list[tuple[str, str]]:
    """Set running scans back to queued (only worker_id's, if given), stamping published_at; returns (id, priority)."""
    requeued: list[tuple[str, str]] = []
    for chunk in _chunks(_unique(scan_ids)):
        statement = update(Scan).where(Scan.scan_id.in_(chunk), Scan.status == Status.RUNNING.value)
        if worker_id is not None:
            # A retry gives back only what this worker still holds, not a scan another worker took over.
            statement = statement.where(Scan.worker_id == worker_id)
        statement = statement.values(status=Status.QUEUED.value, published_at=utcnow(), **_NO_LEASE).returning(
            Scan.scan_id, Scan.priority
        )
        requeued.extend(
            (scan_id, priority)
            for scan_id, priority in session.execute(statement.execution_options(synchronize_session=False))
        )
    return requeued


# --- recovery: expired leases and queued scans without a message ---


def _lease_expired(now: dt.datetime, legacy_cutoff: dt.datetime) -> ColumnElement[bool]:
    """Running with a lease that ran out, or (claimed before leases existed) submitted before legacy_cutoff."""
    return and_(
        Scan.status == Status.RUNNING.value,
        or_(
            Scan.lease_expires_at < now,
            and_(Scan.lease_expires_at.is_(None), Scan.submitted_at < legacy_cutoff),
        ),
    )


def expired_lease_ids(session: Session, now: dt.datetime, legacy_cutoff: dt.datetime, limit: int) -> list[str]:
    """Up to limit running scans whose lease expired by now (lease-less rows: submitted before legacy_cutoff)."""
    return list(session.scalars(select(Scan.scan_id).where(_lease_expired(now, legacy_cutoff)).limit(limit)))


def give_up_expired(
    session: Session, scan_ids: Sequence[str], now: dt.datetime, legacy_cutoff: dt.datetime, max_attempts: int
) -> list[str]:
    """Fail those of scan_ids whose lease (still) expired after max_attempts attempts; returns their ids."""
    given_up: list[str] = []
    for chunk in _chunks(_unique(scan_ids)):
        statement = (
            update(Scan)
            .where(Scan.scan_id.in_(chunk), _lease_expired(now, legacy_cutoff), Scan.attempts >= max_attempts)
            .values(
                status=Status.FAILED.value,
                error=f"gave up after {max_attempts} attempts: its worker stopped each time",
                finished_at=now,
                **_NO_LEASE,
            )
            .returning(Scan.scan_id)
        )
        given_up.extend(session.scalars(statement.execution_options(synchronize_session=False)))
    return given_up


def requeue_expired(
    session: Session, scan_ids: Sequence[str], now: dt.datetime, legacy_cutoff: dt.datetime
) -> list[tuple[str, str]]:
    """Set those of scan_ids whose lease (still) expired back to queued, published now; returns (id, priority)."""
    requeued: list[tuple[str, str]] = []
    for chunk in _chunks(_unique(scan_ids)):
        statement = (
            update(Scan)
            .where(Scan.scan_id.in_(chunk), _lease_expired(now, legacy_cutoff))
            .values(status=Status.QUEUED.value, published_at=now, **_NO_LEASE)
            .returning(Scan.scan_id, Scan.priority)
        )
        rows = session.execute(statement.execution_options(synchronize_session=False))
        requeued.extend((scan_id, priority) for scan_id, priority in rows)
    return requeued


def _queued_since(cutoff: dt.datetime) -> ColumnElement[bool]:
    """Queued, and last published (or submitted, if never re-published) before cutoff."""
    last_sent = func.coalesce(Scan.published_at, Scan.submitted_at, type_=UTCDateTime)
    return and_(Scan.status == Status.QUEUED.value, last_sent < cutoff)


def stale_queued(session: Session, cutoff: dt.datetime, limit: int | None = None) -> list[tuple[str, str]]:
    """(id, priority) of scans queued and last sent before cutoff, oldest submission first (at most limit)."""
    statement = select(Scan.scan_id, Scan.priority).where(_queued_since(cutoff)).order_by(Scan.submitted_at)
    if limit is not None:
        statement = statement.limit(limit)
    return [(scan_id, priority) for scan_id, priority in session.execute(statement)]


def stamp_published(
    session: Session, scan_ids: Sequence[str], now: dt.datetime, *, sent_before: dt.datetime | None = None
) -> list[tuple[str, str]]:
    """Stamp published_at=now on those of scan_ids still queued (and, if given, last sent before sent_before).

    Returns (id, priority) of the scans stamped: the condition is in the UPDATE, so a scan claimed
    (or re-sent by someone else) meanwhile is left alone.
    """
    condition = _queued_since(sent_before) if sent_before is not None else Scan.status == Status.QUEUED.value
    stamped: list[tuple[str, str]] = []
    for chunk in _chunks(_unique(scan_ids)):
        statement = (
            update(Scan)
            .where(Scan.scan_id.in_(chunk), condition)
            .values(published_at=now)
            .returning(Scan.scan_id, Scan.priority)
        )
        rows = session.execute(statement.execution_options(synchronize_session=False))
        stamped.extend((scan_id, priority) for scan_id, priority in rows)
    return stamped


# --- queries ---


def existing_scan_ids(session: Session, scan_ids: Sequence[str]) -> set[str]:
    """The subset of scan_ids that already have a row."""
    found: set[str] = set()
    for chunk in _chunks(_unique(scan_ids)):
        found.update(session.scalars(select(Scan.scan_id).where(Scan.scan_id.in_(chunk))))
    return found


def dicom_received_ids(session: Session, scan_ids: Sequence[str]) -> set[str]:
    """The subset of scan_ids received over DICOM (listener or DICOMweb pull): rows that carry a SOP Instance UID."""
    found: set[str] = set()
    for chunk in _chunks(_unique(scan_ids)):
        found.update(
            session.scalars(select(Scan.scan_id).where(Scan.scan_id.in_(chunk), Scan.sop_instance_uid.is_not(None)))
        )
    return found


def batch_model_versions(session: Session, batch_id: str) -> list[BatchModel]:
    """The model versions a batch was screened with, in the order they were first recorded."""
    return list(
        session.scalars(
            select(BatchModel)
            .where(BatchModel.batch_id == batch_id)
            .order_by(BatchModel.recorded_at, BatchModel.model_name)
        )
    )


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    """Scans of the batch per status (every status present, 0 if none) plus 'total'."""
    counts = {status.value: 0 for status in Status}
    rows = session.execute(
        select(Scan.status, func.count()).where(Scan.batch_id == batch_id).group_by(Scan.status)
    ).all()
    for status, count in rows:
        counts[status] = int(count)
    counts["total"] = sum(counts[status.value] for status in Status)
    return counts
