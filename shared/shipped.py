"""What the package ships: the recommended model bundle and the sample of real films, found where lungcam is installed."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED_MODEL_NAME = "vgg16-hed-lungs"


def _asset(relative: str) -> Path:
    # An installed (or editable) package is a folder on disk; the bundle loader and the demo need real paths.
    return Path(str(files("shared") / "assets" / relative))


def shipped_model_dir() -> Path:
    """The folder of the shipped model bundle: what `lungcam demo` and `lungcam screen` use when LUNGCAM_MODELS is unset."""
    return _asset(f"models/{SHIPPED_MODEL_NAME}")


def sample_films_dir() -> Path:
    """The folder of shipped real films (covid/ and normal/, labels in manifest.csv) that `lungcam demo` screens."""
    return _asset("sample-films")
