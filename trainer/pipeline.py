"""The steps every recipe shares: splits, the test-split report, plots, the manifest and publishing."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np

from shared.bundle import save_bundle
from shared.calibration import OperatingPoint
from shared.domain import CLASS_NAMES, Manifest
from shared.gradcam import GradCam
from trainer import plots
from trainer.config import ResolvedConfig, preprocessing_for
from trainer.datasets import (
    DatasetError,
    Sample,
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
)
from trainer.loading import LoadedImages, load_images, to_float

GRADCAM_GRID_SIZE = 12


def step(message: str) -> None:
    """Say what training does after the last epoch (these steps take a minute on a CPU)."""
    print(f"lungcam-train: {message}", file=sys.stderr, flush=True)


@dataclass
class Splits:
    """The decoded, preprocessed images of each split, and what the manifest says about the data."""

    samples: list[Sample]
    preprocessing: dict[str, Any]
    train: LoadedImages
    validation: LoadedImages | None
    test: LoadedImages

    @property
    def parts(self) -> list[tuple[str, LoadedImages]]:
        """(name, images) of every split that exists."""
        named = [("training", self.train), ("test", self.test), ("validation", self.validation)]
        return [(name, loaded) for name, loaded in named if loaded is not None]


def labelled_samples(config: ResolvedConfig, data_paths: Sequence[str | Path]) -> list[Sample]:
    """Every sample of the data paths, refused unless both classes are there."""
    samples = load_datasets(data_paths, finding=config.finding, view=config.view)
    counts = count_labels(samples)
    if min(counts.values()) == 0:
        missing = [label for label, count in counts.items() if count == 0]
        raise DatasetError(
            f"training needs images of both classes; none of class {', '.join(missing)} in the data given"
        )
    return samples


def load_splits(config: ResolvedConfig, samples: list[Sample]) -> Splits:
    """Patient-grouped train / (validation) / test splits, decoded and preprocessed as the bundle will be."""
    train_samples, test_samples = split_samples(
        samples, test_fraction=config.test_fraction, seed=config.seed, group_by_patient=config.group_by_patient
    )
    val_samples: list[Sample] = []
    if config.val_fraction > 0:
        # Early stopping and calibration get their own patient-grouped split, carved from the training
        # part: the test split stays untouched until the end.
        train_samples, val_samples = split_samples(
            train_samples,
            test_fraction=config.val_fraction,
            seed=config.seed + 1,
            group_by_patient=config.group_by_patient,
        )
    counts = count_labels(samples)
    split_text = (
        f"train {len(train_samples)}, validation {len(val_samples)}, test {len(test_samples)}"
        if val_samples
        # The paper's recipe has no validation split: what Keras calls val_* each epoch is the test split.
        else f"train {len(train_samples)}, test {len(test_samples)}, no validation split"
        + (" (each epoch is scored on the test split)" if config.recipe == "paper" else "")
    )
    print(
        f"dataset: {len(samples)} images ({', '.join(f'{n} {label}' for label, n in counts.items())}); "
        f"{split_text} ({config.recipe} recipe)",
        file=sys.stderr,
    )
    preprocessing = preprocessing_for(config)

    def _load(part: list[Sample], desc: str) -> LoadedImages:
        return load_images(part, config.input_size, preprocessing=preprocessing, progress=config.progress, desc=desc)

    splits = Splits(
        samples,
        preprocessing,
        _load(train_samples, "train images"),
        _load(val_samples, "validation images") if val_samples else None,
        _load(test_samples, "test images"),
    )
    for part, loaded in splits.parts:
        if len(loaded.samples) == 0 or min(count_labels(loaded.samples).values()) == 0:
            raise DatasetError(
                f"the {part} split has no decodable images of some class: {count_labels(loaded.samples)}"
            )
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


def evaluation_plots(evaluation: TestEvaluation, grid_png: bytes) -> dict[str, bytes]:
    """The bundle's ROC, confusion matrix, reliability and Grad-CAM grid PNGs."""
    return {
        "plots/roc.png": plots.roc_png(evaluation.targets, evaluation.p_covid, evaluation.metrics["auc"]),
        "plots/confusion_matrix.png": plots.confusion_matrix_png(evaluation.metrics["confusion_matrix"]),
        "plots/reliability.png": plots.reliability_png(
            evaluation.targets, evaluation.p_covid, title="test split, calibrated p_covid"
        ),
        "plots/gradcam_grid.png": grid_png,
    }


def base_manifest(
    config: ResolvedConfig, data: Splits, evaluation: TestEvaluation, *, weights: str, data_paths: Sequence[str | Path]
) -> Manifest:
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


def publish(model: keras.Model, manifest: Manifest, out: str | Path, extra_files: dict[str, bytes]) -> Manifest:
    """Save the bundle to a folder or s3:// prefix (LUNGCAM_S3_ENDPOINT_URL applies) and say so."""
    from shared.settings import get_settings

    settings = get_settings()  # an s3:// --out goes to LUNGCAM_S3_ENDPOINT_URL (MinIO, moto) when set
    step(f"publishing the bundle to {out}")
    published = save_bundle(
        model, manifest, out, extra_files=extra_files, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    print(f"published {manifest['name']} {manifest['version']} to {out}", file=sys.stderr)
    return published


def gradcam_grid(model: keras.Model, layer: str, test: LoadedImages, *, smoothing_cells: float = 0.0) -> bytes:
    """Grad-CAM overlays of up to GRADCAM_GRID_SIZE test images, covid and normal alternating."""
    by_label = {label: [i for i, s in enumerate(test.samples) if s.label == label] for label in CLASS_NAMES}
    chosen: list[int] = []
    for pair in zip(*(rows[: GRADCAM_GRID_SIZE // 2] for rows in by_label.values())):
        chosen.extend(pair)
    chosen = chosen or list(range(min(GRADCAM_GRID_SIZE, len(test.samples))))
    images = test.images[chosen]
    probabilities, cams = GradCam(model, layer, smoothing_cells=smoothing_cells)(to_float(images))
    return plots.gradcam_grid_png(images, cams, [test.samples[i].label for i in chosen], probabilities[:, COVID_INDEX])
