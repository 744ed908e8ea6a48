"""Metrics on a test split, and re-evaluating a published bundle on (the same) data."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from shared.calibration import OperatingPoint, brier_score, expected_calibration_error
from shared.domain import CLASS_NAMES
from trainer.datasets import Sample, dataset_hash, load_datasets
from trainer.loading import load_images, to_float

log = logging.getLogger(__name__)

COVID_INDEX = CLASS_NAMES.index("covid")
THRESHOLD = 0.5
PREDICT_BATCH_SIZE = 32
UNKNOWN_SOURCE = "unknown"
METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "auc", "ece", "brier")
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
SPECIFICITY_POINTS = (0.90, 0.95)


def bootstrap_auc_ci(
    y_true: np.ndarray, scores: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[float] | None:
    """Percentile 95% interval of the ROC AUC over bootstrap resamples of the images (fixed seed)."""
    y = np.asarray(y_true, dtype=int)
    if y.min() == y.max():
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        rows = rng.integers(0, len(y), len(y))
        yy = y[rows]
        n_pos = int(yy.sum())
        if n_pos == 0 or n_pos == len(yy):
            continue
        ranks = rankdata(scores[rows])
        aucs.append((ranks[yy == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(yy) - n_pos)))
    if not aucs:
        return None
    low, high = np.percentile(aucs, [2.5, 97.5])
    return [float(low), float(high)]


def sensitivity_at_specificity(y_true: np.ndarray, scores: np.ndarray, specificity: float) -> float | None:
    """The highest sensitivity of any threshold whose specificity is at least `specificity`."""
    y = np.asarray(y_true, dtype=int)
    if y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, scores, pos_label=1)
    allowed = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def compute_metrics(
    y_true_covid: Sequence[int] | np.ndarray, p_covid: Sequence[float] | np.ndarray, threshold: float = THRESHOLD
) -> dict[str, Any]:
    """Accuracy, precision, recall, specificity, F1, ROC AUC (with a bootstrap 95% interval), sensitivity
    at 0.90 and 0.95 specificity, expected calibration error, Brier score and the confusion matrix, covid
    positive; labels are p_covid >= threshold (the bundle's operating point; 0.5 is two-class argmax).

    A metric whose denominator is zero (e.g. precision with no covid prediction, or AUC with one
    class) is None, with the reason under "notes".
    """
    y_true = np.asarray(y_true_covid, dtype=int).ravel()
    scores = np.asarray(p_covid, dtype=np.float64).ravel()
    if y_true.shape != scores.shape:
        raise ValueError(f"{len(y_true)} labels but {len(scores)} scores")
    if len(y_true) == 0:
        raise ValueError("no images to compute metrics on")
    if not set(np.unique(y_true)) <= {0, 1}:
        raise ValueError("y_true_covid must be 0/1")
    # Two-class softmax: argmax picks covid exactly when p_covid >= 0.5 (ties go to index 0, covid).
    y_pred = (scores >= threshold).astype(int)
    # sklearn orders labels ascending; [1, 0] puts covid (positive) first: [[TP, FN], [FP, TN]].
    matrix = confusion_matrix(y_true, y_pred, labels=[1, 0])
    (tp, fn), (fp, tn) = matrix.tolist()
    notes: dict[str, str] = {}
    positives, negatives = tp + fn, fp + tn

    def _defined(name: str, value: float, reason: str | None) -> float | None:
        if reason is not None:
            notes[name] = reason
            return None
        return float(value)

    nan = float("nan")
    precision = precision_score(y_true, y_pred, pos_label=1, zero_division=nan)
    recall = recall_score(y_true, y_pred, pos_label=1, zero_division=nan)
    specificity = recall_score(y_true, y_pred, pos_label=0, zero_division=nan)
    f1 = f1_score(y_true, y_pred, pos_label=1, zero_division=nan)
    one_class = positives == 0 or negatives == 0
    metrics: dict[str, Any] = {
        "n": len(y_true),
        "n_covid": int(positives),
        "n_normal": int(negatives),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": _defined("precision", precision, "no image predicted covid" if tp + fp == 0 else None),
        "recall": _defined("recall", recall, "no covid image in the set" if positives == 0 else None),
        "specificity": _defined("specificity", specificity, "no normal image in the set" if negatives == 0 else None),
        "f1": _defined("f1", f1, "no covid image and none predicted" if math.isnan(f1) else None),
        "auc": _defined(
            "auc",
            roc_auc_score(y_true, scores) if not one_class else nan,
            f"only one class present ({'covid' if negatives == 0 else 'normal'}); ROC AUC is undefined"
            if one_class
            else None,
        ),
        "auc_ci95": None if one_class else bootstrap_auc_ci(y_true, scores),
        "sensitivity_at_specificity": {
            f"{point:.2f}": None if one_class else sensitivity_at_specificity(y_true, scores, point)
            for point in SPECIFICITY_POINTS
        },
        "ece": expected_calibration_error(y_true, np.clip(scores, 0.0, 1.0)),
        "brier": brier_score(y_true, np.clip(scores, 0.0, 1.0)),
        "confusion_matrix": {
            "labels": ["covid", "normal"],
            "rows": "true label",
            "columns": "predicted label",
            "matrix": [[tp, fn], [fp, tn]],
        },
    }
    if notes:
        metrics["notes"] = notes
    return metrics


def format_metrics_table(metrics: dict[str, Any], title: str = "test split") -> str:
    """A plain-text table of the metrics and the confusion matrix."""
    width = 12
    lines = [f"{title}: {metrics['n']} images ({metrics['n_covid']} covid, {metrics['n_normal']} normal)"]
    for name in METRIC_NAMES:
        value = metrics.get(name)
        extra = ""
        if name == "auc" and metrics.get("auc_ci95"):
            extra = f"  (95% CI {metrics['auc_ci95'][0]:.4f}-{metrics['auc_ci95'][1]:.4f}, bootstrap)"
        lines.append(f"  {name:<{width}} {'n/a' if value is None else f'{value:.4f}'}{extra}")
    for point, value in (metrics.get("sensitivity_at_specificity") or {}).items():
        label = f"sens@spec{point}"
        lines.append(f"  {label:<{width}} {'n/a' if value is None else f'{value:.4f}'}")
    lines.append(f"  {'threshold':<{width}} {metrics.get('threshold', THRESHOLD):.4f}")
    (tp, fn), (fp, tn) = metrics["confusion_matrix"]["matrix"]
    lines += [
        "  confusion matrix (rows true, columns predicted):",
        f"  {'':<{width}} {'covid':>8} {'normal':>8}",
        f"  {'covid':<{width}} {tp:>8} {fn:>8}",
        f"  {'normal':<{width}} {fp:>8} {tn:>8}",
    ]
    for name, reason in metrics.get("notes", {}).items():
        lines.append(f"  note: {name}: {reason}")
    return "\n".join(lines)


def format_by_source(metrics_by_source: dict[str, dict[str, Any]]) -> str:
    """One line per source: images per class and the metrics that are defined there."""
    lines = ["by source:"]
    for source, metrics in metrics_by_source.items():
        defined = ", ".join(f"{name} {metrics[name]:.4f}" for name in METRIC_NAMES if metrics.get(name) is not None)
        lines.append(f"  {source}: {metrics['n_covid']} covid, {metrics['n_normal']} normal; {defined}")
    return "\n".join(lines)


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int = PREDICT_BATCH_SIZE) -> np.ndarray:
    """Class probabilities for [0,1] float (or uint8) images, in fixed batches with the model in inference mode."""
    if len(images) == 0:
        return np.zeros((0, len(CLASS_NAMES)), dtype=np.float32)
    # Fixed batches through the compiled inference function in both train and evaluate: the same
    # code path gives the same numbers, so the manifest's metrics can be reproduced exactly. (An
    # eager model(x) call keeps every intermediate activation alive: gigabytes at 224 px.)
    batches = [
        np.asarray(model.predict_on_batch(to_float(images[start : start + batch_size])))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches, axis=0)


def covid_targets(samples: Sequence[Sample]) -> np.ndarray:
    """1 for covid samples, 0 for normal."""
    return np.array([1 if sample.label == "covid" else 0 for sample in samples], dtype=int)


def metrics_by_source(
    samples: Sequence[Sample], p_covid: np.ndarray, threshold: float = THRESHOLD
) -> dict[str, dict[str, Any]]:
    """compute_metrics per source (images without a known source grouped as "unknown")."""
    indices: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        indices[sample.source or UNKNOWN_SOURCE].append(index)
    targets = covid_targets(samples)
    return {
        source: compute_metrics(targets[rows], np.asarray(p_covid)[rows], threshold)
        for source, rows in sorted(indices.items())
    }


def evaluate_bundle(
    bundle_uri: str | Path,
    data_paths: Sequence[str | Path],
    split: str = "test",
    *,
    progress: bool = True,
    plots_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Reload a bundle, rebuild its dataset and split from the manifest, and compute the metrics again.

    Images go through the bundle's own preprocessing and operating point (calibrated p_covid,
    threshold). With several data paths, "metrics" is the pooled result and "metrics_by_dataset"
    gives each path alone. `plots_dir` receives reliability.png and roc.png.
    """
    from shared.bundle import load_bundle
    from shared.settings import get_settings
    from trainer.config import BundleData

    if split not in ("test", "all"):
        raise ValueError(f"split must be 'test' or 'all', got {split!r}")
    settings = get_settings()
    bundle = load_bundle(bundle_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    manifest = bundle.manifest
    operating_point = bundle.operating_point
    bundle_data = BundleData.of(manifest)
    per_path = [
        (str(path), load_datasets([path], finding=bundle_data.finding, view=bundle_data.view)) for path in data_paths
    ]
    samples = [sample for _, part in per_path for sample in part]
    current_hash = dataset_hash(samples)
    expected_hash = manifest.get("dataset", {}).get("hash")
    if expected_hash and current_hash != expected_hash:
        _warn_dataset_differs(current_hash, expected_hash)
    chosen = bundle_data.test_split(samples) if split == "test" else list(samples)
    loaded = load_images(
        chosen, bundle.input_size, preprocessing=bundle.preprocessing, progress=progress, desc=f"{split} images"
    )
    p_covid = operating_point.calibrate(predict_probabilities(bundle.model, loaded.images)[:, COVID_INDEX])
    targets = covid_targets(loaded.samples)
    threshold = operating_point.threshold
    result: dict[str, Any] = {
        "bundle": {"name": bundle.name, "version": bundle.version},
        "split": split,
        "n_images": len(loaded.samples),
        "n_skipped": len(loaded.skipped),
        "dataset_hash": current_hash,
        "dataset_hash_matches": expected_hash == current_hash if expected_hash else None,
        "operating_point": _operating_point_record(operating_point, calibrated="calibration" in manifest),
        "metrics": compute_metrics(targets, p_covid, threshold),
        "metrics_by_source": metrics_by_source(loaded.samples, p_covid, threshold),
    }
    if len(data_paths) > 1:
        result["metrics_by_dataset"] = _metrics_by_dataset(per_path, loaded.samples, targets, p_covid, threshold)
    if plots_dir is not None:
        title = f"{bundle.name} {bundle.version}, {split}"
        result["plots"] = _write_plots(Path(plots_dir), targets, p_covid, result["metrics"]["auc"], title)
    return result


def _warn_dataset_differs(current_hash: str, expected_hash: str) -> None:
    """Say loudly that the data is not what the bundle was trained on: its split and metrics are not comparable."""
    log.warning(
        "\n%s\nDATASET HASH DIFFERS from the one this model was trained on (%s… vs %s…): the split "
        "below is not the training run's test split and the metrics are not comparable.\n%s",
        "!" * 78,
        current_hash[:12],
        expected_hash[:12],
        "!" * 78,
    )


def _operating_point_record(operating_point: OperatingPoint, *, calibrated: bool) -> dict[str, Any]:
    """The evaluation's "operating_point" entry: temperature, threshold, band, and whether the bundle has one."""
    band = operating_point.indeterminate_band
    return {
        "temperature": operating_point.temperature,
        "threshold": operating_point.threshold,
        "indeterminate_band": list(band) if band else None,
        "calibrated": calibrated,
    }


def _metrics_by_dataset(
    per_path: Sequence[tuple[str, list[Sample]]],
    evaluated: Sequence[Sample],
    targets: np.ndarray,
    p_covid: np.ndarray,
    threshold: float,
) -> dict[str, dict[str, Any]]:
    """compute_metrics for the evaluated images of each data path alone (paths with none left out)."""
    origin = {id(sample): path for path, part in per_path for sample in part}
    by_dataset: dict[str, dict[str, Any]] = {}
    for path, _ in per_path:
        rows = [i for i, sample in enumerate(evaluated) if origin.get(id(sample)) == path]
        if rows:
            by_dataset[path] = compute_metrics(targets[rows], p_covid[rows], threshold)
    return by_dataset


def _write_plots(folder: Path, targets: np.ndarray, p_covid: np.ndarray, auc: float | None, title: str) -> list[str]:
    """reliability.png and roc.png in `folder` (made if missing); their paths."""
    from trainer import plots

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reliability.png").write_bytes(plots.reliability_png(targets, p_covid, title=title))
    (folder / "roc.png").write_bytes(plots.roc_png(targets, p_covid, auc))
    return [str(folder / "reliability.png"), str(folder / "roc.png")]
