"""Decode and preprocess every image once, in threads, keeping the float32 model inputs in memory.

Training and evaluation both go through `load_images`, so a bundle's evaluation sees exactly the
numbers its training run saw (the acceptance check that evaluate reproduces the manifest's metrics).
Each image goes through `shared.imaging.inputs.model_input`, the very path a worker serving the
bundle takes (reduced decode, then the manifest's preprocessing), so training and serving inputs
are the same numbers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.imaging.inputs import model_input
from shared.imaging.limits import ImageDecodeError
from trainer.datasets import Sample

log = logging.getLogger(__name__)


@dataclass
class LoadedImages:
    """The images that decoded (float32 N x size x size x 3 in [0, 1]), their samples, and the ones skipped."""

    samples: list[Sample]
    images: np.ndarray
    skipped: list[Sample]


def load_images(
    samples: Sequence[Sample],
    size: int,
    *,
    preprocessing: dict[str, Any] | None = None,
    threads: int | None = None,
    progress: bool = True,
    desc: str = "images",
) -> LoadedImages:
    """Decode + preprocess each sample to a size x size RGB model input; undecodable files are skipped with a warning.

    `preprocessing` is a manifest's "preprocessing" entry (None: version 1, `shared.imaging.preprocess`).
    """
    # float32, not uint8: quantising would make the training inputs differ from the served ones by
    # up to 1/510. A 224 px input is 600 KB, so 10,000 films take 6 GB.
    images = np.zeros((len(samples), size, size, 3), dtype=np.float32)
    ok = np.zeros(len(samples), dtype=bool)

    def _one(index: int) -> None:
        sample = samples[index]
        try:
            images[index] = model_input(Path(sample.path).read_bytes(), preprocessing, size)
            ok[index] = True
        except (ImageDecodeError, OSError) as exc:
            # The relative file name, never the patient id: logs are not the place for patient data.
            log.warning("skipping undecodable image %s: %s", sample.key, exc)

    # Decoding (OpenCV) and resizing release the GIL, so threads give real parallelism.
    workers = threads or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in tqdm(
            pool.map(_one, range(len(samples))),
            total=len(samples),
            desc=desc,
            unit="img",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        ):
            pass
    skipped = [sample for sample, good in zip(samples, ok) if not good]
    if skipped:
        log.warning("skipped %d of %d images that could not be decoded", len(skipped), len(samples))
        images = images[ok]
    return LoadedImages(samples=[sample for sample, good in zip(samples, ok) if good], images=images, skipped=skipped)


def to_float(images: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1], the models' input: float32 ones as they are, uint8 ones scaled by 1/255."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    return np.asarray(images, dtype=np.float32)
