"""Connecting to the database: URLs, engines and sessions, and the migrations that bring its schema to head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import SchemaOutOfDate

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# SQLite waits this long for another process's write lock before raising "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock key that serialises concurrent migrations ("lungcam" in ASCII).
MIGRATION_LOCK_KEY = 0x6C756E6763616D


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL, choosing psycopg 3 for plain postgres:// and postgresql:// URLs."""
    parsed = make_url(url) if isinstance(url, str) else url
    # SQLAlchemy's default PostgreSQL driver is psycopg2, which we do not install.
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An Engine that never logs bound values; SQLite gets WAL, busy_timeout and foreign keys, PostgreSQL pool_pre_ping."""
    parsed = normalize_url(url)
    # Bound values are scan ids and DICOM UIDs, which may identify a patient: keep them out of error messages.
    kwargs["hide_parameters"] = True
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
    engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
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
