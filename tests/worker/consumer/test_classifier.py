"""The classifier's stages in-process, with two versions of one real (tiny) TF model, SQLite and a local store.

What is under test is which model runs on which scan, that every overlay of a scan counts, and what the
returned outcome calls each scan; workers, Redis and retries are tested in test_worker.py and test_retries.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_tiny_bundle, mixed_scans
from sqlalchemy import select

from shared.domain import ModelKey, Status
from shared.engine import make_engine, make_session_factory, migrate
from shared.models import Prediction, Scan
from shared.scans import NewScan, PredictionRow, add_scans, upsert_predictions
from shared.settings import Settings
from shared.store import LocalStore, StoreError, overlay_key, scan_key
from shared.synthetic import make_dicom, synthetic_xray
from worker.consumer.classifier import ScanClassifier
from worker.consumer.served import ServedModel, load_served_models

V1, V2 = ModelKey("tiny-test", "t1"), ModelKey("tiny-test", "t2")
KEPT = "kept"  # the overlay key of a prediction recorded before the test's batch


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> list[ServedModel]:
    """tiny-test/t1 and tiny-test/t2: one model name, two versions, both served."""
    root = tmp_path_factory.mktemp("bundles")
    paths = []
    for key in (V1, V2):
        path = make_tiny_bundle(root / key.version, 64)
        manifest = json.loads((path / "manifest.json").read_text())
        # Only the manifest changes; the model file (and its verified sha256) stays as saved.
        (path / "manifest.json").write_text(json.dumps({**manifest, "version": key.version}))
        paths.append(path)
    models = load_served_models(Settings(models=",".join(str(p) for p in paths), batch_size=4))
    assert [model.key for model in models] == [V1, V2]
    return models


class RefusingStore(LocalStore):
    """A local store that refuses (for good, as an AccessDenied would) to write the given keys."""

    def __init__(self, root: Path, refused: set[str]) -> None:
        super().__init__(root)
        self.refused = refused

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if key in self.refused:
            raise StoreError("S3 PutObject failed: AccessDenied", transient=False)
        super().put(key, data, content_type)


@dataclass
class Site:
    """A classifier on a fresh SQLite database and local store."""

    classifier: ScanClassifier
    sessions: Any

    def add(self, images: dict[str, bytes]) -> list[str]:
        """Store the images and record them as queued scans of batch b."""
        for scan_id, data in images.items():
            self.classifier.store.put(scan_key(scan_id), data)
        with self.sessions.begin() as session:
            add_scans(session, [NewScan(s, scan_key(s)) for s in images], "b")
        return list(images)

    def status(self, scan_id: str) -> tuple[str, str | None]:
        """(status, error) of a scan."""
        with self.sessions() as session:
            scan = session.get(Scan, scan_id)
            assert scan is not None
            return scan.status, scan.error

    def predictions(self) -> dict[tuple[str, ModelKey], str]:
        """(scan id, model) -> overlay key of every prediction row."""
        with self.sessions() as session:
            rows = session.execute(
                select(
                    Prediction.scan_id,
                    Prediction.model_name,
                    Prediction.model_version,
                    Prediction.overlay_key,
                )
            )
            return {(scan_id, ModelKey(name, version)): key for scan_id, name, version, key in rows}


@pytest.fixture
def make_site(tmp_path: Path, two_versions: list[ServedModel]) -> Iterator[Any]:
    """Builds Sites on tmp_path (closed after the test); refused: overlay keys the store will not write."""
    made: list[tuple[ScanClassifier, Any]] = []

    def build(refused: set[str] | None = None) -> Site:
        url = f"sqlite:///{tmp_path / 'c.sqlite'}"
        migrate(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        settings = Settings(data_dir=tmp_path / "data", database_url=url, batch_size=4, decode_processes=0)
        store = RefusingStore(tmp_path / "store", refused or set())
        classifier = ScanClassifier(two_versions, store, sessions, settings)
        made.append((classifier, engine))
        return Site(classifier, sessions)

    yield build
    for classifier, engine in made:
        classifier.close()
        engine.dispose()


def _overlay(model: ModelKey, scan_id: str) -> str:
    return overlay_key(model.name, model.version, scan_id, "png")


def test_a_failed_upload_of_one_version_fails_the_scan_though_the_other_version_stored_its_own(make_site):
    """Overlays are told apart by (name, version): t1's refused upload is not hidden behind t2's stored one."""
    site = make_site(refused={_overlay(V1, "scan-000-png")})
    refused, fine = site.add(mixed_scans(2, size=64))
    outcome = site.classifier.process([refused, fine])
    assert outcome.done == (fine,) and list(outcome.failed) == [refused] and outcome.retry == {}
    assert site.status(refused) == (
        Status.FAILED,
        "overlay upload failed: StoreError: S3 PutObject failed: AccessDenied",
    )
    # Both versions ran on both scans; only the scan whose every overlay is stored has rows.
    assert site.predictions() == {(fine, V1): _overlay(V1, fine), (fine, V2): _overlay(V2, fine)}
    assert site.classifier.store.exists(_overlay(V2, refused)) and not site.classifier.store.exists(
        _overlay(V1, refused)
    )
    assert all(site.classifier.store.exists(_overlay(model, fine)) for model in (V1, V2))


def test_each_model_runs_on_exactly_the_scans_of_its_window_that_need_it(make_site):
    """Screened before with t1 only, t2 only, or neither: each version runs on the scans without its result."""
    site = make_site()
    only_v1, only_v2, neither = site.add(mixed_scans(3, size=64))
    with site.sessions.begin() as session:
        upsert_predictions(
            session,
            [
                PredictionRow(
                    scan_id=scan_id,
                    model_name=model.name,
                    model_version=model.version,
                    label="normal",
                    p_covid=0.1,
                    threshold=0.5,
                    overlay_key=KEPT,
                )
                for scan_id, model in ((only_v1, V1), (only_v2, V2))
            ],
        )
    outcome = site.classifier.process([only_v1, only_v2, neither])
    assert sorted(outcome.done) == sorted([only_v1, only_v2, neither])
    assert site.predictions() == {
        (only_v1, V1): KEPT,
        (only_v1, V2): _overlay(V2, only_v1),
        (only_v2, V1): _overlay(V1, only_v2),
        (only_v2, V2): KEPT,
        (neither, V1): _overlay(V1, neither),
        (neither, V2): _overlay(V2, neither),
    }
    assert not site.classifier.store.exists(_overlay(V1, only_v1))
    assert not site.classifier.store.exists(_overlay(V2, only_v2))


def test_the_outcome_names_not_selected_scans_apart_from_those_passed_over(make_site):
    """A lateral film is recorded skipped (outcome.not_selected); a redelivered finished scan is passed over."""
    site = make_site()
    film = synthetic_xray(np.random.default_rng(1), 128).image.astype(np.uint16) * 16
    lateral = make_dicom(film, bits_stored=12, modality="DX", body_part="CHEST", view_position="LL")
    ids = site.add({"lateral": lateral, **mixed_scans(1, size=64)})
    first = site.classifier.process([*ids, "unknown"])
    assert list(first.not_selected) == ["lateral"] and "lateral view (LL)" in first.not_selected["lateral"]
    assert first.done == (ids[1],) and first.passed_over == ("unknown",) and first.claimed == tuple(ids)
    assert site.status("lateral") == (Status.SKIPPED, first.not_selected["lateral"])
    again = site.classifier.process(ids)
    assert again.passed_over == tuple(ids) and again.claimed == () and again.not_selected == {} and again.done == ()
