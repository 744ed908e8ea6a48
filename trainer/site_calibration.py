"""Site calibration: refit temperature and threshold on a small labelled sample from the hospital that will run the model.

A threshold fitted on the development data did not hold at hospitals the model never saw (their
scores sit elsewhere), so before going live a site scores about 100 of its own labelled films and
publishes a new bundle version with its own operating point. The threshold is set so that the
sample's sensitivity, discounted by its sampling uncertainty (a one-sided Wilson lower bound at
`confidence`), still meets the target: with 50 covid films, a threshold met by exactly 90% of them
would leave the site's next films below 0.90 about half the time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from shared.bundle import copy_bundle, load_bundle
from shared.calibration import (
    OperatingPoint,
    apply_temperature,
    binary_nll,
    brier_score,
    expected_calibration_error,
    fit_temperature,
)
from shared.domain import Manifest
from shared.errors import LungcamError
from trainer.datasets import count_labels, dataset_hash, load_datasets
from trainer.evaluate import COVID_INDEX, covid_targets, predict_probabilities
from trainer.loading import load_images

MIN_PER_CLASS = 20
DEFAULT_CONFIDENCE = 0.80


class SiteSampleError(LungcamError, ValueError):
    """A site sample too small or one-sided to calibrate on."""


def wilson_interval(
    successes: int, n: int, confidence: float = 0.95, *, one_sided: bool = False
) -> tuple[float, float]:
    """Wilson score interval of a proportion (two-sided, or the one-sided bounds at `confidence`)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import norm

    z = float(norm.ppf(confidence if one_sided else 0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def conservative_threshold(y: np.ndarray, p: np.ndarray, target: float, confidence: float) -> float:
    """The highest threshold whose sensitivity's one-sided lower bound at `confidence` meets `target`.

    Falls back to the lowest covid score (sensitivity 1 on the sample) when no threshold gets there.
    """
    covid_scores = np.sort(p[y == 1])[::-1]
    n = covid_scores.size
    if n == 0:
        raise SiteSampleError("the site sample has no covid films")
    for k in range(1, n + 1):  # k covid films at or above the k-th highest score
        if wilson_interval(k, n, confidence, one_sided=True)[0] >= target:
            return float(covid_scores[k - 1])
    return float(covid_scores[-1])


def calibrate_for_site(
    bundle_uri: str | Path,
    data_paths: Sequence[str | Path],
    out: str | Path,
    *,
    target_sensitivity: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    version: str | None = None,
    progress: bool = True,
) -> Manifest:
    """Score the site sample, refit temperature and threshold, and publish the new bundle version at `out`."""
    from shared.settings import get_settings

    if not 0.5 <= confidence < 1.0:
        raise SiteSampleError(f"confidence must be in [0.5, 1), got {confidence}")
    settings = get_settings()
    bundle = load_bundle(bundle_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    samples = load_datasets(data_paths, finding=None, view=None)
    _check_counts(count_labels(samples))
    loaded = load_images(
        samples, bundle.input_size, preprocessing=bundle.preprocessing, progress=progress, desc="site sample"
    )
    _check_counts(count_labels(loaded.samples), decoded=True)
    p_raw = predict_probabilities(bundle.model, loaded.images)[:, COVID_INDEX]
    y = covid_targets(loaded.samples)
    previous = bundle.operating_point
    target = float(target_sensitivity or previous.target_sensitivity or 0.90)
    temperature = fit_temperature(y, p_raw)
    p = apply_temperature(p_raw, temperature)
    threshold = conservative_threshold(y, p, target, confidence)
    point = OperatingPoint(
        temperature,
        threshold,
        _moved_band(previous, threshold),
        target,
        {"split": "site sample", "n": len(y), "n_covid": int(y.sum()), "n_normal": int(len(y) - y.sum())},
    )
    record = site_record(y, p_raw, p, point, confidence, dataset_hash(loaded.samples), previous)
    calibration = point.to_manifest()
    calibration["fitted_on"].update(
        sensitivity=record["sensitivity"],
        specificity=record["specificity"],
        ece_before=record["ece_before"],
        ece_after=record["ece_after"],
    )
    manifest: Manifest = {
        **bundle.manifest,
        "calibration": calibration,
        "site_calibration": record,
        "version": version or f"{bundle.version}-site-{record['sample_sha256'][:8]}",
    }
    return copy_bundle(bundle_uri, out, manifest, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)


def site_record(
    y: np.ndarray,
    p_raw: np.ndarray,
    p: np.ndarray,
    point: OperatingPoint,
    confidence: float,
    sample_hash: str,
    previous: OperatingPoint,
) -> dict[str, Any]:
    """What the manifest says about the site calibration: sample, operating point, and its figures with 95% CIs."""
    predicted = p >= point.threshold
    n_covid, n_normal = int(y.sum()), int(len(y) - y.sum())
    true_positive, true_negative = int(predicted[y == 1].sum()), int((~predicted[y == 0]).sum())
    return {
        "sample_sha256": sample_hash,
        "n": len(y),
        "n_covid": n_covid,
        "n_normal": n_normal,
        "temperature": point.temperature,
        "threshold": point.threshold,
        "target_sensitivity": point.target_sensitivity,
        "confidence": confidence,
        "sensitivity": true_positive / n_covid,
        "sensitivity_ci95": list(wilson_interval(true_positive, n_covid)),
        "specificity": true_negative / n_normal,
        "specificity_ci95": list(wilson_interval(true_negative, n_normal)),
        "ece_before": expected_calibration_error(y, p_raw),
        "ece_after": expected_calibration_error(y, p),
        "brier_after": brier_score(y, p),
        "nll_after": binary_nll(y, p),
        "previous_operating_point": {"temperature": previous.temperature, "threshold": previous.threshold},
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def format_site_record(record: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    sens_low, sens_high = record["sensitivity_ci95"]
    spec_low, spec_high = record["specificity_ci95"]
    return "\n".join(
        [
            f"site sample: {record['n']} films ({record['n_covid']} covid, {record['n_normal']} normal), "
            f"sha256 {record['sample_sha256'][:12]}…",
            f"temperature {record['temperature']:.3f}, threshold {record['threshold']:.4f} "
            f"(target sensitivity {record['target_sensitivity']:.2f} at {record['confidence']:.0%} confidence)",
            f"on the sample: sensitivity {record['sensitivity']:.3f} (95% CI {sens_low:.3f}-{sens_high:.3f}), "
            f"specificity {record['specificity']:.3f} (95% CI {spec_low:.3f}-{spec_high:.3f})",
            f"ECE {record['ece_before']:.3f} -> {record['ece_after']:.3f}",
        ]
    )


def _check_counts(counts: dict[str, int], *, decoded: bool = False) -> None:
    short = {label: n for label, n in counts.items() if n < MIN_PER_CLASS}
    if short:
        what = "decodable films" if decoded else "films"
        raise SiteSampleError(
            f"site calibration needs at least {MIN_PER_CLASS} {what} of each class; the sample has "
            + ", ".join(f"{n} {label}" for label, n in counts.items())
        )


def _moved_band(previous: OperatingPoint, threshold: float) -> tuple[float, float] | None:
    """The previous indeterminate band's width, centred on the new threshold."""
    if previous.indeterminate_band is None:
        return None
    low, high = previous.indeterminate_band
    half = (high - low) / 2
    return (max(0.0, threshold - half), min(1.0, threshold + half))
