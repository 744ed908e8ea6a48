"""`/v1/files/{key}`: overlays of a local-folder store, behind signed, expiring URLs instead of the bearer token."""

from __future__ import annotations

import mimetypes
import time

from fastapi import APIRouter, HTTPException, Query, Response, status

from shared.store import ObjectNotFound, validate_key
from worker.api.deps import SettingsDep, StoreDep
from worker.api.models import ErrorOut
from worker.api.security import file_signature_valid

router = APIRouter(prefix="/files", tags=["files"])

# Only overlays are ever linked; uploaded scans (scans/...) stay unreachable even with a valid signature.
SERVED_PREFIX = "overlays/"


def _forbidden(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)


@router.get(
    "/{key:path}",
    name="get_file",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The file."},
        403: {"model": ErrorOut},
        404: {"model": ErrorOut},
    },
)
def get_file(
    key: str,
    settings: SettingsDep,
    store: StoreDep,
    expires: int = Query(description="Unix time after which the link stops working."),
    sig: str = Query(description="HMAC-SHA256 of the key and expiry, from an overlay_url."),
) -> Response:
    """Serve a file from the store if the URL's signature is valid and unexpired (links come from GET /v1/scans)."""
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    if not token:
        raise _forbidden("the server has no API token set (LUNGCAM_API_TOKEN), so it cannot check file signatures")
    if expires < time.time():
        raise _forbidden("this file link has expired; fetch the scan again for a fresh overlay_url")
    if not file_signature_valid(token, key, expires, sig):
        raise _forbidden("invalid file link signature")
    try:
        validate_key(key)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file") from None
    if not key.startswith(SERVED_PREFIX):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file")
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such file") from None
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(
        data,
        media_type=media_type,
        # Private: an overlay is patient data, so shared caches must not keep it.
        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
    )
