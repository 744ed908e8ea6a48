"""Initial schema: batches, scans, predictions.

Revision ID: 0001
Revises:
Create Date: 2024-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the three tables with the constraint names shared.models' naming convention gives."""
    op.create_table(
        "batches",
        sa.Column("batch_id", sa.String(128), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("batch_id", name="pk_batches"),
    )
    op.create_table(
        "scans",
        sa.Column("scan_id", sa.String(128), nullable=False),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column("priority", sa.String(16), server_default="routine", nullable=False),
        sa.Column("batch_id", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name="ck_scans_status"),
        sa.CheckConstraint("priority IN ('stat', 'routine')", name="ck_scans_priority"),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.batch_id"], name="fk_scans_batch_id_batches", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("scan_id", name="pk_scans"),
    )
    op.create_index("ix_scans_batch_id_status", "scans", ["batch_id", "status"])
    op.create_index("ix_scans_status", "scans", ["status"])
    op.create_table(
        "predictions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("scan_id", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("p_covid", sa.Float(), nullable=False),
        sa.Column("overlay_key", sa.Text(), nullable=True),
        sa.Column("inference_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["scan_id"], ["scans.scan_id"], name="fk_predictions_scan_id_scans", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.UniqueConstraint(
            "scan_id", "model_name", "model_version", name="uq_predictions_scan_id_model_name_model_version"
        ),
    )


def downgrade() -> None:
    """Drop the tables, dependants first."""
    op.drop_table("predictions")
    op.drop_index("ix_scans_status", table_name="scans")
    op.drop_index("ix_scans_batch_id_status", table_name="scans")
    op.drop_table("scans")
    op.drop_table("batches")
