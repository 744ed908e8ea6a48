"""What the PACS programs talk to: settings, database sessions on a schema at head, the store, the Celery app."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings
from shared.store import ObjectStore


@dataclass
class Services:
    """Settings, a session factory, the store and (for programs that queue) the Celery app."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    app: Celery | None


def open_services(settings: Settings | None = None, *, with_app: bool = True) -> Services:
    """Open the services for settings (default: the environment's); the schema must be at head."""
    from shared.engine import make_engine, make_session_factory, require_current_schema
    from shared.queueing import make_app
    from shared.settings import get_settings
    from shared.store import store_from_settings

    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url())
    require_current_schema(engine)
    app = make_app(settings) if with_app else None
    return Services(settings, engine, make_session_factory(engine), store_from_settings(settings), app)
