"""The HTTP API as a real uvicorn server over HTTP: real Redis, SQLite, a local folder or S3 (moto), a real worker."""

from __future__ import annotations

import base64
import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import httpx
import numpy as np
import pytest
import redis
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from helpers import make_bundle, mixed_scans, start_worker, wait_until
from shared import db
from shared.settings import Settings
from shared.store import LocalStore, S3Store, overlay_key, scan_key
from shared.synthetic import synthetic_xray
from worker.api.logs import redact_path
from worker.api.main import create_app
from worker.api.security import file_signature

# Two Redis databases of their own: the fast tests count messages on one while a worker drains the other.
API_REDIS_URL = os.environ.get("LUNGCAM_TEST_API_REDIS_URL", "redis://127.0.0.1:6379/12")
WORKER_REDIS_URL = os.environ.get("LUNGCAM_TEST_API_WORKER_REDIS_URL", "redis://127.0.0.1:6379/10")
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
def serve(settings: Settings) -> Iterator[str]:
    """Run create_app(settings) in uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
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


def _settings(root: Path, **overrides: object) -> Settings:
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
    settings = _settings(root, **overrides)
    with serve(settings) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        engine = db.make_engine(settings.resolved_database_url())
        try:
            yield Api(url, client, settings, db.make_session_factory(engine))
        finally:
            engine.dispose()


def _redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis not reachable at {url} (.ci/run starts one): {exc}")
    return client


@pytest.fixture(scope="module")
def broker() -> Iterator[redis.Redis]:
    """The fast tests' Redis database, emptied before and after."""
    client = _redis(API_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="module")
