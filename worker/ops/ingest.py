"""Bulk ingest: find the images in a folder, an S3 prefix or a CSV list, and queue them as one batch."""

from __future__ import annotations

import csv
import hashlib
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared.domain import SCAN_ID_RULE, Priority, is_valid_scan_id
from shared.errors import SubmissionError
from shared.queueing import SubmitResult, submit_scans
from shared.scans import NewScan, dicom_received_ids, existing_scan_ids
from shared.settings import Settings
from shared.store import ObjectNotFound, ObjectStore, cached_store, scan_key

# Every file suffix shared.imaging decodes (PNG, JPEG, TIFF, DICOM); DICOM files often have no suffix.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ""})
CHUNK = 200
# Ids are cut to this many characters plus '-' and a 12-hex-digit hash of the whole relative path.
_LONG_ID = 100


@dataclass(frozen=True)
class IngestItem:
    """One image to queue: its scan id, where its bytes are, and whether to upload them."""

    scan_id: str
    location: str  # local path or s3://bucket/key
    priority: Priority = Priority.ROUTINE

    @property
    def is_local(self) -> bool:
        """True when the bytes are in a local file (uploaded unless referencing is asked for)."""
        return "://" not in self.location


@dataclass
class Discovery:
    """What a source holds: the images to queue, how many entries were seen, and those skipped by reason."""

    items: list[IngestItem] = field(default_factory=list)
    seen: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        """Count one entry left out, under a reason a person understands."""
        self.skipped[reason] += 1

    def summary(self, queued: int | None = None) -> str:
        """One line: files seen, scans queued (when known), files skipped with the reasons."""
        parts = [f"{self.seen} file(s) seen"]
        if queued is not None:
            parts.append(f"{queued} scan(s) queued")
        else:
            parts.append(f"{len(self.items)} image(s)")
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        parts.append(f"{skipped} skipped" + (f" ({reasons})" if reasons else ""))
        return ", ".join(parts)


def scan_id_for(relative: str) -> str:
    """The scan id of a file: its relative path with the extension kept, '/' and unsafe characters as '_'.

    Keeping the extension means a.png and a.jpg are two scans; long or odd names get a hash of the
    whole path. Two paths that still map to one id are refused by discover(), never renumbered.
    """
    candidate = re.sub(r"[^A-Za-z0-9._-]+", "_", relative.replace("\\", "/").replace("/", "_"))
    candidate = re.sub(r"\.{2,}", ".", candidate).lstrip("._-") or "scan"
    if len(candidate) > _LONG_ID or not is_valid_scan_id(candidate):
        digest = hashlib.sha256(relative.encode()).hexdigest()[:12]
        candidate = f"{candidate[:_LONG_ID].rstrip('._-') or 'scan'}-{digest}"
    return candidate


def discover(source: str, settings: Settings) -> list[IngestItem]:
    """The images a source names: a folder (recursive), s3://bucket/prefix, or a CSV list."""
    return survey(source, settings).items


def survey(source: str, settings: Settings) -> Discovery:
    """discover() with the count of entries seen and of those skipped, by reason."""
    if source.startswith("s3://"):
        return _from_s3(source, settings)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path)
    if path.is_dir():
        return _from_folder(path)
    raise SubmissionError(f"no folder, .csv list or s3:// prefix at {source}")


def _suffix_reason(name: str) -> str | None:
    """Why a file name is not ingested, or None if it is an image name."""
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image suffix ({suffix})"
    return None


def _from_folder(root: Path) -> Discovery:
    found = Discovery()
    labels: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found.seen += 1
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            found.skip("hidden")
            continue
        reason = _suffix_reason(path.name)
        if reason:
            found.skip(reason)
            continue
        found.items.append(IngestItem(scan_id_for(relative.as_posix()), str(path.resolve())))
        labels.append(relative.as_posix())
    _refuse_duplicates(found.items, labels)
    return found


