"""Which sources a scan may name (LUNGCAM_ALLOWED_SOURCES), checked by the worker as by the API."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.engine import make_engine, make_session_factory, migrate
from shared.scans import NewScan, add_scans
from shared.settings import Settings
from shared.sources import NOT_READABLE, SourceFetcher, SourceNotAllowed, SourcePolicy
from shared.store import LocalStore, S3Store, scan_key


def _policy(tmp_path: Path, **settings: object) -> SourcePolicy:
    return SourcePolicy.from_settings(Settings(data_dir=tmp_path / "data", **settings))  # type: ignore[arg-type]


def test_by_default_only_the_configured_store_is_readable(tmp_path: Path):
    """Keys of the store, and the store's own bucket/prefix; nothing else."""
    policy = _policy(tmp_path, store_url="s3://scans-bucket/site-a")
    assert policy.allows("scans/abc")
    assert policy.allows("s3://scans-bucket/site-a/2020/x.dcm")
    assert not policy.allows("s3://scans-bucket/site-b/x.dcm")
    assert not policy.allows("s3://scans-bucket/site-ab/x.dcm")  # a prefix is a folder, not a string prefix
    assert not policy.allows("s3://scans-bucket/site-a/../site-b/x.dcm")
    assert not policy.allows("s3://other/x.png")
    assert not policy.allows("/etc/passwd")
    assert not policy.allows("file:///etc/passwd")


def test_allowed_sources_add_buckets_prefixes_and_folders(tmp_path: Path):
    archive = tmp_path / "archive"
    (archive / "2020").mkdir(parents=True)
    (archive / "2020" / "a.png").write_bytes(b"x")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    # A symlink inside the allowed folder that leads out of it.
    os.symlink(outside, archive / "escape.png")
    policy = _policy(tmp_path, allowed_sources=f"s3://archive, s3://shared/lungs/ ,{archive}")
    assert policy.allows("s3://archive/any/key.png")
    assert policy.allows("s3://shared/lungs/a.png") and not policy.allows("s3://shared/other/a.png")
    assert policy.allows(str(archive / "2020" / "a.png"))
    assert policy.allows((archive / "2020" / "a.png").as_uri())
    assert not policy.allows(str(outside))
    assert not policy.allows(str(archive / "escape.png"))
    assert not policy.allows(str(archive / "2020" / ".." / ".." / "outside.png"))
    assert not policy.allows("s3://archive/")


def test_the_fetcher_refuses_what_the_policy_refuses_with_one_message(
    tmp_path: Path, s3_store: S3Store, moto_server: str
):
    """A real object in a real (moto) bucket that is not allowed is not read; the message names nothing."""
    s3_store.put("secret.png", b"not for you")
    store = LocalStore(tmp_path / "store")
    settings = Settings(data_dir=tmp_path / "data", store_url=str(tmp_path / "store"), s3_endpoint_url=moto_server)
    fetcher = SourceFetcher(store, settings)
    with pytest.raises(SourceNotAllowed) as refused:
        fetcher.fetch(f"s3://{s3_store.bucket}/secret.png")
    assert str(refused.value) == NOT_READABLE and s3_store.bucket not in str(refused.value)
    allowed = SourceFetcher(store, settings.model_copy(update={"allowed_sources": f"s3://{s3_store.bucket}"}))
    assert allowed.fetch(f"s3://{s3_store.bucket}/secret.png") == b"not for you"


def test_the_worker_fails_a_refused_source_like_a_missing_one(tmp_path: Path, s3_store: S3Store, moto_server: str):
    """In-process classifier on a real database: refused and missing sources fail with the same reason."""
    from worker.consumer.classifier import ScanClassifier

    s3_store.put("exists.png", cv2.imencode(".png", np.full((32, 32), 128, np.uint8))[1].tobytes())
    url = f"sqlite:///{tmp_path / 'w.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    store = LocalStore(tmp_path / "store")
    settings = Settings(
        data_dir=tmp_path / "data", database_url=url, store_url=str(tmp_path / "store"), s3_endpoint_url=moto_server
    )
    scans = [
        NewScan("refused", f"s3://{s3_store.bucket}/exists.png"),
        NewScan("missing", scan_key("missing")),
    ]
    with sessions.begin() as session:
        add_scans(session, scans, None)
    classifier = ScanClassifier([], store, sessions, settings)
    try:
        outcome = classifier.process(["refused", "missing"])
    finally:
        classifier.close()
        engine.dispose()
    assert outcome.failed == {"refused": NOT_READABLE, "missing": NOT_READABLE}
