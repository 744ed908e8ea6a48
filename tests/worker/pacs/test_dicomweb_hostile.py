"""`lungcam ingest dicomweb+...` against a hostile DICOMweb server written here (a threaded http.server on 127.0.0.1).

Real SQLite and a local store; the Celery app publishes to an in-memory broker (what is published is
not under test here). Each hostile behaviour ends in one clear line or one recorded failure, and
changes nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa
from helpers import LUNGCAM, REPO
from helpers.pacs import make_study_dicoms, sop_uid_of, study_uid_of

from shared.domain import Status
from shared.engine import make_engine, make_session_factory, migrate
from shared.models import Scan
from shared.queueing import make_app
from shared.scans import batch_counts, mark_scans
from shared.settings import Settings
from shared.store import LocalStore, scan_key
from worker.pacs.dicomweb import RETRIEVAL_FAILED, PullError, pull

CR = "1.2.840.10008.5.1.4.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass
class Archive:
    """What the hostile server holds and how it misbehaves."""

    files: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> Part 10 file
    records: list[dict] = field(default_factory=list)  # QIDO-RS records, in order
    ignore_offset: bool = False
    endless: bool = False  # every search page holds new, made-up instances
    malformed_json: bool = False
    gzip_bomb: bool = False  # 80 MB of JSON whitespace, gzip-compressed to about 80 KB
    stall_search: bool = False
    missing: set[str] = field(default_factory=set)  # 404
    not_dicom: set[str] = field(default_factory=set)  # a text/html part
    garbage: set[str] = field(default_factory=set)  # an application/dicom part that is not DICOM
    other_instance: set[str] = field(default_factory=set)  # answers another instance's bytes
    huge: set[str] = field(default_factory=set)  # a 1 GB part, streamed
    trickle: set[str] = field(default_factory=set)  # one byte every 0.2 s
    huge_bytes_sent: int = 0
    searches: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, data: bytes, *, sop: str | None = None, sop_class: str = CR) -> str:
        sop = sop or sop_uid_of(data)
        self.files[sop] = data
        self.records.append(_record(study_uid_of(data), "1.2.3.4", sop, sop_class))
        return sop


def _record(study: str, series: str, sop: str, sop_class: str) -> dict:
    return {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080016": {"vr": "UI", "Value": [sop_class]},
    }


class _Handler(BaseHTTPRequestHandler):
    archive: Archive
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        archive = self.archive
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/dicom-web/instances":
            archive.searches += 1
            if archive.stall_search:
                archive.stop.wait(30)
                return
            if archive.gzip_bomb:
                packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip format
                body = b"".join(packer.compress(b" " * 2**20) for _ in range(80)) + packer.flush()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if archive.malformed_json:
                self._send(200, b'[{"0020000D": {"vr": "UI", "Value": ["1.2', "application/dicom+json")
                return
            limit, offset = int(query.get("limit", 1000)), int(query.get("offset", 0))
            if archive.endless:
                page = [_record("1.2", "1.3", f"1.2.3.{archive.searches}.{i}", CR) for i in range(limit)]
            else:
                page = archive.records[(0 if archive.ignore_offset else offset) :][:limit]
            self._send(200, json.dumps(page).encode(), "application/dicom+json")
            return
        sop = parts.path.rsplit("/", 1)[-1]
        if sop in archive.missing or sop not in archive.files:
            self._send(404, b"not found", "text/plain")
            return
        boundary = "hostile-" + uuid.uuid4().hex
        header = f'multipart/related; type="application/dicom"; boundary={boundary}'
        if sop in archive.huge:
            self._stream_huge(boundary, header)
            return
        if sop in archive.trickle:
            self.send_response(200)
            self.send_header("Content-Type", header)
            self.end_headers()
            for _ in range(200):
                if archive.stop.is_set():
                    return
                try:
                    self.wfile.write(b"-")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        part_type, data = "application/dicom", archive.files[sop]
        if sop in archive.not_dicom:
            part_type, data = "text/html", b"<html>Error: please log in</html>"
        elif sop in archive.garbage:
            data = b"\x00" * 200 + b"this is not dicom at all"
        elif sop in archive.other_instance:
            data = next(d for s, d in archive.files.items() if s != sop)
        body = f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
        self._send(200, body, header)

    def _stream_huge(self, boundary: str, header: str) -> None:
        """A 1 GB part, written in 1 MB pieces until the client goes away."""
        self.send_response(200)
        self.send_header("Content-Type", header)
        self.send_header("Content-Length", str(2**30 + 200))
        self.end_headers()
        piece = b"\0" * 2**20
        try:
            self.wfile.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            for _ in range(1024):
                self.wfile.write(piece)
                self.archive.huge_bytes_sent += len(piece)
        except OSError:
            pass


@pytest.fixture
def hostile() -> Iterator[tuple[Archive, str]]:
    """A running hostile server and its dicomweb+ source."""
    archive = Archive()
    handler = type("Handler", (_Handler,), {"archive": archive})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield archive, f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        archive.stop.set()
        server.shutdown()
        server.server_close()


@dataclass
class Site:
    settings: Settings
    sessions: sa.orm.sessionmaker
    store: LocalStore

    def pull(self, source: str, **options: object):
        app = make_app(self.settings, broker_url="memory://")
        try:
            return pull(
                source,
                {},
                settings=self.settings,
                sessions=self.sessions,
                store=self.store,
                app=app,
                batch_name="hostile",
                **options,
            )
        finally:
            app.close()

    def scans(self) -> dict[str, Scan]:
        with self.sessions() as session:
            return {scan.scan_id: scan for scan in session.scalars(sa.select(Scan))}

    def stored(self) -> set[str]:
        return {key.rsplit("/", 1)[-1] for key in self.store.list("scans/")}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    settings = Settings(database_url=url, store_url=str(tmp_path / "store"), dicomweb_max_part_bytes=4 * 2**20)
    try:
        yield Site(settings, make_session_factory(engine), LocalStore(tmp_path / "store"))
    finally:
        engine.dispose()


def test_one_404_among_ten_gives_nine_scans_and_one_recorded_failure_and_a_rerun_completes_it(hostile, site: Site):
    archive, source = hostile
    sops = [archive.add(data) for data in make_study_dicoms(10, seed=31, size=32, per_study=5)]
    archive.missing.add(sops[3])
    first = site.pull(source, page_size=4)
    assert first.found == 10 and len(first.queued) == 9 and first.failed == 1
    assert "9 queued, 0 already known, 1 could not be retrieved" in first.summary()
    scans = site.scans()
    assert (
        scans[sops[3]].status == Status.FAILED
        and scans[sops[3]].error == RETRIEVAL_FAILED + "WADO-RS answered HTTP 404"
    )
    assert {s for s in sops if scans[s].status == Status.QUEUED} == set(sops) - {sops[3]}
    assert site.stored() == set(sops) - {
        sops[3]
    }  # nothing stored without its row, nothing recorded as stored that is not
    for sop in set(sops) - {sops[3]}:
        assert site.store.get(scan_key(sop)) == archive.files[sop]

    archive.missing.clear()  # the server heals
    again = site.pull(source, page_size=4)
    assert again.queued == [sops[3]] and len(again.already) == 9 and again.failed == 0
    assert again.batch_id == first.batch_id
    scan = site.scans()[sops[3]]
    assert (scan.status, scan.error, scan.sop_instance_uid, scan.batch_id) == (
        Status.QUEUED,
        None,
        sops[3],
        first.batch_id,
    )
    assert site.store.get(scan_key(sops[3])) == archive.files[sops[3]]
    with site.sessions() as session:
        assert batch_counts(session, first.batch_id)["total"] == 10


def test_hostile_parts_are_each_recorded_with_what_the_server_did_and_a_1_gb_part_is_never_buffered(
    hostile, site: Site
):
    archive, source = hostile
    files = make_study_dicoms(7, seed=32, size=32, per_study=7)
    sops = [archive.add(data) for data in files]
    good, html, garbage, other, huge = sops[0], sops[1], sops[2], sops[3], sops[4]
    archive.not_dicom.add(html)
    archive.garbage.add(garbage)
    archive.other_instance.add(other)
    archive.huge.add(huge)
    archive.records.append(_record("1.2.3", "1.2.3.4", "../../../etc/passwd", CR))  # a UID that is a path
    archive.records.append(_record("1.2.3", "1.2.3.4", "1.2.3.99", SR))  # not an image: never retrieved
    result = site.pull(source)
    assert result.refused == 1 and result.failed == 4 and sorted(result.queued) == sorted([good, sops[5], sops[6]])
    errors = {sop: scan.error for sop, scan in site.scans().items() if scan.status == Status.FAILED}
    assert errors == {
        html: RETRIEVAL_FAILED + "WADO-RS answered a part of type text/html, not DICOM",
        garbage: RETRIEVAL_FAILED + "WADO-RS answered a part that does not parse as DICOM",
        other: RETRIEVAL_FAILED + "WADO-RS answered another instance than the one asked for",
        huge: RETRIEVAL_FAILED + f"WADO-RS answered a part larger than the limit of {4 * 2**20} bytes "
        "(LUNGCAM_DICOMWEB_MAX_PART_BYTES); not read further",
    }
    print(
        f"1 GB part: the server wrote {archive.huge_bytes_sent / 2**20:.0f} MB before the pull dropped the connection"
    )
    assert archive.huge_bytes_sent < 64 * 2**20  # read up to the cap, then the connection was dropped
    assert site.stored() == {good, sops[5], sops[6]}
    assert "1 search records refused" in result.summary()
    assert not list(Path(site.settings.store_url).parent.glob("etc*"))


def test_a_deflate_bomb_part_is_refused_from_its_header_without_inflating(hostile, site: Site):
    """A 1 MB part declaring 22600x22600 16-bit (1 GB inflated): a recorded failure, the pull's memory flat."""
    from helpers.hardening import MB, PeakMemory, deflate_bomb

    from shared.imaging import dicom_header

    archive, source = hostile
    bomb = deflate_bomb()
    assert len(bomb) < 2 * MB
    header = dicom_header(bomb)
    assert header is not None
    bomb_sop = header.sop_instance_uid
    archive.files[bomb_sop] = bomb  # recorded by hand: reading its study UID with pydicom would inflate it
    archive.records.append(_record(header.study_instance_uid, "1.2.3.4", bomb_sop, header.sop_class_uid))
    good = archive.add(make_study_dicoms(1, seed=33, size=32)[0])
    site.settings = site.settings.model_copy(update={"dicomweb_max_part_bytes": 4 * MB})
    with PeakMemory() as memory:
        result = site.pull(source)
    print(f"deflate bomb through a DICOMweb pull: the pulling process grew {memory.max_growth() / MB:.1f} MB")
    assert memory.max_growth() < 500 * MB
    assert result.queued == [good] and result.failed == 1
    error = site.scans()[bomb_sop].error
    assert error.startswith(RETRIEVAL_FAILED + "WADO-RS answered an instance that cannot be classified")
    assert "22600" in error and site.stored() == {good}


