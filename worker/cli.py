"""`lungcam`: one command line for every program; each subcommand imports only what it runs.

`lungcam worker` runs the consumer (`worker.consumer`), `lungcam api` the HTTP API (`worker.api`), and
the rest are operator tools (`worker.ops`). Nothing here imports TensorFlow, so the API image (which
has none) runs `lungcam api` and the operator commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("lungcam")


def _run_worker(args: argparse.Namespace) -> int:
    from worker.consumer.main import run_worker

    return run_worker(args.gpu, args.queues.split(","), args.loglevel, args.hostname)


def _run_api(args: argparse.Namespace) -> int:
    from worker.api.main import serve

    return serve(args.host, args.port, args.loglevel)


def _run_ingest(args: argparse.Namespace) -> int:
    """`lungcam ingest`: dicomweb+ sources are pulled by the PACS program, everything else by the operator tools."""
    if args.source.startswith("dicomweb+"):
        from worker.pacs.commands import run_dicomweb_ingest

        return run_dicomweb_ingest(args)
    from worker import runtime

    if args.filter:
        print("lungcam: error: --filter applies to dicomweb+http(s):// sources only", file=sys.stderr)
        return runtime.ERROR
    from worker.ops.commands import run_ingest

    return run_ingest(args)


def _pacs(name: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports worker.pacs.commands only when the subcommand runs."""

    def handler(args: argparse.Namespace) -> int:
        from worker.pacs import commands

        command: Callable[[argparse.Namespace], int] = getattr(commands, name)
        return command(args)

    return handler


