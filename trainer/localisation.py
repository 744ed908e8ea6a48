"""Does a model look at the lesions? Grad-CAM peaks and occlusion sensitivity against lesion masks.

Used by the Grad-CAM tests and by benchmarks/gradcam_localisation.py on synthetic films, whose
generator knows where every opacity is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import keras
import numpy as np

from shared.gradcam import peak_location
from shared.synthetic import write_synthetic_dataset
from trainer.datasets import load_dataset
from trainer.evaluate import COVID_INDEX
from trainer.loading import load_images


def peaks_in_masks(maps: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per image, whether the map's peak (cell centre, scaled to the mask) lies inside the mask."""
    return np.array([bool(mask[peak_location(heat, mask.shape)]) for heat, mask in zip(maps, masks)], dtype=bool)


def occlusion_maps(model: keras.Model, images: np.ndarray, grid: int, *, batch_size: int = 64) -> np.ndarray:
    """Drop in covid probability when each cell of a grid x grid tiling is blanked out (N x grid x grid).

    The model's own sensitivity, without gradients: a reference for what Grad-CAM should find.
    A cell is filled with the image's 20th-percentile value (about the brightness of aerated lung),
    so blanking a bright opacity removes it rather than painting a new bright patch.
    """
    images = np.asarray(images, dtype=np.float32)
    size = images.shape[1]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    maps = np.zeros((len(images), grid, grid), dtype=np.float32)
    for index, image in enumerate(images):
        fill = np.percentile(image, 20)
        variants = [image]  # first the untouched image, so one predict call gives the baseline too
        for row in range(grid):
            for col in range(grid):
                variant = image.copy()
                variant[edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = fill
                variants.append(variant)
        p_covid = model.predict(np.stack(variants), batch_size=batch_size, verbose=0)[:, COVID_INDEX]
        maps[index] = (p_covid[0] - p_covid[1:]).reshape(grid, grid)
    return maps


def synthetic_positives(
    root: str | os.PathLike[str], n: int, size: int, seed: int, preprocessing: dict | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Write n synthetic COVID films under root; return them (float32 in [0,1], preprocessed as a bundle's
    manifest says) and their lesion masks."""
    root = Path(root)
    write_synthetic_dataset(root, n_per_class=n, size=size, seed=seed)
    positives = [sample for sample in load_dataset(root) if sample.label == "covid"]
    loaded = load_images(positives, size, preprocessing=preprocessing, progress=False)
    masks = [_lesion_mask(root / "masks" / f"{sample.path.stem}.png") for sample in loaded.samples]
    return loaded.images, masks


def _lesion_mask(path: Path) -> np.ndarray:
    """A synthetic film's lesion mask as booleans."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"no lesion mask at {path}")
    return np.asarray(mask) > 0
