"""A 1 MB deflate bomb (1 GB inflated) costs every stage almost nothing (issue 21, point 1).

The shared size guard (`shared.imaging.check_image_header`) refuses a declared size beyond the limits
before any pixel is inflated; deflated data sets are read through a bounded stream. Measured here:
the header readers, both decoders and `lungcam report`'s thumbnails in this process, then the HTTP API
(in this process) and a real `lungcam worker` subprocess (the decode path `screen` also uses) on real
Redis and SQLite. Peak memory is VmHWM above the idle level (tests/helpers.hardening.PeakMemory).
The listener's part is in tests/worker/pacs/test_listener_hardening.py.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import redis_url
from helpers.hardening import MB, PeakMemory, _explicit_body, _file_meta, deflate_bomb, image_header, lying_headers

from shared.domain import Status
from shared.engine import make_engine, make_session_factory, migrate
from shared.imaging import (
    MAX_PIXEL_DATA_BYTES,
    ImageDecodeError,
    check_image_header,
    decode_image,
    decode_reduced,
    dicom_header,
    pixel_count,
)
from shared.models import Scan
from shared.scans import NewScan, add_scans, mark_scans

LIMIT = 500 * MB


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = deflate_bomb()  # 22600 x 22600 x 16 bit zeros: ~1 MB deflated, 1,021,520,000 bytes inflated
    assert len(data) < 1.1 * MB
    return data


def test_every_reader_refuses_the_bomb_from_its_header(bomb: bytes) -> None:
    with PeakMemory() as memory:
        header = dicom_header(bomb)
        assert (header.rows, header.columns, header.modality) == (22600, 22600, "DX")
        assert pixel_count(bomb) == 22600 * 22600  # counts without judging
        for read in (check_image_header, decode_image, lambda data: decode_reduced(data, 1024)):
            with pytest.raises(ImageDecodeError, match="image too large: 22600x22600") as caught:
                read(bomb)
            assert caught.value.kind == "unsupported"
    print(
        f"header, pixel count, guard and both decoders on the bomb: peak {memory.max_growth() / MB:.1f} MB above idle"
    )
    assert memory.max_growth() < LIMIT


def _deflated(dataset, body_tail: bytes) -> bytes:
    """A Deflated Explicit VR LE file: dataset, then body_tail (raw elements), all deflated."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return (
        _file_meta(dataset, "1.2.840.10008.1.2.1.99")
        + compressor.compress(_explicit_body(dataset) + body_tail)
        + compressor.flush()
    )


def _pixel_element(length: int, actual: int | None = None) -> bytes:
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length) + bytes(length if actual is None else actual)


def test_declared_sizes_short_pixel_data_and_inflation_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.imaging import dicom

    # Every frame counts: 40 frames of 3000 x 3000 x 16 bit declare 720 MB, beyond the pixel data limit.
    frames = image_header(3000, 3000, frames=40)
    data = _deflated(frames, _pixel_element(3000 * 3000 * 2 * 40, actual=0))
    with pytest.raises(ImageDecodeError, match=f"exceeds {MAX_PIXEL_DATA_BYTES // MB} MiB"):
        check_image_header(data)
    # A deflated element shorter than its header says: found by the guard's verification and by the decoder.
    short = deflate_bomb(100, 100, pixel_bytes=5000)
    assert check_image_header(short) == 100 * 100
    with pytest.raises(ImageDecodeError, match=r"truncated \(5000 of 20000 bytes\)"):
        check_image_header(short, verify_pixel_data=True)
    with pytest.raises(ImageDecodeError, match="corrupt DICOM pixel data"):
        decode_reduced(short, 64)
    # Native pixel data shorter than declared, no pixel data, 60000 x 60000: refused from the header.
    for name, fragment in (
        ("short pixel data", "shorter than declared"),
        ("no pixel data", "no pixel data"),
        ("60000x60000", "image too large: 60000x60000"),
    ):
        with pytest.raises(ImageDecodeError, match=fragment):
            check_image_header(lying_headers()[name], verify_pixel_data=True)
    # Whatever precedes the pixel data inflates only up to a cap (here lowered to 1 MiB): an 8 MB
    # private blob in a deflated header is refused after 1 MiB, with its bytes dropped as they come.
    monkeypatch.setattr(dicom, "MAX_DEFLATED_HEADER_BYTES", 1024 * 1024)
    blob = struct.pack("<HH2sHI", 0x0009, 0x1001, b"OB", 0, 8 * MB) + bytes(8 * MB)
    with pytest.raises(ImageDecodeError, match="inflates beyond 1 MiB"):
        check_image_header(_deflated(image_header(64, 64), blob + _pixel_element(64 * 64 * 2)))
    # Data following the pixel data is never inflated: a well-formed image decodes.
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    good = _deflated(
        image_header(64, 64), _pixel_element(0)[:8] + struct.pack("<I", image.nbytes) + image.tobytes() + blob
    )
    assert check_image_header(good, verify_pixel_data=True) == 64 * 64
    assert decode_reduced(good, 64).image.shape == (64, 64)


