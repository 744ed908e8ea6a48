"""The HTTP API as a real uvicorn server over HTTP: real Redis, SQLite and PostgreSQL, a local folder or S3 (moto).

Runs without TensorFlow (an install of `lungcam[api]`); the end-to-end tests with a real worker are in
test_api_worker.py.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from helpers.api import (
    API_REDIS_URL,
    AUTH,
    MAX_BODY_BYTES,
    MAX_IMAGE_BYTES,
    TOKEN,
    Api,
    _closed_port,
    api_settings,
    b64,
    png_bytes,
    redis_client,
    running_api,
    serve,
)

from shared.domain import Status
from shared.models import Scan
from shared.scans import PredictionRow, mark_scans, upsert_predictions
from shared.store import overlay_key, scan_key
from worker.api.logs import redact_path
from worker.api.security import file_signature


@pytest.fixture(scope="module")
def broker() -> Iterator[redis.Redis]:
    """The fast tests' Redis database, emptied before and after."""
    client = redis_client(API_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="module")
def api(broker: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API shared by the tests that only need it to answer (local store, SQLite, small size limits)."""
    # An archive bucket the deployment lets callers reference (LUNGCAM_ALLOWED_SOURCES).
    with running_api(tmp_path_factory.mktemp("api"), allowed_sources="s3://archive-bucket") as running:
        yield running


@pytest.fixture
def fresh_api(broker: redis.Redis, db_url: str, tmp_path: Path) -> Iterator[Api]:
    """An API on an empty database (SQLite, then PostgreSQL) and a store of its own."""
    with running_api(tmp_path, database_url=db_url) as running:
        yield running


def _scan(scan_id: str, **fields: object) -> dict[str, object]:
    body: dict[str, object] = {"scan_id": scan_id, **fields}
    if "source_uri" not in fields and "image_base64" not in fields:
        body["image_base64"] = b64(png_bytes())
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
        "broker": True,
        "database": True,
        "store": True,
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
            assert session.get(Scan, scan_id).status == Status.QUEUED
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
    """/metrics (bearer token) has lungcam_scans per status computed from the database, and inference time per model."""
    ids = [_new_id() for _ in range(4)]
    response = fresh_api.client.post("/v1/batches", json={"scans": [_scan(scan_id) for scan_id in ids]})
    assert response.status_code == 202, response.text
    # What a worker would write: one scan done with a prediction, one failed, one running.
    with fresh_api.sessions.begin() as session:
        upsert_predictions(
            session,
            [
                PredictionRow(
                    scan_id=ids[0],
                    model_name="m",
                    model_version="1",
                    label="normal",
                    p_covid=0.1,
                    overlay_key=None,
                    inference_ms=250.0,
                )
            ],
        )
        mark_scans(session, [ids[0]], Status.DONE, finished=True)
        mark_scans(session, [ids[1]], Status.FAILED, error="undecodable image", finished=True)
        mark_scans(session, [ids[2]], Status.RUNNING)

    assert httpx.get(f"{fresh_api.url}/metrics").status_code == 401
    response = httpx.get(f"{fresh_api.url}/metrics", headers=AUTH)
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
    assert {
        "/v1/scans",
        "/v1/scans/{scan_id}",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/files/{key}",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    assert httpx.get(f"{api.url}/docs").status_code == 200


# ------------------------------------------------------------------------------------------------ auth


def test_v1_needs_the_bearer_token(api: Api):
    """Missing or wrong token: 401 with WWW-Authenticate: Bearer; the right token: 2xx."""
    body = _scan(_new_id())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, payload in (
            ("POST", "/v1/scans", body),
            ("GET", "/v1/batches/x", None),
            ("GET", "/v1/scans/x", None),
        ):
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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's SystemExit(3)
def test_api_refuses_to_start_on_a_database_behind_its_schema(broker: redis.Redis, tmp_path: Path):
    """Migrations run in one place (`lungcam migrate`); an API on an empty database says so and does not serve."""
    settings = api_settings(tmp_path)
    with pytest.raises(AssertionError, match="failed to start"), serve(settings, migrate=False):
        pass
    from shared.errors import SchemaOutOfDate
    from worker.api.main import open_resources

    with pytest.raises(SchemaOutOfDate, match="lungcam migrate"):
        open_resources(settings)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "scan_id",
    ["../x", "a/b", "", "x" * 129, ".hidden", "-dash", "a..b", "a b", "a\\b", "é", "a\n"],
    ids=[
        "dotdot-slash",
        "slash",
        "empty",
        "129-chars",
        "leading-dot",
        "leading-dash",
        "dotdot",
        "space",
        "backslash",
        "non-ascii",
        "trailing-newline",
    ],
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
    both = {"scan_id": _new_id(), "source_uri": "s3://bucket/a.png", "image_base64": b64(png_bytes())}
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


def test_an_upload_is_decoded_once_into_the_request_and_documented_as_base64_text():
    """The validated request holds the image's bytes (no second decode later); the schema still says base64 text."""
    from worker.api.models import ScanIn

    data = png_bytes()
    scan = ScanIn.model_validate({"scan_id": "a1", "image_base64": b64(data)})
    assert scan.image == data and scan.source_uri is None
    schema = ScanIn.model_json_schema()["properties"]["image_base64"]
    assert {"type": "string", "contentEncoding": "base64"} in schema["anyOf"]


def test_too_large_image_is_refused_with_413(api: Api):
    """An upload decoding to more than LUNGCAM_API_MAX_IMAGE_BYTES: 413 naming the field and the limit."""
    scan_id = _new_id()
    big = b64(os.urandom(MAX_IMAGE_BYTES + 1))
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
    [
        "/etc/passwd",
        "file:///etc/passwd",
        "../../etc/passwd",
        "scans/other-scan",
        "s3://bucket",
        "s3://bucket/",
        "http://example.org/a.png",
        "s3://B/key",
    ],
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
    image = b64(png_bytes())
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
    scan_id, image = _new_id(), png_bytes(3)
    response = api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": b64(image), "priority": "stat"})
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
        assert session.get(Scan, scan_id).source_uri == "s3://archive-bucket/2020/a b.png"


@pytest.mark.parametrize(
    "source_uri",
    [
        "s3://other-bucket/a.png",
        "s3://no-such-bucket-at-all/a.png",
        "s3://archive-bucket-2/a.png",
        "s3://archive-bucket/2020/../../other-bucket/a.png",
    ],
    ids=["existing-unlisted-bucket", "missing-bucket", "prefix-lookalike", "dotdot"],
)
def test_a_source_outside_the_allowed_buckets_is_403_and_queues_nothing(broker: redis.Redis, api: Api, source_uri: str):
    """The worker reads sources with its own credentials: a caller may only name allowed locations."""
    scan_id = _new_id()
    before = _queue_length(broker, "routine")
    response = api.client.post("/v1/scans", json={"scan_id": scan_id, "source_uri": source_uri})
    assert response.status_code == 403, response.text
    # The same words whether or not the bucket exists: a refusal reveals nothing about the store.
    from shared.sources import NOT_READABLE

    assert response.json()["detail"] == NOT_READABLE
    batch = {"scans": [_scan(_new_id()), {"scan_id": _new_id(), "source_uri": source_uri}]}
    response = api.client.post("/v1/batches", json=batch)
    assert response.status_code == 403 and response.json()["detail"] == NOT_READABLE
    assert _queue_length(broker, "routine") == before
    assert api.client.get(f"/v1/scans/{scan_id}").status_code == 404
    with api.sessions() as session:
        assert session.get(Scan, batch["scans"][0]["scan_id"]) is None  # nothing of the batch recorded


def test_resubmitting_does_not_queue_twice_unless_forced(broker: redis.Redis, fresh_api: Api):
    """Same scan again: 200, queued false, current status, no new message; force: 202, a new message, new image."""
    scan_id = _new_id()
    first, second = png_bytes(1), png_bytes(2)
    before = _queue_length(broker, "routine")
    response = fresh_api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": b64(first)})
    assert response.status_code == 202 and response.json()["queued"] is True
    assert _queue_length(broker, "routine") == before + 1

    with fresh_api.sessions.begin() as session:
        mark_scans(session, [scan_id], Status.DONE, finished=True)
    response = fresh_api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": b64(second)})
    assert response.status_code == 200
    assert response.json() == {"scan_id": scan_id, "status": "done", "queued": False}
    assert _queue_length(broker, "routine") == before + 1
    assert fresh_api.store().get(scan_key(scan_id)) == first  # a finished scan's input is not replaced

    response = fresh_api.client.post(
        "/v1/scans", json={"scan_id": scan_id, "image_base64": b64(second), "force": True, "priority": "stat"}
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
    png = png_bytes(5, 48)
    api.store().put(key, png, "image/png")
    with api.sessions.begin() as session:
        upsert_predictions(
            session,
            [
                PredictionRow(
                    scan_id=scan_id,
                    model_name="m",
                    model_version="1",
                    label="covid",
                    p_covid=0.9,
                    overlay_key=key,
                    inference_ms=12.0,
                )
            ],
        )
        mark_scans(session, [scan_id], Status.DONE, finished=True)
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
        ("query", "expires"),
        ("query", "sig"),
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
