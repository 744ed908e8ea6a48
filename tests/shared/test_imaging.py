"""Decoding, preprocessing and synthetic data: one test per input case, all data made in the test."""

from __future__ import annotations

import csv
import json
import logging
import struct
import time
import warnings
import zlib
from io import BytesIO

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from shared.imaging import (
    MAX_IMAGE_SIDE,
    PREPROCESSING,
    ImageDecodeError,
    decode_image,
    load_image,
    sniff_format,
    to_uint8,
)
from shared.imaging.preprocess import preprocess
from shared.synthetic import MANIFEST_COLUMNS, make_dicom, synthetic_xray, write_synthetic_dataset

# --- helpers ------------------------------------------------------------------------------------


def encode_with_pillow(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode with Pillow (RGB order), so tests do not share OpenCV's BGR convention with the code."""
    buffer = BytesIO()
    image = Image.fromarray(pixels)  # uint16 HxW -> I;16, uint8 HxWx2 -> LA, HxWx4 -> RGBA
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """A PNG chunk with a valid CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def rewrite_dicom(data: bytes, **changes: object) -> bytes:
    """Re-encode a DICOM file after setting some elements (dataset keywords)."""
    dataset = pydicom.dcmread(BytesIO(data))
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deliberately invalid values in some tests
        for keyword, value in changes.items():
            setattr(dataset, keyword, value)
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def smooth_grey(height: int = 48, width: int = 64) -> np.ndarray:
    """A uint8 horizontal ramp, which survives JPEG compression nearly unchanged."""
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def assert_decoded(image: np.ndarray, height: int, width: int) -> None:
    """The decode_image contract: float32 HxWx3 in [0, 1]."""
    assert image.shape == (height, width, 3)
    assert image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


def expect_decode_error(data: bytes, fragment: str) -> ImageDecodeError:
    """Decode `data`, expecting ImageDecodeError whose message contains `fragment`."""
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert fragment in str(caught.value)
    return caught.value


# --- PNG ----------------------------------------------------------------------------------------


def test_png_8bit_grey_is_scaled_by_255_and_replicated() -> None:
    pixels = np.array([[0, 51, 255]], dtype=np.uint8)
    image = decode_image(encode_with_pillow(pixels, "PNG"))
    assert_decoded(image, 1, 3)
    np.testing.assert_allclose(image[0, :, 0], [0.0, 0.2, 1.0], atol=1e-6)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_png_16bit_grey_is_scaled_by_65535() -> None:
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    data = encode_with_pillow(pixels, "PNG")
    assert data[24] == 16  # IHDR bit depth: really a 16-bit file
    image = decode_image(data)
    assert_decoded(image, 1, 3)
    np.testing.assert_allclose(image[0, :, 0], [0.0, 0.5, 1.0], atol=1e-4)


def test_png_colour_comes_out_rgb() -> None:
    red = np.zeros((4, 5, 3), dtype=np.uint8)
    red[..., 0] = 255
    image = decode_image(encode_with_pillow(red, "PNG"))
    assert_decoded(image, 4, 5)
    np.testing.assert_array_equal(image[0, 0], [1.0, 0.0, 0.0])


def test_png_alpha_is_dropped() -> None:
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    rgba[..., 2] = 255  # blue
    rgba[..., 3] = 0  # fully transparent: the colour must survive anyway
    image = decode_image(encode_with_pillow(rgba, "PNG"))
    assert_decoded(image, 3, 3)
    np.testing.assert_array_equal(image[1, 1], [0.0, 0.0, 1.0])


def test_png_grey_with_alpha_keeps_the_grey() -> None:
    grey_alpha = np.dstack([np.full((3, 3), 102, np.uint8), np.full((3, 3), 7, np.uint8)])
    image = decode_image(encode_with_pillow(grey_alpha, "PNG"))
    assert_decoded(image, 3, 3)
    np.testing.assert_allclose(image, 0.4, atol=1e-6)


# --- JPEG ---------------------------------------------------------------------------------------


def test_jpeg_grey() -> None:
    pixels = smooth_grey()
    image = decode_image(encode_with_pillow(pixels, "JPEG"))
    assert_decoded(image, 48, 64)
    assert np.abs(image[..., 0] * 255 - pixels).mean() < 3


def test_jpeg_colour_comes_out_rgb() -> None:
    green = np.zeros((16, 16, 3), dtype=np.uint8)
    green[..., 1] = 200
    image = decode_image(encode_with_pillow(green, "JPEG"))
    assert_decoded(image, 16, 16)
    r, g, b = image[8, 8]
    assert g > 0.7 and r < 0.1 and b < 0.1


# --- DICOM --------------------------------------------------------------------------------------

RAMP_12BIT = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)


def test_dicom_monochrome2_16bit_is_min_max_scaled() -> None:
    pixels = np.array([[100, 200], [300, 60000]], dtype=np.uint16)
    image = decode_image(make_dicom(pixels))
    assert_decoded(image, 2, 2)
    expected = (pixels.astype(np.float64) - 100) / (60000 - 100)
    np.testing.assert_allclose(image[..., 0], expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted() -> None:
    image = decode_image(make_dicom(RAMP_12BIT, photometric="MONOCHROME1", bits_stored=12))
    assert image[1, 1, 0] == 0.0  # brightest stored value displays darkest
    assert image[0, 0, 0] == 1.0


def test_dicom_window_saturates_outside_values() -> None:
    # Window [1500, 2500]: 1000 lies below it, 4095 above it, 2000 at its centre.
    image = decode_image(make_dicom(RAMP_12BIT, bits_stored=12, window=(2000, 1000)))
    assert image[0, 1, 0] == 0.0
    assert image[0, 0, 0] == 0.0
    assert image[1, 1, 0] == 1.0
    assert image[1, 0, 0] == pytest.approx(0.5, abs=0.01)


def test_dicom_rescale_is_applied_before_the_window() -> None:
    # Modality values -1000, 1000, 3000, 7190; the window [2000, 4000] is in modality units, so
    # stored 2000 (-> 3000) sits at its centre. Windowing the stored values would give 0 there.
    image = decode_image(make_dicom(RAMP_12BIT, bits_stored=12, rescale=(2.0, -1000.0), window=(3000, 2000)))
    np.testing.assert_allclose(image[..., 0], [[0.0, 0.0], [0.5, 1.0]], atol=0.01)


def test_dicom_rgb() -> None:
    red = np.zeros((3, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    red[0, 0] = (0, 0, 255)
    image = decode_image(make_dicom(red, photometric="RGB"))
    assert_decoded(image, 3, 4)
    np.testing.assert_array_equal(image[1, 1], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(image[0, 0], [0.0, 0.0, 1.0])


def test_dicom_multiframe_uses_the_first_frame() -> None:
    frames = np.stack([RAMP_12BIT, RAMP_12BIT[::-1, ::-1]])
    image = decode_image(make_dicom(frames, bits_stored=12))
    assert_decoded(image, 2, 2)
    assert image[0, 0, 0] == 0.0 and image[1, 1, 0] == 1.0


def test_dicom_constant_image_gives_zeros_not_nan() -> None:
    image = decode_image(make_dicom(np.full((4, 4), 777, dtype=np.uint16)))
    assert not np.isnan(image).any()
    assert (image == 0).all()


def test_dicom_decoding_never_parses_patient_fields(caplog: pytest.LogCaptureFixture) -> None:
    # pydicom warns (and logs) invalid values verbatim when an element is accessed; decoding
    # must never surface identifiers, whatever it touches.
    data = rewrite_dicom(make_dicom(RAMP_12BIT), PatientName="SECRET^" + "X" * 80, PatientBirthDate="SECRET")
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # building the file above logged the values; only decoding is under test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_image(data)
    assert not any("SECRET" in str(warning.message) for warning in caught)
    assert "SECRET" not in caplog.text


# --- errors -------------------------------------------------------------------------------------


def test_empty_bytes() -> None:
    expect_decode_error(b"", "empty input")


def test_random_bytes() -> None:
    expect_decode_error(np.random.default_rng(3).bytes(2048), "not an image (unrecognised header")


def test_text_is_reported_as_text() -> None:
    error = expect_decode_error(b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>", "not an image")
    assert "looks like text" in str(error)
    assert "NoSuchKey" not in str(error)  # content is never echoed


def test_truncated_png() -> None:
    data = encode_with_pillow(smooth_grey(), "PNG")
    expect_decode_error(data[: len(data) // 2], "truncated or corrupt png")


def test_truncated_jpeg() -> None:
    data = encode_with_pillow(smooth_grey(), "JPEG")
    expect_decode_error(data[: len(data) // 2], "truncated or corrupt jpeg")


def test_truncated_jpeg_is_refused_even_if_the_decoder_returns_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenCV 4.x builds return a half-grey image with only a warning; simulate that decoder.
    monkeypatch.setattr(cv2, "imdecode", lambda *args: np.full((48, 64), 128, np.uint8))
    data = encode_with_pillow(smooth_grey(), "JPEG")
    expect_decode_error(data[: len(data) - 40], "truncated or corrupt jpeg (no end-of-image marker)")


def test_dicom_without_pixel_data() -> None:
    expect_decode_error(make_dicom(RAMP_12BIT, with_pixels=False), "DICOM has no pixel data")


def test_png_header_claiming_30000_square_is_refused_before_decoding() -> None:
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    started = time.perf_counter()
    expect_decode_error(data, f"image too large: 30000x30000 exceeds {MAX_IMAGE_SIDE}")
    assert time.perf_counter() - started < 0.5


def test_jpeg_header_claiming_30000_square_is_refused_before_decoding() -> None:
    data = bytearray(encode_with_pillow(smooth_grey(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)  # height, width
    expect_decode_error(bytes(data), "image too large: 30000x30000")


def test_dicom_claiming_30000_square_is_refused_before_decoding() -> None:
    data = rewrite_dicom(make_dicom(RAMP_12BIT), Rows=30000, Columns=30000)
    started = time.perf_counter()
    expect_decode_error(data, "image too large: 30000x30000")
    assert time.perf_counter() - started < 0.5


def test_dicom_with_short_pixel_data() -> None:
    expect_decode_error(rewrite_dicom(make_dicom(RAMP_12BIT), Rows=200), "corrupt DICOM pixel data")


def test_dicom_compressed_transfer_syntax_names_the_syntax() -> None:
    dataset = pydicom.dcmread(BytesIO(make_dicom(RAMP_12BIT)))
    dataset.file_meta.TransferSyntaxUID = JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS"])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    # "no decoder installed" here; "corrupt DICOM pixel data (JPEG-LS ...)" where pyjpegls exists.
    expect_decode_error(buffer.getvalue(), "JPEG-LS Lossless")


def test_unexpected_decoder_exception_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cv2, "imdecode", explode)
    error = expect_decode_error(encode_with_pillow(smooth_grey(), "PNG"), "corrupt png (RuntimeError)")
    assert isinstance(error.__cause__, RuntimeError)


def test_sniff_format() -> None:
    assert sniff_format(encode_with_pillow(smooth_grey(), "PNG")) == "png"
    assert sniff_format(encode_with_pillow(smooth_grey(), "JPEG")) == "jpeg"
    assert sniff_format(make_dicom(RAMP_12BIT)) == "dicom"


def test_load_image_reads_a_file(tmp_path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(encode_with_pillow(smooth_grey(), "PNG"))
    assert_decoded(load_image(path), 48, 64)


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_shape_dtype_range() -> None:
    image = np.random.default_rng(0).uniform(0, 1, size=(300, 200, 3)).astype(np.float32)
    out = preprocess(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_preprocess_downscaling_averages() -> None:
    # A one-pixel checkerboard shrunk 3.75x: area averaging gives ~0.5; linear aliases (0.2-0.8).
    checkerboard = (np.indices((60, 60)).sum(axis=0) % 2).astype(np.float32)
    out = preprocess(np.dstack([checkerboard] * 3), 16)
    np.testing.assert_allclose(out, 0.5, atol=0.01)


def test_preprocess_upscaling_interpolates_and_stays_in_range() -> None:
    out = preprocess(np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32), 8)
    assert out.shape == (8, 8, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert ((out > 0.05) & (out < 0.95)).any()  # not nearest-neighbour blocks


def test_to_uint8() -> None:
    image = np.array([[[0.0, 0.5, 1.0], [-0.2, 1.3, np.nan]]], dtype=np.float32)
    out = to_uint8(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, [[[0, 128, 255], [0, 255, 0]]])


def test_preprocessing_description_is_json() -> None:
    assert json.loads(json.dumps(PREPROCESSING)) == PREPROCESSING


# --- synthetic data -----------------------------------------------------------------------------


def test_synthetic_positive_has_lesions_inside_the_lungs() -> None:
    for seed in range(5):
        xray = synthetic_xray(np.random.default_rng(seed), size=128, covid=True)
        assert xray.image.shape == (128, 128) and xray.image.dtype == np.uint8
        mask = xray.lesion_mask
        assert mask.shape == (128, 128) and mask.dtype == bool
        assert mask.mean() > 0.005  # a meaningful area, not a speck
        # Inside the image, clear of its borders (the lungs never touch the frame).
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_synthetic_normal_has_no_lesions() -> None:
    xray = synthetic_xray(np.random.default_rng(0), size=96, covid=False)
    assert xray.image.shape == (96, 96)
    assert not xray.lesion_mask.any()


def test_synthetic_is_deterministic_and_varied() -> None:
    first = synthetic_xray(np.random.default_rng(7), size=64)
    again = synthetic_xray(np.random.default_rng(7), size=64)
    other = synthetic_xray(np.random.default_rng(8), size=64)
    np.testing.assert_array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)


def test_synthetic_classes_overlap_in_mean_brightness() -> None:
    # Overall brightness varies per image, so it must not separate the classes on its own.
    covid = [synthetic_xray(np.random.default_rng(s), 64, covid=True).image.mean() for s in range(20)]
    normal = [synthetic_xray(np.random.default_rng(100 + s), 64).image.mean() for s in range(20)]
    assert max(normal) > min(covid) and max(covid) > min(normal)


def test_write_synthetic_dataset_layout_and_manifest(tmp_path) -> None:
    root = write_synthetic_dataset(tmp_path / "syn", n_per_class=4, size=64, seed=1)
    covid = sorted(p.name for p in (root / "covid").iterdir())
    normal = sorted(p.name for p in (root / "normal").iterdir())
    masks = sorted(p.name for p in (root / "masks").iterdir())
    assert len(covid) == len(normal) == 4
    assert masks == covid  # one mask per positive, same stem, all .png
    assert all(name.endswith(".png") and len(name) == len("d0123456789abcdef.png") for name in covid + normal)
    mask = decode_image((root / "masks" / masks[0]).read_bytes())
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.max() == 1.0

    with open(root / "manifest.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == MANIFEST_COLUMNS
        rows = list(reader)
    assert sorted(row["file"] for row in rows) == sorted(
        [f"covid/{n}" for n in covid] + [f"normal/{n}" for n in normal]
    )
    assert all((root / row["file"]).exists() for row in rows)
    assert {row["label"] for row in rows} == {"covid", "normal"}
    assert all(row["file"].startswith(row["label"] + "/") for row in rows)
    assert all(row["source_repo"] == "synthetic" and row["view_if_known"] == "PA" for row in rows)
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        assert row["patient_id_if_known"].startswith("SYN-")
        by_patient.setdefault(row["patient_id_if_known"], set()).add(row["label"])
    assert len(by_patient) < len(rows)  # some patients have several images
    assert all(len(labels) == 1 for labels in by_patient.values())

    again = write_synthetic_dataset(tmp_path / "again", n_per_class=4, size=64, seed=1)
    assert (again / "manifest.csv").read_bytes() == (root / "manifest.csv").read_bytes()
    assert (again / "covid" / covid[0]).read_bytes() == (root / "covid" / covid[0]).read_bytes()


def test_write_synthetic_dataset_jpeg(tmp_path) -> None:
    root = write_synthetic_dataset(tmp_path, n_per_class=1, size=64, seed=2, fmt="jpeg")
    files = sorted(root.glob("*/*.jpg"))
    assert [path.parent.name for path in files] == ["covid", "normal"]
    assert_decoded(load_image(files[0]), 64, 64)
    assert len(list((root / "masks").glob("*.png"))) == 1


def test_make_dicom_is_anonymous_and_well_formed() -> None:
    data = make_dicom(RAMP_12BIT, bits_stored=12)
    assert data[128:132] == b"DICM"
    dataset = pydicom.dcmread(BytesIO(data))
    assert str(dataset.PatientName) == "ANON"
    assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert dataset.BitsStored == 12
    np.testing.assert_array_equal(dataset.pixel_array, RAMP_12BIT)
