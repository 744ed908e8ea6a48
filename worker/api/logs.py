"""Access-log redaction: request paths carry scan ids and store keys, which can identify patients."""

from __future__ import annotations

import logging
import re

ACCESS_LOGGER = "uvicorn.access"
# Path templates replace the identifying part; query strings (file signatures) are dropped entirely.
_REDACTIONS = (
    (re.compile(r"^/v1/scans/.+"), "/v1/scans/{scan_id}"),
    (re.compile(r"^/v1/files/.*"), "/v1/files/{key}"),
)


def redact_path(path: str) -> str:
    """The request path with scan ids, file keys and the query string removed."""
    path = path.split("?", 1)[0]
    for pattern, template in _REDACTIONS:
        if pattern.match(path):
            return template
    return path


class RedactPathsFilter(logging.Filter):
    """Rewrites uvicorn's access-log records (args: client, method, path, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the path argument in place; never drops a record."""
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], redact_path(args[2]), args[3], args[4])
        return True


def install_access_log_redaction() -> None:
    """Attach the filter to uvicorn's access logger once per process."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(existing, RedactPathsFilter) for existing in logger.filters):
        logger.addFilter(RedactPathsFilter())
