"""Datasets: find the labelled images in one of three layouts, hash them, split them reproducibly.

Layouts (detected per data path):
- class folders: `covid/` and/or `normal/` (any case), optional `manifest.csv` beside them;
- the COVID chest X-ray dataset (ieee8023): `metadata.csv` + `images/`;
- Kermany's pneumonia set: `chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}` (NORMAL only).

Log messages name files and counts, never patient ids: these logs end up in CI output and tickets.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from shared.domain import CLASS_NAMES
from shared.errors import LungcamError
from shared.hashing import sha256_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
MANIFEST_NAME = "manifest.csv"
IEEE8023_SOURCE = "ieee8023/covid-chestxray-dataset"
KERMANY_SOURCE = "kermany/chest_xray"
DEFAULT_FINDING = "COVID-19"
DEFAULT_VIEW = "PA"
GROUPED_SPLIT = "StratifiedGroupKFold, first fold"
PAPER_SPLIT = "train_test_split, stratified"
# Folders that may sit beside the class folders without being a class (the synthetic set's masks).
_KNOWN_NON_CLASS_FOLDERS = frozenset({"masks"})
_KERMANY_SPLITS = ("train", "test", "val")
# Kermany's NORMAL files are named IM-<patient>-<image>.jpeg (NORMAL2-IM-... for the second batch);
# reading the patient from the name is an inference from that scheme, not documented metadata.
_KERMANY_PATIENT = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


class DatasetError(LungcamError, ValueError):
    """A data path that is missing, empty, malformed or in no known layout."""


@dataclass(frozen=True)
class Sample:
    """One labelled image; `relative_path` is relative to its dataset's root (used for the hash)."""

    path: Path
    label: str
    patient_id: str | None
    source: str | None
    relative_path: str = ""

    @property
    def key(self) -> str:
        """The name used in hashes and warnings: the path relative to its dataset root."""
        return self.relative_path or self.path.name


def load_dataset(
    path: str | Path, *, finding: str | None = DEFAULT_FINDING, view: str | None = DEFAULT_VIEW
) -> list[Sample]:
    """Detect the layout of one data path and list its samples (covid and normal only), sorted by file.

    `finding` and `view` filter the ieee8023 metadata (substring of `finding`, exact `view`);
    None keeps every row. The paper's filters are the defaults.
    """
    root = Path(path)
    layout = detect_layout(root)
    if layout == "ieee8023":
        return _load_ieee8023(root, finding=finding, view=view)
    kermany_root = _find_kermany_root(root) if layout == "kermany" else None
    if kermany_root is not None:
        return _load_kermany(root, kermany_root)
    return _load_class_folders(root)


def detect_layout(root: Path) -> str:
    """Which layout a data path has ("ieee8023", "kermany" or "class-folders"); DatasetError if none (lists no files)."""
    if not root.exists():
        raise DatasetError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"data path is not a folder: {root}")
    if (root / "metadata.csv").is_file() and _child_dir(root, "images") is not None:
        return "ieee8023"
    if _find_kermany_root(root) is not None:
        return "kermany"
    if any(_child_dir(root, name) is not None for name in CLASS_NAMES):
        return "class-folders"
    raise DatasetError(
        f"unknown dataset layout in {root}: expected class folders {'/, '.join(CLASS_NAMES)}/ "
        "(optionally with manifest.csv), the COVID chest X-ray dataset's metadata.csv + images/, "
        "or Kermany's chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}"
    )


def load_datasets(
    paths: Sequence[str | Path], *, finding: str | None = DEFAULT_FINDING, view: str | None = DEFAULT_VIEW
) -> list[Sample]:
    """Load several data paths and concatenate their samples in the order given."""
    if not paths:
        raise DatasetError("no data path given")
    samples: list[Sample] = []
    for path in paths:
        samples.extend(load_dataset(path, finding=finding, view=view))
    return samples


def count_labels(samples: Iterable[Sample]) -> dict[str, int]:
    """Images per class, in CLASS_NAMES order (zero counts included)."""
    counts = Counter(sample.label for sample in samples)
    return {name: counts.get(name, 0) for name in CLASS_NAMES}


def dataset_hash(samples: Iterable[Sample]) -> str:
    """sha256 over the sorted (relative path, label, file sha256) triples: equal data, equal hash."""
    entries = sorted((sample.key, sample.label, sha256_file(sample.path)) for sample in samples)
    digest = hashlib.sha256()
    for key, label, content in entries:
        digest.update(f"{key}\t{label}\t{content}\n".encode())
    return digest.hexdigest()


