"""One error hierarchy: everything lungcam raises on purpose derives from `LungcamError`.

Command-line tools catch `LungcamError` and print its message in one line; any other exception
is a bug and keeps its traceback. Messages never carry patient data (scan ids, keys, names).
"""

from __future__ import annotations


class LungcamError(Exception):
    """Base of every error lungcam raises deliberately; str(err) is one line a person can act on."""


class SettingsError(LungcamError):
    """A `LUNGCAM_*` setting is missing or invalid; the message names the variable."""


class SchemaOutOfDate(LungcamError):
    """The database schema is behind this version of lungcam (run `lungcam migrate`)."""


class SubmissionError(LungcamError, ValueError):
    """A submission (ingest source, scan list, uploaded image) cannot be accepted as given."""
