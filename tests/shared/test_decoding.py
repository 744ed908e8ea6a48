"""Decoding coverage (pydicom's corpus, TIFF, palette, bare DICOM), error kinds, header facts,
selection, the reduced path and its memory. Every input is a real file: pydicom's bundled test
corpus (never downloaded) or one generated here."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import warnings
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.pixels
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from shared.imaging import (
    DicomHeader,
    ImageDecodeError,
    decode_image,
    decode_reduced,
    dicom_header,
    fit_within,
    pixel_count,
    selection_reason,
    sniff_format,
)
from shared.imaging.preprocess import preprocess
from shared.overlay import encode_overlay, overlay_png, render_overlay
from shared.synthetic import make_dicom, synthetic_film

REPO = Path(__file__).resolve().parents[2]

# --- pydicom's corpus ---------------------------------------------------------------------------

# Only what ships inside the pydicom wheel: get_testdata_files() lists local files and never
# downloads (get_testdata_file(name) would try to fetch the ones that are not bundled).
CORPUS = {Path(path).name: Path(path) for path in sorted(get_testdata_files()) if Path(path).is_file()}
LOSSLESS_SYNTAXES = {
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
}
# (compressed, twin, tolerance): the twin is the uncompressed file where pydicom bundles it, else
# a losslessly compressed copy of the same pixels (SC_rgb.dcm itself is download-only).
TWINS = [
    ("MR_small_RLE.dcm", "MR_small.dcm", 0.0),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),
    ("MR_small_bigendian.dcm", "MR_small.dcm", 0.0),
    ("MR_small_expb.dcm", "MR_small.dcm", 0.0),
    ("MR_small_implicit.dcm", "MR_small.dcm", 0.0),
    ("MR_small_padded.dcm", "MR_small.dcm", 0.0),
    ("liver_expb_1frame.dcm", "liver_1frame.dcm", 0.0),
    ("rtdose_rle.dcm", "rtdose.dcm", 0.0),
    ("rtdose_expb.dcm", "rtdose.dcm", 0.0),
    ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm", 0.0),
    ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm", 0.0),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0.0),  # JPEG Lossless SV1, RGB
    ("SC_rgb_rle_2frame.dcm", "SC_rgb_rle.dcm", 0.0),  # first frame of two
    ("SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_rle_16bit.dcm", 0.0),
    ("SC_rgb_rle_32bit_2frame.dcm", "SC_rgb_rle_32bit.dcm", 0.0),
    ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 0.02),  # JPEG-LS near-lossless
    ("SC_rgb_jls_lossy_sample.dcm", "SC_rgb_rle.dcm", 0.02),
    ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0.1),  # lossy JPEG 2000
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 0.1),  # baseline JPEG
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_rle.dcm", 0.1),
    ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 0.1),
]


def transfer_syntax(path: Path) -> str | None:
    """The file's transfer syntax UID, or None for anything pydicom cannot read as DICOM."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    except Exception:  # noqa: BLE001 - whatever pydicom raises, the file has no readable syntax
        return None
    return str(meta.get("TransferSyntaxUID") or "") or None


