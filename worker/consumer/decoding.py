"""Decoding scans for the models, in worker processes of its own so that every core a worker is given decodes.

pydicom and parts of the reduction hold the GIL, so decode threads share one core (measured in
benchmarks/cpu_cost.py: 2 threads ran 0.6-1.1x as fast as 1); processes do not. They are spawned,
never forked: a fork after TensorFlow has started is unsafe. A child imports only the decoders
(no TensorFlow), and gets bytes with their probed header (so it does not parse the header again)
and gives back the model inputs and the display image.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

import numpy as np

from shared.imaging.formats import ImageProbe
from shared.imaging.inputs import InputSpec, model_inputs
from shared.imaging.limits import ImageDecodeError
from shared.imaging.preprocess import to_uint8

if TYPE_CHECKING:  # a decode child imports this module: it needs no settings (nor pydantic)
    from shared.settings import Settings


def decode_for_models(
    data: bytes, side: int, specs: tuple[InputSpec, ...], probed: ImageProbe | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Decode once at `side`, then derive each model input (as its bundle's manifest says) and the uint8 display image.

    `probed`: `probe(data)` made by the caller, so the header is not parsed again (None: parsed here).
    """
    inputs, reduced = model_inputs(data, side, specs, probed=probed)
    return inputs, to_uint8(reduced)


def available_cores(*_ignored: object) -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class DecodePool:
    """Runs decode_for_models in `processes` spawned processes, or in the calling thread when processes is 0."""

    def __init__(self, processes: int) -> None:
        """Start no process yet: the pool spawns its children on first use."""
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._new_pool() if processes > 0 else None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))

    def decode(
        self, data: bytes, side: int, specs: tuple[InputSpec, ...], probed: ImageProbe | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The model inputs and display image of one scan's bytes (`probed`: its header, already parsed)."""
        if self._pool is None:
            return decode_for_models(data, side, specs, probed)
        for _attempt in (1, 2):
            pool = self._pool
            try:
                return pool.submit(decode_for_models, data, side, specs, probed).result()
            except BrokenProcessPool:
                # A decoder died (a native crash on a hostile file, or the OOM killer): the worker lives on.
                # Every decode in flight sees this once; each is tried again in a fresh pool.
                with self._lock:
                    if self._pool is pool:
                        self._pool = self._new_pool()
        raise ImageDecodeError("the decoder crashed on this image twice", kind="corrupt")

    def warm_up(self) -> None:
        """Start every decode process now (a spawn costs a second or two), not inside the first batch."""
        if self._pool is not None:
            list(self._pool.map(available_cores, range(self.processes)))

    def close(self) -> None:
        """Stop the decode processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def decode_processes(settings: Settings, pinned_gpu: str | None) -> int:
    """LUNGCAM_DECODE_PROCESSES, or by default one per core on a GPU worker and none on a CPU-only one.

    pinned_gpu is what the worker pinned (`worker.consumer.gpu.pin_gpu`'s CUDA_VISIBLE_DEVICES value);
    None, "" or "-1" means no GPU. Measured (benchmarks/throughput.py, 2 cores, CPU-only): decode
    processes compete with the model for the same cores and cost IPC, so the pipeline ran 10% slower
    with them; on a GPU host the cores are free for decoding, which holds the GIL, so processes are
    what use them.
    """
    if settings.decode_processes is not None:
        return settings.decode_processes
    on_gpu = pinned_gpu not in (None, "", "-1")
    return available_cores() if on_gpu else 0
