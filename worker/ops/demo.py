"""`lungcam demo` and `lungcam screen`: the whole system on one machine, started, used and stopped.

Embedded Redis (unless LUNGCAM_BROKER_URL is set), SQLite and a local store (unless configured),
a worker and the API as child processes, one batch screened, a results table and an HTML report.
Without LUNGCAM_MODELS both use the shipped model; `lungcam demo` screens the shipped sample films and
shows the agreement with their true labels. `lungcam demo --synthetic` is the old, self-contained path:
a demonstration model trained on synthetic images, screening synthetic images.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, cast

from shared.errors import LungcamError
from shared.settings import Settings, child_environment
from shared.shipped import SHIPPED_MODEL_NAME, sample_films_dir, shipped_model_dir
from worker import runtime

if TYPE_CHECKING:
    from celery import Celery

    from shared.domain import Manifest
    from shared.models import Scan
    from shared.results import BatchProgress, ModelKey
    from worker.ops.ingest import IngestItem
    from worker.ops.model_facts import ModelFacts
    from worker.ops.truth import Agreement

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
        return cast(int, sock.getsockname()[1])


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
    from shared.bundle import read_manifest, update_manifest

    if read_manifest(bundle).get("demonstration") is not True:
        # Only the manifest changes; the model file and its sha256 stay as they are.
        update_manifest(bundle, {"demonstration": True})


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


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop in 60 s; killing it")
            process.kill()
            process.wait()


CLI_ERROR_PREFIX = "lungcam: error:"  # how `lungcam` states an expected error in one line
ERROR_LEVELS = frozenset({"ERROR", "CRITICAL"})


def is_error_line(line: str) -> bool:
    """Whether a child's log line states an error: `lungcam: error: ...`, or a log record at ERROR or CRITICAL.

    Records are recognised by their level among the first three words, in the forms the children write:
    "<date> <time> ERROR <logger>: ..." (lungcam), "[<date> <time>: ERROR/MainProcess] ..." (Celery) and
    "ERROR:    ..." (uvicorn).
    """
    if line.startswith(CLI_ERROR_PREFIX):
        return True
    return any(word.strip("[]:").split("/")[0] in ERROR_LEVELS for word in line.split(maxsplit=3)[:3])


def last_error_line(log_path: Path) -> str:
    """The line of a child's log that says why it stopped: its `lungcam: error:` line, else the last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if is_error_line(line):
            return line
    # A traceback ends with the exception line.
    return lines[-1] if lines else "(empty log)"


@dataclass
class _Child:
    """A started worker or API process and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    node: str | None = None  # a worker's Celery node name, which answers pings

    def check_alive(self) -> None:
        """Raise DemoError with the child's own last error line if it has exited."""
        if self.process.poll() is not None:
            raise DemoError(
                f"the {self.name} exited with code {self.process.returncode}: {last_error_line(self.log)} "
                f"(full log: {self.log})"
            )


def _worker_progress(worker: _Child, n_models: int) -> str:
    """What the worker is doing, from its log: starting TensorFlow, or how many models are warm."""
    log = worker.log.read_text(errors="replace")
    loaded = log.count("ready (warm-up")
    stage = "starting TensorFlow" if loaded == 0 and "model" not in log else "loading and warming up models"
    return f"{stage}: {loaded}/{n_models} models ready"


def _api_ready(base_url: str) -> bool:
    """Whether the API answers /readyz with 200 (broker, database and store reachable)."""
    import httpx

    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until_ready(
    base_url: str, worker: _Child, api: _Child, app: Celery, n_models: int, timeout: float = 300.0
) -> None:
    """Wait for the API's /readyz and a Celery ping answer from the worker, saying what is awaited every few seconds.

    The worker answers pings once its models are loaded: it starts consuming only then.
    """
    started = time.monotonic()
    said = 0.0
    api_ready = worker_ready = False
    while True:
        elapsed = time.monotonic() - started
        worker.check_alive()
        api.check_alive()
        api_ready = api_ready or _api_ready(base_url)
        worker_ready = worker_ready or bool(runtime.workers_answering(app, hostname=worker.node, timeout=0.5))
        if api_ready and worker_ready:
            _say(f"worker and API ready after {elapsed:.0f} s")
            return
        if elapsed > timeout:
            raise DemoError(f"not ready after {timeout:.0f} s (logs: {worker.log.parent})")
        if elapsed - said >= 5.0:
            waiting = [] if worker_ready else [f"the worker ({_worker_progress(worker, n_models)})"]
            if not api_ready:
                waiting.append("the API (broker, database and store checks)")
            _say(f"waiting for {' and '.join(waiting)}: {elapsed:.0f} s")
            said = elapsed
        time.sleep(0.5)


