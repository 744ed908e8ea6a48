"""PACS integration: DICOMweb pull, the C-STORE listener, results back as SR + Secondary Capture, in a real Orthanc.

The end-to-end tests (marked slow) run a real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`), real
Redis (db 1 and 2), a real `lungcam worker` subprocess with a tiny model, `lungcam dicom-listen`,
`lungcam ingest dicomweb+...` and `lungcam dicom-send` as subprocesses, and dcmtk's `storescu`.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import subprocess
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from helpers import LUNGCAM, REPO, make_tiny_bundle, redis_url, start_worker, wait_until
from helpers.pacs import (
    PHI_ID,
    PHI_NAME,
    ListenerProcess,
    TcpProxy,
    free_port,
    make_study_dicoms,
    orthanc_available,
    run_orthanc,
    sop_uid_of,
    study_uid_of,
    subprocess_env,
)

from shared.domain import Status
from shared.engine import alembic_config, current_revision, make_engine, make_session_factory, migrate
from shared.models import SEND_FAILED, SEND_RETRY, SEND_SENT, Prediction, ResultSend, Scan, utcnow
from shared.scans import NewScan, PredictionRow, add_scans, mark_scans, upsert_predictions

REDIS_MAIN = redis_url(1)
REDIS_DB_DOWN = redis_url(2)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
P_COVID_CODE = "P-COVID"

needs_orthanc = pytest.mark.skipif(
    not orthanc_available(),
    reason="Orthanc with the DICOMweb plugin is not installed (`python3 run.py test` installs it as root)",
)
needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None,
    reason="dcmtk's storescu is not installed (`python3 run.py test` installs it as root)",
)


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def _queue_lengths(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {name: int(client.llen(name)) for name in ("stat", "routine")}
    finally:
        client.close()


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([LUNGCAM, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return result


def _storescu(
    port: int, files: list[Path], *, called: str = "LUNGCAM", calling: str = "TESTSCU"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aec", called, "-aet", calling, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _c_store(port: int, data: bytes, *, called: str = "LUNGCAM") -> int:
    """C-STORE one instance with pynetdicom; the response status (or -1 without a response)."""
    from pynetdicom import AE

    dataset = pydicom.dcmread(BytesIO(data))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def _sr_facts(data_or_dataset) -> tuple[float, str]:
    """(P(COVID-19), referenced source SOP Instance UID) read back from an SR."""
    import highdicom as hd

    dataset = (
        data_or_dataset if isinstance(data_or_dataset, pydicom.Dataset) else pydicom.dcmread(BytesIO(data_or_dataset))
    )
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    sr = hd.sr.srread(BytesIO(buffer.getvalue()))  # highdicom parses it as a Comprehensive SR
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    values, references = [], []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == P_COVID_CODE:
                values.append(float(item.MeasuredValueSequence[0].NumericValue))
            if item.ValueType == "IMAGE":
                references.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(dataset.ContentSequence)
    assert len(values) == 1 and len(set(references)) == 1, (values, references)
    return values[0], references[0]


# --- fast tier: schema, UIDs, objects -------------------------------------------------------------


def test_migration_0003_upgrades_and_downgrades_with_data(db_url: str) -> None:
    from alembic import command

    migrate(db_url, "0001")
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO scans (scan_id, source_uri) VALUES ('old', 'scans/old')"))
        migrate(engine, "0003")
        assert current_revision(engine) == "0003"
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            add_scans(
                session,
                [NewScan("1.2.3", "scans/1.2.3", study_uid="1.2", series_uid="1.2.9", sop_instance_uid="1.2.3")],
                None,
            )
            # Plain SQL: the ORM helpers write today's columns, and this schema is at 0003.
            session.execute(
                sa.text(
                    "INSERT INTO predictions (scan_id, model_name, model_version, label, p_covid) "
                    "VALUES ('1.2.3', 'm', '1', 'covid', 0.7)"
                )
            )
            session.add(
                ResultSend(
                    scan_id="1.2.3", model_name="m", model_version="1", destination="dicom://A@h:1", state="sent"
                )
            )
        with sessions() as session:
            scan = session.get(Scan, "1.2.3")
            assert (scan.study_uid, scan.series_uid, scan.sop_instance_uid) == ("1.2", "1.2.9", "1.2.3")
            assert session.get(Scan, "old").sop_instance_uid is None
        with pytest.raises(sa.exc.IntegrityError), sessions.begin() as session:
            session.add(ResultSend(scan_id="1.2.3", model_name="m", model_version="1", destination="dicom://A@h:1"))
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0001")
        inspector = sa.inspect(engine)
        assert "result_sends" not in inspector.get_table_names()
        assert "sop_instance_uid" not in {c["name"] for c in inspector.get_columns("scans")}
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM scans")).scalar() == 2
        migrate(engine)
        assert "result_sends" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_results_are_an_sr_and_a_secondary_capture_with_derived_uids() -> None:
    from worker.pacs.objects import build_results, read_source, to_bytes

    (data,) = make_study_dicoms(1, seed=3, size=64)
    source = read_source(data)
    overlay = np.full((64, 64, 3), 128, np.uint8)
    prefix = "1.2.826.0.1.3680043.8.498."
    first = build_results(
        source, overlay, model="resnet50-test", version="t1", label="covid", p_covid=0.61234567891, uid_prefix=prefix
    )
    again = build_results(
        source, overlay, model="resnet50-test", version="t1", label="covid", p_covid=0.5, uid_prefix=prefix
    )
    other = build_results(
        source, overlay, model="resnet50-test", version="t2", label="covid", p_covid=0.5, uid_prefix=prefix
    )
    assert (first.sr_uid, first.sc_uid) == (again.sr_uid, again.sc_uid)  # a re-send replaces
    assert len({first.sr_uid, first.sc_uid, other.sr_uid, other.sc_uid, str(source.SOPInstanceUID)}) == 5
    for dataset, sop_class in ((first.sr, SR_CLASS), (first.sc, SC_CLASS)):
        reread = pydicom.dcmread(BytesIO(to_bytes(dataset)))
        assert reread.SOPClassUID == sop_class
        assert reread.StudyInstanceUID == source.StudyInstanceUID
        assert (str(reread.PatientName), reread.PatientID) == (str(source.PatientName), source.PatientID)
        assert reread.SeriesInstanceUID != source.SeriesInstanceUID
    p_covid, reference = _sr_facts(to_bytes(first.sr))
    assert abs(p_covid - 0.61234567891) < 1e-6 and reference == source.SOPInstanceUID
    # The algorithm's name and version, and the finding, are in the report.
    text = str(pydicom.dcmread(BytesIO(to_bytes(first.sr))))
    assert "resnet50-test" in text and "t1" in text and "840539006" in text
    assert pydicom.dcmread(BytesIO(to_bytes(first.sc))).pixel_array.shape == (64, 64, 3)


def test_sender_retries_with_backoff_then_gives_up_and_sends_only_done_dicom_scans(tmp_path: Path) -> None:
    """A destination that refuses connections: retry with a growing delay, `failed` after the last attempt."""
    import cv2

    from shared.settings import Settings
    from shared.store import LocalStore, overlay_key, scan_key
    from worker.pacs.sender import Sender, backoff_bound_s, backoff_s, transport_for

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    store = LocalStore(tmp_path / "store")
    closed_port = free_port()
    settings = Settings(
        database_url=url,
        store_url=str(tmp_path / "store"),
        dicom_destination=f"dicom://ORTHANC@127.0.0.1:{closed_port}",
        dicom_send_max_attempts=2,
        dicom_send_backoff_s=60,
    )
    files = make_study_dicoms(4, seed=61, size=64)
    sops = [sop_uid_of(d) for d in files]
    png = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes()
    try:
        with sessions.begin() as session:
            scans = []
            for index, (data, sop) in enumerate(zip(files, sops)):
                store.put(scan_key(sop), data)
                scans.append(
                    NewScan(
                        sop,
                        scan_key(sop),
                        study_uid=study_uid_of(data),
                        series_uid="1.2.3",
                        sop_instance_uid=sop if index != 3 else None,
                    )
                )  # the fourth: a PNG-like scan, no DICOM context
            add_scans(session, scans, None)
            for sop in sops:
                store.put(overlay_key("m", "1", sop), png)
            upsert_predictions(
                session,
                [
                    PredictionRow(
                        scan_id=sop,
                        model_name="m",
                        model_version="1",
                        label="covid",
                        p_covid=0.9,
                        overlay_key=overlay_key("m", "1", sop),
                    )
                    for sop in sops
                ],
            )
            mark_scans(session, [sops[0], sops[3]], Status.DONE, finished=True)
            mark_scans(session, [sops[1]], Status.FAILED, error="x", finished=True)  # failed: sends nothing
        transport = transport_for(settings)
        assert transport.label == f"dicom://ORTHANC@127.0.0.1:{closed_port}"
        # The sender's clock is driven here: a minute of backoff passes without a minute of waiting.
        now = [utcnow()]
        sender = Sender(settings, sessions, store, transport, clock=lambda: now[0])
        counts = sender.run_once()
        assert (counts.sent, counts.retry, counts.failed) == (0, 1, 0)
        (row,) = _rows(sessions)
        assert row.scan_id == sops[0] and row.state == SEND_RETRY and row.attempts == 1 and row.last_error
        retry_at = _aware(row.next_attempt_at)
        assert PHI_NAME not in row.last_error
        assert now[0] <= retry_at <= now[0] + dt.timedelta(seconds=backoff_bound_s(settings, 1))
        if retry_at > now[0]:
            now[0] = retry_at - dt.timedelta(milliseconds=1)
            assert sender.run_once().handled == 0  # not due before its backoff
        now[0] = retry_at
        counts = sender.run_once()
        assert (counts.retry, counts.failed) == (0, 1)
        (row,) = _rows(sessions)
        assert row.state == SEND_FAILED and row.attempts == 2 and row.next_attempt_at is None
        assert sender.run_once().handled == 0  # given up
        assert backoff_bound_s(settings, 3) == 240 and backoff_bound_s(settings, 20) == 3600
        assert all(0 <= backoff_s(settings, 3) <= 240 for _ in range(100))
    finally:
        engine.dispose()


def _aware(moment: dt.datetime) -> dt.datetime:
    """A stored time as timezone-aware UTC (SQLite returns it naive)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _rows(sessions) -> list[ResultSend]:
    with sessions() as session:
        return list(session.scalars(sa.select(ResultSend)))


