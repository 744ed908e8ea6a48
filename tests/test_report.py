"""The HTML report in headless Chromium: banner, summary counts, sorting, filtering, and every link loads."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import ARTIFACTS, headless_chromium
from shared import db
from shared.overlay import overlay_png
from shared.results import get_batch_progress, list_batch_scans
from shared.settings import Settings
from shared.sources import SourceFetcher
from shared.store import LocalStore, overlay_key, scan_key
from shared.synthetic import make_dicom, synthetic_xray
from worker.ops.report import write_report

DEMO = ("demo-densenet121", "synthetic-1")
OTHER = ("resnet50-test", "t1")
P_COVID = {"s-a": 0.91, "s-b": 0.12, "s-c": 0.55, "s-d": 0.03}


@pytest.fixture
def batch(tmp_path: Path):
    """A batch recorded as workers would leave it: 4 scans with two models' predictions, 1 failed, 1 skipped."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    db.migrate(url)
    engine = db.make_engine(url)
    sessions = db.make_session_factory(engine)
    store = LocalStore(tmp_path / "store")
    rng = np.random.default_rng(3)
    scans, rows = [], []
    for index, (scan_id, p) in enumerate(P_COVID.items()):
        image = synthetic_xray(rng, 128, covid=p > 0.5).image
        data = make_dicom(image.astype(np.uint16) * 16, bits_stored=12) if index == 0 else cv2.imencode(".png", image)[1].tobytes()
        store.put(scan_key(scan_id), data)
        scans.append({"scan_id": scan_id, "source_uri": scan_key(scan_id)})
        for (name, version), shift in ((DEMO, 0.0), (OTHER, 0.01)):
            key = overlay_key(name, version, scan_id)
            store.put(key, overlay_png(image, rng.random((8, 8)).astype(np.float32)), "image/png")
            prob = min(1.0, p + shift)
            rows.append({"scan_id": scan_id, "model_name": name, "model_version": version,
                         "label": "covid" if prob >= 0.5 else "normal", "p_covid": prob, "overlay_key": key,
                         "inference_ms": 1.0})
    scans.append({"scan_id": "s-bad", "source_uri": scan_key("s-bad")})
    store.put(scan_key("s-bad"), b"not an image")
    with sessions.begin() as session:
        db.add_scans(session, scans, "b1", batch_name="report test")
        db.upsert_predictions(session, rows)
        db.mark_scans(session, list(P_COVID), db.DONE, finished=True)
        db.mark_scans(session, ["s-bad"], db.FAILED, error="undecodable image: not an image", finished=True)
    with sessions() as session:
        progress, loaded = get_batch_progress(session, "b1"), list_batch_scans(session, "b1")
    settings = Settings(data_dir=tmp_path / "data", store_url=str(tmp_path / "store"))
    yield progress, loaded, store, SourceFetcher(store, settings)
    engine.dispose()


def test_report_in_chromium_banner_summary_sorting_filter_and_links(batch, tmp_path: Path):
    progress, scans, store, fetcher = batch
    page = write_report(tmp_path / "report.html", progress, scans, store=store, fetcher=fetcher,
                        demonstration_models=[DEMO])
    html = page.read_text()
    assert "<script src" not in html and "http://" not in html and "https://" not in html  # readable offline
    assert "the map shows the regions that raised the score of the predicted class" in html.lower()
    ARTIFACTS.mkdir(exist_ok=True)
    with headless_chromium(1400, 1000) as driver:
        driver.get(page.as_uri())
        banner = driver.find_element("id", "demo-banner").text
        assert "DEMONSTRATION MODEL" in banner
        counts = driver.execute_script(
            "const out = {};"
            "document.querySelectorAll('#summary td[data-status]').forEach(td => out[td.dataset.status] = +td.textContent);"
            "document.querySelectorAll('#summary td[data-model]').forEach("
            "  td => out[td.dataset.model + '/' + td.dataset.label] = +td.textContent);"
            "return out;"
        )
        assert counts["done"] == 4 and counts["failed"] == 1 and counts["queued"] == 0
        assert counts["demo-densenet121 synthetic-1/covid"] == 2 and counts["demo-densenet121 synthetic-1/normal"] == 2
        # Sorting by probability, highest first, then lowest first.
        order = "return [...document.querySelectorAll('#scans tbody tr')].filter(r => !r.hidden).map(r => r.dataset.scan);"
        driver.execute_script("const s = document.getElementById('sort'); s.value = 'desc'; s.dispatchEvent(new Event('change'));")
        assert driver.execute_script(order) == ["s-a", "s-c", "s-b", "s-d", "s-bad"]
        driver.execute_script("const s = document.getElementById('sort'); s.value = 'asc'; s.dispatchEvent(new Event('change'));")
        assert driver.execute_script(order)[:4] == ["s-bad", "s-d", "s-b", "s-c"]
        driver.execute_script("const f = document.getElementById('filter'); f.value = 'covid'; f.dispatchEvent(new Event('change'));")
        assert sorted(driver.execute_script(order)) == ["s-a", "s-c"]
        driver.execute_script("const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('change'));")
        # Every thumbnail is shown and links to a full-size image that loads too.
        result = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const imgs = [...document.images];"
            "const links = imgs.map(i => i.closest('a') ? i.closest('a').href : null);"
            "const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;"
            "Promise.all(links.map(href => new Promise(ok => { if (!href) return ok(false);"
            "  const im = new Image(); im.onload = () => ok(im.naturalWidth > 0); im.onerror = () => ok(false); im.src = href; })))"
            ".then(loaded => done([imgs.length, broken, loaded.filter(Boolean).length]));"
        )
        driver.save_screenshot(str(ARTIFACTS / "report.png"))
    total, broken, links_loaded = result
    # 4 originals + 4 x 2 overlays; the failed scan's original is unreadable and says so.
    assert (total, broken, links_loaded) == (12, 0, 12)
    shot = cv2.imread(str(ARTIFACTS / "report.png"))
    assert shot is not None and float(shot.std()) > 20


def test_no_banner_without_a_demonstration_model(batch, tmp_path: Path):
    progress, scans, store, fetcher = batch
    html = write_report(tmp_path / "r.html", progress, scans, store=store, fetcher=fetcher).read_text()
    assert "demo-banner" not in html


def test_report_escapes_what_it_shows(batch, tmp_path: Path):
    """Scan ids and error texts come from callers: autoescaped, never markup."""
    progress, scans, store, fetcher = batch
    (bad,) = [scan for scan in scans if scan.scan_id == "s-bad"]
    bad.error = "<script>alert(1)</script>"
    html = write_report(tmp_path / "r.html", progress, scans, store=store, fetcher=fetcher).read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
