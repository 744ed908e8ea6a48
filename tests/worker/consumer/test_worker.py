"""Workers end to end: real Redis, real `lungcam worker` subprocesses, S3 through moto, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from helpers import corrupt_scans, make_tiny_bundle, mixed_scans, redis_url, start_worker, wait_until
from sqlalchemy import func, select

from shared.domain import Status
from shared.engine import make_engine, make_session_factory, migrate
from shared.models import Prediction, Scan
from shared.queueing import make_app, publish, submit_scans
from shared.scans import NewScan, batch_counts
from shared.settings import Settings
from shared.sources import NOT_READABLE
from shared.store import LocalStore, overlay_key, scan_key

# Starts real workers or trains models: left out of the fast tier (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("LUNGCAM_TEST_REDIS_URL", redis_url(13))
MODEL_NAMES = ("first-test", "second-test")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny random-weight bundles, so every scan gets a row per model.

    Tiny, not ResNet50/VGG16: these tests are about the pipeline, and a worker serving them starts in half
    the time. Workers serving real backbones: test_demo (the shipped VGG16 model) and test_pretrained.
    """
    root = tmp_path_factory.mktemp("bundles")
    return [make_tiny_bundle(root / name, 64, name=name) for name in MODEL_NAMES]


@pytest.fixture
def broker() -> str:
    """A real Redis database, emptied before and after the test."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis not reachable at {REDIS_URL} (`python3 run.py test` starts one): {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


def _env(broker: str, db_url: str, store_url: str, bundles: list[Path], **extra: str) -> dict[str, str]:
    return {
        "LUNGCAM_BROKER_URL": broker,
        "LUNGCAM_DATABASE_URL": db_url,
        "LUNGCAM_STORE_URL": store_url,
        "LUNGCAM_MODELS": ",".join(str(path) for path in bundles),
        "LUNGCAM_BATCH_SIZE": "8",
        "LUNGCAM_BATCH_FLUSH_MS": "200",
        **extra,
    }


def _sessions(db_url: str):
    engine = make_engine(db_url)
    migrate(engine)
    return make_session_factory(engine)


def _status_counts(sessions) -> dict[str, int]:
    with sessions() as session:
        return dict(session.execute(select(Scan.status, func.count()).group_by(Scan.status)).all())


def _finished(sessions, total: int) -> bool:
    counts = _status_counts(sessions)
    return counts.get(Status.DONE, 0) + counts.get(Status.FAILED, 0) == total


def _predictions_per_scan_and_model(sessions) -> dict[tuple[str, str], int]:
    with sessions() as session:
        rows = session.execute(
            select(Prediction.scan_id, Prediction.model_name, func.count()).group_by(
                Prediction.scan_id, Prediction.model_name
            )
        ).all()
    return {(scan_id, model): count for scan_id, model, count in rows}


def test_forty_scans_and_three_corrupt_end_done_or_failed(db_url, s3_store, moto_server, bundles, broker, tmp_path):
    """40 PNG/JPEG/DICOM scans end done with a row and an overlay per model; 3 corrupt ones fail with reasons."""
    valid, corrupt = mixed_scans(40), corrupt_scans()
    for scan_id, data in {**valid, **corrupt}.items():
        s3_store.put(scan_key(scan_id), data)
    env = _env(broker, db_url, s3_store.url, bundles, LUNGCAM_S3_ENDPOINT_URL=moto_server)
    settings = Settings(**{key.removeprefix("LUNGCAM_").lower(): value for key, value in env.items()})
    sessions = _sessions(db_url)
    app = make_app(settings)
    scans = [NewScan(scan_id, scan_key(scan_id)) for scan_id in {**valid, **corrupt}]
    submitted = submit_scans(sessions, app, scans, batch_id="e2e")
    assert len(submitted.queued) == 43

    worker = start_worker(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_until(lambda: _finished(sessions, 43), 300, message="all 43 scans to finish")

        with sessions() as session:
            counts = batch_counts(session, "e2e")
            failed = {s.scan_id: s.error for s in session.scalars(select(Scan).where(Scan.status == Status.FAILED))}
        assert counts["done"] == 40 and counts["failed"] == 3, counts
        assert set(failed) == set(corrupt)
        assert "truncated" in failed["bad-truncated-png"] or "corrupt" in failed["bad-truncated-png"]
        assert "not an image" in failed["bad-text"]
        assert "no pixel data" in failed["bad-dicom-no-pixels"].lower()

        per_model = _predictions_per_scan_and_model(sessions)
        assert per_model == {(scan_id, model): 1 for scan_id in valid for model in MODEL_NAMES}
        for scan_id in valid:
            for model in MODEL_NAMES:
                overlay = s3_store.get(overlay_key(model, "t1", scan_id))
                image = cv2.imdecode(np.frombuffer(overlay, np.uint8), cv2.IMREAD_COLOR)
                assert image is not None and image.shape[2] == 3

        # Idempotent: delivering finished scans again (forced) rewrites, never duplicates.
        again = list(valid)[:5]
        for scan_id in again:
            publish(app, scan_id, "routine", force=True)
        wait_until(
            lambda: _attempts(sessions, again) == {2} and _finished(sessions, 43),
            120,
            message="forced redelivery to be processed",
        )
        assert _predictions_per_scan_and_model(sessions) == per_model
        with sessions() as session:
            keys = set(session.scalars(select(Prediction.overlay_key).where(Prediction.scan_id.in_(again))))
        assert keys == {overlay_key(model, "t1", scan_id) for scan_id in again for model in MODEL_NAMES}
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()


def _attempts(sessions, scan_ids: list[str]) -> set[int]:
    with sessions() as session:
        return set(session.scalars(select(Scan.attempts).where(Scan.scan_id.in_(scan_ids))))


def test_sigkilled_worker_loses_nothing_and_duplicates_nothing(tmp_path, bundles, broker, moto_server):
    """SIGKILL a worker mid-batch; a second worker finishes every scan exactly once per model."""
    store = LocalStore(tmp_path / "store")
    db_url = f"sqlite:///{tmp_path / 'crash.sqlite'}"
    valid = mixed_scans(64, seed=1, size=256)
    for scan_id, data in valid.items():
        store.put(scan_key(scan_id), data)
    # A scan in a bucket that does not exist: the store refuses it, which no retry changes (issue #10).
    scans = [NewScan(scan_id, scan_key(scan_id)) for scan_id in valid]
    scans.append(NewScan("unreachable", "s3://no-such-bucket-lungcam/scan.png"))
    env = _env(
        broker,
        db_url,
        str(tmp_path / "store"),
        bundles,
        LUNGCAM_VISIBILITY_TIMEOUT_S="8",
        LUNGCAM_TASK_MAX_RETRIES="2",
        LUNGCAM_S3_ENDPOINT_URL=moto_server,
        # Short leases and reconciler passes: the killed worker's claims expire in seconds, not the
        # default 30 s (the recovery path is the same; test_recovery checks it with default settings).
        LUNGCAM_LEASE_S="6",
        LUNGCAM_RECONCILE_INTERVAL_S="2",
        # Allowed, so the worker really asks the store (which has no such bucket).
        LUNGCAM_ALLOWED_SOURCES="s3://no-such-bucket-lungcam",
    )
    sessions = _sessions(db_url)
    settings = Settings(broker_url=broker, database_url=db_url, store_url=str(tmp_path / "store"))

    first = start_worker(env, tmp_path / "first.log")
    try:
        first.wait_ready()
        submit_scans(sessions, make_app(settings), scans, batch_id="crash")
        wait_until(lambda: _status_counts(sessions).get(Status.RUNNING, 0) > 0, 60, 0.02, "a batch in flight")
        first.kill()
    finally:
        first.stop()
    at_kill = _status_counts(sessions)
    assert at_kill.get(Status.DONE, 0) < len(valid), f"the first worker finished everything before the kill: {at_kill}"
    assert at_kill.get(Status.RUNNING, 0) > 0, at_kill

    second = start_worker(env, tmp_path / "second.log")
    try:
        second.wait_ready()
        wait_until(lambda: _finished(sessions, len(scans)), 300, message="the second worker to finish the work")
        assert "batch:" in second.log()
    finally:
        second.stop()

    per_model = _predictions_per_scan_and_model(sessions)
    assert per_model == {(scan_id, model): 1 for scan_id in valid for model in MODEL_NAMES}
    with sessions() as session:
        statuses = dict(session.execute(select(Scan.scan_id, Scan.status)).all())
        unreachable = session.get(Scan, "unreachable")
    assert {statuses[scan_id] for scan_id in valid} == {Status.DONE}
    assert unreachable.status == Status.FAILED
    # Worded like a missing key: a scan's error never tells whether a bucket exists.
    assert unreachable.error == NOT_READABLE
    assert "gave up" not in unreachable.error
    for scan_id in valid:
        for model in MODEL_NAMES:
            assert store.exists(overlay_key(model, "t1", scan_id))


def test_worker_sets_cuda_visible_devices_before_tensorflow_is_imported(tmp_path):
    """`lungcam worker --gpu 3` has CUDA_VISIBLE_DEVICES=3 at the moment TensorFlow is first imported."""
    record = tmp_path / "seen.txt"
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import importlib.abc, os, sys

            class _RecordTensorFlowImport(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name == "tensorflow":
                        with open({str(record)!r}, "a") as out:
                            out.write(repr(os.environ.get("CUDA_VISIBLE_DEVICES")) + "\\n")
                        sys.meta_path.remove(self)
                    return None

            sys.meta_path.insert(0, _RecordTensorFlowImport())
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LUNGCAM_MODELS": "", "LUNGCAM_DATA_DIR": str(tmp_path / "data")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker", "--gpu", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # No models are configured, so the worker stops with a clear error after TensorFlow started.
    assert result.returncode == 2, result.stderr
    assert "no model bundles configured" in result.stderr
    assert record.read_text().splitlines() == ["'3'"]


def test_pin_gpu_refuses_once_tensorflow_is_loaded():
    """Pinning after TensorFlow started would silently do nothing, so it raises instead."""
    import tensorflow  # noqa: F401

    from worker.consumer.gpu import TensorFlowAlreadyImported, pin_gpu

    with pytest.raises(TensorFlowAlreadyImported):
        pin_gpu(0)
