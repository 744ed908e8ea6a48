"""Fetching a scan's image bytes from where its `source_uri` says they are."""

from __future__ import annotations

from shared.settings import Settings
from shared.store import ObjectStore, cached_store, split_uri


class SourceFetcher:
    """Reads image bytes for source URIs: a key in the configured store, s3://bucket/key, or a local file.

    Images already in a store are referenced, not copied, so an archive bucket is read in place.
    """

    def __init__(self, default_store: ObjectStore, settings: Settings):
        self.default_store = default_store
        self.settings = settings

    def fetch(self, source_uri: str) -> bytes:
        """The bytes at source_uri; raises ObjectNotFound or StoreError."""
        if "://" not in source_uri and not source_uri.startswith("/"):
            return self.default_store.get(source_uri)
        store_url, key = split_uri(source_uri)
        # One client per bucket, shared by the fetch threads (boto3 clients are thread-safe).
        return cached_store(store_url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region).get(key)
