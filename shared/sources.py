"""Where a scan's image bytes may come from, and fetching them.

A `source_uri` is a key in the configured store (uploads), an `s3://bucket/key`, or a local path
(`lungcam ingest --reference`). The worker reads every source with its own credentials and lets
the caller download an overlay of it, so a caller must not be able to name an image it could not
read itself: only the configured store and the locations in LUNGCAM_ALLOWED_SOURCES are read.
The API refuses anything else before it records or publishes; the worker checks the same list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.errors import LungcamError
from shared.settings import Settings
from shared.store import ObjectStore, cached_store, split_uri

# One sentence for every refused or unreadable source, so an error never tells whether a bucket
# or key exists.
NOT_READABLE = "the image is not readable at its source (not found, or not an allowed location)"


class SourceNotAllowed(LungcamError):
    """A source_uri outside the configured store and LUNGCAM_ALLOWED_SOURCES."""

    def __init__(self) -> None:
        """The same message for every refusal (it names neither bucket nor key)."""
        super().__init__(NOT_READABLE)


@dataclass(frozen=True)
class SourcePolicy:
    """The locations sources may name: `s3://bucket/prefix/` strings and absolute local folders."""

    s3_prefixes: tuple[str, ...]
    folders: tuple[Path, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> SourcePolicy:
        """The configured store's root plus every entry of LUNGCAM_ALLOWED_SOURCES."""
        s3: list[str] = []
        folders: list[Path] = []
        for entry in [settings.resolved_store_url(), *settings.allowed_source_list()]:
            if entry.startswith("s3://"):
                bucket, _, prefix = entry[len("s3://") :].partition("/")
                prefix = prefix.strip("/")
                s3.append(f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/")
            else:
                path = entry[len("file://") :] if entry.startswith("file://") else entry
                folders.append(Path(os.path.realpath(os.path.expanduser(path))))
        return cls(tuple(s3), tuple(folders))

    def allows(self, source_uri: str) -> bool:
        """True for keys of the configured store and for URIs inside an allowed location."""
        if "://" not in source_uri and not source_uri.startswith("/"):
            return True  # a key in the configured store (uploads and ingest copies)
        if source_uri.startswith("s3://"):
            key = source_uri.split("/", 3)[3] if source_uri.count("/") >= 3 else ""
            # S3 keys are literal, but some S3-compatible servers normalise '..': refuse them outright.
            if not key or any(part in ("", ".", "..") for part in key.split("/")):
                return False
            return any(source_uri.startswith(prefix) for prefix in self.s3_prefixes)
        if source_uri.startswith("file://"):
            parts = urlsplit(source_uri)
            if parts.netloc not in ("", "localhost"):
                return False
            local = unquote(parts.path)
        elif "://" in source_uri:
            return False
        else:
            local = source_uri
        # realpath: a symlink or '..' inside an allowed folder must not lead out of it.
        path = Path(os.path.realpath(os.path.expanduser(local)))
        return any(path.is_relative_to(folder) for folder in self.folders)

    def check(self, source_uri: str) -> None:
        """Raise SourceNotAllowed unless allows(source_uri)."""
        if not self.allows(source_uri):
            raise SourceNotAllowed()


class SourceFetcher:
    """Reads image bytes for allowed source URIs: a key in the configured store, s3://bucket/key, or a local file.

    Images already in a store are referenced, not copied, so an archive bucket is read in place.
    """

    def __init__(self, default_store: ObjectStore, settings: Settings):
        """Read keys from default_store and other locations the settings allow."""
        self.default_store = default_store
        self.settings = settings
        self.policy = SourcePolicy.from_settings(settings)

    def fetch(self, source_uri: str) -> bytes:
        """The bytes at source_uri; raises SourceNotAllowed, ObjectNotFound or StoreError."""
        self.policy.check(source_uri)
        if "://" not in source_uri and not source_uri.startswith("/"):
            return self.default_store.get(source_uri)
        store_url, key = split_uri(source_uri)
        # One client per bucket, shared by the fetch threads (boto3 clients are thread-safe).
        return cached_store(store_url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region).get(
            key
        )
