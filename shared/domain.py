"""The project's vocabulary: the values and rules every program shares, each defined once.

Sections are self-contained (their own imports), so each concept can be read, and added, on its own.
"""

from __future__ import annotations

# --- scans ---
import re
import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum as _StrEnum
else:  # pragma: no cover - Python 3.10 has no enum.StrEnum

    class _StrEnum(str, Enum):
        """A str whose str() and format() are its value, as enum.StrEnum on Python 3.11+."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return str(self.value).__format__(format_spec)


class Status(_StrEnum):
    """Where a scan is in its life; members are plain strings, stored and compared as their values."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # A valid image that is not a frontal chest film by its DICOM header: not classified, not a failure.
    SKIPPED = "skipped"


# The statuses a scan ends in: nothing more happens to it unless it is submitted again.
FINISHED_STATUSES: tuple[Status, ...] = (Status.DONE, Status.FAILED, Status.SKIPPED)


class Priority(_StrEnum):
    """How urgent a scan is: every stat scan is classified before any routine one (queues bear these names)."""

    STAT = "stat"
    ROUTINE = "routine"


# 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit: no '/', '\\', NUL or other
# control characters, so an id can never reach into another folder of the store (and '..' is refused too).
# Batch ids follow the same rule.
SCAN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCAN_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"


def is_valid_scan_id(value: str) -> bool:
    """True if value matches SCAN_ID_PATTERN and has no '..'."""
    return SCAN_ID_PATTERN.fullmatch(value) is not None and ".." not in value