def _ops(name: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports worker.ops.commands only when the subcommand runs."""

    def handler(args: argparse.Namespace) -> int:
        from worker.ops import commands

        command: Callable[[argparse.Namespace], int] = getattr(commands, name)
        return command(args)

    return handler


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Help that states each option's default, except the empty ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `lungcam` command."""
    parser = argparse.ArgumentParser(
        prog="lungcam",
        description="Chest X-ray screening: workers, ingestion and results.",
        epilog="exit codes: 0 done; 1 no such batch or nothing to do; 2 error (one line on stderr); "
        "3 --timeout passed; 4 finished, but some scans failed (see `lungcam results`)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show everything, including TensorFlow's CUDA start-up messages on machines without a GPU",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a Celery worker that owns one GPU (or the CPU)")
    worker.add_argument("--gpu", default="none", help="GPU index this process owns, or 'none' for CPU (default)")
    worker.add_argument("--queues", default="stat,routine", help="queues to consume, in priority order")
    worker.add_argument("--loglevel", default="INFO", help="DEBUG, INFO (default), WARNING or ERROR")
    worker.add_argument("--hostname", default=None, help="Celery node name (default lungcam-gpuN@host)")
    worker.set_defaults(handler=_run_worker)

    ingest = commands.add_parser(
        "ingest", help="queue every image of a folder, s3://bucket/prefix, .csv list or DICOMweb archive as one batch"
    )
    ingest.add_argument(
        "source", help="folder, s3://bucket/prefix, a .csv with a path (or uri) column, or dicomweb+http(s)://host/path"
    )
    ingest.add_argument("--name", help="batch name (default: the folder or prefix name)")
    ingest.add_argument(
        "--reference",
        action="store_true",
        help="reference local files in place instead of uploading (workers must see the same paths)",
    )
    ingest.add_argument("--force", action="store_true", help="re-queue scans that already exist")
    ingest.add_argument("--wait", action="store_true", help="then follow the batch until it ends")
    ingest.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    ingest.add_argument(
        "--filter",
        action="append",
        metavar="KEYWORD=VALUE",
        help="dicomweb+ sources: a QIDO-RS filter, e.g. Modality=DX or StudyDate=20200101-20201231 (repeatable)",
    )
    ingest.add_argument(
        "--deadline",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="dicomweb+ sources: stop the whole pull after this many seconds (default 86400); "
        "running it again continues",
    )
    ingest.add_argument(
        "--max-pages",
        type=int,
        default=200,
        help="dicomweb+ sources: refuse a search that needs more pages of 500 instances (default 200)",
    )
    ingest.set_defaults(handler=_run_ingest)

    status = commands.add_parser("status", help="follow a batch with a progress bar until it ends")
    status.add_argument("batch", help="batch id (printed by ingest)")
    status.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 3)")
    status.set_defaults(handler=_ops("run_status"))

    results = commands.add_parser("results", help="print a batch's results, or write them as CSV")
    results.add_argument("batch", help="batch id (printed by ingest)")
    results.add_argument("--csv", help="write to this CSV file")
    results.add_argument(
        "--all-models",
        action="store_true",
        help="also predictions of models the batch was not screened with (marked older_model)",
    )
    results.set_defaults(handler=_ops("run_results"))

    report = commands.add_parser("report", help="write an HTML page with each scan's results and overlays")
    report.add_argument("batch", help="batch id (printed by ingest)")
    report.add_argument("--html", required=True, help="output file; thumbnails go into a sibling _files folder")
    report.add_argument(
        "--all-models",
        action="store_true",
        help="also predictions of models the batch was not screened with (marked as older)",
    )
    report.set_defaults(handler=_ops("run_report"))

    api = commands.add_parser("api", help="run the HTTP ingestion API")
    api.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)"
    )
    api.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    api.add_argument("--loglevel", default="INFO", help="DEBUG, INFO (default), WARNING or ERROR")
    api.set_defaults(handler=_run_api)

    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the database schema (workers and the API only check it, and exit if it is behind)",
    )
    migrate.set_defaults(handler=_ops("run_migrate"))

    requeue = commands.add_parser("requeue", help="re-publish scans stuck in 'queued' (e.g. after a broker was wiped)")
    requeue.add_argument("--older-than", type=float, default=3600.0, help="seconds since submission (default 3600)")
    requeue.set_defaults(handler=_ops("run_requeue"))

    listen = commands.add_parser(
        "dicom-listen", help="receive images by DICOM C-STORE (and answer C-ECHO), store, record and queue them"
    )
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    listen.add_argument("--port", type=int, default=None, help="TCP port (default LUNGCAM_DICOM_PORT)")
    listen.add_argument("--loglevel", default="INFO")
    listen.set_defaults(handler=_pacs("run_listen"))

    send = commands.add_parser(
        "dicom-send", help="send done DICOM scans' results to LUNGCAM_DICOM_DESTINATION as SR + Secondary Capture"
    )
    send.add_argument("--once", action="store_true", help="send what is due now, then exit (exit 1 if anything failed)")
    send.add_argument("--loglevel", default="INFO")
    send.set_defaults(handler=_pacs("run_send"))

    descriptions = {
        "demo": "Run the whole system on this machine and screen one folder: embedded Redis (unless "
        "LUNGCAM_BROKER_URL is set), SQLite and a local store under LUNGCAM_DATA_DIR (unless configured), "
        "a worker and the API as child processes. Prints a results table (with true labels and the "
        "agreement when the folder says them), writes an HTML report, then stops everything. Without "
        "--images it screens the 30 real sample films shipped with lungcam; with LUNGCAM_MODELS unset it "
        "uses the shipped model (vgg16-hed-lungs, docs/model-card.md). --synthetic uses a demonstration "
        "model trained on synthetic images instead (trained on first use), whose outputs mean nothing "
        "clinically.",
        "screen": "Like `lungcam demo`, for a folder of your own films and the models in LUNGCAM_MODELS (the "
        "shipped model when unset): starts what is not configured on this machine, screens the folder, "
        "prints a results table, writes an HTML report, then stops everything.",
    }
    for name, text in (
        (
            "demo",
            "run everything on this machine and screen the shipped sample films (or --images DIR) "
            "with the shipped model (or LUNGCAM_MODELS)",
        ),
        ("screen", "run everything on this machine and screen a folder with LUNGCAM_MODELS, else the shipped model"),
    ):
        command = commands.add_parser(
            name,
            help=text,
            description=descriptions[name],
            formatter_class=_DefaultsHelp,
            epilog="exit codes: 0 every scan done or skipped; 2 error (one line on stderr); "
            "4 finished, but some scans failed (reasons in the table); 130 interrupted",
        )
        if name == "screen":
            command.add_argument("images", help="folder of PNG, JPEG or DICOM files")
        else:
            command.add_argument("--images", help="folder to screen instead of synthetic images")
        command.add_argument(
            "--gpu", default="auto", help="GPU index for the worker, 'none', or 'auto' (GPU 0 if nvidia-smi lists one)"
        )
        if name == "demo":
            command.add_argument(
                "--synthetic",
                action="store_true",
                help="train (first time only) and use a demonstration model on synthetic images, "
                "and screen synthetic images unless --images is given",
            )
            command.add_argument(
                "--count", type=int, default=24, help="synthetic images to screen (--synthetic without --images)"
            )
        command.add_argument(
            "--timeout", type=float, default=1800.0, help="give up after this many seconds of screening (exit 2)"
        )
        command.add_argument(
            "--all-models",
            action="store_true",
            help="show earlier models' predictions for the same scans too (marked as older)",
        )
        command.set_defaults(handler=_ops("run_demo"))
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors reported in one line: lungcam's own, and services that cannot be reached."""
    from kombu.exceptions import OperationalError as BrokerUnavailable
    from sqlalchemy.exc import OperationalError as DatabaseUnavailable

    from shared.errors import LungcamError

    return (LungcamError, BrokerUnavailable, DatabaseUnavailable)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lungcam` console script."""
    from shared.settings import diagnostics, export_setting, quiet_tensorflow_logs

    quiet_tensorflow_logs()
    args = build_parser().parse_args(argv)
    if args.verbose:
        export_setting("verbose", "1")  # inherited by the worker and API that demo/screen start
    logging.basicConfig(
        level=getattr(args, "loglevel", "WARNING"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from worker import runtime

    expected = _expected_errors()
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except KeyboardInterrupt:
        return runtime.INTERRUPTED
    except expected as exc:
        # An operator gets one line; anything else is a bug and keeps its traceback.
        if diagnostics().debug:
            raise
        detail = str(exc)
        # Driver messages can carry hosts and credentials: name the setting instead.
        if type(exc).__module__.startswith("sqlalchemy"):
            detail = f"the database is unreachable (LUNGCAM_DATABASE_URL): {type(exc).__name__}"
        elif type(exc).__module__.startswith("kombu"):
            detail = f"the broker is unreachable (LUNGCAM_BROKER_URL): {type(exc).__name__}"
        print(f"lungcam: error: {detail}", file=sys.stderr)
        return runtime.ERROR


if __name__ == "__main__":
    sys.exit(main())