def _precheck(settings: Settings, models: str, folder: Path) -> tuple[list[IngestItem], list[Manifest]]:
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


def _check_named_backbone(manifest: Manifest) -> None:
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


def describe_models(manifests: list[Manifest]) -> list[ModelFacts]:
    """Print what each model is (stdout) and, before anything is screened, its warnings (stderr); returns the facts."""
    from worker.ops.model_facts import model_facts

    facts = [model_facts(manifest) for manifest in manifests]
    for fact in facts:
        print("\n".join(fact.lines()) + "\n", flush=True)
    for fact in facts:
        for warning in fact.warnings:
            _say(f"WARNING: {warning}")
    return facts


@dataclass
class _Started:
    """The worker and API a run started, what they were given, and the settings to reach them."""

    settings: Settings
    token: str
    base_url: str
    worker: _Child
    api: _Child

    def check_alive(self) -> None:
        """Raise DemoError when the worker or the API has exited."""
        self.worker.check_alive()
        self.api.check_alive()


def _start_children(settings: Settings, models: str, gpu: str, cleanup: ExitStack) -> _Started:
    """Start the broker (if embedded), a worker and the API; each is stopped when cleanup closes."""
    from shared.embedded_redis import stop_embedded_redis
    from shared.queueing import broker_url_for

    data_dir = settings.resolved_data_dir()
    broker = broker_url_for(settings)
    if not settings.broker_url:
        cleanup.callback(stop_embedded_redis)
        _say(f"embedded Redis running ({broker})")
    token = settings.api_token.get_secret_value() if settings.api_token else secrets.token_urlsafe(24)
    env = child_environment(broker_url=broker, models=models, api_token=token, data_dir=str(data_dir))
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    # A name of its own, so readiness is this worker's answer to a ping, not another's on the same broker.
    node = f"lungcam-demo-{secrets.token_hex(4)}@{socket.gethostname()}"
    worker_args = ["worker", "--gpu", gpu, "--hostname", node]
    worker = _Child("worker", _start(worker_args, env, logs / "worker.log"), logs / "worker.log", node)
    cleanup.callback(_stop, worker.process, "worker")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    api_args = ["api", "--port", str(port), "--loglevel", "WARNING"]
    api_env = {**env, **child_environment(public_url=settings.public_url or base_url)}
    api = _Child("API", _start(api_args, api_env, logs / "api.log"), logs / "api.log")
    cleanup.callback(_stop, api.process, "API")
    n_models = len(Settings.csv_list(models))
    _say(f"starting a worker (--gpu {gpu}, {n_models} model(s)) and the API ({base_url}/docs); logs in {logs}")
    return _Started(settings.model_copy(update={"broker_url": broker, "models": models}), token, base_url, worker, api)


def _queue(items: list[IngestItem], folder: Path, services: runtime.Services) -> str:
    """Queue the folder's images as one batch (screened again if seen before); returns its id."""
    from worker.ops.ingest import ingest

    with runtime.progress_bar(len(items), "queueing") as bar:
        batch_id, _ = ingest(
            items,
            store=services.store,
            sessions=services.sessions,
            app=services.celery(),
            batch_name=folder.name,
            rescreen=True,
            on_progress=bar.update,
        )
    return batch_id


@dataclass
class _Screening:
    """What a run screened and what it knows about it: the folder, its true labels and the models' facts."""

    folder: Path
    truth: dict[str, str]
    facts: list[ModelFacts]
    all_models: bool

    @property
    def on_sample_films(self) -> bool:
        """Whether the folder is the shipped sample films (their agreement gets SAMPLE_NOTE)."""
        return self.folder.resolve() == sample_films_dir().resolve()


