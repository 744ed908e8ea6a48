"""Training report figures as PNG bytes: curves, ROC, confusion matrix, Grad-CAM overlays."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot's import

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from shared.overlay import render_overlay


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def training_curves_png(history: Mapping[str, Sequence[float]], monitored: str = "validation") -> bytes:
    """Loss and accuracy per epoch, training and the monitored split (the paper's figure, in two panels).

    `monitored` names what Keras's val_* figures were computed on: "validation", or "test" (paper recipe).
    """
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        for prefix, label in (("", "train"), ("val_", f"{monitored} split")):
            values = history.get(prefix + metric)
            if values:
                axis.plot(range(1, len(values) + 1), values, marker="o", label=f"{label} {metric}")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric.capitalize()} per epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    accuracy_axis.set_ylim(-0.02, 1.02)
    return _png(figure)


def roc_png(y_true_covid: np.ndarray, p_covid: np.ndarray, auc: float | None) -> bytes:
    """ROC curve of covid vs normal with its AUC (a note instead when only one class is present)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    if auc is not None:
        fpr, tpr, _ = roc_curve(y_true_covid, p_covid, pos_label=1)
        axis.plot(fpr, tpr, label=f"ROC (AUC = {auc:.3f})")
    else:
        axis.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (recall)")
    axis.set_title("ROC, covid positive")
    axis.legend(loc="lower right")
    return _png(figure)


def confusion_matrix_png(confusion: dict[str, Any]) -> bytes:
    """The confusion matrix as an annotated heat map (rows true, columns predicted)."""
    matrix = np.asarray(confusion["matrix"])
    labels = confusion["labels"]
    figure, axis = plt.subplots(figsize=(4.5, 4))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis)
    axis.set_xticks(range(len(labels)), labels)
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    axis.set_title("Confusion matrix")
    return _png(figure)


def gradcam_grid_png(images: np.ndarray, cams: np.ndarray, true_labels: Sequence[str], p_covid: np.ndarray) -> bytes:
    """A grid of Grad-CAM overlays, each titled with its true label and p_covid."""
    count = len(images)
    columns = min(4, max(1, count))
    rows = max(1, math.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            axis.imshow(render_overlay(images[index], cams[index]))
            axis.set_title(f"true {true_labels[index]}, p_covid {p_covid[index]:.2f}", fontsize=9)
    figure.suptitle("Grad-CAM on test images")
    return _png(figure)


def reliability_png(
    y_true_covid: np.ndarray, p_covid: np.ndarray, *, title: str = "reliability", n_bins: int = 10
) -> bytes:
    """Reliability diagram: observed covid fraction against mean p_covid per bin, with counts, ECE and Brier."""
    from shared.calibration import brier_score, expected_calibration_error, reliability_bins

    y = np.asarray(y_true_covid, dtype=int)
    p = np.clip(np.asarray(p_covid, dtype=np.float64), 0.0, 1.0)
    bins = reliability_bins(y, p, n_bins)
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    if bins:
        axis.plot([b["mean_predicted"] for b in bins], [b["fraction_covid"] for b in bins], marker="o", label="model")
        counts.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["n"] for b in bins], width=1.0 / n_bins * 0.9)
    ece = expected_calibration_error(y, p, n_bins) if len(p) else float("nan")
    brier = brier_score(y, p) if len(p) else float("nan")
    axis.set_ylabel("observed covid fraction")
    axis.set_title(f"{title}\nECE {ece:.3f}, Brier {brier:.3f}")
    axis.set_xlim(0, 1)
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="upper left")
    counts.set_xlabel("predicted p_covid")
    counts.set_ylabel("images")
    return _png(figure)
