"""Test helpers for the HTTP API: a real uvicorn server in a thread, its settings, an authenticated client."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import redis
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from helpers import redis_url
from shared.engine import make_engine, make_session_factory
from shared.engine import migrate as migrate_schema
from shared.settings import Settings
from shared.store import LocalStore
from shared.synthetic import synthetic_xray
from worker.api.main import create_app

# Two Redis databases of their own: the fast tests count messages on one while a worker drains the other.
API_REDIS_URL = os.environ.get("LUNGCAM_TEST_API_REDIS_URL", redis_url(12))
WORKER_REDIS_URL = os.environ.get("LUNGCAM_TEST_API_WORKER_REDIS_URL", redis_url(10))
TOKEN = "test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 20_000
MAX_BODY_BYTES = 2_000_000


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(settings: Settings, *, migrate: bool = True) -> Iterator[str]:
    """Run create_app(settings) in uvicorn on a free 127.0.0.1 port in a thread; yields the base URL.

    The database is migrated first (as `lungcam migrate` does in a deployment) unless migrate is False.
    """
    if migrate:
        migrate_schema(settings.resolved_database_url())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if settings.public_url is None:
        # Links are built on the configured public URL (never the Host header): this server's own.
        settings = settings.model_copy(update={"public_url": f"http://127.0.0.1:{port}"})
    config = uvicorn.Config(create_app(settings), lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive():
                raise AssertionError("the API server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise AssertionError("the API server did not start within 60 s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def api_settings(root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": root,
        "broker_url": API_REDIS_URL,
        "database_url": f"sqlite:///{root / 'api.sqlite'}",
        "store_url": str(root / "store"),
        "api_token": TOKEN,
        "api_max_image_bytes": MAX_IMAGE_BYTES,
        "api_max_body_bytes": MAX_BODY_BYTES,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Api:
    """A running API: its URL, an authenticated client, its settings and direct database access."""

    url: str
    client: httpx.Client
    settings: Settings
    sessions: sessionmaker[Session]

    def store(self) -> LocalStore:
        """The local store the API writes uploads to."""
        return LocalStore(self.settings.resolved_store_url())


@contextmanager
def running_api(root: Path, **overrides: object) -> Iterator[Api]:
    """A served API plus an authenticated client on it."""
    settings = api_settings(root, **overrides)
    with serve(settings) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        engine = make_engine(settings.resolved_database_url())
        try:
            yield Api(url, client, settings, make_session_factory(engine))
        finally:
            engine.dispose()


def redis_client(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis not reachable at {url} (`python3 run.py test` starts one): {exc}")
    return client


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    image = synthetic_xray(np.random.default_rng(seed), size).image
    return cv2.imencode(".png", image)[1].tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
