"""Object store: a local folder or an S3-compatible bucket behind one small interface.

Keys are '/'-separated relative names such as `scans/abc` or `overlays/vgg16/1/abc.png`.
Error messages (and the tracebacks they make) name the operation and the store but never the key:
keys carry scan ids and archive file names, which can identify patients, and these end up in logs.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from shared.errors import LungcamError

if TYPE_CHECKING:
    from shared.settings import Settings

SCAN_KEY = "scans/{scan_id}"
OVERLAY_KEY = "overlays/{model_name}/{model_version}/{scan_id}.{extension}"

# Temp files of in-flight local writes start with this; `list` hides them and keys may not use it.
_TMP_PREFIX = ".lungcam-tmp-"
# S3 error codes that mean "no such object" (GetObject says NoSuchKey, HeadObject only gives the status).
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class ObjectNotFound(LungcamError, KeyError):
    """The key has no object in the store; the key is in `.key`, not in the message."""

    def __init__(self, key: str, store_url: str = "") -> None:
        """Remember key for callers; the message names only the store."""
        super().__init__(f"no such object in {store_url or 'the store'}")
        self.key = key


# S3 error codes that a later attempt may not get (throttling, timeouts, server trouble).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "OperationAborted",
    }
)
# Local errors that are a configuration problem, not a passing one.
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR})


class StoreError(LungcamError, RuntimeError):
    """A store operation failed for another reason than a missing object; `transient` says whether to retry."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        """transient: a retry may succeed (network, throttling, 5xx); False for refusals (AccessDenied, 4xx)."""
        super().__init__(message)
        self.transient = transient


@runtime_checkable
class ObjectStore(Protocol):
    """What the worker, the API and the trainer need from an object store."""

    url: str

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ObjectNotFound or StoreError."""
        ...

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store bytes under key, replacing any previous object."""
        ...

    def exists(self, key: str) -> bool:
        """Whether key has an object."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with prefix (a plain string prefix, as in S3), in sorted order."""
        ...

    def url_for(self, key: str, expires_s: int = 3600) -> str:
        """A URL a client can GET the object from."""
        ...


def validate_key(key: str) -> str:
    """Return key unchanged if it is a safe relative key, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError("store key must be a non-empty string")
    if "\\" in key or "\x00" in key:
        raise ValueError("store key may not contain a backslash or NUL")
    if key.startswith("/"):
        raise ValueError("store key must be relative")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError("store key may not have empty, '.' or '..' segments")
        if part.startswith(_TMP_PREFIX):
            raise ValueError("store key segment uses the reserved temp-file prefix")
    return key


def _validate_prefix(prefix: str) -> str:
    """Return prefix if it is empty or a safe (possibly partial, possibly '/'-terminated) key."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def scan_key(scan_id: str) -> str:
    """The store key of an uploaded scan."""
    return validate_key(SCAN_KEY.format(scan_id=_segment(scan_id, "scan_id")))


def overlay_key(model_name: str, model_version: str, scan_id: str, extension: str = "png") -> str:
    """The store key of a Grad-CAM overlay: overlays/{model}/{version}/{scan_id}.{png|jpg|webp}."""
    return validate_key(
        OVERLAY_KEY.format(
            model_name=_segment(model_name, "model_name"),
            model_version=_segment(model_version, "model_version"),
            scan_id=_segment(scan_id, "scan_id"),
            extension=_segment(extension, "extension"),
        )
    )


def _segment(value: str, what: str) -> str:
    """Check that value can be one key segment (no '/', so ids cannot reach into other folders)."""
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{what} cannot be used as a store key segment")
    return value


class LocalStore:
    """Objects as files under a root folder; writes are atomic (temp file + os.replace)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Use root (created on first write) as the store folder."""
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ObjectNotFound or StoreError."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.url) from None
        except OSError as exc:
            raise StoreError(
                f"local store {self.url}: read failed: {exc.strerror}", transient=exc.errno not in _PERMANENT_ERRNOS
            ) from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write bytes under key atomically; content_type is not kept by a folder."""
        path = self._path(key)
        tmp_name: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The temp file lives in the target folder so os.replace is a same-filesystem rename:
            # readers see the old object or the new one, never a half-written file.
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; other services (API, report) read these files
            os.replace(tmp_name, path)
            tmp_name = None
        except OSError as exc:
            raise StoreError(
                f"local store {self.url}: write failed: {exc.strerror}", transient=exc.errno not in _PERMANENT_ERRNOS
            ) from None
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass

    def exists(self, key: str) -> bool:
        """Whether key has an object."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with prefix, sorted."""
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix names fully; the rest is a string filter.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def url_for(self, key: str, expires_s: int = 3600) -> str:
        """A file:// URI of the object (expires_s does not apply to files)."""
        return self._path(key).as_uri()


