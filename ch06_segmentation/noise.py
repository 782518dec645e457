"""Image noise models for training and testing a denoiser.

* Gaussian noise: every pixel value gets an independent N(0, stddev^2)
  offset (sensor read noise, roughly).
* Salt-and-pepper (impulse) noise: a fraction ``amount`` of the pixels is
  replaced by pure black or pure white (dead or stuck pixels, transmission
  errors). A median filter removes it well; a learned denoiser can learn to.

Both work on a batch [batch, H, W, C] in [0, 1], use stateless random ops with
an explicit seed (the same seed gives the same noise, in eager mode, in
``tf.data`` and in a ``tf.function``), and return values clipped to [0, 1].
Used by ``train_denoiser.py`` and the chapter notebook.
"""

from __future__ import annotations

import tensorflow as tf

NOISE_TYPES = ("gaussian", "salt_and_pepper", "mixed")


def _seed(seed):
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    return tf.cast(seed, tf.int64)


def add_gaussian_noise(images, stddev: float, seed):
    """images + N(0, stddev^2), clipped to [0, 1]. Shape preserved."""
    if stddev < 0:
        raise ValueError(f"stddev must be >= 0, got {stddev}")
    images = tf.convert_to_tensor(images, tf.float32)
    noise = tf.random.stateless_normal(tf.shape(images), _seed(seed), stddev=stddev)
    return tf.clip_by_value(images + noise, 0.0, 1.0)


def add_salt_and_pepper(images, amount: float, seed):
    """Set a fraction ``amount`` of the pixels (all channels together) to 0 or 1, half each."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    images = tf.convert_to_tensor(images, tf.float32)
    pixel_shape = tf.concat([tf.shape(images)[:-1], [1]], axis=0)  # [batch, H, W, 1]
    seeds = tf.random.experimental.stateless_split(_seed(seed), 2)
    hit = tf.random.stateless_uniform(pixel_shape, seeds[0]) < amount  # which pixels
    white = tf.random.stateless_uniform(pixel_shape, seeds[1]) < 0.5  # salt or pepper
    value = tf.cast(white, tf.float32)
    return tf.where(hit, value, images)


def add_noise(images, noise_type: str, seed, stddev: float = 0.1, amount: float = 0.05):
    """Gaussian, salt-and-pepper, or "mixed" (Gaussian then salt-and-pepper)."""
    if noise_type == "gaussian":
        return add_gaussian_noise(images, stddev, seed)
    if noise_type == "salt_and_pepper":
        return add_salt_and_pepper(images, amount, seed)
    if noise_type == "mixed":
        seeds = tf.random.experimental.stateless_split(_seed(seed), 2)
        return add_salt_and_pepper(add_gaussian_noise(images, stddev, seeds[0]), amount, seeds[1])
    raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
