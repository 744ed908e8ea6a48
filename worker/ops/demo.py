"""`lungcam demo` and `lungcam screen`: the whole system on one machine, started, used and stopped.

Embedded Redis (unless LUNGCAM_BROKER_URL is set), SQLite and a local store (unless configured),
a worker and the API as child processes, one batch screened, a results table and an HTML report.
Without LUNGCAM_MODELS both use the shipped model; `lungcam demo` screens the shipped sample films and
shows the agreement with their true labels. `lungcam demo --synthetic` is the old, self-contained path:
a demonstration model trained on synthetic images, screening synthetic images.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import LungcamError
from shared.settings import Settings
from shared.shipped import SHIPPED_MODEL_NAME, sample_films_dir, shipped_model_dir

if TYPE_CHECKING:
    from worker.ops.ingest import IngestItem
    from worker.ops.model_facts import ModelFacts

DEMO_MODEL_DIR = "models/demo"
SAMPLE_NOTE = (
    "These sample films come from the test split of the shipped model's own sources (the model never fitted on "
    "them): an optimistic, in-distribution figure that says nothing about other hospitals; see docs/model-card.md."
)


class DemoError(LungcamError):
    """The embedded run could not start, or a part of it stopped."""


DEMO_BANNER = (
    "DEMONSTRATION MODEL: trained for a few minutes on synthetic images, not on patients. "
    "Its outputs mean nothing clinically."
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _say(message: str) -> None:
    print(f"lungcam: {message}", file=sys.stderr, flush=True)


def detect_gpu() -> str:
    """'0' when nvidia-smi lists a GPU, else 'none' (no TensorFlow import in this process)."""
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return "none"
        if "GPU 0" in listed:
            return "0"
    return "none"


def ensure_demo_model(settings: Settings) -> str:
    """The demo bundle under the data folder, trained on synthetic images the first time."""
    bundle = settings.resolved_data_dir() / DEMO_MODEL_DIR
    if (bundle / "manifest.json").exists():
        _say(f"using the demonstration model in {bundle}")
        _mark_demonstration(bundle)
        return str(bundle)
    _say("--synthetic: training a demonstration model on synthetic images (a few minutes on two CPU cores)")
    _say(DEMO_BANNER)
    from shared.tensorflow_quiet import import_tensorflow

    import_tensorflow()
    from shared.synthetic import write_synthetic_dataset
    from trainer.train import TrainConfig, train

    data = settings.resolved_data_dir() / "demo" / "training-set"
    if not (data / "manifest.csv").exists():
        write_synthetic_dataset(data, n_per_class=100, size=128, seed=0)
    # The configuration the trainer's tests use: fine-tuned from random weights (no ImageNet download
    # here), small input, Grad-CAM on an 8x8 map; a few minutes on two CPU cores.
    config = TrainConfig(
        arch="densenet121",
        weights="none",
        input_size=64,
        epochs=4,
        batch_size=8,
        freeze_backbone=False,
        gradcam_layer="pool3_relu",
        name="demo-densenet121",
        version="synthetic-1",
    )
    train(config, [str(data)], bundle)
    _mark_demonstration(bundle)
    return str(bundle)


def _mark_demonstration(bundle: Path) -> None:
    """Say in the manifest that this is a demonstration model, so workers record it and reports show a banner."""
    import json

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    if manifest.get("demonstration") is not True:
        # Only the manifest changes; the model file and its sha256 stay as they are.
        path.write_text(json.dumps({**manifest, "demonstration": True}, indent=2, sort_keys=True))


def demo_images(settings: Settings, count: int) -> Path:
    """A folder of synthetic X-rays to screen (PNG and DICOM), made once."""
    import cv2
    import numpy as np

    from shared.synthetic import make_dicom, synthetic_xray

    folder = settings.resolved_data_dir() / "demo" / f"screening-set-{count}"
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    for index in range(count):
        xray = synthetic_xray(rng, 256, covid=bool(index % 2))
        if index % 4 == 3:
            (folder / f"demo-{index:03d}.dcm").write_bytes(
                make_dicom(xray.image.astype(np.uint16) * 16, bits_stored=12)
            )
        else:
            cv2.imwrite(str(folder / f"demo-{index:03d}.png"), xray.image)
    return folder


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen, name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop in 60 s; killing it")
            process.kill()
            process.wait()


def last_error_line(log_path: Path) -> str:
    """The line of a child's log that says why it stopped: its `lungcam: error:` line, else the last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if line.startswith("lungcam: error:") or (line.startswith(("lungcam.", "ERROR")) and "rror" in line):
            return line
    # A traceback ends with the exception line.
    return lines[-1] if lines else "(empty log)"


@dataclass
class _Child:
    """A started worker or API process and its log."""

    name: str
    process: subprocess.Popen
    log: Path

    def check_alive(self) -> None:
        """Raise DemoError with the child's own last error line if it has exited."""
        if self.process.poll() is not None:
            raise DemoError(
                f"the {self.name} exited with code {self.process.returncode}: {last_error_line(self.log)} "
                f"(full log: {self.log})"
            )


