"""The frozen recipe: a pretrained VGG16 that never changes, and a linear head on its pooled features.

Chosen by leave-one-source-out validation on both classes (benchmarks/results/loso.md): the lung
fields alone (preprocessing version 4), the packaged HED VGG16 convolutions up to `block4_conv3`,
global average pooling, standardised features and an L2 logistic regression whose sample weights
give every (class, source) the same share. The operating point is fitted on out-of-source scores
(each training image scored by a head that never saw its source), because a threshold fitted on the
dev set's own split did not hold at hospitals it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.datasets import Sample
from trainer.loading import to_float
from trainer.loso import source_pair_folds

FROZEN_FEATURE_LAYER = "block4_conv3"
# The head's first layer: the backbone's maps minus the mean map of normal training films; Grad-CAM's layer.
REFERENCE_LAYER = "reference_delta"
# Normal training films averaged for the reference map (one backbone pass over them).
REFERENCE_FILMS = 64
# Grad-CAM maps of frozen bundles are smoothed with a Gaussian of this sigma, in map cells.
GRADCAM_SMOOTHING_CELLS = 1.0
BALANCE_MODES = ("class", "source")


def balanced_weights(
    labels: Sequence[str] | np.ndarray, sources: Sequence[str | None], mode: str = "source"
) -> np.ndarray:
    """Sample weights, mean 1: each class the same total ("class"), and each source within a class too ("source")."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown balance mode {mode!r}; choose one of {BALANCE_MODES}")
    labels_array = np.asarray(labels, dtype=object)
    sources_array = np.asarray([s or "" for s in sources], dtype=object)
    weights = np.ones(len(labels_array), dtype=np.float64)
    classes = sorted(set(labels_array))
    for label in classes:
        in_class = labels_array == label
        groups = sorted(set(sources_array[in_class])) if mode == "source" else [None]
        for group in groups:
            rows = in_class if group is None else in_class & (sources_array == group)
            weights[rows] = len(labels_array) / (len(classes) * len(groups) * rows.sum())
    return weights


@dataclass(frozen=True)
class LinearHead:
    """z = coef . (x - mean) / scale + intercept, the covid-minus-normal logit of pooled features."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The covid logit z of each row (p_covid = sigmoid(z))."""
        return ((features - self.mean) / self.scale) @ self.coef + self.intercept

    def to_keras(self, feature_map_shape: tuple[int, int, int], reference: np.ndarray | None = None):  # -> keras.Model
        """[Reference subtraction,] global average pooling, the two-logit Dense layer and softmax (p_covid = sigmoid(z)).

        With `reference` (a feature map, e.g. the mean over normal films) the head scores exactly the
        same (the bias absorbs the reference's pooled value) and its first layer, REFERENCE_LAYER, is
        where Grad-CAM looks.
        """
        import keras
        from keras import layers

        from shared.zoo import LOGITS_LAYER, SubtractReference

        folded = self.coef / self.scale
        bias = self.intercept - float(folded @ self.mean)
        inputs = keras.Input(feature_map_shape, name="backbone_features")
        x = inputs
        if reference is not None:
            subtract = SubtractReference(feature_map_shape, name=REFERENCE_LAYER)
            x = subtract(x)
            subtract.set_weights([np.asarray(reference, np.float32)])
            bias += float(folded @ np.asarray(reference, np.float64).mean(axis=(0, 1)))
        pooled = layers.GlobalAveragePooling2D(name="head_pool")(x)
        # Softmax over [z/2, -z/2] (CLASS_NAMES: covid, normal) gives p_covid = sigmoid(z).
        kernel = np.stack([folded / 2, -folded / 2], axis=1).astype(np.float32)
        dense = layers.Dense(2, name=LOGITS_LAYER)
        logits = dense(pooled)
        dense.set_weights([kernel, np.array([bias / 2, -bias / 2], np.float32)])
        probabilities = layers.Softmax(name="probabilities")(logits)
        return keras.Model(inputs, probabilities, name="lungcam_frozen_vgg16")


