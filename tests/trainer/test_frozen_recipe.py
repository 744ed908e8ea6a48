"""The frozen recipe: source-pair folds, the lung-box preprocessing, training with the packaged VGG16,
and site calibration (real Keras models on small synthetic films)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from shared.bundle import load_bundle
from shared.imaging import LUNG_BOX, LUNG_MASK_FILL, lung_box_mask, preprocess_for_manifest, robust_preprocessing
from trainer.datasets import Sample, load_dataset
from trainer.frozen import balanced_weights
from trainer.loso import source_pair_folds
from trainer.site_calibration import MIN_PER_CLASS, SiteSampleError, conservative_threshold, wilson_interval

SOURCES = {"covid": ("covid-a", "covid-b", "shared-repo"), "normal": ("normal-a", "normal-b", "shared-repo")}


def _samples() -> list[Sample]:
    samples = []
    for label, sources in SOURCES.items():
        for source in sources:
            for index in range(6):
                name = f"{label}/{source}-{index}.png"
                samples.append(Sample(Path(name), label, None, source, name))
    return samples


def test_source_pair_folds_never_share_a_source_between_train_and_test():
    samples = _samples()
    folds = source_pair_folds(samples)
    assert len(folds) == 9
    assert {(f.covid_source, f.normal_source) for f in folds} == {
        (c, n) for c in SOURCES["covid"] for n in SOURCES["normal"]
    }
    for fold in folds:
        train_sources = {s.source for s in fold.train}
        test_sources = {s.source for s in fold.test}
        assert not train_sources & test_sources, fold.name
        assert {s.label for s in fold.train} == {"covid", "normal"}
        assert {(s.label, s.source) for s in fold.test} == {
            ("covid", fold.covid_source),
            ("normal", fold.normal_source),
        }
        # A repository that gives both classes leaves training when either side of it is held out.
        if "shared-repo" in (fold.covid_source, fold.normal_source):
            assert "shared-repo" not in train_sources
        assert len(fold.train) + len(fold.test) <= len(samples)


def test_a_pair_that_would_leave_training_one_sided_is_skipped():
    samples = [s for s in _samples() if s.source in ("covid-a", "normal-a", "normal-b")]
    folds = source_pair_folds(samples)
    assert folds == []  # holding out covid-a leaves no covid to train on


def test_source_balance_gives_every_class_and_source_the_same_weight():
    labels = ["covid"] * 6 + ["normal"] * 4
    sources = ["a"] * 5 + ["b"] + ["c"] * 2 + ["d"] * 2
    weights = balanced_weights(labels, sources, "source")
    assert np.isclose(weights.mean(), 1.0)
    assert np.isclose(weights[:5].sum(), weights[5]) and np.isclose(weights[6:8].sum(), weights[8:].sum())
    assert np.isclose(weights[:6].sum(), weights[6:].sum())


def test_lung_mask_preprocessing_keeps_only_the_lung_box():
    spec = robust_preprocessing(intensity="clahe", lung_mask=True)
    assert spec["version"] == 4 and spec["lung_box"] == list(LUNG_BOX)
    image = np.random.default_rng(0).random((300, 260, 3), dtype=np.float32)
    out = preprocess_for_manifest(image, spec, 64)
    inside = lung_box_mask(64)
    assert np.all(out[~inside] == np.float32(LUNG_MASK_FILL))
    unmasked = preprocess_for_manifest(image, robust_preprocessing(intensity="clahe"), 64)
    assert np.array_equal(out[inside], unmasked[inside])
    assert "lung_box" not in robust_preprocessing(intensity="clahe")  # version 2 stays as it was
    with pytest.raises(ValueError, match="unsupported preprocessing version 5"):
        preprocess_for_manifest(image, {**spec, "version": 5}, 64)


def test_wilson_interval_and_the_conservative_threshold():
    low, high = wilson_interval(45, 50)
    assert 0.78 < low < 0.80 and 0.95 < high < 0.97
    y = np.array([1] * 50 + [0] * 50)
    p = np.concatenate([np.linspace(0.99, 0.5, 50), np.linspace(0.45, 0.0, 50)])
    threshold = conservative_threshold(y, p, target=0.90, confidence=0.80)
    met = int((p[y == 1] >= threshold).sum())
    assert wilson_interval(met, 50, 0.80, one_sided=True)[0] >= 0.90
    assert wilson_interval(met - 1, 50, 0.80, one_sided=True)[0] < 0.90  # the highest such threshold
    assert met / 50 > 0.90  # stricter than the plain k-th score


def _with_sources(root: Path) -> Path:
    """Rewrite a synthetic set's manifest so each class comes from two sources."""
    manifest = root / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    for index, row in enumerate(rows):
        row["source_repo"] = f"{row['label']}-site-{index % 2}"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def frozen_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A frozen-recipe bundle trained on 2 x 32 synthetic films at 64 px, two sources per class."""
    from shared.synthetic import write_synthetic_dataset
    from trainer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("frozen")
    data = _with_sources(write_synthetic_dataset(root / "data", 32, size=96, seed=3))
    manifest = train(
        TrainConfig(recipe="frozen", input_size=64, progress=False, feature_cache=str(root / "cache")),
        [data],
        root / "bundle",
    )
    return root / "bundle", manifest


@pytest.mark.slow
def test_frozen_training_names_the_backbone_and_fits_the_operating_point_out_of_source(frozen_bundle):
    bundle_dir, manifest = frozen_bundle
    assert manifest["backbone"]["embedded"] is False and manifest["backbone"]["weights"] == "hed-vgg16"
    assert manifest["preprocessing"]["version"] == 4 and manifest["backbone"]["output_layer"] == "block4_conv3"
    assert manifest["gradcam_layer"] == "reference_delta" and manifest["gradcam_smoothing_cells"] == 1.0
    assert (bundle_dir / "model.keras").stat().st_size < 500_000  # the head and its 8x8x512 reference map
    loso = manifest["leave_one_source_out"]
    assert len(loso["pairs"]) == 4 and loso["method"].startswith("leave-one-source-out")
    assert manifest["calibration"]["fitted_on"]["split"].startswith("out-of-source scores")
    assert manifest["metrics"]["auc"] > 0.9  # synthetic lesions are easy
    # Served through load_bundle, the head on the packaged backbone scores as the trainer did.
    bundle = load_bundle(bundle_dir)
    samples = load_dataset(Path(manifest["dataset"]["data_paths"][0]))[:4]
    from trainer.loading import load_images

    loaded = load_images(samples, 64, preprocessing=bundle.preprocessing, progress=False)
    p_model = bundle.model.predict(loaded.images, verbose=0)
    assert np.allclose(p_model.sum(axis=1), 1.0, atol=1e-5)
    probabilities, cams = bundle.gradcam()(loaded.images)
    assert np.allclose(probabilities, p_model, atol=1e-5) and cams.shape == (4, 8, 8)


@pytest.mark.slow
def test_site_calibration_publishes_a_new_version_with_its_sample_record(frozen_bundle, tmp_path: Path):
    from shared.synthetic import write_synthetic_dataset
    from trainer.cli import main

    bundle_dir, manifest = frozen_bundle
    site = write_synthetic_dataset(tmp_path / "site", MIN_PER_CLASS + 5, size=96, seed=8)
    out = tmp_path / "calibrated"
    assert (
        main(["calibrate", "--bundle", str(bundle_dir), "--data", str(site), "--out", str(out), "--no-progress"]) == 0
    )
    new = json.loads((out / "manifest.json").read_text())
    record = new["site_calibration"]
    assert new["version"].startswith(f"{manifest['version']}-site-") and new["model_sha256"] == manifest["model_sha256"]
    assert record["n_covid"] == record["n_normal"] == MIN_PER_CLASS + 5 and len(record["sample_sha256"]) == 64
    assert record["sensitivity"] >= 0.90 and len(record["sensitivity_ci95"]) == 2
    assert 0.0 <= record["specificity_ci95"][0] <= record["specificity"] <= record["specificity_ci95"][1]
    assert new["calibration"]["threshold"] == record["threshold"]
    assert load_bundle(out).operating_point.threshold == record["threshold"]
    assert json.loads((bundle_dir / "manifest.json").read_text())["version"] == manifest["version"]  # untouched


@pytest.mark.slow
def test_site_calibration_refuses_a_sample_with_too_few_films_of_a_class(frozen_bundle, tmp_path: Path, capsys):
    from shared.synthetic import write_synthetic_dataset
    from trainer.cli import main
    from trainer.site_calibration import calibrate_for_site

    site = write_synthetic_dataset(tmp_path / "small", MIN_PER_CLASS - 1, size=64, seed=9)
    with pytest.raises(SiteSampleError, match=f"at least {MIN_PER_CLASS} films of each class"):
        calibrate_for_site(frozen_bundle[0], [site], tmp_path / "out", progress=False)
    assert (
        main(
            [
                "calibrate",
                "--bundle",
                str(frozen_bundle[0]),
                "--data",
                str(site),
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "19 covid, 19 normal" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
