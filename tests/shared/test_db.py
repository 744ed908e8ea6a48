"""Schema, migrations and data-access helpers on real SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from helpers import insert_scans_at_old_revision
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import Priority, Status
from shared.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    alembic_config,
    head_revision,
    make_engine,
    make_session_factory,
    migrate,
    normalize_url,
)
from shared.models import Base, Batch, Prediction, Scan, utcnow
from shared.scans import NewScan, PredictionRow, add_scans, batch_counts, mark_scans, upsert_predictions

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """A migrated database's engine, disposed afterwards so the schema can be dropped."""
    migrate(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: sa.Engine) -> sessionmaker[Session]:
    """A session factory on the migrated database."""
    return make_session_factory(engine)


def _prediction(scan_id: str, **overrides: Any) -> PredictionRow:
    row = PredictionRow(
        scan_id=scan_id,
        model_name="vgg16",
        model_version="1",
        label="covid",
        p_covid=0.9,
        overlay_key=f"overlays/vgg16/1/{scan_id}.png",
        inference_ms=12.5,
    )
    return dataclasses.replace(row, **overrides)


def test_migrate_creates_tables_matching_models(engine: sa.Engine) -> None:
    inspector = sa.inspect(engine)
    assert {"batches", "scans", "predictions", "alembic_version"} <= set(inspector.get_table_names())
    assert {c["name"] for c in inspector.get_columns("scans")} == {
        "scan_id",
        "source_uri",
        "priority",
        "batch_id",
        "status",
        "error",
        "submitted_at",
        "finished_at",
        "attempts",
        "worker_id",
        "claimed_at",
        "lease_expires_at",
        "published_at",
        "study_uid",
        "series_uid",
        "sop_instance_uid",
    }
    uniques = inspector.get_unique_constraints("predictions")
    assert [sorted(u["column_names"]) for u in uniques] == [["model_name", "model_version", "scan_id"]]
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        # The hand-written migration and the models must describe the same schema.
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    migrate(engine)  # already at head: a no-op, not an error


def test_postgres_tables_live_in_the_test_schema(postgres_url: str) -> None:
    migrate(postgres_url)
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as connection:
            schema = connection.execute(sa.text("SELECT current_schema()")).scalar()
            assert schema is not None and schema.startswith("lungcam_test_")
            tables = connection.execute(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"), {"s": schema}
            ).scalars()
            assert {"batches", "scans", "predictions"} <= set(tables)
    finally:
        engine.dispose()


def test_downgrade_then_upgrade_round_trip(engine: sa.Engine, sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        add_scans(session, [NewScan("s1", "scans/s1")], None)
        session.commit()
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert not {"batches", "scans", "predictions"} & set(sa.inspect(engine).get_table_names())
    migrate(engine)
    assert {"batches", "scans", "predictions"} <= set(sa.inspect(engine).get_table_names())
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Scan)) == 0


