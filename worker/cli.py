"""`lungcam`: the operator's command line (worker, and the commands later issues add)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

log = logging.getLogger("lungcam")


def _run_worker(args: argparse.Namespace) -> int:
    from worker.gpu import configure_tensorflow, pin_gpu

    # Order matters: the GPU is chosen before anything imports TensorFlow.
    pinned = pin_gpu(args.gpu)
    configure_tensorflow()
    from shared.settings import get_settings
    from worker import tasks
    from worker.classifier import classifier_from_settings

    settings = get_settings()
    # Models load here, in the main process, before consuming starts: loading them in a pool
    # initialiser (worker_process_init) can outlast the pool's start-up timeout and kill the worker.
    classifier = classifier_from_settings(settings)
    tasks.install_classifier(classifier)
    log.info("worker on CUDA_VISIBLE_DEVICES=%s serving %d model(s)", pinned, len(classifier.models))
    worker = tasks.app.Worker(
        queues=args.queues.split(","),
        loglevel=args.loglevel,
        hostname=args.hostname or f"lungcam-gpu{args.gpu}@{socket.gethostname()}",
        without_gossip=True,
        without_mingle=True,
    )
    try:
        worker.start()
    finally:
        classifier.close()
    return worker.exitcode or 0


def _services():
    """Settings, session factory (schema migrated), store and Celery app, for operator commands."""
    from shared import db
    from shared.settings import get_settings
    from shared.store import store_from_settings
    from worker.celery_app import make_app

    settings = get_settings()
    engine = db.make_engine(settings.resolved_database_url())
    db.migrate(engine)
    return settings, db.make_session_factory(engine), store_from_settings(settings), make_app(settings)


def _progress_bar(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="scan", file=sys.stderr, dynamic_ncols=True)


def _run_ingest(args: argparse.Namespace) -> int:
    from worker.ingest import discover, ingest

    settings, sessions, store, app = _services()
    items = discover(args.source, settings)
    if not items:
        print(f"lungcam: no images found in {args.source}", file=sys.stderr)
        return 1
    name = args.name or args.source.rstrip("/").rsplit("/", 1)[-1]
    with _progress_bar(len(items), "queueing") as bar:
        batch_id, result = ingest(
            items, store=store, sessions=sessions, app=app, batch_name=name,
            reference_local=args.reference, force=args.force, on_progress=bar.update,
        )
    print(f"batch {batch_id}: {len(result.queued)} queued, {len(result.already)} already known")
    print(batch_id)
    if args.wait:
        return _follow(sessions, batch_id, args.timeout)
    return 0


def _follow(sessions, batch_id: str, timeout: float | None) -> int:
    """Show a progress bar until the batch has no queued or running scans."""
    import time

    from worker.results import get_batch_progress

    with sessions() as session:
        progress = get_batch_progress(session, batch_id)
    if progress is None:
        print(f"lungcam: no batch {batch_id}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout if timeout else None
    with _progress_bar(progress.total, "screening") as bar:
        while True:
            with sessions() as session:
                progress = get_batch_progress(session, batch_id)
            bar.n = progress.finished
            bar.set_postfix(done=progress.counts["done"], failed=progress.counts["failed"], refresh=False)
            bar.refresh()
            if progress.complete:
                break
            if deadline and time.monotonic() > deadline:
                print(f"lungcam: batch {batch_id} not finished after {timeout:.0f} s", file=sys.stderr)
                return 3
            time.sleep(1.0)
    print(f"batch {batch_id}: {progress.counts['done']} done, {progress.counts['failed']} failed of {progress.total}")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    _settings, sessions, _store, _app = _services()
    return _follow(sessions, args.batch, args.timeout)


RESULT_COLUMNS = ("scan_id", "status", "error", "model_name", "model_version", "label", "p_covid", "overlay_key", "finished_at")


def result_rows(scans) -> list[dict]:
    """One row per scan and model (one row with empty model fields for scans without predictions)."""
    rows = []
    for scan in scans:
        base = {"scan_id": scan.scan_id, "status": scan.status, "error": scan.error or "",
                "finished_at": scan.finished_at.isoformat() if scan.finished_at else ""}
        for p in scan.predictions or [None]:
            rows.append({**base, **({"model_name": p.model_name, "model_version": p.model_version, "label": p.label,
                                     "p_covid": f"{p.p_covid:.4f}", "overlay_key": p.overlay_key or ""} if p else {})})
    return rows


def _run_results(args: argparse.Namespace) -> int:
    import csv

    from worker.results import list_batch_scans

    _settings, sessions, _store, _app = _services()
    with sessions() as session:
        rows = result_rows(list_batch_scans(session, args.batch))
    if not rows:
        print(f"lungcam: no scans in batch {args.batch}", file=sys.stderr)
        return 1
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, RESULT_COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} rows written to {args.csv}")
    else:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict], columns=("scan_id", "status", "model_name", "label", "p_covid", "error")) -> str:
    """A plain-text table of result rows."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.report import write_report
    from worker.results import get_batch_progress, list_batch_scans
    from worker.sources import SourceFetcher

    settings, sessions, store, _app = _services()
    with sessions() as session:
        progress = get_batch_progress(session, args.batch)
        scans = list_batch_scans(session, args.batch) if progress else []
    if progress is None:
        print(f"lungcam: no batch {args.batch}", file=sys.stderr)
        return 1
    with _progress_bar(len(scans), "report") as bar:
        path = write_report(Path(args.html), progress, scans, store=store, fetcher=SourceFetcher(store, settings), on_progress=bar.update)
    print(f"report: {path.resolve()}")
    return 0


