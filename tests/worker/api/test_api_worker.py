"""The HTTP API end to end with a real `lungcam worker` draining what it queued (S3 through moto)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import httpx
import numpy as np
import pytest
from helpers import make_tiny_bundle, mixed_scans, start_worker, wait_until
from helpers.api import PNG_MAGIC, WORKER_REDIS_URL, Api, b64, png_bytes, redis_client, running_api

from shared.domain import Status
from shared.models import Scan
from shared.store import S3Store, scan_key

pytestmark = pytest.mark.slow


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
    bundle = make_tiny_bundle(root / "bundle", 64)
    broker = redis_client(WORKER_REDIS_URL)
    broker.flushdb()
    s3 = S3Store(f"lungcam-api-{uuid.uuid4().hex[:12]}", endpoint_url=moto_server)
    s3.client.create_bucket(Bucket=s3.bucket)
    overrides = {"broker_url": WORKER_REDIS_URL, "store_url": s3.url, "s3_endpoint_url": moto_server}
    with running_api(root, **overrides) as api:
        routine = mixed_scans(200, seed=11, size=64)
        backlog = [{"scan_id": f"r-{scan_id}", "image_base64": b64(data)} for scan_id, data in routine.items()]
        response = api.client.post("/v1/batches", json={"name": "backlog", "scans": backlog})
        assert response.status_code == 202 and response.json()["queued"] == 200, response.text
        backlog_batch = response.json()["batch_id"]
        stat = png_bytes(42, 64)
        stat_scan = {"scan_id": "stat-1", "image_base64": b64(stat), "priority": "stat"}
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


def _assertpng_bytes(data: bytes) -> None:
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
            routine = [session.get(Scan, scan_id) for scan_id in deployment.routine_ids]
        assert {scan.status for scan in routine} == {Status.DONE}
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
            json={"name": "e2e", "scans": [{"scan_id": f"e-{i}", "image_base64": b64(d)} for i, d in scans.items()]},
        )
        assert response.status_code == 202, response.text
        submitted = response.json()
        assert submitted["queued"] == 20 and submitted["already"] == 0
        for scan_id, data in scans.items():
            assert deployment.s3.get(scan_key(f"e-{scan_id}")) == data

        batch = _wait_batch_complete(api, submitted["batch_id"], 240)
        assert batch["counts"] == {"queued": 0, "running": 0, "done": 20, "failed": 0, "skipped": 0}
        assert batch["total"] == 20 and batch["progress"] == 1.0 and batch["name"] == "e2e"

        with httpx.Client(timeout=30) as anonymous:
            for scan_id in scans:
                scan = api.client.get(f"/v1/scans/e-{scan_id}").json()
                assert scan["status"] == "done" and scan["error"] is None and scan["attempts"] == 1
                assert scan["batch_id"] == submitted["batch_id"] and "source_uri" not in scan
                assert dt.datetime.fromisoformat(scan["finished_at"]) >= dt.datetime.fromisoformat(scan["submitted_at"])
                (prediction,) = scan["predictions"]
                assert prediction["model_name"] == "tiny-test" and prediction["model_version"] == "t1"
                assert prediction["label"] in ("covid", "normal") and 0.0 <= prediction["p_covid"] <= 1.0
                assert prediction["inference_ms"] > 0
                url = prediction["overlay_url"]
                # A real presigned URL of the S3 server, not of this API.
                assert url.startswith(f"{deployment.s3.endpoint_url}/{deployment.s3.bucket}/overlays/")
                assert "X-Amz-Signature=" in url
                response = anonymous.get(url)
                assert response.status_code == 200, response.text[:300]
                _assertpng_bytes(response.content)

        metrics = api.client.get("/metrics").text
        assert 'lungcam_inference_seconds_count{model_name="tiny-test",model_version="t1"}' in metrics
