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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lungcam` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "loglevel", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
