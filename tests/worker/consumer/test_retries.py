"""Retries that mean it: which errors are transient, where retries go, and that an outage ends.

The batch task runs in-process (no worker subprocess) on a real database and a real Redis, with a
stub model (numpy, no TensorFlow): what is under test is the sorting of failures, not inference.
Database failures are real: a PostgreSQL table locked from another connection with a short
lock_timeout on the worker's engine, a constraint that rejects a row.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from celery_batches import SimpleRequest
from helpers import empty_schema, mixed_scans, redis_url
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from shared.domain import Priority, Status
from shared.engine import make_engine, make_session_factory, migrate, normalize_url
from shared.models import Prediction, Scan, utcnow
from shared.queueing import CLASSIFY_TASK, make_app, submit_scans
from shared.scans import NewScan, add_scans, claim_scans, fail_unfinished, mark_scans
from shared.settings import Settings
from shared.store import LocalStore, StoreError, scan_key
from worker.consumer.classifier import ScanClassifier
from worker.consumer.reconciler import Reconciler
from worker.consumer.served import ServedModel
from worker.consumer.tasks import MAX_BACKOFF_S, BatchRunner, backoff_bound_seconds, backoff_seconds
from worker.consumer.transient import is_transient, traceback_without_messages

REDIS_URL = os.environ.get("LUNGCAM_TEST_RETRIES_REDIS_URL", redis_url(4))


@dataclass
class StubBundle:
    """What the classifier reads of a bundle."""

    name: str = "stub"
    version: str = "s1"
    input_size: int = 32
    class_names: tuple[str, ...] = ("covid", "normal")
    manifest: dict[str, object] = field(default_factory=dict)
    preprocessing: dict[str, object] | None = None

    @property
    def operating_point(self) -> PassThroughOperatingPoint:
        """Threshold 0.5 with no calibration step, so the stub's impossible p = -1 reaches the database."""
        return PassThroughOperatingPoint()


