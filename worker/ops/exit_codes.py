"""Exit codes of the `lungcam` commands, documented in the README."""

from __future__ import annotations

OK = 0
NOT_FOUND = 1  # no such batch, no images, nothing to do
ERROR = 2  # a LungcamError or an unreachable service: one line on stderr
TIMEOUT = 3  # --timeout passed before the batch finished
SOME_FAILED = 4  # the batch finished, but at least one scan failed (its reason is in the results)
INTERRUPTED = 130
