"""Bearer-token checks and signed file URLs (so an `<img src>` works without an Authorization header)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from urllib.parse import quote

# Domain separation: the file-URL key is derived from the API token but never equals it, so a leaked
# signature reveals nothing usable as a bearer token.
_FILE_URL_KEY_CONTEXT = b"lungcam/file-url/v1"


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a presented bearer token with the configured one."""
    return secrets.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _file_url_key(api_token: str) -> bytes:
    """The HMAC key for file URLs, derived from the API token."""
    return hmac.new(api_token.encode("utf-8"), _FILE_URL_KEY_CONTEXT, hashlib.sha256).digest()


def file_signature(api_token: str, key: str, expires: int) -> str:
    """HMAC-SHA256 (hex) over the store key and the expiry time."""
    message = f"{key}\n{expires}".encode()
    return hmac.new(_file_url_key(api_token), message, hashlib.sha256).hexdigest()


def sign_file_path(api_token: str, path: str, key: str, ttl_s: int, now: float | None = None) -> str:
    """`path?expires=..&sig=..` granting GET of key until now + ttl_s."""
    expires = int(now if now is not None else time.time()) + ttl_s
    return f"{path}?expires={expires}&sig={file_signature(api_token, key, expires)}"


def file_signature_valid(api_token: str, key: str, expires: int, sig: str) -> bool:
    """True if sig signs (key, expires); the caller checks that expires is still in the future."""
    expected = file_signature(api_token, key, expires)
    return secrets.compare_digest(expected.encode(), sig.encode("utf-8", "replace"))


def quote_key(key: str) -> str:
    """A store key as a URL path (segments percent-encoded, '/' kept)."""
    return quote(key, safe="/")
