"""GPU pinning: one worker process owns one GPU, chosen before TensorFlow is imported."""

from __future__ import annotations

import logging
import sys

from shared.errors import LungcamError
from shared.settings import set_visible_gpus

log = logging.getLogger(__name__)


class TensorFlowAlreadyImported(LungcamError, RuntimeError):
    """CUDA_VISIBLE_DEVICES was set after TensorFlow started; it would have no effect."""


class BadGpuIndex(LungcamError, ValueError):
    """--gpu names something other than device indices or 'none'."""


def pin_gpu(gpu: str | int | None) -> str:
    """Set CUDA_VISIBLE_DEVICES for this process ("none" hides every GPU); returns the value set."""
    # TensorFlow reads CUDA_VISIBLE_DEVICES once, when its CUDA runtime initialises at import;
    # setting it later silently leaves every GPU visible to every worker.
    if "tensorflow" in sys.modules:
        raise TensorFlowAlreadyImported("pin the GPU before anything imports tensorflow")
    value = "" if gpu is None or str(gpu).lower() in ("none", "cpu", "-1", "") else str(gpu)
    if value and not all(part.strip().isdigit() for part in value.split(",")):
        raise BadGpuIndex(f"--gpu takes a device index such as 0, or 'none', not {gpu!r}")
    return set_visible_gpus(value)


def configure_tensorflow() -> list[str]:
    """Import TensorFlow with memory growth on every visible GPU; returns their names."""
    from shared.tensorflow_quiet import import_tensorflow

    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    for device in gpus:
        # Without growth TensorFlow maps nearly all GPU memory at start, starving anything else on the card.
        tf.config.experimental.set_memory_growth(device, True)
    log.info("TensorFlow %s sees %d GPU(s)", tf.__version__, len(gpus))
    return [device.name for device in gpus]