def _run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from worker.api.main import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.loglevel.lower())
    return 0


def _run_migrate(args: argparse.Namespace) -> int:
    from shared import db
    from shared.settings import get_settings

    url = get_settings().resolved_database_url()
    db.migrate(url)
    print("database schema is at the latest migration")
    return 0


def _run_requeue(args: argparse.Namespace) -> int:
    from worker.queueing import requeue_stale

    _settings, sessions, _store, app = _services()
    ids = requeue_stale(sessions, app, older_than_s=args.older_than)
    print(f"re-published {len(ids)} scan(s) still queued after {args.older_than:.0f} s")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.demo import detect_gpu, screen

    gpu = detect_gpu() if args.gpu == "auto" else args.gpu
    images = Path(args.images) if getattr(args, "images", None) else None
    return screen(images, demo=args.command == "demo", gpu=gpu, count=args.count, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `lungcam` command."""
    parser = argparse.ArgumentParser(prog="lungcam", description="Chest X-ray screening: workers, ingestion and results.")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a Celery worker that owns one GPU (or the CPU)")
    worker.add_argument("--gpu", default="none", help="GPU index this process owns, or 'none' for CPU (default)")
    worker.add_argument("--queues", default="stat,routine", help="queues to consume, in priority order")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", default=None, help="Celery node name (default lungcam-gpuN@host)")
    worker.set_defaults(handler=_run_worker)

    ingest = commands.add_parser("ingest", help="queue every image of a folder, s3://bucket/prefix or .csv list as one batch")
    ingest.add_argument("source", help="folder, s3://bucket/prefix, or a .csv with a path (or uri) column")
    ingest.add_argument("--name", help="batch name (default: the folder or prefix name)")
    ingest.add_argument("--reference", action="store_true", help="reference local files in place instead of uploading (workers must see the same paths)")
    ingest.add_argument("--force", action="store_true", help="re-queue scans that already exist")
    ingest.add_argument("--wait", action="store_true", help="then follow the batch until it ends")
    ingest.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    ingest.set_defaults(handler=_run_ingest)

    status = commands.add_parser("status", help="follow a batch with a progress bar until it ends")
    status.add_argument("batch")
    status.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
    status.set_defaults(handler=_run_status)

    results = commands.add_parser("results", help="print a batch's results, or write them as CSV")
    results.add_argument("batch")
    results.add_argument("--csv", help="write to this CSV file")
    results.set_defaults(handler=_run_results)

    report = commands.add_parser("report", help="write an HTML page with each scan's results and overlays")
    report.add_argument("batch")
    report.add_argument("--html", required=True, help="output file; thumbnails go into a sibling _files folder")
    report.set_defaults(handler=_run_report)

    api = commands.add_parser("api", help="run the HTTP ingestion API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--loglevel", default="INFO")
    api.set_defaults(handler=_run_api)

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema (workers and the API also do this at start)")
    migrate.set_defaults(handler=_run_migrate)

    requeue = commands.add_parser("requeue", help="re-publish scans stuck in 'queued' (e.g. after a broker was wiped)")
    requeue.add_argument("--older-than", type=float, default=3600.0, help="seconds since submission (default 3600)")
    requeue.set_defaults(handler=_run_requeue)

    for name, text in (("demo", "run everything on this machine and screen synthetic images (or --images DIR)"),
                       ("screen", "run everything on this machine and screen a folder with the configured models")):
        command = commands.add_parser(name, help=text)
        if name == "screen":
            command.add_argument("images", help="folder of PNG, JPEG or DICOM files")
        else:
            command.add_argument("--images", help="folder to screen instead of synthetic images")
        command.add_argument("--gpu", default="auto", help="GPU index for the worker, 'none', or 'auto' (default)")
        command.add_argument("--count", type=int, default=24, help="synthetic images to screen (demo without --images)")
        command.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
        command.set_defaults(handler=_run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lungcam` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "loglevel", "WARNING"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - an operator gets one line, not a traceback
        if os.environ.get("LUNGCAM_DEBUG"):
            raise
        print(f"lungcam: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
