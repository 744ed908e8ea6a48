"""Training with the seed's recipe, evaluation on the held-out split, and publishing the bundle."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from shared.errors import LungcamError
from shared.bundle import save_bundle
from shared.calibration import DEFAULT_TARGET_SENSITIVITY, OperatingPoint, fit_operating_point
from shared.gradcam import GradCam
from shared.pretrained import PACKAGED_WEIGHTS, PACKAGED_WEIGHTS_ARCH
from shared.imaging import INTENSITY_METHODS, PREPROCESSING, SQUARE_METHODS, robust_preprocessing
from shared.zoo import ARCHITECTURES, CLASS_NAMES, build_model, resolve_weights
from trainer import plots
from trainer.frozen import BALANCE_MODES, FROZEN_FEATURE_LAYER
from trainer.robust import SMALL_ARCH, SMALL_GRADCAM_LAYER, build_small_cnn, fit_robust
from trainer.datasets import (
    DEFAULT_FINDING,
    DEFAULT_VIEW,
    DatasetError,
    count_labels,
    dataset_hash,
    load_datasets,
    split_method,
    split_samples,
)
from trainer.evaluate import (
    COVID_INDEX,
    compute_metrics,
    covid_targets,
    format_by_source,
    format_metrics_table,
    metrics_by_source,
    predict_probabilities,
)
from trainer.loading import LoadedImages, load_images

log = logging.getLogger(__name__)

GRADCAM_GRID_SIZE = 12


class ConfigError(LungcamError, ValueError):
    """A training configuration that makes no sense (unknown architecture or layer, bad numbers)."""


def utc_version() -> str:
    """A version string from the current UTC time, e.g. 20261127T164500Z."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


RECIPES = ("paper", "robust", "frozen")
# What `--recipe robust` sets for every knob left unset (None). Chosen by leave-one-source-out
# validation (benchmarks/leave_one_source_out.py, benchmarks/results/loso.md), not by the dev split.
ROBUST_DEFAULTS: dict[str, Any] = {
    "arch": SMALL_ARCH,
    "input_size": 128,
    # 15 epochs as measured in LOSO; early stopping keeps the best validation-loss weights.
    "epochs": 15,
    "batch_size": 32,
    "learning_rate": 2e-3,
    "rotation_degrees": 10.0,
    "freeze_backbone": False,
    "intensity": "clahe",
    "working_size": 256,
    "crop_fraction": 0.0,
    "blur_sigma": 0.0,
    # Centre crop measured worse in LOSO (styled normals 0.935 vs 0.970, lungs blanked 0.950 vs 0.906).
    "square": "stretch",
    "lung_mask": False,
    "augment_strength": 1.0,
    "label_smoothing": 0.1,
    "weight_decay": 0.02,
    "val_fraction": 0.15,
    "patience": 8,
}
# What `--recipe frozen` sets (the recommended recipe): the packaged VGG16 never trains, the lung box
# alone is shown (preprocessing version 4), a logistic regression reads block 4's pooled features.
# Chosen by leave-one-source-out on both classes (benchmarks/results/loso.md). The epoch, batch,
# learning-rate and augmentation knobs do not apply: the head is fitted in closed form.
FROZEN_DEFAULTS: dict[str, Any] = {
    "arch": "vgg16",
    "weights": "hed-vgg16",
    "input_size": 224,
    "epochs": 1,
    "batch_size": 16,
    "learning_rate": 1.0,
    "rotation_degrees": 0.0,
    "freeze_backbone": True,
    "intensity": "clahe",
    "working_size": 256,
    "crop_fraction": 0.0,
    "blur_sigma": 0.0,
    "square": "stretch",
    "lung_mask": True,
    "augment_strength": 0.0,
    "label_smoothing": 0.0,
    "weight_decay": 0.0,
    "val_fraction": 0.0,
    "patience": 0,
    "gradcam_layer": FROZEN_FEATURE_LAYER,
    "head_c": 0.01,
    "balance": "source",
}
# The paper's recipe: the values TrainConfig had before recipes existed.
PAPER_DEFAULTS: dict[str, Any] = {
    "arch": "vgg16",
    "input_size": 224,
    "epochs": 15,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "rotation_degrees": 15.0,
    "freeze_backbone": True,
    "intensity": None,  # preprocessing version 1
    "working_size": 256,
    "crop_fraction": 0.0,
    "blur_sigma": 0.0,
    "square": "stretch",
    "lung_mask": False,
    "augment_strength": 0.0,
    "label_smoothing": 0.0,
    "weight_decay": 0.0,
    "val_fraction": 0.0,  # the paper validates on the test split
    "patience": 0,
}


