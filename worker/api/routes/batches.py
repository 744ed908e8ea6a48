"""`/v1/batches`: submit many scans at once and follow their progress."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from shared import results
from shared.domain import SCAN_ID_PATTERN
from worker.api.deps import CeleryDep, SessionDep, SessionFactoryDep, SettingsDep, SourcePolicyDep, StoreDep
from worker.api.models import BatchIn, BatchOut, BatchSubmitted, ErrorOut, StatusCounts
from worker.api.submission import check_image_sizes, submit

router = APIRouter(prefix="/batches", tags=["batches"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchSubmitted,
    responses={403: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)
def submit_batch(
    batch: BatchIn,
    settings: SettingsDep,
    sessions: SessionFactoryDep,
    celery: CeleryDep,
    store: StoreDep,
    sources: SourcePolicyDep,
) -> BatchSubmitted:
    """Queue up to 10000 scans under a new batch id; scans that already exist are not queued again unless forced."""
    check_image_sizes(batch.scans, settings.api_max_image_bytes, in_batch=True)
    # Generated, never client-chosen: two clients cannot collide on (or read each other's) batch by guessing.
    batch_id = uuid.uuid4().hex
    result = submit(
        sessions,
        celery,
        store,
        batch.scans,
        batch_id=batch_id,
        batch_name=batch.name,
        upload_threads=settings.io_threads,
        sources=sources,
    )
    return BatchSubmitted(batch_id=batch_id, queued=len(result.queued), already=len(result.already))


@router.get("/{batch_id}", response_model=BatchOut, responses={404: {"model": ErrorOut}})
def read_batch(
    batch_id: Annotated[str, Path(pattern=SCAN_ID_PATTERN.pattern, description="A batch id (the scan-id pattern).")],
    session: SessionDep,
) -> BatchOut:
    """The batch's scans per status, how far along it is, and whether it is complete."""
    progress = results.get_batch_progress(session, batch_id)
    if progress is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no batch with this batch_id")
    counts = StatusCounts(**{name: progress.counts.get(name, 0) for name in StatusCounts.model_fields})
    return BatchOut(
        batch_id=progress.batch_id,
        name=progress.name,
        submitted_at=progress.submitted_at,
        counts=counts,
        total=progress.total,
        progress=progress.progress,
        complete=progress.complete,
    )