def reference_map(backbone, images: np.ndarray) -> np.ndarray:
    """The mean backbone output map over the images (at most REFERENCE_FILMS, evenly spaced)."""
    step = max(1, len(images) // REFERENCE_FILMS)
    chosen = to_float(images[::step][:REFERENCE_FILMS])
    maps = [np.asarray(backbone.predict_on_batch(chosen[i : i + 16])) for i in range(0, len(chosen), 16)]
    return np.concatenate(maps).mean(axis=0)


def fit_linear_head(
    features: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    sources: Sequence[str | None],
    *,
    c: float,
    balance: str = "source",
) -> LinearHead:
    """An L2 logistic regression (inverse strength `c`) on standardised features, balanced by `balance`."""
    from sklearn.linear_model import LogisticRegression

    y = (np.asarray(labels) == "covid").astype(int)
    if y.min() == y.max():
        raise ValueError("the head needs images of both classes")
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    model = LogisticRegression(C=c, max_iter=5000)
    model.fit((features - mean) / scale, y, sample_weight=balanced_weights(labels, sources, balance))
    return LinearHead(
        mean=mean, scale=scale, coef=model.coef_[0].astype(np.float64), intercept=float(model.intercept_[0])
    )


@dataclass
class OutOfSourceScores:
    """Each image's logit from heads that never saw its source, and the AUC of every held-out pair."""

    logits: np.ndarray  # NaN where an image was never held out
    pairs: dict[str, dict]
    method: str

    @property
    def mean_auc(self) -> float | None:
        """Mean AUC over the pairs (None without pairs)."""
        aucs = [pair["auc"] for pair in self.pairs.values()]
        return float(np.mean(aucs)) if aucs else None

    @property
    def worst_pair(self) -> tuple[str, float] | None:
        """(pair name, AUC) of the lowest pair."""
        if not self.pairs:
            return None
        name = min(self.pairs, key=lambda key: self.pairs[key]["auc"])
        return name, float(self.pairs[name]["auc"])


def out_of_source_scores(
    samples: Sequence[Sample],
    features: np.ndarray,
    *,
    c: float,
    balance: str,
    min_per_class: int = 5,
    variants: Mapping[str, np.ndarray] | None = None,
) -> OutOfSourceScores:
    """Leave-one-source-out on both classes over `samples`; an image held out in several pairs gets its mean logit.

    With fewer than two sources per class (no pair leaves both classes in training), falls back to
    five patient-grouped folds, and says so in `method`. `variants` are other features of the same
    images (the shortcut audit's blanked images): each pair also gets `auc_<name>` from the same head.
    """
    from sklearn.metrics import roc_auc_score

    index = {id(sample): row for row, sample in enumerate(samples)}
    sums = np.zeros(len(samples))
    counts = np.zeros(len(samples))
    pairs: dict[str, dict] = {}
    folds = source_pair_folds(samples, min_per_class=min_per_class)
    fold_rows: Sequence[tuple[list[int], list[int], str | None]] = [
        ([index[id(s)] for s in f.train], [index[id(s)] for s in f.test], f.name) for f in folds
    ]
    method = "leave-one-source-out, both classes (held-out covid source x normal source)"
    if not fold_rows:
        fold_rows = _grouped_folds(samples)
        method = "5 patient-grouped folds (fewer than two sources per class)"
    labels = np.array([s.label for s in samples])
    sources = [s.source for s in samples]
    for train_rows, test_rows, name in fold_rows:
        head = fit_linear_head(
            features[train_rows], labels[train_rows], [sources[i] for i in train_rows], c=c, balance=balance
        )
        z = head.logits(features[test_rows])
        sums[test_rows] += z
        counts[test_rows] += 1
        y = labels[test_rows] == "covid"
        if name is not None and 0 < y.sum() < len(y):
            pairs[name] = {
                "auc": float(roc_auc_score(y, z)),
                "n_covid": int(y.sum()),
                "n_normal": int(len(y) - y.sum()),
                "n_train": len(train_rows),
            }
            for variant, other in (variants or {}).items():
                pairs[name][f"auc_{variant}"] = float(roc_auc_score(y, head.logits(other[test_rows])))
    with np.errstate(invalid="ignore"):
        logits = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return OutOfSourceScores(logits=logits, pairs=pairs, method=method)


def _grouped_folds(samples: Sequence[Sample], n_folds: int = 5) -> list[tuple[list[int], list[int], None]]:
    """Stratified, patient-grouped folds as (train rows, test rows, None)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = [s.label for s in samples]
    groups = [s.patient_id or f"image-{i}" for i, s in enumerate(samples)]
    splits = min(n_folds, min(labels.count("covid"), labels.count("normal")))
    if splits < 2:
        raise ValueError("out-of-source scores need at least two images of each class")
    folder = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=0)
    return [(list(train), list(test), None) for train, test in folder.split(samples, labels, groups)]
