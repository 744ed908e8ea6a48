"""Scans can end `skipped` (a valid image that is not a frontal chest film); batches record their model versions;
predictions keep the threshold their label was decided by (the bundle's operating point).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "'queued', 'running', 'done', 'failed'"
NEW_STATUSES = "'queued', 'running', 'done', 'failed', 'skipped'"
# Tables whose rows reference scans with ON DELETE CASCADE.
DEPENDANTS = ("predictions", "result_sends")


def _set_status_check(statuses: str) -> None:
    """Replace ck_scans_status; on SQLite by rebuilding scans while keeping every dependent row."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        # 0001's constraint went through the naming convention twice: find it by what it checks.
        (name,) = [
            check["name"] for check in sa.inspect(bind).get_check_constraints("scans") if "status" in check["sqltext"]
            and "priority" not in check["sqltext"]
        ]
        op.drop_constraint(op.f(name), "scans", type_="check")
        op.create_check_constraint(op.f(name), "scans", f"status IN ({statuses})")
        return
    # SQLite cannot alter a CHECK constraint: the table is rebuilt (SQLite's documented procedure).
    # DROP TABLE scans runs an implicit DELETE, which with foreign_keys=ON cascades into the results,
    # so they are kept aside in temporary tables and put back, all in this one transaction.
    table_sql = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type='table' AND name='scans'").scalar_one()
    index_sql = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name='scans' AND sql IS NOT NULL"
    ).scalars().all()
    new_sql, replaced = re.subn(
        r"(CONSTRAINT\s+\"?\w*ck_scans_status\"?\s+CHECK\s*\(\s*status IN \()[^)]*(\)\s*\))",
        lambda match: f"{match.group(1)}{statuses}{match.group(2)}",
        table_sql,
    )
    if replaced != 1:
        raise RuntimeError("could not find ck_scans_status in the scans table definition")
    new_sql = re.sub(r"^CREATE TABLE\s+\"?scans\"?", "CREATE TABLE scans_rebuilt", new_sql)
    kept = [name for name in DEPENDANTS if sa.inspect(bind).has_table(name)]
    for name in kept:
        bind.exec_driver_sql(f"CREATE TEMPORARY TABLE keep_{name} AS SELECT * FROM {name}")
    bind.exec_driver_sql(new_sql)
    bind.exec_driver_sql("INSERT INTO scans_rebuilt SELECT * FROM scans")
    bind.exec_driver_sql("DROP TABLE scans")
    bind.exec_driver_sql("ALTER TABLE scans_rebuilt RENAME TO scans")
    for statement in index_sql:
        bind.exec_driver_sql(statement)
    for name in kept:
        bind.exec_driver_sql(f"DELETE FROM {name}")
        bind.exec_driver_sql(f"INSERT INTO {name} SELECT * FROM keep_{name}")
        bind.exec_driver_sql(f"DROP TABLE keep_{name}")


def upgrade() -> None:
    """Allow status 'skipped'; add batch_models (which model versions a batch was screened with) and predictions.threshold."""
    _set_status_check(NEW_STATUSES)
    # A nullable column is a plain ALTER TABLE on SQLite too: "never" forbids a rebuild (which would cascade).
    with op.batch_alter_table("predictions", recreate="never") as batch:
        batch.add_column(sa.Column("threshold", sa.Float(), nullable=True))
    op.create_table(
        "batch_models",
        sa.Column("batch_id", sa.String(128), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("demonstration", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.batch_id"], name="fk_batch_models_batch_id_batches", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("batch_id", "model_name", "model_version", name="pk_batch_models"),
    )


def downgrade() -> None:
    """Drop batch_models; skipped scans become failed (with their reason) so the old constraint holds."""
    op.drop_table("batch_models")
    with op.batch_alter_table("predictions", recreate="never") as batch:
        batch.drop_column("threshold")
    op.execute(
        "UPDATE scans SET status = 'failed', error = 'skipped: ' || COALESCE(error, '') WHERE status = 'skipped'"
    )
    _set_status_check(OLD_STATUSES)