class PassThroughOperatingPoint:
    """An uncalibrated operating point that does not check its input (the retry rules, not calibration, are tested)."""

    threshold = 0.5

    def predict(self, p_covid: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """p_covid unchanged; covid at or above 0.5."""
        return p_covid, ["covid" if p >= 0.5 else "normal" for p in p_covid]


class StubGradCam:
    """p(covid) = mean brightness, -1 for a black image (a value the test constraint refuses); a flat CAM."""

    def __init__(self, on_call: Callable[[], None] | None = None) -> None:
        self.on_call = on_call

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.on_call:
            self.on_call()
        p = batch.reshape(len(batch), -1).mean(axis=1)
        p = np.where(p == 0, -1.0, np.clip(p, 0.01, 0.99))
        return np.stack([p, 1 - p], axis=1), np.full((len(batch), 4, 4), 0.5, np.float32)


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """Redis db 4, empty before and after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@dataclass
class Rig:
    """An in-process consumer: settings, app, classifier, runner, and the scans in its store."""

    settings: Settings
    runner: BatchRunner
    classifier: ScanClassifier
    sessions: Any
    engine: sa.Engine

    def request(self, scan_id: str, queue: str = "routine", **kwargs: Any) -> SimpleRequest:
        """A request as celery-batches hands it to the task."""
        kwargs = {"attempt": 0, "force": False, **kwargs}
        return SimpleRequest(
            "id-" + scan_id, CLASSIFY_TASK, (scan_id,), kwargs, {"routing_key": queue}, "t", True, None, None, None
        )

    def scan(self, scan_id: str) -> Scan:
        with self.sessions() as session:
            scan = session.get(Scan, scan_id)
            assert scan is not None
            return scan


def _with_lock_timeout(url: str, ms: int) -> str:
    """url with a PostgreSQL lock_timeout added to its connection options."""
    parsed = make_url(url)
    options = parsed.query.get("options", "")
    return parsed.update_query_dict({"options": f"{options} -c lock_timeout={ms}".strip()}).render_as_string(
        hide_password=False
    )


def make_rig(
    db_url: str,
    tmp_path: Path,
    store: Any = None,
    on_call: Callable[[], None] | None = None,
    bundle: StubBundle | None = None,
    **overrides: Any,
) -> Rig:
    """Migrate db_url and build the task's runner around a stub model."""
    migrate(db_url)
    url = _with_lock_timeout(db_url, 300) if db_url.startswith("postgresql") else db_url
    options = {"batch_size": 8, "task_max_retries": 2, "lease_s": 30, **overrides}
    settings = Settings(broker_url=REDIS_URL, database_url=url, **options)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    model = ServedModel(bundle or StubBundle(), StubGradCam(on_call))  # type: ignore[arg-type]
    classifier = ScanClassifier([model], store or LocalStore(tmp_path / "store"), sessions, settings)
    return Rig(settings, BatchRunner(make_app(settings), classifier, settings), classifier, sessions, engine)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Rigs to close after the test."""
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.classifier.close()
        rig.runner.app.close()
        rig.engine.dispose()


def store_and_add_scans(rig: Rig, images: dict[str, bytes], priority: str = "routine") -> list[str]:
    """Put images in the rig's store and record them as queued (without publishing)."""
    for scan_id, data in images.items():
        rig.classifier.store.put(scan_key(scan_id), data)
    with rig.sessions.begin() as session:
        add_scans(session, [NewScan(s, scan_key(s), priority=priority) for s in images], "b")
    return list(images)


def published(client: redis.Redis) -> list[tuple[str, str, dict, str | None]]:
    """(queue, scan id, kwargs, eta) of every classify message waiting in Redis, popped."""
    found = []
    for queue in ("stat", "routine"):
        while (raw := client.rpop(queue)) is not None:
            message = json.loads(raw)
            args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            found.append((queue, args[0], kwargs, message["headers"].get("eta")))
    return found


def black_png() -> bytes:
    import cv2

    return cv2.imencode(".png", np.zeros((64, 64), np.uint8))[1].tobytes()


def refuse_negative_probabilities(rig: Rig) -> None:
    """A real constraint on predictions that a black image's row violates."""
    with rig.engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            connection.execute(
                sa.text(
                    "CREATE TRIGGER p_covid_positive BEFORE INSERT ON predictions WHEN NEW.p_covid < 0 "
                    "BEGIN SELECT RAISE(ABORT, 'p_covid must be >= 0'); END"
                )
            )
        else:
            connection.execute(sa.text("ALTER TABLE predictions ADD CONSTRAINT p_covid_positive CHECK (p_covid >= 0)"))


# --- the rules -------------------------------------------------------------------------------------


def test_error_classification():
    """Outages are transient; constraint violations, bad data, refusals and bugs are not."""
    orig = Exception("boom")
    assert is_transient(sa.exc.OperationalError("SELECT 1", {}, orig))
    assert is_transient(sa.exc.InterfaceError("SELECT 1", {}, orig))
    assert is_transient(sa.exc.DBAPIError("SELECT 1", {}, orig, connection_invalidated=True))
    assert not is_transient(sa.exc.DBAPIError("SELECT 1", {}, orig))
    assert not is_transient(sa.exc.IntegrityError("INSERT", {}, orig))
    assert not is_transient(sa.exc.DataError("INSERT", {}, orig))
    assert not is_transient(sa.exc.ProgrammingError("INSERT", {}, orig))
    assert is_transient(StoreError("S3 PutObject failed: SlowDown"))
    assert not is_transient(StoreError("S3 PutObject failed: AccessDenied", transient=False))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(TypeError("bug")) and not is_transient(ValueError("bug"))


def test_s3_errors_are_classified_by_code_and_status(moto_server):
    """A missing bucket is permanent, an unreachable endpoint transient; 5xx/throttling transient, 4xx permanent."""
    from botocore.exceptions import ClientError

    from shared.store import S3Store, is_transient_s3_error

    with pytest.raises(StoreError) as missing:
        S3Store("no-such-bucket-lungcam", endpoint_url=moto_server).put("a/b.png", b"x")
    assert "NoSuchBucket" in str(missing.value) and missing.value.transient is False
    with pytest.raises(StoreError) as unreachable:
        S3Store("b", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=1).put("a/b.png", b"x")
    assert unreachable.value.transient is True

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient_s3_error(client_error("SlowDown", 503))
    assert is_transient_s3_error(client_error("InternalError", 500))
    assert is_transient_s3_error(client_error("RequestTimeout", 400))
    assert is_transient_s3_error(client_error("Whatever", 502))
    assert not is_transient_s3_error(client_error("AccessDenied", 403))
    assert not is_transient_s3_error(client_error("InvalidArgument", 400))


def test_backoff_is_jittered_under_an_exponential_capped_bound():
    assert [backoff_bound_seconds(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_bound_seconds(50) == MAX_BACKOFF_S
    for attempt in (1, 2, 3, 4, 50):
        delays = [backoff_seconds(attempt) for _ in range(200)]
        assert all(0 <= delay <= backoff_bound_seconds(attempt) for delay in delays), (attempt, max(delays))
    # Full jitter: retries of scans that failed together are spread out, not sent in step.
    assert len({backoff_seconds(8) for _ in range(50)}) > 10


def test_a_constraint_violation_fails_only_its_scan(db_url, tmp_path, broker, rigs):
    """IntegrityError is permanent: that scan fails with the reason, the rest of its batch is done, nothing retried."""
    rig = make_rig(db_url, tmp_path)
    rigs.append(rig)
    refuse_negative_probabilities(rig)
    ids = store_and_add_scans(rig, {**mixed_scans(3, size=64), "black": black_png()})
    assert rig.runner.run([rig.request(s) for s in ids]) == {"done": 3, "failed": 1, "retry": 0}
    black = rig.scan("black")
    assert black.status == Status.FAILED and "IntegrityError" in (black.error or "")
    assert black.lease_expires_at is None and black.worker_id is None
    assert {rig.scan(s).status for s in ids if s != "black"} == {Status.DONE}
    assert published(broker) == []


def test_a_value_the_column_cannot_hold_is_permanent(fresh_postgres, tmp_path, broker, rigs):
    """DataError (a model version longer than its column) fails the scans instead of retrying them as an outage."""
    rig = make_rig(fresh_postgres, tmp_path, bundle=StubBundle(version="v" * 80))
    rigs.append(rig)
    ids = store_and_add_scans(rig, mixed_scans(2, size=64))
    assert rig.runner.run([rig.request(s) for s in ids]) == {"done": 0, "failed": 2, "retry": 0}
    assert all("DataError" in (rig.scan(s).error or "") for s in ids)
    assert published(broker) == []


class FlakyStore(LocalStore):
    """A local store whose overlay writes raise a given exception."""

    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if key.startswith("overlays/"):
            raise self.error
        super().put(key, data, content_type)


@pytest.mark.parametrize(
    "error, transient",
    [
        (TypeError("a bug"), False),
        (StoreError("S3 PutObject failed: AccessDenied", transient=False), False),
        (StoreError("S3 PutObject failed: SlowDown"), True),
    ],
    ids=["TypeError", "AccessDenied", "SlowDown"],
)
def test_overlay_upload_errors(tmp_path, broker, rigs, error, transient):
    """Only a transient store error retries the scan (same queue, force kept, backoff); anything else fails it."""
    rig = make_rig(f"sqlite:///{tmp_path / 'u.sqlite'}", tmp_path, store=FlakyStore(tmp_path / "store", error))
    rigs.append(rig)
    (scan_id,) = store_and_add_scans(rig, mixed_scans(1, size=64), priority="stat")
    result = rig.runner.run([rig.request(scan_id, "stat", force=True)])
    scan = rig.scan(scan_id)
    if transient:
        assert result == {"done": 0, "failed": 0, "retry": 1}
        assert scan.status == Status.QUEUED and scan.lease_expires_at is None and scan.published_at is not None
        ((queue, sent, kwargs, eta),) = published(broker)
        assert (queue, sent, kwargs) == ("stat", scan_id, {"attempt": 1, "force": True}) and eta is not None
    else:
        assert result == {"done": 0, "failed": 1, "retry": 0}
        assert scan.status == Status.FAILED and "overlay upload failed" in (scan.error or "")
        assert str(error).split(": ")[-1] in (scan.error or "")
        assert published(broker) == []


# --- outages -----------------------------------------------------------------------------------------


class TableLock:
    """Locks tables from another connection, as a long migration or a stuck transaction would."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)
        self.connection: sa.Connection | None = None

    def lock(self, tables: str, mode: str = "SHARE") -> None:
        self.connection = self.engine.connect()
        self.connection.execute(sa.text(f"LOCK TABLE {tables} IN {mode} MODE"))

    def release(self) -> None:
        if self.connection is not None:
            self.connection.rollback()
            self.connection.close()
            self.connection = None

    def close(self) -> None:
        self.release()
        self.engine.dispose()


@pytest.fixture
def table_lock(postgres_url) -> Iterator[TableLock]:
    lock = TableLock(postgres_url)
    yield lock
    lock.close()


@pytest.fixture
def fresh_postgres(postgres_url) -> str:
    """The session's PostgreSQL schema, emptied."""
    return empty_schema(postgres_url)


def test_stat_scan_survives_two_failed_database_writes(fresh_postgres, tmp_path, broker, rigs, table_lock):
    """Writes to predictions time out twice (a real lock), then succeed: done, still stat, force kept, no loop."""
    rig = make_rig(fresh_postgres, tmp_path, task_max_retries=5)
    rigs.append(rig)
    app = rig.runner.app
    scan_id = "stat-scan"
    rig.classifier.store.put(scan_key(scan_id), next(iter(mixed_scans(1, size=64).values())))
    submit_scans(rig.sessions, app, [NewScan(scan_id, scan_key(scan_id), priority=Priority.STAT)])
    ((queue, _, kwargs, _),) = published(broker)
    assert queue == "stat"
    request = rig.request(scan_id, queue, **{**kwargs, "force": True})  # as a forced re-submission would carry
    table_lock.lock("predictions")  # SELECT still works, INSERT waits and hits lock_timeout
    history = []
    for attempt in (1, 2):
        assert rig.runner.run([request]) == {"done": 0, "failed": 0, "retry": 1}
        scan = rig.scan(scan_id)
        assert scan.status == Status.QUEUED and scan.priority == "stat"
        ((queue, sent, kwargs, eta),) = published(broker)
        assert (queue, sent, kwargs) == ("stat", scan_id, {"attempt": attempt, "force": True}) and eta
        history.append(eta)
        request = rig.request(sent, queue, **kwargs)
    table_lock.release()
    assert rig.runner.run([request]) == {"done": 1, "failed": 0, "retry": 0}
    scan = rig.scan(scan_id)
    assert (scan.status, scan.priority, scan.attempts) == (Status.DONE, "stat", 3)
    assert scan.lease_expires_at is None and scan.worker_id is None
    assert published(broker) == []  # nothing left circulating
    with rig.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 1
    # Backoff grows: the second retry's ETA is later relative to its publication than the first's.
    assert history[0] < history[1]


def test_database_down_at_the_last_retry_leaves_an_expiring_lease_not_a_loop(
    fresh_postgres, tmp_path, broker, rigs, table_lock
):
    """The database goes away mid-batch at the last retry: nothing is re-published; the lease expires; the reconciler re-queues it at its priority."""
    rig = make_rig(
        fresh_postgres, tmp_path, task_max_retries=2, lease_s=5, on_call=lambda: table_lock.lock("scans, predictions")
    )
    rigs.append(rig)
    (scan_id,) = store_and_add_scans(rig, mixed_scans(1, size=64), priority="stat")
    started = utcnow()
    # Claimed, then every table is locked during the model pass: neither the result nor the failure can be written.
    assert rig.runner.run([rig.request(scan_id, "stat", attempt=2)]) == {"done": 0, "failed": 0, "retry": 1}
    assert published(broker) == []
    table_lock.release()
    scan = rig.scan(scan_id)
    assert scan.status == Status.RUNNING and scan.worker_id == rig.classifier.leases.worker_id
    assert scan.lease_expires_at is not None and scan.lease_expires_at <= started + dt_seconds(rig.settings.lease_s + 2)
    reconciler = Reconciler(rig.runner.app, rig.sessions, rig.settings, owner="test")
    assert not reconciler.run_once()  # lease still valid: nothing to do
    report = reconciler.run_once(now=scan.lease_expires_at + dt_seconds(1))
    assert report.expired == [scan_id]
    ((queue, sent, kwargs, _eta),) = published(broker)
    assert (queue, sent, kwargs["attempt"]) == ("stat", scan_id, 0)
    assert rig.scan(scan_id).status == Status.QUEUED


def test_a_scan_whose_worker_keeps_dying_is_failed_after_max_attempts(tmp_path, broker, rigs):
    """The reconciler does not re-queue a scan for ever: after max_attempts expired leases it fails it."""
    rig = make_rig(f"sqlite:///{tmp_path / 'm.sqlite'}", tmp_path, max_attempts=3, lease_s=5)
    rigs.append(rig)
    (scan_id,) = store_and_add_scans(rig, mixed_scans(1, size=64))
    reconciler = Reconciler(rig.runner.app, rig.sessions, rig.settings, owner="test")
    for attempt in range(1, 4):
        with rig.sessions.begin() as session:
            claim_scans(session, [scan_id], "dead-worker", rig.settings.lease_s)
        report = reconciler.run_once(now=utcnow() + dt_seconds(10))
        published(broker)
        if attempt < 3:
            assert report.expired == [scan_id] and rig.scan(scan_id).status == Status.QUEUED
    assert report.gave_up == [scan_id]
    scan = rig.scan(scan_id)
    assert scan.status == Status.FAILED and "gave up after 3 attempts" in (scan.error or "")


def dt_seconds(seconds: float):
    import datetime as dt

    return dt.timedelta(seconds=seconds)


def test_the_last_retry_fails_the_scan_with_its_reason_and_never_undoes_a_result(tmp_path, broker, rigs):
    """Past task_max_retries a transient error fails the scan ("gave up after"); a scan already done stays done."""
    rig = make_rig(
        f"sqlite:///{tmp_path / 'x.sqlite'}",
        tmp_path,
        store=FlakyStore(tmp_path / "store", StoreError("S3 PutObject failed: SlowDown")),
    )
    rigs.append(rig)
    (scan_id,) = store_and_add_scans(rig, mixed_scans(1, size=64), priority="stat")
    assert rig.runner.run([rig.request(scan_id, "stat", attempt=2)]) == {"done": 0, "failed": 1, "retry": 0}
    scan = rig.scan(scan_id)
    assert scan.status == Status.FAILED and (scan.error or "").startswith(
        "gave up after 2 retries: overlay upload failed"
    )
    assert published(broker) == []
    with rig.sessions.begin() as session:
        mark_scans(session, [scan_id], Status.DONE, finished=True)
        assert fail_unfinished(session, {scan_id: "late"}) == []
    assert rig.scan(scan_id).status == Status.DONE


def test_a_database_error_before_claiming_is_logged_with_its_traceback_but_not_its_parameters(
    tmp_path, broker, rigs, caplog
):
    """The batch's log line carries the traceback (frames and types) and no scan id from the SQL error's message."""
    import logging

    rig = make_rig(f"sqlite:///{tmp_path / 'refusing.sqlite'}", tmp_path)
    rigs.append(rig)
    (scan_id,) = store_and_add_scans(rig, mixed_scans(1, size=64))
    with rig.engine.begin() as connection:
        # A real constraint that refuses the claim: a permanent SQL error, its statement's parameters in its text.
        connection.execute(
            sa.text("CREATE TRIGGER no_claims BEFORE UPDATE ON scans BEGIN SELECT RAISE(ABORT, 'refused'); END")
        )
    with caplog.at_level(logging.ERROR, logger="worker.consumer.tasks"):
        rig.runner.run([rig.request(scan_id)])
    (record,) = [r for r in caplog.records if "failed before any was claimed" in r.getMessage()]
    text = caplog.text
    assert "Traceback (most recent call last)" in record.getMessage() and "IntegrityError" in record.getMessage()
    assert "in process" in record.getMessage()  # the classifier's frame
    assert scan_id not in text and record.exc_info is None


def test_a_traceback_without_messages_keeps_frames_and_types_of_the_whole_chain():
    secret = "-".join(("scan", "secret"))  # not spelled out: the traceback shows these source lines

    def query() -> None:
        try:
            raise ValueError(secret)
        except ValueError as cause:
            raise sa.exc.OperationalError("SELECT 1 WHERE id = ?", (secret,), cause) from cause

    try:
        query()
    except sa.exc.OperationalError as exc:
        text = traceback_without_messages(exc)
    assert secret not in text
    assert text.index("builtins.ValueError") < text.index("sqlalchemy.exc.OperationalError")
    assert text.count("Traceback (most recent call last)") == 2 and "in query" in text
