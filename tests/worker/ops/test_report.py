"""The HTML report in headless Chromium: banner, what the model is, agreement with true labels, summary counts,
sorting, filtering, and every link loads; and the true labels and agreement behind it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import ARTIFACTS, headless_chromium

from shared.bundle import read_manifest
from shared.calibration import AUDIT_PASSED
from shared.domain import Status
from shared.engine import make_engine, make_session_factory, migrate
from shared.overlay import overlay_png
from shared.results import get_batch_progress, list_batch_scans
from shared.scans import NewScan, PredictionRow, add_scans, mark_scans, upsert_predictions
from shared.settings import Settings
from shared.shipped import shipped_model_dir
from shared.sources import SourceFetcher
from shared.store import LocalStore, overlay_key, scan_key
from shared.synthetic import make_dicom, synthetic_xray
from worker.ops.ingest import IngestItem
from worker.ops.model_facts import model_facts
from worker.ops.report import write_report
from worker.ops.truth import Agreement, agreement, true_labels

DEMO = ("demo-densenet121", "synthetic-1")
OTHER = ("resnet50-test", "t1")
P_COVID = {"s-a": 0.91, "s-b": 0.12, "s-c": 0.55, "s-d": 0.03}
TRUTH = {"s-a": "covid", "s-b": "normal", "s-c": "normal", "s-d": "normal"}


@pytest.fixture
def batch(tmp_path: Path):
    """A batch recorded as workers would leave it: 4 scans with two models' predictions, 1 failed, 1 skipped."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    store = LocalStore(tmp_path / "store")
    rng = np.random.default_rng(3)
    scans, rows = [], []
    for index, (scan_id, p) in enumerate(P_COVID.items()):
        image = synthetic_xray(rng, 128, covid=p > 0.5).image
        data = (
            make_dicom(image.astype(np.uint16) * 16, bits_stored=12)
            if index == 0
            else cv2.imencode(".png", image)[1].tobytes()
        )
        store.put(scan_key(scan_id), data)
        scans.append(NewScan(scan_id, scan_key(scan_id)))
        for (name, version), shift in ((DEMO, 0.0), (OTHER, 0.01)):
            key = overlay_key(name, version, scan_id)
            store.put(key, overlay_png(image, rng.random((8, 8)).astype(np.float32)), "image/png")
            prob = min(1.0, p + shift)
            rows.append(
                PredictionRow(
                    scan_id=scan_id,
                    model_name=name,
                    model_version=version,
                    label="covid" if prob >= 0.5 else "normal",
                    p_covid=prob,
                    overlay_key=key,
                    inference_ms=1.0,
                )
            )
    scans.append(NewScan("s-bad", scan_key("s-bad")))
    store.put(scan_key("s-bad"), b"not an image")
    with sessions.begin() as session:
        add_scans(session, scans, "b1", batch_name="report test")
        upsert_predictions(session, rows)
        mark_scans(session, list(P_COVID), Status.DONE, finished=True)
        mark_scans(session, ["s-bad"], Status.FAILED, error="undecodable image: not an image", finished=True)
    with sessions() as session:
        progress, loaded = get_batch_progress(session, "b1"), list_batch_scans(session, "b1")
    settings = Settings(data_dir=tmp_path / "data", store_url=str(tmp_path / "store"))
    yield progress, loaded, store, SourceFetcher(store, settings)
    engine.dispose()


