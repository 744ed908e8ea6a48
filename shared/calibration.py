"""Calibration and the operating point of a bundle: what the trainer fits and the workers apply.

A two-class softmax model's p_covid is sigmoid(z_covid - z_normal). Temperature scaling divides
the logit difference by T, so it is applied to p_covid alone: p_cal = sigmoid(logit(p_covid) / T).
T > 1 softens an over-confident model; it never changes the ranking (AUC is unchanged).

The operating point is a threshold on the *calibrated* p_covid, chosen on the validation split for
a target sensitivity, and an optional indeterminate band [low, high) around it. Both live in the
bundle's manifest under "calibration"; a bundle without that key behaves as before (T = 1,
threshold 0.5: argmax of a two-class softmax, ties to covid).

Also here: the manifest's shortcut-audit verdict (`audit_status`), and the calibration metrics the
trainer reports (expected calibration error, Brier score, reliability bins).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.errors import LungcamError

COVID, NORMAL, INDETERMINATE = "covid", "normal", "indeterminate"
DEFAULT_THRESHOLD = 0.5
DEFAULT_TARGET_SENSITIVITY = 0.90
AUDIT_PASSED = "pass"
# Probabilities are clipped this far from 0 and 1 before taking logits (float32 softmax saturates).
_EPS = 1e-7
_TEMPERATURE_BOUNDS = (0.05, 100.0)


class CalibrationError(LungcamError, ValueError):
    """Calibration that cannot be fitted (one class only, no images) or a malformed manifest entry."""


def _as_probabilities(p: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(p, dtype=np.float64).ravel()
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0):
        raise ValueError("probabilities must be finite and in [0, 1]")
    return values


def logit(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [1e-7, 1 - 1e-7]."""
    clipped = np.clip(_as_probabilities(p), _EPS, 1.0 - _EPS)
    log_odds: np.ndarray = np.log(clipped) - np.log1p(-clipped)
    return log_odds


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large |z|."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    exp_z = np.exp(z[~positive])
    out[~positive] = exp_z / (1.0 + exp_z)
    return out


def apply_temperature(p_covid: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p_covid) / temperature); temperature 1 returns p_covid unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p = _as_probabilities(p_covid)
    if temperature == 1.0:
        unchanged: np.ndarray = p.copy()
        return unchanged
    return sigmoid(logit(p) / temperature)


