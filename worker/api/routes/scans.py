"""`/v1/scans`: submit one scan, read one scan's status and predictions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from shared import results
from shared.domain import SCAN_ID_PATTERN, Status
from shared.settings import Settings
from shared.store import LocalStore, ObjectStore
from worker.api.deps import CeleryDep, SessionDep, SessionFactoryDep, SettingsDep, SourcePolicyDep, StoreDep
from worker.api.models import ErrorOut, ScanIn, ScanOut, ScanSubmitted
from worker.api.security import quote_key, sign_file_path
from worker.api.submission import check_image_sizes, current_status, submit

router = APIRouter(prefix="/scans", tags=["scans"])

# Overlay links live this long; a page that shows them is expected to re-fetch the scan after that.
OVERLAY_URL_TTL_S = 3600


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ScanSubmitted,
    responses={
        200: {"model": ScanSubmitted, "description": "Already known and not forced: not queued again."},
        403: {"model": ErrorOut, "description": "source_uri is not in an allowed location."},
        409: {"model": ErrorOut, "description": "The scan was received over DICOM; only the DICOM path replaces it."},
        413: {"model": ErrorOut},
        503: {"model": ErrorOut},
    },
)
def submit_scan(
    scan: ScanIn,
    response: Response,
    settings: SettingsDep,
    sessions: SessionFactoryDep,
    celery: CeleryDep,
    store: StoreDep,
    sources: SourcePolicyDep,
) -> ScanSubmitted:
    """Queue one scan for classification (202), or report the existing scan unchanged (200) unless forced."""
    check_image_sizes([scan], settings.api_max_image_bytes, in_batch=False)
    result = submit(sessions, celery, store, [scan], upload_threads=1, sources=sources)
    if result.queued:
        return ScanSubmitted(scan_id=scan.scan_id, status=Status.QUEUED, queued=True)
    response.status_code = status.HTTP_200_OK
    return ScanSubmitted(scan_id=scan.scan_id, status=current_status(sessions, scan.scan_id), queued=False)


# A path id outside the pattern (NUL, '/', 129 characters...) is a 422 before any database query.
ScanIdPath = Annotated[
    str, Path(pattern=SCAN_ID_PATTERN.pattern, description="A scan id (the pattern of ScanIn.scan_id).")
]


@router.get("/{scan_id}", response_model=ScanOut, responses={404: {"model": ErrorOut}})
def read_scan(
    scan_id: ScanIdPath,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    all_models: bool = Query(False, description="Also predictions of models the scan's batch was not screened with."),
) -> ScanOut:
    """A scan's status, attempts, timestamps and one prediction per model of its batch, with overlay links."""
    scan = results.get_scan(session, scan_id, all_models=all_models)
    if scan is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no scan with this scan_id")
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    context = {
        "overlay_link": lambda key: overlay_url(settings, store, token, key),
        "current_models": set(results.batch_model_keys(session, scan.batch_id)),
    }
    return ScanOut.model_validate(scan, from_attributes=True, context=context)


def overlay_url(settings: Settings, store: ObjectStore, api_token: str, key: str) -> str:
    """A browser-usable link: presigned for S3; for a local folder, a signed /v1/files URL on LUNGCAM_PUBLIC_URL.

    Never built from the request's Host header, which the client chooses. Without LUNGCAM_PUBLIC_URL the
    link is relative (/v1/files/...), which a browser resolves against the API it is talking to.
    """
    if isinstance(store, LocalStore):
        path = f"{(settings.public_url or '').rstrip('/')}/v1/files/{quote_key(key)}"
        return sign_file_path(api_token, path, key, OVERLAY_URL_TTL_S)
    return store.url_for(key, expires_s=OVERLAY_URL_TTL_S)