def _wait_until_ready(base_url: str, worker: _Child, api: _Child, n_models: int, timeout: float = 300.0) -> None:
    """Wait for the API's /readyz and the worker's Celery "ready", saying what is awaited every few seconds."""
    import httpx

    started = time.monotonic()
    said = 0.0
    api_ready = worker_ready = False
    while True:
        elapsed = time.monotonic() - started
        worker.check_alive()
        api.check_alive()
        if not api_ready:
            try:
                api_ready = httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
        if not worker_ready:
            log = worker.log.read_text(errors="replace")
            worker_ready = " ready." in log
            loaded = log.count("ready (warm-up")
        if api_ready and worker_ready:
            _say(f"worker and API ready after {elapsed:.0f} s")
            return
        if elapsed > timeout:
            raise DemoError(f"not ready after {timeout:.0f} s (logs: {worker.log.parent})")
        if elapsed - said >= 5.0:
            waiting = []
            if not worker_ready:
                stage = "starting TensorFlow" if loaded == 0 and "model" not in log else "loading and warming up models"
                waiting.append(f"the worker ({stage}: {loaded}/{n_models} models ready)")
            if not api_ready:
                waiting.append("the API (broker, database and store checks)")
            _say(f"waiting for {' and '.join(waiting)}: {elapsed:.0f} s")
            said = elapsed
        time.sleep(0.5)


def _precheck(settings: Settings, models: str, folder: Path) -> tuple[list[IngestItem], list[dict]]:
    """Everything that can be checked before a process starts or a scan is queued: images, models, database, store.

    Returns the images to queue and the models' manifests.
    """
    from shared.bundle import read_manifest
    from shared.engine import migrate
    from shared.store import store_from_settings
    from worker.ops.ingest import survey

    if not folder.is_dir():
        raise DemoError(f"no folder {folder}")
    found = survey(str(folder), settings)
    items = found.items
    if not items:
        raise DemoError(f"no images (PNG, JPEG, TIFF, DICOM) in {folder} ({found.summary()})")
    _say(f"{folder}: {found.summary()}")
    manifests = [
        read_manifest(uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)  # BundleError: one line
        for uri in Settings.csv_list(models)
    ]
    for manifest in manifests:
        _check_named_backbone(manifest)
    # The embedded demo is one of the places that migrate (with `lungcam migrate` and the deploy job):
    # the worker and the API only check the schema. This also proves the database is reachable.
    migrate(settings.resolved_database_url())
    next(iter(store_from_settings(settings).list("readyz-probe/")), None)
    return items, manifests


def _check_named_backbone(manifest: dict) -> None:
    """Refuse now, in one line, a bundle whose frozen backbone's package is not installed (the worker would, later)."""
    from shared.bundle import named_backbone
    from shared.pretrained import PACKAGED_WEIGHTS, PretrainedWeightsError, packaged_weights_path

    backbone = named_backbone(manifest)
    weights = PACKAGED_WEIGHTS.get(backbone["weights"]) if backbone else None
    if weights is not None:
        try:
            packaged_weights_path(weights)
        except PretrainedWeightsError as exc:
            raise DemoError(f"model {manifest.get('name', '?')}: {exc}") from exc


def choose_models_and_folder(
    settings: Settings, images: Path | None, *, synthetic: bool, count: int
) -> tuple[str, Path]:
    """The models (comma-separated URIs) and the folder a run screens.

    --synthetic: the demonstration model (trained the first time) on synthetic images, or on --images.
    Otherwise LUNGCAM_MODELS, else the shipped model; the given folder, else the shipped sample films.
    """
    if synthetic:
        return ensure_demo_model(settings), images if images is not None else demo_images(settings, count)
    models = settings.models
    if not settings.model_uris():
        models = str(shipped_model_dir())
        _say(f"no model configured (LUNGCAM_MODELS): using the shipped model {SHIPPED_MODEL_NAME} ({models})")
    return models, images if images is not None else sample_films_dir()


def describe_models(manifests: list[dict]) -> list[ModelFacts]:
    """Print what each model is (stdout) and, before anything is screened, its warnings (stderr); returns the facts."""
    from worker.ops.model_facts import model_facts

    facts = [model_facts(manifest) for manifest in manifests]
    for fact in facts:
        print("\n".join(fact.lines()) + "\n", flush=True)
    for fact in facts:
        for warning in fact.warnings:
            _say(f"WARNING: {warning}")
    return facts