def pydicom_can_decode(path: Path) -> bool:
    """The reference: pydicom itself decodes frame 0 with some installed plugin."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.pixels.pixel_array(pydicom.dcmread(path), index=0)
    except Exception:  # noqa: BLE001 - the reference: any pydicom failure means it cannot decode
        return False
    return True


def test_the_offline_corpus_is_there() -> None:
    assert len(CORPUS) > 100
    assert {"MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm", "examples_palette.dcm"} <= CORPUS.keys()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_decodes_or_raises_image_decode_error(name: str) -> None:
    data = CORPUS[name].read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the corpus's deliberately odd values
        try:
            image = decode_image(data)
        except ImageDecodeError as error:
            assert error.kind in ("corrupt", "unsupported")
            with pytest.raises(ImageDecodeError):
                decode_reduced(data, 64)
            return
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
        assert image.min() >= 0.0 and image.max() <= 1.0
        reduced = decode_reduced(data, 64)
    assert max(reduced.image.shape[:2]) <= 64
    assert reduced.original_size == image.shape[:2]


def test_every_file_pydicom_decodes_decodes_and_so_does_every_valid_lossless_jpegls_j2k_rle_file() -> None:
    """Whenever pydicom itself can decode a corpus file (any syntax), decode_image must too."""
    decodable = [path for path in CORPUS.values() if pydicom_can_decode(path)]
    failures = []
    for path in decodable:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decode_image(path.read_bytes())
        except ImageDecodeError as error:
            failures.append(f"{path.name}: {error}")
    assert not failures
    compressed = [path for path in CORPUS.values() if transfer_syntax(path) in LOSSLESS_SYNTAXES]
    valid = [path for path in compressed if path in decodable]
    # Not vacuous: the corpus has RLE, JPEG-LS, JPEG 2000 and JPEG Lossless files; the only invalid
    # ones are a deliberately damaged copy (an embedded sequence delimiter) and a file without pixels.
    assert len(valid) >= 20
    invalid = {"JPEG2000-embedded-sequence-delimiter.dcm", "UN_sequence.dcm"}
    assert {p.name for p in compressed} - {p.name for p in valid} <= invalid
    syntaxes = {transfer_syntax(path) for path in valid}
    assert {
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    } <= syntaxes


@pytest.mark.parametrize(("compressed", "twin", "tolerance"), TWINS)
def test_compressed_file_matches_its_twin(compressed: str, twin: str, tolerance: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = decode_image(CORPUS[compressed].read_bytes())
        reference = decode_image(CORPUS[twin].read_bytes())
    assert image.shape == reference.shape
    if tolerance == 0.0:
        np.testing.assert_array_equal(image, reference)
    else:
        assert float(np.abs(image - reference).mean()) < tolerance / 4
        assert float(np.abs(image - reference).max()) < 4 * tolerance


def test_palette_colour_corpus_file() -> None:
    image = decode_image(CORPUS["examples_palette.dcm"].read_bytes())
    assert image.shape == (350, 800, 3)
    assert not np.allclose(image[..., 0], image[..., 2])  # really coloured, not grey


# --- generated DICOM: bare, palette, multi-frame, compressed --------------------------------------

RAMP = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)


def bare_implicit_dataset(pixels: np.ndarray) -> bytes:
    """A DICOM dataset with neither preamble nor file meta, Implicit VR Little Endian (old modalities)."""
    dataset = Dataset()
    dataset.ImageType = ["ORIGINAL", "PRIMARY"]  # (0008,0008): the stream starts with group 0008
    dataset.Modality = "CR"
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = pixels.astype("<u2").tobytes()
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def test_dicom_without_preamble_but_with_file_meta() -> None:
    data = make_dicom(RAMP, bits_stored=12, preamble=False)
    assert data[:2] == b"\x02\x00" and b"DICM" not in data[:200]
    assert sniff_format(data) == "dicom"
    np.testing.assert_array_equal(decode_image(data), decode_image(make_dicom(RAMP, bits_stored=12)))


def test_bare_implicit_vr_dataset_without_file_meta() -> None:
    data = bare_implicit_dataset(RAMP)
    assert data[:4] == b"\x08\x00\x08\x00"
    assert sniff_format(data) == "dicom"
    image = decode_image(data)
    assert image[0, 0, 0] == 0.0 and image[1, 1, 0] == 1.0
    assert pixel_count(data) == 4
    assert dicom_header(data).modality == "CR"


def test_random_bytes_starting_like_a_dicom_tag_are_corrupt() -> None:
    data = b"\x08\x00\x08\x00" + b"\xff" * 300
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert caught.value.kind == "corrupt"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_palette_colour_dicom(dtype: type) -> None:
    top = np.iinfo(dtype).max
    palette = np.array([[0, 0, 0], [top, 0, 0], [0, top, 0], [0, 0, top // 2]], dtype=dtype)
    indices = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    data = make_dicom(indices, photometric="PALETTE COLOR", palette=palette, bits_stored=8)
    image = decode_image(data)
    np.testing.assert_allclose(image[0, 1], [1, 0, 0])
    np.testing.assert_allclose(image[1, 0], [0, 1, 0])
    np.testing.assert_allclose(image[1, 1], [0, 0, (top // 2) / top], atol=1e-6)
    np.testing.assert_allclose(decode_reduced(data, 16).image, image, atol=1e-6)


def test_multiframe_first_frame_everywhere() -> None:
    frames = np.stack([RAMP, RAMP[::-1, ::-1], RAMP])
    data = make_dicom(frames, bits_stored=12)
    assert decode_image(data)[0, 0, 0] == 0.0
    assert decode_reduced(data, 16).image[0, 0] == 0.0
    assert pixel_count(data) == 4  # frames used: one
    assert dicom_header(data).number_of_frames == 3


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_generated_compressed_dicom_is_lossless(syntax: UID) -> None:
    film = synthetic_film(np.random.default_rng(1), 96, 80, bits=12)
    data = make_dicom(film, bits_stored=12, transfer_syntax=syntax)
    assert pydicom.dcmread(BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decode_image(data), decode_image(make_dicom(film, bits_stored=12)))


# --- TIFF ---------------------------------------------------------------------------------------


def test_tiff_16bit_grey_decodes_like_png() -> None:
    pixels = np.array([[0, 32768, 65535], [1, 2, 3]], dtype=np.uint16)
    ok, tiff = cv2.imencode(".tiff", pixels)
    ok_png, png = cv2.imencode(".png", pixels)
    assert ok and ok_png
    assert sniff_format(tiff.tobytes()) == "tiff"
    np.testing.assert_array_equal(decode_image(tiff.tobytes()), decode_image(png.tobytes()))
    assert pixel_count(tiff.tobytes()) == 6


def tiff_header(width: int, height: int, order: str = "<") -> bytes:
    """A classic TIFF whose only image directory claims width x height (LONG values) and has no pixels."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    entries = [struct.pack(order + "HHII", tag, 4, 1, value) for tag, value in ((256, width), (257, height))]
    return (
        magic + struct.pack(order + "I", 8) + struct.pack(order + "H", len(entries)) + b"".join(entries) + b"\x00" * 4
    )


