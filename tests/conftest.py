"""Shared fixtures: real SQLite and PostgreSQL databases, and S3 through a moto server."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shared.store import S3Store

DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _own_redis_for_this_process() -> None:
    """In every pytest-xdist process but the first, a Redis of its own on a free port (LUNGCAM_TEST_REDIS_PORT).

    Test modules pick fixed database numbers on 127.0.0.1:6379 and flush them; two processes running
    two modules that share a number would flush each other's queues. Runs at import, before any test
    module reads tests/helpers/__init__.TEST_REDIS_PORT.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    server = shutil.which("redis-server")
    if worker in ("", "gw0") or "LUNGCAM_TEST_REDIS_PORT" in os.environ or server is None:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(process.terminate)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    os.environ["LUNGCAM_TEST_REDIS_PORT"] = str(port)


_own_redis_for_this_process()


def _schema_url(base_url: str, schema: str) -> str:
    """base_url with search_path set to schema, as a plain URL string any process can use."""
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def _postgres_admin() -> Iterator[tuple[sa.Engine, str, str]]:
    """An engine on the shared test database, its URL, and this session's schema-name stem."""
    base_url = os.environ.get("LUNGCAM_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)
    url = make_url(base_url)
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3}, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no PostgreSQL here"
        engine.dispose()
        reason = (
            f"PostgreSQL not reachable at {url.render_as_string(hide_password=True)} "
            f"(set LUNGCAM_TEST_POSTGRES_URL to point elsewhere): {type(exc).__name__}"
        )
        # CI sets this so a missing database fails the run instead of silently skipping half the tests.
        if os.environ.get("LUNGCAM_TEST_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    stem = f"lungcam_test_{uuid.uuid4().hex[:10]}"
    yield engine, url.render_as_string(hide_password=False), stem
    # Drop whatever this session created, also per-test schemas a crashed teardown left behind.
    with engine.begin() as connection:
        connection.execute(sa.text("SET lock_timeout = '10s'"))
        schemas = connection.execute(
            sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :stem"), {"stem": f"{stem}%"}
        ).scalars()
        for schema in list(schemas):
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def _create_schema(engine: sa.Engine, schema: str) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))


def _drop_schema(engine: sa.Engine, schema: str) -> None:
    with engine.begin() as connection:
        # A test that leaks an open transaction should fail loudly here, not hang the run.
        connection.execute(sa.text("SET lock_timeout = '10s'"))
        connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(scope="session")
def postgres_url(_postgres_admin: tuple[sa.Engine, str, str]) -> Iterator[str]:
    """URL of an empty PostgreSQL schema for this test session (search_path set in the URL); dropped at the end."""
    engine, base_url, stem = _postgres_admin
    schema = f"{stem}_s"
    _create_schema(engine, schema)
    yield _schema_url(base_url, schema)
    _drop_schema(engine, schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, unmigrated database for one test: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lungcam.sqlite'}"
        return
    engine, base_url, stem = request.getfixturevalue("_postgres_admin")
    # A schema per test, so tests may reuse ids and migrate/downgrade freely.
    schema = f"{stem}_{uuid.uuid4().hex[:8]}"
    _create_schema(engine, schema)
    yield _schema_url(base_url, schema)
    _drop_schema(engine, schema)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of an in-process moto S3 server on a free 127.0.0.1 port, with dummy credentials."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        # Dummy credentials, so nothing on this machine can reach a real account.
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_store(moto_server: str) -> S3Store:
    """An S3Store on a fresh, empty bucket of the moto server."""
    store = S3Store(f"lungcam-test-{uuid.uuid4().hex[:12]}", endpoint_url=moto_server)
    store.client.create_bucket(Bucket=store.bucket)
    return store


# Under pytest-xdist (`python3 run.py test`: two processes, whole modules each), the longest modules
# start first so both processes finish at about the same time (measured with --durations=0 on 2 cores,
# longest first). xdist would otherwise order modules by how many tests they hold, which put the
# longest ones last and left one process running them alone. A serial run keeps pytest's order.
LONGEST_MODULES_FIRST = (
    "test_trainer.py",
    "test_recovery.py",
    "test_demo.py",
    "test_audit.py",
    "test_pacs.py",
    "test_worker.py",
    "test_models.py",
    "test_robust_recipe.py",
    "test_selection.py",
    "test_pretrained.py",
    "test_cli.py",
    "test_api_worker.py",
    "test_decoding.py",
    "test_dicomweb_hostile.py",
    "test_waiting.py",
    "test_hardening_memory.py",
    "test_structure.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Keep LONGEST_MODULES_FIRST's order under pytest-xdist (its default re-sorts modules by their number of tests)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order modules longest first when pytest-xdist distributes them (a stable sort: tests keep their order)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: index for index, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
