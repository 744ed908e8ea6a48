"""Authentication before the body: a request without the bearer token is answered 401 before its body is read.

FastAPI reads a route's body before it runs the route's dependencies, so `require_token` alone would let
anyone make the API buffer a 100 MB upload just to be refused. This ASGI middleware looks only at the
headers. Unauthenticated requests may declare at most LUNGCAM_API_UNAUTHENTICATED_MAX_BODY_BYTES: a
small body is read and dropped (so the client reads the answer before the connection closes), a larger
or undeclared one is not read at all and the connection is closed after the answer.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from worker.api.security import token_matches

# The bearer token guards every path under these prefixes; /v1/files checks a URL signature instead.
PROTECTED_PREFIXES = ("/v1/", "/metrics")
OPEN_PREFIXES = ("/v1/files/",)
DRAIN_MAX_S = 1.0


def bearer_problem(expected: str, authorization: str | None) -> str | None:
    """Why a request with this Authorization header is refused, or None if it carries the expected token."""
    if not expected:
        # Fail closed: an API without a token must not serve scans to anyone who can reach it.
        return "the server has no API token set (LUNGCAM_API_TOKEN); every /v1 request is refused"
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return "missing bearer token: send 'Authorization: Bearer <token>'"
    if not token_matches(credentials.strip(), expected):
        return "invalid bearer token"
    return None


def is_protected(path: str) -> bool:
    """True for paths that need the bearer token."""
    if path.startswith(OPEN_PREFIXES):
        return False
    return path == "/metrics" or path == "/v1" or path.startswith(PROTECTED_PREFIXES)


class AuthenticateFirstMiddleware:
    """401 for protected paths without the token, and 413 for large bodies on open paths, from the headers alone."""

    def __init__(self, app: ASGIApp, *, api_token: str, unauthenticated_max_body_bytes: int) -> None:
        """Wrap app; api_token empty means every protected request is refused."""
        self.app = app
        self.api_token = api_token
        self.limit = unauthenticated_max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass authenticated requests on untouched; answer the others without reading a large body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name: value for name, value in scope.get("headers", ())}
        authorization = headers.get(b"authorization")
        problem = bearer_problem(self.api_token, authorization.decode("latin-1") if authorization else None)
        if problem is None:
            await self.app(scope, receive, send)
            return
        # A chunked body has no declared length: it counts as too large to read.
        too_large = (_declared_length(headers) or 0) > self.limit or b"transfer-encoding" in headers
        if is_protected(scope.get("path", "")):
            await _answer(
                send,
                None if too_large else receive,
                HTTPStatus.UNAUTHORIZED,
                problem,
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if too_large:
            detail = (
                f"an unauthenticated request body may be at most {self.limit} bytes "
                "(LUNGCAM_API_UNAUTHENTICATED_MAX_BODY_BYTES)"
            )
            await _answer(send, None, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, detail, [])
            return
        await self.app(scope, receive, send)


def _declared_length(headers: dict[bytes, bytes]) -> int | None:
    """The declared Content-Length, None if absent; an unparsable one counts as too large."""
    value = headers.get(b"content-length")
    if value is None:
        return None
    try:
        return max(int(value), 0)
    except ValueError:
        return 1 << 62


async def _drain(receive: Receive) -> None:
    """Read and drop a small body, so closing the connection does not reset it before the answer is read."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _answer(
    send: Send, receive: Receive | None, status: HTTPStatus, detail: str, extra: list[tuple[bytes, bytes]]
) -> None:
    """Send a JSON error; with receive, drain the (small) body first, else close without reading it."""
    if receive is not None:
        try:
            await asyncio.wait_for(_drain(receive), DRAIN_MAX_S)
        except asyncio.TimeoutError:
            receive = None
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if receive is None:
        headers.append((b"connection", b"close"))  # the body is unread, so the connection cannot be reused
    await send({"type": "http.response.start", "status": int(status), "headers": headers})
    await send({"type": "http.response.body", "body": body})
