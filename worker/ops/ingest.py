"""Bulk ingest: find the images in a folder, an S3 prefix or a CSV list, and queue them as one batch."""

from __future__ import annotations

import csv
import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import db
from shared.errors import SubmissionError
from shared.settings import Settings
from shared.store import ObjectNotFound, ObjectStore, cached_store, scan_key
from shared.queueing import SubmitResult, submit_scans

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""})  # DICOM files often have no suffix
SCAN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHUNK = 200


@dataclass(frozen=True)
class IngestItem:
    """One image to queue: its scan id, where its bytes are, and whether to upload them."""

    scan_id: str
    location: str  # local path or s3://bucket/key
    priority: str = "routine"

    @property
    def is_local(self) -> bool:
        """True when the bytes are in a local file (uploaded unless referencing is asked for)."""
        return "://" not in self.location


def scan_id_for(relative: str) -> str:
    """A safe scan id from a relative path: separators become '_', long names keep a hash suffix."""
    stem = relative.rsplit(".", 1)[0] if "." in Path(relative).name else relative
    candidate = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "_")).strip("._-") or "scan"
    candidate = candidate.replace("..", "_")
    if len(candidate) > 100 or not SCAN_ID_PATTERN.match(candidate):
        digest = hashlib.sha256(relative.encode()).hexdigest()[:12]
        candidate = f"{candidate[:100].strip('._-') or 'scan'}-{digest}"
    return candidate


def discover(source: str, settings: Settings) -> list[IngestItem]:
    """The images a source names: a folder (recursive), s3://bucket/prefix, or a CSV list."""
    if source.startswith("s3://"):
        return list(_from_s3(source, settings))
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path)
    if path.is_dir():
        return _from_folder(path)
    raise SubmissionError(f"no folder, .csv list or s3:// prefix at {source}")


def _from_folder(root: Path) -> list[IngestItem]:
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.suffix.lower() != ".csv"
    )
    return _unique([IngestItem(scan_id_for(str(p.relative_to(root))), str(p.resolve())) for p in files])


def _from_s3(uri: str, settings: Settings) -> Iterator[IngestItem]:
    bucket_url, _, prefix = uri[len("s3://"):].partition("/")
    store = cached_store(f"s3://{bucket_url}", endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    keys = [key for key in store.list(prefix) if Path(key).suffix.lower() in IMAGE_SUFFIXES]
    yield from _unique([IngestItem(scan_id_for(key[len(prefix):].lstrip("/") or key), f"s3://{bucket_url}/{key}") for key in keys])


def _from_csv(path: Path) -> list[IngestItem]:
    """Rows with a `path` (or `uri`) column and optional `scan_id` and `priority` columns."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        location_column = "path" if "path" in columns else "uri" if "uri" in columns else None
        if location_column is None:
            raise SubmissionError(f"{path.name}: needs a 'path' or 'uri' column (has {sorted(columns)})")
        items = []
        for line, row in enumerate(reader, start=2):
            location = (row.get(location_column) or "").strip()
            if not location:
                raise SubmissionError(f"{path.name}:{line}: empty {location_column}")
            if "://" not in location:
                location = str((path.parent / location).resolve())
            scan_id = (row.get("scan_id") or "").strip() or scan_id_for(Path(location).name)
            if not SCAN_ID_PATTERN.match(scan_id) or ".." in scan_id:
                raise SubmissionError(f"{path.name}:{line}: scan_id must match {SCAN_ID_PATTERN.pattern}")
            priority = (row.get("priority") or "routine").strip()
            if priority not in ("stat", "routine"):
                raise SubmissionError(f"{path.name}:{line}: priority must be stat or routine")
            items.append(IngestItem(scan_id, location, priority))
    return _unique(items)


def _unique(items: list[IngestItem]) -> list[IngestItem]:
    seen: dict[str, int] = {}
    out = []
    for item in items:
        count = seen.get(item.scan_id, 0)
        seen[item.scan_id] = count + 1
        out.append(item if count == 0 else IngestItem(f"{item.scan_id}-{count}", item.location, item.priority))
    return out


def batch_id_for(source: str, name: str) -> str:
    """The batch id of ingesting source under name: the same source and name always give the same batch."""
    # Local sources by absolute path, so `ingest ./x` and `ingest /abs/x` are one batch; prefixes without a trailing '/'.
    where = source.rstrip("/") if "://" in source else str(Path(source).expanduser().resolve())
    return hashlib.sha256(f"{where}\0{name}".encode()).hexdigest()[:32]


def _stored_bytes(store: ObjectStore, scan_id: str) -> bytes | None:
    """The image stored for scan_id, or None."""
    try:
        return store.get(scan_key(scan_id))
    except ObjectNotFound:
        return None


def _existing(sessions: sessionmaker[Session], scan_ids: list[str]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(db.Scan.scan_id).where(db.Scan.scan_id.in_(scan_ids))))


def ingest(
    items: list[IngestItem],
    *,
    store: ObjectStore,
    sessions: sessionmaker[Session],
    app: Celery,
    batch_name: str | None = None,
    batch_id: str | None = None,
    reference_local: bool = False,
    force: bool = False,
    rescreen: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[str, SubmitResult]:
    """Upload local files to the store (or reference them), queue everything as one batch; returns its id.

    As the API does, an existing scan keeps its stored image and stays as it is unless force is given.
    rescreen (what `lungcam screen` does) moves existing scans into this batch so that only the served
    models they have no result from run; a local file whose bytes differ from the stored image under
    the same scan id is a new input, uploaded and classified again by every model.
    """
    batch_id = batch_id or uuid.uuid4().hex
    total = SubmitResult()
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        existing = set() if force else _existing(sessions, [item.scan_id for item in chunk])
        scans, changed = [], []
        for item in chunk:
            if item.scan_id in existing and rescreen and item.is_local and not reference_local:
                data = Path(item.location).read_bytes()
                if _stored_bytes(store, item.scan_id) != data:
                    store.put(scan_key(item.scan_id), data)
                    changed.append({"scan_id": item.scan_id, "source_uri": scan_key(item.scan_id), "priority": item.priority})
                    continue
                scans.append({"scan_id": item.scan_id, "source_uri": scan_key(item.scan_id), "priority": item.priority})
            elif item.scan_id in existing:
                # Overwriting it would silently change the input behind a finished result.
                scans.append({"scan_id": item.scan_id, "source_uri": scan_key(item.scan_id), "priority": item.priority})
            elif item.is_local and not reference_local:
                # Uploaded, so workers on other machines can read it: they share only the store.
                key = scan_key(item.scan_id)
                store.put(key, Path(item.location).read_bytes())
                scans.append({"scan_id": item.scan_id, "source_uri": key, "priority": item.priority})
            else:
                scans.append({"scan_id": item.scan_id, "source_uri": item.location, "priority": item.priority})
        result = submit_scans(
            sessions, app, scans, batch_id=batch_id, batch_name=batch_name, force=force, rescreen=rescreen
        )
        if changed:
            again = submit_scans(sessions, app, changed, batch_id=batch_id, batch_name=batch_name, force=True)
            result.queued += again.queued
        total.queued += result.queued
        total.already += result.already
        if on_progress:
            on_progress(len(chunk))
    return batch_id, total