def test_dicomweb_sources_filters_credentials_and_destinations() -> None:
    from shared.errors import SettingsError, SubmissionError
    from shared.settings import Settings
    from worker.pacs.dicomweb import base_url, client_for, is_dicomweb, parse_filters
    from worker.pacs.sender import CStoreTransport, StowTransport, transport_for

    assert (
        is_dicomweb("dicomweb+https://pacs/dicom-web")
        and not is_dicomweb("dicomweb+ftp://x")
        and not is_dicomweb("/data")
    )
    assert base_url("dicomweb+http://h:8042/dicom-web/") == "http://h:8042/dicom-web"
    assert parse_filters(["Modality=DX", "StudyDate=20200101-20201231", "PatientID="]) == {
        "Modality": "DX",
        "StudyDate": "20200101-20201231",
        "PatientID": "",
    }
    with pytest.raises(SubmissionError):
        parse_filters(["Modality"])
    basic = client_for("dicomweb+https://h/dw", Settings(dicomweb_username="u", dicomweb_password="p"))
    assert basic._session.auth == ("u", "p")
    bearer = client_for("dicomweb+https://h/dw", Settings(dicomweb_token="t0k", dicomweb_username="u"))
    assert bearer._session.headers["Authorization"] == "Bearer t0k" and bearer._session.auth is None
    stow = transport_for(Settings(dicom_destination="dicomweb+https://h:8443/dicom-web", dicomweb_password="secret"))
    assert isinstance(stow, StowTransport) and stow.label == "dicomweb+https://h:8443/dicom-web"
    cstore = transport_for(Settings(dicom_destination="dicom://PACS@10.0.0.5:104", dicom_calling_ae_title="LC"))
    assert isinstance(cstore, CStoreTransport) and (cstore.called_ae, cstore.host, cstore.port, cstore.calling_ae) == (
        "PACS",
        "10.0.0.5",
        104,
        "LC",
    )
    for bad in ("", "http://h/dicom-web", "dicom://10.0.0.5:104"):
        with pytest.raises(SettingsError):
            transport_for(Settings(dicom_destination=bad))