def api(broker: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API shared by the tests that only need it to answer (local store, SQLite, small size limits)."""
    with running_api(tmp_path_factory.mktemp("api")) as running:
        yield running


@pytest.fixture
def fresh_api(broker: redis.Redis, db_url: str, tmp_path: Path) -> Iterator[Api]:
    """An API on an empty database (SQLite, then PostgreSQL) and a store of its own."""
    with running_api(tmp_path, database_url=db_url) as running:
        yield running


def _png(seed: int = 0, size: int = 32) -> bytes:
    image = synthetic_xray(np.random.default_rng(seed), size).image
    return cv2.imencode(".png", image)[1].tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scan(scan_id: str, **fields: object) -> dict[str, object]:
    body: dict[str, object] = {"scan_id": scan_id, **fields}
    if "source_uri" not in fields and "image_base64" not in fields:
        body["image_base64"] = _b64(_png())
    return body


def _new_id(prefix: str = "scan") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------- health


def test_healthz_is_open(api: Api):
    """/healthz answers 200 without a token."""
    response = httpx.get(f"{api.url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_ready_when_everything_is_up(api: Api):
    """/readyz is 200 with every check ok when Redis, SQLite and the store answer."""
    response = httpx.get(f"{api.url}/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "broker": True, "database": True, "store": True,
    }


def test_readyz_503_when_the_broker_is_down(broker: redis.Redis, tmp_path: Path):
    """A broker URL pointing at a closed port makes /readyz 503, naming the broker; submitting answers 503 too."""
    with running_api(tmp_path, broker_url=f"redis://127.0.0.1:{_closed_port()}/0") as down:
        started = time.monotonic()
        response = httpx.get(f"{down.url}/readyz", timeout=30)
        elapsed = time.monotonic() - started
        scan_id = _new_id()
        submitted = down.client.post("/v1/scans", json=_scan(scan_id))
        assert submitted.status_code == 503, submitted.text
        assert "broker is unavailable" in submitted.json()["detail"]
        # The row is committed before publishing, so `lungcam requeue` can send it once the broker is back.
        with down.sessions() as session:
            assert session.get(db.Scan, scan_id).status == db.QUEUED
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert checks["broker"]["ok"] is False and "unreachable" in checks["broker"]["detail"]
    assert checks["database"]["ok"] is True and checks["store"]["ok"] is True
    assert elapsed < 10, f"readiness probe took {elapsed:.1f}s"


def test_readyz_503_when_the_bucket_is_missing(broker: redis.Redis, moto_server: str, tmp_path: Path):
    """An S3 store whose bucket does not exist is not ready (a HEAD would have answered a harmless-looking 404)."""
    missing = f"s3://lungcam-missing-{uuid.uuid4().hex[:12]}"
    with running_api(tmp_path, store_url=missing, s3_endpoint_url=moto_server) as no_bucket:
        response = httpx.get(f"{no_bucket.url}/readyz", timeout=30)
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert checks["store"]["ok"] is False and checks["broker"]["ok"] is True and checks["database"]["ok"] is True


def test_metrics_report_scans_per_status_and_inference_time(fresh_api: Api):
    """/metrics (open) has lungcam_scans per status computed from the database, and inference time per model."""
    ids = [_new_id() for _ in range(4)]
    response = fresh_api.client.post("/v1/batches", json={"scans": [_scan(scan_id) for scan_id in ids]})
    assert response.status_code == 202, response.text
    # What a worker would write: one scan done with a prediction, one failed, one running.
    with fresh_api.sessions.begin() as session:
        db.upsert_predictions(
            session,
            [{"scan_id": ids[0], "model_name": "m", "model_version": "1", "label": "normal", "p_covid": 0.1,
              "overlay_key": None, "inference_ms": 250.0}],
        )
        db.mark_scans(session, [ids[0]], db.DONE, finished=True)
        db.mark_scans(session, [ids[1]], db.FAILED, error="undecodable image", finished=True)
        db.mark_scans(session, [ids[2]], db.RUNNING)

    response = httpx.get(f"{fresh_api.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    for status, count in {"queued": 1, "running": 1, "done": 1, "failed": 1}.items():
        assert f'lungcam_scans{{status="{status}"}} {count:.1f}' in lines, response.text
    assert 'lungcam_inference_seconds_count{model_name="m",model_version="1"} 1.0' in lines, response.text
    assert 'lungcam_inference_seconds_sum{model_name="m",model_version="1"} 0.25' in lines, response.text
    assert "lungcam_metrics_database_up 1.0" in lines


def test_openapi_and_docs_are_served(api: Api):
    """The OpenAPI document lists every route, and /docs renders."""
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert {"/v1/scans", "/v1/scans/{scan_id}", "/v1/batches", "/v1/batches/{batch_id}", "/v1/files/{key}",
            "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert httpx.get(f"{api.url}/docs").status_code == 200


# ------------------------------------------------------------------------------------------------ auth


def test_v1_needs_the_bearer_token(api: Api):
    """Missing or wrong token: 401 with WWW-Authenticate: Bearer; the right token: 2xx."""
    body = _scan(_new_id())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, payload in (("POST", "/v1/scans", body), ("GET", "/v1/batches/x", None),
                                      ("GET", "/v1/scans/x", None)):
            response = httpx.request(method, f"{api.url}{path}", json=payload, headers=headers)
            assert response.status_code == 401, (headers, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["detail"]
    assert "missing" in httpx.get(f"{api.url}/v1/scans/x").json()["detail"]
    assert "invalid" in httpx.get(f"{api.url}/v1/scans/x", headers={"Authorization": "Bearer wrong"}).json()["detail"]
    response = httpx.post(f"{api.url}/v1/scans", json=body, headers=AUTH)
    assert response.status_code == 202, response.text


def test_without_a_configured_token_every_v1_request_is_refused(broker: redis.Redis, tmp_path: Path):
    """No LUNGCAM_API_TOKEN: /v1 answers 401 saying so (even to a request with some token); probes still work."""
    with running_api(tmp_path, api_token=None) as open_api:
        response = open_api.client.post("/v1/scans", json=_scan(_new_id()))
        assert response.status_code == 401
        assert "no API token set" in response.json()["detail"]
        assert httpx.get(f"{open_api.url}/v1/scans/x").status_code == 401
        assert httpx.get(f"{open_api.url}/healthz").status_code == 200


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "scan_id",
    ["../x", "a/b", "", "x" * 129, ".hidden", "-dash", "a..b", "a b", "a\\b", "é", "a\n"],
    ids=["dotdot-slash", "slash", "empty", "129-chars", "leading-dot", "leading-dash", "dotdot", "space",
         "backslash", "non-ascii", "trailing-newline"],
)
def test_bad_scan_ids_are_refused(api: Api, scan_id: str):
    """scan_id must be one safe store-key segment: 422 naming scan_id."""
    response = api.client.post("/v1/scans", json=_scan(scan_id))
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "scan_id"]
    assert "scan_id" in error["msg"]


def test_longest_allowed_scan_id_is_accepted(api: Api):
    """128 characters is the limit, not 127."""
    response = api.client.post("/v1/scans", json=_scan("a" * 120 + uuid.uuid4().hex[:8]))
    assert response.status_code == 202, response.text


def test_unknown_fields_are_refused(api: Api):
    """extra="forbid": a misspelt field is an error, not silently ignored."""
    response = api.client.post("/v1/scans", json={**_scan(_new_id()), "prority": "stat"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "prority"] and error["type"] == "extra_forbidden"
    response = api.client.post("/v1/batches", json={"scans": [_scan(_new_id())], "label": "x"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "label"]


def test_both_or_neither_source_is_refused(api: Api):
    """Exactly one of source_uri and image_base64."""
    both = {"scan_id": _new_id(), "source_uri": "s3://bucket/a.png", "image_base64": _b64(_png())}
    neither = {"scan_id": _new_id()}
    for body in (both, neither):
        response = api.client.post("/v1/scans", json=body)
        assert response.status_code == 422, response.text
        assert "exactly one of source_uri or image_base64" in response.text


def test_bad_base64_is_refused(api: Api):
    """image_base64 must be strict base64 and not empty."""
    for bad in ("not base64!!", "QUJD=", "QUJDRA"):
        response = api.client.post("/v1/scans", json={"scan_id": _new_id(), "image_base64": bad})
        assert response.status_code == 422, (bad, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "image_base64"] and "not valid base64" in error["msg"]
    response = api.client.post("/v1/scans", json={"scan_id": _new_id(), "image_base64": ""})
    assert response.status_code == 422 and "empty" in response.text


def test_too_large_image_is_refused_with_413(api: Api):
    """An upload decoding to more than LUNGCAM_API_MAX_IMAGE_BYTES: 413 naming the field and the limit."""
    scan_id = _new_id()
    big = _b64(os.urandom(MAX_IMAGE_BYTES + 1))
    response = api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": big})
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "image_base64" in detail and str(MAX_IMAGE_BYTES) in detail and "LUNGCAM_API_MAX_IMAGE_BYTES" in detail
    scans = [_scan(_new_id()), {"scan_id": scan_id, "image_base64": big}]
    response = api.client.post("/v1/batches", json={"scans": scans})
    assert response.status_code == 413 and "scans[1].image_base64" in response.json()["detail"]
    # Nothing of a refused request is recorded or stored.
    assert api.client.get(f"/v1/scans/{scan_id}").status_code == 404
    assert not api.store().exists(scan_key(scan_id))


def test_oversized_body_is_refused_with_413(api: Api):
    """A body over LUNGCAM_API_MAX_BODY_BYTES: 413 from Content-Length, and also for a chunked body."""
    # Half a megabyte over, so a chunked upload crosses the cap mid-stream with more still to come.
    body = b'{"scan_id": "big", "image_base64": "' + b"A" * (MAX_BODY_BYTES + 500_000) + b'"}'
    response = api.client.post("/v1/scans", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "request body" in response.json()["detail"] and str(MAX_BODY_BYTES) in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = api.client.post("/v1/scans", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers  # really sent chunked
    assert response.status_code == 413, response.text
    assert "LUNGCAM_API_MAX_BODY_BYTES" in response.json()["detail"]


def test_duplicate_scan_ids_in_a_batch_are_refused(api: Api):
    """One batch may not name a scan twice."""
    scan_id = _new_id()
    response = api.client.post("/v1/batches", json={"scans": [_scan(scan_id), _scan(_new_id()), _scan(scan_id)]})
    assert response.status_code == 422, response.text
    assert "duplicate scan_id" in response.text and scan_id in response.text
    assert api.client.get(f"/v1/scans/{scan_id}").status_code == 404


def test_batch_over_10000_scans_is_refused(api: Api):
    """10001 scans: 422 naming the scans field and the limit; an empty batch too."""
    scans = [{"scan_id": f"s{index}", "source_uri": f"s3://bucket/s{index}"} for index in range(10_001)]
    response = api.client.post("/v1/batches", json={"scans": scans})
    assert response.status_code == 422, response.text[:500]
    errors = response.json()["detail"]
    assert any(error["loc"] == ["body", "scans"] and "10000" in error["msg"] for error in errors), errors
    response = api.client.post("/v1/batches", json={"scans": []})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "scans"]


@pytest.mark.parametrize(
    "source_uri",
    ["/etc/passwd", "file:///etc/passwd", "../../etc/passwd", "scans/other-scan", "s3://bucket", "s3://bucket/",
     "http://example.org/a.png", "s3://B/key"],
)
def test_source_uri_must_be_s3(api: Api, source_uri: str):
    """Local paths (and anything but s3://bucket/key) are refused: they would let a client read server files."""
    response = api.client.post("/v1/scans", json={"scan_id": _new_id(), "source_uri": source_uri})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "source_uri"]
    assert "source_uri must be s3://bucket/key" in error["msg"]


def test_bad_priority_is_refused(api: Api):
    """priority is stat or routine, in a single scan and per scan of a batch."""
    response = api.client.post("/v1/scans", json=_scan(_new_id(), priority="urgent"))
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "priority"] and "'stat' or 'routine'" in error["msg"]
    response = api.client.post("/v1/batches", json={"scans": [_scan(_new_id()), _scan(_new_id(), priority="STAT")]})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "scans", 1, "priority"]


