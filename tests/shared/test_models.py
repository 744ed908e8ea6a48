"""Model zoo, batched Grad-CAM, overlays and bundles: real Keras models at small input sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest
from helpers import make_bundle

from shared.bundle import BundleError, load_bundle, read_manifest, save_bundle
from shared.gradcam import GradCam, peak_location
from shared.overlay import cam_note, overlay_png, render_overlay
from shared.zoo import ARCHITECTURES, BackboneInputScaling, WeightsUnavailableError, build_model

SIZES = {"vgg16": 64, "densenet121": 64, "resnet50": 64}


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((6, 64, 64, 3), dtype=np.float32)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_zoo_builds_the_papers_head_with_a_frozen_backbone(arch):
    model = build_model(arch, input_size=SIZES[arch], weights=None)
    names = [layer.name for layer in model.layers]
    assert names[-5:] == ["head_flatten", "head_dense", "head_dropout", "logits", "probabilities"]
    assert ("head_batchnorm" in names) == ARCHITECTURES[arch].batchnorm_in_head
    assert model.get_layer("head_dense").units == 64 and model.get_layer("head_dropout").rate == 0.5
    assert model.output_shape == (None, 2)
    model.get_layer(ARCHITECTURES[arch].gradcam_layer)  # the paper's Grad-CAM layer is reachable
    backbone_layers = [
        layer for layer in model.layers if layer.weights and not layer.name.startswith(("head_", "logits"))
    ]
    assert backbone_layers and not any(layer.trainable for layer in backbone_layers)


@pytest.mark.slow  # builds all three backbones (densenet121 alone takes ~15 s)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_batched_gradcam_equals_per_image_gradcam(arch, batch):
    model = build_model(arch, input_size=64, weights=None)
    gradcam = GradCam(model, ARCHITECTURES[arch].gradcam_layer)
    probabilities, cams = gradcam(batch)
    assert probabilities.shape == (6, 2) and cams.shape[0] == 6
    for index in range(len(batch)):
        single_p, single_cam = gradcam(batch[index : index + 1])
        assert np.abs(single_p[0] - probabilities[index]).max() < 1e-5
        assert np.abs(single_cam[0] - cams[index]).max() < 1e-4
    np.testing.assert_allclose(probabilities, model.predict(batch, verbose=0), atol=1e-5)
    assert cams.min() >= 0.0 and cams.max() <= 1.0


def test_gradcam_matches_an_independent_gradient_tape_reference(batch):
    """Selvaraju et al. computed one image at a time with a plain tape, against the batched pass."""
    import tensorflow as tf

    model = build_model("vgg16", input_size=64, weights=None)
    layer = ARCHITECTURES["vgg16"].gradcam_layer
    _, cams = GradCam(model, layer)(batch)
    reference = keras.Model(model.inputs, [model.get_layer(layer).output, model.get_layer("logits").output])
    for index in range(len(batch)):
        with tf.GradientTape() as tape:
            activations, logits = reference(batch[index : index + 1], training=False)
            score = logits[0, int(tf.argmax(logits[0]))]
        gradients = tape.gradient(score, activations)[0].numpy()
        cam = np.maximum((activations[0].numpy() * gradients.mean(axis=(0, 1))).sum(-1), 0)
        cam = cam / cam.max() if cam.max() > 0 else cam
        assert np.abs(cam - cams[index]).max() < 1e-4


@pytest.mark.slow
def test_positive_gradients_only_is_a_distinct_option(batch):
    model = build_model("resnet50", input_size=64, weights=None)
    layer = ARCHITECTURES["resnet50"].gradcam_layer
    _, plain = GradCam(model, layer)(batch)
    _, positive = GradCam(model, layer, positive_gradients_only=True)(batch)
    assert plain.shape == positive.shape and not np.allclose(plain, positive)


def test_input_scaling_matches_keras_preprocess_input():
    pixels = np.random.default_rng(1).random((2, 8, 8, 3), dtype=np.float32)
    caffe = BackboneInputScaling("caffe")(pixels).numpy()
    torch = BackboneInputScaling("torch")(pixels).numpy()
    np.testing.assert_allclose(caffe, keras.applications.vgg16.preprocess_input(pixels * 255.0), atol=1e-3)
    np.testing.assert_allclose(torch, keras.applications.densenet.preprocess_input(pixels * 255.0), atol=1e-4)


def test_imagenet_weights_unavailable_offline_gives_a_clear_error(monkeypatch, tmp_path):
    # An empty Keras cache and no internet (as on CI) must not end in a bare URL error.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    import socket

    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=2).close()
        pytest.skip("this machine can reach the weights host, so the offline path is not exercised")
    except OSError:
        pass
    with pytest.raises(WeightsUnavailableError, match=r"~/\.keras/models"):
        build_model("vgg16", input_size=64, weights="imagenet")


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    """Air-gapped hospitals pass a local weights file instead of "imagenet"."""
    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    backbone.save_weights(path)
    model = build_model("vgg16", input_size=64, weights=str(path))
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").get_weights()[0], backbone.get_layer("block5_conv3").get_weights()[0]
    )
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_model("vgg16", input_size=64, weights=str(tmp_path / "missing.h5"))


def test_overlay_is_a_png_of_the_image_size_with_the_heat_where_the_map_is_hot():
    image = np.full((200, 300), 0.5, np.float32)
    cam = np.zeros((7, 7), np.float32)
    cam[1, 5] = 1.0  # hot near the top right
    rgb = render_overlay(image, cam)
    assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8
    row, col = peak_location(cam, (200, 300))
    assert rgb[row, col, 0] > rgb[row, col, 2]  # JET is red where hot
    assert rgb[190, 10, 2] > rgb[190, 10, 0]  # and blue where cold
    decoded = cv2.imdecode(np.frombuffer(overlay_png(image, cam), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (200, 300, 3)


def test_cam_note_flags_flat_maps_and_peaks_at_the_border_outside_the_body_or_on_a_marker():
    from shared.synthetic import synthetic_xray

    image = synthetic_xray(np.random.default_rng(1), 128).image  # uint8, body centred, dark background

    def peak_at(row: int, col: int) -> np.ndarray:
        cam = np.zeros((8, 8), np.float32)
        cam[row, col] = 1.0
        return cam

    # A map that picks out a region inside the lungs gets no comment.
    assert cam_note(peak_at(3, 2), image) is None and cam_note(peak_at(4, 5), image / 255.0) is None
    assert (
        cam_note(np.zeros((8, 8)), image) == cam_note(np.full((8, 8), 0.7), image) == "flat map: no region stands out"
    )
    assert cam_note(peak_at(0, 4), image) == "peak at the image border"
    assert cam_note(np.eye(2), None) is None  # a 2x2 map is all border: too coarse to say
    dark = image.copy()
    dark[48:64, 48:64] = 0  # the peak's cell is black: air outside the body
    assert cam_note(peak_at(3, 3), dark) == "peak outside the body"
    marker = image.copy()
    cv2.putText(marker, "R", (48, 62), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)  # burned-in text in the peak's cell
    assert cam_note(peak_at(3, 3), marker) == "peak on a bright marker or text"


@pytest.mark.slow  # starts a second Python with TensorFlow
def test_bundle_round_trip_in_a_fresh_process_gives_the_same_probabilities(tmp_path, batch):
    bundle_dir = make_bundle(tmp_path / "bundle", "resnet50", 64)
    bundle = load_bundle(bundle_dir)
    expected = bundle.model.predict(batch, verbose=0)
    np.save(tmp_path / "batch.npy", batch)
    script = (
        "import sys, numpy as np; from shared.bundle import load_bundle; "
        f"b = load_bundle({str(bundle_dir)!r}); "
        f"np.save({str(tmp_path / 'fresh.npy')!r}, b.model.predict(np.load({str(tmp_path / 'batch.npy')!r}), verbose=0))"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)
    fresh = np.load(tmp_path / "fresh.npy")
    assert np.abs(fresh - expected).max() < 1e-5
    manifest = read_manifest(bundle_dir)
    assert manifest["architecture"] == "resnet50" and len(manifest["model_sha256"]) == 64


def test_tampered_model_file_is_refused(tmp_path):
    bundle_dir = make_bundle(tmp_path / "bundle", "vgg16", 64)
    model_file = bundle_dir / "model.keras"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle_dir)


def test_bundle_without_manifest_or_model_is_refused(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(tmp_path)
    bundle_dir = make_bundle(tmp_path / "bundle", "vgg16", 64)
    (bundle_dir / "model.keras").unlink()
    with pytest.raises(BundleError, match="no model file"):
        load_bundle(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    with pytest.raises(BundleError, match="lacks 'gradcam_layer'"):
        save_bundle(
            build_model("vgg16", input_size=64, weights=None),
            {k: v for k, v in manifest.items() if k != "gradcam_layer"},
            tmp_path / "x",
        )


def test_manifests_read_as_the_typed_manifest_and_malformed_ones_are_refused(tmp_path):
    from shared.domain import MANIFEST_REQUIRED_KEYS, manifest_from_json, manifest_to_json
    from shared.shipped import shipped_model_dir

    shipped_file = shipped_model_dir() / "manifest.json"
    shipped = read_manifest(shipped_model_dir())
    # The shipped bundle reads unchanged, and writing it gives back the file's own bytes.
    assert shipped == json.loads(shipped_file.read_text())
    assert manifest_to_json(shipped) == shipped_file.read_bytes().rstrip(b"\n")
    assert all(key in shipped for key in MANIFEST_REQUIRED_KEYS)
    assert shipped["dataset"]["split"]["seed"] == 42 and shipped["backbone"]["embedded"] is False
    assert manifest_from_json(b'{"name": "partial"}') == {"name": "partial"}  # readers say what they lack
    with pytest.raises(ValueError, match="JSON object"):
        manifest_from_json(b"[1, 2]")
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(BundleError, match=r"malformed manifest\.json"):
        read_manifest(tmp_path)


def test_bundle_round_trip_through_s3(s3_store, moto_server, batch):
    model = build_model("vgg16", input_size=64, weights=None)
    uri = f"{s3_store.url}/models/vgg16-covid/v1"
    manifest = {
        "name": "vgg16-covid",
        "version": "v1",
        "architecture": "vgg16",
        "input_size": 64,
        "class_names": ["covid", "normal"],
        "gradcam_layer": "block5_conv3",
    }
    save_bundle(model, manifest, uri, endpoint_url=moto_server)
    assert s3_store.exists("models/vgg16-covid/v1/model.keras")
    loaded = load_bundle(uri, endpoint_url=moto_server)
    assert np.abs(loaded.model.predict(batch, verbose=0) - model.predict(batch, verbose=0)).max() < 1e-5
    assert loaded.name == "vgg16-covid" and loaded.version == "v1"
