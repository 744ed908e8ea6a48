"""Training with the frozen recipe: pooled features once, a linear head, an out-of-source operating point."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.calibration import fit_operating_point, sigmoid
from shared.domain import Manifest
from shared.hashing import sha256_file
from shared.pretrained import PACKAGED_WEIGHTS
from shared.zoo import attach_head, build_packaged_backbone
from trainer.config import ResolvedConfig
from trainer.datasets import Sample
from trainer.features import FeatureCache, extract_features, feature_set_key, pooled_feature_model
from trainer.frozen import (
    GRADCAM_SMOOTHING_CELLS,
    REFERENCE_LAYER,
    fit_linear_head,
    out_of_source_scores,
    reference_map,
)
from trainer.loading import LoadedImages
from trainer.pipeline import (
    base_manifest,
    evaluation_plots,
    gradcam_grid,
    load_splits,
    publish,
    report_test_split,
    step,
)


def default_feature_cache() -> Path:
    """Where pooled features are kept between runs: $XDG_CACHE_HOME/lungcam/features (or ~/.cache/...)."""
    from shared.settings import get_settings

    return get_settings().cache_dir / "features"


def train_frozen(
    config: ResolvedConfig, samples: list[Sample], data_paths: Sequence[str | Path], out: str | Path
) -> Manifest:
    """The frozen recipe end to end: features, head, out-of-source operating point, test split, bundle."""
    # The frozen recipe always has a head (ResolvedConfig checked it); the other recipes have none.
    assert config.head_c is not None and config.balance is not None
    backbone = build_packaged_backbone(config.arch, config.weights, config.input_size, config.gradcam_layer)
    data = load_splits(config, samples)
    cache = FeatureCache(Path(config.feature_cache) if config.feature_cache else default_feature_cache())
    key = feature_set_key(
        data.preprocessing, config.input_size, PACKAGED_WEIGHTS[config.weights].sha256, config.gradcam_layer
    )
    features = pooled_feature_model(backbone, [config.gradcam_layer])
    train_features = cached_features(cache, key, features, data.train, progress=config.progress)
    test_features = cached_features(cache, key, features, data.test, progress=config.progress)

    started = time.perf_counter()
    train_samples = data.train.samples
    step(f"scoring each training source with heads that never saw it ({len(train_samples)} images)")
    held_out = out_of_source_scores(train_samples, train_features, c=config.head_c, balance=config.balance)
    head = fit_linear_head(
        train_features,
        [s.label for s in train_samples],
        [s.source for s in train_samples],
        c=config.head_c,
        balance=config.balance,
    )
    scored = ~np.isnan(held_out.logits)
    targets = np.array([s.label == "covid" for s in train_samples], dtype=int)[scored]
    operating_point = fit_operating_point(
        targets,
        sigmoid(held_out.logits[scored]),
        target_sensitivity=config.target_sensitivity,
        indeterminate_width=config.indeterminate_width,
        split=f"out-of-source scores of the training part: {held_out.method}",
    )
    training_seconds = time.perf_counter() - started
    _print_out_of_source(held_out, operating_point)

    step(f"evaluating on the test split ({len(data.test.samples)} images)")
    evaluation = report_test_split(
        data.test, operating_point.calibrate(sigmoid(head.logits(test_features))), operating_point
    )
    step("the Grad-CAM reference: the backbone's mean map over normal training films")
    normals = data.train.images[[i for i, s in enumerate(train_samples) if s.label == "normal"]]
    head_model = head.to_keras(tuple(backbone.output.shape[1:]), reference=reference_map(backbone, normals))
    step("drawing the plots and the Grad-CAM grid")
    grid = gradcam_grid(
        attach_head(backbone, head_model), REFERENCE_LAYER, data.test, smoothing_cells=GRADCAM_SMOOTHING_CELLS
    )
    manifest = base_manifest(config, data, evaluation, weights=config.weights, data_paths=data_paths)
    # Grad-CAM reads the head's reference-subtracted maps, smoothed (benchmarks/gradcam_localisation.py).
    manifest["gradcam_layer"] = REFERENCE_LAYER
    manifest["gradcam_smoothing_cells"] = GRADCAM_SMOOTHING_CELLS
    manifest["training"].update(seconds=round(training_seconds, 1), epochs_run=0)
    manifest["backbone"] = {
        **PACKAGED_WEIGHTS[config.weights].provenance(),
        "embedded": False,
        "frozen": True,
        "output_layer": config.gradcam_layer,
    }
    manifest["head"] = {
        "type": "logistic regression on standardised global-average-pooled features",
        "c": config.head_c,
        "balance": config.balance,
        "features": int(head.coef.size),
        "reference": f"mean {config.gradcam_layer} map of up to 64 normal training films",
    }
    manifest["calibration"] = operating_point.to_manifest()
    manifest["leave_one_source_out"] = {
        "method": held_out.method,
        "data": "the training part",
        "mean_auc": held_out.mean_auc,
        "worst_pair": list(held_out.worst_pair) if held_out.worst_pair else None,
        "pairs": held_out.pairs,
    }
    return publish(head_model, manifest, out, evaluation_plots(evaluation, grid))


def cached_features(cache: FeatureCache, key: str, model: Any, loaded: LoadedImages, *, progress: bool) -> np.ndarray:
    """Pooled features of every loaded image, from the cache where the same file was seen before."""
    image_keys = [sha256_file(sample.path) for sample in loaded.samples]
    found = cache.get(key, image_keys)
    if found is not None:
        return found
    features = extract_features(model, loaded.images, progress=progress, desc="backbone features")
    cache.put(key, image_keys, features)
    return features


def _print_out_of_source(held_out: Any, operating_point: Any) -> None:
    if held_out.pairs:
        worst = held_out.worst_pair
        print(
            f"out-of-source AUC on the training part: mean {held_out.mean_auc:.3f} over {len(held_out.pairs)} "
            f"(covid source x normal source) pairs, worst {worst[0]} {worst[1]:.3f}",
            file=sys.stderr,
        )
    print(
        f"operating point from out-of-source scores: temperature {operating_point.temperature:.3f}, threshold "
        f"{operating_point.threshold:.4f} for sensitivity >= {operating_point.target_sensitivity:.2f}",
        file=sys.stderr,
    )