def test_a_server_that_ignores_offset_ends_in_one_line_within_the_deadline(hostile, site: Site):
    archive, source = hostile
    for data in make_study_dicoms(10, seed=33, size=32, per_study=5):
        archive.add(data)
    archive.ignore_offset = True
    started = time.monotonic()
    with pytest.raises(PullError) as stopped:
        site.pull(source, page_size=4, deadline_s=20)
    assert time.monotonic() - started < 20 and archive.searches == 2
    message = str(stopped.value)
    assert "ignores the search's offset: page 2 repeats" in message and "\n" not in message
    assert site.scans() == {} and site.stored() == set()


def test_endless_pages_stop_at_the_page_cap_and_malformed_json_is_named(hostile, site: Site):
    archive, source = hostile
    archive.endless = True
    with pytest.raises(PullError, match=r"more than 3 pages of 4 instances match .* raise --max-pages"):
        site.pull(source, page_size=4, max_pages=3)
    assert archive.searches == 3
    archive.endless, archive.malformed_json = False, True
    with pytest.raises(PullError, match=r"answered the search \(QIDO-RS, at offset 0\) with malformed JSON$"):
        site.pull(source)
    archive.malformed_json, archive.gzip_bomb = False, True
    with pytest.raises(
        PullError, match=r"the search answer is larger than the limit of 67108864 bytes; not read further"
    ):
        site.pull(source)
    assert site.scans() == {} and site.stored() == set()


