"""What a scan id may be: one safe store-key segment, shared by the API, the ingest tools and the database."""

from __future__ import annotations

import re

# 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit: no '/', '\\', NUL or other
# control characters, so an id can never reach into another folder of the store (and '..' is refused too).
SCAN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCAN_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


def is_valid_scan_id(value: str) -> bool:
    """True if value matches SCAN_ID_PATTERN and has no '..'."""
    return SCAN_ID_PATTERN.fullmatch(value) is not None and ".." not in value
