"""The HTML report of a batch: a summary, then each scan's label and probability per model, overlays beside the original.

One page rendered with Jinja2 (autoescaped) plus a sibling `<name>_files/` folder of thumbnails and
full-size images; no external scripts, styles or fonts, so it reads offline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from shared.imaging.decode import decode_image
from shared.imaging.formats import probe
from shared.imaging.limits import ImageDecodeError
from shared.imaging.preprocess import fit_within, to_uint8
from shared.models import Scan
from shared.results import BatchProgress
from shared.sources import SourceFetcher
from shared.store import ObjectStore, StoreError
from worker.ops.model_facts import ModelFacts
from worker.ops.truth import Agreement

THUMBNAIL_SIDE = 384
LABELS = ("covid", "normal")
DEMONSTRATION_TEXT = "trained on synthetic images, not on patients. Its outputs mean nothing clinically."
_READ_ERRORS = (ImageDecodeError, KeyError, OSError, StoreError, RuntimeError)

ModelKey = tuple[str, str]


@dataclass
class _Image:
    thumb: str
    full: str


@dataclass
class _Overlay:
    model_name: str
    model_version: str
    thumb: str | None = None
    full: str | None = None


@dataclass
class _Row:
    scan_id: str
    status: str
    error: str | None
    predictions: list[dict[str, Any]]
    true_label: str | None = None
    original: _Image | None = None
    overlays: list[_Overlay] = field(default_factory=list)

    @property
    def p_max(self) -> float | None:
        """The highest p_covid of the shown predictions (the sort key)."""
        return max((p["p_covid"] for p in self.predictions), default=None)

    @property
    def labels(self) -> list[str]:
        """Labels this row matches in the filter: its predictions' labels, or its status."""
        return [p["label"] for p in self.predictions] + [self.status]


def _environment() -> Environment:
    return Environment(loader=PackageLoader("worker.ops", "templates"), autoescape=select_autoescape(["html", "j2"]))


def _jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])[
        1
    ].tobytes()


def _shrink(data: bytes) -> bytes:
    """A thumbnail JPEG of an overlay PNG (or JPEG/WebP)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError("overlay is not an image")
    return cv2.imencode(".jpg", fit_within(image, THUMBNAIL_SIDE), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def _prediction_cells(scan: Scan, current: set[ModelKey] | None) -> list[dict[str, Any]]:
    """What the page shows of each of the scan's predictions; older when its model is not among current."""
    return [
        {
            "model_name": p.model_name,
            "model_version": p.model_version,
            "label": p.label,
            "p_covid": p.p_covid,
            "threshold": p.threshold,
            "cam_note": p.cam_note,
            "older": current is not None and (p.model_name, p.model_version) not in current,
        }
        for p in scan.predictions
    ]


def _write_original(scan: Scan, fetcher: SourceFetcher, assets: Path) -> _Image | None:
    """The scan's image as a thumbnail and a full-size JPEG in assets; None when it cannot be read."""
    try:
        data = fetcher.fetch(scan.source_uri)
        # The shared size guard first: a deflate bomb or a lying header gets no thumbnail, and costs nothing.
        probed = probe(data)
        probed.check()
        image = to_uint8(decode_image(data, probed=probed))
        # Browsers cannot show DICOM or 16-bit PNG: both sizes are written as 8-bit JPEG.
        (assets / f"{scan.scan_id}.jpg").write_bytes(_jpeg(fit_within(image, THUMBNAIL_SIDE)))
        (assets / f"{scan.scan_id}.full.jpg").write_bytes(_jpeg(image, 92))
    except _READ_ERRORS:
        return None
    stem = f"{assets.name}/{scan.scan_id}"
    return _Image(f"{stem}.jpg", f"{stem}.full.jpg")


def _write_overlays(scan: Scan, store: ObjectStore, assets: Path) -> list[_Overlay]:
    """Each prediction's Grad-CAM overlay, as stored and as a thumbnail, in assets (without files when unreadable)."""
    overlays = []
    for p in scan.predictions:
        overlay = _Overlay(p.model_name, p.model_version)
        if p.overlay_key:
            name = f"{scan.scan_id}.{p.model_name}.{p.model_version}"
            suffix = Path(p.overlay_key).suffix or ".png"
            try:
                data = store.get(p.overlay_key)
                (assets / f"{name}{suffix}").write_bytes(data)
                (assets / f"{name}.thumb.jpg").write_bytes(_shrink(data))
                overlay.thumb, overlay.full = f"{assets.name}/{name}.thumb.jpg", f"{assets.name}/{name}{suffix}"
            except _READ_ERRORS:
                pass
        overlays.append(overlay)
    return overlays


def _label_counts(rows: Sequence[_Row]) -> dict[str, Counter[str]]:
    """How many scans each model labelled with each label, by "name version"."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        for p in row.predictions:
            counts.setdefault(f"{p['model_name']} {p['model_version']}", Counter())[p["label"]] += 1
    return counts


def write_report(
    out_html: Path,
    progress: BatchProgress,
    scans: list[Scan],
    *,
    store: ObjectStore,
    fetcher: SourceFetcher,
    current_models: Collection[ModelKey] | None = None,
    demonstration_models: Collection[ModelKey] = (),
    model_facts: Sequence[ModelFacts] = (),
    true_labels: Mapping[str, str] | None = None,
    agreements: Sequence[Agreement] = (),
    agreement_note: str | None = None,
    threads: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Write out_html plus a sibling `<name>_files/` folder of images; returns the HTML path.

    With current_models, predictions of other models are shown marked "older model"; pass the
    scans' predictions already filtered to hide them. model_facts describe the models (with their
    warnings); true_labels (scan id -> label) add a true-label column, agreements their summary
    (with agreement_note, e.g. how far the figures generalise).
    """
    assets = out_html.with_name(out_html.stem + "_files")
    assets.mkdir(parents=True, exist_ok=True)
    current = set(current_models) if current_models is not None else None

    def prepare(scan: Scan) -> _Row:
        row = _Row(
            scan.scan_id,
            scan.status,
            scan.error,
            _prediction_cells(scan, current),
            true_label=(true_labels or {}).get(scan.scan_id),
            original=_write_original(scan, fetcher, assets),
            overlays=_write_overlays(scan, store, assets),
        )
        if on_progress:
            on_progress(1)
        return row

    with ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(prepare, scans))
    label_counts = _label_counts(rows)
    shown = {(p["model_name"], p["model_version"]) for row in rows for p in row.predictions}
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=f"lungcam batch {progress.name or progress.batch_id}",
            batch_id=progress.batch_id,
            total=progress.total,
            demonstration=bool(shown & set(demonstration_models)),
            demonstration_text=DEMONSTRATION_TEXT,
            status_counts=[(name, count) for name, count in progress.counts.items() if name != "total"],
            label_counts=sorted(label_counts.items()),
            labels=sorted({*LABELS, *(label for counts in label_counts.values() for label in counts)}),
            rows=rows,
            model_facts=list(model_facts),
            # A demonstration model has its own banner (above); this one says which audits failed or never ran.
            audit_warnings=[facts.audit_warning for facts in model_facts if facts.audit_warning],
            show_truth=bool(true_labels),
            agreements=list(agreements),
            agreement_note=agreement_note,
        )
    )
    out_html.write_text(html)
    return out_html