def split_samples(
    samples: Sequence[Sample], test_fraction: float = 0.2, seed: int = 42, group_by_patient: bool = True
) -> tuple[list[Sample], list[Sample]]:
    """Stratified train/test split; with group_by_patient, a known patient's images stay on one side.

    Without patient grouping (or when no patient id is known) this is exactly the paper's
    `train_test_split(test_size=test_fraction, stratify=labels, random_state=seed)`.
    With grouping it is the first fold of `StratifiedGroupKFold(round(1/test_fraction))`,
    each image without a patient id being its own group.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test fraction must be between 0 and 1, got {test_fraction}")
    counts = count_labels(samples)
    if min(counts.values()) < 2:
        raise DatasetError(f"a stratified split needs at least 2 images of each class, got {counts}")
    labels = [sample.label for sample in samples]
    indices = np.arange(len(samples))
    if split_method(samples, group_by_patient) == GROUPED_SPLIT:
        n_splits = round(1.0 / test_fraction)
        if n_splits < 2:
            raise DatasetError(f"test fraction {test_fraction} is too large for a grouped split (use at most 0.5)")
        groups = [sample.patient_id or f"\0image-{index}" for index, sample in enumerate(samples)]
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            train_index, test_index = next(splitter.split(indices, labels, groups))
        except ValueError as exc:
            raise DatasetError(f"cannot split by patient: {exc}") from exc
        log.info(
            "split by patient: %d groups, %d-fold (test fraction %.3f)",
            len(set(groups)),
            n_splits,
            len(test_index) / len(samples),
        )
    else:
        try:
            train_index, test_index = train_test_split(
                indices, test_size=test_fraction, stratify=labels, random_state=seed
            )
        except ValueError as exc:
            raise DatasetError(f"cannot split: {exc}") from exc
        log.info("split by image (stratified, as the paper)")
    return [samples[i] for i in train_index], [samples[i] for i in test_index]


def split_method(samples: Sequence[Sample], group_by_patient: bool) -> str:
    """Which split `split_samples` uses: grouped by patient only when asked and some patient is known."""
    if group_by_patient and any(sample.patient_id for sample in samples):
        return GROUPED_SPLIT
    return PAPER_SPLIT


def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of `parent` called `name` in any letter case, or None."""
    for child in sorted(parent.iterdir()):
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def _image_files(folder: Path) -> list[Path]:
    """Image files under a folder (recursively), sorted, skipping hidden files and macOS debris."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith((".", "__")) for part in path.relative_to(folder).parts)
    )


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _require_images(files: list[Path], folder: Path) -> None:
    if not files:
        raise DatasetError(f"class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): {folder}")


# --- class folders -------------------------------------------------------------------------------


def _load_class_folders(root: Path) -> list[Sample]:
    details = _read_class_manifest(root)
    samples: list[Sample] = []
    class_dirs = {}
    for label in CLASS_NAMES:
        folder = _child_dir(root, label)
        if folder is None:
            log.warning("%s: no %s/ folder; this data path contributes no %s images", root, label, label)
            continue
        class_dirs[label] = folder
        files = _image_files(folder)
        _require_images(files, folder)
        for file in files:
            key = _relative(file, root)
            patient_id, source = details.get(key, (None, None))
            samples.append(Sample(file, label, patient_id, source, key))
    ignored = sorted(
        child.name
        for child in root.iterdir()
        if child.is_dir()
        and child not in class_dirs.values()
        and child.name.lower() not in _KNOWN_NON_CLASS_FOLDERS
        and not child.name.startswith((".", "__"))
    )
    if ignored:
        log.warning("%s: ignoring folders that are not classes: %s", root, ", ".join(ignored))
    log.info(
        "%s: class folders, %s%s",
        root,
        _format_counts(samples),
        f", manifest for {sum(1 for s in samples if s.relative_path in details)} images" if details else "",
    )
    return samples


def _read_class_manifest(root: Path) -> dict[str, tuple[str | None, str | None]]:
    """Map file (relative to root) -> (patient id, source) from an optional manifest.csv."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return {}
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise DatasetError(f"{manifest} has no 'file' column (columns: {reader.fieldnames})")
        details = {}
        for row in reader:
            key = (row.get("file") or "").strip().replace("\\", "/").lstrip("./")
            if key:
                details[key] = (
                    (row.get("patient_id_if_known") or "").strip() or None,
                    (row.get("source_repo") or "").strip() or None,
                )
    return details


