"""Object store on a real local folder and on S3 through a moto server."""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.store import (
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StoreError,
    cached_store,
    open_store,
    overlay_key,
    scan_key,
    split_uri,
    store_from_settings,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """The same tests on both backends."""
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
    else:
        yield request.getfixturevalue("s3_store")


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_put_get_exists(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    assert not store.exists("scans/a")
    store.put("scans/a", b"\x89PNG first", content_type="image/png")
    assert store.exists("scans/a")
    assert store.get("scans/a") == b"\x89PNG first"
    store.put("scans/a", b"second")  # overwrite
    assert store.get("scans/a") == b"second"
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get("scans/DOE_JOHN.png")
    assert info.value.key == "scans/DOE_JOHN.png"
    assert "DOE" not in str(info.value)  # keys can identify patients; messages end up in logs
    with pytest.raises(KeyError):  # ObjectNotFound is a KeyError, so mapping-style callers work too
        store.get("nothing/here/either")
    assert store.exists("scans/missing") is False


def test_list_is_sorted_and_uses_string_prefixes(store: ObjectStore) -> None:
    keys = ["b/1", "a/2", "a/1", "ab", "a-c", "a/sub/3", "c"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/")) == ["a/1", "a/2", "a/sub/3"]
    assert list(store.list("a")) == ["a-c", "a/1", "a/2", "a/sub/3", "ab"]
    assert list(store.list("a/s")) == ["a/sub/3"]
    assert list(store.list("zzz")) == []


def test_url_for_serves_the_bytes(store: ObjectStore) -> None:
    data = os.urandom(4096)
    store.put("overlays/vgg16/1/x.png", data, content_type="image/png")
    url = store.url_for("overlays/vgg16/1/x.png", expires_s=300)
    assert url.startswith("file://" if isinstance(store, LocalStore) else "http://")
    assert _fetch(url) == data


@pytest.mark.parametrize("key", ["", "/abs/key", "x\x00y"])
def test_invalid_keys_on_both_backends(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/tmp/outside", "a\\b", "a//b", "./a", "a/.", ".."])
def test_local_key_validation_keeps_writes_inside_root(tmp_path: Path, key: str) -> None:
    # S3 keys are plain strings there, so only the folder store refuses path-like tricks.
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        list(store.list(key))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    for i in range(5):
        store.put(f"scans/{i}", b"x" * 1000)
    folder = tmp_path / "store" / "scans"
    assert sorted(os.listdir(folder)) == [str(i) for i in range(5)]  # no temp files left behind

    # A crash between writing and renaming leaves the old object intact and no partial file.
    def crash(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError):
        store.put("scans/0", b"new contents that never land")
    monkeypatch.undo()
    assert store.get("scans/0") == b"x" * 1000
    assert sorted(os.listdir(folder)) == [str(i) for i in range(5)]


def test_local_store_hides_in_flight_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"1")
    (tmp_path / ".lungcam-tmp-abc123").write_bytes(b"half")  # as another process's write in progress
    assert list(store.list()) == ["a"]


def test_local_store_files_are_world_readable(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b.png", b"1")
    assert (tmp_path / "a" / "b.png").stat().st_mode & 0o044 == 0o044


def test_s3_prefix_store(s3_store: S3Store, moto_server: str) -> None:
    inner = open_store(f"s3://{s3_store.bucket}/tenant-a", endpoint_url=moto_server)
    assert isinstance(inner, S3Store) and inner.url == f"s3://{s3_store.bucket}/tenant-a"
    inner.put("scans/1", b"one")
    s3_store.put("scans/2", b"outside the prefix")
    assert s3_store.get("tenant-a/scans/1") == b"one"
    assert list(inner.list()) == ["scans/1"]
    assert inner.exists("scans/1") and not inner.exists("scans/2")
    assert _fetch(inner.url_for("scans/1")) == b"one"


def test_s3_content_type_is_kept(s3_store: S3Store) -> None:
    s3_store.put("overlays/m/1/a.png", b"png", content_type="image/png")
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key="overlays/m/1/a.png")
    assert head["ContentType"] == "image/png"


def test_s3_list_pages_through_many_keys(moto_server: str, s3_store: S3Store) -> None:
    paged = S3Store(s3_store.bucket, endpoint_url=moto_server, list_page_size=3)
    keys = [f"scans/{i:02d}" for i in range(10)]  # four pages of at most three
    for key in keys:
        paged.put(key, b"x")
    paged.put("other", b"y")
    assert list(paged.list("scans/")) == keys


def test_s3_concurrent_gets_from_16_threads(s3_store: S3Store, caplog: pytest.LogCaptureFixture) -> None:
    blobs = {f"scans/{i}": os.urandom(50_000 + i) for i in range(48)}
    for key, data in blobs.items():
        s3_store.put(key, data)
    caplog.set_level(logging.WARNING, logger="urllib3")
    with ThreadPoolExecutor(max_workers=16) as pool:
        fetched = dict(zip(blobs, pool.map(s3_store.get, blobs)))
    assert fetched == blobs
    # A pool smaller than the thread count makes urllib3 warn and reconnect on every request.
    assert not [r for r in caplog.records if "Connection pool is full" in r.getMessage()]


def test_s3_missing_bucket_is_a_store_error(moto_server: str) -> None:
    store = S3Store(f"no-such-bucket-{uuid.uuid4().hex[:8]}", endpoint_url=moto_server, max_attempts=1)
    with pytest.raises(StoreError) as info:
        store.get("scans/a")
    assert not isinstance(info.value, ObjectNotFound)
    with pytest.raises(StoreError):
        store.put("scans/a", b"x")


def test_s3_unreachable_endpoint_is_a_store_error(moto_server: str) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout_s=2)
    key = "scans/DOE_JOHN_1950-01-01.png"  # archive names can identify patients
    for call in (
        lambda: store.get(key),
        lambda: store.put(key, b"x"),
        lambda: store.exists(key),
        lambda: list(store.list(key)),
    ):
        with pytest.raises(StoreError) as info:
            call()
        # Messages and tracebacks end up in logs: no keys there (botocore's own message has the URL).
        assert "DOE" not in str(info.value)
        assert info.value.__suppress_context__ and info.value.__cause__ is None


def test_open_store(tmp_path: Path, moto_server: str) -> None:
    local = open_store(str(tmp_path / "plain"))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "plain"
    by_uri = open_store((tmp_path / "with space").as_uri())
    assert isinstance(by_uri, LocalStore) and by_uri.root == tmp_path / "with space"
    s3 = open_store("s3://my-bucket/some/prefix/", endpoint_url=moto_server)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix/")
    assert open_store("s3://my-bucket", endpoint_url=moto_server).url == "s3://my-bucket"
    with pytest.raises(ValueError):
        open_store("ftp://host/x")
    # Referencing many images in one bucket must not build a client per image.
    assert cached_store("s3://my-bucket", endpoint_url=moto_server) is cached_store(
        "s3://my-bucket", endpoint_url=moto_server
    )


def test_store_from_settings(tmp_path: Path, s3_store: S3Store, moto_server: str) -> None:
    local = store_from_settings(Settings(data_dir=tmp_path / "data", store_url=None))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "data" / "store").resolve()
    s3 = store_from_settings(
        Settings(store_url=f"s3://{s3_store.bucket}", s3_endpoint_url=moto_server, s3_region="us-east-1")
    )
    s3.put("scans/z", b"zz")
    assert s3_store.get("scans/z") == b"zz"


def test_split_uri_references_existing_objects(tmp_path: Path, s3_store: S3Store, moto_server: str) -> None:
    assert split_uri("s3://bucket/a/b.png") == ("s3://bucket", "a/b.png")
    with pytest.raises(ValueError):
        split_uri("s3://bucket")
    s3_store.put("archive/2020/img 1.png", b"film")
    store_url, key = split_uri(f"s3://{s3_store.bucket}/archive/2020/img 1.png")
    assert open_store(store_url, endpoint_url=moto_server).get(key) == b"film"

    image = tmp_path / "films" / "x-ray.png"
    image.parent.mkdir()
    image.write_bytes(b"local film")
    folder, name = split_uri(str(image))
    assert (folder, name) == (str(image.parent), "x-ray.png")
    assert open_store(folder).get(name) == b"local film"
    folder_uri, name = split_uri(image.as_uri())
    assert open_store(folder_uri).get(name) == b"local film"


def test_key_helpers() -> None:
    assert scan_key("abc-123") == "scans/abc-123"
    assert overlay_key("vgg16", "2024.1", "abc-123") == "overlays/vgg16/2024.1/abc-123.png"
    for bad in ("a/b", "..", ""):
        with pytest.raises(ValueError):
            overlay_key("vgg16", "1", bad)
        with pytest.raises(ValueError):
            scan_key(bad)


def test_presigned_links_use_the_public_endpoint_when_set(s3_store: S3Store, moto_server: str) -> None:
    """Browsers get links for the endpoint they can reach; the store itself keeps the internal one."""
    from shared.settings import Settings
    from shared.store import store_from_settings

    public = moto_server.replace("127.0.0.1", "localhost")
    settings = Settings(store_url=s3_store.url, s3_endpoint_url=moto_server, s3_public_endpoint_url=public)
    store = store_from_settings(settings)
    store.put("overlays/m/v/s.png", b"png-bytes", "image/png")
    url = store.url_for("overlays/m/v/s.png")
    assert url.startswith(public + "/")
    with urllib.request.urlopen(url, timeout=10) as response:  # localhost reaches the same moto server
        assert response.read() == b"png-bytes"
    assert s3_store.url_for("overlays/m/v/s.png").startswith(moto_server + "/")