def test_the_report_gives_the_bomb_no_thumbnail_at_bounded_memory(bomb: bytes, tmp_path: Path) -> None:
    from shared.results import get_batch_progress, list_batch_scans
    from shared.settings import Settings
    from shared.sources import SourceFetcher
    from shared.store import LocalStore, scan_key
    from worker.ops.report import write_report

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    store = LocalStore(tmp_path / "store")
    store.put(scan_key("bomb"), bomb)
    store.put(scan_key("film"), cv2.imencode(".png", np.full((64, 64), 128, np.uint8))[1].tobytes())
    with sessions.begin() as session:
        add_scans(session, [NewScan(s, scan_key(s)) for s in ("bomb", "film")], "b1", batch_name="bombs")
        mark_scans(session, ["bomb"], Status.FAILED, error="undecodable image: image too large", finished=True)
        mark_scans(session, ["film"], Status.DONE, finished=True)
    with sessions() as session:
        progress, scans = get_batch_progress(session, "b1"), list_batch_scans(session, "b1")
    fetcher = SourceFetcher(store, Settings(data_dir=tmp_path / "data", store_url=str(tmp_path / "store")))
    try:
        with PeakMemory() as memory:
            page = write_report(tmp_path / "report.html", progress, scans, store=store, fetcher=fetcher, threads=2)
    finally:
        engine.dispose()
    print(f"report with the bomb: peak {memory.max_growth() / MB:.1f} MB above idle")
    assert memory.max_growth() < LIMIT
    assets = page.with_name("report_files")
    assert (assets / "film.jpg").exists() and not (assets / "bomb.jpg").exists()
    assert "bomb" in page.read_text()


@pytest.mark.slow
def test_the_api_and_a_worker_fail_the_bomb_with_the_reason_at_bounded_memory(bomb: bytes, tmp_path: Path) -> None:
    """POST the bomb and a normal film through the real API; a real worker fails the one and classifies the other."""
    import redis
    from helpers import make_tiny_bundle, start_worker, wait_until
    from helpers.api import b64, png_bytes, running_api

    broker_url = redis_url(8)
    redis.Redis.from_url(broker_url).flushdb()
    overrides = {"broker_url": broker_url, "api_max_image_bytes": 4 * MB, "api_max_body_bytes": 8 * MB}
    bundle = make_tiny_bundle(tmp_path / "bundle", 64)
    with running_api(tmp_path, **overrides) as api:
        env = {
            "LUNGCAM_BROKER_URL": broker_url,
            "LUNGCAM_DATABASE_URL": api.settings.resolved_database_url(),
            "LUNGCAM_STORE_URL": api.settings.resolved_store_url(),
            "LUNGCAM_DATA_DIR": str(tmp_path / "worker-data"),
            "LUNGCAM_MODELS": str(bundle),
            "LUNGCAM_BATCH_FLUSH_MS": "200",
        }
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            worker.wait_ready(240)
            with PeakMemory() as api_memory, PeakMemory(worker.process.pid) as worker_memory:
                for scan_id, data in (("bomb-1", bomb), ("film-1", png_bytes(1, 64))):
                    response = api.client.post("/v1/scans", json={"scan_id": scan_id, "image_base64": b64(data)})
                    assert response.status_code == 202, response.text

                def finished() -> bool:
                    with api.sessions() as session:
                        return all(
                            session.get(Scan, s).status in (Status.DONE, Status.FAILED) for s in ("bomb-1", "film-1")
                        )

                wait_until(finished, 120, message="both scans finished")
            with api.sessions() as session:
                bomb_scan, film = session.get(Scan, "bomb-1"), session.get(Scan, "film-1")
                assert (film.status, bomb_scan.status) == (Status.DONE, Status.FAILED)
                assert bomb_scan.error.startswith("undecodable image: unsupported: image too large: 22600x22600")
        finally:
            worker.stop()
    print(
        f"API (this process) peak {api_memory.max_growth() / MB:.1f} MB, worker peak "
        f"{worker_memory.max_growth() / MB:.1f} MB above idle"
    )
    assert api_memory.max_growth() < LIMIT
    assert worker_memory.max_growth() < LIMIT
    assert "BOMB^TEST" not in worker.log()
