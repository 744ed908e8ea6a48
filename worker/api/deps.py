"""FastAPI dependencies: settings, database sessions, the store, the Celery app, and bearer auth."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, cast

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shared.settings import Settings
from shared.sources import SourcePolicy
from shared.store import ObjectStore
from worker.api.security import token_matches
from worker.runtime import Services


@dataclass
class Resources:
    """What one app creates once at start-up and shares between requests: the runtime's services and more."""

    services: Services
    sources: SourcePolicy
    metrics_registry: CollectorRegistry

    @property
    def settings(self) -> Settings:
        """The app's settings."""
        return self.services.settings

    @property
    def engine(self) -> Engine:
        """The database engine."""
        return self.services.engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory."""
        return self.services.sessions

    @property
    def store(self) -> ObjectStore:
        """The object store."""
        return self.services.store

    @property
    def celery(self) -> Celery:
        """The Celery app that publishes classify messages."""
        return self.services.celery()


def get_resources(request: Request) -> Resources:
    """The app's shared resources (set up by the lifespan in main.py)."""
    return cast(Resources, request.app.state.resources)


ResourcesDep = Annotated[Resources, Depends(get_resources)]


def get_settings(resources: ResourcesDep) -> Settings:
    """The app's settings."""
    return resources.settings


def get_session_factory(resources: ResourcesDep) -> sessionmaker[Session]:
    """The app's session factory (for helpers that own their transaction, such as submit_scans)."""
    return resources.sessions


def get_db(resources: ResourcesDep) -> Iterator[Session]:
    """A database session for one request, closed afterwards."""
    with resources.sessions() as session:
        yield session


def get_store(resources: ResourcesDep) -> ObjectStore:
    """The object store scans and overlays live in."""
    return resources.store


def get_source_policy(resources: ResourcesDep) -> SourcePolicy:
    """Where a submitted source_uri may point."""
    return resources.sources


def get_celery(resources: ResourcesDep) -> Celery:
    """The Celery app used to publish classify messages."""
    return resources.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
SessionDep = Annotated[Session, Depends(get_db)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SourcePolicyDep = Annotated[SourcePolicy, Depends(get_source_policy)]

# auto_error=False: we answer a missing header ourselves with 401 (FastAPI's default is 403).
_bearer = HTTPBearer(auto_error=False, description="The value of LUNGCAM_API_TOKEN.")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request (401) unless it carries `Authorization: Bearer <LUNGCAM_API_TOKEN>`."""
    expected = settings.api_token.get_secret_value() if settings.api_token else ""
    if not expected:
        # Fail closed: an API without a token must not serve scans to anyone who can reach it.
        raise _unauthorized("the server has no API token set (LUNGCAM_API_TOKEN); every /v1 request is refused")
    if credentials is None:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if not token_matches(credentials.credentials, expected):
        raise _unauthorized("invalid bearer token")