def test_validation_errors_do_not_echo_the_input(api: Api):
    """A 422 names fields and problems but does not send a (possibly huge) image back."""
    image = _b64(_png())
    response = api.client.post("/v1/scans", json={"scan_id": "../x", "image_base64": image, "extra": 1})
    assert response.status_code == 422
    assert image not in response.text
    assert {key for error in response.json()["detail"] for key in error} == {"loc", "msg", "type"}


def test_unknown_ids_are_404(api: Api):
    """Unknown scan and batch ids: 404 with a message."""
    response = api.client.get("/v1/scans/nope")
    assert response.status_code == 404 and response.json()["detail"] == "no scan with this scan_id"
    response = api.client.get("/v1/batches/nope")
    assert response.status_code == 404 and response.json()["detail"] == "no batch with this batch_id"


# --------------------------------------------------------------------------------------- submissions


def _queue_length(broker: redis.Redis, queue: str) -> int:
    # kombu's Redis transport keeps each queue as a list named after it.
    return int(broker.llen(queue))


def test_upload_is_stored_and_the_source_stays_internal(api: Api):
    """An uploaded image lands at scans/{scan_id}; the scan reads back queued, without its source_uri."""
    scan_id, image = _new_id(), _png(3)
    response = api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": _b64(image), "priority": "stat"})
    assert response.status_code == 202
    assert response.json() == {"scan_id": scan_id, "status": "queued", "queued": True}
    assert api.store().get(scan_key(scan_id)) == image
    scan = api.client.get(f"/v1/scans/{scan_id}").json()
    assert scan["status"] == "queued" and scan["priority"] == "stat" and scan["predictions"] == []
    assert scan["attempts"] == 0 and scan["finished_at"] is None and scan["batch_id"] is None
    assert "source_uri" not in scan


