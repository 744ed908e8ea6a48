"""A worker labels with the bundle's operating point (calibrated p_covid against its threshold), not argmax."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import make_tiny_bundle, mixed_scans

from shared.engine import make_engine, make_session_factory, migrate
from shared.models import Prediction
from shared.scans import NewScan, add_scans
from shared.settings import Settings
from shared.store import LocalStore, scan_key
from worker.consumer.classifier import ScanClassifier
from worker.consumer.served import load_served_models


def _classify(tmp_path: Path, calibration: dict | None) -> list[Prediction]:
    bundle = make_tiny_bundle(tmp_path / "bundle", 64)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if calibration is not None:
        # Only the manifest changes; the model file (and its verified sha256) stays as trained.
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "calibration": calibration}))
    url = f"sqlite:///{tmp_path / 'w.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        store_url=str(tmp_path / "store"),
        models=str(bundle),
        decode_processes=0,
    )
    store = LocalStore(tmp_path / "store")
    scans = mixed_scans(6, size=64)
    for scan_id, data in scans.items():
        store.put(scan_key(scan_id), data)
    with sessions.begin() as session:
        add_scans(session, [NewScan(s, scan_key(s)) for s in scans], None)
    classifier = ScanClassifier(load_served_models(settings), store, sessions, settings)
    try:
        outcome = classifier.process(list(scans))
        assert sorted(outcome.done) == sorted(scans)
        with sessions() as session:
            return list(session.query(Prediction).order_by(Prediction.scan_id))
    finally:
        classifier.close()
        engine.dispose()


@pytest.mark.parametrize("threshold, label", [(1e-9, "covid"), (1 - 1e-9, "normal")])
def test_the_label_follows_the_bundles_threshold(tmp_path: Path, threshold: float, label: str):
    predictions = _classify(tmp_path, {"temperature": 1.0, "threshold": threshold})
    assert {p.label for p in predictions} == {label}
    assert all(p.threshold == pytest.approx(threshold) for p in predictions)


def test_temperature_and_band_are_applied(tmp_path: Path):
    """A huge temperature pulls every calibrated p_covid to ~0.5, inside a band around it: indeterminate."""
    plain = _classify(tmp_path / "plain", None)
    assert {p.threshold for p in plain} == {0.5}
    assert all(p.label == ("covid" if p.p_covid >= 0.5 else "normal") for p in plain)
    flat = _classify(tmp_path / "flat", {"temperature": 1e6, "threshold": 0.5, "indeterminate_band": [0.45, 0.55]})
    assert all(abs(p.p_covid - 0.5) < 1e-3 for p in flat)
    assert {p.label for p in flat} == {"indeterminate"}


def test_a_bundle_that_never_ran_the_audit_is_named_in_a_warning_at_start(tmp_path: Path, caplog):
    bundle = make_tiny_bundle(tmp_path / "bundle", 64)
    settings = Settings(data_dir=tmp_path / "data", models=str(bundle))
    with caplog.at_level(logging.WARNING, logger="worker.consumer.served"):
        load_served_models(settings)
    assert any("tiny-test" in record.getMessage() and "audit" in record.getMessage() for record in caplog.records)
