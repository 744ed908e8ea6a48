"""The robust recipe's parts: a small CNN, photometric and geometric augmentation, and the fit loop.

Everything here works on in-memory float32 arrays already preprocessed the bundle's way, so
`trainer.train` and `benchmarks/leave_one_source_out.py` run exactly the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from shared.zoo import LOGITS_LAYER
from trainer.loading import to_float

SMALL_ARCH = "small"
SMALL_GRADCAM_LAYER = "block4_conv2"


def build_small_cnn(
    input_size: int,
    *,
    widths: Sequence[int] = (16, 32, 64, 128),
    dropout: float = 0.3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> keras.Model:
    """Four conv blocks (conv-BN-ReLU x2, max-pool), global average pooling, dropout, 2 logits, softmax.

    Standard Keras layers only, so any worker loads it; Grad-CAM reads `block4_conv2`, and the
    logits layer is named as the zoo's, so `shared.gradcam.GradCam` works unchanged.
    """
    regulariser = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = inputs
    for block, width in enumerate(widths, start=1):
        for conv in (1, 2):
            x = layers.Conv2D(
                width,
                3,
                padding="same",
                use_bias=False,
                kernel_regularizer=regulariser,
                kernel_initializer=keras.initializers.HeNormal(seed=seed + 10 * block + conv),
                name=f"block{block}_conv{conv}",
            )(x)
            # momentum 0.9: a few hundred steps must give usable moving statistics for validation.
            x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
        if block < len(widths):
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    logits = layers.Dense(2, kernel_regularizer=regulariser, name=LOGITS_LAYER)(x)
    probabilities = layers.Softmax(name="probabilities")(logits)
    return keras.Model(inputs, probabilities, name="lungcam_small")


def augment_batch(
    batch: tf.Tensor, seed: tf.Tensor, *, strength: float = 1.0, rotation_degrees: float = 10.0
) -> tf.Tensor:
    """Random resized crop, rotation, gamma, contrast, brightness, blur and noise on a [0,1] batch.

    Each image gets its own draw. Photometric changes mimic other scanners and pipelines; the crop
    and rotation vary framing and position, so borders and markers move around.
    """
    shape = tf.shape(batch)
    n, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 8)

    def uniform(index: int, low: float, high: float, dims: Any = None) -> tf.Tensor:
        return tf.random.stateless_uniform(dims if dims is not None else (n,), seeds[index], low, high)

    # Random resized crop: scale 0.70-1.0 of the side (times strength), aspect 0.85-1.18.
    scale = uniform(0, 1.0 - 0.30 * strength, 1.0)
    aspect = tf.exp(uniform(1, -0.16 * strength, 0.16 * strength))
    box_h = tf.minimum(scale * tf.sqrt(aspect), 1.0)
    box_w = tf.minimum(scale / tf.sqrt(aspect), 1.0)
    offsets = tf.random.stateless_uniform((n, 2), seeds[2], 0.0, 1.0)
    y1 = offsets[:, 0] * (1.0 - box_h)
    x1 = offsets[:, 1] * (1.0 - box_w)
    boxes = tf.stack([y1, x1, y1 + box_h, x1 + box_w], axis=1)
    batch = tf.image.crop_and_resize(batch, boxes, tf.range(n), tf.stack([height, width]))
    if rotation_degrees > 0:
        angles = uniform(3, -rotation_degrees, rotation_degrees) * (math.pi / 180.0)
        batch = _rotate(batch, angles)
    # Gamma 0.7-1.4, contrast 0.75-1.25 around the mean, brightness +-0.08.
    gamma = tf.exp(uniform(4, -0.35 * strength, 0.35 * strength))[:, None, None, None]
    batch = tf.pow(tf.clip_by_value(batch, 1e-6, 1.0), gamma)
    contrast = uniform(5, 1.0 - 0.25 * strength, 1.0 + 0.25 * strength, (n, 2))
    mean = tf.reduce_mean(batch, axis=(1, 2, 3), keepdims=True)
    batch = (batch - mean) * contrast[:, 0, None, None, None] + mean + 0.16 * (contrast[:, 1, None, None, None] - 1.0)
    # Blur (sigma 0-1.2 px) on about half the batch, then Gaussian noise (sigma 0-0.03).
    blur_sigma = tf.maximum(uniform(6, -1.2 * strength, 1.2 * strength), 0.0)
    batch = _gaussian_blur(batch, blur_sigma)
    noise = tf.random.stateless_normal(shape, seeds[7]) * uniform(7, 0.0, 0.03 * strength)[:, None, None, None]
    return tf.clip_by_value(batch + noise, 0.0, 1.0)


def _rotate(batch: tf.Tensor, angles: tf.Tensor) -> tf.Tensor:
    """Rotate each image about its centre, nearest fill (as the paper's ImageDataGenerator)."""
    height = tf.cast(tf.shape(batch)[1], tf.float32)
    width = tf.cast(tf.shape(batch)[2], tf.float32)
    cos, sin = tf.cos(angles), tf.sin(angles)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Projective transform mapping output to input coordinates.
    transforms = tf.stack(
        [
            cos,
            -sin,
            cx - cos * cx + sin * cy,
            sin,
            cos,
            cy - sin * cx - cos * cy,
            tf.zeros_like(cos),
            tf.zeros_like(cos),
        ],
        axis=1,
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=batch,
        transforms=transforms,
        output_shape=tf.shape(batch)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )


def _gaussian_blur(batch: tf.Tensor, sigmas: tf.Tensor) -> tf.Tensor:
    """Per-image Gaussian blur with a 5x5 kernel; sigma 0 leaves the image unchanged."""
    taps = tf.constant([-2.0, -1.0, 0.0, 1.0, 2.0])
    safe = tf.maximum(sigmas, 1e-3)[:, None]
    kernel_1d = tf.exp(-(taps[None, :] ** 2) / (2.0 * safe**2))
    kernel_1d = kernel_1d / tf.reduce_sum(kernel_1d, axis=1, keepdims=True)  # (n, 5)
    # Separable blur, per image: move the batch into channels for one depthwise convolution.
    stacked = tf.transpose(batch, (3, 1, 2, 0))  # (c, h, w, n)
    horizontal = tf.transpose(kernel_1d)[None, :, :, None]  # (1, 5, n, 1)
    vertical = tf.transpose(kernel_1d)[:, None, :, None]  # (5, 1, n, 1)
    out = tf.nn.depthwise_conv2d(stacked, horizontal, strides=(1, 1, 1, 1), padding="SAME")
    out = tf.nn.depthwise_conv2d(out, vertical, strides=(1, 1, 1, 1), padding="SAME")
    return tf.transpose(out, (3, 1, 2, 0))


def augmented_dataset(
    images: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    strength: float,
    rotation_degrees: float,
    sample_weights: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Shuffled, augmented [0,1] batches (with per-sample weights when given) from float32 [0,1] (or uint8) images."""
    height, width, channels = images.shape[1:]
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    weights = np.ones(len(images), np.float32) if sample_weights is None else sample_weights.astype(np.float32)

    def _gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return images[indices], targets[indices], weights[indices]

    def _fetch(step: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        batch, labels, w = tf.numpy_function(_gather, [indices], (tf.as_dtype(images.dtype), tf.float32, tf.float32))
        batch.set_shape((None, height, width, channels))
        labels.set_shape((None, targets.shape[1]))
        w.set_shape((None,))
        floats = tf.cast(batch, tf.float32) / scale
        if strength > 0 or rotation_degrees > 0:
            floats = augment_batch(
                floats, tf.stack([tf.cast(seed, tf.int64), step]), strength=strength, rotation_degrees=rotation_degrees
            )
        return floats, labels, w

    dataset = tf.data.Dataset.range(len(images)).shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = (
        dataset.batch(batch_size)
        .enumerate()
        .map(
            lambda step, idx: _fetch(step + tf.random.uniform((), 0, 2**31 - 1, dtype=tf.int64, seed=seed), idx),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def balanced_sample_weights(labels01: np.ndarray) -> np.ndarray:
    """Weights that give each class the same total weight (mean weight 1)."""
    labels01 = np.asarray(labels01, dtype=int)
    counts = np.bincount(labels01, minlength=2).astype(np.float64)
    per_class = len(labels01) / (2.0 * np.maximum(counts, 1.0))
    return per_class[labels01].astype(np.float32)


def compile_robust(
    model: keras.Model, *, learning_rate: float, weight_decay: float, label_smoothing: float, total_steps: int
) -> None:
    """AdamW with cosine decay, categorical cross-entropy with label smoothing, accuracy and AUC."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps), alpha=0.05)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )


def fit_robust(
    model: keras.Model,
    train_images: np.ndarray,
    train_targets: np.ndarray,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    label_smoothing: float,
    patience: int,
    seed: int,
    augment_strength: float,
    rotation_degrees: float,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> keras.callbacks.History:
    """Class-balanced, augmented training with early stopping on the validation loss (best weights kept)."""
    steps = math.ceil(len(train_images) / batch_size)
    compile_robust(
        model,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        total_steps=steps * epochs,
    )
    labels01 = (train_targets[:, 0] > 0.5).astype(int)  # column 0 is covid
    train_data = augmented_dataset(
        train_images,
        train_targets,
        batch_size,
        seed=seed,
        strength=augment_strength,
        rotation_degrees=rotation_degrees,
        sample_weights=balanced_sample_weights(labels01),
    )
    val_floats = to_float(val_images)
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True, start_from_epoch=1
    )
    return model.fit(
        train_data,
        validation_data=(val_floats, val_targets),
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[stop, *callbacks],
    )