def test_stalled_and_trickling_servers_end_at_the_deadline_keeping_what_was_stored(hostile, site: Site):
    archive, source = hostile
    archive.stall_search = True
    started = time.monotonic()
    with pytest.raises(
        PullError, match=r"did not finish within the --deadline of 1.5 s \(the server stalled or trickled\)"
    ):
        site.pull(source, deadline_s=1.5)
    assert time.monotonic() - started < 5
    archive.stall_search = False
    sops = [archive.add(data) for data in make_study_dicoms(3, seed=34, size=32, per_study=3)]
    archive.trickle.add(sops[1])
    started = time.monotonic()
    with pytest.raises(
        PullError, match=r"stopped at the --deadline of 2 s .*: 1 of 3 new instances stored and queued; run"
    ):
        site.pull(source, deadline_s=2)
    assert time.monotonic() - started < 6
    assert site.stored() == {sops[0]} and set(site.scans()) == {sops[0]}


def test_the_cli_says_what_the_server_did_in_one_line_and_exits_2(hostile, tmp_path: Path):
    archive, source = hostile
    # 600 records: the CLI asks for pages of 500, and this server answers the first 500 whatever the offset.
    for index in range(600):
        archive.records.append(_record("1.2.3", "1.2.3.4", f"1.2.3.4.{index}", CR))
    archive.ignore_offset = True
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")},
        "PYTHONPATH": str(REPO),
        "LUNGCAM_DATA_DIR": str(tmp_path / "data"),
        "LUNGCAM_BROKER_URL": "memory://",
    }
    assert subprocess.run([LUNGCAM, "migrate"], env=env, capture_output=True, timeout=120).returncode == 0
    started = time.monotonic()
    result = subprocess.run(
        [LUNGCAM, "ingest", source, "--deadline", "30"], env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("lungcam")]
    print(line)
    assert "ignores the search's offset" in line and "Traceback" not in result.stderr


