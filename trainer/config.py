"""Every knob of a training run (TrainConfig, ResolvedConfig), each recipe's defaults, the preprocessing they
imply, and what a bundle's manifest says of its run (BundleData)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from shared.calibration import DEFAULT_TARGET_SENSITIVITY
from shared.domain import Manifest
from shared.errors import LungcamError
from shared.imaging.preprocess import INTENSITY_METHODS, PREPROCESSING, SQUARE_METHODS, robust_preprocessing
from shared.pretrained import PACKAGED_WEIGHTS, PACKAGED_WEIGHTS_ARCH
from shared.zoo import ARCHITECTURES
from trainer.datasets import DEFAULT_FINDING, DEFAULT_VIEW, Sample, split_samples
from trainer.frozen import BALANCE_MODES, FROZEN_FEATURE_LAYER
from trainer.robust import SMALL_ARCH, SMALL_GRADCAM_LAYER


class ConfigError(LungcamError, ValueError):
    """A training configuration that makes no sense (unknown architecture or layer, bad numbers)."""


def utc_version() -> str:
    """A version string from the current UTC time, e.g. 20261127T164500Z."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


RECIPES = ("paper", "robust", "frozen")
# What `--recipe robust` sets for every knob left unset (None). Chosen by leave-one-source-out
# validation (benchmarks/leave_one_source_out.py, benchmarks/results/loso.md), not by the dev split.
ROBUST_DEFAULTS: dict[str, Any] = {
    "arch": SMALL_ARCH,
    "input_size": 128,
    # 15 epochs as measured in LOSO; early stopping keeps the best validation-loss weights.
    "epochs": 15,
    "batch_size": 32,
    "learning_rate": 2e-3,
    "rotation_degrees": 10.0,
    "freeze_backbone": False,
    "intensity": "clahe",
    "working_size": 256,
    "crop_fraction": 0.0,
    "blur_sigma": 0.0,
    # Centre crop measured worse in LOSO (styled normals 0.935 vs 0.970, lungs blanked 0.950 vs 0.906).
    "square": "stretch",
    "lung_mask": False,
    "augment_strength": 1.0,
    "label_smoothing": 0.1,
    "weight_decay": 0.02,
    "val_fraction": 0.15,
    "patience": 8,
}
# What `--recipe frozen` sets (the recommended recipe): the packaged VGG16 never trains, the lung box
# alone is shown (preprocessing version 4), a logistic regression reads block 4's pooled features.
# Chosen by leave-one-source-out on both classes (benchmarks/results/loso.md). The epoch, batch,
# learning-rate and augmentation knobs do not apply: the head is fitted in closed form.
FROZEN_DEFAULTS: dict[str, Any] = {
    "arch": "vgg16",
    "weights": "hed-vgg16",
    "input_size": 224,
    "epochs": 1,
    "batch_size": 16,
    "learning_rate": 1.0,
    "rotation_degrees": 0.0,
    "freeze_backbone": True,
    "intensity": "clahe",
    "working_size": 256,
    "crop_fraction": 0.0,
    "blur_sigma": 0.0,
    "square": "stretch",
    "lung_mask": True,
    "augment_strength": 0.0,
    "label_smoothing": 0.0,
    "weight_decay": 0.0,
    "val_fraction": 0.0,
    "patience": 0,
    "gradcam_layer": FROZEN_FEATURE_LAYER,
    "head_c": 0.01,
    "balance": "source",
}
# The paper's recipe: the values TrainConfig had before recipes existed.
PAPER_DEFAULTS: dict[str, Any] = {
    "arch": "vgg16",
    "input_size": 224,
    "epochs": 15,
    "batch_size": 8,
    "learning_rate": 1e-3,
    "rotation_degrees": 15.0,
    "freeze_backbone": True,
    "intensity": None,  # preprocessing version 1
    "working_size": 256,
    "crop_fraction": 0.0,
    "blur_sigma": 0.0,
    "square": "stretch",
    "lung_mask": False,
    "augment_strength": 0.0,
    "label_smoothing": 0.0,
    "weight_decay": 0.0,
    "val_fraction": 0.0,  # the paper validates on the test split
    "patience": 0,
}


