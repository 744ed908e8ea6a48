"""Decode and preprocess every image once, in threads, keeping uint8 arrays in memory.

Training and evaluation both go through `load_images`, so a bundle's evaluation sees exactly the
numbers its training run saw (the acceptance check that evaluate reproduces the manifest's metrics).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.imaging import ImageDecodeError, load_image, preprocess_for_manifest, to_uint8
from trainer.datasets import Sample

log = logging.getLogger(__name__)


@dataclass
class LoadedImages:
    """The images that decoded (uint8 N x size x size x 3), their samples, and the ones skipped."""

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
    """Decode + preprocess each sample to size x size RGB uint8; undecodable files are skipped with a warning.

    `preprocessing` is a manifest's "preprocessing" entry (None: version 1, `shared.imaging.preprocess`).
    """
    # uint8 holds a 224 px image in 150 KB instead of 600 KB as float32: the full Kermany + ieee8023
    # set fits in memory. Values go back to [0,1] float in the tf.data pipeline / predict batches.
    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(samples), dtype=bool)

    def _one(index: int) -> None:
        sample = samples[index]
        try:
            images[index] = to_uint8(preprocess_for_manifest(load_image(sample.path), preprocessing, size))
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
    """uint8 images back to float32 in [0, 1], the models' input."""
    return images.astype(np.float32) / np.float32(255.0)