@pytest.mark.parametrize("order", ["<", ">"])
def test_tiff_header_claiming_30000_square_is_refused_before_decoding(order: str) -> None:
    data = tiff_header(30000, 30000, order)
    assert pixel_count(data) == 900_000_000
    with pytest.raises(ImageDecodeError, match="image too large: 30000x30000") as caught:
        decode_image(data)
    assert caught.value.kind == "unsupported"


def test_truncated_tiff_is_corrupt() -> None:
    _ok, tiff = cv2.imencode(".tiff", np.full((64, 64), 1234, np.uint16))
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(tiff.tobytes()[:20])
    assert caught.value.kind == "corrupt"


# --- error kinds --------------------------------------------------------------------------------


def error_of(data: bytes) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    return caught.value


def test_error_kinds_and_messages() -> None:
    png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
    cases = {
        "corrupt": [b"", png[:40], b"<html>no</html>", np.random.default_rng(0).bytes(600)],
        "unsupported": [
            make_dicom(RAMP, with_pixels=False),
            make_dicom(RAMP, bits_stored=12, window=None).replace(b"MONOCHROME2", b"HSV        "),
            cv2.imencode(".tiff", np.zeros((4, 4), np.float32))[1].tobytes(),
        ],
    }
    for kind, inputs in cases.items():
        for data in inputs:
            error = error_of(data)
            assert error.kind == kind, str(error)
            assert kind in str(error)  # the message says which
            assert isinstance(error, ValueError)


def test_unknown_transfer_syntax_is_unsupported() -> None:
    dataset = pydicom.dcmread(BytesIO(make_dicom(RAMP)))
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML  # video: no pixel decoder in pydicom
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really MPEG"])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    error = error_of(buffer.getvalue())
    assert error.kind == "unsupported" and "MPEG2" in str(error)


def test_corrupt_compressed_pixels_are_corrupt() -> None:
    data = make_dicom(synthetic_film(np.random.default_rng(2), 64, 64), bits_stored=12, transfer_syntax=JPEGLSLossless)
    dataset = pydicom.dcmread(BytesIO(data))
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    error = error_of(buffer.getvalue())
    assert error.kind == "corrupt" and "JPEG-LS" in str(error)


def test_error_kind_survives_pickling() -> None:
    error = ImageDecodeError("DICOM has no pixel data", kind="unsupported")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.kind == "unsupported" and str(copy) == str(error)
    with pytest.raises(ValueError):
        ImageDecodeError("x", kind="weird")