def test_receiver_answers_out_of_resources_when_the_store_or_broker_is_down(tmp_path: Path) -> None:
    """Real SQLite, a store that cannot be written, a broker port nobody listens on, then real Redis (db 3)."""
    from shared.queueing import make_app
    from shared.settings import Settings
    from shared.store import LocalStore
    from worker.pacs.listener import OUT_OF_RESOURCES, SUCCESS, Receiver

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    (tmp_path / "not-a-folder").write_text("a file where the store folder should be")
    (data,) = make_study_dicoms(1, seed=71, size=64)
    sop = sop_uid_of(data)
    ids = {"sop_uid": sop, "study_uid": study_uid_of(data), "series_uid": "1.2.3"}
    settings = Settings(database_url=url, dicom_stat_ae_titles="URGENT,ER_CR")
    broken_store = LocalStore(tmp_path / "not-a-folder" / "store")
    broker_url = redis_url(3)
    _flush_redis(broker_url)
    apps = [
        make_app(settings, broker_url=f"redis://127.0.0.1:{free_port()}/0"),
        make_app(settings, broker_url=broker_url),
    ]
    try:
        receiver = Receiver(settings, sessions, broken_store, apps[1])
        assert receiver.priority_for("ER_CR", "LUNGCAM") == "stat" and receiver.priority_for("X", "URGENT ") == "stat"
        assert receiver.priority_for("X", "LUNGCAM") == "routine"
        assert receiver.receive(data, priority="routine", **ids) == OUT_OF_RESOURCES
        with sessions() as session:
            assert session.get(Scan, sop) is None
        store = LocalStore(tmp_path / "store")
        # Broker down: the row is committed (queued) but the answer is a failure, so the sender retries...
        assert Receiver(settings, sessions, store, apps[0]).receive(data, priority="stat", **ids) == OUT_OF_RESOURCES
        assert _queue_lengths(broker_url) == {"stat": 0, "routine": 0}
        # ...and the retry, with the broker back, publishes it once.
        assert Receiver(settings, sessions, store, apps[1]).receive(data, priority="stat", **ids) == SUCCESS
        assert _queue_lengths(broker_url) == {"stat": 1, "routine": 0}
        with sessions() as session:
            scan = session.get(Scan, sop)
            assert (scan.status, scan.priority, scan.sop_instance_uid, scan.batch_id[:6]) == (
                "queued",
                "stat",
                sop,
                "dicom-",
            )
    finally:
        for app in apps:
            app.close()
        engine.dispose()
        _flush_redis(broker_url)


