"""The project's vocabulary: the values and rules every program shares, each defined once.

Sections are self-contained (their own imports), so each concept can be read, and added, on its own.
"""

from __future__ import annotations

# --- models ---
from typing import NamedTuple


class ModelKey(NamedTuple):
    """A served model as prediction rows, overlays and batch records name it: its bundle's name and version."""

    name: str
    version: str
