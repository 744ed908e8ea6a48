"""`lungcam ingest --wait` / `status` say what they wait for when nothing is running, with elapsed time."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from helpers import LUNGCAM, redis_url

from shared.synthetic import synthetic_xray
from worker import runtime

pytestmark = pytest.mark.slow  # waits ~20 s on purpose

REDIS_URL = os.environ.get("LUNGCAM_TEST_WAITING_REDIS_URL", redis_url(0))


def test_status_without_a_worker_says_it_is_waiting_for_one_and_times_out(tmp_path: Path):
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        cv2.imwrite(str(folder / f"x{index}.png"), synthetic_xray(np.random.default_rng(index), 64).image)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")},
        "LUNGCAM_DATA_DIR": str(tmp_path / "data"),
        "LUNGCAM_BROKER_URL": REDIS_URL,
    }
    run = lambda *args: subprocess.run([LUNGCAM, *args], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("migrate").returncode == 0
    try:
        ingest = run("ingest", str(folder), "--wait", "--timeout", "20")
    finally:
        client.flushdb()
    assert ingest.returncode == runtime.TIMEOUT, ingest.stderr[-2000:]
    assert "waiting for a worker: 3 queued, none running for" in ingest.stderr
    assert "not finished after 20 s" in ingest.stderr


@pytest.mark.parametrize(
    "variable, value",
    [("LUNGCAM_DATABASE_URL", "not-a-url"), ("LUNGCAM_BATCH_SIZE", "many")],
)
def test_a_bad_setting_is_one_line_naming_its_variable(tmp_path: Path, variable: str, value: str):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")},
        "LUNGCAM_DATA_DIR": str(tmp_path / "data"),
        variable: value,
    }
    result = subprocess.run([LUNGCAM, "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == runtime.ERROR
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("lungcam: error:") and variable in line and "Traceback" not in result.stderr
