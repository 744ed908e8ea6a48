"""Probes and metrics: liveness and readiness of broker/database/store (open), Prometheus metrics (bearer token)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from fastapi import APIRouter, Depends, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from worker.api.deps import Resources, ResourcesDep, require_token
from worker.api.models import CheckResult, Health, Readiness

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

# A probe must answer before the orchestrator's own timeout (Kubernetes defaults to 1 s, often raised).
CHECK_TIMEOUT_S = 3.0
READINESS_PROBE_PREFIX = "readyz-probe/"


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up and serving HTTP."""
    return Health(status="ok")


def _check_broker(resources: Resources) -> str:
    """Connect to the broker once (no retry loop): a probe must fail fast."""
    with resources.celery.connection_for_write(connect_timeout=CHECK_TIMEOUT_S) as connection:
        connection.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2, timeout=CHECK_TIMEOUT_S
        )
    return "reachable"


def _check_database(resources: Resources) -> str:
    """Run SELECT 1."""
    with resources.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return "reachable"


def _check_store(resources: Resources) -> str:
    """List a prefix that is normally empty: one cheap request that fails if the bucket is missing or denied."""
    # A listing rather than exists(): S3 HEAD answers a bare 404 for a missing bucket, which looks like "ok".
    next(iter(resources.store.list(READINESS_PROBE_PREFIX)), None)
    return "reachable"


CHECKS: dict[str, Callable[[Resources], str]] = {
    "broker": _check_broker,
    "database": _check_database,
    "store": _check_store,
}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A dependency is unreachable."}},
)
def readyz(resources: ResourcesDep, response: Response) -> Readiness:
    """200 if the broker, database and store all answer, else 503 with which one failed."""
    pool = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="readyz")
    try:
        futures = {name: pool.submit(check, resources) for name, check in CHECKS.items()}
        wait(futures.values(), timeout=CHECK_TIMEOUT_S + 1.0)
        checks: dict[str, CheckResult] = {}
        for name, future in futures.items():
            if not future.done():
                checks[name] = CheckResult(ok=False, detail=f"no answer within {CHECK_TIMEOUT_S:g} s")
                continue
            error = future.exception()
            if error is None:
                checks[name] = CheckResult(ok=True, detail=future.result())
            else:
                # Details stay in the server log: this endpoint is unauthenticated, and messages can name hosts.
                log.warning("readiness: %s check failed: %s: %s", name, type(error).__name__, error)
                checks[name] = CheckResult(ok=False, detail=f"unreachable ({type(error).__name__})")
    finally:
        # Do not wait for a hung check; its thread ends when its own timeout fires.
        pool.shutdown(wait=False, cancel_futures=True)
    ready = all(check.ok for check in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(status="ready" if ready else "unavailable", checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: {"description": "No or a wrong bearer token."}},
    dependencies=[Depends(require_token)],
)
def metrics(resources: ResourcesDep) -> Response:
    """Prometheus text format (bearer token required): lungcam_scans{status}, lungcam_inference_seconds{model_name,model_version}."""
    return Response(generate_latest(resources.metrics_registry), media_type=CONTENT_TYPE_LATEST)