def test_s3_source_is_referenced_not_copied(api: Api):
    """A source_uri is recorded as given; nothing is written to the store."""
    scan_id = _new_id()
    response = api.client.post("/v1/scans", json={"scan_id": scan_id, "source_uri": "s3://archive-bucket/2020/a b.png"})
    assert response.status_code == 202
    assert not api.store().exists(scan_key(scan_id))
    with api.sessions() as session:
        assert session.get(db.Scan, scan_id).source_uri == "s3://archive-bucket/2020/a b.png"


def test_resubmitting_does_not_queue_twice_unless_forced(broker: redis.Redis, fresh_api: Api):
    """Same scan again: 200, queued false, current status, no new message; force: 202, a new message, new image."""
    scan_id = _new_id()
    first, second = _png(1), _png(2)
    before = _queue_length(broker, "routine")
    response = fresh_api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": _b64(first)})
    assert response.status_code == 202 and response.json()["queued"] is True
    assert _queue_length(broker, "routine") == before + 1

    with fresh_api.sessions.begin() as session:
        db.mark_scans(session, [scan_id], db.DONE, finished=True)
    response = fresh_api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": _b64(second)})
    assert response.status_code == 200
    assert response.json() == {"scan_id": scan_id, "status": "done", "queued": False}
    assert _queue_length(broker, "routine") == before + 1
    assert fresh_api.store().get(scan_key(scan_id)) == first  # a finished scan's input is not replaced

    response = fresh_api.client.post(
        "/v1/scans", json={"scan_id": scan_id, "image_base64": _b64(second), "force": True, "priority": "stat"}
    )
    assert response.status_code == 202
    assert response.json() == {"scan_id": scan_id, "status": "queued", "queued": True}
    assert _queue_length(broker, "routine") == before + 1 and _queue_length(broker, "stat") >= 1
    assert fresh_api.store().get(scan_key(scan_id)) == second
    scan = fresh_api.client.get(f"/v1/scans/{scan_id}").json()
    assert scan["status"] == "queued" and scan["priority"] == "stat"


