"""Calibration and operating point (shared/calibration.py) and manifest-driven preprocessing.

Real numbers and a real (tiny) Keras model on synthetic images; nothing under test is mocked.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.calibration import (
    COVID,
    INDETERMINATE,
    NORMAL,
    CalibrationError,
    OperatingPoint,
    apply_temperature,
    audit_status,
    brier_score,
    expected_calibration_error,
    fit_operating_point,
    fit_temperature,
    reliability_bins,
    threshold_for_sensitivity,
)
from shared.imaging.preprocess import (
    PREPROCESSING,
    preprocess,
    preprocess_for_manifest,
    preprocessing_key,
    robust_preprocessing,
)
from shared.synthetic import synthetic_xray


def _overconfident_keras_model_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """p_covid of a real, deliberately over-confident Keras model on synthetic films, and the labels.

    The model reads mean brightness inside the lung fields (covid opacities brighten them) through a
    fixed linear layer whose logit is scaled 25x: the ranking is decent, the probabilities are not.
    """
    import keras

    size = 32
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = (
        np.stack(
            [np.repeat(synthetic_xray(rng, size=size, covid=bool(c)).image[:, :, None], 3, axis=2) for c in labels]
        ).astype(np.float32)
        / 255.0
    )
    inputs = keras.Input((size, size, 3))
    centre = keras.layers.Cropping2D(((8, 8), (4, 4)))(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(centre)
    logits = keras.layers.Dense(2, name="logits")(pooled)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    # Fit the bias so the decision sits at the median brightness, then blow the logits up.
    brightness = np.asarray(keras.Model(inputs, pooled).predict(images, verbose=0)).mean(axis=1)
    midpoint = float(np.median(brightness))
    scale = 25.0 / max(float(brightness.std()), 1e-3)
    kernel = np.zeros((3, 2), np.float32)
    kernel[:, 0] = scale / 3
    model.get_layer("logits").set_weights([kernel, np.array([-scale * midpoint, 0.0], np.float32)])
    p_covid = np.asarray(model.predict(images, verbose=0))[:, 0]
    return p_covid, labels


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    p_val, y_val = _overconfident_keras_model_scores(160, seed=1)
    p_test, y_test = _overconfident_keras_model_scores(160, seed=2)
    # Over-confident: most probabilities at the extremes, yet far from always right.
    assert np.mean((p_val < 0.02) | (p_val > 0.98)) > 0.5
    temperature = fit_temperature(y_val, p_val)
    assert temperature > 2.0
    before = expected_calibration_error(y_test, p_test)
    after = expected_calibration_error(y_test, apply_temperature(p_test, temperature))
    assert after < before - 0.05, (before, after)
    assert brier_score(y_test, apply_temperature(p_test, temperature)) < brier_score(y_test, p_test)
    # Monotonic: the ranking (hence AUC) is untouched.
    order = np.argsort(p_test, kind="stable")
    assert np.all(np.diff(apply_temperature(p_test, temperature)[order]) >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("target", [0.90, 0.95])
def test_threshold_meets_target_sensitivity_on_the_split_it_was_fitted_on(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(37, int), np.zeros(50, int)]
    p = np.clip(np.r_[rng.normal(0.6, 0.2, 37), rng.normal(0.4, 0.2, 50)], 0, 1)
    point = fit_operating_point(y, p, target_sensitivity=target)
    calibrated, labels = point.predict(p)
    sensitivity = np.mean(np.array(labels)[y == 1] == COVID)
    assert sensitivity >= target
    assert point.fitted_on["sensitivity"] == pytest.approx(sensitivity)
    # It is the highest such threshold: nudging it up loses the target.
    assert np.mean(calibrated[y == 1] >= point.threshold + 1e-9) < target


def test_threshold_for_sensitivity_hand_made() -> None:
    y = [1] * 10 + [0] * 3
    p = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]
    assert threshold_for_sensitivity(y, p, 0.9) == pytest.approx(0.3)  # 9 of 10 covid at or above
    assert threshold_for_sensitivity(y, p, 1.0) == pytest.approx(0.2)
    with pytest.raises(CalibrationError):
        threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9)


def test_old_manifest_gives_argmax_behaviour() -> None:
    point = OperatingPoint.from_manifest({"name": "m", "version": "1"})
    assert (point.temperature, point.threshold, point.indeterminate_band) == (1.0, 0.5, None)
    p = np.array([0.0, 0.2, 0.4999, 0.5, 0.73, 1.0])
    assert np.array_equal(point.calibrate(p), p)
    # Two-class argmax (ties to index 0, covid) is p_covid >= 0.5.
    assert point.label(p) == [NORMAL, NORMAL, NORMAL, COVID, COVID, COVID]


def test_operating_point_round_trips_through_a_saved_bundle(tmp_path: Path) -> None:
    """A bundle's threshold and band decide the label, not argmax (what the worker will call)."""
    import keras

    from shared.bundle import load_bundle, save_bundle

    inputs = keras.Input((16, 16, 3))
    logits = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    point = OperatingPoint(temperature=2.0, threshold=0.3, indeterminate_band=(0.25, 0.4), target_sensitivity=0.9)
    manifest = {
        "name": "m",
        "version": "1",
        "architecture": "tiny",
        "input_size": 16,
        "class_names": ["covid", "normal"],
        "gradcam_layer": "logits",
        "calibration": point.to_manifest(),
    }
    save_bundle(model, manifest, tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle")
    loaded = OperatingPoint.from_manifest(bundle.manifest)
    assert loaded == point == bundle.operating_point
    assert bundle.preprocessing is None and "never" in bundle.audit_warning
    raw = np.array([0.05, 0.2, 0.35, 0.45, 0.9])
    calibrated, labels = loaded.predict(raw)
    assert calibrated == pytest.approx(1 / (1 + np.exp(-np.log(raw / (1 - raw)) / 2)))
    # calibrated: 0.187, 0.333, 0.423, 0.475, 0.75 -> threshold 0.3 with band [0.25, 0.4)
    assert labels == [NORMAL, INDETERMINATE, COVID, COVID, COVID]
    assert np.argmax([0.35, 0.65]) == 1  # argmax would have called 0.35 normal; the bundle says covid


def test_malformed_calibration_is_refused() -> None:
    with pytest.raises(CalibrationError):
        OperatingPoint.from_manifest({"calibration": {"temperature": -1}})
    with pytest.raises(CalibrationError):
        OperatingPoint(threshold=0.5, indeterminate_band=(0.6, 0.7))


def test_ece_and_reliability_hand_made() -> None:
    y = [1, 0, 1, 1]
    p = [0.05, 0.05, 0.95, 0.95]
    bins = reliability_bins(y, p)
    assert [(b["n"], b["fraction_covid"]) for b in bins] == [(2, 0.5), (2, 1.0)]
    assert expected_calibration_error(y, p) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)
    assert brier_score(y, p) == pytest.approx((0.95**2 + 0.05**2 + 0.05**2 + 0.05**2) / 4)


