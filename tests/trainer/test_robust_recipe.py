"""`lungcam-train train --recipe robust` end to end on synthetic films, and evaluate on several data sets.

One real training run (small CNN, 64 px) in a fresh process, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.calibration import OperatingPoint
from shared.synthetic import write_synthetic_dataset
from trainer.train import ConfigError, TrainConfig

TRAIN_CLI = [sys.executable, "-m", "trainer.cli"]


def _run_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([*TRAIN_CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _last_json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.strip()][-1])


def test_recipe_defaults() -> None:
    paper = TrainConfig().resolved()
    assert (paper.arch, paper.input_size, paper.epochs, paper.batch_size, paper.weights) == (
        "vgg16",
        224,
        15,
        8,
        "imagenet",
    )
    assert paper.freeze_backbone is True and paper.intensity is None and paper.val_fraction == 0
    robust = TrainConfig(recipe="robust").resolved()
    assert robust.arch == "small" and robust.weights == "none" and robust.intensity == "clahe"
    assert robust.val_fraction > 0 and robust.label_smoothing > 0
    # A zoo backbone under the robust recipe keeps ImageNet as the default weights, trained end to end.
    zoo = TrainConfig(recipe="robust", arch="resnet50").resolved()
    assert zoo.weights == "imagenet" and zoo.freeze_backbone is False
    with pytest.raises(ConfigError):
        TrainConfig(recipe="robust", val_fraction=0.0).resolved()
    with pytest.raises(ConfigError):
        TrainConfig(recipe="nonsense").resolved()
    with pytest.raises(ConfigError, match="square"):
        TrainConfig(recipe="robust", square="pad").resolved()
    with pytest.raises(ConfigError, match="--intensity"):  # version 1 has no centre crop
        TrainConfig(recipe="paper", square="centre_crop").resolved()
    assert TrainConfig(recipe="paper", square="centre_crop", intensity="none").resolved().square == "centre_crop"


def test_resolved_config_has_every_field_of_train_config_and_no_none_where_a_recipe_sets_one() -> None:
    from dataclasses import asdict, fields

    from trainer.config import FROZEN_DEFAULTS, ResolvedConfig

    # The manifest's "training" entry is asdict(ResolvedConfig): the same keys as TrainConfig's.
    assert [f.name for f in fields(ResolvedConfig)] == [f.name for f in fields(TrainConfig)]
    for recipe in ("paper", "robust", "frozen"):
        resolved = asdict(TrainConfig(recipe=recipe).resolved())
        unset = {name for name, value in resolved.items() if value is None}
        assert unset <= {"intensity", "head_c", "balance", "feature_cache"}, recipe
    frozen = TrainConfig(recipe="frozen").resolved()
    assert (frozen.head_c, frozen.balance) == (FROZEN_DEFAULTS["head_c"], FROZEN_DEFAULTS["balance"])


def test_bundle_data_reads_the_manifest_and_falls_back_to_train_config_defaults() -> None:
    from shared.bundle import read_manifest
    from shared.shipped import shipped_model_dir
    from trainer.config import BundleData

    shipped = read_manifest(shipped_model_dir())
    data = BundleData.of(shipped)
    split = shipped["dataset"]["split"]
    assert (data.finding, data.view) == (shipped["training"]["finding"], shipped["training"]["view"])
    assert (data.test_fraction, data.seed, data.group_by_patient) == (
        split["test_fraction"],
        split["seed"],
        split["group_by_patient"],
    )
    # A manifest that records neither gets the values a default training run had.
    identity = {"name": "x", "version": "1", "architecture": "vgg16", "input_size": 64, "gradcam_layer": "x"}
    bare = BundleData.of({**identity, "class_names": ["covid", "normal"]})
    defaults = TrainConfig()
    assert (bare.finding, bare.view, bare.test_fraction, bare.seed, bare.group_by_patient) == (
        defaults.finding,
        defaults.view,
        defaults.test_fraction,
        defaults.seed,
        defaults.group_by_patient,
    )
    recorded = BundleData.of({**shipped, "dataset": {"split": {"test_fraction": 0.3, "seed": 7}}})
    assert (recorded.test_fraction, recorded.seed) == (0.3, 7)


def test_cli_choices_match_the_preprocessing_methods() -> None:
    """The CLI spells the choices out (no image code imported for --help); they must not drift."""
    from shared.imaging import INTENSITY_METHODS, SQUARE_METHODS
    from trainer import cli

    assert cli.INTENSITY_CHOICES == INTENSITY_METHODS and cli.SQUARE_CHOICES == SQUARE_METHODS


def test_augmentation_keeps_shape_range_and_varies() -> None:
    import tensorflow as tf

    from trainer.robust import augment_batch

    batch = tf.random.uniform((4, 32, 32, 3), seed=1)
    out = augment_batch(batch, tf.constant([1, 2], tf.int64)).numpy()
    assert out.shape == (4, 32, 32, 3) and out.min() >= 0.0 and out.max() <= 1.0
    again = augment_batch(batch, tf.constant([1, 3], tf.int64)).numpy()
    assert not np.allclose(out, again)


@pytest.mark.slow
def test_cli_robust_train_then_evaluate_two_datasets(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", n_per_class=60, size=96, seed=5)
    bundle = tmp_path / "bundle"
    result = _run_cli(
        "train",
        "--data",
        str(data),
        "--recipe",
        "robust",
        "--input-size",
        "64",
        "--working-size",
        "64",
        "--epochs",
        "8",
        "--batch-size",
        "16",
        "--indeterminate-band",
        "0.1",
        "--version",
        "r-1",
        "--no-progress",
        "--out",
        str(bundle),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Early stopping watches a real validation split, and the per-epoch figures say so.
    assert "validation_loss" in result.stderr and "no validation split" not in result.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["recipe"] == "robust" and manifest["architecture"] == "small"
    assert manifest["preprocessing"]["version"] == 2 and manifest["preprocessing"]["intensity"] == "clahe"
    point = OperatingPoint.from_manifest(manifest)
    assert point.indeterminate_band is not None and point.target_sensitivity == pytest.approx(0.90)
    assert manifest["calibration"]["fitted_on"]["sensitivity"] >= 0.90
    assert (bundle / "plots" / "reliability.png").is_file()
    assert "threshold" in result.stdout and "ece" in result.stdout

    # The test split again, in a new process: same preprocessing, same operating point, same numbers.
    again = _run_cli("evaluate", "--bundle", str(bundle), "--data", str(data), "--json", "--no-progress")
    assert again.returncode == 0, again.stderr[-4000:]
    evaluated = _last_json_line(again.stdout)
    assert evaluated["metrics"] == manifest["metrics"]
    assert evaluated["operating_point"]["threshold"] == pytest.approx(point.threshold)

    # Two other data sets: reported one by one and pooled, with plots.
    other_a = write_synthetic_dataset(tmp_path / "a", n_per_class=12, size=96, seed=6)
    other_b = write_synthetic_dataset(tmp_path / "b", n_per_class=8, size=96, seed=7)
    plots = tmp_path / "plots"
    both = _run_cli(
        "evaluate",
        "--bundle",
        str(bundle),
        "--data",
        str(other_a),
        "--data",
        str(other_b),
        "--split",
        "all",
        "--plots",
        str(plots),
        "--json",
        "--no-progress",
    )
    assert both.returncode == 0, both.stderr[-4000:]
    pooled = _last_json_line(both.stdout)
    assert set(pooled["metrics_by_dataset"]) == {str(other_a), str(other_b)}
    assert (
        pooled["metrics_by_dataset"][str(other_a)]["n"] == 24 and pooled["metrics_by_dataset"][str(other_b)]["n"] == 16
    )
    assert pooled["metrics"]["n"] == 40
    metrics = pooled["metrics"]
    for name in ("ece", "brier"):
        assert 0.0 <= metrics[name] <= 1.0
    low, high = metrics["auc_ci95"]
    assert low <= metrics["auc"] <= high
    assert set(metrics["sensitivity_at_specificity"]) == {"0.90", "0.95"}
    assert (plots / "reliability.png").stat().st_size > 1000
