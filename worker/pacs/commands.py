"""The `lungcam` subcommands of the PACS program: dicom-listen, dicom-send, and ingest of dicomweb+ sources."""

from __future__ import annotations

import argparse
import sys

EXIT_NOT_FOUND = 1
EXIT_SOME_FAILED = 4  # as worker.ops.exit_codes (this program does not import the operator tools)


def run_listen(args: argparse.Namespace) -> int:
    """`lungcam dicom-listen [--host H] [--port P]`."""
    from worker.pacs.listener import run_listener

    return run_listener(args.host, args.port)


def run_send(args: argparse.Namespace) -> int:
    """`lungcam dicom-send [--once]`."""
    from worker.pacs.sender import run_sender

    return run_sender(once=args.once)


def run_dicomweb_ingest(args: argparse.Namespace) -> int:
    """`lungcam ingest dicomweb+http(s)://host/path [--filter K=V ...]`: pull by QIDO-RS / WADO-RS, one batch."""
    from tqdm import tqdm

    from worker.pacs.dicomweb import base_url, parse_filters, pull
    from worker.pacs.services import open_services

    filters = parse_filters(args.filter)
    services = open_services()
    assert services.app is not None
    name = args.name or base_url(args.source).rsplit("/", 1)[-1] or "dicomweb"
    # PullError (a LungcamError) ends the pull in one line saying what the server did; whatever was stored
    # before it has its row and message, and running the same command again retrieves the rest.
    try:
        with tqdm(total=0, desc="pulling", unit="instance", file=sys.stderr, dynamic_ncols=True) as bar:

            def on_total(total: int) -> None:
                bar.total = total
                bar.refresh()

            result = pull(
                args.source,
                filters,
                settings=services.settings,
                sessions=services.sessions,
                store=services.store,
                app=services.app,
                batch_name=name,
                force=args.force,
                deadline_s=args.deadline,
                max_pages=args.max_pages,
                on_total=on_total,
                on_progress=bar.update,
            )
    finally:
        services.engine.dispose()
    if not result.found:
        refused = f" ({result.refused} search records refused: a UID that is not a UID)" if result.refused else ""
        print(f"lungcam: no image instances match at {base_url(args.source)}{refused}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(result.summary())
    print(result.batch_id)
    code = 0
    if args.wait and result.queued:
        code = _follow(args, result.batch_id)
    return EXIT_SOME_FAILED if code == 0 and result.failed else code


def _follow(args: argparse.Namespace, batch_id: str) -> int:
    """Wait for the batch like `lungcam status` (polling SQL; this program cannot import worker.ops)."""
    import time

    from shared.engine import make_engine, make_session_factory
    from shared.results import get_batch_progress
    from shared.settings import get_settings

    engine = make_engine(get_settings().resolved_database_url())
    sessions = make_session_factory(engine)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while True:
            with sessions() as session:
                progress = get_batch_progress(session, batch_id)
            if progress is None or progress.complete:
                break
            if deadline and time.monotonic() > deadline:
                print(f"lungcam: batch {batch_id} not finished after {args.timeout:.0f} s", file=sys.stderr)
                return 3
            time.sleep(1.0)
    finally:
        engine.dispose()
    if progress is not None:
        print(
            f"batch {batch_id}: {progress.counts['done']} done, {progress.counts['failed']} failed of {progress.total}"
        )
    return 0