def test_batch_counts_existing_scans_as_already(broker: redis.Redis, fresh_api: Api):
    """A batch with one known and two new scans queues two; a forced known scan moves into the new batch."""
    known = _new_id()
    assert fresh_api.client.post("/v1/scans", json=_scan(known)).status_code == 202
    before = _queue_length(broker, "routine")
    new = [_new_id(), _new_id()]
    scans = [_scan(known)] + [_scan(scan_id) for scan_id in new]
    response = fresh_api.client.post("/v1/batches", json={"name": "ward 3", "scans": scans})
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["queued"] == 2 and submitted["already"] == 1
    assert len(submitted["batch_id"]) == 32 and int(submitted["batch_id"], 16) >= 0
    assert _queue_length(broker, "routine") == before + 2
    batch = fresh_api.client.get(f"/v1/batches/{submitted['batch_id']}").json()
    assert batch["name"] == "ward 3" and batch["total"] == 2 and batch["counts"]["queued"] == 2
    assert batch["progress"] == 0.0 and batch["complete"] is False

    response = fresh_api.client.post("/v1/batches", json={"scans": [_scan(known, force=True)]})
    assert response.status_code == 202 and response.json()["queued"] == 1 and response.json()["already"] == 0
    assert _queue_length(broker, "routine") == before + 3
    forced_batch = response.json()["batch_id"]
    assert fresh_api.client.get(f"/v1/scans/{known}").json()["batch_id"] == forced_batch
    assert fresh_api.client.get(f"/v1/batches/{forced_batch}").json()["total"] == 1


# ------------------------------------------------------------------------------- signed local files


def _done_with_overlay(api: Api, scan_id: str) -> bytes:
    """Record what a worker would: a prediction whose overlay PNG is in the local store."""
    key = overlay_key("m", "1", scan_id)
    png = _png(5, 48)
    api.store().put(key, png, "image/png")
    with api.sessions.begin() as session:
        db.upsert_predictions(
            session,
            [{"scan_id": scan_id, "model_name": "m", "model_version": "1", "label": "covid", "p_covid": 0.9,
              "overlay_key": key, "inference_ms": 12.0}],
        )
        db.mark_scans(session, [scan_id], db.DONE, finished=True)
    return png


