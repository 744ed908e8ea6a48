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
from shared.imaging import INTENSITY_METHODS, PREPROCESSING, SQUARE_METHODS, robust_preprocessing
from shared.zoo import ARCHITECTURES, CLASS_NAMES, build_model, resolve_weights
from trainer import plots
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


RECIPES = ("paper", "robust")
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
    "augment_strength": 1.0,
    "label_smoothing": 0.1,
    "weight_decay": 0.02,
    "val_fraction": 0.15,
    "patience": 8,
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
    # "imagenet", "none", or a local weights file; None: imagenet, except "none" for the small CNN.
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
    # The robust recipe's training: augmentation, regularisation, early stopping on a validation split.
    augment_strength: float | None = None
    label_smoothing: float | None = None
    weight_decay: float | None = None
    val_fraction: float | None = None
    patience: int | None = None
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
        defaults = ROBUST_DEFAULTS if self.recipe == "robust" else PAPER_DEFAULTS
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


class EpochLog(keras.callbacks.Callback):
    """A progress bar per epoch (batches, loss, ETA) and one summary line per epoch on stderr.

    Keras names the monitored split's figures `val_*` whatever it is; `monitored` says what it really
    is ("validation", or "test" for the paper's recipe, which scores the test split every epoch), and
    the summary line names the figures by it.
    """

    def __init__(self, epochs: int, *, progress: bool = True, monitored: str = "validation"):
        super().__init__()
        self.epochs = epochs
        self.progress = progress
        self.monitored = monitored
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
        names = {"loss": "loss", "accuracy": "accuracy", "val_loss": f"{self.monitored}_loss",
                 "val_accuracy": f"{self.monitored}_accuracy"}
        values = "  ".join(f"{name} {logs[key]:.4f}" for key, name in names.items() if key in logs)
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

    samples = load_datasets(data_paths, finding=config.finding, view=config.view)
    counts = count_labels(samples)
    if min(counts.values()) == 0:
        missing = [label for label, count in counts.items() if count == 0]
        raise DatasetError(f"training needs images of both classes; none of class {', '.join(missing)} in the data given")
    # Build the model before reading any pixels: unavailable ImageNet weights or an unknown
    # --gradcam-layer should fail in seconds, not after minutes of decoding.
    model = build_for(config, weights)
    try:
        model.get_layer(config.gradcam_layer)
    except ValueError as exc:
        raise ConfigError(f"the {config.arch} model has no layer {config.gradcam_layer!r} for Grad-CAM") from exc
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
    split_text = (
        f"train {len(train_samples)}, validation {len(val_samples)}, test {len(test_samples)}" if val_samples
        # The paper's recipe has no validation split: what Keras calls val_* each epoch is the test split.
        else f"train {len(train_samples)}, test {len(test_samples)}, no validation split (each epoch is scored on the test split)"
    )
    print(
        f"dataset: {len(samples)} images ({', '.join(f'{n} {label}' for label, n in counts.items())}); "
        f"{split_text} ({config.recipe} recipe)",
        file=sys.stderr,
    )
    data_hash = dataset_hash(samples)
    preprocessing = preprocessing_for(config)

    def _load(part: list, desc: str) -> LoadedImages:
        return load_images(part, config.input_size, preprocessing=preprocessing, progress=config.progress, desc=desc)

    train_images = _load(train_samples, "train images")
    test_images = _load(test_samples, "test images")
    val_images = _load(val_samples, "validation images") if val_samples else None
    parts = [("training", train_images), ("test", test_images)] + ([("validation", val_images)] if val_images else [])
    for part, loaded in parts:
        if len(loaded.samples) == 0 or min(count_labels(loaded.samples).values()) == 0:
            raise DatasetError(f"the {part} split has no decodable images of some class: {count_labels(loaded.samples)}")

    # The paper validates on the test split every epoch (its training-curve figure); the robust
    # recipe on its own validation split.
    monitor = val_images if val_images is not None else test_images
    monitored = "validation" if val_images is not None else "test"
    epoch_log = EpochLog(config.epochs, progress=config.progress, monitored=monitored)
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
    probabilities = predict_probabilities(model, test_images.images)
    p_covid = operating_point.calibrate(probabilities[:, COVID_INDEX])
    targets = covid_targets(test_images.samples)
    metrics = compute_metrics(targets, p_covid, threshold=operating_point.threshold)
    by_source = metrics_by_source(test_images.samples, p_covid, threshold=operating_point.threshold)
    print(format_metrics_table(metrics))
    if len(by_source) > 1:
        print(format_by_source(by_source))

    _step("drawing the plots and the Grad-CAM grid")
    history_record = {key: [float(v) for v in values] for key, values in history.history.items()}
    history_record["epoch_seconds"] = epoch_log.seconds
    # Keras's val_* keys stay (tools read them); this says which split they are.
    history_record["val_split"] = monitored
    extra_files = {
        "plots/training_curves.png": plots.training_curves_png(history_record, monitored=monitored),
        "plots/roc.png": plots.roc_png(targets, p_covid, metrics["auc"]),
        "plots/confusion_matrix.png": plots.confusion_matrix_png(metrics["confusion_matrix"]),
        "plots/reliability.png": plots.reliability_png(targets, p_covid, title="test split, calibrated p_covid"),
        "plots/gradcam_grid.png": _gradcam_grid(model, config.gradcam_layer, test_images),
        "history.json": json.dumps(history_record, indent=2).encode(),
    }
    manifest = {
        "name": config.name,
        "version": config.version,
        "architecture": config.arch,
        "input_size": config.input_size,
        "class_names": list(CLASS_NAMES),
        "preprocessing": preprocessing,
        "gradcam_layer": config.gradcam_layer,
        "weights": _weights_label(weights),
        "recipe": config.recipe,
        "training": {
            **{k: v for k, v in asdict(config).items() if k != "progress"},
            "seconds": round(training_seconds, 1),
            "epochs_run": len(history_record.get("loss", [])),
        },
        "metrics": metrics,
        "metrics_by_source": by_source,
        "dataset": {
            "hash": data_hash,
            "n_images": len(samples),
            "n_by_label": counts,
            "n_skipped": sum(len(loaded.skipped) for _, loaded in parts),
            "data_paths": [str(path) for path in data_paths],
            "split": {
                "test_fraction": config.test_fraction,
                "val_fraction": config.val_fraction,
                "seed": config.seed,
                "group_by_patient": config.group_by_patient,
                "method": split_method(samples, config.group_by_patient),
                "n_patients_known": len({s.patient_id for s in samples if s.patient_id}),
                "n_train": len(train_images.samples),
                "n_val": len(val_images.samples) if val_images is not None else 0,
                "n_test": len(test_images.samples),
            },
        },
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if val_images is not None:
        manifest["calibration"] = operating_point.to_manifest()
    from shared.settings import get_settings

    settings = get_settings()  # an s3:// --out goes to LUNGCAM_S3_ENDPOINT_URL (MinIO, moto) when set
    _step(f"publishing the bundle to {out}")
    published = save_bundle(
        model, manifest, out, extra_files=extra_files, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    print(f"published {config.name} {config.version} to {out}", file=sys.stderr)
    return published


def _weights_label(weights: str | None) -> str:
    """What the manifest says about the initial weights: "imagenet", "none" or the file's name."""
    if weights is None:
        return "none"
    return weights if weights == "imagenet" else Path(weights).name


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