def test_ingest_wait_exits_4_when_a_pulled_scan_fails(hostile, tmp_path: Path):
    """`--wait` follows the pulled batch like `lungcam status`: a scan that fails in the worker makes the exit code 4."""
    archive, source = hostile
    sops = [archive.add(data) for data in make_study_dicoms(3, seed=35, size=32, per_study=3)]
    data_dir = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")},
        "PYTHONPATH": str(REPO),
        "LUNGCAM_DATA_DIR": str(data_dir),
        "LUNGCAM_BROKER_URL": "memory://",
    }
    assert subprocess.run([LUNGCAM, "migrate"], env=env, capture_output=True, timeout=120).returncode == 0
    engine = make_engine(f"sqlite:///{data_dir / 'lungcam.sqlite'}")
    sessions = make_session_factory(engine)

    def queued() -> int:
        with sessions() as session:
            return session.scalar(sa.select(sa.func.count()).where(Scan.status == Status.QUEUED)) or 0

    # Nothing consumes memory://: this process plays the worker, finishing two scans and failing one.
    try:
        command = subprocess.Popen(
            [LUNGCAM, "ingest", source, "--wait", "--timeout", "120"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while queued() < 3 and time.monotonic() < deadline and command.poll() is None:
            time.sleep(0.2)
        assert queued() == 3, command.communicate(timeout=10)
        with sessions.begin() as session:
            mark_scans(session, sops[:2], Status.DONE, finished=True)
            mark_scans(session, sops[2:], Status.FAILED, error="could not decode", finished=True)
        stdout, stderr = command.communicate(timeout=60)
    finally:
        engine.dispose()
    assert command.returncode == 4, stderr[-2000:]
    assert "2 done, 1 failed" in stdout and "1 scan(s) failed" in stderr