# --- ieee8023 COVID chest X-ray dataset ---------------------------------------------------------


def _load_ieee8023(root: Path, *, finding: str | None, view: str | None) -> list[Sample]:
    metadata = root / "metadata.csv"
    with open(metadata, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        required = {"patientid", "finding", "view", "filename"}
        missing = required - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{metadata} lacks columns {sorted(missing)} of the COVID chest X-ray dataset")
        rows = list(reader)
    samples: list[Sample] = []
    missing_files: list[str] = []
    for row in rows:
        # The dataset also holds CT slices; whatever the filters, only radiographs are chest X-rays.
        if (row.get("modality") or "X-ray").strip().lower() not in ("x-ray", "xray", "cr", "dx"):
            continue
        # Old versions say "COVID-19", newer ones "Pneumonia/Viral/COVID-19": match a substring.
        if finding is not None and finding.lower() not in (row["finding"] or "").lower():
            continue
        if view is not None and (row["view"] or "").strip().lower() != view.strip().lower():
            continue
        folder = _child_dir(root, (row.get("folder") or "images").strip() or "images") or _child_dir(root, "images")
        file = folder / row["filename"].strip() if folder is not None else root / "images" / row["filename"]
        if not file.is_file():
            missing_files.append(row["filename"])
            continue
        samples.append(
            Sample(file, "covid", (row["patientid"] or "").strip() or None, IEEE8023_SOURCE, _relative(file, root))
        )
    if missing_files:
        log.warning(
            "%s: %d metadata rows name missing image files, skipped (e.g. %s)",
            root,
            len(missing_files),
            ", ".join(missing_files[:3]),
        )
    log.info(
        "%s: COVID chest X-ray dataset, %d of %d rows kept (finding contains %r, view %r)",
        root,
        len(samples),
        len(rows),
        finding or "any",
        view or "any",
    )
    if not samples:
        raise DatasetError(f"no images in {root} match finding {finding!r} and view {view!r}")
    return samples


# --- Kermany chest_xray ------------------------------------------------------------------------


def _is_kermany_split(folder: Path) -> bool:
    """A folder holding NORMAL/ and PNEUMONIA/ (one of Kermany's train/test/val folders)."""
    return _child_dir(folder, "NORMAL") is not None and _child_dir(folder, "PNEUMONIA") is not None


def _find_kermany_root(root: Path) -> Path | None:
    """The folder holding train/test/val (the data path, or chest_xray/ below it), or a split folder."""
    candidates = [root]
    # The Kaggle download nests chest_xray/ inside chest_xray/: look two levels down.
    for _ in range(2):
        nested = _child_dir(candidates[-1], "chest_xray")
        if nested is None:
            break
        candidates.append(nested)
    for candidate in candidates:
        splits = [_child_dir(candidate, name) for name in _KERMANY_SPLITS]
        if any(split is not None and _is_kermany_split(split) for split in splits):
            return candidate
    if _is_kermany_split(root) and _child_dir(root, "covid") is None:
        return root
    return None


def _load_kermany(root: Path, kermany_root: Path) -> list[Sample]:
    split_dirs = (
        [kermany_root]
        if _is_kermany_split(kermany_root)
        else [split for name in _KERMANY_SPLITS if (split := _child_dir(kermany_root, name)) is not None]
    )
    samples: list[Sample] = []
    excluded = 0
    for split in split_dirs:
        normal = _child_dir(split, "NORMAL")
        pneumonia = _child_dir(split, "PNEUMONIA")
        if pneumonia is not None:
            excluded += len(_image_files(pneumonia))
        if normal is None:
            continue
        for file in _image_files(normal):
            match = _KERMANY_PATIENT.match(file.stem)
            patient = f"kermany-{match.group(1).upper()}" if match else None
            samples.append(Sample(file, "normal", patient, KERMANY_SOURCE, _relative(file, root)))
    log.info(
        "%s: Kermany chest_xray layout, %d NORMAL images kept; %d PNEUMONIA images excluded "
        "(bacterial/viral pneumonia is neither covid nor normal)",
        root,
        len(samples),
        excluded,
    )
    if not samples:
        raise DatasetError(f"no NORMAL images in the Kermany layout under {root}")
    return samples


def _format_counts(samples: Iterable[Sample]) -> str:
    return ", ".join(f"{count} {label}" for label, count in count_labels(samples).items())
