"""Batched Grad-CAM: probabilities and one heat map per image from one compiled pass."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from shared.zoo import LOGITS_LAYER


class GradCam:
    """Class probabilities and Grad-CAM maps for a whole batch in one forward+backward pass.

    Selvaraju et al.: the channel weights are the spatial mean, per image, of the gradient of the
    predicted class's pre-softmax score with respect to the target layer's activations. Images in
    a batch are independent at inference (no dropout, frozen batch statistics), so the gradient of
    the *sum* of the per-image scores gives every image its own gradient in a single backward pass.
    """

    def __init__(
        self,
        model: keras.Model,
        layer_name: str,
        *,
        logits_layer: str = LOGITS_LAYER,
        positive_gradients_only: bool = False,
        smoothing_cells: float = 0.0,
    ):
        self.model = model
        self.layer_name = layer_name
        self.positive_gradients_only = positive_gradients_only
        # A Gaussian (sigma in map cells) over each map before it is normalised: a frozen backbone's
        # maps are speckled cell to cell, and the smoothed peak lands inside the lesion more often
        # (benchmarks/gradcam_localisation.py).
        self._smoothing = _gaussian_kernel(smoothing_cells) if smoothing_cells > 0 else None
        self._cam_model = keras.Model(
            model.inputs,
            [model.get_layer(layer_name).output, model.get_layer(logits_layer).output, model.output],
        )
        height, width, channels = model.input_shape[1:]
        self._compiled = tf.function(
            self._probabilities_and_maps,
            input_signature=[tf.TensorSpec((None, height, width, channels), tf.float32)],
            reduce_retracing=True,
        )

    def _probabilities_and_maps(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            activations, logits, probabilities = self._cam_model(images, training=False)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            score = tf.gather(logits, predicted, axis=1, batch_dims=1)
            total = tf.reduce_sum(score)
        gradients = tape.gradient(total, activations)
        if self.positive_gradients_only:
            # The paper's code (guided variant): keep gradients where both they and the activations are positive.
            mask = tf.cast(activations > 0, gradients.dtype) * tf.cast(gradients > 0, gradients.dtype)
            gradients = gradients * mask
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cams = tf.nn.relu(tf.reduce_sum(activations * channel_weights, axis=-1))
        if self._smoothing is not None:
            cams = tf.nn.conv2d(cams[..., None], self._smoothing, strides=1, padding="SAME")[..., 0]
        peak = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
        cams = tf.math.divide_no_nan(cams, peak)
        return probabilities, cams

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (probabilities N x classes, maps N x h x w in [0,1]) for a float32 batch in [0,1]."""
        batch = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
        probabilities, cams = self._compiled(batch)
        return probabilities.numpy(), cams.numpy()

    def warm_up(self, batch_size: int = 1) -> None:
        """Trace and run the compiled pass once so the first real batch pays no compile cost."""
        height, width, channels = self.model.input_shape[1:]
        self(np.zeros((batch_size, height, width, channels), np.float32))


def _gaussian_kernel(sigma: float) -> tf.Tensor:
    """A normalised 2-D Gaussian (radius 2 sigma, at least 1) as a conv2d filter h x w x 1 x 1."""
    radius = max(1, int(round(2 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    line = np.exp(-(taps**2) / (2 * sigma**2))
    kernel = np.outer(line, line)
    return tf.constant((kernel / kernel.sum())[:, :, None, None], tf.float32)


def peak_location(cam: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of a map's maximum, scaled to an image of `shape` (cell centre)."""
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    scale_r, scale_c = shape[0] / cam.shape[0], shape[1] / cam.shape[1]
    return int((row + 0.5) * scale_r), int((col + 0.5) * scale_c)
