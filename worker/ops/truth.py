"""True labels of a screened folder (from its manifest.csv or covid/ normal/ subfolders) and the batch's agreement with them."""

from __future__ import annotations

import csv
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shared.models import Scan
from worker.ops.ingest import IngestItem, scan_id_for

TRUE_LABELS = ("covid", "normal")
MANIFEST = "manifest.csv"


def true_labels(folder: Path, items: Iterable[IngestItem]) -> dict[str, str]:
    """Scan id -> true label for the items a folder's manifest.csv (columns file, label) or subfolder names label.

    A manifest.csv wins; otherwise a file under a `covid/` or `normal/` folder (at any depth below
    the screened folder) takes that folder's name. Empty when nothing is labelled.
    """
    manifest = folder / MANIFEST
    if manifest.is_file():
        labels = _from_manifest(manifest)
        if labels:
            return {item.scan_id: labels[item.scan_id] for item in items if item.scan_id in labels}
    root = folder.resolve()
    found = {}
    for item in items:
        try:
            parents = Path(item.location).resolve().relative_to(root).parent.parts
        except ValueError:
            continue
        named = [part.lower() for part in parents if part.lower() in TRUE_LABELS]
        if named:
            found[item.scan_id] = named[-1]
    return found


def _from_manifest(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            return {}
        # Through ingest's own rule, so the keys are the scan ids this folder's files get.
        return {
            scan_id_for(PurePosixPath(row["file"].strip()).as_posix()): row["label"].strip().lower()
            for row in reader
            if row.get("file") and (row.get("label") or "").strip().lower() in TRUE_LABELS
        }


@dataclass(frozen=True)
class Agreement:
    """One model's calls against the true labels, over the labelled scans it scored."""

    model: str
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    # Labelled scans the model called neither covid nor normal (indeterminate): they count as misses.
    other_covid: int = 0
    other_normal: int = 0

    @property
    def n_covid(self) -> int:
        """Labelled covid scans with a call from this model."""
        return self.true_positive + self.false_negative + self.other_covid

    @property
    def n_normal(self) -> int:
        """Labelled normal scans with a call from this model."""
        return self.true_negative + self.false_positive + self.other_normal

    @property
    def n(self) -> int:
        """Labelled scans with a call from this model."""
        return self.n_covid + self.n_normal

    def figures(self) -> list[tuple[str, float | None, str]]:
        """(name, value or None, counts) for accuracy, sensitivity and specificity."""

        def ratio(part: int, whole: int) -> float | None:
            return part / whole if whole else None

        correct = self.true_positive + self.true_negative
        return [
            ("accuracy", ratio(correct, self.n), f"{correct}/{self.n}"),
            ("sensitivity", ratio(self.true_positive, self.n_covid), f"{self.true_positive}/{self.n_covid} covid"),
            ("specificity", ratio(self.true_negative, self.n_normal), f"{self.true_negative}/{self.n_normal} normal"),
        ]

    def line(self) -> str:
        """One terminal line: the three figures with their counts."""
        parts = [
            f"{name} {'-' if value is None else f'{value:.2f}'} ({counts})" for name, value, counts in self.figures()
        ]
        other = self.other_covid + self.other_normal
        tail = f"; {other} indeterminate, counted as misses" if other else ""
        return f"agreement of {self.model} with the true labels: " + ", ".join(parts) + tail


def agreement(
    scans: Iterable[Scan], truth: Mapping[str, str], models: Collection[tuple[str, str]] | None = None
) -> list[Agreement]:
    """Per model (of `models`, or every model seen), its calls on the labelled scans against the true labels."""
    tallies: dict[tuple[str, str], dict[str, int]] = {}
    for scan in scans:
        label = truth.get(scan.scan_id)
        if label is None:
            continue
        for p in scan.predictions:
            key = (p.model_name, p.model_version)
            if models is not None and key not in models:
                continue
            tally = tallies.setdefault(key, {"tp": 0, "fn": 0, "tn": 0, "fp": 0, "oc": 0, "on": 0})
            if p.label not in TRUE_LABELS:
                tally["oc" if label == "covid" else "on"] += 1
            elif label == "covid":
                tally["tp" if p.label == "covid" else "fn"] += 1
            else:
                tally["tn" if p.label == "normal" else "fp"] += 1
    return [
        Agreement(f"{name} {version}", t["tp"], t["fn"], t["tn"], t["fp"], t["oc"], t["on"])
        for (name, version), t in sorted(tallies.items())
    ]
