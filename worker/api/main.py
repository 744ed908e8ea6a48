"""The FastAPI application: `create_app(settings)` wires routes, auth, limits, error bodies and shared resources."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import OperationalError as DatabaseError

from shared.settings import Settings, get_settings
from shared.sources import SourceNotAllowed, SourcePolicy
from shared.store import StoreError
from worker.api.deps import Resources, require_token
from worker.api.gate import AuthenticateFirstMiddleware
from worker.api.limits import BodySizeLimitMiddleware
from worker.api.logs import install_access_log_redaction
from worker.api.metrics import make_registry
from worker.api.routes import batches, files, health, scans
from worker.api.submission import ImageTooLarge, ReceivedOverDicom
from worker.runtime import open_engine, open_services

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
DESCRIPTION = """\
Submit chest X-rays for COVID-19 screening and read back the results with Grad-CAM overlays.

Every `/v1` route except `/v1/files`, and `/metrics`, needs `Authorization: Bearer <LUNGCAM_API_TOKEN>`;
a request without it is answered 401 from its headers, before its body is read. A server started
without `LUNGCAM_API_TOKEN` refuses every `/v1` request with 401. `/v1/files` links come signed and
expiring inside `overlay_url`, built on `LUNGCAM_PUBLIC_URL` (never on the Host header), so an
`<img src>` works without the header. `/healthz` and `/readyz` are open.
"""


def open_resources(settings: Settings) -> Resources:
    """The runtime's services (schema checked), the source policy and the metrics registry."""
    # Every engine hides bound parameters (shared.engine.make_engine): SQL errors carry no scan ids.
    services = open_services(settings)
    return Resources(
        services=services,
        sources=SourcePolicy.from_settings(settings),
        metrics_registry=make_registry(services.sessions),
    )


def close_resources(resources: Resources) -> None:
    """Release broker connections and database pools."""
    resources.services.close()


def _error_body(detail: object) -> dict[str, object]:
    return {"detail": detail}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field and problem, without echoing the input (it can be a 100 MB base64 image)."""
    errors = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in exc.errors()
    ]
    return JSONResponse(jsonable_encoder(_error_body(errors)), status_code=HTTPStatus.UNPROCESSABLE_ENTITY)


async def _image_too_large(request: Request, exc: Exception) -> JSONResponse:
    """413 for an upload over LUNGCAM_API_MAX_IMAGE_BYTES."""
    return JSONResponse(_error_body(str(exc)), status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


async def _received_over_dicom(request: Request, exc: Exception) -> JSONResponse:
    """409 for a submission naming a scan received over DICOM: its image is replaced only by the DICOM path."""
    return JSONResponse(_error_body(str(exc)), status_code=HTTPStatus.CONFLICT)


async def _source_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """403 for a source_uri outside the allowed locations; the body says the same for every refusal."""
    return JSONResponse(_error_body(str(exc)), status_code=HTTPStatus.FORBIDDEN)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 when the object store fails (StoreError messages name no keys, so logging them is safe)."""
    log.warning("store unavailable: %s", exc)
    body = _error_body("the object store is unavailable; try again later")
    return JSONResponse(body, status_code=HTTPStatus.SERVICE_UNAVAILABLE)


async def _broker_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 when publishing fails; the rows are committed as queued, and requeue_stale re-sends them."""
    log.warning("broker unavailable: %s", type(exc).__name__)
    return JSONResponse(
        _error_body("the message broker is unavailable; accepted scans stay queued and are re-sent later"),
        status_code=HTTPStatus.SERVICE_UNAVAILABLE,
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 when the database cannot be reached or stays locked (parameters are hidden by the engine)."""
    log.warning("database unavailable: %s", type(exc).__name__)
    body = _error_body("the database is unavailable; try again later")
    return JSONResponse(body, status_code=HTTPStatus.SERVICE_UNAVAILABLE)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The lungcam HTTP API; resources are opened (and the schema checked) when the server starts."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources = open_resources(settings)
        if settings.api_token is None or not settings.api_token.get_secret_value():
            log.warning("LUNGCAM_API_TOKEN is not set: every /v1 request will be refused with 401")
        app.state.resources = resources
        try:
            yield
        finally:
            close_resources(resources)

    app = FastAPI(title="lungcam", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    # Added last, so it runs first: a request without the token is refused before any body is read.
    app.add_middleware(
        AuthenticateFirstMiddleware,
        api_token=settings.api_token.get_secret_value() if settings.api_token else "",
        unauthenticated_max_body_bytes=settings.api_unauthenticated_max_body_bytes,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ImageTooLarge, _image_too_large)
    app.add_exception_handler(ReceivedOverDicom, _received_over_dicom)
    app.add_exception_handler(SourceNotAllowed, _source_not_allowed)
    app.add_exception_handler(StoreError, _store_unavailable)
    app.add_exception_handler(BrokerError, _broker_unavailable)
    app.add_exception_handler(DatabaseError, _database_unavailable)

    authenticated = APIRouter(dependencies=[Depends(require_token)])
    authenticated.include_router(scans.router)
    authenticated.include_router(batches.router)
    app.include_router(authenticated, prefix=API_PREFIX)
    # Files check a URL signature instead of the bearer token, so browsers can load overlays directly.
    app.include_router(files.router, prefix=API_PREFIX)
    app.include_router(health.router)
    install_access_log_redaction()
    return app


def serve(host: str, port: int, loglevel: str = "INFO") -> int:
    """Serve the API with uvicorn until stopped (`lungcam api`); returns the exit code."""
    import uvicorn

    settings = get_settings()
    # Checked here too, so a schema that is behind is one line on the terminal, not a lifespan traceback.
    open_engine(settings).dispose()
    uvicorn.run(create_app(settings), host=host, port=port, log_level=loglevel.lower())
    return 0