def screen(
    images: Path | None, *, gpu: str, count: int, timeout: float, all_models: bool = False, synthetic: bool = False
) -> int:
    """Start broker (if embedded), worker and API; screen one folder; print results; stop everything."""
    import httpx
    from tqdm import tqdm

    from shared.domain import FINISHED_STATUSES
    from shared.embedded_redis import stop_embedded_redis
    from shared.engine import make_engine, make_session_factory
    from shared.queueing import broker_url_for, make_app
    from shared.results import batch_model_keys, demonstration_keys, get_batch_progress, list_batch_scans
    from shared.settings import get_settings
    from shared.sources import SourceFetcher
    from shared.store import store_from_settings
    from worker.ops import exit_codes
    from worker.ops.ingest import ingest
    from worker.ops.report import write_report
    from worker.ops.tables import TABLE_COLUMNS, format_table, result_rows
    from worker.ops.truth import agreement, true_labels

    settings = get_settings()
    data_dir = settings.resolved_data_dir()
    models, folder = choose_models_and_folder(settings, images, synthetic=synthetic, count=count)
    items, manifests = _precheck(settings, models, folder)
    n_models = len(Settings.csv_list(models))
    facts = describe_models(manifests)
    truth = true_labels(folder, items)
    if truth:
        _say(
            f"true labels for {len(truth)} of {len(items)} image(s) (from {folder.name}'s manifest.csv or "
            "covid/ normal/ folders): the table shows them and the agreement"
        )

    with ExitStack() as cleanup:
        broker = broker_url_for(settings)
        if not settings.broker_url:
            cleanup.callback(stop_embedded_redis)
            _say(f"embedded Redis running ({broker})")
        token = settings.api_token.get_secret_value() if settings.api_token else secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "LUNGCAM_BROKER_URL": broker,
            "LUNGCAM_MODELS": models,
            "LUNGCAM_API_TOKEN": token,
            "LUNGCAM_DATA_DIR": str(data_dir),
        }
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)
        worker = _Child("worker", _start(["worker", "--gpu", gpu], env, logs / "worker.log"), logs / "worker.log")
        cleanup.callback(_stop, worker.process, "worker")
        port = _free_port()
        api_args = ["api", "--port", str(port), "--loglevel", "WARNING"]
        api_env = {**env, "LUNGCAM_PUBLIC_URL": settings.public_url or f"http://127.0.0.1:{port}"}
        api = _Child("API", _start(api_args, api_env, logs / "api.log"), logs / "api.log")
        cleanup.callback(_stop, api.process, "API")
        base_url = f"http://127.0.0.1:{port}"
        _say(f"starting a worker (--gpu {gpu}, {n_models} model(s)) and the API ({base_url}/docs); logs in {logs}")
        _wait_until_ready(base_url, worker, api, n_models)

        runtime = Settings(**{**settings.model_dump(), "broker_url": broker, "models": models})
        engine = make_engine(runtime.resolved_database_url())
        cleanup.callback(engine.dispose)
        sessions = make_session_factory(engine)
        store = store_from_settings(runtime)
        with tqdm(total=len(items), desc="queueing", unit="scan", file=sys.stderr) as bar:
            batch_id, _ = ingest(
                items,
                store=store,
                sessions=sessions,
                app=make_app(runtime, broker_url=broker),
                batch_name=folder.name,
                rescreen=True,
                on_progress=bar.update,
            )
        headers = {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + timeout
        with tqdm(total=len(items), desc="screening", unit="scan", file=sys.stderr) as bar:
            while True:
                worker.check_alive()
                progress = httpx.get(f"{base_url}/v1/batches/{batch_id}", headers=headers, timeout=10).json()
                finished = sum(progress["counts"].get(status, 0) for status in FINISHED_STATUSES)
                bar.update(finished - bar.n)
                if progress["complete"]:
                    break
                if time.monotonic() > deadline:
                    raise DemoError(f"batch {batch_id} not finished after {timeout:.0f} s")
                time.sleep(0.5)

        with sessions() as session:
            batch_progress = get_batch_progress(session, batch_id)
            scans = list_batch_scans(session, batch_id, all_models=all_models)
            current, demonstration = batch_model_keys(session, batch_id), demonstration_keys(session, batch_id)
        assert batch_progress is not None  # just created
        on_sample = folder.resolve() == sample_films_dir().resolve()
        rows, columns = result_rows(scans, current), list(TABLE_COLUMNS)
        agreements = agreement(scans, truth, current or None) if truth else []
        if truth:
            for row in rows:
                row["true_label"] = truth.get(row["scan_id"], "")
            columns.insert(columns.index("label") + 1 if "label" in columns else len(columns), "true_label")
        print(format_table(rows, columns))
        report = write_report(
            data_dir / "reports" / f"{batch_id}.html",
            batch_progress,
            scans,
            store=store,
            fetcher=SourceFetcher(store, runtime),
            current_models=current or None,
            demonstration_models=demonstration,
            model_facts=facts,
            true_labels=truth,
            agreements=agreements,
            agreement_note=SAMPLE_NOTE if on_sample else None,
        )
        counts = batch_progress.counts
        print(
            f"\n{counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped "
            f"of {batch_progress.total} (batch {batch_id})"
        )
        for entry in agreements:
            print(entry.line())
        if agreements and on_sample:
            print(f"({SAMPLE_NOTE})")
        print(f"HTML report: {report.resolve()}")
    _say("worker, API and embedded services stopped")
    if counts["failed"]:
        _say(f"{counts['failed']} scan(s) failed (reasons in the table); exit code {exit_codes.SOME_FAILED}")
        return exit_codes.SOME_FAILED
    return exit_codes.OK