@dataclass(frozen=True)
class OperatingPoint:
    """Temperature, threshold and optional indeterminate band on the calibrated p_covid."""

    temperature: float = 1.0
    threshold: float = DEFAULT_THRESHOLD
    # [low, high): a calibrated p_covid in this interval is labelled "indeterminate".
    indeterminate_band: tuple[float, float] | None = None
    target_sensitivity: float | None = None
    # How it was chosen (split, counts, achieved sensitivity/specificity): informational only.
    fitted_on: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise CalibrationError(f"temperature must be positive and finite, got {self.temperature}")
        if not 0.0 <= self.threshold <= 1.0:
            raise CalibrationError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.indeterminate_band is not None:
            low, high = (float(v) for v in self.indeterminate_band)
            if not 0.0 <= low <= self.threshold <= high <= 1.0:
                raise CalibrationError(
                    f"indeterminate band [{low}, {high}) must lie in [0, 1] and contain the threshold {self.threshold}"
                )
            object.__setattr__(self, "indeterminate_band", (low, high))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> OperatingPoint:
        """The bundle's operating point; a manifest without "calibration" gives T=1, threshold 0.5."""
        entry = manifest.get("calibration")
        if not entry:
            return cls()
        if not isinstance(entry, Mapping):
            raise CalibrationError(f"manifest 'calibration' must be an object, got {type(entry).__name__}")
        band = entry.get("indeterminate_band")
        try:
            return cls(
                temperature=float(entry.get("temperature", 1.0)),
                threshold=float(entry.get("threshold", DEFAULT_THRESHOLD)),
                indeterminate_band=(float(band[0]), float(band[1])) if band else None,
                target_sensitivity=(
                    float(entry["target_sensitivity"]) if entry.get("target_sensitivity") is not None else None
                ),
                fitted_on=dict(entry.get("fitted_on") or {}),
            )
        except (TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed manifest 'calibration': {exc}") from exc

    def to_manifest(self) -> dict[str, Any]:
        """The JSON object stored under the manifest's "calibration" key."""
        return {
            "method": "temperature scaling of the covid-vs-normal logit; threshold on the calibrated p_covid",
            "temperature": float(self.temperature),
            "threshold": float(self.threshold),
            "indeterminate_band": list(self.indeterminate_band) if self.indeterminate_band else None,
            "target_sensitivity": self.target_sensitivity,
            "fitted_on": self.fitted_on,
        }

    def calibrate(self, p_covid: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated p_covid (float64 array, same length)."""
        return apply_temperature(p_covid, self.temperature)

    def label(self, p_calibrated: Sequence[float] | np.ndarray) -> list[str]:
        """ "covid" at or above the threshold, "normal" below it, "indeterminate" inside the band."""
        p = _as_probabilities(p_calibrated)
        labels = np.where(p >= self.threshold, COVID, NORMAL).astype(object)
        if self.indeterminate_band is not None:
            low, high = self.indeterminate_band
            labels[(p >= low) & (p < high)] = INDETERMINATE
        return [str(value) for value in labels]

    def predict(self, p_covid: Sequence[float] | np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(calibrated p_covid, labels) from the model's raw p_covid."""
        calibrated = self.calibrate(p_covid)
        return calibrated, self.label(calibrated)


# --- fitting -------------------------------------------------------------------------------------


def _check_binary(y_true: Sequence[int] | np.ndarray, p: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true, dtype=int).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0/1 (1 = covid)")
    return y


def binary_nll(y_true: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Mean negative log-likelihood of 0/1 labels under probabilities p."""
    probabilities = np.clip(_as_probabilities(p), _EPS, 1.0 - _EPS)
    y = _check_binary(y_true, probabilities)
    return float(-np.mean(y * np.log(probabilities) + (1 - y) * np.log1p(-probabilities)))


def fit_temperature(y_true: Sequence[int] | np.ndarray, p_covid: Sequence[float] | np.ndarray) -> float:
    """The temperature minimising the NLL of the labels (Guo et al. 2017), searched on log T."""
    from scipy.optimize import minimize_scalar

    p = _as_probabilities(p_covid)
    y = _check_binary(y_true, p)
    if len(y) == 0 or y.min() == y.max():
        raise CalibrationError("temperature scaling needs both classes in the validation split")
    z = logit(p)

    def nll(log_t: float) -> float:
        q = np.clip(sigmoid(z / math.exp(log_t)), _EPS, 1.0 - _EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    low, high = (math.log(bound) for bound in _TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    temperature = float(math.exp(result.x))
    # Never return something worse than doing nothing (flat likelihoods, rounding).
    return temperature if nll(result.x) <= nll(0.0) else 1.0


def threshold_for_sensitivity(
    y_true: Sequence[int] | np.ndarray,
    p_covid: Sequence[float] | np.ndarray,
    target: float = DEFAULT_TARGET_SENSITIVITY,
) -> float:
    """The highest threshold t with mean(p[covid] >= t) >= target on these images.

    The k-th highest covid score, k = ceil(target * n_covid): exactly the fewest covid images that
    meet the target lie at or above it, so specificity is as high as that sensitivity allows here.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    p = _as_probabilities(p_covid)
    y = _check_binary(y_true, p)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise CalibrationError("choosing a threshold for sensitivity needs covid images")
    k = max(1, math.ceil(target * positives.size - 1e-9))
    return float(positives[k - 1])


def fit_operating_point(
    y_true: Sequence[int] | np.ndarray,
    p_covid: Sequence[float] | np.ndarray,
    *,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    indeterminate_width: float = 0.0,
    calibrate: bool = True,
    split: str = "validation",
) -> OperatingPoint:
    """Temperature (unless calibrate=False), then the threshold for the target sensitivity, on one split.

    indeterminate_width > 0 adds a band [threshold - w/2, threshold + w/2) (clipped to [0, 1]).
    """
    p = _as_probabilities(p_covid)
    y = _check_binary(y_true, p)
    temperature = fit_temperature(y, p) if calibrate else 1.0
    calibrated = apply_temperature(p, temperature)
    threshold = threshold_for_sensitivity(y, calibrated, target_sensitivity)
    band = None
    if indeterminate_width > 0:
        band = (max(0.0, threshold - indeterminate_width / 2), min(1.0, threshold + indeterminate_width / 2))
    predicted = calibrated >= threshold
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    fitted_on = {
        "split": split,
        "n": len(y),
        "n_covid": n_pos,
        "n_normal": n_neg,
        "sensitivity": float(predicted[y == 1].mean()) if n_pos else None,
        "specificity": float((~predicted[y == 0]).mean()) if n_neg else None,
        "nll_before": binary_nll(y, p),
        "nll_after": binary_nll(y, calibrated),
        "ece_before": expected_calibration_error(y, p),
        "ece_after": expected_calibration_error(y, calibrated),
    }
    return OperatingPoint(temperature, threshold, band, target_sensitivity, fitted_on)


# --- calibration metrics -------------------------------------------------------------------------


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, p_covid: Sequence[float] | np.ndarray, n_bins: int = 10
) -> list[dict[str, float]]:
    """Equal-width bins of p_covid: count, mean predicted p_covid and observed covid fraction (non-empty bins)."""
    p = _as_probabilities(p_covid)
    y = _check_binary(y_true, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        rows = index == b
        if rows.any():
            bins.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(rows.sum()),
                    "mean_predicted": float(p[rows].mean()),
                    "fraction_covid": float(y[rows].mean()),
                }
            )
    return bins


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, p_covid: Sequence[float] | np.ndarray, n_bins: int = 10
) -> float:
    """ECE of p_covid: the count-weighted mean |observed covid fraction - mean p_covid| over 10 equal bins."""
    p = _as_probabilities(p_covid)
    if p.size == 0:
        raise ValueError("no probabilities")
    bins = reliability_bins(y_true, p, n_bins)
    return float(sum(b["n"] * abs(b["fraction_covid"] - b["mean_predicted"]) for b in bins) / p.size)


def brier_score(y_true: Sequence[int] | np.ndarray, p_covid: Sequence[float] | np.ndarray) -> float:
    """Mean squared difference between p_covid and the 0/1 covid label."""
    p = _as_probabilities(p_covid)
    y = _check_binary(y_true, p)
    if p.size == 0:
        raise ValueError("no probabilities")
    return float(np.mean((p - y) ** 2))


# --- the shortcut audit's verdict ---------------------------------------------------------------


def audit_status(manifest: Mapping[str, Any]) -> str | None:
    """None when the bundle passed the shortcut audit; otherwise a one-line warning for the logs."""
    name = f"{manifest.get('name', '?')} {manifest.get('version', '?')}"
    audit = manifest.get("audit")
    if not audit:
        return (
            f"model {name} has never been through the shortcut audit "
            "(lungcam-train audit --bundle B --data D); its scores may come from image borders, labels or "
            "scanner cues rather than the lungs"
        )
    verdict = audit.get("verdict") if isinstance(audit, Mapping) else None
    if verdict == AUDIT_PASSED:
        return None
    reason = audit.get("reason", "") if isinstance(audit, Mapping) else ""
    return f"model {name} FAILED the shortcut audit ({verdict or 'no verdict'}): {reason}".rstrip(": ")
