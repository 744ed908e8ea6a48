"""`lungcam ingest DIR`: one file is one scan (ids keep the extension), TIFF included, a summary line, clear refusals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from helpers import LUNGCAM, REPO, encode_scan, redis_url

from shared.domain import is_valid_scan_id
from shared.engine import make_engine, make_session_factory, migrate
from shared.errors import SubmissionError
from shared.queueing import make_app
from shared.settings import Settings
from shared.store import LocalStore, scan_key
from shared.synthetic import synthetic_xray
from worker.ops.ingest import ingest, scan_id_for, survey

REDIS_URL = os.environ.get("LUNGCAM_TEST_INGEST_REDIS_URL", redis_url(14))


def _image(seed: int) -> np.ndarray:
    return synthetic_xray(np.random.default_rng(seed), 48).image


def _colliding_folder(folder: Path) -> dict[str, bytes]:
    """a.png, a.jpg, a-1.png and c.tif (each different), plus a text file and a hidden file; returns the images."""
    folder.mkdir()
    files = {
        "a.png": encode_scan(_image(1), "png"),
        "a.jpg": encode_scan(_image(2), "jpeg"),
        "a-1.png": encode_scan(_image(3), "png"),
        "c.tif": cv2.imencode(".tif", _image(4))[1].tobytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    return files


def test_a_png_a_jpg_a_1_png_and_c_tif_are_four_scans_each_holding_its_own_file(tmp_path: Path):
    files = _colliding_folder(tmp_path / "in")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", store_url=str(tmp_path / "store"))
    found = survey(str(tmp_path / "in"), settings)
    assert sorted(item.scan_id for item in found.items) == ["a-1.png", "a.jpg", "a.png", "c.tif"]
    assert found.summary(queued=4) == (
        "6 file(s) seen, 4 scan(s) queued, 2 skipped (1 hidden, 1 not an image suffix (.txt))"
    )
    migrate(settings.resolved_database_url())
    engine = make_engine(settings.resolved_database_url())
    store = LocalStore(tmp_path / "store")
    app = make_app(settings, broker_url="memory://")
    try:
        _batch, result = ingest(found.items, store=store, sessions=make_session_factory(engine), app=app)
    finally:
        app.close()
        engine.dispose()
    assert sorted(result.queued) == ["a-1.png", "a.jpg", "a.png", "c.tif"]
    for name, data in files.items():
        assert store.get(scan_key(name)) == data, name  # byte-identical to its own file


@pytest.mark.parametrize(
    "names",
    [("x/a.png", "x_a.png"), ("a b.png", "a_b.png")],
)
def test_two_files_that_would_share_an_id_are_refused_naming_both(tmp_path: Path, names: tuple[str, str]):
    folder = tmp_path / "in"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode_scan(_image(5), "png"))
    with pytest.raises(SubmissionError) as refused:
        survey(str(folder), Settings())
    message = str(refused.value)
    assert all(name in message for name in names) and "nothing was queued" in message and "\n" not in message


def test_a_csv_naming_one_scan_id_twice_is_refused_with_both_rows(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path,scan_id\nx.png,same\nx.png,same\n")
    with pytest.raises(SubmissionError, match=r"list\.csv:2 .* and list\.csv:3 .* would both be scan id 'same'"):
        survey(str(tmp_path / "list.csv"), Settings())


@pytest.mark.parametrize(
    "relative, expected",
    [
        ("a.png", "a.png"),
        ("sub/dir/a.JPG", "sub_dir_a.JPG"),
        ("scan 1 (copy).dcm", "scan_1_copy_.dcm"),
        ("..a..png", "a.png"),
        ("IM0001", "IM0001"),
    ],
)
def test_scan_ids_keep_the_extension_and_stay_valid(relative: str, expected: str):
    assert scan_id_for(relative) == expected
    assert is_valid_scan_id(scan_id_for(relative))


def test_a_long_name_keeps_a_hash_of_the_whole_path():
    first, second = scan_id_for("d/" + "x" * 200 + ".png"), scan_id_for("e/" + "x" * 200 + ".png")
    assert first != second and len(first) <= 128 and is_valid_scan_id(first)


def test_the_cli_prints_the_summary_and_refuses_a_collision_with_exit_2(tmp_path: Path):
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    _colliding_folder(tmp_path / "in")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")},
        "PYTHONPATH": str(REPO),
        "LUNGCAM_DATA_DIR": str(tmp_path / "data"),
        "LUNGCAM_BROKER_URL": REDIS_URL,
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LUNGCAM, *args], env=env, capture_output=True, text=True, timeout=120)

    try:
        assert run("migrate").returncode == 0
        done = run("ingest", str(tmp_path / "in"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert (
            "ingest: 6 file(s) seen, 4 scan(s) queued, 2 skipped (1 hidden, 1 not an image suffix (.txt))"
            in done.stdout
        )
        (tmp_path / "in" / "sub").mkdir()
        (tmp_path / "in" / "sub" / "c.tif").write_bytes(b"II*\0")
        (tmp_path / "in" / "sub_c.tif").write_bytes(b"II*\0")
        refused = run("ingest", str(tmp_path / "in"), "--name", "second")
    finally:
        client.flushdb()
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "sub/c.tif and sub_c.tif would both be scan id 'sub_c.tif'" in refused.stderr