@dataclass
class TrainConfig:
    """Every knob of a training run; None means "the recipe's default" (PAPER_DEFAULTS / ROBUST_DEFAULTS)."""

    recipe: str = "paper"
    arch: str | None = None
    # "imagenet", "hed-vgg16" (packaged), "none", or a local weights file; None: the recipe's default
    # (imagenet for paper and robust's zoo backbones, "none" for the small CNN, hed-vgg16 for frozen).
    weights: str | None = None
    input_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    rotation_degrees: float | None = None
    test_fraction: float = 0.2
    seed: int = 42
    group_by_patient: bool = True
    freeze_backbone: bool | None = None
    # Preprocessing: intensity None keeps version 1 (the paper's); anything else is version 2.
    intensity: str | None = None
    working_size: int | None = None
    crop_fraction: float | None = None
    blur_sigma: float | None = None
    square: str | None = None
    lung_mask: bool | None = None  # preprocessing version 4: only the lung box is shown
    # The robust recipe's training: augmentation, regularisation, early stopping on a validation split.
    augment_strength: float | None = None
    label_smoothing: float | None = None
    weight_decay: float | None = None
    val_fraction: float | None = None
    patience: int | None = None
    # The frozen recipe's head: L2 inverse strength, sample balance, and where pooled features are cached.
    head_c: float | None = None
    balance: str | None = None
    feature_cache: str | None = None
    # Operating point, fitted on the validation split (robust recipe; the paper keeps argmax).
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    indeterminate_width: float = 0.0
    gradcam_layer: str | None = None  # None: the paper's layer for the architecture
    name: str | None = None  # None: f"{arch}-covid"
    version: str | None = None  # None: UTC timestamp
    # Filters of the ieee8023 metadata.csv layout (ignored by the other layouts).
    finding: str | None = DEFAULT_FINDING
    view: str | None = DEFAULT_VIEW
    progress: bool = field(default=True, compare=False)

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's defaults and the fields that depend on others filled in, checked for sense."""
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        defaults = {"robust": ROBUST_DEFAULTS, "frozen": FROZEN_DEFAULTS}.get(self.recipe, PAPER_DEFAULTS)
        config = TrainConfig(**asdict(self))
        for name, value in defaults.items():
            if getattr(config, name) is None:
                setattr(config, name, value)
        if config.weights is None:
            config.weights = "none" if config.arch == SMALL_ARCH else "imagenet"
        return config._checked()

    def _checked(self) -> TrainConfig:
        if self.arch not in ARCHITECTURES and self.arch != SMALL_ARCH:
            raise ConfigError(
                f"unknown architecture {self.arch!r}; choose one of {sorted([*ARCHITECTURES, SMALL_ARCH])}"
            )
        if self.intensity is not None and self.intensity not in INTENSITY_METHODS:
            raise ConfigError(f"unknown intensity method {self.intensity!r}; choose one of {INTENSITY_METHODS}")
        if self.square not in SQUARE_METHODS:
            raise ConfigError(f"unknown square method {self.square!r}; choose one of {SQUARE_METHODS}")
        if self.square != "stretch" and self.intensity is None:
            raise ConfigError("--square centre_crop needs preprocessing version 3: set --intensity too")
        if self.lung_mask and self.intensity is None:
            raise ConfigError("--lung-mask needs preprocessing version 4: set --intensity too")
        if self.recipe == "frozen":
            self._check_frozen()
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(f"validation fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.recipe == "robust" and self.val_fraction == 0:
            raise ConfigError("the robust recipe needs a validation split (--val-fraction > 0)")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(f"target sensitivity must be in (0, 1], got {self.target_sensitivity}")
        if not 0.0 <= self.indeterminate_width < 1.0:
            raise ConfigError(f"indeterminate band width must be in [0, 1), got {self.indeterminate_width}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("input_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if self.rotation_degrees < 0:
            raise ConfigError(f"rotation must be at least 0 degrees, got {self.rotation_degrees}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test fraction must be between 0 and 1, got {self.test_fraction}")
        config = TrainConfig(**asdict(self))
        default_layer = SMALL_GRADCAM_LAYER if self.arch == SMALL_ARCH else ARCHITECTURES[self.arch].gradcam_layer
        config.gradcam_layer = self.gradcam_layer or default_layer
        config.name = self.name or f"{self.arch}-covid"
        config.version = self.version or utc_version()
        return config


    def _check_frozen(self) -> None:
        if self.weights not in PACKAGED_WEIGHTS or PACKAGED_WEIGHTS_ARCH[self.weights] != self.arch:
            raise ConfigError(f"the frozen recipe needs a packaged backbone ({sorted(PACKAGED_WEIGHTS)} for "
                              f"{sorted(set(PACKAGED_WEIGHTS_ARCH.values()))}), got {self.arch} with {self.weights}")
        if not self.freeze_backbone:
            raise ConfigError("the frozen recipe never trains the backbone: drop --fine-tune")
        if self.balance not in BALANCE_MODES:
            raise ConfigError(f"unknown balance {self.balance!r}; choose one of {BALANCE_MODES}")
        if not (self.head_c or 0) > 0:
            raise ConfigError(f"--head-c must be positive, got {self.head_c}")


class EpochLog(keras.callbacks.Callback):
    """A progress bar per epoch (batches, loss, ETA) and one summary line per epoch on stderr."""

    def __init__(self, epochs: int, *, progress: bool = True):
        super().__init__()
        self.epochs = epochs
        self.progress = progress
        self.seconds: list[float] = []
        self._start = 0.0
        self._bar: Any = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        if self.progress:
            from tqdm import tqdm

            steps = (self.params or {}).get("steps")
            self._bar = tqdm(total=steps, desc=f"training epoch {epoch + 1}/{self.epochs}", unit="batch", file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if logs and "loss" in logs:
                self._bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elapsed = time.perf_counter() - self._start
        self.seconds.append(elapsed)
        logs = logs or {}
        values = "  ".join(
            f"{key} {logs[key]:.4f}" for key in ("loss", "accuracy", "val_loss", "val_accuracy") if key in logs
        )
        print(f"epoch {epoch + 1}/{self.epochs}  {values}  {elapsed:.1f}s", file=sys.stderr, flush=True)


def _step(message: str) -> None:
    """Say what training does after the last epoch (these steps take a minute on a CPU)."""
    print(f"lungcam-train: {message}", file=sys.stderr, flush=True)


def one_hot(samples_labels: Sequence[str]) -> np.ndarray:
    """One-hot float32 targets in CLASS_NAMES order (the paper's LabelBinarizer + to_categorical)."""
    return np.eye(len(CLASS_NAMES), dtype=np.float32)[[CLASS_NAMES.index(label) for label in samples_labels]]


def make_dataset(
    images: np.ndarray, targets: np.ndarray, batch_size: int, *, shuffle: bool, rotation_degrees: float, seed: int
) -> tf.data.Dataset:
    """A tf.data pipeline over uint8 images: optional shuffle, batching, [0,1] scaling, rotation."""
    # Index the in-memory array instead of from_tensor_slices(images): the latter copies the whole
    # array into the graph, which hits the 2 GB protobuf limit on the full public datasets.
    height, width, channels = images.shape[1:]

    def _gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[indices], targets[indices]

    def _fetch(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch, labels = tf.numpy_function(_gather, [indices], (tf.uint8, tf.float32))
        batch.set_shape((None, height, width, channels))
        labels.set_shape((None, targets.shape[1]))
        return tf.cast(batch, tf.float32) / 255.0, labels

    dataset = tf.data.Dataset.range(len(images))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(_fetch, num_parallel_calls=tf.data.AUTOTUNE)
    if rotation_degrees > 0:
        # The paper's ImageDataGenerator(rotation_range=15, fill_mode="nearest"): RandomRotation's
        # factor is a fraction of a full turn, so degrees / 360.
        rotate = keras.layers.RandomRotation(rotation_degrees / 360.0, fill_mode="nearest", seed=seed)
        dataset = dataset.map(lambda batch, labels: (rotate(batch, training=True), labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


def compile_model(model: keras.Model, config: TrainConfig) -> None:
    """Adam with the legacy per-step decay, binary cross-entropy on one-hot labels, accuracy."""
    # The paper used Adam(lr=1e-3, decay=lr/epochs). Keras 3 dropped `decay`; the legacy optimizer
    # applied lr / (1 + decay * iterations) with iterations counted in *steps*, not epochs, which is
    # exactly InverseTimeDecay with decay_steps=1. So the rate barely decays (1e-3 / (1 + 900 * 1e-3/15)
    # = 0.94e-3 after 15 epochs of 60 steps); that is the recipe as published, kept for comparability.
    schedule = keras.optimizers.schedules.InverseTimeDecay(
        config.learning_rate, decay_steps=1, decay_rate=config.learning_rate / config.epochs
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )


def preprocessing_for(config: TrainConfig) -> dict[str, Any]:
    """The manifest's preprocessing entry: version 1 (the paper's) unless an intensity method is set."""
    if config.intensity is None:
        return dict(PREPROCESSING)
    return robust_preprocessing(
        intensity=config.intensity,
        working_size=config.working_size,
        crop_fraction=config.crop_fraction,
        blur_sigma=config.blur_sigma,
        square=config.square,
        lung_mask=bool(config.lung_mask),
    )


def build_for(config: TrainConfig, weights: str | None) -> keras.Model:
    """The small CNN or a zoo backbone with the paper's head, as the (resolved) config says."""
    if config.arch == SMALL_ARCH:
        if weights is not None:
            raise ConfigError("the small CNN has no pretrained weights; use --weights none with --arch small")
        return build_small_cnn(config.input_size, seed=config.seed, weight_decay=0.0)
    return build_model(config.arch, input_size=config.input_size, weights=weights, freeze_backbone=config.freeze_backbone)


def fit_on_arrays(
    config: TrainConfig,
    model: keras.Model,
    train_images: np.ndarray,
    train_labels: Sequence[str],
    val_images: np.ndarray,
    val_labels: Sequence[str],
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> keras.callbacks.History:
    """Train `model` on uint8 images with the (resolved) config's recipe; `val_*` is validation data.

    The paper's recipe trains a fixed number of epochs and only reports the validation curves; the
    robust recipe stops early on the validation loss and keeps the best weights.
    """
    if config.recipe == "paper":
        compile_model(model, config)
        train_data = make_dataset(train_images, one_hot(train_labels), config.batch_size, shuffle=True,
                                  rotation_degrees=config.rotation_degrees, seed=config.seed)
        val_data = make_dataset(val_images, one_hot(val_labels), config.batch_size, shuffle=False,
                                rotation_degrees=0, seed=config.seed)
        # shuffle=False: the tf.data pipeline already shuffles (with the run's seed).
        return model.fit(train_data, validation_data=val_data, epochs=config.epochs, shuffle=False, verbose=0,
                         callbacks=list(callbacks))
    return fit_robust(
        model, train_images, one_hot(train_labels), val_images, one_hot(val_labels),
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, label_smoothing=config.label_smoothing, patience=config.patience,
        seed=config.seed, augment_strength=config.augment_strength, rotation_degrees=config.rotation_degrees,
        callbacks=callbacks,
    )


def train(config: TrainConfig, data_paths: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Train, evaluate on the test split, write plots and publish the bundle to `out`; return the manifest."""
    config = config.resolved()
    weights = resolve_weights(config.weights)  # fails early on a missing weights file
    keras.utils.set_random_seed(config.seed)
    samples = _labelled_samples(config, data_paths)
    if config.recipe == "frozen":
        from trainer.train_frozen import train_frozen

        return train_frozen(config, samples, data_paths, out)
    # Build the model before reading any pixels: unavailable ImageNet weights or an unknown
    # --gradcam-layer should fail in seconds, not after minutes of decoding.
    model = build_for(config, weights)
    try:
        model.get_layer(config.gradcam_layer)
    except ValueError as exc:
        raise ConfigError(f"the {config.arch} model has no layer {config.gradcam_layer!r} for Grad-CAM") from exc
    data = load_splits(config, samples)
    train_images, val_images, test_images = data.train, data.validation, data.test

    # The paper validates on the test split every epoch (its training-curve figure); the robust
    # recipe on its own validation split.
    monitor = val_images if val_images is not None else test_images
    epoch_log = EpochLog(config.epochs, progress=config.progress)
    started = time.perf_counter()
    history = fit_on_arrays(
        config, model, train_images.images, [s.label for s in train_images.samples],
        monitor.images, [s.label for s in monitor.samples], callbacks=[epoch_log],
    )
    training_seconds = time.perf_counter() - started

    operating_point = OperatingPoint()
    if val_images is not None:
        _step(f"calibrating on the validation split ({len(val_images.samples)} images)")
        p_val = predict_probabilities(model, val_images.images)[:, COVID_INDEX]
        operating_point = fit_operating_point(
            covid_targets(val_images.samples), p_val, target_sensitivity=config.target_sensitivity,
            indeterminate_width=config.indeterminate_width, split="validation (patient-grouped, from the training part)",
        )
        print(
            f"calibration on validation: temperature {operating_point.temperature:.3f}, threshold "
            f"{operating_point.threshold:.4f} for sensitivity >= {config.target_sensitivity:.2f}",
            file=sys.stderr,
        )

    _step(f"evaluating on the test split ({len(test_images.samples)} images)")
    p_covid = operating_point.calibrate(predict_probabilities(model, test_images.images)[:, COVID_INDEX])
    evaluation = report_test_split(test_images, p_covid, operating_point)

    _step("drawing the plots and the Grad-CAM grid")
    history_record = {key: [float(v) for v in values] for key, values in history.history.items()}
    history_record["epoch_seconds"] = epoch_log.seconds
    extra_files = {
        "plots/training_curves.png": plots.training_curves_png(history_record),
        **evaluation_plots(evaluation, _gradcam_grid(model, config.gradcam_layer, test_images)),
        "history.json": json.dumps(history_record, indent=2).encode(),
    }
    manifest = base_manifest(config, data, evaluation, weights=_weights_label(weights), data_paths=data_paths)
    manifest["training"].update(seconds=round(training_seconds, 1), epochs_run=len(history_record.get("loss", [])))
    if weights in PACKAGED_WEIGHTS:
        # Training may have changed the backbone (--fine-tune), so the bundle embeds it; the
        # manifest still says where it started.
        manifest["backbone"] = {**PACKAGED_WEIGHTS[weights].provenance(), "embedded": True,
                                "frozen": bool(config.freeze_backbone)}
    if val_images is not None:
        manifest["calibration"] = operating_point.to_manifest()
    return publish(model, manifest, out, extra_files)


@dataclass
class Splits:
    """The decoded, preprocessed images of each split, and what the manifest says about the data."""

    samples: list
    preprocessing: dict[str, Any]
    train: LoadedImages
    validation: LoadedImages | None
    test: LoadedImages

    @property
    def parts(self) -> list[tuple[str, LoadedImages]]:
        """(name, images) of every split that exists."""
        named = [("training", self.train), ("test", self.test), ("validation", self.validation)]
        return [(name, loaded) for name, loaded in named if loaded is not None]


def _labelled_samples(config: TrainConfig, data_paths: Sequence[str | Path]) -> list:
    """Every sample of the data paths, refused unless both classes are there."""
    samples = load_datasets(data_paths, finding=config.finding, view=config.view)
    counts = count_labels(samples)
    if min(counts.values()) == 0:
        missing = [label for label, count in counts.items() if count == 0]
        raise DatasetError(f"training needs images of both classes; none of class {', '.join(missing)} in the data given")
    return samples


def load_splits(config: TrainConfig, samples: list) -> Splits:
    """Patient-grouped train / (validation) / test splits, decoded and preprocessed as the bundle will be."""
    train_samples, test_samples = split_samples(
        samples, test_fraction=config.test_fraction, seed=config.seed, group_by_patient=config.group_by_patient
    )
    val_samples: list = []
    if config.val_fraction > 0:
        # Early stopping and calibration get their own patient-grouped split, carved from the training
        # part: the test split stays untouched until the end.
        train_samples, val_samples = split_samples(
            train_samples, test_fraction=config.val_fraction, seed=config.seed + 1, group_by_patient=config.group_by_patient
        )
    counts = count_labels(samples)
    print(
        f"dataset: {len(samples)} images ({', '.join(f'{n} {label}' for label, n in counts.items())}); "
        f"train {len(train_samples)}, validation {len(val_samples)}, test {len(test_samples)} ({config.recipe} recipe)",
        file=sys.stderr,
    )
    preprocessing = preprocessing_for(config)

    def _load(part: list, desc: str) -> LoadedImages:
        return load_images(part, config.input_size, preprocessing=preprocessing, progress=config.progress, desc=desc)

    splits = Splits(samples, preprocessing, _load(train_samples, "train images"),
                    _load(val_samples, "validation images") if val_samples else None, _load(test_samples, "test images"))
    for part, loaded in splits.parts:
        if len(loaded.samples) == 0 or min(count_labels(loaded.samples).values()) == 0:
            raise DatasetError(f"the {part} split has no decodable images of some class: {count_labels(loaded.samples)}")
    return splits


@dataclass
class TestEvaluation:
    """The test split's calibrated p_covid and its metrics, overall and per source."""

    targets: np.ndarray
    p_covid: np.ndarray
    metrics: dict[str, Any]
    by_source: dict[str, dict[str, Any]]


def report_test_split(test: LoadedImages, p_covid: np.ndarray, operating_point: OperatingPoint) -> TestEvaluation:
    """Metrics of calibrated p_covid on the test split at the operating point, printed as tables."""
    targets = covid_targets(test.samples)
    metrics = compute_metrics(targets, p_covid, threshold=operating_point.threshold)
    by_source = metrics_by_source(test.samples, p_covid, threshold=operating_point.threshold)
    print(format_metrics_table(metrics))
    if len(by_source) > 1:
        print(format_by_source(by_source))
    return TestEvaluation(targets, p_covid, metrics, by_source)


def evaluation_plots(evaluation: TestEvaluation, gradcam_grid: bytes) -> dict[str, bytes]:
    """The bundle's ROC, confusion matrix, reliability and Grad-CAM grid PNGs."""
    return {
        "plots/roc.png": plots.roc_png(evaluation.targets, evaluation.p_covid, evaluation.metrics["auc"]),
        "plots/confusion_matrix.png": plots.confusion_matrix_png(evaluation.metrics["confusion_matrix"]),
        "plots/reliability.png": plots.reliability_png(evaluation.targets, evaluation.p_covid,
                                                       title="test split, calibrated p_covid"),
        "plots/gradcam_grid.png": gradcam_grid,
    }


def base_manifest(config: TrainConfig, data: Splits, evaluation: TestEvaluation, *, weights: str,
                  data_paths: Sequence[str | Path]) -> dict[str, Any]:
    """The manifest every recipe writes: identity, preprocessing, training config, data and test metrics."""
    samples = data.samples
    return {
        "name": config.name,
        "version": config.version,
        "architecture": config.arch,
        "input_size": config.input_size,
        "class_names": list(CLASS_NAMES),
        "preprocessing": data.preprocessing,
        "gradcam_layer": config.gradcam_layer,
        "weights": weights,
        "recipe": config.recipe,
        "training": {k: v for k, v in asdict(config).items() if k not in ("progress", "feature_cache")},
        "metrics": evaluation.metrics,
        "metrics_by_source": evaluation.by_source,
        "dataset": {
            "hash": dataset_hash(samples),
            "n_images": len(samples),
            "n_by_label": count_labels(samples),
            "n_skipped": sum(len(loaded.skipped) for _, loaded in data.parts),
            "data_paths": [str(path) for path in data_paths],
            "split": {
                "test_fraction": config.test_fraction,
                "val_fraction": config.val_fraction,
                "seed": config.seed,
                "group_by_patient": config.group_by_patient,
                "method": split_method(samples, config.group_by_patient),
                "n_patients_known": len({s.patient_id for s in samples if s.patient_id}),
                "n_train": len(data.train.samples),
                "n_val": len(data.validation.samples) if data.validation is not None else 0,
                "n_test": len(data.test.samples),
            },
        },
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def publish(model: keras.Model, manifest: dict[str, Any], out: str | Path, extra_files: dict[str, bytes]
            ) -> dict[str, Any]:
    """Save the bundle to a folder or s3:// prefix (LUNGCAM_S3_ENDPOINT_URL applies) and say so."""
    from shared.settings import get_settings

    settings = get_settings()  # an s3:// --out goes to LUNGCAM_S3_ENDPOINT_URL (MinIO, moto) when set
    _step(f"publishing the bundle to {out}")
    published = save_bundle(
        model, manifest, out, extra_files=extra_files, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    print(f"published {manifest['name']} {manifest['version']} to {out}", file=sys.stderr)
    return published


def _weights_label(weights: str | None) -> str:
    """What the manifest says about the initial weights: "imagenet", a packaged name, "none" or the file's name."""
    if weights is None:
        return "none"
    return weights if weights == "imagenet" or weights in PACKAGED_WEIGHTS else Path(weights).name


def _gradcam_grid(model: keras.Model, layer: str, test: LoadedImages) -> bytes:
    """Grad-CAM overlays of up to GRADCAM_GRID_SIZE test images, covid and normal alternating."""
    by_label = {label: [i for i, s in enumerate(test.samples) if s.label == label] for label in CLASS_NAMES}
    chosen: list[int] = []
    for pair in zip(*(rows[: GRADCAM_GRID_SIZE // 2] for rows in by_label.values())):
        chosen.extend(pair)
    chosen = chosen or list(range(min(GRADCAM_GRID_SIZE, len(test.samples))))
    images = test.images[chosen]
    probabilities, cams = GradCam(model, layer)(images.astype(np.float32) / 255.0)
    return plots.gradcam_grid_png(
        images, cams, [test.samples[i].label for i in chosen], probabilities[:, COVID_INDEX]
    )