def test_add_scans_skips_existing_ids(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        first = add_scans(
            session,
            [
                NewScan("a", "s3://bucket/a.png", priority=Priority.STAT),
                NewScan("b", "scans/b"),
                NewScan("a", "ignored: duplicate in the same call"),
            ],
            "batch-1",
            batch_name="archive 2020",
        )
        session.commit()
        assert first == ["a", "b"]
    with sessions() as session:
        second = add_scans(session, [NewScan("b", "other"), NewScan("c", "scans/c")], "batch-1")
        session.commit()
        assert second == ["c"]
    with sessions() as session:
        scans = {s.scan_id: s for s in session.scalars(sa.select(Scan))}
        assert sorted(scans) == ["a", "b", "c"]
        assert scans["a"].source_uri == "s3://bucket/a.png" and scans["a"].priority == "stat"
        assert scans["b"].source_uri == "scans/b" and scans["b"].priority == "routine"
        assert all(s.status == "queued" and s.attempts == 0 and s.batch_id == "batch-1" for s in scans.values())
        assert scans["a"].submitted_at.tzinfo is not None
        assert scans["a"].submitted_at.utcoffset() == dt.timedelta(0)
        batch = session.get(Batch, "batch-1")
        assert batch is not None and batch.name == "archive 2020"
    with sessions() as session:
        with pytest.raises(ValueError):
            add_scans(session, [NewScan("d", "x", priority="urgent")], None)
        with pytest.raises(ValueError):
            add_scans(session, [NewScan("x" * 129, "x")], None)


def test_add_scans_many_in_one_call(sessions: sessionmaker[Session]) -> None:
    scans = [NewScan(f"scan-{i:05d}", f"scans/{i}") for i in range(1200)]
    with sessions() as session:
        assert len(add_scans(session, scans, "big")) == 1200
        assert add_scans(session, scans, "big") == []
        session.commit()
        assert batch_counts(session, "big")["queued"] == 1200


def test_upsert_twice_leaves_one_row_with_newer_values(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        add_scans(session, [NewScan("s1", "scans/s1")], None)
        upsert_predictions(session, [_prediction("s1")])
        session.commit()
    # The same scan delivered again: a second worker run writes new values in its own transaction.
    with sessions() as session:
        upsert_predictions(session, [_prediction("s1", label="normal", p_covid=0.2, inference_ms=8.0)])
        session.commit()
    with sessions() as session:
        rows = session.scalars(sa.select(Prediction)).all()
        assert len(rows) == 1
        assert (rows[0].label, rows[0].p_covid, rows[0].inference_ms) == ("normal", pytest.approx(0.2), 8.0)
        assert rows[0].created_at.utcoffset() == dt.timedelta(0)


def test_upsert_keeps_one_row_per_model_and_handles_duplicates_in_a_call(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        add_scans(session, [NewScan("s1", "x"), NewScan("s2", "y")], None)
        upsert_predictions(
            session,
            [
                _prediction("s1"),
                _prediction("s1", model_name="densenet121"),
                _prediction("s1", model_version="2"),
                _prediction("s2"),
                _prediction("s2", p_covid=0.3),  # same key twice in one call: last wins
            ],
        )
        session.commit()
        keys = session.execute(sa.select(Prediction.scan_id, Prediction.model_name, Prediction.model_version)).all()
        assert sorted(keys) == [
            ("s1", "densenet121", "1"),
            ("s1", "vgg16", "1"),
            ("s1", "vgg16", "2"),
            ("s2", "vgg16", "1"),
        ]
        assert session.scalar(sa.select(Prediction.p_covid).where(Prediction.scan_id == "s2")) == pytest.approx(0.3)
        scan = session.get(Scan, "s1")
        assert scan is not None and [p.model_name for p in scan.predictions] == ["densenet121", "vgg16", "vgg16"]


def test_prediction_for_unknown_scan_violates_foreign_key(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(IntegrityError):
        upsert_predictions(session, [_prediction("no-such-scan")])
        session.flush()


def test_mark_scans(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        add_scans(session, [NewScan(i, i) for i in ("a", "b", "c")], None)
        mark_scans(session, ["a", "b"], "running")
        loaded = session.get(Scan, "a")
        mark_scans(session, ["a"], "running")  # a redelivery counts as another attempt
        assert loaded is not None and loaded.attempts == 2
        mark_scans(session, ["b"], "failed", error="could not decode image", finished=True)
        session.commit()
        scans = {s.scan_id: s for s in session.scalars(sa.select(Scan))}
        assert [(scans[i].status, scans[i].attempts) for i in "abc"] == [("running", 2), ("failed", 1), ("queued", 0)]
        assert scans["b"].error == "could not decode image"
        finished = scans["b"].finished_at
        assert finished is not None and finished.utcoffset() == dt.timedelta(0)
        assert abs(utcnow() - finished) < dt.timedelta(minutes=1)
        assert scans["a"].finished_at is None
    with sessions() as session:
        scan = session.get(Scan, "b")  # loaded before the update: must not go stale
        mark_scans(session, ["b"], "done", finished=True)  # a retry that succeeded clears the error
        session.commit()
        assert scan is not None and (scan.status, scan.error) == ("done", None)
        with pytest.raises(ValueError):
            mark_scans(session, ["a"], "lost")


def test_status_check_constraint(engine: sa.Engine) -> None:
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO scans (scan_id, source_uri, status) VALUES ('z', 'z', 'bogus')"))


def test_every_engine_hides_bound_values_from_errors(engine: sa.Engine) -> None:
    """SQLAlchemy leaves bound values (scan ids, which may name a patient) out of its error messages."""
    assert make_engine("sqlite://").hide_parameters and engine.hide_parameters
    with pytest.raises(IntegrityError) as caught, engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO scans (scan_id, source_uri, status) VALUES (:scan_id, 'x', 'bogus')"),
            {"scan_id": "jane-doe-1970-01-01"},
        )
    # Only SQLAlchemy's own part: PostgreSQL's DETAIL ("Failing row contains ...") still carries the row.
    message = str(caught.value)
    assert "[parameters:" not in message and "SQL parameters hidden" in message


def test_status_and_priority_are_plain_strings_in_the_database(sessions: sessionmaker[Session]) -> None:
    """Status and Priority members are stored, compared and serialised as their values."""
    with sessions.begin() as session:
        add_scans(session, [NewScan("p", "x", priority=Priority.STAT)], None)
        mark_scans(session, ["p"], Status.DONE, finished=True)
    with sessions() as session:
        row = session.execute(sa.text("SELECT status, priority FROM scans WHERE scan_id = 'p'")).one()
        assert tuple(row) == ("done", "stat") and row.status == Status.DONE and row.priority == Priority.STAT
        assert session.scalar(sa.select(sa.func.count()).where(Scan.status == Status.DONE)) == 1
    assert json.dumps([Status.DONE, Priority.STAT]) == '["done", "stat"]' and f"{Status.SKIPPED}" == "skipped"


def test_batch_counts(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        add_scans(session, [NewScan(f"b1-{i}", "x") for i in range(6)], "b1")
        add_scans(session, [NewScan("b2-0", "x")], "b2")
        mark_scans(session, ["b1-0", "b1-1"], "done", finished=True)
        mark_scans(session, ["b1-2"], "failed", error="boom", finished=True)
        mark_scans(session, ["b1-3"], "running")
        session.commit()
        assert batch_counts(session, "b1") == {
            "queued": 2,
            "running": 1,
            "done": 2,
            "failed": 1,
            "skipped": 0,
            "total": 6,
        }
        assert batch_counts(session, "b2") == {
            "queued": 1,
            "running": 0,
            "done": 0,
            "failed": 0,
            "skipped": 0,
            "total": 1,
        }
        assert batch_counts(session, "nope")["total"] == 0


def test_naive_datetimes_are_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(sa.exc.StatementError):
        add_scans(session, [NewScan("n", "x", submitted_at=dt.datetime(2024, 1, 1))], None)


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    try:
        with engine.connect() as connection:
            pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("busy_timeout") == SQLITE_BUSY_TIMEOUT_MS
            assert pragma("foreign_keys") == 1
    finally:
        engine.dispose()


def test_sqlite_concurrent_writers(tmp_path: Path) -> None:
    """Several writers (threads with their own engines, as worker processes would) never hit 'database is locked'."""
    url = f"sqlite:///{tmp_path / 'busy.sqlite'}"
    migrate(url)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        engine = make_engine(url)
        try:
            sessions = make_session_factory(engine)
            for round_ in range(10):
                ids = [f"w{n}-{round_}-{i}" for i in range(5)]
                with sessions() as session:
                    add_scans(session, [NewScan(i, i) for i in ids], "shared")
                    mark_scans(session, ids, "running")
                    upsert_predictions(session, [_prediction(i) for i in ids])
                    mark_scans(session, ids, "done", finished=True)
                    session.commit()
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            assert batch_counts(session, "shared") == {
                "queued": 0,
                "running": 0,
                "done": 200,
                "failed": 0,
                "skipped": 0,
                "total": 200,
            }
    finally:
        engine.dispose()


def test_normalize_url_picks_psycopg() -> None:
    assert normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_alembic_command_line_from_repo_root(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "-x", f"url={url}", "upgrade", "head"],
        cwd=tmp_path,  # not the repo root: script_location must not depend on the working folder
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert {"batches", "scans", "predictions"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migration_0004_adds_skipped_and_keeps_every_result(db_url: str) -> None:
    """0003 -> 0004 rebuilds scans on SQLite: predictions survive, 'skipped' is allowed, others still refused."""
    from alembic import command

    engine = make_engine(db_url)
    try:
        migrate(engine, "0003")
        with engine.begin() as connection:
            insert_scans_at_old_revision(connection, ["s1", "s2"])
        migrate(engine)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE scans SET status = 'skipped', error = 'lateral view (LL)' WHERE scan_id = 's2'")
            )
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
            connection.execute(sa.text("UPDATE scans SET status = 'bogus' WHERE scan_id = 's1'"))
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 1
            indexes = {index["name"] for index in sa.inspect(connection).get_indexes("scans")}
        assert {"ix_scans_batch_id_status", "ix_scans_status"} <= indexes
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0003")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 1
            status, error = connection.execute(sa.text("SELECT status, error FROM scans WHERE scan_id = 's2'")).one()
        assert (status, error) == ("failed", "skipped: lateral view (LL)")
    finally:
        engine.dispose()


def test_migration_0005_adds_cam_note_and_keeps_every_result(db_url: str) -> None:
    """0004 -> 0005 adds predictions.cam_note (NULL for old rows) and back, keeping the predictions."""
    from alembic import command

    engine = make_engine(db_url)
    try:
        migrate(engine, "0004")
        with engine.begin() as connection:
            insert_scans_at_old_revision(connection, ["s1"])
        migrate(engine)
        with engine.begin() as connection:
            assert connection.execute(sa.text("SELECT cam_note FROM predictions")).scalar_one() is None
            connection.execute(sa.text("UPDATE predictions SET cam_note = 'flat map: no region stands out'"))
            command.downgrade(alembic_config(connection), "0004")
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 1
            assert "cam_note" not in {column["name"] for column in sa.inspect(connection).get_columns("predictions")}
    finally:
        engine.dispose()
