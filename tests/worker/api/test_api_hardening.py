"""The API under hostile requests: 401 before the body is read, ids outside the pattern, Host headers, /metrics.

Runs without TensorFlow (an install of `lungcam[api]`), like test_api.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import LUNGCAM, REPO, redis_url
from helpers.api import Api, b64, png_bytes, redis_client, running_api

from shared.domain import Status
from shared.engine import migrate
from shared.scans import PredictionRow, mark_scans, upsert_predictions
from shared.store import overlay_key

REDIS_URL = os.environ.get("LUNGCAM_TEST_HARDENING_REDIS_URL", redis_url(14))
PUBLIC_URL = "https://lungcam.example.org/screening"
BODY_BYTES = 93 * 1024 * 1024
CONCURRENT = 16


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    client = redis_client(REDIS_URL)
    client.flushdb()
    with running_api(tmp_path_factory.mktemp("hardening"), broker_url=REDIS_URL, public_url=PUBLIC_URL) as running:
        yield running
    client.flushdb()


@pytest.fixture
def fresh_api(db_url: str, tmp_path: Path) -> Iterator[Api]:
    """An API on SQLite, then on PostgreSQL (where a NUL in a query parameter is an error of the driver)."""
    with running_api(tmp_path, broker_url=REDIS_URL, database_url=db_url) as running:
        yield running


def test_an_id_outside_the_pattern_is_a_4xx_that_never_reaches_the_database(fresh_api: Api):
    for path in ("/v1/scans/a%00b", "/v1/scans/a%0Ab", "/v1/scans/" + "x" * 129, "/v1/scans/-x", "/v1/batches/a%00b"):
        response = fresh_api.client.get(path)
        assert response.status_code == 422, (path, response.text)
        assert "\x00" not in response.text
    assert fresh_api.client.get("/v1/scans/a.b-c_d").status_code == 404  # inside the pattern: looked up


def test_links_use_the_configured_public_url_whatever_the_host_header(api: Api):
    scan_id = f"host-{uuid.uuid4().hex[:8]}"
    assert api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": b64(png_bytes())}).status_code == 202
    key = overlay_key("m", "1", scan_id)
    api.store().put(key, png_bytes(2), "image/png")
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
                    inference_ms=1.0,
                )
            ],
        )
        mark_scans(session, [scan_id], Status.DONE, finished=True)
    for host in ("evil.example", "evil.example:443", "127.0.0.1"):
        scan = api.client.get(f"/v1/scans/{scan_id}", headers={"Host": host}).json()
        url = scan["predictions"][0]["overlay_url"]
        assert url.startswith(f"{PUBLIC_URL}/v1/files/overlays/m/1/{scan_id}.png?expires="), url
        assert "evil" not in url


def test_metrics_need_the_token(api: Api):
    assert httpx.get(f"{api.url}/metrics").status_code == 401
    assert httpx.get(f"{api.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = api.client.get("/metrics")
    assert response.status_code == 200 and "lungcam_scans" in response.text
    assert httpx.get(f"{api.url}/healthz").status_code == 200  # probes stay open


def test_an_unauthenticated_small_post_gets_a_json_401_and_the_connection_stays_usable(api: Api):
    with httpx.Client(base_url=api.url, timeout=10) as anonymous:
        response = anonymous.post("/v1/scans", json={"scan_id": "x", "image_base64": "AAAA"})
        assert response.status_code == 401 and "missing bearer token" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _hostile_post(port: int, answers: list[tuple[float, bytes]]) -> None:
    """POST /v1/scans declaring 93 MB without a token, streaming zeros while waiting for the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    head = (
        f"POST /v1/scans HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {BODY_BYTES}\r\n\r\n"
    ).encode()
    sock.sendall(head)

    def stream() -> None:
        chunk, sent = b"0" * 65536, 0
        try:
            while sent < BODY_BYTES:
                sent += sock.send(chunk)
        except OSError:
            pass  # the server closed the connection after answering: what it should do

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except OSError as exc:
        received += f"<{type(exc).__name__}>".encode()
    answers.append((time.monotonic() - started, received))
    sock.close()
    sender.join(10)


def test_sixteen_concurrent_93_mb_unauthenticated_posts_get_401_within_a_second_without_growing_the_api(tmp_path: Path):
    """Against `lungcam api` as its own process, so its memory is measured alone."""
    database = f"sqlite:///{tmp_path / 'api.sqlite'}"
    migrate(database)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")},
        "PYTHONPATH": str(REPO),
        "LUNGCAM_DATA_DIR": str(tmp_path),
        "LUNGCAM_DATABASE_URL": database,
        "LUNGCAM_BROKER_URL": REDIS_URL,
        "LUNGCAM_API_TOKEN": "t-" + uuid.uuid4().hex,
    }
    log = (tmp_path / "api.log").open("w")
    process = subprocess.Popen(
        [LUNGCAM, "api", "--port", str(port), "--loglevel", "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-2000:]
            time.sleep(0.1)
        idle = _rss_bytes(process.pid)
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes(process.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers: list[tuple[float, bytes]] = []
        clients = [threading.Thread(target=_hostile_post, args=(port, answers)) for _ in range(CONCURRENT)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        time.sleep(0.3)
        done.set()
        sampler.join()
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    assert len(answers) == CONCURRENT
    for elapsed, received in answers:
        assert received.startswith(b"HTTP/1.1 401"), received[:200]
        assert elapsed < 1.0, f"401 after {elapsed:.2f} s"
        body = received.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in received else b""
        if body:
            assert "bearer token" in json.loads(body)["detail"]
    grown = peak - idle
    print(
        f"API RSS idle {idle / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB (+{grown / 2**20:.1f} MB); "
        f"slowest 401 {max(a for a, _ in answers) * 1000:.0f} ms"
    )
    assert grown < 500 * 2**20


def _headers_only(url: str, request: str) -> bytes:
    """Send only the request head (no body) and read the answer: what the server says from the headers alone."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received


def test_answers_come_from_the_headers_before_any_body_byte(api: Api):
    big = "Content-Length: 10000000\r\n\r\n"
    assert _headers_only(api.url, f"POST /v1/batches HTTP/1.1\r\nHost: x\r\n{big}").startswith(b"HTTP/1.1 401")
    assert _headers_only(
        api.url, "POST /v1/scans HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).startswith(b"HTTP/1.1 401")
    assert _headers_only(api.url, f"POST /healthz HTTP/1.1\r\nHost: x\r\n{big}").startswith(b"HTTP/1.1 413")
    assert _headers_only(api.url, "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\n\r\n").startswith(
        b"HTTP/1.1 401"
    )