def _print_table(scans: list[Scan], current: list[ModelKey], screening: _Screening) -> list[Agreement]:
    """Print the results table (with the true labels when known); returns the agreement with them."""
    from worker.ops.tables import TABLE_COLUMNS, format_table, result_rows
    from worker.ops.truth import agreement

    truth = screening.truth
    rows, columns = result_rows(scans, current), list(TABLE_COLUMNS)
    if truth:
        for row in rows:
            row["true_label"] = truth.get(row["scan_id"], "")
        columns.insert(columns.index("label") + 1 if "label" in columns else len(columns), "true_label")
    print(format_table(rows, columns))
    return agreement(scans, truth, current or None) if truth else []


def _report(services: runtime.Services, batch_id: str, screening: _Screening) -> BatchProgress:
    """Print the table and the summary, write the HTML report; returns the batch's final progress."""
    from shared.results import batch_model_keys, demonstration_keys, get_batch_progress, list_batch_scans
    from shared.sources import SourceFetcher
    from worker.ops.report import write_report

    with services.sessions() as session:
        progress = get_batch_progress(session, batch_id)
        scans = list_batch_scans(session, batch_id, all_models=screening.all_models)
        current, demonstration = batch_model_keys(session, batch_id), demonstration_keys(session, batch_id)
    assert progress is not None  # just created
    agreements = _print_table(scans, current, screening)
    report = write_report(
        services.settings.resolved_data_dir() / "reports" / f"{batch_id}.html",
        progress,
        scans,
        store=services.store,
        fetcher=SourceFetcher(services.store, services.settings),
        current_models=current or None,
        demonstration_models=demonstration,
        model_facts=screening.facts,
        true_labels=screening.truth,
        agreements=agreements,
        agreement_note=SAMPLE_NOTE if screening.on_sample_films else None,
    )
    counts = progress.counts
    print(
        f"\n{counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped "
        f"of {progress.total} (batch {batch_id})"
    )
    for entry in agreements:
        print(entry.line())
    if agreements and screening.on_sample_films:
        print(f"({SAMPLE_NOTE})")
    print(f"HTML report: {report.resolve()}")
    return progress


def _announce_true_labels(folder: Path, items: list[IngestItem]) -> dict[str, str]:
    """The folder's true labels (manifest.csv or covid/ normal/ folders), said on stderr when there are any."""
    from worker.ops.truth import true_labels

    truth = true_labels(folder, items)
    if truth:
        _say(
            f"true labels for {len(truth)} of {len(items)} image(s) (from {folder.name}'s manifest.csv or "
            "covid/ normal/ folders): the table shows them and the agreement"
        )
    return truth


def screen(
    images: Path | None, *, gpu: str, count: int, timeout: float, all_models: bool = False, synthetic: bool = False
) -> int:
    """Start broker (if embedded), worker and API; screen one folder; print results; stop everything."""
    from shared.settings import get_settings

    settings = get_settings()
    models, folder = choose_models_and_folder(settings, images, synthetic=synthetic, count=count)
    items, manifests = _precheck(settings, models, folder)
    screening = _Screening(folder, {}, describe_models(manifests), all_models)
    screening.truth = _announce_true_labels(folder, items)
    with ExitStack() as cleanup:
        started = _start_children(settings, models, gpu, cleanup)
        services = cleanup.enter_context(runtime.running_services(started.settings))
        n_models = len(Settings.csv_list(models))
        _wait_until_ready(started.base_url, started.worker, started.api, services.celery(), n_models)
        batch_id = _queue(items, folder, services)
        if runtime.wait_for_batch(services.sessions, batch_id, timeout, check=started.check_alive, poll_s=0.5) is None:
            raise DemoError(f"batch {batch_id} not finished after {timeout:.0f} s")
        progress = _report(services, batch_id, screening)
    _say("worker, API and embedded services stopped")
    failed = progress.counts.get("failed", 0)
    if failed:
        _say(f"{failed} scan(s) failed (reasons in the table); exit code {runtime.SOME_FAILED}")
    return runtime.batch_exit_code(progress)
