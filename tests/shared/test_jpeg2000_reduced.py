"""JPEG 2000 DICOMs decoded at a reduced resolution level in the worker's path (issue 21, point 8).

The reduced image must match `fit_within(decode_image(data), max_side)` in size and stay close in
value (the low-pass band of the wavelet pyramid instead of an area average: bounds in docs/decoding.md).
"""

from __future__ import annotations

from io import BytesIO

import cv2
import numpy as np
import pydicom
import pytest

from shared.imaging import decode as imaging
from shared.imaging import decode_image, decode_reduced, fit_within, probe
from shared.imaging.preprocess import preprocess
from shared.synthetic import make_dicom, synthetic_xray


def _jpeg2000(rows: int, columns: int, *, signed: bool = False, photometric: str = "MONOCHROME2") -> bytes:
    film = synthetic_xray(np.random.default_rng(7), 512, covid=True).image
    film = cv2.resize(film if film.ndim == 2 else film[:, :, 0], (columns, rows)).astype(np.int32) * 16  # 12 bit
    dataset = pydicom.dcmread(BytesIO(make_dicom(film.astype(np.uint16), bits_stored=12)))
    if signed:
        dataset.PixelRepresentation = 1
        dataset.PixelData = (film - 2048).astype(np.int16).tobytes()
        dataset.RescaleIntercept, dataset.RescaleSlope = 2048, 1
    dataset.PhotometricInterpretation = photometric
    dataset.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(("signed", "photometric"), [(False, "MONOCHROME2"), (True, "MONOCHROME1")])
def test_a_large_jpeg2000_decodes_at_a_reduced_level_close_to_the_full_decode(
    signed: bool, photometric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _jpeg2000(1200, 1000, signed=signed, photometric=photometric)
    levels: list[tuple[int, ...]] = []
    original = imaging._jpeg2000_reduced

    def spy(*args):
        result = original(*args)
        levels.append(result[0].shape if result is not None else ())
        return result

    monkeypatch.setattr(imaging, "_jpeg2000_reduced", spy)
    reduced = decode_reduced(data, 256)
    assert levels == [(300, 250)], "two resolution levels discarded (1200 / 4 = 300 >= 256)"
    full = fit_within(decode_image(data), 256)
    assert reduced.image.shape == full.shape[:2] and reduced.original_size == (1200, 1000)
    # Measured on this noisy synthetic film: display mean 0.015, max 0.07; 224 px inputs mean 0.014 (two levels
    # discarded; one level, 2500 -> 1024: display 0.005, inputs 0.004). The wavelet low-pass keeps more
    # local contrast than an area average, which moves the min-max stretch.
    difference = np.abs(reduced.image - full[:, :, 0])
    assert difference.mean() < 0.025 and difference.max() < 0.12
    inputs = np.abs(preprocess(reduced.image, 224) - preprocess(full, 224))
    assert inputs.mean() < 0.025 and inputs.max() < 0.1


def test_a_jpeg2000_smaller_than_twice_the_side_takes_the_full_decode() -> None:
    data = _jpeg2000(300, 260)
    dataset, photometric = imaging._dicom_dataset(data, probe(data).dicom)
    assert imaging._jpeg2000_reduced(dataset, photometric, 256) is None
    reduced = decode_reduced(data, 256)
    assert np.abs(reduced.image - fit_within(decode_image(data), 256)[:, :, 0]).mean() < 0.003