# --- header facts and selection -----------------------------------------------------------------

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def test_dicom_header_of_a_frontal_chest_cr() -> None:
    data = make_dicom(
        np.zeros((30, 20), np.uint16),
        modality="CR",
        body_part="CHEST",
        view_position="PA",
        sop_class_uid=CR_IMAGE_STORAGE,
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        sop_instance_uid="1.2.3.4.5.6",
    )
    header = dicom_header(data)
    assert header == DicomHeader(
        modality="CR",
        body_part_examined="CHEST",
        view_position="PA",
        image_laterality="",
        patient_orientation=(),
        sop_class_uid=CR_IMAGE_STORAGE,
        sop_instance_uid="1.2.3.4.5.6",
        study_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3.4.5",
        rows=30,
        columns=20,
        number_of_frames=1,
    )
    assert selection_reason(header) is None


def test_selection_skips_lateral_ct_and_other_body_parts() -> None:
    pixels = np.zeros((4, 4), np.uint16)
    lateral = dicom_header(make_dicom(pixels, modality="DX", view_position="LL", body_part="CHEST"))
    ct = dicom_header(make_dicom(pixels, modality="CT", sop_class_uid=CT_IMAGE_STORAGE, view_position=None))
    hand = dicom_header(make_dicom(pixels, modality="CR", body_part="HAND"))
    ap_no_body_part = dicom_header(make_dicom(pixels, modality="DX", view_position="AP"))
    assert "lateral" in selection_reason(lateral)
    assert "modality CT" in selection_reason(ct)
    assert "body part HAND" in selection_reason(hand)
    assert selection_reason(ap_no_body_part) is None
    assert selection_reason(None) is None  # PNG/JPEG/TIFF: always classified
    # The lists are parameters: a site that also reads CT scouts can say so.
    assert selection_reason(ct, modalities=("CR", "DX", "CT")) is None
    assert selection_reason(lateral, lateral_views=()) is None


def test_dicom_header_is_none_for_other_formats() -> None:
    assert dicom_header(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()) is None
    assert dicom_header(b"") is None
    assert dicom_header(b"hello world") is None


def test_header_and_reasons_carry_no_patient_data(caplog: pytest.LogCaptureFixture) -> None:
    data = make_dicom(np.zeros((4, 4), np.uint16), modality="MR")
    dataset = pydicom.dcmread(BytesIO(data))
    dataset.PatientName = "SECRETNAME^" + "X" * 80  # invalid (too long): pydicom warns if it is parsed
    dataset.PatientID = "SECRETID"
    dataset.PatientBirthDate = "19000101"
    dataset.BodyPartExamined = "ODD PART!"  # not a code string: must not be echoed
    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.save_as(buffer, enforce_file_format=True)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        header = dicom_header(buffer.getvalue())
        reasons = [selection_reason(header), selection_reason(header, modalities=("MR",))]
    text = repr(header) + " ".join(reasons) + caplog.text + " ".join(str(w.message) for w in caught)
    assert "SECRET" not in text and "19000101" not in text
    assert "modality MR" in reasons[0]
    assert "ODD" not in reasons[1] and "non-standard" in reasons[1]


# --- reduced decoding ---------------------------------------------------------------------------


