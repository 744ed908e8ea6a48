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
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

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
    image = background + (rng.uniform(0.5, 0.6) - background) * body

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
) -> bytes:
    """Build an anonymous, valid DICOM file (Explicit VR Little Endian) from a pixel array.

    `pixels` is uint8/uint16 HxW for MONOCHROME1/2 (or FxHxW for a multi-frame file), or uint8
    HxWx3 for RGB. `window` is (center, width); `rescale` is (slope, intercept).
    """
    pixels = np.asarray(pixels)
    photometric = photometric.upper()
    if photometric == "RGB":
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"RGB pixels must be uint8 HxWx3, got {pixels.dtype} {pixels.shape}")
        frames, rows, columns, samples = 1, pixels.shape[0], pixels.shape[1], 3
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim not in (2, 3):
            raise ValueError(f"grey pixels must be uint8/uint16 HxW or FxHxW, got {pixels.dtype} {pixels.shape}")
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        rows, columns, samples = pixels.shape[-2], pixels.shape[-1], 1
    else:
        raise ValueError(f"photometric must be MONOCHROME1, MONOCHROME2 or RGB, got {photometric!r}")
    bits_allocated = pixels.dtype.itemsize * 8
    # A uint8 array cannot use more than 8 bits, whatever the (uint16-oriented) default says.
    stored = min(bits_stored, bits_allocated)
    if not 1 <= stored or (pixels.size and int(pixels.max()) >= 2**stored):
        raise ValueError(f"pixel values do not fit in {stored} stored bits")

    sop_class = _SECONDARY_CAPTURE if photometric == "RGB" else _DIGITAL_XRAY_FOR_PRESENTATION
    sop_instance = generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = sop_instance
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = sop_instance
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT" if photometric == "RGB" else "DX"
    dataset.ImageType = ["DERIVED", "SECONDARY"] if photometric == "RGB" else ["ORIGINAL", "PRIMARY"]
    # Deliberately not realistic: nothing here may look like a real person.
    dataset.PatientName = "ANON"
    dataset.PatientID = "ANON"
    dataset.ViewPosition = "PA"

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
    if window is not None:
        dataset.WindowCenter = DSfloat(window[0], auto_format=True)
        dataset.WindowWidth = DSfloat(window[1], auto_format=True)
    if rescale is not None:
        dataset.RescaleSlope = DSfloat(rescale[0], auto_format=True)
        dataset.RescaleIntercept = DSfloat(rescale[1], auto_format=True)
        dataset.RescaleType = "US"
    if with_pixels:
        raw = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
        dataset.PixelData = raw + b"\x00" * (len(raw) % 2)  # DICOM values have even length
        dataset["PixelData"].VR = "OW" if bits_allocated == 16 else "OB"

    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


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
    return 0.45 + 0.55 * texture


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
