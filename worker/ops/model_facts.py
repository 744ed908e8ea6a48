"""What a model is, in words: name, training data, leave-one-source-out AUC, audit, operating point, and any warning."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from shared.calibration import AUDIT_PASSED, DEFAULT_THRESHOLD, audit_status

DEMONSTRATION_WARNING = (
    "{name} is a DEMONSTRATION MODEL: trained on synthetic images, not on patients. "
    "Its outputs mean nothing clinically."
)


@dataclass(frozen=True)
class ModelFacts:
    """One model's description as shown in the terminal and the HTML report."""

    name: str
    version: str
    demonstration: bool
    training_data: str
    leave_one_source_out: str
    audit: str
    operating_point: str
    audit_warning: str | None  # None when the shortcut audit passed

    @property
    def warnings(self) -> list[str]:
        """What must be said before screening: a demonstration model, an audit failed or never run."""
        demo = [DEMONSTRATION_WARNING.format(name=self.title)] if self.demonstration else []
        return demo + ([self.audit_warning] if self.audit_warning else [])

    @property
    def title(self) -> str:
        """'name version'."""
        return f"{self.name} {self.version}"

    def rows(self) -> list[tuple[str, str]]:
        """(label, text) pairs in display order."""
        return [
            ("model", self.title),
            ("training data", self.training_data),
            ("leave-one-source-out AUC", self.leave_one_source_out),
            ("shortcut audit", self.audit),
            ("operating point", self.operating_point),
        ]

    def lines(self) -> list[str]:
        """The rows as aligned terminal lines."""
        width = max(len(label) for label, _ in self.rows())
        return [f"{label.ljust(width)}  {text}" for label, text in self.rows()]


def _training_data(manifest: Mapping[str, Any]) -> str:
    dataset = manifest.get("dataset")
    if not isinstance(dataset, Mapping):
        return "not recorded"
    by_label = dataset.get("n_by_label") or {}
    counts = ", ".join(f"{n} {label}" for label, n in sorted(by_label.items())) if isinstance(by_label, Mapping) else ""
    n = dataset.get("n_images", sum(by_label.values()) if isinstance(by_label, Mapping) else "?")
    # Only the folder names: a path on the trainer's machine means nothing here and may name a person.
    names = ", ".join(PurePath(str(p)).name or str(p) for p in dataset.get("data_paths") or []) or "unnamed data"
    text = f"{n} images" + (f" ({counts})" if counts else "") + f" from {names}"
    return text + (" (synthetic)" if manifest.get("demonstration") else "")


def _leave_one_source_out(manifest: Mapping[str, Any]) -> str:
    loso = manifest.get("leave_one_source_out")
    if not isinstance(loso, Mapping) or loso.get("mean_auc") is None:
        return "not measured"
    text = f"mean {float(loso['mean_auc']):.3f}"
    worst = loso.get("worst_pair")
    if isinstance(worst, (list, tuple)) and len(worst) == 2 and worst[1] is not None:
        text += f", worst pair {worst[0]} {float(worst[1]):.3f}"
    n_pairs = len(loso.get("pairs") or {})
    return (
        text
        + (f" ({n_pairs} held-out source pairs" if n_pairs else " (")
        + f", on {loso.get('data', 'its training data')})"
    )


def _audit(manifest: Mapping[str, Any]) -> str:
    audit = manifest.get("audit")
    if not audit:
        return "never audited"
    if not isinstance(audit, Mapping):
        return "unreadable audit entry"
    verdict = str(audit.get("verdict") or "no verdict")
    reason = audit.get("reason")
    return verdict if verdict == AUDIT_PASSED or not reason else f"{verdict}: {reason}"


def _operating_point(manifest: Mapping[str, Any]) -> str:
    calibration = manifest.get("calibration")
    if not isinstance(calibration, Mapping) or calibration.get("threshold") is None:
        return f"threshold {DEFAULT_THRESHOLD:.3f} (uncalibrated default)"
    text = f"threshold {float(calibration['threshold']):.3f} on p_covid"
    target = calibration.get("target_sensitivity")
    return text + (f", chosen for a target sensitivity of {float(target):.2f}" if target is not None else "")


def model_facts(manifest: Mapping[str, Any]) -> ModelFacts:
    """The facts of one bundle's manifest; missing entries read 'not measured' / 'never audited', never fail."""
    name, version = str(manifest.get("name", "?")), str(manifest.get("version", "?"))
    return ModelFacts(
        name,
        version,
        bool(manifest.get("demonstration")),
        _training_data(manifest),
        _leave_one_source_out(manifest),
        _audit(manifest),
        _operating_point(manifest),
        audit_status(manifest),
    )
