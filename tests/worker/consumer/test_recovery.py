"""Recovery owned by the system: leases, the reconciler, SIGKILLed workers, a Redis that loses everything.

Real `lungcam worker` subprocesses (they import this checkout when PYTHONPATH points at it), real
Redis (db 5 and 6 of the shared server, or a private `redis-server` this module starts), SQLite
and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from alembic import command
from helpers import (
    empty_schema,
    insert_scans_at_old_revision,
    make_tiny_bundle,
    mixed_scans,
    redis_url,
    start_worker,
    wait_until,
)
from sqlalchemy import func, select

from shared.broker_state import RedisBroker
from shared.domain import Priority, Status
from shared.engine import alembic_config, make_engine, make_session_factory, migrate
from shared.models import Batch, Prediction, Scan, utcnow
from shared.queueing import make_app, publish, submit_scans
from shared.scans import NewScan, add_scans, batch_counts, claim_scans, renew_leases
from shared.settings import Settings
from shared.store import LocalStore, scan_key
from worker.consumer.reconciler import Reconciler

pytestmark = pytest.mark.slow

KILL_REDIS_URL = os.environ.get("LUNGCAM_TEST_RECOVERY_REDIS_URL", redis_url(5))
UNIT_REDIS_URL = redis_url(6)
MODEL = "tiny-test"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight bundle: recovery does not depend on the backbone, and its worker starts in half the time."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny", 64)


def _flushed(url: str) -> Iterator[str]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def unit_redis() -> Iterator[str]:
    yield from _flushed(UNIT_REDIS_URL)


@pytest.fixture
def kill_redis() -> Iterator[str]:
    yield from _flushed(KILL_REDIS_URL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server without persistence on a port of its own, to stop and start empty."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 20, 0.1, "the private redis-server to answer")

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: without persistence every queue and unacked message is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    yield server
    server.kill()


def _sessions(url: str):
    engine = make_engine(url)
    migrate(engine)
    return make_session_factory(engine)


def _statuses(sessions) -> dict[str, int]:
    with sessions() as session:
        return dict(session.execute(select(Scan.status, func.count()).group_by(Scan.status)).all())


def _all_done(sessions, total: int) -> bool:
    return _statuses(sessions).get(Status.DONE, 0) == total


def _done(sessions, scans: list[NewScan]) -> bool:
    ids = [scan.scan_id for scan in scans]
    with sessions() as session:
        done = session.scalar(select(func.count()).where(Scan.scan_id.in_(ids), Scan.status == Status.DONE))
    return done == len(ids)


def _rows_per_scan(sessions) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(
            select(Prediction.scan_id, func.count()).where(Prediction.model_name == MODEL).group_by(Prediction.scan_id)
        ).all()
    return dict(rows)


def _env(broker: str, db_url: str, store: Path, bundle: Path, **extra: str) -> dict[str, str]:
    return {
        "LUNGCAM_BROKER_URL": broker,
        "LUNGCAM_DATABASE_URL": db_url,
        "LUNGCAM_STORE_URL": str(store),
        "LUNGCAM_MODELS": str(bundle),
        **extra,
    }


def _stage(store_root: Path, count: int, seed: int) -> list[NewScan]:
    store = LocalStore(store_root)
    scans = []
    for scan_id, data in mixed_scans(count, seed=seed, size=64).items():
        store.put(scan_key(scan_id), data)
        scans.append(NewScan(scan_id, scan_key(scan_id)))
    return scans


def _assert_ours(worker) -> None:
    """The worker runs this checkout (the line only the lease/reconciler code prints)."""
    assert "reconciler every" in worker.log(), "the worker subprocess did not import this checkout (set PYTHONPATH)"


# --- building blocks ---------------------------------------------------------------------------------


def test_migration_0002_round_trip_keeps_results(db_url):
    """Upgrade to 0002 and back to 0001 on SQLite and PostgreSQL; predictions survive both ways."""
    engine = make_engine(db_url)
    try:
        migrate(engine, "0001")
        with engine.begin() as connection:
            insert_scans_at_old_revision(connection, ["s1"])
        migrate(engine)
        assert {"lease_expires_at", "published_at"} <= {c["name"] for c in sa.inspect(engine).get_columns("scans")}
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0001")
        assert "lease_expires_at" not in {c["name"] for c in sa.inspect(engine).get_columns("scans")}
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 1
    finally:
        engine.dispose()


def test_a_live_lease_cannot_be_claimed_twice(db_url):
    """Two workers racing for one scan: the second claim finds the first one's live lease and gets nothing."""
    sessions = _sessions(db_url)
    with sessions.begin() as session:
        add_scans(session, [NewScan("s1", "x")], None)
    with sessions.begin() as session:
        assert claim_scans(session, ["s1"], "worker-a", 30) == ["s1"]
    with sessions.begin() as session:
        assert claim_scans(session, ["s1"], "worker-b", 30) == []
        assert claim_scans(session, ["s1"], "worker-b", 30, take_over=["s1"]) == ["s1"]  # forced
    with sessions.begin() as session:
        assert renew_leases(session, ["s1"], "worker-a", 30) == 0  # taken over: a cannot renew it
        session.execute(sa.update(Scan).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    with sessions.begin() as session:
        assert claim_scans(session, ["s1"], "worker-a", 30) == ["s1"]  # expired: free again
        scan = session.get(Scan, "s1")
        assert (scan.status, scan.worker_id, scan.attempts) == (Status.RUNNING, "worker-a", 3)


def test_broker_snapshot_sees_waiting_and_held_messages_and_restores_to_the_head(unit_redis):
    """Messages in a queue and in kombu's unacked hash are found by scan id; a held one goes back to the head."""
    settings = Settings(broker_url=unit_redis)
    app = make_app(settings)
    try:
        for scan_id in ("a", "b", "c"):
            publish(app, scan_id, "routine")
        publish(app, "s", "stat", attempt=2, force=True, countdown=30)
        broker = RedisBroker(app)
        assert broker.snapshot().waiting == {"a", "b", "c", "s"}
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            held = channel.basic_get("routine", no_ack=False)  # a consumer takes "a" and never acks
            assert held.headers["argsrepr"] == "['a']"
            snapshot = broker.snapshot()
            assert snapshot.waiting == {"b", "c", "s"} and [m.tag for m in snapshot.held["a"]] == [held.delivery_tag]
            now = time.time()
            assert snapshot.is_live("a", now, 60) and not snapshot.is_live("a", now + 61, 60)
            assert broker.restore([held.delivery_tag]) == {held.delivery_tag}
            assert broker.restore([held.delivery_tag]) == set()  # already restored
        after = broker.snapshot()
        assert after.waiting == {"a", "b", "c", "s"} and after.held == {}
        with app.connection_for_read() as connection:
            assert connection.default_channel.basic_get("routine", no_ack=True).headers["argsrepr"] == "['a']"
        assert broker.try_lock("lungcam:test-lock", "me", 5000) and not broker.try_lock(
            "lungcam:test-lock", "you", 5000
        )
    finally:
        app.close()


def test_reconciler_resends_a_lost_message_once_and_leaves_live_ones_alone(tmp_path, unit_redis):
    """A queued scan without a message is re-sent at its priority after requeue_after_s, and not again at once."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    sessions = _sessions(url)
    settings = Settings(broker_url=unit_redis, database_url=url, requeue_after_s=60)
    app = make_app(settings)
    client = redis.Redis.from_url(unit_redis)
    try:
        old = utcnow() - dt.timedelta(seconds=120)
        with sessions.begin() as session:
            add_scans(
                session,
                [
                    NewScan("lost-stat", "x", priority=Priority.STAT, submitted_at=old),
                    NewScan("waiting", "x", submitted_at=old),
                    NewScan("young", "x"),
                ],
                None,
            )
        publish(app, "waiting", "routine")
        reconciler = Reconciler(app, sessions, settings, owner="test")
        report = reconciler.run_once()
        assert report.lost == ["lost-stat"] and report.expired == []
        assert client.llen("stat") == 1 and client.llen("routine") == 1
        client.delete("stat")  # lost again at once: the grace period keeps it from being re-sent every pass
        assert not reconciler.run_once()
        # A minute on, "young" (never published) is due as well; "waiting" still has its message.
        report = reconciler.run_once(now=utcnow() + dt.timedelta(seconds=61))
        assert sorted(report.lost) == ["lost-stat", "young"]
    finally:
        app.close()


def test_an_expired_lease_puts_the_dead_workers_message_back_at_the_head(tmp_path, unit_redis):
    """The dead worker's unacked message is moved to the head of its queue (no duplicate), with its force kept."""
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    sessions = _sessions(url)
    settings = Settings(broker_url=unit_redis, database_url=url, lease_s=5)
    app = make_app(settings)
    try:
        with sessions.begin() as session:
            add_scans(session, [NewScan(s, "x", priority=Priority.STAT) for s in ("held", "next")], None)
        publish(app, "held", "stat", force=True)
        publish(app, "next", "stat")
        # The "dead" worker's connection stays open: closing it cleanly would hand the message back itself.
        dead = app.connection_for_read()
        assert dead.default_channel.basic_get("stat", no_ack=False) is not None  # "held", never acked
        with sessions.begin() as session:
            claim_scans(session, ["held"], "dead-worker", settings.lease_s)
        reconciler = Reconciler(app, sessions, settings, owner="test")
        assert not reconciler.run_once()
        report = reconciler.run_once(now=utcnow() + dt.timedelta(seconds=6))
        assert report.expired == ["held"] and report.restored == 1
        with app.connection_for_read() as connection:
            first = connection.default_channel.basic_get("stat", no_ack=True)
            second = connection.default_channel.basic_get("stat", no_ack=True)
            assert connection.default_channel.basic_get("stat", no_ack=True) is None
        assert first.headers["argsrepr"] == "['held']" and first.headers["redelivered"] is True
        assert first.decode()[1] == {"attempt": 0, "force": True}
        assert second.headers["argsrepr"] == "['next']"
        dead.release()
    finally:
        app.close()


# --- faults with real workers ------------------------------------------------------------------------


def _worker_id(worker) -> str:
    """The host:pid part of the worker's lease holder id (host:pid:random)."""
    return f"{socket.gethostname()}:{worker.process.pid}:"


def _held_by(sessions, worker_prefix: str) -> set[str]:
    with sessions() as session:
        return set(
            session.scalars(
                select(Scan.scan_id).where(Scan.status == Status.RUNNING, Scan.worker_id.startswith(worker_prefix))
            )
        )


class ResumeClock:
    """Per kill: its in-flight scans, and how long after the kill the first finished and all were claimed again."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions
        self.kills: list[dict] = []
        self._polled = 0.0

    def killed(self, in_flight: set[str]) -> None:
        """A kill holding in_flight. Scans of an earlier kill among them were resumed (re-claimed by this
        worker) and are lost again: from now on they count for this kill, not the earlier one."""
        now = time.monotonic()
        for kill in self.kills:
            lost_again = kill["waiting"] & in_flight
            if lost_again and kill["first"] is None:
                kill["waiting"] = kill["waiting"] - lost_again
                if not kill["waiting"]:
                    # Every scan was re-claimed after that kill (so it resumed) and then killed again.
                    kill["first"] = kill["all"] = kill["all"] or now - kill["t"]
        self.kills.append(
            {"in_flight": in_flight, "waiting": set(in_flight), "at": utcnow(), "t": now, "first": None, "all": None}
        )

    def poll(self) -> None:
        """Check the open kills (at most twice a second)."""
        if time.monotonic() - self._polled < 0.5:
            return
        self._polled = time.monotonic()
        for kill in self.kills:
            if kill["first"] is not None and kill["all"] is not None:
                continue
            with self.sessions() as session:
                rows = session.execute(
                    select(Scan.status, Scan.claimed_at, Scan.finished_at).where(Scan.scan_id.in_(kill["waiting"]))
                ).all()
            finished = any(r.status == Status.DONE and r.finished_at and r.finished_at > kill["at"] for r in rows)
            again = all(
                r.status == Status.DONE or (r.claimed_at is not None and r.claimed_at > kill["at"]) for r in rows
            )
            elapsed = time.monotonic() - kill["t"]
            if finished and kill["first"] is None:
                kill["first"] = elapsed
            if again and kill["all"] is None:
                kill["all"] = elapsed

    def summary(self) -> list[tuple[int, float | None, float | None]]:
        return [(len(k["in_flight"]), k["first"], k["all"]) for k in self.kills]


def test_five_sigkills_during_300_scans_lose_nothing_and_resume_quickly(postgres_url, tmp_path, bundle, kill_redis):
    """Default settings: 300 scans, the worker SIGKILLed mid-batch five times and restarted; all done once; each resume < 90 s.

    A worker classifies these 64-pixel scans far faster than it restarts (hundreds a second, ~10 s to
    start), so the batch arrives in parts, one pair per worker: 50 scans it classifies, then 10 (fewer
    than one model batch) that it is killed holding, the moment it has claimed them. The killed parts
    are always fresh scans, never an earlier kill's that the reconciler has just handed back, so five
    kills are five; if a worker re-claimed some of those too, they resumed, and their wait counts for
    the new kill. The sixth worker is not killed: the killed ones' leases expire and the reconcilers
    re-queue their scans with no operator.
    """
    empty_schema(postgres_url)
    sessions = _sessions(postgres_url)
    scans = _stage(tmp_path / "store", 300, seed=3)
    env = _env(kill_redis, postgres_url, tmp_path / "store", bundle)
    app = make_app(Settings(broker_url=kill_redis, database_url=postgres_url))
    started = time.monotonic()
    clock = ResumeClock(sessions)
    worker = start_worker(env, tmp_path / "worker-0.log")
    try:
        worker.wait_ready()
        _assert_ours(worker)
        for kill in range(1, 6):
            part = scans[(kill - 1) * 60 : kill * 60]
            worker.wait_ready()
            submit_scans(sessions, app, part[:50], batch_id="kills", batch_name="kills")
            wait_until(lambda: clock.poll() or _done(sessions, part[:50]), 60, 0.2, "the worker's 50 scans done")
            doomed = {scan.scan_id for scan in part[50:]}
            submit_scans(sessions, app, part[50:], batch_id="kills", batch_name="kills")
            wait_until(lambda: _held_by(sessions, _worker_id(worker)) & doomed, 60, 0.02, "the 10 scans claimed")
            in_flight = _held_by(sessions, _worker_id(worker))
            worker.kill()
            clock.killed(in_flight)
            worker = start_worker(env, tmp_path / f"worker-{kill}.log")
        wait_until(lambda: clock.poll() or _all_done(sessions, 300), 300, 0.5, "all 300 scans done")
        wait_until(lambda: clock.poll() or all(k["first"] is not None for k in clock.kills), 60, 0.5, "resumes")
    finally:
        worker.stop()
        app.close()
    wall = time.monotonic() - started
    print(f"\nwall time {wall:.0f} s; per kill (in flight, first finished s, all re-claimed s): {clock.summary()}")
    assert _rows_per_scan(sessions) == {scan.scan_id: 1 for scan in scans}
    assert _statuses(sessions) == {Status.DONE: 300}
    for in_flight, first, every in clock.summary():
        assert in_flight > 0 and first is not None and every is not None and first < 90 and every < 90, clock.summary()


def test_a_redis_that_loses_everything_mid_run_needs_no_operator(tmp_path, bundle, private_redis):
    """120 scans; the broker is killed mid-run and comes back empty; the reconciler re-sends what was lost."""
    url = f"sqlite:///{tmp_path / 'wipe.sqlite'}"
    sessions = _sessions(url)
    scans = _stage(tmp_path / "store", 120, seed=4)
    private_redis.start()
    # Lost messages are re-sent after 5 s (default 60) by a reconciler passing every 2 s (default 10).
    env = _env(
        private_redis.url,
        url,
        tmp_path / "store",
        bundle,
        LUNGCAM_REQUEUE_AFTER_S="5",
        LUNGCAM_RECONCILE_INTERVAL_S="2",
    )
    app = make_app(Settings(broker_url=private_redis.url, database_url=url))
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        _assert_ours(worker)
        submit_scans(sessions, app, scans, batch_id="wipe")
        wait_until(lambda: _statuses(sessions).get(Status.DONE, 0) >= 16, 120, 0.05, "a first batch done")
        private_redis.kill()
        at_wipe = _statuses(sessions)
        time.sleep(2)
        private_redis.start()  # empty: no queues, no unacked messages, no bindings
        assert at_wipe.get(Status.DONE, 0) < 120, at_wipe
        wait_until(lambda: _all_done(sessions, 120), 240, 1.0, "all 120 scans done after the wipe")
        assert "lost messages re-sent" in worker.log()
    finally:
        worker.stop()
        app.close()
    print(f"at the wipe: {at_wipe}")
    assert _rows_per_scan(sessions) == {scan.scan_id: 1 for scan in scans}


def test_a_scan_submitted_while_the_broker_is_down_is_classified_when_it_is_back(tmp_path, bundle, private_redis):
    """submit_scans fails to publish (the row stays queued); once Redis is up the reconciler sends it."""
    from kombu.exceptions import OperationalError

    url = f"sqlite:///{tmp_path / 'down.sqlite'}"
    sessions = _sessions(url)
    scans = _stage(tmp_path / "store", 3, seed=5)
    scans[0] = dataclasses.replace(scans[0], priority=Priority.STAT)
    app = make_app(Settings(broker_url=private_redis.url, database_url=url))
    try:
        with pytest.raises(OperationalError):
            submit_scans(sessions, app, scans, batch_id="down")
    finally:
        app.close()
    assert _statuses(sessions) == {Status.QUEUED: 3}
    private_redis.start()
    env = _env(
        private_redis.url,
        url,
        tmp_path / "store",
        bundle,
        LUNGCAM_REQUEUE_AFTER_S="5",
        LUNGCAM_RECONCILE_INTERVAL_S="2",
    )
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        _assert_ours(worker)
        wait_until(lambda: _all_done(sessions, 3), 120, 0.5, "the scans submitted during the outage to be done")
    finally:
        worker.stop()
    assert _rows_per_scan(sessions) == {scan.scan_id: 1 for scan in scans}


# --- re-running an interrupted ingest ----------------------------------------------------------------


def test_ingesting_the_same_source_again_resumes_its_batch_and_keeps_stored_images(tmp_path):
    """Same source and name: the same batch id; known scans keep their stored image unless forced."""
    from worker.ops.ingest import batch_id_for, discover, ingest

    broker = redis_url(7)
    redis.Redis.from_url(broker).flushdb()
    url = f"sqlite:///{tmp_path / 'ingest.sqlite'}"
    sessions = _sessions(url)
    settings = Settings(broker_url=broker, database_url=url, store_url=str(tmp_path / "store"))
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "archive"
    folder.mkdir()
    images = mixed_scans(3, seed=6, size=64)
    for name, data in list(images.items())[:2]:
        (folder / name).write_bytes(data)
    app = make_app(settings)
    try:
        batch = batch_id_for(str(folder), "archive")
        assert batch == batch_id_for(f"{folder}/", "archive") != batch_id_for(str(folder), "other")
        first_id, first = ingest(
            discover(str(folder), settings),
            store=store,
            sessions=sessions,
            app=app,
            batch_name="archive",
            batch_id=batch,
        )
        assert first_id == batch and len(first.queued) == 2
        stored = {key: store.get(key) for key in store.list("scans/")}
        # The interrupted ingest is run again, one file changed on disk and one new file added.
        first_file = sorted(folder.iterdir())[0]
        first_file.write_bytes(b"changed on disk")
        (folder / "late").write_bytes(images[list(images)[2]])
        again_id, again = ingest(
            discover(str(folder), settings),
            store=store,
            sessions=sessions,
            app=app,
            batch_name="archive",
            batch_id=batch_id_for(str(folder), "archive"),
        )
        assert again_id == batch and again.queued == ["late"] and len(again.already) == 2
        assert all(store.get(key) == data for key, data in stored.items())
        _id, forced = ingest(
            discover(str(folder), settings),
            store=store,
            sessions=sessions,
            app=app,
            batch_name="archive",
            batch_id=batch,
            force=True,
        )
        assert len(forced.queued) == 3
        assert b"changed on disk" in {store.get(key) for key in store.list("scans/")}
        with sessions() as session:
            assert batch_counts(session, batch)["total"] == 3
            assert session.scalar(select(func.count()).select_from(Batch)) == 1
    finally:
        app.close()
        redis.Redis.from_url(broker).flushdb()
