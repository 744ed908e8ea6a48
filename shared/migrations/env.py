"""Alembic environment for lungcam.

Used two ways: programmatically by `shared.engine.migrate()`, which hands over an open connection in
`config.attributes["connection"]` (so tests can migrate a per-test schema), and by operators as
`alembic upgrade head` from the repo root, where the URL comes from `-x url=...` or LUNGCAM_DATABASE_URL.
"""

from __future__ import annotations

import logging.config
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from shared.engine import make_engine, normalize_url
from shared.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

# Only the command line configures logging: called from an application, fileConfig would reset its loggers.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    try:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    except KeyError:  # an .ini without logging sections
        pass


def _database_url() -> str:
    """The URL for command-line use: -x url=..., then sqlalchemy.url, then the lungcam settings."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from shared.settings import Settings

    return Settings().resolved_database_url()


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our UTCDateTime as the plain column type, so generated revisions do not import app code."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) without a database connection."""
    context.configure(
        url=normalize_url(_database_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on the connection given by migrate(), or on one opened from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
