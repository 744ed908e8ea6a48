"""Database schema (SQLAlchemy 2.0 declarative) and the few data-access helpers the worker and API share.

Helpers run statements on the caller's session and never commit: the caller owns the transaction,
so a worker can upsert predictions and mark scans done atomically.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

from shared.errors import SchemaOutOfDate

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
# A valid image that is not a frontal chest film by its DICOM header: not classified, not a failure.
SKIPPED = "skipped"
STATUSES: tuple[str, ...] = (QUEUED, RUNNING, DONE, FAILED, SKIPPED)
# The statuses a scan ends in: nothing more happens to it unless it is submitted again.
FINISHED_STATUSES: tuple[str, ...] = (DONE, FAILED, SKIPPED)
STAT, ROUTINE = "stat", "routine"
PRIORITIES: tuple[str, ...] = (STAT, ROUTINE)
# Optional scan fields of DICOM scans (add_scans accepts them; results go back to the PACS by these).
DICOM_UID_FIELDS: tuple[str, ...] = ("study_uid", "series_uid", "sop_instance_uid")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# SQLite waits this long for another process's write lock before raising "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock key that serialises concurrent migrations ("lungcam" in ASCII).
MIGRATION_LOCK_KEY = 0x6C756E6763616D
# Keeps IN (...) lists and multi-row VALUES well under every driver's bound-parameter limit.
_CHUNK = 500

# Deterministic constraint names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """DateTime(timezone=True) that always returns aware UTC, also on SQLite (which stores no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        """Refuse naive datetimes (their zone is a guess) and store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC (shared.db.utcnow())")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        """Attach UTC to what SQLite hands back naive; normalise PostgreSQL's session zone to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    """Declarative base; its metadata is Alembic's target."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Batch(Base):
    """A named group of scans submitted together; progress is derived from its scans."""

    __tablename__ = "batches"

    batch_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now())

    scans: Mapped[list[Scan]] = relationship(back_populates="batch", passive_deletes=True)


class BatchModel(Base):
    """A model version a batch was screened with (recorded by the workers that served it)."""

    __tablename__ = "batch_models"

    batch_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("batches.batch_id", ondelete="CASCADE"), primary_key=True
    )
    model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    # True for a bundle whose manifest says it is a demonstration model (trained on synthetic images).
    demonstration: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now())


class Scan(Base):
    """One image to classify and where it is in its life (queued, running, done, failed)."""

    __tablename__ = "scans"
    __table_args__ = (
        CheckConstraint(f"status IN {STATUSES!r}", name="status"),
        CheckConstraint(f"priority IN {PRIORITIES!r}", name="priority"),
        # Serves both "scans of a batch" and the per-status GROUP BY of batch_counts.
        Index("ix_scans_batch_id_status", "batch_id", "status"),
    )

    scan_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source_uri: Mapped[str] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(String(16), default=ROUTINE, server_default=ROUTINE)
    batch_id: Mapped[str | None] = mapped_column(String(128), ForeignKey("batches.batch_id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED, server_default=QUEUED, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The lease of a running scan: which worker holds it and until when (renewed by its heartbeat).
    worker_id: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # When a message for the scan was last published by a retry or the reconciler (not by submission).
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # DICOM scans received from or pulled out of a PACS (migration 0003); NULL for PNG/JPEG and uploads.
    study_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))

    batch: Mapped[Batch | None] = relationship(back_populates="scans")
    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="scan", cascade="all, delete-orphan", passive_deletes=True, order_by="Prediction.model_name"
    )
    # DICOM results sent for this scan (`lungcam dicom-send`), per model and destination.
    result_sends: Mapped[list[ResultSend]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="ResultSend.destination"
    )


