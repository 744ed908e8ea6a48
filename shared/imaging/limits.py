"""What the decoders refuse and how they say it: `ImageDecodeError` and the size limits every header is held to.

Messages are short, safe to store in the `scans.error` column and never contain patient data; the
error's `kind` says whether the file is "corrupt" or valid but "unsupported".
"""

from __future__ import annotations

from shared.errors import LungcamError

DECODE_ERROR_KINDS = ("corrupt", "unsupported")

# Checked against the header before any pixel buffer is allocated, so a 1 KB file claiming
# 30000x30000 pixels costs nothing. Large enough for any detector (the biggest are ~4300x4300).
MAX_IMAGE_SIDE: int = 16384
MAX_IMAGE_PIXELS: int = 120_000_000


class ImageDecodeError(LungcamError, ValueError):
    """An image that cannot be decoded; str(err) is a short, human-readable reason (no patient data)."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        # "unsupported": a valid file we cannot decode (syntax, photometric, size); "corrupt": the
        # rest (truncated, garbage, not an image). The message always names the kind.
        if kind not in DECODE_ERROR_KINDS:
            raise ValueError(f"kind must be one of {DECODE_ERROR_KINDS}, got {kind!r}")
        if kind not in message:
            message = f"{kind}: {message}"
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickle with the kind (Celery and multiprocessing pickle exceptions)."""
        return (type(self), (str(self), self.kind))


def check_size(width: int, height: int) -> None:
    """Refuse empty or absurd dimensions before any pixel buffer is allocated."""
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size: {width}x{height}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageDecodeError(f"image too large: {width}x{height} exceeds {MAX_IMAGE_SIDE}", kind="unsupported")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image too large: {width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels", kind="unsupported"
        )