def test_local_overlay_url_is_signed_and_expiring(api: Api):
    """overlay_url works without a bearer header; a bad or expired signature is 403; only overlays are served."""
    scan_id = _new_id()
    assert api.client.post("/v1/scans", json=_scan(scan_id)).status_code == 202
    png = _done_with_overlay(api, scan_id)

    scan = api.client.get(f"/v1/scans/{scan_id}").json()
    (prediction,) = scan["predictions"]
    assert prediction["label"] == "covid" and prediction["p_covid"] == 0.9 and prediction["inference_ms"] == 12.0
    url = prediction["overlay_url"]
    assert url.startswith(f"{api.url}/v1/files/overlays/m/1/{scan_id}.png?")
    response = httpx.get(url)  # no Authorization header, as an <img src> would
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png" and response.content == png
    assert "private" in response.headers["cache-control"]

    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    base = f"{api.url}{parts.path}"
    tampered = query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")
    response = httpx.get(base, params={"expires": query["expires"], "sig": tampered})
    assert response.status_code == 403 and "invalid" in response.json()["detail"]
    # A signature for another key does not open this one.
    other = overlay_key("m", "1", "other")
    expires = int(query["expires"])
    response = httpx.get(base, params={"expires": expires, "sig": file_signature(TOKEN, other, expires)})
    assert response.status_code == 403
    # Expired: correctly signed, but for a moment in the past.
    key = overlay_key("m", "1", scan_id)
    past = int(time.time()) - 10
    response = httpx.get(base, params={"expires": past, "sig": file_signature(TOKEN, key, past)})
    assert response.status_code == 403 and "expired" in response.json()["detail"]
    # Signed with a different token (as after a token rotation).
    later = int(time.time()) + 600
    response = httpx.get(base, params={"expires": later, "sig": file_signature("another-token", key, later)})
    assert response.status_code == 403
    # Missing query parameters are a 422 naming them.
    response = httpx.get(base)
    assert response.status_code == 422 and {tuple(e["loc"]) for e in response.json()["detail"]} == {
        ("query", "expires"), ("query", "sig"),
    }
    # Uploaded scans are not served, even with a valid signature.
    upload = scan_key(scan_id)
    signed = {"expires": later, "sig": file_signature(TOKEN, upload, later)}
    response = httpx.get(f"{api.url}/v1/files/{upload}", params=signed)
    assert response.status_code == 404


def test_access_log_paths_are_redacted():
    """Scan ids, file keys and signatures never reach the access log."""
    assert redact_path("/v1/scans/patient-123") == "/v1/scans/{scan_id}"
    assert redact_path("/v1/files/overlays/m/1/patient-123.png?expires=1&sig=ab") == "/v1/files/{key}"
    assert redact_path("/v1/batches?x=1") == "/v1/batches"
    assert redact_path("/healthz") == "/healthz"


# ---------------------------------------------------------------- end to end with a real worker (S3)


@dataclass
class Deployment:
    """An API on S3 (moto) with a real worker draining its own Redis database."""

    api: Api
    s3: S3Store
    backlog_batch: str
    stat_id: str
    routine_ids: list[str]


