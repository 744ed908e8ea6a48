"""Test helpers: tiny model bundles, encoded synthetic scans, and real worker subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]
LUNGCAM = str(Path(sys.executable).with_name("lungcam"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Screenshots and pages tests keep for a person to look at (git-ignored).
ARTIFACTS = REPO / "test-artifacts"
# The Redis the tests use: 127.0.0.1:6379, or, in a second pytest-xdist process, a server of its own
# (tests/conftest.py starts it), so two modules that use the same database number never meet.
TEST_REDIS_PORT = int(os.environ.get("LUNGCAM_TEST_REDIS_PORT", "6379"))


def redis_url(database: int) -> str:
    """The URL of one database of the test Redis."""
    return f"redis://127.0.0.1:{TEST_REDIS_PORT}/{database}"


@contextmanager
def headless_chromium(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A selenium driver on Debian's chromium + chromium-driver (fails under CI when they are missing)."""
    import pytest

    missing = [
        f"{name} ({package})"
        for name, path, package in (
            ("chromium", CHROMIUM, "chromium"),
            ("chromedriver", CHROMEDRIVER, "chromium-driver"),
        )
        if not Path(path).exists()
    ]
    if missing:
        # Name only what is missing: chromium without its driver is a common half-install.
        message = (
            f"not installed: {' and '.join(missing)} (Debian packages; `python3 run.py test` installs them as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-file-access-from-files",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def make_bundle(dest: Path, arch: str = "resnet50", input_size: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised bundle (no training) for serving tests."""
    import keras

    from shared.bundle import save_bundle
    from shared.domain import CLASS_NAMES
    from shared.imaging import PREPROCESSING
    from shared.zoo import ARCHITECTURES, build_model

    keras.utils.set_random_seed(seed)
    model = build_model(arch, input_size=input_size, weights=None)
    manifest = {
        "name": f"{arch}-test",
        "version": "t1",
        "architecture": arch,
        "input_size": input_size,
        "class_names": list(CLASS_NAMES),
        "preprocessing": PREPROCESSING,
        "gradcam_layer": ARCHITECTURES[arch].gradcam_layer,
        "weights": "none",
    }
    save_bundle(model, manifest, dest)
    return dest


def make_tiny_bundle(dest: Path, input_size: int = 224, name: str = "tiny-test") -> Path:
    """A bundle whose model costs almost nothing (pool, 1x1 conv, dense), so a pipeline's non-model cost shows.

    A worker serving it is ready in about half the time of one serving a 64-pixel ResNet50 (no large
    graph to load and trace), so tests about the pipeline rather than the backbones use it.
    """
    import keras

    from shared.bundle import save_bundle
    from shared.domain import CLASS_NAMES
    from shared.imaging import PREPROCESSING
    from shared.zoo import LOGITS_LAYER

    keras.utils.set_random_seed(0)
    inputs = keras.Input((input_size, input_size, 3))
    pooled = keras.layers.AveragePooling2D(pool_size=input_size // 8)(inputs)
    features = keras.layers.Conv2D(4, 1, activation="relu", name="cam_layer")(pooled)
    logits = keras.layers.Dense(len(CLASS_NAMES), name=LOGITS_LAYER)(keras.layers.GlobalAveragePooling2D()(features))
    model = keras.Model(inputs, keras.layers.Activation("softmax")(logits))
    manifest = {
        "name": name,
        "version": "t1",
        "architecture": "tiny",
        "input_size": input_size,
        "class_names": list(CLASS_NAMES),
        "preprocessing": PREPROCESSING,
        "gradcam_layer": "cam_layer",
        "weights": "none",
    }
    save_bundle(model, manifest, dest)
    return dest


def encode_scan(image: np.ndarray, fmt: str) -> bytes:
    """Encode a uint8 grey image as png, png16, jpeg or dicom bytes."""
    from shared.synthetic import make_dicom

    if fmt == "png":
        return cv2.imencode(".png", image)[1].tobytes()
    if fmt == "png16":
        return cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes()
    if fmt == "jpeg":
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    if fmt == "dicom":
        return make_dicom(image.astype(np.uint16) * 16, bits_stored=12)
    raise ValueError(fmt)


def mixed_scans(count: int, seed: int = 0, size: int = 192) -> dict[str, bytes]:
    """`count` valid scans cycling through PNG (8/16-bit), JPEG and DICOM, keyed by scan id."""
    from shared.synthetic import synthetic_xray

    rng = np.random.default_rng(seed)
    formats = ("png", "jpeg", "dicom", "png16")
    scans = {}
    for index in range(count):
        fmt = formats[index % len(formats)]
        image = synthetic_xray(rng, size, covid=bool(index % 2)).image
        scans[f"scan-{index:03d}-{fmt}"] = encode_scan(image, fmt)
    return scans


def corrupt_scans(seed: int = 0) -> dict[str, bytes]:
    """Three undecodable scans: a truncated PNG, plain text, and a DICOM without pixel data."""
    from shared.synthetic import make_dicom, synthetic_xray

    image = synthetic_xray(np.random.default_rng(seed), 128).image
    png = encode_scan(image, "png")
    return {
        "bad-truncated-png": png[: len(png) // 3],
        "bad-text": b"this is not an x-ray\n" * 10,
        "bad-dicom-no-pixels": make_dicom(image, with_pixels=False),
    }


@dataclass
class WorkerProcess:
    """A real `lungcam worker` subprocess, its log file, its Celery node name and its broker."""

    process: subprocess.Popen
    log_path: Path
    node: str
    broker_url: str

    def log(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until the worker answers a Celery ping: it consumes, and so answers, only once its models are loaded."""
        from celery import Celery

        from worker.runtime import workers_answering

        probe = Celery("probe", broker=self.broker_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
                if workers_answering(probe, hostname=self.node, timeout=0.5):
                    return
                time.sleep(0.3)
        finally:
            probe.close()
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, unacked messages stay unacked."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def start_worker(env: dict[str, str], log_path: Path, *extra: str) -> WorkerProcess:
    """Start `lungcam worker --gpu none` with the given LUNGCAM_* environment (which names its broker)."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    broker_url = full_env.get("LUNGCAM_BROKER_URL")
    assert broker_url, "start_worker needs LUNGCAM_BROKER_URL: readiness is a Celery ping through the broker"
    # A node name of its own, so wait_ready hears this worker, not another one on the same broker.
    node = f"test-{uuid.uuid4().hex[:12]}@{socket.gethostname()}"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [LUNGCAM, "worker", "--gpu", "none", "--loglevel", "INFO", "--hostname", node, *extra],
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    return WorkerProcess(process, log_path, node, broker_url)


def wait_until(predicate, timeout: float, interval: float = 0.5, message: str = "condition") -> None:
    """Poll predicate() until it is truthy or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def empty_schema(url: str) -> str:
    """Drop every table of the database (schema) at url, whatever migrations have added; returns url."""
    engine = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url
    )
    try:
        with engine.begin() as connection:
            tables = sa.inspect(connection).get_table_names()
            if tables:
                connection.execute(
                    sa.text("DROP TABLE IF EXISTS " + ", ".join(f'"{name}"' for name in tables) + " CASCADE")
                )
    finally:
        engine.dispose()
    return url


def insert_scans_at_old_revision(connection: sa.Connection, scan_ids: list[str]) -> None:
    """Scans plus one covid prediction for the first, in raw SQL (the ORM knows only the newest schema)."""
    connection.execute(
        sa.text("INSERT INTO scans (scan_id, source_uri) VALUES (:scan_id, :uri)"),
        [{"scan_id": scan_id, "uri": f"scans/{scan_id}"} for scan_id in scan_ids],
    )
    connection.execute(
        sa.text(
            "INSERT INTO predictions (scan_id, model_name, model_version, label, p_covid) VALUES (:scan_id, 'm', '1', 'covid', 0.9)"
        ),
        {"scan_id": scan_ids[0]},
    )