def test_audit_status() -> None:
    assert "never" in audit_status({"name": "m", "version": "1"})
    assert audit_status({"audit": {"verdict": "pass"}}) is None
    assert "FAILED" in audit_status({"audit": {"verdict": "fail", "reason": "lungs blanked AUC 0.9"}})


# --- preprocessing --------------------------------------------------------------------------------


def test_preprocess_for_manifest_version_1_is_preprocess_exactly() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((70, 50, 3)).astype(np.float32)
    for entry in (None, {}, PREPROCESSING):
        assert np.array_equal(preprocess_for_manifest(image, entry, 32), preprocess(image, 32))
    with pytest.raises(ValueError, match="version"):
        preprocess_for_manifest(image, {"version": 99}, 32)


@pytest.mark.parametrize("intensity", ["none", "equalize", "clahe", "zscore", "percentile"])
def test_version_2_preprocessing_standardises_exposure(intensity: str) -> None:
    rng = np.random.default_rng(3)
    grey = synthetic_xray(rng, size=128).image.astype(np.float32) / 255.0
    dark = np.repeat((grey * 0.4)[:, :, None], 3, axis=2)
    bright = np.repeat((0.5 + grey * 0.5)[:, :, None], 3, axis=2)
    spec = robust_preprocessing(intensity=intensity, working_size=96, crop_fraction=0.05, blur_sigma=0.5)
    a, b = (preprocess_for_manifest(x, spec, 48) for x in (dark, bright))
    assert a.shape == (48, 48, 3) and a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
    assert np.array_equal(a[:, :, 0], a[:, :, 2])
    gap = float(np.abs(a - b).mean())
    if intensity == "none":
        assert gap > 0.2
    else:  # an affine exposure change all but disappears
        assert gap < 0.08, gap
    assert preprocessing_key(spec, 48) != preprocessing_key(None, 48) == preprocessing_key(PREPROCESSING, 48)


def test_version_3_keeps_the_anatomy_in_proportion_on_a_non_square_film() -> None:
    """A disc on a landscape film stays round with the centre crop; stretching makes it an ellipse
    (the geometry a model could tell sources apart by)."""
    film = np.zeros((300, 400), np.float32)
    cv2.circle(film, (200, 150), 100, 1.0, thickness=-1)
    image = np.repeat(film[:, :, None], 3, axis=2)

    def extent(spec: dict) -> tuple[int, int]:
        disc = preprocess_for_manifest(image, spec, 60)[:, :, 0] > 0.5
        rows, columns = np.nonzero(disc)
        return int(np.ptp(rows)) + 1, int(np.ptp(columns)) + 1

    cropped = robust_preprocessing(intensity="none", working_size=120, square="centre_crop")
    stretched = robust_preprocessing(intensity="none", working_size=120)
    assert cropped["version"] == 3 and cropped["square"] == "centre_crop" and stretched["version"] == 2
    height, width = extent(cropped)
    assert abs(height - width) <= 2 and height == pytest.approx(40, abs=3)  # radius 100 of 300 -> 20 of 60
    height, width = extent(stretched)
    assert height - width >= 8  # 40 rows, 30 columns
    assert preprocessing_key(cropped, 60) != preprocessing_key(stretched, 60)
    with pytest.raises(ValueError, match="square"):
        robust_preprocessing(square="pad")
    with pytest.raises(ValueError, match="square"):
        preprocess_for_manifest(image, {**cropped, "square": "pad"}, 60)
