"""The shortcut audit: does the model still separate the classes with the lungs blanked out?

Three AUCs on the same images: as they are, with the central lung region blanked, and with
everything but that region blanked. A model that reads the lungs loses its AUC when they are
blanked and keeps much of it when only they are shown; a model that keeps its AUC with the lungs
blanked is reading shortcuts (borders, burnt-in labels, collimation, scanner texture), as DeGrave et
al. (2021) found for COVID-19 classifiers trained on mixed-source data.

Blanking is done on the model's input (after the bundle's preprocessing) with one constant for the
whole evaluation set (its mean pixel value), so no per-image statistic survives the blanking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from shared.calibration import AUDIT_PASSED
from shared.imaging.preprocess import LUNG_BOX, lung_box_mask

AUDIT_VERSION = 1
# A model must be above this AUC on the images as they are for the audit to say anything.
MIN_INFORMATIVE_AUC = 0.60
# Fail when, with the lungs blanked, the AUC is at least this high AND keeps at least this share of
# the above-chance margin it had on the full images.
FAIL_BLANKED_AUC = 0.65
FAIL_RETAINED_SHARE = 0.5
VARIANTS = ("full", "lungs_blanked", "lungs_only")


def blanked(
    images: np.ndarray, variant: str, *, box: Sequence[float] = LUNG_BOX, fill: float | None = None
) -> np.ndarray:
    """Float [0,1] copies of uint8 or float images with the lung box ("lungs_blanked") or its outside ("lungs_only") set to `fill`."""
    floats = images.astype(np.float32) / np.float32(255.0) if images.dtype == np.uint8 else images.astype(np.float32)
    if variant == "full":
        return floats
    mask = lung_box_mask(floats.shape[1], box)
    if variant == "lungs_only":
        mask = ~mask
    elif variant != "lungs_blanked":
        raise ValueError(f"unknown audit variant {variant!r}; choose one of {VARIANTS}")
    value = float(floats.mean()) if fill is None else float(fill)
    out = floats.copy()
    out[:, mask, :] = value
    return out


def audit_aucs(
    predict, images: np.ndarray, y_covid: np.ndarray, *, box: Sequence[float] = LUNG_BOX
) -> dict[str, float | None]:
    """AUC of p_covid for each variant; `predict` maps a float [0,1] batch to p_covid."""
    y = np.asarray(y_covid, dtype=int)
    fill = float(images.astype(np.float32).mean() / (255.0 if images.dtype == np.uint8 else 1.0))
    result: dict[str, float | None] = {}
    for variant in VARIANTS:
        scores = np.asarray(predict(blanked(images, variant, box=box, fill=fill))).ravel()
        result[variant] = float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else None
    return result


def verdict(aucs: dict[str, float | None]) -> tuple[str, str]:
    """("pass" | "fail" | "inconclusive", reason) from the three AUCs."""
    full, blank, only = aucs.get("full"), aucs.get("lungs_blanked"), aucs.get("lungs_only")
    if full is None or blank is None:
        return "inconclusive", "AUC undefined (the audit needs covid and normal images)"
    if full < MIN_INFORMATIVE_AUC:
        return "inconclusive", f"AUC {full:.3f} on the full images is too low for the audit to say anything"
    retained = (blank - 0.5) / (full - 0.5)
    described = (
        f"AUC full {full:.3f}, lungs blanked {blank:.3f}, lungs only {only:.3f}"
        if only is not None
        else (f"AUC full {full:.3f}, lungs blanked {blank:.3f}")
    )
    if blank >= FAIL_BLANKED_AUC and retained >= FAIL_RETAINED_SHARE:
        return "fail", (
            f"{described}: with the lungs blanked the model keeps {retained:.0%} of its above-chance "
            "AUC, so it reads cues outside the lungs (shortcuts)"
        )
    return AUDIT_PASSED, f"{described}: the score depends on the lung region"


def audit_record(
    aucs: dict[str, float | None], *, n: int, n_covid: int, data: Sequence[str], split: str
) -> dict[str, Any]:
    """The manifest's "audit" entry."""
    outcome, reason = verdict(aucs)
    return {
        "version": AUDIT_VERSION,
        "verdict": outcome,
        "reason": reason,
        "auc": aucs,
        "lung_box": list(LUNG_BOX),
        "fill": "mean pixel value of the evaluated set",
        "rule": (
            f"fail when AUC with the lungs blanked >= {FAIL_BLANKED_AUC} and keeps >= {FAIL_RETAINED_SHARE:.0%} "
            f"of the full-image margin above 0.5; inconclusive below AUC {MIN_INFORMATIVE_AUC}"
        ),
        "n": n,
        "n_covid": n_covid,
        "data": [str(path) for path in data],
        "split": split,
    }


def run_audit(
    bundle_uri: str,
    data_paths: Sequence[str],
    *,
    split: str = "all",
    write: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit a published bundle on data (its own test split or every image); write the verdict into its manifest."""
    from shared.bundle import load_bundle, update_manifest
    from shared.settings import get_settings
    from trainer.config import BundleData
    from trainer.datasets import load_datasets
    from trainer.evaluate import COVID_INDEX, PREDICT_BATCH_SIZE, covid_targets
    from trainer.loading import load_images

    if split not in ("test", "all"):
        raise ValueError(f"split must be 'test' or 'all', got {split!r}")
    settings = get_settings()
    bundle = load_bundle(bundle_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    bundle_data = BundleData.of(bundle.manifest)
    samples = load_datasets(data_paths, finding=bundle_data.finding, view=bundle_data.view)
    if split == "test":
        samples = bundle_data.test_split(samples)
    loaded = load_images(
        samples, bundle.input_size, preprocessing=bundle.preprocessing, progress=progress, desc="audit images"
    )
    y = covid_targets(loaded.samples)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(bundle.model.predict_on_batch(batch[i : i + PREDICT_BATCH_SIZE]))[:, COVID_INDEX]
                for i in range(0, len(batch), PREDICT_BATCH_SIZE)
            ]
        )

    aucs = audit_aucs(predict, loaded.images, y)
    record = audit_record(aucs, n=len(y), n_covid=int(y.sum()), data=data_paths, split=split)
    if write:
        update_manifest(bundle_uri, {"audit": record}, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return {"bundle": {"name": bundle.name, "version": bundle.version}, "audit": record, "written": write}


def format_audit(record: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    auc = record["auc"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return "\n".join(
        [
            f"shortcut audit on {record['n']} images ({record['n_covid']} covid), lung box {record['lung_box']}:",
            f"  AUC as they are        {fmt(auc['full'])}",
            f"  AUC lungs blanked      {fmt(auc['lungs_blanked'])}",
            f"  AUC only lungs shown   {fmt(auc['lungs_only'])}",
            f"verdict: {record['verdict'].upper()} - {record['reason']}",
        ]
    )
