"""Importing TensorFlow without its CUDA probing chatter on machines that have no GPU.

TensorFlow's C++ runtime writes "Could not find cuda drivers", "failed call to cuInit" and
oneDNN notices straight to file descriptor 2 while it loads, some before its own log-level
setting takes effect, so TF_CPP_MIN_LOG_LEVEL alone cannot hide them. Without a GPU they say
nothing an operator can act on; with one (or with --verbose) they are shown as they are.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def gpu_present() -> bool:
    """True when this machine exposes an NVIDIA GPU (device node or nvidia-smi); no TensorFlow import."""
    return (
        Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir() or bool(shutil.which("nvidia-smi"))
    )


@contextmanager
def stderr_silenced(enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null inside the block (C++ libraries included); Python errors still raise."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow(*, verbose: bool = False) -> Any:
    """Import TensorFlow and Keras and probe the GPUs, quietly unless verbose or a GPU is present."""
    from shared.settings import diagnostics, quiet_tensorflow_logs

    quiet_tensorflow_logs()
    verbose = verbose or diagnostics().verbose
    quiet = not verbose and not gpu_present() and "tensorflow" not in sys.modules
    with stderr_silenced(quiet):
        import keras  # noqa: F401 - loads its own native libraries, which print too
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the cuInit probe happens here
    return tf
