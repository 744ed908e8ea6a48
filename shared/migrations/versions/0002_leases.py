"""Leases on running scans and when a scan was last published (recovery owned by the system).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("worker_id", "claimed_at", "lease_expires_at", "published_at")


def upgrade() -> None:
    """Add the lease columns and published_at to scans (nullable, so existing rows need no value)."""
    # Adding nullable columns is a plain ALTER TABLE on SQLite too: "auto" never rebuilds the table here.
    with op.batch_alter_table("scans", recreate="auto") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(255), nullable=True))
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop the four columns again."""
    # "never": SQLite (3.35+) drops unindexed columns in place. A rebuild would DROP TABLE scans,
    # which with foreign_keys=ON cascades into predictions and deletes every result.
    with op.batch_alter_table("scans", recreate="never") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column)