def test_report_in_chromium_banner_summary_sorting_filter_and_links(batch, tmp_path: Path):
    progress, scans, store, fetcher = batch
    shipped = read_manifest(shipped_model_dir())
    page = write_report(
        tmp_path / "report.html",
        progress,
        scans,
        store=store,
        fetcher=fetcher,
        demonstration_models=[DEMO],
        model_facts=[model_facts(shipped)],
        true_labels=TRUTH,
        agreements=agreement(scans, TRUTH, {DEMO}),
    )
    html = page.read_text()
    assert "<script src" not in html and "http://" not in html and "https://" not in html  # readable offline
    assert "the map shows the regions that raised the score of the predicted class" in html.lower()
    ARTIFACTS.mkdir(exist_ok=True)
    with headless_chromium(1400, 1000) as driver:
        driver.get(page.as_uri())
        banner = driver.find_element("id", "demo-banner").text
        assert "DEMONSTRATION MODEL" in banner
        # What the model is: name and version, audit verdict, leave-one-source-out AUC, operating point.
        facts = driver.execute_script(
            "const out = {}; document.querySelectorAll('#models td[data-fact]').forEach("
            "  td => out[td.dataset.fact] = td.textContent); return out;"
        )
        assert facts["model"] == f"{shipped['name']} {shipped['version']}"
        loso = shipped["leave_one_source_out"]
        assert f"mean {loso['mean_auc']:.3f}" in facts["leave-one-source-out AUC"]
        assert f"{loso['worst_pair'][1]:.3f}" in facts["leave-one-source-out AUC"]
        verdict = (shipped.get("audit") or {}).get("verdict")
        assert facts["shortcut audit"].startswith(verdict or "never audited")
        assert f"{shipped['calibration']['threshold']:.3f}" in facts["operating point"]
        warnings = driver.execute_script(
            "return [...document.querySelectorAll('.audit-warning')].map(d => d.textContent);"
        )
        assert bool(warnings) == (verdict != AUDIT_PASSED)
        # True labels beside each scan, and the agreement: s-c (p 0.55) is a false positive.
        truth = driver.execute_script(
            "const out = {}; document.querySelectorAll('#scans tbody tr').forEach("
            "  r => out[r.dataset.scan] = r.querySelector('td.truth').textContent); return out;"
        )
        assert truth == {**TRUTH, "s-bad": "-"}
        figures = driver.execute_script(
            "const out = {}; document.querySelectorAll('#agreement tr[data-model=\"demo-densenet121 synthetic-1\"] td[data-figure]')"
            ".forEach(td => out[td.dataset.figure] = td.textContent); return out;"
        )
        assert figures == {
            "accuracy": "0.75 (3/4)",
            "sensitivity": "1.00 (1/1 covid)",
            "specificity": "0.67 (2/3 normal)",
        }
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
        order = (
            "return [...document.querySelectorAll('#scans tbody tr')].filter(r => !r.hidden).map(r => r.dataset.scan);"
        )
        driver.execute_script(
            "const s = document.getElementById('sort'); s.value = 'desc'; s.dispatchEvent(new Event('change'));"
        )
        assert driver.execute_script(order) == ["s-a", "s-c", "s-b", "s-d", "s-bad"]
        driver.execute_script(
            "const s = document.getElementById('sort'); s.value = 'asc'; s.dispatchEvent(new Event('change'));"
        )
        assert driver.execute_script(order)[:4] == ["s-bad", "s-d", "s-b", "s-c"]
        driver.execute_script(
            "const f = document.getElementById('filter'); f.value = 'covid'; f.dispatchEvent(new Event('change'));"
        )
        assert sorted(driver.execute_script(order)) == ["s-a", "s-c"]
        driver.execute_script(
            "const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('change'));"
        )
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
    # Without true labels or model facts: no true-label column, no agreement, no model table.
    assert 'class="truth"' not in html and 'id="agreement"' not in html and 'id="models"' not in html


def test_true_labels_from_a_manifest_or_from_covid_and_normal_folders(tmp_path: Path):
    """Keys are ingest's scan ids (extension kept), whichever way the labels are given."""
    for relative in ("covid/a.png", "normal/a.jpg", "normal/deeper/b.dcm", "other/c.png", "d.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    from worker.ops.ingest import survey

    items = survey(str(tmp_path), Settings(data_dir=tmp_path / "data"))
    assert true_labels(tmp_path, items.items) == {
        "covid_a.png": "covid",
        "normal_a.jpg": "normal",
        "normal_deeper_b.dcm": "normal",
    }
    (tmp_path / "manifest.csv").write_text("file,label\nd.png,COVID\nother/c.png,normal\ncovid/a.png,unknown\n")
    assert true_labels(tmp_path, items.items) == {"d.png": "covid", "other_c.png": "normal"}
    assert true_labels(tmp_path, [IngestItem("x.png", str(tmp_path / "x.png"))]) == {}


def test_agreement_counts_indeterminate_calls_as_misses(batch):
    _, scans, _, _ = batch
    (demo,) = agreement(scans, TRUTH, {DEMO})
    assert (demo.true_positive, demo.false_negative, demo.true_negative, demo.false_positive) == (1, 0, 2, 1)
    assert demo.line().endswith("accuracy 0.75 (3/4), sensitivity 1.00 (1/1 covid), specificity 0.67 (2/3 normal)")
    both = agreement(scans, TRUTH)
    assert [a.model for a in both] == ["demo-densenet121 synthetic-1", "resnet50-test t1"]
    undecided = Agreement("m v", 1, 0, 1, 0, other_covid=1)
    assert undecided.figures()[0][1:] == (2 / 3, "2/3") and undecided.figures()[1][1:] == (0.5, "1/2 covid")
    assert "1 indeterminate, counted as misses" in undecided.line()


def test_model_facts_of_a_bare_manifest_say_what_is_missing():
    facts = model_facts({"name": "m", "version": "1", "demonstration": True})
    assert facts.leave_one_source_out == "not measured" and facts.audit == "never audited"
    assert "uncalibrated" in facts.operating_point
    assert len(facts.warnings) == 2 and "DEMONSTRATION MODEL" in facts.warnings[0] and "never" in facts.warnings[1]
    passed = model_facts(
        {
            "name": "m",
            "version": "1",
            "audit": {"verdict": AUDIT_PASSED},
            "dataset": {"n_by_label": {"covid": 2, "normal": 3}, "data_paths": ["/home/x/data/set-a"]},
        }
    )
    assert passed.warnings == [] and passed.audit == AUDIT_PASSED
    assert passed.training_data == "5 images (2 covid, 3 normal) from set-a"


def test_report_escapes_what_it_shows(batch, tmp_path: Path):
    """Scan ids and error texts come from callers: autoescaped, never markup."""
    progress, scans, store, fetcher = batch
    (bad,) = [scan for scan in scans if scan.scan_id == "s-bad"]
    bad.error = "<script>alert(1)</script>"
    html = write_report(tmp_path / "r.html", progress, scans, store=store, fetcher=fetcher).read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
