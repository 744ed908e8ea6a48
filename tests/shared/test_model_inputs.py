"""One read of a scan's header in the consumer, and the same model inputs in the trainer as in the workers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pydicom.filereader
import pytest
from helpers import redis_url

from shared.engine import make_engine, make_session_factory, migrate
from shared.imaging import decode_side, dicom, formats, robust_preprocessing
from shared.scans import NewScan, add_scans
from shared.settings import Settings
from shared.store import LocalStore, scan_key
from shared.synthetic import make_dicom, synthetic_film
from trainer.datasets import Sample
from trainer.loading import load_images
from worker.consumer import classifier as consumer
from worker.consumer.classifier import ScanClassifier
from worker.consumer.decoding import decode_for_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def films() -> dict[str, bytes]:
    """A 16-bit PNG, an 8-bit JPEG (large enough for libjpeg's reduced decode) and a 12-bit DICOM."""
    rng = np.random.default_rng(20)
    film = synthetic_film(rng, 1500, 1300, bits=16)
    grey8 = (synthetic_film(rng, 2300, 2100, bits=16) >> 8).astype(np.uint8)
    return {
        "png16": cv2.imencode(".png", film)[1].tobytes(),
        "jpeg": cv2.imencode(".jpg", grey8, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes(),
        "dicom": make_dicom(synthetic_film(rng, 1200, 1100, bits=12), bits_stored=12),
    }


def _count_calls(monkeypatch: pytest.MonkeyPatch, function: Callable[..., object]) -> list[int]:
    """Wrap every binding of `function` in the loaded project modules with a counter; returns the counter."""
    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return function(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("shared", "worker", "trainer") and module is not None:
            for attribute, value in list(vars(module).items()):
                if value is function:
                    monkeypatch.setattr(module, attribute, counted)
    return calls


@pytest.fixture
def classifier(tmp_path: Path) -> Iterator[ScanClassifier]:
    """A consumer decoding in-process (decode_processes=0) on SQLite and a local store, serving no model."""
    url = f"sqlite:///{tmp_path / 'parse.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    settings = Settings(broker_url=redis_url(14), database_url=url, decode_processes=0)
    made = ScanClassifier([], LocalStore(tmp_path / "store"), make_session_factory(engine), settings)
    yield made
    made.close()
    engine.dispose()


def test_the_consumer_parses_each_scans_header_exactly_once(
    classifier: ScanClassifier, films: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real batch: sniffing, the header read and pydicom's data set parser each run once per scan."""
    for scan_id, data in films.items():
        classifier.store.put(scan_key(scan_id), data)
    with classifier.sessions.begin() as session:
        add_scans(session, [NewScan(scan_id=s, source_uri=scan_key(s)) for s in films], "parse")
    readers = {"png16": formats.png_size, "jpeg": formats.jpeg_header, "dicom": dicom.read_dicom}
    for scan_id, reader in readers.items():
        sniffs = _count_calls(monkeypatch, formats.sniff_format)
        headers = _count_calls(monkeypatch, reader)
        others = [_count_calls(monkeypatch, other) for other in readers.values() if other is not reader]
        data_sets: list[int] = []
        read_dataset = pydicom.filereader.read_dataset
        monkeypatch.setattr(
            pydicom.filereader, "read_dataset", lambda *a, **k: data_sets.append(1) or read_dataset(*a, **k)
        )
        outcome = classifier.process([scan_id])
        assert outcome.done == (scan_id,), outcome
        assert (len(sniffs), len(headers), sum(map(len, others))) == (1, 1, 0), scan_id
        # DICOM: the file meta group and the data set's header, parsed once, then the pixel data element
        # read from where the header parse stopped (before the probe, the consumer made 7 such calls).
        assert len(data_sets) == (3 if scan_id == "dicom" else 0), scan_id
        monkeypatch.undo()


@pytest.mark.parametrize("preprocessing", [None, robust_preprocessing()], ids=["v1", "v2-clahe"])
def test_the_trainer_sees_exactly_the_inputs_a_worker_computes(
    tmp_path: Path, films: dict[str, bytes], preprocessing: dict | None
) -> None:
    """PNG 16-bit, JPEG and DICOM: trainer.loading's tensors equal decode_for_models' (the worker's) to 1e-6."""
    samples = []
    for name, data in films.items():
        path = tmp_path / name
        path.write_bytes(data)
        samples.append(Sample(path, "normal", None, None))
    size = 64
    loaded = load_images(samples, size, preprocessing=preprocessing, progress=False)
    assert [s.path.name for s in loaded.samples] == list(films) and loaded.images.dtype == np.float32
    # The worker decodes at max(display side, input sizes): the same side for a single bundle.
    side = decode_side([size])
    assert side == consumer.DISPLAY_MAX_SIDE
    for index, data in enumerate(films.values()):
        served, _display = decode_for_models(data, side, (("key", preprocessing, size),))
        assert served["key"].shape == loaded.images[index].shape == (size, size, 3)
        assert float(np.abs(served["key"] - loaded.images[index]).max()) <= 1e-6


def test_the_preprocessing_constants_import_without_opencv() -> None:
    """The training CLI's choices come from shared.imaging.preprocess, which must import with cv2 unavailable."""
    script = (
        "import sys; sys.modules['cv2'] = None\n"
        "from shared.imaging.preprocess import INTENSITY_METHODS, SQUARE_METHODS, PREPROCESSING, LUNG_BOX\n"
        "from shared.imaging import PREPROCESSING_VERSIONS, DISPLAY_MAX_SIDE\n"
        "assert 'clahe' in INTENSITY_METHODS and 'cv2' not in [m for m in sys.modules if sys.modules[m]]\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