@pytest.fixture(scope="class")
def deployment(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """200 routine scans and then 1 stat scan queued through the API BEFORE a worker starts, then the worker."""
    root = tmp_path_factory.mktemp("e2e")
    bundle = make_bundle(root / "bundle", "resnet50", 64)
    broker = _redis(WORKER_REDIS_URL)
    broker.flushdb()
    s3 = S3Store(f"lungcam-api-{uuid.uuid4().hex[:12]}", endpoint_url=moto_server)
    s3.client.create_bucket(Bucket=s3.bucket)
    overrides = {"broker_url": WORKER_REDIS_URL, "store_url": s3.url, "s3_endpoint_url": moto_server}
    with running_api(root, **overrides) as api:
        routine = mixed_scans(200, seed=11, size=64)
        backlog = [{"scan_id": f"r-{scan_id}", "image_base64": _b64(data)} for scan_id, data in routine.items()]
        response = api.client.post("/v1/batches", json={"name": "backlog", "scans": backlog})
        assert response.status_code == 202 and response.json()["queued"] == 200, response.text
        backlog_batch = response.json()["batch_id"]
        stat = _png(42, 64)
        stat_scan = {"scan_id": "stat-1", "image_base64": _b64(stat), "priority": "stat"}
        response = api.client.post("/v1/scans", json=stat_scan)
        assert response.status_code == 202, response.text
        assert broker.llen("routine") == 200 and broker.llen("stat") == 1

        env = {
            "LUNGCAM_BROKER_URL": WORKER_REDIS_URL,
            "LUNGCAM_DATABASE_URL": api.settings.resolved_database_url(),
            "LUNGCAM_STORE_URL": s3.url,
            "LUNGCAM_S3_ENDPOINT_URL": moto_server,
            "LUNGCAM_MODELS": str(bundle),
            "LUNGCAM_BATCH_SIZE": "8",
            "LUNGCAM_BATCH_FLUSH_MS": "200",
            "LUNGCAM_DATA_DIR": str(root / "worker-data"),
        }
        worker = start_worker(env, root / "worker.log")
        try:
            worker.wait_ready()
            yield Deployment(api, s3, backlog_batch, "stat-1", [f"r-{i}" for i in routine])
            assert "Traceback" not in worker.log()
        finally:
            worker.stop()
            broker.flushdb()


def _wait_batch_complete(api: Api, batch_id: str, timeout: float) -> dict:
    state: dict = {}

    def complete() -> bool:
        state.update(api.client.get(f"/v1/batches/{batch_id}").json())
        return bool(state["complete"])

    wait_until(complete, timeout, 0.5, f"batch {batch_id} to complete")
    return state


def _assert_png(data: bytes) -> None:
    assert data.startswith(PNG_MAGIC)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[2] == 3


class TestWithWorker:
    """A real `lungcam worker` consuming what the API queued."""

    def test_stat_scan_overtakes_the_routine_backlog(self, deployment: Deployment):
        """The stat scan, queued behind 200 routine ones, finishes before most of them."""
        api = deployment.api
        _wait_batch_complete(api, deployment.backlog_batch, 240)
        wait_until(lambda: api.client.get(f"/v1/scans/{deployment.stat_id}").json()["status"] == "done", 60)
        stat = api.client.get(f"/v1/scans/{deployment.stat_id}").json()
        stat_finished = dt.datetime.fromisoformat(stat["finished_at"])
        with api.sessions() as session:
            routine = [session.get(db.Scan, scan_id) for scan_id in deployment.routine_ids]
        assert {scan.status for scan in routine} == {db.DONE}
        later = sum(scan.finished_at > stat_finished for scan in routine)
        # In practice the stat scan is in the worker's first batch, ahead of ~95% of the backlog.
        earlier = len(routine) - later
        assert later >= len(routine) * 0.5, f"stat finished after {earlier} of {len(routine)} routine scans"

    def test_batch_of_twenty_end_to_end_with_presigned_overlays(self, deployment: Deployment):
        """POST a batch of 20 uploads, poll it to completion, read every scan, fetch every overlay without auth."""
        api = deployment.api
        scans = mixed_scans(20, seed=5, size=64)
        response = api.client.post(
            "/v1/batches",
            json={"name": "e2e", "scans": [{"scan_id": f"e-{i}", "image_base64": _b64(d)} for i, d in scans.items()]},
        )
        assert response.status_code == 202, response.text
        submitted = response.json()
        assert submitted["queued"] == 20 and submitted["already"] == 0
        for scan_id, data in scans.items():
            assert deployment.s3.get(scan_key(f"e-{scan_id}")) == data

        batch = _wait_batch_complete(api, submitted["batch_id"], 240)
        assert batch["counts"] == {"queued": 0, "running": 0, "done": 20, "failed": 0}
        assert batch["total"] == 20 and batch["progress"] == 1.0 and batch["name"] == "e2e"

        with httpx.Client(timeout=30) as anonymous:
            for scan_id in scans:
                scan = api.client.get(f"/v1/scans/e-{scan_id}").json()
                assert scan["status"] == "done" and scan["error"] is None and scan["attempts"] == 1
                assert scan["batch_id"] == submitted["batch_id"] and "source_uri" not in scan
                assert dt.datetime.fromisoformat(scan["finished_at"]) >= dt.datetime.fromisoformat(scan["submitted_at"])
                (prediction,) = scan["predictions"]
                assert prediction["model_name"] == "resnet50-test" and prediction["model_version"] == "t1"
                assert prediction["label"] in ("covid", "normal") and 0.0 <= prediction["p_covid"] <= 1.0
                assert prediction["inference_ms"] > 0
                url = prediction["overlay_url"]
                # A real presigned URL of the S3 server, not of this API.
                assert url.startswith(f"{deployment.s3.endpoint_url}/{deployment.s3.bucket}/overlays/")
                assert "X-Amz-Signature=" in url
                response = anonymous.get(url)
                assert response.status_code == 200, response.text[:300]
                _assert_png(response.content)

        metrics = httpx.get(f"{api.url}/metrics").text
        assert 'lungcam_inference_seconds_count{model_name="resnet50-test",model_version="t1"}' in metrics
