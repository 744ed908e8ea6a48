"""The HTML report of a batch: each scan's label and probability per model, overlay beside the original."""

from __future__ import annotations

import html
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from shared import db
from shared.imaging import ImageDecodeError, decode_image, fit_within, to_uint8
from shared.results import BatchProgress
from shared.sources import SourceFetcher
from shared.store import ObjectStore

THUMBNAIL_SIDE = 384

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.4rem .6rem;vertical-align:top;text-align:left}
img{width:192px;height:auto;display:block;background:#000}
.covid{color:#b00020;font-weight:600}.normal{color:#1b5e20}.failed{color:#b00020}
figure{margin:0;display:inline-block;margin-right:.5rem}figcaption{font-size:.8rem;color:#555}
.note{color:#555;font-size:.9rem}
"""


def _thumbnail_jpeg(data: bytes) -> bytes:
    """A small JPEG of an image (original scans may be DICOM, which browsers cannot show)."""
    image = fit_within(to_uint8(decode_image(data)), THUMBNAIL_SIDE)
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def write_report(
    out_html: Path,
    progress: BatchProgress,
    scans: list[db.Scan],
    *,
    store: ObjectStore,
    fetcher: SourceFetcher,
    threads: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Write out_html plus a sibling `<name>_files/` folder of thumbnails; returns the HTML path."""
    assets = out_html.with_name(out_html.stem + "_files")
    assets.mkdir(parents=True, exist_ok=True)

    def prepare(scan: db.Scan) -> str:
        cells = [f"<td>{html.escape(scan.scan_id)}</td>"]
        figures = []
        try:
            original = assets / f"{scan.scan_id}.jpg"
            original.write_bytes(_thumbnail_jpeg(fetcher.fetch(scan.source_uri)))
            figures.append(_figure(f"{assets.name}/{original.name}", "original"))
        except (ImageDecodeError, KeyError, OSError, RuntimeError):
            figures.append("<span class='note'>original unavailable</span>")
        rows = []
        for prediction in scan.predictions:
            rows.append(
                f"<div class='{html.escape(prediction.label)}'>{html.escape(prediction.model_name)} "
                f"{html.escape(prediction.model_version)}: {html.escape(prediction.label)} "
                f"(p_covid {prediction.p_covid:.3f})</div>"
            )
            if prediction.overlay_key:
                name = f"{scan.scan_id}.{prediction.model_name}.png"
                try:
                    overlay = store.get(prediction.overlay_key)
                    (assets / name).write_bytes(_shrink_png(overlay))
                    figures.append(_figure(f"{assets.name}/{name}", f"Grad-CAM {prediction.model_name}"))
                except (KeyError, RuntimeError):
                    figures.append("<span class='note'>overlay unavailable</span>")
        if scan.status == "failed":
            rows.append(f"<div class='failed'>failed: {html.escape(scan.error or '')}</div>")
        elif not scan.predictions:
            rows.append(f"<div class='note'>{html.escape(scan.status)}</div>")
        cells.append(f"<td>{''.join(rows)}</td>")
        cells.append(f"<td>{''.join(figures)}</td>")
        if on_progress:
            on_progress(1)
        return f"<tr>{''.join(cells)}</tr>"

    with ThreadPoolExecutor(threads) as pool:
        body_rows = list(pool.map(prepare, scans))
    counts = ", ".join(f"{name} {count}" for name, count in progress.counts.items() if name != "total")
    title = f"lungcam batch {progress.name or progress.batch_id}"
    out_html.write_text(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>batch {html.escape(progress.batch_id)}: {progress.total} scans ({html.escape(counts)}). "
        "Grad-CAM shows where the model looked, not a diagnosis; screening aid only.</p>"
        "<table><thead><tr><th>scan</th><th>result</th><th>images</th></tr></thead><tbody>"
        + "".join(body_rows)
        + "</tbody></table></body></html>"
    )
    return out_html


def _figure(src: str, caption: str) -> str:
    return f"<figure><img src='{html.escape(src)}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"


def _shrink_png(data: bytes) -> bytes:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError("overlay is not a PNG")
    image = fit_within(image, THUMBNAIL_SIDE)
    return cv2.imencode(".png", image)[1].tobytes()
