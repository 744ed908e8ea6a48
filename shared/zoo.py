"""The model zoo: VGG16, DenseNet121 and ResNet50 backbones with the paper's classification head."""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
from keras import layers

from shared.errors import LungcamError

CLASS_NAMES: tuple[str, ...] = ("covid", "normal")
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
class BackboneInputScaling(layers.Layer):
    """Maps RGB in [0,1] to what an ImageNet backbone expects, inside the model.

    Keeping this in the graph means a bundle is always fed the same [0,1] RGB tensor
    and the saved model alone says how to normalise, whatever the backbone.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch"):
            raise ValueError(f"unknown input scaling mode {mode!r}")
        self.mode = mode

    def call(self, inputs):
        if self.mode == "caffe":
            bgr = keras.ops.flip(inputs, axis=-1) * 255.0
            return bgr - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=inputs.dtype)
        mean = keras.ops.convert_to_tensor(_TORCH_MEAN, dtype=inputs.dtype)
        std = keras.ops.convert_to_tensor(_TORCH_STD, dtype=inputs.dtype)
        return (inputs - mean) / std

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def resolve_weights(weights: str | None) -> str | None:
    """Normalise a weights argument: "imagenet", None/"none", or an existing local file."""
    if weights is None or str(weights).lower() in ("none", "random", ""):
        return None
    if weights == "imagenet":
        return "imagenet"
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights} (use 'imagenet', 'none' or a local .h5/.weights.h5 file)")
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
    air-gapped network), None for random initialisation, or a path to a local weights file.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    inputs = keras.Input((input_size, input_size, 3), name="image")
    scaled = BackboneInputScaling(spec.input_scaling, name=INPUT_SCALING_LAYER)(inputs)
    # input_tensor= inlines the backbone's layers into this graph, so the Grad-CAM layer is
    # reachable with get_layer() and one functional model serves both outputs.
    resolved = resolve_weights(weights)
    try:
        backbone = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=resolved, input_tensor=scaled
        )
    except Exception as exc:
        if resolved != "imagenet":
            raise
        raise WeightsUnavailableError(
            f"could not load ImageNet weights for {arch} ({type(exc).__name__}: {exc}). On a network "
            "without internet access, copy the Keras 'notop' weights file into ~/.keras/models/ "
            "(or $KERAS_HOME/models/) or pass its path as the weights argument."
        ) from exc
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