# --- end to end: Orthanc, Redis, a worker, the listener and the sender -----------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    if not orthanc_available():
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (`python3 run.py test` installs it as root)")
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


class Stack:
    """Settings shared by every lungcam process of the module, a worker that starts on demand, and the listener."""

    def __init__(self, root: Path, orthanc):
        self.root = root
        self.db_url = f"sqlite:///{root / 'lungcam.sqlite'}"
        self.listen_port = free_port()
        bundle = make_tiny_bundle(root / "bundle", 64)
        self.env = subprocess_env(
            broker_url=REDIS_MAIN,
            database_url=self.db_url,
            store_url=str(root / "store"),
            models=str(bundle),
            batch_size=8,
            batch_flush_ms=300,
            pipeline_depth=1,
            data_dir=str(root / "data"),
            dicom_port=self.listen_port,
            dicom_destination=f"dicomweb+{orthanc.dicomweb_url}",
            dicom_send_backoff_s=1,
        )
        _flush_redis(REDIS_MAIN)
        migrate(self.db_url)
        self.engine = make_engine(self.db_url)
        self.sessions = make_session_factory(self.engine)
        self.worker = None
        self.listener = ListenerProcess(self.env, self.listen_port, root / "listener.log")

    def start_worker(self) -> None:
        if self.worker is None or self.worker.process.poll() is not None:
            self.worker = start_worker(self.env, self.root / f"worker-{time.monotonic_ns()}.log")
            self.worker.wait_ready(240)

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def scans(self, ids: list[str]) -> dict[str, Scan]:
        with self.sessions() as session:
            return {s.scan_id: s for s in session.scalars(sa.select(Scan).where(Scan.scan_id.in_(ids)))}

    def wait_finished(self, ids: list[str], timeout: float = 240) -> dict[str, Scan]:
        wait_until(
            lambda: len(ids) == sum(s.status in (Status.DONE, Status.FAILED) for s in self.scans(ids).values()),
            timeout,
            message=f"{len(ids)} scans finished",
        )
        return self.scans(ids)

    def predictions(self, ids: list[str]) -> dict[str, Prediction]:
        with self.sessions() as session:
            rows = session.scalars(sa.select(Prediction).where(Prediction.scan_id.in_(ids)))
            return {p.scan_id: p for p in rows}

    def sends(self, ids: list[str]) -> list[ResultSend]:
        with self.sessions() as session:
            return list(session.scalars(sa.select(ResultSend).where(ResultSend.scan_id.in_(ids))))

    def close(self) -> None:
        self.listener.stop()
        self.stop_worker()
        self.engine.dispose()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, orthanc):
    stack = Stack(tmp_path_factory.mktemp("pacs"), orthanc)
    try:
        yield stack
    finally:
        stack.close()


