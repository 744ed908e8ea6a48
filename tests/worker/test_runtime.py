"""worker.runtime: the services every program opens, following a batch to its exit code, and readiness by ping."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import redis_url

from shared.domain import Status
from shared.engine import make_engine, make_session_factory, migrate
from shared.errors import SchemaOutOfDate
from shared.scans import NewScan, add_scans, batch_counts, mark_scans
from shared.settings import Settings
from worker import runtime


class FakeTime:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'runtime.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def _batch(sessions, statuses: dict[str, str]) -> str:
    with sessions.begin() as session:
        add_scans(session, [NewScan(s, f"scans/{s}") for s in statuses], "batch-1")
        for scan_id, status in statuses.items():
            if status != Status.QUEUED:
                mark_scans(session, [scan_id], status, finished=True, error="x" if status == Status.FAILED else None)
    return "batch-1"


def test_follow_says_failed_scans_with_exit_4_and_a_clean_batch_with_0(sessions, capsys):
    batch = _batch(sessions, {"a": Status.DONE, "b": Status.FAILED, "c": Status.SKIPPED})
    assert runtime.follow(sessions, batch, None) == runtime.SOME_FAILED
    captured = capsys.readouterr()
    assert "1 done, 1 failed, 1 skipped of 3" in captured.out and "1 scan(s) failed" in captured.err
    with sessions.begin() as session:
        mark_scans(session, ["b"], Status.DONE, finished=True)
    assert runtime.follow(sessions, batch, None) == runtime.OK
    assert runtime.follow(sessions, "no-such-batch", None) == runtime.NOT_FOUND


def test_follow_times_out_with_exit_3_and_says_what_it_waits_for(sessions, capsys):
    batch = _batch(sessions, {"a": Status.QUEUED, "b": Status.DONE})
    fake = FakeTime()
    code = runtime.follow(sessions, batch, 40.0, clock=fake.clock, sleep=fake.sleep)
    assert code == runtime.TIMEOUT and 40.0 < fake.now <= 42.0
    err = capsys.readouterr().err
    assert "not finished after 40 s" in err
    # Nothing ran for IDLE_NOTICE_S: the bar is interrupted by what the wait is for, at most every IDLE_NOTICE_S.
    assert err.count("waiting for a worker: 1 queued, none running") == 2


def test_wait_for_batch_runs_the_check_before_every_poll(sessions):
    batch = _batch(sessions, {"a": Status.QUEUED})

    class ChildDied(Exception):
        pass

    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise ChildDied

    fake = FakeTime()
    with pytest.raises(ChildDied):
        runtime.wait_for_batch(sessions, batch, None, check=check, clock=fake.clock, sleep=fake.sleep)
    assert fake.now == 2.0


def test_services_refuse_a_schema_that_is_behind(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    with pytest.raises(SchemaOutOfDate, match="lungcam migrate"):
        runtime.open_services(Settings(database_url=url, broker_url=redis_url(15), store_url=str(tmp_path / "s")))


def test_services_open_and_close_on_given_settings(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'ok.sqlite'}"
    migrate(url)
    settings = Settings(database_url=url, broker_url=redis_url(15), store_url=str(tmp_path / "store"))
    with runtime.running_services(settings) as services:
        assert services.celery().conf.broker_url == redis_url(15)
        with services.sessions() as session:
            assert batch_counts(session, "none")["total"] == 0
        # Nobody consumes this broker: a ping gets no answer.
        assert runtime.workers_answering(services.celery(), timeout=0.2) == []
    with runtime.running_services(settings, with_app=False) as services, pytest.raises(RuntimeError):
        services.celery()
