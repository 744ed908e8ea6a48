"""The database schema (SQLAlchemy 2.0 declarative): the tables, their constraints and the UTC datetime type.

Alembic's migrations (shared/migrations) target Base.metadata; data access lives in shared.scans.
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
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
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from shared.domain import Priority, Status

# Deterministic constraint names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _values(enum: type[Enum]) -> tuple[str, ...]:
    """The members' values in definition order, as the CHECK constraints list them."""
    return tuple(str(member.value) for member in enum)


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
            raise ValueError("naive datetime given; use timezone-aware UTC (shared.models.utcnow())")
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
    """One image to classify and where it is in its life (queued, running, then done, failed or skipped)."""

    __tablename__ = "scans"
    __table_args__ = (
        CheckConstraint(f"status IN {_values(Status)!r}", name="status"),
        CheckConstraint(f"priority IN {_values(Priority)!r}", name="priority"),
        # Serves both "scans of a batch" and the per-status GROUP BY of batch_counts.
        Index("ix_scans_batch_id_status", "batch_id", "status"),
    )

    scan_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    source_uri: Mapped[str] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(
        String(16), default=Priority.ROUTINE.value, server_default=Priority.ROUTINE.value
    )
    batch_id: Mapped[str | None] = mapped_column(String(128), ForeignKey("batches.batch_id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(
        String(16), default=Status.QUEUED.value, server_default=Status.QUEUED.value, index=True
    )
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