def _write_files(folder: Path, files: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, data in enumerate(files):
        path = folder / f"img{index:03d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _assert_results_in_orthanc(orthanc, stack: Stack, files: list[bytes]) -> None:
    """Each image's study holds exactly one SR and one SC per image (one model), the SR carrying SQL's probability."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(orthanc.dicomweb_url)
    sops = [sop_uid_of(data) for data in files]
    predictions = stack.predictions(sops)
    assert set(predictions) == set(sops)
    by_study: dict[str, list[str]] = {}
    for data in files:
        by_study.setdefault(study_uid_of(data), []).append(sop_uid_of(data))
    for study_uid, study_sops in by_study.items():
        records = orthanc.study_instances(study_uid)
        classes = [r["00080016"]["Value"][0] for r in records]
        assert classes.count(SR_CLASS) == len(study_sops), classes
        assert classes.count(SC_CLASS) == len(study_sops), classes
        srs = [r for r in records if r["00080016"]["Value"][0] == SR_CLASS]
        seen = set()
        for record in srs:
            dataset = client.retrieve_instance(
                study_uid, record["0020000E"]["Value"][0], record["00080018"]["Value"][0]
            )
            assert dataset.StudyInstanceUID == study_uid and str(dataset.PatientName) == PHI_NAME
            p_covid, reference = _sr_facts(dataset)
            assert reference in study_sops
            assert abs(p_covid - predictions[reference].p_covid) <= 1e-6
            seen.add(reference)
        assert seen == set(study_sops)


def _send_once(stack: Stack) -> str:
    result = _run(["dicom-send", "--once"], stack.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert PHI_NAME not in result.stderr and PHI_ID not in result.stderr
    return result.stdout


@pytest.mark.slow
@needs_dcmtk
def test_a_stat_call_is_classified_before_a_routine_backlog(stack: Stack, tmp_path: Path) -> None:
    stack.stop_worker()  # the backlog waits in Redis until the worker starts
    routine = _write_files(tmp_path / "routine", make_study_dicoms(50, seed=11, size=64, per_study=10))
    (stat_file,) = _write_files(tmp_path / "stat", make_study_dicoms(1, seed=12, size=64))
    result = _storescu(stack.listen_port, routine)
    assert result.returncode == 0, result.stderr
    result = _storescu(stack.listen_port, [stat_file], called="LUNGCAM_STAT")
    assert result.returncode == 0, result.stderr
    routine_ids = [sop_uid_of(p.read_bytes()) for p in routine]
    stat_id = sop_uid_of(stat_file.read_bytes())
    scans = stack.scans([*routine_ids, stat_id])
    assert len(scans) == 51 and scans[stat_id].priority == "stat"
    assert {scans[i].priority for i in routine_ids} == {"routine"}
    stack.start_worker()
    scans = stack.wait_finished([*routine_ids, stat_id])
    assert {s.status for s in scans.values()} == {Status.DONE}
    # The stat scan rides in the first batch the worker takes (one batch in flight: pipeline depth 1),
    # so no routine scan finishes before it; first in, first out would have finished all 50 first.
    earlier = sum(scans[i].finished_at < scans[stat_id].finished_at for i in routine_ids)
    assert earlier == 0, f"{earlier} routine scans finished before the stat one"


@pytest.mark.slow
def test_pull_by_dicomweb_classify_and_send_results_back(stack: Stack, orthanc) -> None:
    files = make_study_dicoms(10, seed=21, size=96, per_study=2)
    # An older CT study in the archive: outside the filters, never pulled.
    ct = make_study_dicoms(2, seed=22, size=64, modality="CT", study_date="20190101")
    for data in files + ct:
        orthanc.upload(data)
    stack.start_worker()
    source = f"dicomweb+{orthanc.dicomweb_url}"
    args = [
        "ingest",
        source,
        "--filter",
        "Modality=DX",
        "--filter",
        "StudyDate=20200101-20201231",
        "--name",
        "archive-2020",
    ]
    result = _run([*args, "--wait", "--timeout", "240"], stack.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 queued, 0 already known" in result.stdout
    sops = [sop_uid_of(d) for d in files]
    scans = stack.wait_finished(sops)
    assert {s.status for s in scans.values()} == {Status.DONE}
    assert {s.study_uid for s in scans.values()} == {study_uid_of(d) for d in files}
    assert not stack.scans([sop_uid_of(d) for d in ct])

    _send_once(stack)
    _assert_results_in_orthanc(orthanc, stack, files)
    sends = stack.sends(sops)
    assert len(sends) == 10 and {s.state for s in sends} == {SEND_SENT} and all(s.sr_uid and s.sc_uid for s in sends)
    sent_at = {s.scan_id: s.sent_at for s in sends}
    (batch_id,) = [line for line in result.stdout.splitlines() if len(line) == 32 and " " not in line]
    table = _run(["results", batch_id], stack.env)
    assert table.returncode == 0 and "dicom_send" in table.stdout and table.stdout.count(" sent ") == 10, table.stdout

    # Pulling again (no Modality filter now): nothing retrieved twice, and lungcam's own SR and
    # Secondary Capture, now in the same studies, are not pulled back in.
    again = _run(["ingest", source, "--filter", "StudyDate=20200101-20201231"], stack.env)
    assert again.returncode == 0, again.stderr
    assert "0 queued, 10 already known" in again.stdout
    _send_once(stack)
    assert {s.scan_id: s.sent_at for s in stack.sends(sops)} == sent_at, "results were sent twice"


@pytest.mark.slow
@needs_dcmtk
def test_storescu_to_the_listener_then_results_in_orthanc_and_redelivery_replaces(
    stack: Stack, orthanc, tmp_path: Path
) -> None:
    files = make_study_dicoms(10, seed=31, size=96, per_study=5)
    paths = _write_files(tmp_path / "in", files)
    stack.start_worker()
    result = _storescu(stack.listen_port, paths)
    assert result.returncode == 0, result.stderr
    sops = [sop_uid_of(d) for d in files]
    scans = stack.wait_finished(sops)
    assert {s.status for s in scans.values()} == {Status.DONE}
    assert all(s.sop_instance_uid == s.scan_id and s.series_uid for s in scans.values())
    # Stored as received: the bytes in the store are the instance the sender sent.
    stored = pydicom.dcmread(stack.root / "store" / "scans" / sops[0])
    assert stored.SOPInstanceUID == sops[0] and str(stored.PatientName) == PHI_NAME
    _send_once(stack)
    _assert_results_in_orthanc(orthanc, stack, files)
    assert {s.state for s in stack.sends(sops)} == {SEND_SENT}
    before = orthanc.count()
    (first_send,) = stack.sends(sops[:1])

    # Redelivery 1: the modality sends the same image again: acknowledged, not recorded or classified twice.
    result = _storescu(stack.listen_port, paths[:1])
    assert result.returncode == 0, result.stderr
    assert stack.scans(sops[:1])[sops[0]].attempts == 1
    # Redelivery 2: the scan is re-classified (forced re-queue): its results are sent again, replacing.
    from shared.queueing import make_app, submit_scans
    from shared.settings import Settings

    first = stack.predictions(sops[:1])[sops[0]].created_at
    app = make_app(Settings(broker_url=REDIS_MAIN, batch_size=8))
    try:
        submit_scans(stack.sessions, app, [NewScan(sops[0], f"scans/{sops[0]}")], force=True)
    finally:
        app.close()
    wait_until(
        lambda: (
            stack.predictions(sops[:1])[sops[0]].created_at > first
            and stack.scans(sops[:1])[sops[0]].status == Status.DONE
        ),
        180,
        message="re-classified",
    )
    _send_once(stack)
    (resend,) = stack.sends(sops[:1])
    assert resend.sent_at > first_send.sent_at and (resend.sr_uid, resend.sc_uid) == (
        first_send.sr_uid,
        first_send.sc_uid,
    )
    assert orthanc.count() == before
    _assert_results_in_orthanc(orthanc, stack, files)
    # The same results by C-STORE (a second destination, its own result_sends rows): same UIDs, replaced.
    cstore_env = {**stack.env, "LUNGCAM_DICOM_DESTINATION": f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"}
    result = _run(["dicom-send", "--once"], cstore_env)
    assert result.returncode == 0, result.stdout + result.stderr
    by_destination = {}
    for row in stack.sends(sops):
        by_destination.setdefault(row.destination, set()).add((row.scan_id, row.state, row.sr_uid, row.sc_uid))
    assert len(by_destination) == 2
    assert len({frozenset((a, c, d) for a, _, c, d in rows) for rows in by_destination.values()}) == 1
    assert all(state == SEND_SENT for rows in by_destination.values() for _, state, _, _ in rows)
    assert orthanc.count() == before
    _assert_results_in_orthanc(orthanc, stack, files)
    # Nothing in the listener's log is patient data.
    log = stack.listener.log()
    assert "stored and queued" in log
    assert PHI_NAME not in log and PHI_ID not in log and "PHIMARKER" not in log


@pytest.mark.slow
def test_orthanc_pushes_a_study_to_the_listener_by_c_store_as_stat(stack: Stack, orthanc) -> None:
    """The PACS as the sender: Orthanc's "send to modality" (C-STORE SCU) to lungcam's stat AE title."""
    import requests

    files = make_study_dicoms(2, seed=81, size=64, per_study=2)
    instance_ids = [orthanc.upload(data)["ID"] for data in files]
    modality = {"AET": "LUNGCAM_STAT", "Host": "127.0.0.1", "Port": stack.listen_port}
    requests.put(f"{orthanc.http_url}/modalities/lungcam-stat", json=modality, timeout=30).raise_for_status()
    echo = requests.post(f"{orthanc.http_url}/modalities/lungcam-stat/echo", json={}, timeout=60)
    assert echo.ok, echo.text
    push = requests.post(
        f"{orthanc.http_url}/modalities/lungcam-stat/store",
        json={"Resources": instance_ids, "Synchronous": True},
        timeout=120,
    )
    assert push.ok, push.text
    sops = [sop_uid_of(d) for d in files]
    scans = stack.scans(sops)
    assert len(scans) == 2 and {s.priority for s in scans.values()} == {"stat"}
    stack.start_worker()
    assert {s.status for s in stack.wait_finished(sops).values()} == {Status.DONE}
    _send_once(stack)
    _assert_results_in_orthanc(orthanc, stack, files)


@pytest.mark.slow
def test_listener_refuses_non_images_and_survives_malformed_associations(stack: Stack) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    (image,) = make_study_dicoms(1, seed=41, size=64)
    ct = pydicom.dcmread(BytesIO(image))
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ct.file_meta.MediaStorageSOPClassUID = ct.SOPClassUID
    ct.SOPInstanceUID = pydicom.uid.generate_uid()
    buffer = BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    assert _c_store(stack.listen_port, buffer.getvalue()) == 0x0122
    assert not stack.scans([str(ct.SOPInstanceUID)])
    # An image without a Study Instance UID cannot be understood.
    broken = pydicom.dcmread(BytesIO(image))
    del broken.StudyInstanceUID
    buffer = BytesIO()
    broken.save_as(buffer, enforce_file_format=True)
    assert _c_store(stack.listen_port, buffer.getvalue()) == 0xC000
    # lungcam's own Secondary Capture, routed back by a PACS: acknowledged, never classified.
    from worker.pacs.objects import build_sc, read_source, to_bytes

    own = build_sc(
        read_source(image),
        np.zeros((64, 64, 3), np.uint8),
        model="m",
        version="1",
        uid_prefix="1.2.826.0.1.3680043.8.498.",
    )
    assert _c_store(stack.listen_port, to_bytes(own)) == 0x0000
    assert not stack.scans([str(own.SOPInstanceUID)])

    # Malformed associations: junk bytes, a truncated A-ASSOCIATE-RQ, a connection closed at once.
    for payload in (b"GET / HTTP/1.1\r\n\r\n" * 4, b"\x01\x00\x00\x00\x10\x00\x00\x01\x00\x00LUNG", b""):
        with socket.create_connection(("127.0.0.1", stack.listen_port), timeout=5) as sock:
            if payload:
                sock.sendall(payload)
            time.sleep(0.2)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", stack.listen_port, ae_title="LUNGCAM")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert stack.listener.process.poll() is None
    log = stack.listener.log()
    assert "0x0122" in log and "PHIMARKER" not in log and PHI_ID not in log


@pytest.mark.slow
def test_listener_answers_out_of_resources_while_the_database_is_down(postgres_url: str, tmp_path: Path) -> None:
    """The database goes away (its TCP path is cut): the C-STORE fails with 0xA700 and nothing is recorded."""
    from sqlalchemy.engine import make_url

    migrate(postgres_url)
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    _flush_redis(REDIS_DB_DOWN)
    port = free_port()
    env = subprocess_env(
        broker_url=REDIS_DB_DOWN,
        database_url=proxied,
        store_url=str(tmp_path / "store"),
        data_dir=str(tmp_path / "data"),
        dicom_port=port,
    )
    listener = ListenerProcess(env, port, tmp_path / "listener.log")
    engine = make_engine(postgres_url)
    with engine.connect() as connection:
        # The session's schema is shared with other tests: only what this test adds counts.
        before = set(connection.execute(sa.text("SELECT scan_id FROM scans")).scalars())
    try:
        first, second = make_study_dicoms(2, seed=51, size=64)
        assert _c_store(port, first) == 0x0000
        assert _queue_lengths(REDIS_DB_DOWN)["routine"] == 1
        proxy.stop()
        assert _c_store(port, second) == 0xA700
        proxy.start()
        with engine.connect() as connection:
            ids = set(connection.execute(sa.text("SELECT scan_id FROM scans")).scalars()) - before
        assert ids == {sop_uid_of(first)}, "the refused instance was recorded"
        assert _queue_lengths(REDIS_DB_DOWN)["routine"] == 1, "the refused instance was queued"
        assert not (tmp_path / "store" / "scans" / sop_uid_of(second)).exists()
        # The sender retries once the database is back: now it is accepted.
        assert _c_store(port, second) == 0x0000
        assert _queue_lengths(REDIS_DB_DOWN)["routine"] == 2
        assert "0xA700" in listener.log() and "PHIMARKER" not in listener.log()
    finally:
        listener.stop()
        proxy.stop()
        engine.dispose()
        _flush_redis(REDIS_DB_DOWN)


def test_the_listener_statuses_mean_what_pynetdicom_says() -> None:
    """Each status constant the listener answers is the code pynetdicom's tables give that meaning and category."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

    from worker.pacs.listener import (
        CANNOT_DECODE,
        CANNOT_UNDERSTAND,
        OUT_OF_RESOURCES,
        SOP_CLASS_NOT_SUPPORTED,
        SUCCESS,
    )

    assert GENERAL_STATUS[SUCCESS][0] == "Success"
    assert GENERAL_STATUS[SOP_CLASS_NOT_SUPPORTED][1] == "Refused: SOP Class Not Supported"
    assert STORAGE_SERVICE_CLASS_STATUS[OUT_OF_RESOURCES][1] == "Refused: Out of Resources"
    assert STORAGE_SERVICE_CLASS_STATUS[CANNOT_UNDERSTAND][1] == "Cannot Understand"
    assert code_to_category(CANNOT_DECODE) == "Failure"
