"""A frozen pretrained backbone as a feature extractor, with an on-disk cache of pooled features.

The frozen recipe trains only a linear head, so each image goes through the backbone once: the
pooled features are cached (keyed by the images' preprocessing, the input size, the weights' sha256
and the pooled layers), and every later fit, leave-one-source-out fold or calibration reuses them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from keras import layers

FEATURE_BATCH_SIZE = 16


def pooled_feature_model(backbone: keras.Model, feature_layers: Sequence[str]) -> keras.Model:
    """The backbone's input to the concatenated global average pools of `feature_layers`."""
    pooled = [
        layers.GlobalAveragePooling2D(name=f"pool_{name}")(backbone.get_layer(name).output) for name in feature_layers
    ]
    output = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="pooled_features")(pooled)
    return keras.Model(backbone.inputs, output, name="pooled_features")


def extract_features(
    model: keras.Model, images: np.ndarray, *, progress: bool = True, desc: str = "features"
) -> np.ndarray:
    """The model's outputs for uint8 (or [0,1] float) images, in batches, with a progress bar."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False) as bar:
        for start in range(0, len(images), FEATURE_BATCH_SIZE):
            batch = images[start : start + FEATURE_BATCH_SIZE]
            floats = batch.astype(np.float32) / np.float32(255.0) if batch.dtype == np.uint8 else batch
            out.append(np.asarray(model.predict_on_batch(floats), dtype=np.float32))
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def feature_set_key(preprocessing: dict | None, input_size: int, weights_sha256: str, layer: str) -> str:
    """One key per (preprocessing, input size, backbone file, pooled layer): equal keys, equal features."""
    text = json.dumps([preprocessing, input_size, weights_sha256, layer], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class FeatureCache:
    """Pooled features per image (keyed by the file's sha256), one .npz file per feature set (None: memory only)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._memory: dict[str, dict[str, np.ndarray]] = {}

    def get(self, key: str, image_keys: Sequence[str]) -> np.ndarray | None:
        """The cached rows for these image keys, or None when any is missing."""
        table = self._table(key)
        if not all(k in table for k in image_keys):
            return None
        return np.stack([table[k] for k in image_keys]) if image_keys else None

    def put(self, key: str, image_keys: Sequence[str], features: np.ndarray) -> None:
        """Add rows and persist the table."""
        table = self._table(key)
        table.update({k: row for k, row in zip(image_keys, features)})
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            names = sorted(table)
            np.savez(self.folder / f"{key}.npz", keys=np.array(names), features=np.stack([table[k] for k in names]))

    def _table(self, key: str) -> dict[str, np.ndarray]:
        if key not in self._memory:
            self._memory[key] = {}
            path = self.folder / f"{key}.npz" if self.folder is not None else None
            if path is not None and path.is_file():
                with np.load(path) as data:
                    self._memory[key] = {str(k): row for k, row in zip(data["keys"], data["features"])}
        return self._memory[key]
