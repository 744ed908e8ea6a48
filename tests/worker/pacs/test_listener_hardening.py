"""The DICOM listener under attack (issue 21): bombs and lying headers, a 4 GB PDU, idle connections, allow-lists.

The slow tests share one real `lungcam dicom-listen` subprocess (SQLite, a local store, Redis db 8) with a 2 s idle timeout,
an allow-list of calling AE titles and of peer addresses; pynetdicom and raw sockets as the clients.
Peak memory is the listener's VmHWM above its idle level (tests/helpers.hardening.PeakMemory).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis
import sqlalchemy as sa
from helpers import redis_url
from helpers.hardening import MB, PeakMemory, deflate_bomb, lying_headers
from helpers.pacs import ListenerProcess, free_port, make_study_dicoms, sop_uid_of, subprocess_env

from shared.engine import make_engine, make_session_factory, migrate
from shared.models import Scan

REDIS_URL = redis_url(8)
IDLE_TIMEOUT_S = 2.0
DX = "1.2.840.10008.5.1.4.1.1.1.1"
ALLOWED_AETS = ("TESTSCU", "ER_MODALITY")
C210 = 0xC210
MAX_ASSOCIATIONS = 4  # fewer than the idle connections below, so they would block without the idle timeout


@dataclass
class Running:
    listener: ListenerProcess
    root: Path
    sessions: sa.orm.sessionmaker

    @property
    def port(self) -> int:
        return self.listener.port

    def scan(self, scan_id: str) -> Scan | None:
        with self.sessions() as session:
            return session.get(Scan, scan_id)

    def stored(self) -> set[str]:
        folder = self.root / "store" / "scans"
        return {path.name for path in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("listener-hardening")
    url = f"sqlite:///{root / 'lungcam.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    env = subprocess_env(
        broker_url=REDIS_URL,
        database_url=url,
        store_url=str(root / "store"),
        data_dir=str(root / "data"),
        dicom_port=port,
        dicom_idle_timeout_s=IDLE_TIMEOUT_S,
        dicom_allowed_aets=",".join(ALLOWED_AETS),
        dicom_allowed_peers="127.0.0.1/32",
        dicom_stat_ae_titles="LUNGCAM_STAT,ER_MODALITY",
        dicom_max_associations=MAX_ASSOCIATIONS,
    )
    listener = ListenerProcess(env, port, root / "listener.log")
    try:
        yield Running(listener, root, make_session_factory(engine))
    finally:
        listener.stop()
        engine.dispose()
        redis.Redis.from_url(REDIS_URL).flushdb()


def _associate(
    port: int,
    syntaxes: list[str],
    *,
    calling: str = "TESTSCU",
    called: str = "LUNGCAM",
    bind: tuple[str, int] = ("127.0.0.1", 0),
):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(DX, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=bind)


def _send_file(port: int, path: Path, syntax: str, **kwargs) -> int:
    """C-STORE a file as it is on disk (pynetdicom's chunked send: the client never decodes it either)."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = _associate(port, [syntax], **kwargs)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
            return int(status.Status) if status else -1
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


@pytest.mark.slow
def test_a_deflate_bomb_and_lying_headers_get_0xC210_with_bounded_memory(running: Running, tmp_path: Path) -> None:
    bomb = deflate_bomb()  # ~1 MB declaring 22600 x 22600 x 16 bit: 1 GB inflated
    assert len(bomb) < 1.1 * MB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    sop = str(pydicom.filereader.read_file_meta_info(path).MediaStorageSOPInstanceUID)
    with PeakMemory(running.listener.process.pid) as memory:
        status = _send_file(running.port, path, pydicom.uid.DeflatedExplicitVRLittleEndian)
    print(f"listener peak above idle while refusing the bomb: {memory.max_growth() / MB:.1f} MB")
    assert status == C210
    assert memory.max_growth() < 500 * MB
    assert running.scan(sop) is None and sop not in running.stored()

    for name, data in lying_headers().items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        assert _send_file(running.port, path, pydicom.uid.ExplicitVRLittleEndian) == C210, name
    log = running.listener.log()
    assert "cannot be classified" in log and "image too large" in log and "shorter than declared" in log
    assert "no pixel data" in log and "BOMB^TEST" not in log

    # A well-formed deflated instance is still accepted, stored and recorded.
    (good,) = make_study_dicoms(1, seed=5, size=64)
    dataset = pydicom.dcmread(BytesIO(good))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "good-deflated.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert _send_file(running.port, path, pydicom.uid.DeflatedExplicitVRLittleEndian) == 0x0000
    assert running.scan(sop_uid_of(good)) is not None


@pytest.mark.slow
def test_a_4_gb_pdu_is_dropped_before_it_costs_memory(running: Running) -> None:
    with PeakMemory(running.listener.process.pid) as memory:
        sent, dropped = 0, False
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"\x01\x00" + (0xFFFFFFFF).to_bytes(4, "big"))  # an A-ASSOCIATE-RQ of 4 GB
            zeros = bytes(1024 * 1024)
            deadline = time.monotonic() + 20
            try:
                while time.monotonic() < deadline and sent < 512 * MB:
                    sock.sendall(zeros)
                    sent += len(zeros)
            except OSError:  # broken pipe or reset: the listener closed the connection
                dropped = True
            if not dropped:
                sock.settimeout(5)
                try:
                    dropped = sock.recv(1) == b""
                except OSError:
                    dropped = True
    print(
        f"4 GB PDU: {sent / MB:.0f} MB sent before the drop; listener peak above idle {memory.max_growth() / MB:.1f} MB"
    )
    assert dropped, "the listener kept reading a 4 GB PDU"
    assert sent < 64 * MB, "the connection was not dropped at the PDU header"
    assert memory.max_growth() < 500 * MB
    assert "dropped a connection" in running.listener.log()
    assert running.listener.process.poll() is None