@dataclass
class TrainConfig:
    """Every knob of a training run; None means "the recipe's default" (PAPER_DEFAULTS / ROBUST_DEFAULTS)."""

    recipe: str = "paper"
    arch: str | None = None
    # "imagenet", "hed-vgg16" (packaged), "none", or a local weights file; None: the recipe's default
    # (imagenet for paper and robust's zoo backbones, "none" for the small CNN, hed-vgg16 for frozen).
    weights: str | None = None
    input_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    rotation_degrees: float | None = None
    test_fraction: float = 0.2
    seed: int = 42
    group_by_patient: bool = True
    freeze_backbone: bool | None = None
    # Preprocessing: intensity None keeps version 1 (the paper's); anything else is version 2.
    intensity: str | None = None
    working_size: int | None = None
    crop_fraction: float | None = None
    blur_sigma: float | None = None
    square: str | None = None
    lung_mask: bool | None = None  # preprocessing version 4: only the lung box is shown
    # The robust recipe's training: augmentation, regularisation, early stopping on a validation split.
    augment_strength: float | None = None
    label_smoothing: float | None = None
    weight_decay: float | None = None
    val_fraction: float | None = None
    patience: int | None = None
    # The frozen recipe's head: L2 inverse strength, sample balance, and where pooled features are cached.
    head_c: float | None = None
    balance: str | None = None
    feature_cache: str | None = None
    # Operating point, fitted on the validation split (robust recipe; the paper keeps argmax).
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    indeterminate_width: float = 0.0
    gradcam_layer: str | None = None  # None: the paper's layer for the architecture
    name: str | None = None  # None: f"{arch}-covid"
    version: str | None = None  # None: UTC timestamp
    # Filters of the ieee8023 metadata.csv layout (ignored by the other layouts).
    finding: str | None = DEFAULT_FINDING
    view: str | None = DEFAULT_VIEW
    progress: bool = field(default=True, compare=False)

    def resolved(self) -> ResolvedConfig:
        """A copy with the recipe's defaults and the fields that depend on others filled in, checked for sense."""
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        defaults = {"robust": ROBUST_DEFAULTS, "frozen": FROZEN_DEFAULTS}.get(self.recipe, PAPER_DEFAULTS)
        values = asdict(self)
        for name, value in defaults.items():
            if values[name] is None:
                values[name] = value
        if values["weights"] is None:
            values["weights"] = "none" if values["arch"] == SMALL_ARCH else "imagenet"
        _check(values)
        default_layer = (
            SMALL_GRADCAM_LAYER if values["arch"] == SMALL_ARCH else ARCHITECTURES[values["arch"]].gradcam_layer
        )
        values["gradcam_layer"] = values["gradcam_layer"] or default_layer
        values["name"] = values["name"] or f"{values['arch']}-covid"
        values["version"] = values["version"] or utc_version()
        return ResolvedConfig(**values)


@dataclass(frozen=True)
class ResolvedConfig:
    """A TrainConfig with the recipe's defaults filled in and checked: what the recipes read.

    The same fields as TrainConfig (the manifest's "training" entry is this, as a dict), with no None
    left where the recipe gives a value: intensity None is preprocessing version 1, head_c and balance
    are the frozen recipe's only, feature_cache None is the default cache, finding/view None: no filter.
    """

    recipe: str
    arch: str
    weights: str
    input_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    rotation_degrees: float
    test_fraction: float
    seed: int
    group_by_patient: bool
    freeze_backbone: bool
    intensity: str | None
    working_size: int
    crop_fraction: float
    blur_sigma: float
    square: str
    lung_mask: bool
    augment_strength: float
    label_smoothing: float
    weight_decay: float
    val_fraction: float
    patience: int
    head_c: float | None
    balance: str | None
    feature_cache: str | None
    target_sensitivity: float
    indeterminate_width: float
    gradcam_layer: str
    name: str
    version: str
    finding: str | None
    view: str | None
    progress: bool = field(default=True, compare=False)


def _check(values: dict[str, Any]) -> None:
    """Refuse a configuration (TrainConfig's fields, the recipe's defaults filled in) that makes no sense."""
    arch, intensity, square = values["arch"], values["intensity"], values["square"]
    if arch not in ARCHITECTURES and arch != SMALL_ARCH:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {sorted([*ARCHITECTURES, SMALL_ARCH])}")
    if intensity is not None and intensity not in INTENSITY_METHODS:
        raise ConfigError(f"unknown intensity method {intensity!r}; choose one of {INTENSITY_METHODS}")
    if square not in SQUARE_METHODS:
        raise ConfigError(f"unknown square method {square!r}; choose one of {SQUARE_METHODS}")
    if square != "stretch" and intensity is None:
        raise ConfigError("--square centre_crop needs preprocessing version 3: set --intensity too")
    if values["lung_mask"] and intensity is None:
        raise ConfigError("--lung-mask needs preprocessing version 4: set --intensity too")
    if values["recipe"] == "frozen":
        _check_frozen(values)
    _check_numbers(values)


