"""The seed's VGG16 recipe on the packaged VGG16 (hed-vgg16), on cached backbone outputs.

The seed froze an ImageNet VGG16 and trained its head (4x4 average pool, flatten, dense 64 + ReLU,
dropout 0.5, two logits) for 15 epochs, batch 8, Adam 1e-3 with the legacy per-step decay, binary
cross-entropy, on version-1 preprocessing at 224 px. With the backbone frozen, its output for an image
never changes, so this script computes the 7x7x512 `block5_pool` maps once and trains exactly that
head on them: the dev split (`lungcam-train train --recipe paper --arch vgg16 --weights hed-vgg16`'s
split) and every leave-one-source-out pair on both classes.

One difference from the seed, said in the output: its 15-degree rotation augmentation is left out
(it changes the backbone's input every epoch, which costs a full VGG16 pass per image per epoch:
about 50 minutes per run on 2 CPU cores instead of seconds).

    nice -n 5 python benchmarks/seed_recipe_hed.py --data ../shared/data/cxr-dev
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def seed_head(feature_shape: tuple[int, int, int]):
    """The zoo's VGG16 head (shared.zoo.build_model) on the backbone's output maps."""
    import keras
    from keras import layers

    inputs = keras.Input(feature_shape)
    pool = min(4, feature_shape[0], feature_shape[1])
    x = layers.AveragePooling2D(pool_size=(pool, pool))(inputs)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(2)(x)
    return keras.Model(inputs, layers.Softmax()(x))


def fit_and_score(config, train_maps: np.ndarray, train_labels: list[str], test_maps: np.ndarray) -> np.ndarray:
    """Train the seed head as the seed did (minus rotation) and return p_covid on the test maps."""
    import keras

    from trainer.train import compile_model, one_hot

    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = seed_head(tuple(train_maps.shape[1:]))
    compile_model(model, config)
    model.fit(
        train_maps, one_hot(train_labels), batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=0
    )
    return np.asarray(model.predict(test_maps, batch_size=64, verbose=0))[:, 0]


def main(argv: list[str] | None = None) -> int:
    """Backbone maps once, then the dev split and the nine source pairs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--results", default="benchmarks/results/seed_recipe_hed.json")
    args = parser.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from shared.zoo import build_packaged_backbone
    from trainer.config import TrainConfig, preprocessing_for
    from trainer.datasets import load_dataset, split_samples
    from trainer.evaluate import compute_metrics, covid_targets, format_metrics_table
    from trainer.features import extract_features
    from trainer.loading import load_images
    from trainer.loso import source_pair_folds

    config = TrainConfig(recipe="paper", arch="vgg16", weights="hed-vgg16", progress=False).resolved()
    samples = load_dataset(args.data)
    started = time.perf_counter()
    loaded = load_images(samples, config.input_size, preprocessing=preprocessing_for(config), progress=False)
    backbone = build_packaged_backbone("vgg16", "hed-vgg16", config.input_size, "block5_pool")
    maps = extract_features(backbone, loaded.images, progress=False)
    feature_seconds = time.perf_counter() - started
    row = {id(sample): index for index, sample in enumerate(loaded.samples)}
    rows = lambda part: [row[id(s)] for s in part]  # noqa: E731

    train_part, test_part = split_samples(
        loaded.samples, test_fraction=config.test_fraction, seed=config.seed, group_by_patient=config.group_by_patient
    )
    started = time.perf_counter()
    p = fit_and_score(config, maps[rows(train_part)], [s.label for s in train_part], maps[rows(test_part)])
    head_seconds = time.perf_counter() - started
    metrics = compute_metrics(covid_targets(test_part), p, threshold=0.5)
    print(format_metrics_table(metrics, title="seed recipe on hed-vgg16, dev test split (no rotation augmentation)"))

    pairs = {}
    for fold in source_pair_folds(loaded.samples, min_per_class=5):
        p_fold = fit_and_score(config, maps[rows(fold.train)], [s.label for s in fold.train], maps[rows(fold.test)])
        pairs[fold.name] = float(roc_auc_score(covid_targets(fold.test), p_fold))
        print(f"  {fold.name}: AUC {pairs[fold.name]:.3f}", flush=True)
    worst = min(pairs, key=pairs.__getitem__)
    mean = float(np.mean(list(pairs.values())))
    print(
        f"seed recipe on hed-vgg16: leave-one-source-out mean AUC {mean:.3f}, worst pair {worst} {pairs[worst]:.3f}; "
        f"backbone maps {feature_seconds:.0f} s, one head fit {head_seconds:.0f} s"
    )
    result = {
        "metrics": metrics,
        "pairs": pairs,
        "mean_auc": mean,
        "worst_pair": [worst, pairs[worst]],
        "feature_seconds": round(feature_seconds, 1),
        "head_seconds": round(head_seconds, 1),
        "deviation": "no rotation augmentation (the seed rotated up to 15 degrees)",
    }
    Path(args.results).write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
