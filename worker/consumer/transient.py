"""Which failures are worth retrying: outages and throttling are; bad data, refusals and bugs are not."""

from __future__ import annotations

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