def voi_lut_sequence(dataset: Dataset) -> None:
    """A non-linear (gamma-like) VOI LUT sequence over 12-bit values."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = list((65535 * (np.arange(4096) / 4095) ** 0.5).astype(int))
    item["LUTData"].VR = "US"
    dataset.VOILUTSequence = [item]


def dicom_variants(film: np.ndarray) -> dict[str, bytes]:
    """The grey DICOM cases whose value mapping differs: plain, window, MONOCHROME1, rescale, sigmoid, LUT, signed."""
    variants = {
        "plain": make_dicom(film, bits_stored=12),
        "window": make_dicom(film, bits_stored=12, window=(2048, 2000)),
        "mono1-window": make_dicom(film, bits_stored=12, window=(2048, 3000), photometric="MONOCHROME1"),
        "rescale-window": make_dicom(film, bits_stored=12, rescale=(2.0, -1024.0), window=(3000, 5000)),
    }
    dataset = pydicom.dcmread(BytesIO(variants["window"]))
    dataset.VOILUTFunction = "SIGMOID"
    sigmoid = BytesIO()
    dataset.save_as(sigmoid, enforce_file_format=True)
    variants["sigmoid"] = sigmoid.getvalue()
    dataset = pydicom.dcmread(BytesIO(variants["plain"]))
    voi_lut_sequence(dataset)
    lut = BytesIO()
    dataset.save_as(lut, enforce_file_format=True)
    variants["voi-lut-sequence"] = lut.getvalue()
    # CT-like signed storage with a negative intercept.
    dataset = pydicom.dcmread(BytesIO(variants["plain"]))
    signed = (film.astype(np.int32) - 2048).astype(np.int16)
    dataset.PixelRepresentation = 1
    dataset.PixelData = signed.astype("<i2").tobytes()
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1000
    dataset.WindowCenter, dataset.WindowWidth = -600, 1500
    ct = BytesIO()
    dataset.save_as(ct, enforce_file_format=True)
    variants["signed-rescale-window"] = ct.getvalue()
    return variants


# A detector-sized film (the worker's case: 2500 px reduced to a 1024 px display, then 224 px inputs).
FILM = synthetic_film(np.random.default_rng(7), 2500, 2048, bits=12)


def assert_close_to_full_path(reduced: np.ndarray, full: np.ndarray, max_side: int, label: str) -> None:
    """The reduced image against fit_within(decode_image) and the 224 px model inputs of both.

    Measured on FILM at 1024 (docs/decoding.md): display mean |diff| ~0.002, max 0.016-0.05;
    model inputs mean ~0.0008, max 0.005-0.014. The display differs because one integer box pass
    plus a small fractional pass replaces one fractional area pass (they weigh the fine noise
    differently); the model inputs because they are resized full -> 1024 -> 224, not full -> 224.
    """
    image = reduced if reduced.ndim == 3 else np.repeat(reduced[..., None], 3, axis=2)
    expected = fit_within(full, max_side)
    assert image.shape == expected.shape and image.dtype == np.float32, label
    difference = np.abs(image - expected)
    assert float(difference.mean()) < 0.004 and float(difference.max()) < 0.08, label
    model = np.abs(preprocess(reduced, 224) - preprocess(full, 224))
    assert float(model.mean()) < 0.002 and float(model.max()) < 0.02, label


@pytest.mark.parametrize(("name", "data"), sorted(dicom_variants(FILM).items()))
def test_decode_reduced_dicom_matches_the_full_path(name: str, data: bytes) -> None:
    full = decode_image(data)
    reduced = decode_reduced(data, 1024)
    assert reduced.original_size == (2500, 2048) and reduced.format == "dicom"
    assert_close_to_full_path(reduced.image, full, 1024, name)


def image_variants() -> dict[str, bytes]:
    """PNG 8/16-bit grey and colour, JPEG grey and colour (reduced decode), TIFF 16-bit, RGB DICOM."""
    film16 = (FILM.astype(np.uint32) * 16).astype(np.uint16)
    film8 = (FILM >> 4).astype(np.uint8)
    colour = np.dstack([film8, np.roll(film8, 40, axis=1), 255 - film8])
    return {
        "png16": cv2.imencode(".png", film16)[1].tobytes(),
        "png8": cv2.imencode(".png", film8)[1].tobytes(),
        "png-colour": cv2.imencode(".png", colour)[1].tobytes(),
        "tiff16": cv2.imencode(".tiff", film16)[1].tobytes(),
        "jpeg-grey": cv2.imencode(".jpg", film8, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
        "jpeg-colour": cv2.imencode(".jpg", colour, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes(),
        "dicom-rgb": make_dicom(colour[..., ::-1].copy(), photometric="RGB"),
    }


@pytest.mark.parametrize(("name", "data"), sorted(image_variants().items()))
def test_decode_reduced_images_match_the_full_path(name: str, data: bytes) -> None:
    full = decode_image(data)
    for max_side in (1024, 3000):  # reduced (JPEG: DCT-domain 1/2 scaling) and not reduced at all
        reduced = decode_reduced(data, max_side)
        assert reduced.original_size == (2500, 2048)
        assert_close_to_full_path(reduced.image, full, max_side, f"{name} {max_side}")
    np.testing.assert_allclose(
        decode_reduced(data, 3000).image.reshape(full.shape[:2] + (-1,)),
        full[..., : 3 if reduced.image.ndim == 3 else 1],
        atol=1e-6,
    )


def test_preprocess_of_a_grey_image_equals_its_three_channel_copy() -> None:
    grey = FILM[:300, :200].astype(np.float32) / 4095
    np.testing.assert_array_equal(preprocess(grey, 64), preprocess(np.repeat(grey[..., None], 3, axis=2), 64))


def test_pixel_count_reads_headers_only() -> None:
    png = cv2.imencode(".png", np.zeros((30, 20), np.uint8))[1].tobytes()
    jpeg = cv2.imencode(".jpg", np.zeros((30, 20), np.uint8))[1].tobytes()
    assert pixel_count(png) == 600
    assert pixel_count(jpeg) == 600
    assert pixel_count(make_dicom(np.zeros((30, 20), np.uint16))) == 600
    # A header claiming a huge image is counted, not decoded, so the worker can refuse to admit it.
    huge = bytearray(png)
    huge[16:24] = struct.pack(">II", 40000, 40000)
    assert pixel_count(bytes(huge)) == 1_600_000_000
    with pytest.raises(ImageDecodeError):
        pixel_count(b"garbage bytes")


# VmHWM (this process's resident high-water mark), not ru_maxrss: Linux carries ru_maxrss over
# from the forking parent across exec, so a big pytest process would hide the child's peak.
MEMORY_PROBE = """
import sys
from shared.imaging import decode_reduced

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
before = status_kb("VmRSS")
reduced = decode_reduced(data, 1024)
assert reduced.image.shape == (1024, 1024), reduced.image.shape
print((status_kb("VmHWM") - before) // 1024)
"""


def test_decode_reduced_of_a_10000_square_16bit_png_stays_within_two_uint16_copies(tmp_path: Path) -> None:
    # A gradient: realistic values, yet a tiny file (each row repeats the one above).
    pixels = np.tile(np.linspace(0, 65535, 10000).astype(np.uint16), (10000, 1))
    ok, png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    del pixels
    assert ok and len(png) < 5_000_000
    path = tmp_path / "huge.png"
    path.write_bytes(png.tobytes())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mb = int(result.stdout.strip())
    # One uint16 copy is 200 MB; decode_image needs ~2 GB (3 channels, float32). Measured: ~230 MB.
    assert peak_mb < 450, peak_mb


# --- overlays -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "content_type", "extension", "magic"),
    [
        ("png", "image/png", ".png", b"\x89PNG"),
        ("jpeg", "image/jpeg", ".jpg", b"\xff\xd8\xff"),
        ("webp", "image/webp", ".webp", b"RIFF"),
    ],
)
def test_encode_overlay_formats(fmt: str, content_type: str, extension: str, magic: bytes) -> None:
    display = (FILM[:600, :500] >> 4).astype(np.uint8)
    cam = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    data, kind, suffix = encode_overlay(display, cam, fmt, max_side=256)
    assert (kind, suffix) == (content_type, extension) and data.startswith(magic)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (256, 213, 3)
    expected = cv2.cvtColor(render_overlay(display, cam, max_side=256), cv2.COLOR_RGB2BGR)
    error = np.abs(decoded.astype(int) - expected).mean()
    assert error == 0 if fmt == "png" else error < 6


def test_overlay_png_still_works() -> None:
    image = np.random.default_rng(1).random((40, 30, 3)).astype(np.float32)
    data = overlay_png(image, np.ones((7, 7), np.float32))
    assert data.startswith(b"\x89PNG")
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, render_overlay(image, np.ones((7, 7), np.float32)))


@pytest.mark.parametrize("max_side", [256, 700])
def test_decode_reduced_sizes_match_fit_within_for_other_targets(max_side: int) -> None:
    """Other reduction factors (JPEG 1/8 and 1/2 decodes, box factors 9 and 3): fit_within's size, same picture."""
    for name, data in {**image_variants(), "dicom-window": dicom_variants(FILM)["window"]}.items():
        full = fit_within(decode_image(data), max_side)
        reduced = decode_reduced(data, max_side).image
        image = reduced if reduced.ndim == 3 else np.repeat(reduced[..., None], 3, axis=2)
        assert image.shape == full.shape, name
        assert float(np.abs(image - full).mean()) < 0.015, name  # 0.011 measured, narrow window