def _from_s3(uri: str, settings: Settings) -> Discovery:
    bucket_url, _, prefix = uri[len("s3://") :].partition("/")
    store = cached_store(f"s3://{bucket_url}", endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    found = Discovery()
    for key in store.list(prefix):
        found.seen += 1
        reason = _suffix_reason(key)
        if reason:
            found.skip(reason)
            continue
        found.items.append(IngestItem(scan_id_for(key[len(prefix) :].lstrip("/") or key), f"s3://{bucket_url}/{key}"))
    _refuse_duplicates(found.items, [item.location for item in found.items])
    return found


def _from_csv(path: Path) -> Discovery:
    """Rows with a `path` (or `uri`) column and optional `scan_id` and `priority` columns."""
    found = Discovery()
    labels: list[str] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        location_column = "path" if "path" in columns else "uri" if "uri" in columns else None
        if location_column is None:
            raise SubmissionError(f"{path.name}: needs a 'path' or 'uri' column (has {sorted(columns)})")
        for line, row in enumerate(reader, start=2):
            found.seen += 1
            location = (row.get(location_column) or "").strip()
            if not location:
                raise SubmissionError(f"{path.name}:{line}: empty {location_column}")
            if "://" not in location:
                location = str((path.parent / location).resolve())
            scan_id = (row.get("scan_id") or "").strip() or scan_id_for(Path(location).name)
            if not is_valid_scan_id(scan_id):
                raise SubmissionError(f"{path.name}:{line}: scan_id must be {SCAN_ID_RULE}")
            try:
                priority = Priority((row.get("priority") or Priority.ROUTINE).strip())
            except ValueError:
                raise SubmissionError(f"{path.name}:{line}: priority must be stat or routine") from None
            labels.append(f"{path.name}:{line} ({Path(location).name})")
            found.items.append(IngestItem(scan_id, location, priority))
    _refuse_duplicates(found.items, labels)
    return found


def _refuse_duplicates(items: list[IngestItem], labels: list[str]) -> None:
    """Raise SubmissionError naming both entries (labels[i] names items[i]) when two would become one scan id."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        other = first.setdefault(item.scan_id, index)
        if other != index:
            raise SubmissionError(
                f"{labels[other]} and {labels[index]} would both be scan id {item.scan_id!r}: "
                "rename one of them (or give scan_id in a CSV list); nothing was queued"
            )


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
        return existing_scan_ids(session, scan_ids)


def _refuse_replacing_dicom(
    items: list[IngestItem], *, store: ObjectStore, sessions: sessionmaker[Session], force: bool, reference_local: bool
) -> None:
    """Raise SubmissionError, before anything is stored, if an item would replace a scan received over DICOM."""
    with sessions() as session:
        received = dicom_received_ids(session, [item.scan_id for item in items])
    replacing = [
        item
        for item in items
        if item.scan_id in received
        and (
            # rescreen replaces only a local upload whose bytes differ from the stored image.
            force
            or (
                item.is_local
                and not reference_local
                and _stored_bytes(store, item.scan_id) != Path(item.location).read_bytes()
            )
        )
    ]
    if replacing:
        raise SubmissionError(
            f"{Path(replacing[0].location).name} (and {len(replacing) - 1} more) would replace an image received over "
            "DICOM, which only the DICOM path (C-STORE or a DICOMweb pull) may replace: nothing was queued"
        )


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
    if force or rescreen:
        _refuse_replacing_dicom(items, store=store, sessions=sessions, force=force, reference_local=reference_local)
    total = SubmitResult()
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        existing = set() if force else _existing(sessions, [item.scan_id for item in chunk])
        scans: list[NewScan] = []
        changed: list[NewScan] = []
        for item in chunk:
            if item.scan_id in existing and rescreen and item.is_local and not reference_local:
                data = Path(item.location).read_bytes()
                if _stored_bytes(store, item.scan_id) != data:
                    store.put(scan_key(item.scan_id), data)
                    changed.append(NewScan(item.scan_id, scan_key(item.scan_id), item.priority))
                    continue
                scans.append(NewScan(item.scan_id, scan_key(item.scan_id), item.priority))
            elif item.scan_id in existing:
                # Overwriting it would silently change the input behind a finished result.
                scans.append(NewScan(item.scan_id, scan_key(item.scan_id), item.priority))
            elif item.is_local and not reference_local:
                # Uploaded, so workers on other machines can read it: they share only the store.
                key = scan_key(item.scan_id)
                store.put(key, Path(item.location).read_bytes())
                scans.append(NewScan(item.scan_id, key, item.priority))
            else:
                scans.append(NewScan(item.scan_id, item.location, item.priority))
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