class Prediction(Base):
    """One model's verdict on one scan; a redelivered scan overwrites, never duplicates."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("scan_id", "model_name", "model_version"),)

    # BIGINT on PostgreSQL; SQLite only autoincrements a plain INTEGER primary key (the rowid).
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    scan_id: Mapped[str] = mapped_column(String(128), ForeignKey("scans.scan_id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    # Calibrated by the bundle's operating point; label is p_covid against threshold (NULL: rows from before 0004).
    p_covid: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    overlay_key: Mapped[str | None] = mapped_column(Text)
    # A comment on the Grad-CAM map (shared.overlay.cam_note): flat, or peaking where lungs are not.
    cam_note: Mapped[str | None] = mapped_column(Text)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now())

    scan: Mapped[Scan] = relationship(back_populates="predictions")


SEND_PENDING, SEND_SENT, SEND_RETRY, SEND_FAILED = "pending", "sent", "retry", "failed"
SEND_STATES: tuple[str, ...] = (SEND_PENDING, SEND_SENT, SEND_RETRY, SEND_FAILED)


class ResultSend(Base):
    """One model's DICOM results (SR + Secondary Capture) for one scan, sent to one destination (`lungcam dicom-send`)."""

    __tablename__ = "result_sends"
    __table_args__ = (
        UniqueConstraint("scan_id", "model_name", "model_version", "destination"),
        CheckConstraint(f"state IN {SEND_STATES!r}", name="state"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    scan_id: Mapped[str] = mapped_column(String(128), ForeignKey("scans.scan_id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default=SEND_PENDING, server_default=SEND_PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    sr_uid: Mapped[str | None] = mapped_column(String(64))
    sc_uid: Mapped[str | None] = mapped_column(String(64))
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, server_default=func.now())


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL, choosing psycopg 3 for plain postgres:// and postgresql:// URLs."""
    parsed = make_url(url) if isinstance(url, str) else url
    # SQLAlchemy's default PostgreSQL driver is psycopg2, which we do not install.
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An Engine; SQLite gets WAL, busy_timeout and foreign keys, PostgreSQL gets pool_pre_ping."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, **kwargs)
        in_memory = parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                # WAL lets the API read while a worker writes; busy_timeout makes concurrent writers
                # (several worker processes) wait for the lock instead of failing at once.
                if not in_memory:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    # NORMAL is durable across application crashes in WAL mode and much faster than FULL.
                    cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                cursor.execute("PRAGMA foreign_keys=ON")
            finally:
                cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)  # survive database restarts and idle-connection reapers
    return create_engine(parsed, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit (the API serialises them afterwards)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic Config for the packaged migrations, optionally bound to an open connection."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(url_or_engine: str | URL | Engine | Connection, revision: str = "head") -> None:
    """Upgrade the database to revision (default head) with the packaged Alembic migrations."""
    from alembic import command

    if isinstance(url_or_engine, Connection):
        command.upgrade(alembic_config(url_or_engine), revision)
        return
    owns_engine = not isinstance(url_or_engine, Engine)
    engine = make_engine(url_or_engine) if owns_engine else url_or_engine
    try:
        for attempt in (1, 2):
            try:
                with engine.begin() as connection:
                    if connection.dialect.name == "postgresql":
                        # The API and several workers may start together on an empty database:
                        # one migrates, the others wait here and then find the schema at head.
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    command.upgrade(alembic_config(connection), revision)
                return
            except DBAPIError:
                # SQLite has no advisory lock: a process that lost the race re-reads the version
                # (now head) on its second attempt and has nothing left to do.
                if attempt == 2:
                    raise
    finally:
        if owns_engine:
            engine.dispose()


def head_revision() -> str:
    """The newest migration this version of lungcam ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migrations packaged with lungcam")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_current_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate unless the database is at this version's head revision."""
    # Migrations run in one place (`lungcam migrate`, the deploy job, the embedded demo); a worker or
    # API that migrated on start would race other versions' processes during a rolling upgrade.
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = "empty" if current is None else f"at revision {current}"
        raise SchemaOutOfDate(
            f"the database schema is {where}, this lungcam needs revision {head}: run `lungcam migrate` first"
        )


def _dialect_insert(session: Session) -> Any:
    """The dialect's insert() construct, which has on_conflict_* (SQLite and PostgreSQL only)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"upserts are implemented for sqlite and postgresql, not {name}")
    return insert


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_PREDICTION_FIELDS = (
    "scan_id",
    "model_name",
    "model_version",
    "label",
    "p_covid",
    "threshold",
    "overlay_key",
    "cam_note",
    "inference_ms",
)
_PREDICTION_UPDATED = ("label", "p_covid", "threshold", "overlay_key", "cam_note", "inference_ms", "created_at")


def upsert_predictions(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert predictions, overwriting an existing row for the same (scan_id, model_name, model_version)."""
    if not rows:
        return
    now = utcnow()
    # Deduplicate within the call (last wins): PostgreSQL refuses to update one row twice in a statement.
    unique: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        unknown = set(row) - set(_PREDICTION_FIELDS) - {"created_at"}
        if unknown:
            raise ValueError(f"unknown prediction fields: {sorted(unknown)}")
        values = {field: row.get(field) for field in _PREDICTION_FIELDS}
        values["created_at"] = row.get("created_at") or now
        unique[(values["scan_id"], values["model_name"], values["model_version"])] = values
    insert = _dialect_insert(session)
    for chunk in _chunks(list(unique.values())):
        statement = insert(Prediction).values(list(chunk))
        statement = statement.on_conflict_do_update(
            index_elements=["scan_id", "model_name", "model_version"],
            set_={field: statement.excluded[field] for field in _PREDICTION_UPDATED},
        )
        session.execute(statement)


def mark_scans(
    session: Session,
    scan_ids: Iterable[str],
    status: str,
    *,
    error: str | None = None,
    finished: bool = False,
) -> None:
    """Set status and error of scans; finished stamps finished_at (else clears it); 'running' counts an attempt."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    ids = list(dict.fromkeys(scan_ids))
    values: dict[str, Any] = {
        "status": status,
        "error": error,
        "finished_at": utcnow() if finished else None,
    }
    if status == RUNNING:
        # Each delivery that starts work is an attempt, so redeliveries and retries show up here.
        values["attempts"] = Scan.attempts + 1
    else:
        # Only a running scan holds a lease.
        values.update(_NO_LEASE)
    for chunk in _chunks(ids):
        # The default "auto" synchronisation updates Scan objects already loaded in this session,
        # which would otherwise keep showing the old status (sessions here do not expire on commit).
        session.execute(update(Scan).where(Scan.scan_id.in_(chunk)).values(**values))


_NO_LEASE: dict[str, Any] = {"worker_id": None, "claimed_at": None, "lease_expires_at": None}


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
        "status": RUNNING,
        "error": None,
        "finished_at": None,
        "attempts": Scan.attempts + 1,
        "worker_id": worker_id,
        "claimed_at": now,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
    }
    free = or_(
        Scan.status != RUNNING,
        Scan.lease_expires_at.is_(None),
        Scan.lease_expires_at <= now,
        Scan.worker_id == worker_id,
    )
    claimed: set[str] = set()
    ids = list(dict.fromkeys(scan_ids))
    for chunk in _chunks(ids):
        condition = or_(free, Scan.scan_id.in_([s for s in chunk if s in take_over])) if take_over else free
        statement = update(Scan).where(Scan.scan_id.in_(chunk), condition).values(**values).returning(Scan.scan_id)
        claimed.update(session.execute(statement.execution_options(synchronize_session=False)).scalars())
    return [scan_id for scan_id in ids if scan_id in claimed]


def renew_leases(session: Session, scan_ids: Iterable[str], worker_id: str, lease_s: float) -> int:
    """Extend worker_id's leases on scans it still holds (running, not taken over); returns how many."""
    expires = utcnow() + dt.timedelta(seconds=lease_s)
    renewed = 0
    for chunk in _chunks(list(dict.fromkeys(scan_ids))):
        result = session.execute(
            update(Scan)
            .where(Scan.scan_id.in_(chunk), Scan.status == RUNNING, Scan.worker_id == worker_id)
            .values(lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        renewed += result.rowcount or 0
    return renewed


def fail_unfinished(session: Session, reasons: dict[str, str]) -> list[str]:
    """Mark scans failed with their reason unless they are done (a late failure never undoes a result)."""
    failed = []
    for scan_id, reason in reasons.items():
        statement = (
            update(Scan)
            .where(Scan.scan_id == scan_id, Scan.status != DONE)
            .values(status=FAILED, error=reason, finished_at=utcnow(), **_NO_LEASE)
            .returning(Scan.scan_id)
            .execution_options(synchronize_session=False)
        )
        failed.extend(session.execute(statement).scalars())
    return failed


def requeue_scans(session: Session, scan_ids: Iterable[str], worker_id: str | None = None) -> list[tuple[str, str]]:
    """Set running scans back to queued (only worker_id's, if given), stamping published_at; returns (id, priority)."""
    requeued: list[tuple[str, str]] = []
    for chunk in _chunks(list(dict.fromkeys(scan_ids))):
        statement = update(Scan).where(Scan.scan_id.in_(chunk), Scan.status == RUNNING)
        if worker_id is not None:
            # A retry gives back only what this worker still holds, not a scan another worker took over.
            statement = statement.where(Scan.worker_id == worker_id)
        statement = statement.values(status=QUEUED, published_at=utcnow(), **_NO_LEASE).returning(
            Scan.scan_id, Scan.priority
        )
        requeued.extend(
            (scan_id, priority)
            for scan_id, priority in session.execute(statement.execution_options(synchronize_session=False))
        )
    return requeued


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


def dicom_received_ids(session: Session, scan_ids: Sequence[str]) -> set[str]:
    """The subset of scan_ids received over DICOM (listener or DICOMweb pull): rows that carry a SOP Instance UID."""
    found: set[str] = set()
    for chunk in _chunks(list(scan_ids)):
        found.update(
            session.scalars(select(Scan.scan_id).where(Scan.scan_id.in_(chunk), Scan.sop_instance_uid.is_not(None)))
        )
    return found


def add_scans(
    session: Session, scans: list[dict[str, Any]], batch_id: str | None, *, batch_name: str | None = None
) -> list[str]:
    """Insert new scans as queued (creating the batch if needed); returns the ids inserted, in input order."""
    if batch_id is not None:
        ensure_batch(session, batch_id, batch_name)
    now = utcnow()
    unique: dict[str, dict[str, Any]] = {}
    for scan in scans:
        unknown = set(scan) - {"scan_id", "source_uri", "priority", "submitted_at", *DICOM_UID_FIELDS}
        if unknown:
            raise ValueError(f"unknown scan fields: {sorted(unknown)}")
        scan_id = scan["scan_id"]
        if not scan_id or len(scan_id) > 128:
            raise ValueError("scan_id must be 1 to 128 characters")
        priority = scan.get("priority") or ROUTINE
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
        # First occurrence wins, as it would have if the duplicates had come in separate calls.
        unique.setdefault(
            scan_id,
            {
                "scan_id": scan_id,
                "source_uri": scan["source_uri"],
                "priority": priority,
                "batch_id": batch_id,
                "status": QUEUED,
                "attempts": 0,
                "submitted_at": scan.get("submitted_at") or now,
                **{field: scan.get(field) for field in DICOM_UID_FIELDS},
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
    counts = dict.fromkeys(STATUSES, 0)
    rows = session.execute(
        select(Scan.status, func.count()).where(Scan.batch_id == batch_id).group_by(Scan.status)
    ).all()
    for status, count in rows:
        counts[status] = int(count)
    counts["total"] = sum(counts[status] for status in STATUSES)
    return counts
