"""The `lungcam` subcommands of the PACS program: dicom-listen, dicom-send, and ingest of dicomweb+ sources."""

from __future__ import annotations

import argparse
import sys

from worker import runtime


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

    filters = parse_filters(args.filter)
    services = runtime.open_services()
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
                app=services.celery(),
                batch_name=name,
                force=args.force,
                deadline_s=args.deadline,
                max_pages=args.max_pages,
                on_total=on_total,
                on_progress=bar.update,
            )
        if not result.found:
            refused = f" ({result.refused} search records refused: a UID that is not a UID)" if result.refused else ""
            print(f"lungcam: no image instances match at {base_url(args.source)}{refused}", file=sys.stderr)
            return runtime.NOT_FOUND
        print(result.summary())
        print(result.batch_id)
        if args.wait and result.queued:
            # Waits for every scan of the batch, so a failed scan of this pull shows there too.
            return runtime.follow(services.sessions, result.batch_id, args.timeout)
        return runtime.SOME_FAILED if result.failed else runtime.OK
    finally:
        services.close()