@pytest.mark.slow
def test_twenty_idle_connections_do_not_block_an_association_beyond_the_idle_timeout(running: Running) -> None:
    idle = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.5)  # the listener has accepted them (each holds an association slot)
        assert not _associate(running.port, [pydicom.uid.ExplicitVRLittleEndian]).is_established, "no slot was taken"
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            assoc = _associate(running.port, [pydicom.uid.ExplicitVRLittleEndian])
            if assoc.is_established:
                break
            assert time.monotonic() - started < IDLE_TIMEOUT_S + 4, "still rejected well after the idle timeout"
            time.sleep(0.2)
        waited = time.monotonic() - started
        assoc.release()
        print(
            f"association established {waited:.1f} s after 20 idle connections, attempt {attempts} "
            f"(idle timeout {IDLE_TIMEOUT_S} s)"
        )
        # The idle connections themselves were closed by the listener.
        for sock in idle:
            sock.settimeout(IDLE_TIMEOUT_S + 5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.slow
def test_only_listed_callers_and_peers_get_in_and_only_they_are_stat(running: Running, tmp_path: Path) -> None:
    syntax = pydicom.uid.ExplicitVRLittleEndian
    assert not _associate(running.port, [syntax], calling="INTRUDER").is_established
    # Naming yourself a stat title is no way in either.
    assert not _associate(running.port, [syntax], calling="LUNGCAM_STAT").is_established
    # A listed AE title from an address outside LUNGCAM_DICOM_ALLOWED_PEERS: closed at once.
    assert not _associate(running.port, [syntax], bind=("127.0.0.2", 0)).is_established
    assert "not in LUNGCAM_DICOM_ALLOWED_PEERS" in running.listener.log()

    routine, stat_by_called, stat_by_caller = make_study_dicoms(3, seed=9, size=64, per_study=3)
    for data, kwargs in (
        (routine, {}),
        (stat_by_called, {"called": "LUNGCAM_STAT"}),
        (stat_by_caller, {"calling": "ER_MODALITY"}),
    ):
        path = tmp_path / f"{sop_uid_of(data)}.dcm"
        path.write_bytes(data)
        assert _send_file(running.port, path, syntax, **kwargs) == 0x0000
    assert running.scan(sop_uid_of(routine)).priority == "routine"
    assert running.scan(sop_uid_of(stat_by_called)).priority == "stat"
    assert running.scan(sop_uid_of(stat_by_caller)).priority == "stat"


@pytest.mark.slow
def test_the_listener_negotiates_the_compressed_syntaxes_the_decoder_reads(running: Running, tmp_path: Path) -> None:
    from pydicom import uid

    offered = [
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.RLELossless,
        uid.DeflatedExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
    ]
    for syntax in offered:
        assoc = _associate(running.port, [syntax])
        assert assoc.is_established
        accepted = [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
        assoc.release()
        assert accepted == [syntax], syntax.name
    # Video has no decoder: not negotiated (pynetdicom's requestor aborts without an accepted context).
    assoc = _associate(running.port, [uid.MPEG2MPML, uid.MPEG4HP41])
    assert not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()

    # An RLE-compressed radiograph goes all the way through.
    (data,) = make_study_dicoms(1, seed=3, size=64)
    dataset = pydicom.dcmread(BytesIO(data))
    dataset.compress(uid.RLELossless, encoding_plugin="pydicom")
    path = tmp_path / "rle.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert _send_file(running.port, path, uid.RLELossless) == 0x0000
    assert running.scan(str(dataset.SOPInstanceUID)) is not None
    assert np.array_equal(
        pydicom.dcmread(running.root / "store" / "scans" / str(dataset.SOPInstanceUID)).pixel_array,
        pydicom.dcmread(BytesIO(data)).pixel_array,
    )


def test_stat_needs_a_listed_caller_and_bad_peer_lists_are_named() -> None:
    from shared.errors import SettingsError
    from shared.settings import Settings, load_settings
    from worker.pacs.listener import Receiver

    open_listener = Receiver(Settings(), None, None, None)  # type: ignore[arg-type]
    assert open_listener.priority_for("ANYONE", "LUNGCAM_STAT") == "stat"
    listed = Receiver(Settings(dicom_allowed_aets="CR_ER, DX_WARD"), None, None, None)  # type: ignore[arg-type]
    assert listed.priority_for("CR_ER", "LUNGCAM_STAT") == "stat"
    assert listed.priority_for("LUNGCAM_STAT", "LUNGCAM_STAT") == "routine"
    assert listed.priority_for("DX_WARD", "LUNGCAM") == "routine"
    networks = Settings(dicom_allowed_peers="10.1.0.0/16, 192.168.5.7").allowed_peer_networks()
    assert [str(n) for n in networks] == ["10.1.0.0/16", "192.168.5.7/32"]
    with pytest.raises(SettingsError, match=r"LUNGCAM_DICOM_ALLOWED_PEERS: .*'modality-1' is not an IP address"):
        load_settings(dicom_allowed_peers="10.0.0.1,modality-1")


def test_the_offered_transfer_syntaxes_are_those_with_a_decoder() -> None:
    from pydicom import uid

    from shared.imaging import decodable_transfer_syntaxes
    from shared.settings import Settings
    from worker.pacs.listener import make_ae

    syntaxes = decodable_transfer_syntaxes()
    assert syntaxes[:4] == [
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
    ]
    for syntax in (uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless):
        assert syntax in syntaxes
    assert uid.MPEG2MPML not in syntaxes and uid.JPEG2000MC not in syntaxes
    ae = make_ae(
        Settings(dicom_max_pdu_bytes=32768, dicom_idle_timeout_s=5, dicom_max_associations=3, dicom_allowed_aets="A,B")
    )
    dx = next(cx for cx in ae.supported_contexts if cx.abstract_syntax == DX)
    assert list(dx.transfer_syntax) == syntaxes
    assert (ae.maximum_pdu_size, ae.acse_timeout, ae.network_timeout, ae.maximum_associations) == (32768, 5, 5, 3)
    assert ae.require_calling_aet == ["A", "B"]
