"""Which failures are worth retrying: outages and throttling are; bad data, refusals and bugs are not."""

from __future__ import annotations

import traceback

from sqlalchemy import exc as sa_exc

from shared.store import StoreError


def is_transient(exc: BaseException) -> bool:
    """True for connection errors, timeouts, throttling and 5xx; False for everything else (fail the scan)."""
    if isinstance(exc, StoreError):
        return exc.transient
    # IntegrityError, DataError and ProgrammingError derive from DBAPIError too: check them first,
    # so a constraint violation is never mistaken for "database unavailable".
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError, sa_exc.NotSupportedError)):
        return False
    if isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)
    ):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated)
    return isinstance(exc, (ConnectionError, TimeoutError))


def describe(exc: BaseException) -> str:
    """A one-line reason for the scan's error column: the type and the first line of the message."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return reason[:500]


def traceback_without_messages(exc: BaseException) -> str:
    """exc's traceback as Python prints it (causes first), each exception named by its type but without its message.

    SQL errors' messages carry the statement's bound parameters (scan ids); the frames and the types say
    where it failed without them.
    """
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    parts = [
        "Traceback (most recent call last):\n"
        + "".join(traceback.format_tb(link.__traceback__))
        + f"{type(link).__module__}.{type(link).__qualname__} (message withheld)"
        for link in reversed(chain)
    ]
    return "\n\nThe above exception led to the following one:\n\n".join(parts)
