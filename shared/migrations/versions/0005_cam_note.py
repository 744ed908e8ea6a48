"""Predictions keep a comment on their Grad-CAM map (flat, or peaking at the border, outside the body or on a marker).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add predictions.cam_note (NULL: nothing to say about the map, or a row from before 0005)."""
    # A nullable column is a plain ALTER TABLE on SQLite too: "never" forbids a rebuild (which would cascade).
    with op.batch_alter_table("predictions", recreate="never") as batch:
        batch.add_column(sa.Column("cam_note", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop predictions.cam_note."""
    with op.batch_alter_table("predictions", recreate="never") as batch:
        batch.drop_column("cam_note")
