"""The operator CLI against a real worker: bulk ingest with progress, results CSV, HTML report in Chromium."""

from __future__ import annotations

import csv
import os
import subprocess

import cv2
import numpy as np
import pytest
import redis
from helpers import LUNGCAM, headless_chromium, make_tiny_bundle, redis_url, start_worker

from shared.synthetic import synthetic_xray

# Starts real workers or trains models: left out of the fast tier (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("LUNGCAM_TEST_CLI_REDIS_URL", redis_url(11))


def _run(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LUNGCAM, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory):
    """500 synthetic images ingested with `lungcam ingest --wait` while a real worker runs."""
    root = tmp_path_factory.mktemp("cli")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    images = root / "archive"
    rng = np.random.default_rng(7)
    for index in range(500):
        folder = images / f"site{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img{index:04d}.png"), synthetic_xray(rng, 96, covid=bool(index % 2)).image)
    env = {
        "LUNGCAM_DATA_DIR": str(root / "data"),
        "LUNGCAM_BROKER_URL": REDIS_URL,
        "LUNGCAM_MODELS": str(make_tiny_bundle(root / "bundle", 64)),
        "LUNGCAM_BATCH_SIZE": "32",
        "LUNGCAM_BATCH_FLUSH_MS": "200",
    }
    migrate = _run(env, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    worker = start_worker(env, root / "worker.log")
    try:
        worker.wait_ready()
        ingest = _run(env, "ingest", str(images), "--name", "archive", "--wait", "--timeout", "400")
    finally:
        worker.stop()
    yield env, root, ingest
    client.flushdb()


def test_bulk_ingest_of_500_images_shows_progress_and_ends_all_done(screened):
    _env, _root, ingest = screened
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    assert "queueing" in ingest.stderr and "500/500" in ingest.stderr  # the tqdm progress bars
    assert "screening" in ingest.stderr
    assert "500 done, 0 failed, 0 skipped of 500" in ingest.stdout


def _batch_id(ingest: subprocess.CompletedProcess) -> str:
    return ingest.stdout.split("batch ", 1)[1].split(":", 1)[0]


def test_status_and_results_csv(screened, tmp_path):
    env, _root, ingest = screened
    batch = _batch_id(ingest)
    status = _run(env, "status", batch, "--timeout", "30")
    assert status.returncode == 0 and "500 done, 0 failed, 0 skipped of 500" in status.stdout
    out = tmp_path / "results.csv"
    results = _run(env, "results", batch, "--csv", str(out))
    assert results.returncode == 0, results.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 500 and {row["status"] for row in rows} == {"done"}
    assert all(0.0 <= float(row["p_covid"]) <= 1.0 and row["label"] in ("covid", "normal") for row in rows)
    assert len({row["scan_id"] for row in rows}) == 500
    assert _run(env, "status", "no-such-batch").returncode == 1


def test_html_report_shows_every_overlay_in_headless_chromium(screened, tmp_path):
    env, _root, ingest = screened
    page = tmp_path / "report.html"
    report = _run(env, "report", _batch_id(ingest), "--html", str(page))
    assert report.returncode == 0, report.stderr[-2000:]

    with headless_chromium() as driver:
        driver.get(page.as_uri())
        total, broken, overlays = driver.execute_script(
            "const imgs = [...document.images];"
            "return [imgs.length, imgs.filter(i => !i.complete || i.naturalWidth === 0).length,"
            " imgs.filter(i => i.alt.startsWith('Grad-CAM')).length];"
        )
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
    assert overlays == 500 and total == 1000, (total, overlays)
    assert broken == 0
    shot = cv2.imread(str(screenshot))
    assert shot is not None and shot.shape[0] >= 600 and float(shot.std()) > 20  # a rendered page, not a blank one
