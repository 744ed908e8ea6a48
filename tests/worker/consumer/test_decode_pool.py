"""Decoding in spawned processes: the same numbers as in-thread, and a decoder that dies does not take the worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest

from shared.imaging import probe, robust_preprocessing
from shared.settings import Settings
from shared.synthetic import make_dicom, synthetic_xray
from worker.consumer.decoding import DecodePool, available_cores, decode_for_models, decode_processes

# The paper's preprocessing (version 1) at one size, CLAHE with stretch (version 2, the robust
# recipe's) and with a centre crop (version 3) at others.
SPECS = (
    ("v1:64", None, 64),
    ("v2:224", robust_preprocessing(), 224),
    ("v3:96", robust_preprocessing(square="centre_crop"), 96),
)


def _dicom() -> bytes:
    return make_dicom(synthetic_xray(np.random.default_rng(4), 256).image.astype(np.uint16) * 16, bits_stored=12)


def test_processes_give_exactly_what_the_thread_path_gives():
    data = _dicom()
    pool = DecodePool(2)
    try:
        # The header parsed in this process travels with the bytes (a pickled probe): the child does not parse it again.
        inputs, display = pool.decode(data, 1024, SPECS, probe(data))
    finally:
        pool.close()
    expected_inputs, expected_display = decode_for_models(data, 1024, SPECS)
    assert set(inputs) == {"v1:64", "v2:224", "v3:96"} and all(
        np.array_equal(inputs[k], expected_inputs[k]) for k in inputs
    )
    assert np.array_equal(display, expected_display)


def test_a_killed_decoder_process_is_replaced_and_the_scan_still_decodes():
    """SIGKILL the child mid-decode (as the OOM killer or a native crash would): the pool is rebuilt, the call succeeds."""
    ramp = np.linspace(0, 65535, 6000, dtype=np.float32).astype(np.uint16)
    big = cv2.imencode(".png", np.broadcast_to(ramp, (6000, 6000)).copy())[1].tobytes()
    pool = DecodePool(1)
    try:
        pool.decode(_dicom(), 256, (("v1:32", None, 32),))  # the child is up
        (child,) = list(pool._pool._processes.values())
        killer = threading.Timer(0.2, lambda: os.kill(child.pid, signal.SIGKILL))
        killer.start()
        started = time.monotonic()
        inputs, display = pool.decode(big, 1024, (("v1:32", None, 32),))
        killer.join()
        assert not child.is_alive()
        assert inputs["v1:32"].shape == (32, 32, 3) and display.shape[:2] == (1024, 1024)
        assert time.monotonic() - started < 120
    finally:
        pool.close()


def test_decode_processes_follow_the_pinned_gpu_not_the_environment(monkeypatch: pytest.MonkeyPatch):
    """One per core on a GPU worker, none on a CPU-only one, LUNGCAM_DECODE_PROCESSES when set; the environment is not read."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("LUNGCAM_DECODE_PROCESSES", raising=False)
    unset = Settings()
    assert unset.decode_processes is None
    assert [decode_processes(unset, pinned) for pinned in (None, "", "-1")] == [0, 0, 0]
    assert decode_processes(unset, "0") == decode_processes(unset, "0,1") == available_cores()
    assert (
        decode_processes(Settings(decode_processes=3), "-1") == decode_processes(Settings(decode_processes=3), "0") == 3
    )