def _check_numbers(values: dict[str, Any]) -> None:
    if not 0.0 <= values["val_fraction"] < 0.5:
        raise ConfigError(f"validation fraction must be in [0, 0.5), got {values['val_fraction']}")
    if values["recipe"] == "robust" and values["val_fraction"] == 0:
        raise ConfigError("the robust recipe needs a validation split (--val-fraction > 0)")
    if not 0.0 < values["target_sensitivity"] <= 1.0:
        raise ConfigError(f"target sensitivity must be in (0, 1], got {values['target_sensitivity']}")
    if not 0.0 <= values["indeterminate_width"] < 1.0:
        raise ConfigError(f"indeterminate band width must be in [0, 1), got {values['indeterminate_width']}")
    if not 0.0 <= values["label_smoothing"] < 0.5:
        raise ConfigError(f"label smoothing must be in [0, 0.5), got {values['label_smoothing']}")
    for name in ("input_size", "epochs", "batch_size"):
        if values[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {values[name]}")
    if values["learning_rate"] <= 0:
        raise ConfigError(f"learning rate must be positive, got {values['learning_rate']}")
    if values["rotation_degrees"] < 0:
        raise ConfigError(f"rotation must be at least 0 degrees, got {values['rotation_degrees']}")
    if not 0.0 < values["test_fraction"] < 1.0:
        raise ConfigError(f"test fraction must be between 0 and 1, got {values['test_fraction']}")


def _check_frozen(values: dict[str, Any]) -> None:
    arch, weights = values["arch"], values["weights"]
    if weights not in PACKAGED_WEIGHTS or PACKAGED_WEIGHTS_ARCH[weights] != arch:
        raise ConfigError(
            f"the frozen recipe needs a packaged backbone ({sorted(PACKAGED_WEIGHTS)} for "
            f"{sorted(set(PACKAGED_WEIGHTS_ARCH.values()))}), got {arch} with {weights}"
        )
    if not values["freeze_backbone"]:
        raise ConfigError("the frozen recipe never trains the backbone: drop --fine-tune")
    if values["balance"] not in BALANCE_MODES:
        raise ConfigError(f"unknown balance {values['balance']!r}; choose one of {BALANCE_MODES}")
    if not (values["head_c"] or 0) > 0:
        raise ConfigError(f"--head-c must be positive, got {values['head_c']}")


@dataclass(frozen=True)
class BundleData:
    """Which images a bundle was trained on and how its test split was drawn, to draw them again.

    From the manifest's "training" and "dataset.split" entries; what an older manifest does not
    record is TrainConfig's default (the value its training run had).
    """

    finding: str | None
    view: str | None
    test_fraction: float
    seed: int
    group_by_patient: bool

    @classmethod
    def of(cls, manifest: Manifest) -> BundleData:
        """The bundle's data filters and test-split parameters."""
        defaults = TrainConfig()
        training = manifest.get("training", {})
        split = manifest.get("dataset", {}).get("split", {})
        return cls(
            finding=training.get("finding", defaults.finding),
            view=training.get("view", defaults.view),
            test_fraction=float(split.get("test_fraction", defaults.test_fraction)),
            seed=int(split.get("seed", defaults.seed)),
            group_by_patient=bool(split.get("group_by_patient", defaults.group_by_patient)),
        )

    def test_split(self, samples: Sequence[Sample]) -> list[Sample]:
        """The test part of `samples`, drawn as the training run drew it."""
        _, test = split_samples(
            samples, test_fraction=self.test_fraction, seed=self.seed, group_by_patient=self.group_by_patient
        )
        return test


def preprocessing_for(config: ResolvedConfig) -> dict[str, Any]:
    """The manifest's preprocessing entry: version 1 (the paper's) unless an intensity method is set."""
    if config.intensity is None:
        return dict(PREPROCESSING)
    return robust_preprocessing(
        intensity=config.intensity,
        working_size=config.working_size,
        crop_fraction=config.crop_fraction,
        blur_sigma=config.blur_sigma,
        square=config.square,
        lung_mask=bool(config.lung_mask),
    )
