"""The operator commands of `lungcam`: ingest, status, results, report, migrate, requeue, demo and screen."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.settings import Settings
from worker import runtime
from worker.runtime import follow, progress_bar, running_services

if TYPE_CHECKING:
    from worker.ops.model_facts import ModelFacts


def run_ingest(args: argparse.Namespace) -> int:
    """`lungcam ingest SOURCE`: queue every image of a folder, s3:// prefix or CSV list as one batch."""
    from worker.ops.ingest import batch_id_for, ingest, survey

    with running_services() as services:
        found = survey(args.source, services.settings)
        items = found.items
        if not items:
            print(f"lungcam: no images found in {args.source} ({found.summary()})", file=sys.stderr)
            return runtime.NOT_FOUND
        _check_referenced_sources(items, services.settings, reference_local=args.reference)
        name = args.name or args.source.rstrip("/").rsplit("/", 1)[-1]
        with progress_bar(len(items), "queueing") as bar:
            batch_id, result = ingest(
                items,
                store=services.store,
                sessions=services.sessions,
                app=services.celery(),
                batch_name=name,
                batch_id=batch_id_for(args.source, name),
                reference_local=args.reference,
                force=args.force,
                on_progress=bar.update,
            )
        print(f"batch {batch_id}: {len(result.queued)} queued, {len(result.already)} already known")
        print(f"ingest: {found.summary(queued=len(result.queued))}")
        print(batch_id)
        if args.wait:
            return follow(services.sessions, batch_id, args.timeout)
        return 0


def _check_referenced_sources(items: list[Any], settings: Settings, *, reference_local: bool) -> None:
    """Refuse, before anything is queued, images that workers would refuse to read (LUNGCAM_ALLOWED_SOURCES)."""
    from shared.errors import SubmissionError
    from shared.sources import SourcePolicy

    policy = SourcePolicy.from_settings(settings)
    referenced = [item for item in items if not item.is_local or reference_local]
    refused = [item for item in referenced if not policy.allows(item.location)]
    if refused:
        raise SubmissionError(
            f"{len(refused)} of {len(items)} images are referenced in place outside the configured store and "
            "LUNGCAM_ALLOWED_SOURCES, so workers would refuse to read them: add their bucket, prefix or folder "
            "to LUNGCAM_ALLOWED_SOURCES (or ingest without --reference to upload copies)"
        )


def run_status(args: argparse.Namespace) -> int:
    """`lungcam status BATCH`: follow a batch until it ends."""
    with running_services(with_app=False) as services:
        return follow(services.sessions, args.batch, args.timeout)


def run_results(args: argparse.Namespace) -> int:
    """`lungcam results BATCH [--csv FILE]`: one row per scan and model."""
    import csv

    from shared.results import batch_model_keys, list_batch_scans
    from worker.ops.tables import RESULT_COLUMNS, format_table, result_rows

    with running_services(with_app=False) as services, services.sessions() as session:
        current = batch_model_keys(session, args.batch)
        rows = result_rows(list_batch_scans(session, args.batch, all_models=args.all_models), current)
    if not rows:
        print(f"lungcam: no scans in batch {args.batch}", file=sys.stderr)
        return runtime.NOT_FOUND
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, RESULT_COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} rows written to {args.csv}")
    else:
        print(format_table(rows))
    return 0


def _batch_model_facts(settings: Settings, keys: set[tuple[str, str]]) -> list[ModelFacts]:
    """What the batch's models are, for those found among LUNGCAM_MODELS (or the shipped model when unset)."""
    from shared.bundle import read_manifest
    from shared.errors import LungcamError
    from shared.shipped import shipped_model_dir
    from worker.ops.model_facts import model_facts

    facts = []
    for uri in settings.model_uris() or [str(shipped_model_dir())]:
        try:
            manifest = read_manifest(uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        except (LungcamError, OSError):
            continue  # a model that cannot be read now is left undescribed; the report still shows its results
        if (manifest.get("name"), manifest.get("version")) in keys:
            facts.append(model_facts(manifest))
    return facts


def run_report(args: argparse.Namespace) -> int:
    """`lungcam report BATCH --html FILE`: a page with each scan's results and overlays."""
    from shared.results import batch_model_keys, demonstration_keys, get_batch_progress, list_batch_scans
    from shared.sources import SourceFetcher
    from worker.ops.report import write_report

    with running_services(with_app=False) as services:
        with services.sessions() as session:
            progress = get_batch_progress(session, args.batch)
            scans = list_batch_scans(session, args.batch, all_models=args.all_models) if progress else []
            current, demonstration = batch_model_keys(session, args.batch), demonstration_keys(session, args.batch)
        if progress is None:
            print(f"lungcam: no batch {args.batch}", file=sys.stderr)
            return runtime.NOT_FOUND
        fetcher = SourceFetcher(services.store, services.settings)
        with progress_bar(len(scans), "report") as bar:
            path = write_report(
                Path(args.html),
                progress,
                scans,
                store=services.store,
                fetcher=fetcher,
                current_models=current or None,
                demonstration_models=demonstration,
                on_progress=bar.update,
                model_facts=_batch_model_facts(services.settings, set(current)),
            )
    print(f"report: {path.resolve()}")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    """`lungcam migrate`: create or upgrade the database schema."""
    from shared.engine import migrate
    from shared.settings import get_settings

    migrate(get_settings().resolved_database_url())
    print("database schema is at the latest migration")
    return 0


def run_requeue(args: argparse.Namespace) -> int:
    """`lungcam requeue --older-than S`: re-send scans still queued after S seconds that have no live message."""
    from shared.requeue import requeue_stale

    with running_services() as services:
        result = requeue_stale(services.sessions, services.celery(), older_than_s=args.older_than)
    print(
        f"re-published {len(result.published)} scan(s) still queued after {args.older_than:.0f} s without a "
        f"live message; moved {len(result.restored)} held too long back to their queue; left "
        f"{len(result.live)} with a live message alone"
    )
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """`lungcam demo` / `lungcam screen DIR`: everything on this machine, one folder screened."""
    from worker.ops.demo import detect_gpu, screen

    gpu = detect_gpu() if args.gpu == "auto" else args.gpu
    images = Path(args.images) if getattr(args, "images", None) else None
    return screen(
        images,
        gpu=gpu,
        count=getattr(args, "count", 24),
        timeout=args.timeout,
        all_models=args.all_models,
        synthetic=getattr(args, "synthetic", False),
    )