class S3Store:
    """Objects in an S3 bucket (optionally under a prefix), through one thread-safe boto3 client."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        max_attempts: int = 8,
        max_pool_connections: int = 32,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        list_page_size: int = 1000,
        public_endpoint_url: str | None = None,
    ) -> None:
        """Connect to bucket; credentials come from the standard AWS environment/config chain."""
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3 bucket name is empty")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if self.prefix:
            validate_key(self.prefix[:-1])
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.list_page_size = list_page_size
        config = Config(
            region_name=region,
            signature_version="s3v4",
            # Adaptive mode adds client-side rate limiting on throttling on top of standard retries.
            retries={"mode": "adaptive", "max_attempts": max_attempts},
            # One connection per concurrent fetch; a smaller pool makes urllib3 drop and reopen sockets.
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # Custom endpoints (MinIO, moto, on-prem gateways) rarely have wildcard DNS for bucket hosts.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        session = boto3.session.Session()
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # The host is part of a presigned URL's signature, so links handed to browsers are signed for
        # the endpoint they can reach (e.g. a public MinIO name rather than the in-cluster one).
        self._presign_client: Any = (
            session.client("s3", endpoint_url=public_endpoint_url, region_name=region, config=config)
            if public_endpoint_url
            else self._client
        )

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self) -> Any:
        """The underlying boto3 S3 client (thread-safe; share it rather than making more)."""
        return self._client

    def _full(self, key: str) -> str:
        return self.prefix + _check_s3_key(key)

    def _error(self, operation: str, exc: Exception) -> StoreError:
        # Raised `from None` by callers: botocore's own messages include the object URL, hence the key.
        # The original stays reachable as __context__ for debugging in a shell.
        code = _error_code(exc) or type(exc).__name__
        return StoreError(f"S3 {operation} in {self.url} failed: {code}", transient=is_transient_s3_error(exc))

    def get(self, key: str) -> bytes:
        """The object's bytes; raises ObjectNotFound or StoreError."""
        from botocore.exceptions import BotoCoreError, ClientError
        from urllib3.exceptions import HTTPError as Urllib3Error

        full = self._full(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            # The body streams after the headers; a connection drop here is as transient as one before.
            body: bytes = response["Body"].read()  # boto3 has no type information here
            return body
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise ObjectNotFound(key, self.url) from None
            raise self._error("GetObject", exc) from None
        except (BotoCoreError, Urllib3Error) as exc:
            raise self._error("GetObject", exc) from None

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store bytes under key with the given Content-Type."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("PutObject", exc) from None

    def exists(self, key: str) -> bool:
        """Whether key has an object (a HEAD request)."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._full(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return False
            raise self._error("HeadObject", exc) from None
        except BotoCoreError as exc:
            raise self._error("HeadObject", exc) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with prefix, relative to the store prefix, sorted (S3 lists in UTF-8 byte order)."""
        _validate_prefix(prefix)
        return self._list(self.prefix + prefix)

    def _list(self, full_prefix: str) -> Iterator[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        # A generator so an archive of many thousand keys is streamed page by page, not held at once.
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self.list_page_size}
            ):
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._error("ListObjectsV2", exc) from None

    def url_for(self, key: str, expires_s: int = 3600) -> str:
        """A presigned GET URL valid for expires_s seconds."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return str(
                self._presign_client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires_s
                )
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("presign", exc) from None


def _check_s3_key(key: str) -> str:
    """S3 keys are looser than local ones (archives may hold odd names); refuse only what cannot work."""
    if not isinstance(key, str) or not key:
        raise ValueError("store key must be a non-empty string")
    if "\x00" in key or key.startswith("/"):
        raise ValueError("store key may not contain NUL or start with '/'")
    return key


def is_transient_s3_error(exc: Exception) -> bool:
    """Whether a botocore/urllib3 error may pass: 5xx, 429, throttling, timeouts, connection errors."""
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError, PartialCredentialsError

    if isinstance(exc, ClientError):
        if _error_code(exc) in _TRANSIENT_CODES:
            return True
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # No status at all: the service never answered properly, so a retry may well succeed.
        return status is None or int(status) >= 500 or int(status) == 429
    # Missing credentials or an invalid request fail the same way every time.
    return not isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError))


def _error_code(exc: Exception) -> str | None:
    """The S3 error code of a botocore ClientError, if any."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def open_store(
    url: str, *, endpoint_url: str | None = None, region: str = "us-east-1", **s3_options: Any
) -> ObjectStore:
    """Open "s3://bucket[/prefix]" as an S3Store, "file:///abs/path" or a plain path as a LocalStore."""
    if url.startswith("s3://"):
        parts = urlsplit(url)
        return S3Store(parts.netloc, parts.path, endpoint_url=endpoint_url, region=region, **s3_options)
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file:// store URLs must be local (file:///abs/path)")
        return LocalStore(unquote(parts.path))
    if "://" in url:
        raise ValueError(f"unsupported store URL scheme: {url.split('://', 1)[0]}")
    return LocalStore(url)


@lru_cache(maxsize=64)
def cached_store(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1") -> ObjectStore:
    """open_store, memoised per process: a boto3 client costs ~50 ms to build and keeps a connection pool."""
    return open_store(url, endpoint_url=endpoint_url, region=region)


def store_from_settings(settings: Settings) -> ObjectStore:
    """The store the settings name, with the S3 endpoint, region and a pool sized for io_threads."""
    url = settings.resolved_store_url()
    if url.startswith("s3://"):
        pool = max(32, 2 * settings.io_threads, settings.batch_size)
        return open_store(
            url,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            max_pool_connections=pool,
            public_endpoint_url=settings.s3_public_endpoint_url,
        )
    return open_store(url)


def split_uri(uri: str) -> tuple[str, str]:
    """Split an object URI into (store URL, key): s3://bucket/a/b.png -> ("s3://bucket", "a/b.png")."""
    if uri.startswith("s3://"):
        parts = urlsplit(uri)
        key = parts.path.lstrip("/")
        if not parts.netloc or not key:
            raise ValueError("S3 object URI needs a bucket and a key: s3://bucket/key")
        return f"s3://{parts.netloc}", key
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file:// URIs must be local (file:///abs/path)")
        path = Path(unquote(parts.path))
        return path.parent.as_uri(), path.name
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme: {uri.split('://', 1)[0]}")
    # Absolute, so the reference stays valid for a worker started in another folder.
    path = Path(os.path.abspath(os.path.expanduser(uri)))
    if not path.name:
        raise ValueError("a file path is needed, not a folder root")
    return str(path.parent), path.name
