"""Request body cap, enforced before the body is read (Content-Length) and while it streams (chunked)."""

from __future__ import annotations

import json

from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """The request body is over the cap (an HTTPException, so FastAPI answers it as a JSON 413)."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        """Describe the size (when known) and the limit."""
        said = f"request body is {size} bytes" if size is not None else "request body is too large"
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
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
            await _send_413(send, BodyTooLarge(self.max_bytes, declared))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; FastAPI re-raises HTTPExceptions from there.
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


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
            # The unread body stays on the socket, so the connection cannot be reused.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
