"""PACS: DICOM UIDs on scans, and the result_sends table (DICOM results sent per destination).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable UID columns (batch mode: SQLite rebuilds the table) and create result_sends."""
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("study_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("series_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("sop_instance_uid", sa.String(64), nullable=True))
    op.create_table(
        "result_sends",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("scan_id", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sr_uid", sa.String(64), nullable=True),
        sa.Column("sc_uid", sa.String(64), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'sent', 'retry', 'failed')", name="ck_result_sends_state"),
        sa.ForeignKeyConstraint(
            ["scan_id"], ["scans.scan_id"], name="fk_result_sends_scan_id_scans", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_result_sends"),
        sa.UniqueConstraint(
            "scan_id", "model_name", "model_version", "destination",
            name="uq_result_sends_scan_id_model_name_model_version_destination",
        ),
    )
    op.create_index("ix_result_sends_state", "result_sends", ["state"])


def downgrade() -> None:
    """Drop result_sends and the UID columns."""
    op.drop_index("ix_result_sends_state", table_name="result_sends")
    op.drop_table("result_sends")
    # "never": SQLite (3.35+) drops unindexed columns in place. A rebuild would DROP TABLE scans,
    # which with foreign_keys=ON cascades into predictions and deletes every result.
    with op.batch_alter_table("scans", recreate="never") as batch:
        batch.drop_column("sop_instance_uid")
        batch.drop_column("series_uid")
        batch.drop_column("study_uid")
