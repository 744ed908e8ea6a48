"""Synthetic chest radiographs and DICOM files, so tests and demos never need real patient images.

The pictures are cartoons, not anatomy: a dark background, a bright thorax with two dark lung
fields, a mediastinum/spine band and ribs, plus noise and per-image pose, brightness and contrast.
"COVID" images add 1-3 patchy ground-glass opacities inside the lungs, and `lesion_mask` says
where, so Grad-CAM overlays can be checked against ground truth.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from shared.imaging.dicom import read_dataset

# Same columns as the dev set's manifest.csv, so the trainer reads both the same way.
MANIFEST_COLUMNS = [
    "file",
    "label",
    "source_repo",
    "source_path",
    "patient_id_if_known",
    "view_if_known",
    "license_if_known",
]

_DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_IMAGE_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg"}


@dataclass(frozen=True)
class SyntheticXray:
    """A synthetic radiograph and the ground truth of where its opacities are."""

    image: np.ndarray  # uint8 HxW grey
    lesion_mask: np.ndarray  # bool HxW, all False for normals


CUES = ("lungs", "border")


def synthetic_xray(rng: np.random.Generator, size: int = 256, covid: bool = False, cue: str = "lungs") -> SyntheticXray:
    """Draw one synthetic PA chest radiograph; `covid=True` adds the class cue.

    cue="lungs" (default): ground-glass opacities inside the lungs, as a real finding.
    cue="border": no opacity at all; instead a bright burnt-in marker in a top corner of the frame,
    outside the lung fields (a shortcut, like the labels and markers of one hospital's films).
    """
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    if cue not in CUES:
        raise ValueError(f"cue must be one of {CUES}, got {cue!r}")
    # Body coordinates: the frame spans about [-0.5, 0.5]; a random shift and zoom per image
    # keeps a model from memorising pixel positions.
    pixel = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    zoom = rng.uniform(0.9, 1.06)
    x = (pixel[None, :] - rng.uniform(-0.04, 0.04)) / zoom
    y = (pixel[:, None] - rng.uniform(-0.04, 0.04)) / zoom
    x, y = np.broadcast_arrays(x, y)

    background = rng.uniform(0.02, 0.1)
    body = _soft_ellipse(x, y, 0.0, 0.06, rng.uniform(0.44, 0.49), 0.62, edge=0.03)
    # float64 while the picture is drawn, float32 from the blur on.
    image: np.ndarray = background + (rng.uniform(0.5, 0.6) - background) * body

    lung_field = _lung_field(rng, x, y)
    # Air attenuates little, so lungs are dark on the film; soft tissue and bone are bright.
    image -= rng.uniform(0.28, 0.36) * lung_field

    spine = np.exp(-((x / rng.uniform(0.04, 0.055)) ** 2)) * body
    vertebrae = 0.85 + 0.15 * np.cos(2 * np.pi * y / rng.uniform(0.05, 0.065))
    image += rng.uniform(0.12, 0.2) * spine * vertebrae
    image += _ribs(rng, x, y) * body

    lesion_mask = np.zeros((size, size), dtype=bool)
    if covid and cue == "lungs":
        opacity, lesion_mask = _opacities(rng, x, y, lung_field, zoom)
        image += opacity

    # A gentle exposure gradient, as from the anode heel effect or patient thickness.
    angle = rng.uniform(0, 2 * np.pi)
    image += rng.uniform(-0.08, 0.08) * (x * np.cos(angle) + y * np.sin(angle)) * 2
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=max(0.6, size / 320))
    image += rng.normal(0.0, rng.uniform(0.008, 0.03), size=image.shape).astype(np.float32)

    # Per-image exposure and contrast in both classes, so mean brightness alone cannot separate them.
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    image = (image - 0.4) * rng.uniform(0.75, 1.25) + 0.4 + rng.uniform(-0.1, 0.1)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if covid and cue == "border":
        _burn_in_marker(rng, pixels)
    return SyntheticXray(image=pixels, lesion_mask=lesion_mask)


def _burn_in_marker(rng: np.random.Generator, pixels: np.ndarray) -> None:
    """A bright rectangular marker with a dark centre in the top-left or top-right corner (in place)."""
    size = pixels.shape[0]
    height = max(3, int(round(size * rng.uniform(0.07, 0.09))))
    width = max(3, int(round(size * rng.uniform(0.10, 0.12))))
    top = int(round(size * rng.uniform(0.0, 0.01)))
    left = int(round(size * rng.uniform(0.0, 0.02)))
    if rng.random() < 0.5:
        left = size - left - width
    pixels[top : top + height, left : left + width] = 250
    if height >= 5 and width >= 5:
        pixels[top + height // 3 : top + height - height // 3, left + width // 3 : left + width - width // 3] = 20


def write_synthetic_dataset(
    root: str | os.PathLike[str],
    n_per_class: int,
    size: int = 256,
    seed: int = 0,
    fmt: str = "png",
    cue: str = "lungs",
) -> Path:
    """Write a folder-per-class synthetic dataset with lesion masks and a manifest.csv; return root.

    `cue` says where the covid class's cue is (see `synthetic_xray`): "lungs" or "border".
    """
    if fmt not in _IMAGE_EXTENSIONS:
        raise ValueError(f"fmt must be 'png' or 'jpeg', got {fmt!r}")
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    extension = _IMAGE_EXTENSIONS[fmt]
    root = Path(root)
    for folder in ("covid", "normal", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    # One child seed per image: the same seed always gives the same files, byte for byte.
    seeds = np.random.SeedSequence(seed).spawn(2 * n_per_class + 1)
    naming = np.random.default_rng(seeds[0])
    stems: set[str] = set()
    rows: list[dict[str, str]] = []
    patient_number = 0
    for class_index, label in enumerate(("covid", "normal")):
        images_left_for_patient = 0
        for index in range(n_per_class):
            rng = np.random.default_rng(seeds[1 + class_index * n_per_class + index])
            xray = synthetic_xray(rng, size=size, covid=label == "covid", cue=cue)
            stem = _unique_stem(naming, stems)
            _write_image(root / label / f"{stem}{extension}", xray.image)
            if label == "covid":
                _write_image(root / "masks" / f"{stem}.png", xray.lesion_mask.astype(np.uint8) * 255)
            # Patients own 1-3 images (about 2 on average) of one class, to exercise grouped splits.
            if images_left_for_patient == 0:
                patient_number += 1
                images_left_for_patient = int(naming.integers(1, 4))
            images_left_for_patient -= 1
            rows.append(
                {
                    "file": f"{label}/{stem}{extension}",
                    "label": label,
                    "source_repo": "synthetic",
                    "source_path": f"shared.synthetic seed={seed} {label}#{index}",
                    "patient_id_if_known": f"SYN-{patient_number:04d}",
                    "view_if_known": "PA",
                    "license_if_known": "CC0 (synthetic)",
                }
            )

    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["file"]))
    return root


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    with_pixels: bool = True,
    modality: str | None = None,
    body_part: str | None = None,
    view_position: str | None = "PA",
    image_laterality: str | None = None,
    sop_class_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    palette: np.ndarray | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
) -> bytes:
    """Build an anonymous, valid DICOM file (Explicit VR Little Endian by default) from a pixel array.

    `pixels` is uint8/uint16 HxW for MONOCHROME1/2 and PALETTE COLOR (or FxHxW for a multi-frame
    file), or uint8 HxWx3 for RGB. `window` is (center, width); `rescale` is (slope, intercept).
    `palette` is an Nx3 uint8/uint16 RGB table (PALETTE COLOR only). Modality defaults to DX (OT
    for RGB); None for view_position, body_part or image_laterality leaves the element out.
    `transfer_syntax` compresses the pixels (RLE, JPEG-LS, JPEG 2000 via pydicom's encoders; JPEG
    Lossless via GDCM); `preamble=False` drops the 128-byte preamble and "DICM" prefix.
    """
    pixels = np.asarray(pixels)
    photometric = photometric.upper()
    layout = _pixel_layout(pixels, photometric)
    if (palette is None) != (photometric != "PALETTE COLOR"):
        raise ValueError("a palette is required for PALETTE COLOR, and only there")
    bits_allocated = pixels.dtype.itemsize * 8
    # A uint8 array cannot use more than 8 bits, whatever the (uint16-oriented) default says.
    stored = min(bits_stored, bits_allocated)
    if not stored >= 1 or (pixels.size and int(pixels.max()) >= 2**stored):
        raise ValueError(f"pixel values do not fit in {stored} stored bits")

    grey = photometric.startswith("MONOCHROME")
    default_class = _DIGITAL_XRAY_FOR_PRESENTATION if grey else _SECONDARY_CAPTURE
    dataset = Dataset()
    dataset.file_meta = _file_meta(UID(sop_class_uid or default_class), UID(sop_instance_uid or generate_uid()))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.Modality = modality or ("DX" if grey else "OT")
    dataset.ImageType = ["ORIGINAL", "PRIMARY"] if grey else ["DERIVED", "SECONDARY"]
    # Deliberately not realistic: nothing here may look like a real person.
    dataset.PatientName = "ANON"
    dataset.PatientID = "ANON"
    if body_part is not None:
        dataset.BodyPartExamined = body_part
    if view_position is not None:
        dataset.ViewPosition = view_position
    if image_laterality is not None:
        dataset.ImageLaterality = image_laterality

    _set_image_pixel_module(dataset, photometric, layout, bits_allocated, stored)
    _set_value_transforms(dataset, window, rescale)
    if palette is not None:
        _set_palette(dataset, np.asarray(palette))
    if with_pixels:
        _set_pixel_data(dataset, pixels, UID(transfer_syntax))

    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    data = buffer.getvalue()
    return data if preamble else data[132:]


def _pixel_layout(pixels: np.ndarray, photometric: str) -> tuple[int, int, int, int]:
    """(frames, rows, columns, samples per pixel) of a pixel array, refused unless it fits `photometric`."""
    if photometric == "RGB":
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"RGB pixels must be uint8 HxWx3, got {pixels.dtype} {pixels.shape}")
        return 1, pixels.shape[0], pixels.shape[1], 3
    if photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim not in (2, 3):
            raise ValueError(f"grey pixels must be uint8/uint16 HxW or FxHxW, got {pixels.dtype} {pixels.shape}")
        return (pixels.shape[0] if pixels.ndim == 3 else 1), pixels.shape[-2], pixels.shape[-1], 1
    raise ValueError(f"photometric must be MONOCHROME1, MONOCHROME2, PALETTE COLOR or RGB, got {photometric!r}")


def _set_image_pixel_module(
    dataset: Dataset, photometric: str, layout: tuple[int, int, int, int], bits_allocated: int, stored: int
) -> None:
    """How the pixels are laid out: samples, photometric interpretation, size, bits, frames (unsigned)."""
    frames, rows, columns, samples = layout
    dataset.SamplesPerPixel = samples
    dataset.PhotometricInterpretation = photometric
    dataset.Rows = rows
    dataset.Columns = columns
    dataset.BitsAllocated = bits_allocated
    dataset.BitsStored = stored
    dataset.HighBit = stored - 1
    dataset.PixelRepresentation = 0
    if samples == 3:
        dataset.PlanarConfiguration = 0
    if frames > 1:
        dataset.NumberOfFrames = frames


def _file_meta(sop_class: UID, sop_instance: UID) -> FileMetaDataset:
    """The file meta group: the instance's class and UID, written as Explicit VR Little Endian by pydicom."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = sop_instance
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return file_meta


def _set_value_transforms(
    dataset: Dataset, window: tuple[float, float] | None, rescale: tuple[float, float] | None
) -> None:
    """The VOI window (center, width) and the modality rescale (slope, intercept), where given."""
    if window is not None:
        dataset.WindowCenter = DSfloat(window[0], auto_format=True)
        dataset.WindowWidth = DSfloat(window[1], auto_format=True)
    if rescale is not None:
        dataset.RescaleSlope = DSfloat(rescale[0], auto_format=True)
        dataset.RescaleIntercept = DSfloat(rescale[1], auto_format=True)
        dataset.RescaleType = "US"


def _set_pixel_data(dataset: Dataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Pixel Data, little-endian and padded to even length, then compressed unless the syntax is native."""
    raw = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    dataset.PixelData = raw + b"\x00" * (len(raw) % 2)  # DICOM values have even length
    dataset["PixelData"].VR = "OW" if dataset.BitsAllocated == 16 else "OB"
    if transfer_syntax != ExplicitVRLittleEndian:
        _compress(dataset, pixels, transfer_syntax)


def synthetic_film(rng: np.random.Generator, height: int, width: int, bits: int = 12) -> np.ndarray:
    """A full-size detector image (uint16, `bits` stored): an upscaled synthetic X-ray plus fine texture and noise."""
    base = synthetic_xray(rng, size=512).image.astype(np.float32) / 255.0
    film: np.ndarray = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    # Upscaling leaves the picture smooth; real films have trabecular texture and quantum noise at
    # full resolution, which is what makes compression and area averaging realistic.
    texture = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigmaX=2.0)
    film += 0.02 * texture + rng.normal(0.0, 0.006, size=(height, width)).astype(np.float32)
    top = 2**bits - 1
    detector: np.ndarray = np.clip(np.rint(film * top), 0, top).astype(np.uint16)
    return detector


def _set_palette(dataset: Dataset, palette: np.ndarray) -> None:
    """Write an Nx3 RGB palette as the three (non-segmented) PALETTE COLOR lookup tables."""
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"palette must be uint8/uint16 Nx3, got {palette.dtype} {palette.shape}")
    bits = palette.dtype.itemsize * 8
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        # Descriptor: entries (0 means 65536), first mapped value, bits per entry. Entries are
        # stored as 16-bit words either way (PS3.3 C.7.6.3.1.6), 8-bit ones in the low byte.
        setattr(dataset, f"{colour}PaletteColorLookupTableDescriptor", [len(palette) % 65536, 0, bits])
        words = palette[:, channel].astype("<u2").tobytes()
        setattr(dataset, f"{colour}PaletteColorLookupTableData", words)
        dataset[f"{colour}PaletteColorLookupTableData"].VR = "OW"


def _compress(dataset: Dataset, pixels: np.ndarray, transfer_syntax: UID) -> None:
    """Encapsulate the pixels in a compressed transfer syntax (JPEG Lossless through GDCM)."""
    if transfer_syntax not in (JPEGLosslessSV1, JPEGLossless):
        dataset.compress(transfer_syntax, pixels, generate_instance_uid=False)
        return
    import tempfile

    import gdcm  # python-gdcm: pydicom has no JPEG Lossless encoder

    syntax = (
        gdcm.TransferSyntax.JPEGLosslessProcess14_1
        if transfer_syntax == JPEGLosslessSV1
        else gdcm.TransferSyntax.JPEGLosslessProcess14
    )
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        pydicom.dcmwrite(source, dataset, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
        if not reader.Read() or (change.SetInput(reader.GetImage()) or not change.Change()):
            raise RuntimeError("GDCM could not encode JPEG Lossless")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(target))
        if not writer.Write():
            raise RuntimeError("GDCM could not write JPEG Lossless")
        # Only the encapsulated pixels are taken over: GDCM also adds empty study elements.
        encoded = read_dataset(target.read_bytes(), pixels=True)
    dataset.PixelData = encoded.PixelData
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = transfer_syntax


# --- drawing helpers ----------------------------------------------------------------------------


def _soft_ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, *, edge: float
) -> np.ndarray:
    """An ellipse that is 1 inside and 0 outside, with a smooth rim `edge` wide (body units)."""
    radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    # Distance past the rim, roughly in body units, through a logistic step (tanh form: no overflow).
    return 0.5 - 0.5 * np.tanh((radius - 1.0) * min(rx, ry) / (edge / 2))


def _lung_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Both lungs in [0, 1], minus the heart, which overlaps the lower image-right lung (PA view)."""
    lungs = np.zeros_like(x)
    for side in (-1.0, 1.0):
        lung = _soft_ellipse(
            x,
            y,
            side * rng.uniform(0.17, 0.21),
            rng.uniform(-0.05, 0.0),
            rng.uniform(0.12, 0.15),
            rng.uniform(0.27, 0.32),
            edge=0.025,
        )
        lungs = np.maximum(lungs, lung)
    heart = _soft_ellipse(
        x, y, rng.uniform(0.05, 0.09), rng.uniform(0.14, 0.18), rng.uniform(0.12, 0.15), 0.11, edge=0.03
    )
    return lungs * (1.0 - heart)


def _ribs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Curved bright arcs, about nine a side, over the lung fields."""
    ribs = np.zeros_like(x)
    brightness = rng.uniform(0.05, 0.1)
    for side in (-1.0, 1.0):
        lateral = side * x  # > 0 on this side
        on_side = (0.5 + 0.5 * np.tanh((lateral - 0.04) / 0.02)) * (lateral < 0.42)
        curvature = rng.uniform(1.0, 1.8)
        for index in range(9):
            centre_y = -0.34 + index * 0.068 + rng.uniform(-0.01, 0.01)
            # Highest over the middle of the lung, dropping towards the spine and the chest wall.
            arc = centre_y + curvature * (lateral - 0.2) ** 2
            ribs += brightness * np.exp(-(((y - arc) / 0.011) ** 2)) * on_side
    return ribs


def _opacities(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lung_field: np.ndarray, zoom: float
) -> tuple[np.ndarray, np.ndarray]:
    """1-3 patchy ground-glass opacities inside the lungs, and the mask where each exceeds half its peak."""
    size = x.shape[0]
    opacity = np.zeros_like(x)
    mask = np.zeros(x.shape, dtype=bool)
    # Centres are drawn from well inside the lungs, so every opacity is at least partly visible.
    inside = np.flatnonzero(lung_field > 0.9)
    for _ in range(int(rng.integers(1, 4))):
        centre = int(rng.choice(inside))
        cy, cx = y.flat[centre], x.flat[centre]
        # Half-peak radius 8-18% of the image side; body coordinates are image units / zoom.
        radius = rng.uniform(0.08, 0.18) / zoom
        aspect = rng.uniform(0.7, 1.4)
        sigma = radius / np.sqrt(2 * np.log(2))  # Gaussian falls to half at `radius`
        envelope = np.exp(-(((x - cx) / (sigma * aspect)) ** 2 + ((y - cy) / (sigma / aspect)) ** 2) / 2)
        # Opacities exist only in lung tissue; the lesion ends where the lung does.
        envelope = envelope * lung_field
        opacity += rng.uniform(0.26, 0.38) * envelope * _patchiness(rng, size)
        mask |= envelope > 0.5
    return opacity, mask


def _patchiness(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random texture in [0.45, 1] that makes opacities mottled rather than round."""
    coarse = rng.standard_normal((max(4, size // 12), max(4, size // 12))).astype(np.float32)
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
    patchiness: np.ndarray = 0.45 + 0.55 * texture
    return patchiness


def _unique_stem(rng: np.random.Generator, taken: set[str]) -> str:
    """A random-looking hex file stem in the style of the dev set, unique within `taken`."""
    while True:
        stem = "d" + bytes(rng.integers(0, 256, size=8, dtype=np.uint8)).hex()
        if stem not in taken:
            taken.add(stem)
            return stem


def _write_image(path: Path, pixels: np.ndarray) -> None:
    """Encode a uint8 grey array as PNG or JPEG (by suffix) and write it."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else []
    ok, encoded = cv2.imencode(path.suffix, pixels, params)
    if not ok:
        raise OSError(f"could not encode {path.name}")
    path.write_bytes(encoded.tobytes())
