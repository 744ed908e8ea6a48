"""Request body cap, enforced before the body is read (Content-Length) and while it streams (chunked)."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Before answering 413, read and discard what the client is still sending, within these bounds: closing a
# socket with unread data makes the kernel send a reset, which can destroy the 413 before the client reads it.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_S = 5.0


class BodyTooLarge(HTTPException):
    """The request body is over the cap (an HTTPException, so FastAPI answers it as a JSON 413)."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        """Describe the size (when known) and the limit."""
        said = f"request body is {size} bytes" if size is not None else "request body is too large"
        super().__init__(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            detail=f"{said}; the limit is {limit} bytes (LUNGCAM_API_MAX_BODY_BYTES)",
        )


class BodySizeLimitMiddleware:
    """Refuse bodies over max_bytes with 413 without buffering them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        """Wrap app with a cap of max_bytes."""
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 at once for a declared oversize body; count bytes of an undeclared (chunked) one."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared <= DRAIN_MAX_BYTES:  # a body that cannot be drained in budget is not started on
                await _drain(receive)
            await _send_413(send, BodyTooLarge(self.max_bytes, declared))
            return
        received = 0
        overflowed = body_done = False

        async def counting_receive() -> Message:
            nonlocal received, overflowed, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    overflowed = True
                    # Raised inside the route's body read; FastAPI re-raises HTTPExceptions from there.
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def draining_send(message: Message) -> None:
            # After the last body message another receive() would wait for a disconnect: drain only if needed.
            if overflowed and not body_done and message["type"] == "http.response.start":
                await _drain(receive)
            await send(message)

        await self.app(scope, counting_receive, draining_send)


async def _discard_body(receive: Receive) -> None:
    """Read and drop request body messages until the body ends or DRAIN_MAX_BYTES have gone by."""
    discarded = 0
    while discarded <= DRAIN_MAX_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        discarded += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _drain(receive: Receive) -> None:
    """Discard the rest of an oversized body, giving up after DRAIN_MAX_S (the server then just closes)."""
    try:
        await asyncio.wait_for(_discard_body(receive), DRAIN_MAX_S)
    except asyncio.TimeoutError:
        pass


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None if absent or unparsable (then the byte count decides)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, error: BodyTooLarge) -> None:
    body = json.dumps({"detail": error.detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            # The body may be partly unread, so the connection cannot be reused.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
