"""Archive inputs end to end: films that are not frontal chest radiographs end `skipped`; huge images stay in budget."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import redis
from helpers import LUNGCAM, WorkerProcess, make_tiny_bundle, redis_url, start_worker, wait_until
from helpers.api import AUTH, api_settings, serve

from shared.engine import make_engine, make_session_factory
from shared.queueing import make_app, submit_scans
from shared.scans import NewScan, batch_counts
from shared.settings import Settings
from shared.store import LocalStore, scan_key
from shared.synthetic import make_dicom, synthetic_xray

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("LUNGCAM_TEST_SELECTION_REDIS_URL", redis_url(15))
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
GIB = 1024**3


@dataclass
class Site:
    """A worker with a near-zero-cost model on real Redis, SQLite and a local store."""

    root: Path
    env: dict[str, str]
    worker: WorkerProcess

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """Run `lungcam ARGS` with this site's settings."""
        return subprocess.run(
            [LUNGCAM, *args], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=600
        )

    def settings(self) -> Settings:
        """The same settings, for the API and direct database access."""
        return api_settings(
            self.root / "api",
            broker_url=self.env["LUNGCAM_BROKER_URL"],
            database_url=self.env["LUNGCAM_DATABASE_URL"],
            store_url=self.env["LUNGCAM_STORE_URL"],
            api_max_image_bytes=50_000_000,
            api_max_body_bytes=100_000_000,
        )


def _start_site(root: Path, **extra: str) -> Site:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    env = {
        "LUNGCAM_DATA_DIR": str(root / "data"),
        "LUNGCAM_BROKER_URL": REDIS_URL,
        "LUNGCAM_DATABASE_URL": f"sqlite:///{root / 'site.sqlite'}",
        "LUNGCAM_STORE_URL": str(root / "store"),
        "LUNGCAM_MODELS": str(make_tiny_bundle(root / "bundle", 64)),
        "LUNGCAM_BATCH_SIZE": "16",
        "LUNGCAM_BATCH_FLUSH_MS": "200",
        **extra,
    }
    migrate = subprocess.run(
        [LUNGCAM, "migrate"], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, migrate.stderr
    worker = start_worker(env, root / "worker.log")
    worker.wait_ready()
    return Site(root, env, worker)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    running = _start_site(tmp_path)
    try:
        yield running
        assert "Traceback" not in running.worker.log()
    finally:
        running.worker.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()


def _film(seed: int) -> np.ndarray:
    return synthetic_xray(np.random.default_rng(seed), 128).image.astype(np.uint16) * 16


def test_a_lateral_dx_and_a_ct_slice_are_skipped_and_a_frontal_cr_is_classified(site: Site, tmp_path: Path):
    """Via the CLI (ingest --wait, results) and the API (batch counts, scan view, a new upload)."""
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "lateral.dcm").write_bytes(
        make_dicom(_film(1), bits_stored=12, modality="DX", body_part="CHEST", view_position="LL")
    )
    (folder / "ct.dcm").write_bytes(
        make_dicom(
            _film(2),
            bits_stored=12,
            modality="CT",
            body_part="CHEST",
            view_position=None,
            sop_class_uid=CT_IMAGE_STORAGE,
        )
    )
    (folder / "frontal.dcm").write_bytes(
        make_dicom(_film(3), bits_stored=12, modality="CR", body_part="CHEST", view_position="PA")
    )

    ingest = site.run("ingest", str(folder), "--wait", "--timeout", "300")
    assert ingest.returncode == 0, ingest.stderr[-3000:]  # skipped is not a failure
    assert "1 done, 0 failed, 2 skipped of 3" in ingest.stdout
    batch_id = ingest.stdout.split("batch ", 1)[1].split(":", 1)[0]
    results = site.run("results", batch_id)
    assert results.returncode == 0, results.stderr
    rows = {line.split()[0]: line for line in results.stdout.splitlines()[2:]}
    assert " skipped " in rows["lateral.dcm"] and "lateral view (LL)" in rows["lateral.dcm"]
    assert " skipped " in rows["ct.dcm"] and "modality CT" in rows["ct.dcm"]
    assert " done " in rows["frontal.dcm"] and "tiny-test" in rows["frontal.dcm"]

    lateral_upload = make_dicom(_film(4), bits_stored=12, modality="DX", view_position="RL")
    with serve(site.settings()) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as api:
        batch = api.get(f"/v1/batches/{batch_id}").json()
        assert batch["counts"] == {"queued": 0, "running": 0, "done": 1, "failed": 0, "skipped": 2}
        assert batch["complete"] is True and batch["progress"] == 1.0
        ct = api.get("/v1/scans/ct.dcm").json()
        assert ct["status"] == "skipped" and "modality CT" in ct["error"] and ct["predictions"] == []
        body = {"scan_id": "upload-lateral", "image_base64": base64.b64encode(lateral_upload).decode()}
        assert api.post("/v1/scans", json=body).status_code == 202
        wait_until(lambda: api.get("/v1/scans/upload-lateral").json()["status"] == "skipped", 120, message="the upload")
        assert "lateral view (RL)" in api.get("/v1/scans/upload-lateral").json()["error"]
        metrics = api.get("/metrics").text
    assert 'lungcam_scans{status="skipped"} 3.0' in metrics


def _vm_hwm_bytes(pid: int) -> int:
    """The peak resident set size of a process (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_sixteen_images_of_10000_pixels_a_side_stay_under_two_gigabytes(tmp_path: Path):
    """A 10000x10000 16-bit PNG is ~0.2 MB on disk and 200 MB decoded: the pixel budget keeps the worker bounded."""
    site = _start_site(tmp_path)
    try:
        ramp = np.linspace(0, 65535, 10_000, dtype=np.float32).astype(np.uint16)
        huge = cv2.imencode(".png", np.broadcast_to(ramp, (10_000, 10_000)).copy(), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]
        data = huge.tobytes()
        assert len(data) < 5_000_000
        store = LocalStore(site.env["LUNGCAM_STORE_URL"])
        ids = [f"huge-{index:02d}" for index in range(16)]
        for scan_id in ids:
            store.put(scan_key(scan_id), data)
        settings = site.settings()
        engine = make_engine(settings.resolved_database_url())
        sessions = make_session_factory(engine)
        baseline = _vm_hwm_bytes(site.worker.process.pid)
        submit_scans(sessions, make_app(settings), [NewScan(s, scan_key(s)) for s in ids], batch_id="huge")

        def finished() -> bool:
            with sessions() as session:
                counts = batch_counts(session, "huge")
            return counts["done"] + counts["failed"] == len(ids)

        wait_until(finished, 600, interval=1.0, message="16 huge images")
        peak = _vm_hwm_bytes(site.worker.process.pid)
        with sessions() as session:
            assert batch_counts(session, "huge")["done"] == 16
        engine.dispose()
        print(
            f"worker peak RSS {peak / GIB:.2f} GiB (after start-up {baseline / GIB:.2f} GiB) for 16 x 10000x10000 16-bit PNG"
        )
        assert peak < 2 * GIB, f"worker peak RSS {peak / GIB:.2f} GiB"
    finally:
        site.worker.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
