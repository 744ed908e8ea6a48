"""Training: the paper's and the robust recipe's fit loops, and `train()`, which runs any recipe end to end."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from shared.calibration import OperatingPoint, fit_operating_point
from shared.domain import CLASS_NAMES, Manifest
from shared.pretrained import PACKAGED_WEIGHTS
from shared.zoo import build_model, resolve_weights
from trainer import plots

# TrainConfig and the recipes' defaults live in trainer.config; importable from here as before
# (`X as X` re-exports them explicitly).
from trainer.config import FROZEN_DEFAULTS as FROZEN_DEFAULTS
from trainer.config import PAPER_DEFAULTS as PAPER_DEFAULTS
from trainer.config import RECIPES as RECIPES
from trainer.config import ROBUST_DEFAULTS as ROBUST_DEFAULTS
from trainer.config import ConfigError as ConfigError
from trainer.config import ResolvedConfig as ResolvedConfig
from trainer.config import TrainConfig as TrainConfig
from trainer.config import preprocessing_for as preprocessing_for
from trainer.config import utc_version as utc_version
from trainer.evaluate import COVID_INDEX, covid_targets, predict_probabilities
from trainer.loading import LoadedImages
from trainer.pipeline import (
    base_manifest,
    evaluation_plots,
    gradcam_grid,
    labelled_samples,
    load_splits,
    publish,
    report_test_split,
    step,
)
from trainer.robust import SMALL_ARCH, build_small_cnn, fit_robust

log = logging.getLogger(__name__)


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
            self._bar = tqdm(
                total=steps,
                desc=f"training epoch {epoch + 1}/{self.epochs}",
                unit="batch",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )

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
        names = {
            "loss": "loss",
            "accuracy": "accuracy",
            "val_loss": f"{self.monitored}_loss",
            "val_accuracy": f"{self.monitored}_accuracy",
        }
        values = "  ".join(f"{name} {logs[key]:.4f}" for key, name in names.items() if key in logs)
        print(f"epoch {epoch + 1}/{self.epochs}  {values}  {elapsed:.1f}s", file=sys.stderr, flush=True)


def one_hot(samples_labels: Sequence[str]) -> np.ndarray:
    """One-hot float32 targets in CLASS_NAMES order (the paper's LabelBinarizer + to_categorical)."""
    return np.eye(len(CLASS_NAMES), dtype=np.float32)[[CLASS_NAMES.index(label) for label in samples_labels]]


def make_dataset(
    images: np.ndarray, targets: np.ndarray, batch_size: int, *, shuffle: bool, rotation_degrees: float, seed: int
) -> tf.data.Dataset:
    """A tf.data pipeline over float32 [0,1] (or uint8) images: optional shuffle, batching, rotation."""
    # Index the in-memory array instead of from_tensor_slices(images): the latter copies the whole
    # array into the graph, which hits the 2 GB protobuf limit on the full public datasets.
    height, width, channels = images.shape[1:]
    scale = 255.0 if images.dtype == np.uint8 else 1.0

    def _gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[indices], targets[indices]

    def _fetch(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch, labels = tf.numpy_function(_gather, [indices], (tf.as_dtype(images.dtype), tf.float32))
        batch.set_shape((None, height, width, channels))
        labels.set_shape((None, targets.shape[1]))
        return tf.cast(batch, tf.float32) / scale, labels

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


def compile_model(model: keras.Model, config: ResolvedConfig) -> None:
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


def build_for(config: ResolvedConfig, weights: str | None) -> keras.Model:
    """The small CNN or a zoo backbone with the paper's head, as the (resolved) config says."""
    if config.arch == SMALL_ARCH:
        if weights is not None:
            raise ConfigError("the small CNN has no pretrained weights; use --weights none with --arch small")
        return build_small_cnn(config.input_size, seed=config.seed, weight_decay=0.0)
    return build_model(
        config.arch, input_size=config.input_size, weights=weights, freeze_backbone=config.freeze_backbone
    )


def fit_on_arrays(
    config: ResolvedConfig,
    model: keras.Model,
    train_images: np.ndarray,
    train_labels: Sequence[str],
    val_images: np.ndarray,
    val_labels: Sequence[str],
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> keras.callbacks.History:
    """Train `model` on [0,1] float images with the (resolved) config's recipe; `val_*` is validation data.

    The paper's recipe trains a fixed number of epochs and only reports the validation curves; the
    robust recipe stops early on the validation loss and keeps the best weights.
    """
    if config.recipe == "paper":
        compile_model(model, config)
        train_data = make_dataset(
            train_images,
            one_hot(train_labels),
            config.batch_size,
            shuffle=True,
            rotation_degrees=config.rotation_degrees,
            seed=config.seed,
        )
        val_data = make_dataset(
            val_images, one_hot(val_labels), config.batch_size, shuffle=False, rotation_degrees=0, seed=config.seed
        )
        # shuffle=False: the tf.data pipeline already shuffles (with the run's seed).
        return model.fit(
            train_data,
            validation_data=val_data,
            epochs=config.epochs,
            shuffle=False,
            verbose=0,
            callbacks=list(callbacks),
        )
    return fit_robust(
        model,
        train_images,
        one_hot(train_labels),
        val_images,
        one_hot(val_labels),
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        patience=config.patience,
        seed=config.seed,
        augment_strength=config.augment_strength,
        rotation_degrees=config.rotation_degrees,
        callbacks=callbacks,
    )


def train(config: TrainConfig, data_paths: Sequence[str | Path], out: str | Path) -> Manifest:
    """Train, evaluate on the test split, write plots and publish the bundle to `out`; return the manifest."""
    return train_resolved(config.resolved(), data_paths, out)


def train_resolved(config: ResolvedConfig, data_paths: Sequence[str | Path], out: str | Path) -> Manifest:
    """train() with the configuration resolved."""
    weights = resolve_weights(config.weights)  # fails early on a missing weights file
    keras.utils.set_random_seed(config.seed)
    samples = labelled_samples(config, data_paths)
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
    monitored = "validation" if val_images is not None else "test"
    epoch_log = EpochLog(config.epochs, progress=config.progress, monitored=monitored)
    started = time.perf_counter()
    history = fit_on_arrays(
        config,
        model,
        train_images.images,
        [s.label for s in train_images.samples],
        monitor.images,
        [s.label for s in monitor.samples],
        callbacks=[epoch_log],
    )
    training_seconds = time.perf_counter() - started

    operating_point = _calibrated(config, model, val_images) if val_images is not None else OperatingPoint()

    step(f"evaluating on the test split ({len(test_images.samples)} images)")
    p_covid = operating_point.calibrate(predict_probabilities(model, test_images.images)[:, COVID_INDEX])
    evaluation = report_test_split(test_images, p_covid, operating_point)

    step("drawing the plots and the Grad-CAM grid")
    curves = {key: [float(v) for v in values] for key, values in history.history.items()}
    curves["epoch_seconds"] = epoch_log.seconds
    # Keras's val_* keys stay (tools read them); val_split says which split they are.
    history_record: dict[str, Any] = {**curves, "val_split": monitored}
    extra_files = {
        "plots/training_curves.png": plots.training_curves_png(curves, monitored=monitored),
        **evaluation_plots(evaluation, gradcam_grid(model, config.gradcam_layer, test_images)),
        "history.json": json.dumps(history_record, indent=2).encode(),
    }
    manifest = base_manifest(config, data, evaluation, weights=_weights_label(weights), data_paths=data_paths)
    manifest["training"].update(seconds=round(training_seconds, 1), epochs_run=len(curves.get("loss", [])))
    if weights in PACKAGED_WEIGHTS:
        # Training may have changed the backbone (--fine-tune), so the bundle embeds it; the
        # manifest still says where it started.
        manifest["backbone"] = {
            **PACKAGED_WEIGHTS[weights].provenance(),
            "embedded": True,
            "frozen": bool(config.freeze_backbone),
        }
    if val_images is not None:
        manifest["calibration"] = operating_point.to_manifest()
    return publish(model, manifest, out, extra_files)


def _calibrated(config: ResolvedConfig, model: keras.Model, validation: LoadedImages) -> OperatingPoint:
    """The operating point fitted on the validation split (temperature, threshold for the target sensitivity)."""
    step(f"calibrating on the validation split ({len(validation.samples)} images)")
    p_val = predict_probabilities(model, validation.images)[:, COVID_INDEX]
    operating_point = fit_operating_point(
        covid_targets(validation.samples),
        p_val,
        target_sensitivity=config.target_sensitivity,
        indeterminate_width=config.indeterminate_width,
        split="validation (patient-grouped, from the training part)",
    )
    print(
        f"calibration on validation: temperature {operating_point.temperature:.3f}, threshold "
        f"{operating_point.threshold:.4f} for sensitivity >= {config.target_sensitivity:.2f}",
        file=sys.stderr,
    )
    return operating_point


def _weights_label(weights: str | None) -> str:
    """What the manifest says about the initial weights: "imagenet", a packaged name, "none" or the file's name."""
    if weights is None:
        return "none"
    return weights if weights == "imagenet" or weights in PACKAGED_WEIGHTS else Path(weights).name
