"""Test-time augmentation (TTA): average a classifier's softmax over flipped and rescaled views.

What this file teaches: a trained classifier is not invariant to a mirror image or a small zoom,
so evaluating it on several transformed copies of each test image and averaging its class
probabilities smooths out its mistakes, for the price of one forward pass per view.

Papers:
* VGG, Simonyan & Zisserman, 2015, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition": sec. 3.2 (testing: the test set is augmented by horizontal flips and "the soft-max
  class posteriors of the original and flipped images are averaged") and sec. 4.2 (multi-scale
  evaluation: the test image is rescaled to Q = {S - 32, S, S + 32} for a model trained at a fixed
  S and the class posteriors are averaged). For S = 256 that is Q / S = (0.875, 1, 1.125):
  ``VGG_TEST_SCALES``.
* AlexNet, Krizhevsky, Sutskever & Hinton, 2012, sec. 4.1: ten patches per test image (four
  corners and the centre, and their mirrors), softmax averaged.

What a view is here: the image magnified by ``scale`` (bilinear) and then centre-cropped
(scale > 1) or padded with a constant grey ``fill_value`` (scale < 1) back to the model's input
size, optionally mirrored left-right. The zoom is one ``common.augment.crop_and_resize_batch`` call
with a window of side 1 / scale centred on the image (so scale 1 at the model's input size is the
image itself, exactly). VGG instead ran its fully-convolutional network densely over the whole
rescaled image; the zoo's networks take a fixed input size, so we crop or pad: one central crop per
scale, the "multi-crop" flavour. Flips only make sense when a mirrored image keeps its label
(shapes, cats; not digits or text), the same rule as the training flips.

Use (CPU is fine; the cost is one prediction per view, 6 with the defaults):

    from ch04_classification.tta import predict_tta, evaluate_tta
    probabilities = predict_tta(model, images)                 # [N, num_classes]
    evaluate_tta(model, validation_batches)                    # {"accuracy", "tta_accuracy", ...}
    evaluate_tta(model, (images, labels), flips=False, scales=(0.9, 1.0, 1.1))

Tests: python -m pytest -q tests/test_ch04_tta.py
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from common import augment
from ch04_classification.trainer import split_outputs

# VGG sec. 4.2: Q = {S - 32, S, S + 32} with S = 256, relative to S.
VGG_TEST_SCALES = (224.0 / 256.0, 1.0, 288.0 / 256.0)


def _check_views(flips, scales):
    scales = tuple(float(scale) for scale in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    return bool(flips), scales


def _model_input_size(model, images):
    """(height, width) the model takes: its static input size, else that of the images."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):  # a subclassed model (e.g. ClassifierTrainer) has none
        shape = None
    if isinstance(shape, list):  # a model with several inputs: the first is the image
        shape = shape[0]
    if shape is not None and len(shape) == 4 and shape[1] is not None and shape[2] is not None:
        return int(shape[1]), int(shape[2])
    return int(images.shape[1]), int(images.shape[2])


def zoom_view(images, scale: float, output_size=None, fill_value: float = 0.5) -> tf.Tensor:
    """Magnify by ``scale`` about the centre, then centre-crop / pad to ``output_size``.

    Args:
      images: float32 [B, H, W, C] in [0, 1].
      scale: > 1 zooms in (the border is cut off), < 1 zooms out (a ``fill_value`` frame).
      output_size: (height, width) of the result; default (H, W).

    Returns:
      float32 [B, height, width, C]. scale 1 at the input size returns the images unchanged.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    half = 0.5 / float(scale)  # half the side of the window, in normalized coordinates
    window = tf.constant([[0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half]], tf.float32)
    windows = tf.tile(window, [tf.shape(images)[0], 1])  # [B, 4]
    return augment.crop_and_resize_batch({"image": images}, windows, output_size=output_size,
                                         fill_value=fill_value)["image"]


def tta_views(images, flips: bool = True, scales=VGG_TEST_SCALES, output_size=None,
              fill_value: float = 0.5) -> list:
    """The transformed copies that ``predict_tta`` averages over, for pictures and checks.

    Returns:
      A list of (name, images [B, height, width, C]) in the order scale-major, unflipped before
      flipped, e.g. ``("scale 0.875", ...), ("scale 0.875 flipped", ...), ...``.
    """
    flips, scales = _check_views(flips, scales)
    views = []
    for scale in scales:
        zoomed = zoom_view(images, scale, output_size, fill_value)
        views.append((f"scale {scale:g}", zoomed))
        if flips:
            views.append((f"scale {scale:g} flipped", tf.reverse(zoomed, axis=[2])))
    return views


def _probabilities(model, images, from_logits):
    outputs, _ = split_outputs(model.predict_on_batch(images))
    outputs = np.asarray(outputs, np.float64)
    if from_logits:
        outputs = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
        outputs /= outputs.sum(axis=-1, keepdims=True)
    return outputs


def _batch_view_probabilities(model, images, flips, scales, from_logits, fill_value):
    """Softmax of every view of one batch: [num_views, B, num_classes]."""
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4:
        raise ValueError(f"images must be [N, height, width, channels], got shape {images.shape}")
    output_size = _model_input_size(model, images)
    return np.stack([_probabilities(model, view, from_logits)
                     for _, view in tta_views(images, flips, scales, output_size, fill_value)])


def predict_tta(model, images, flips: bool = True, scales=VGG_TEST_SCALES, batch_size: int = 64,
                from_logits: bool = False, fill_value: float = 0.5) -> np.ndarray:
    """Class probabilities averaged over flipped and rescaled views (VGG sec. 3.2 and 4.2).

    For each scale s in ``scales`` the images are magnified by s and centre-cropped or padded back
    to the model's input size (``zoom_view``); with ``flips`` each such view is also mirrored
    left-right. The model's softmax outputs are averaged over the ``len(scales) * (2 if flips
    else 1)`` views. ``flips=False, scales=(1.0,)`` is the plain prediction (``model.predict``) when
    the images have the model's input size.

    Args:
      model: a Keras classifier; its (main) output is [N, num_classes] probabilities, or logits
        with ``from_logits=True`` (a softmax is applied before averaging). Networks with auxiliary
        outputs (a dict with "predictions", or a list) are read through their main output.
      images: float32 [N, H, W, C] (NumPy or tensor). Images of another size than the model's
        input are resized to it (at scale 1) as part of every view.
      batch_size: images per forward pass (each view of a batch is one pass).
      fill_value: the grey around an image that is zoomed out (scale < 1).

    Returns:
      float64 NumPy [N, num_classes]: the mean probabilities (rows sum to 1).
    """
    flips, scales = _check_views(flips, scales)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty [N, height, width, channels], "
                         f"got {images.shape}")
    means = [_batch_view_probabilities(model, images[start:start + int(batch_size)], flips, scales,
                                       from_logits, fill_value).mean(axis=0)
             for start in range(0, len(images), int(batch_size))]
    return np.concatenate(means)


def _batches(data, labels, batch_size):
    """(images [B, H, W, C], labels [B]) NumPy batches from arrays or a tf.data.Dataset."""
    if labels is not None:
        if isinstance(data, tf.data.Dataset):
            raise ValueError("labels must be None when data is a tf.data.Dataset (it has its own)")
        data = (data, labels)
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if isinstance(spec, dict):
            if "image" not in spec or "label" not in spec:
                raise ValueError("a dataset of dicts needs 'image' and 'label' keys, "
                                 f"got {sorted(spec)}")
            data = data.map(lambda example: (example["image"], example["label"]))
            spec = data.element_spec
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError("the dataset must give (image, label) pairs or {'image', 'label'} "
                             f"dicts, got element_spec {spec}")
        if spec[0].shape.rank == 3:  # unbatched
            data = data.batch(batch_size)
        for images, batch_labels in data:
            yield np.asarray(images, np.float32), np.asarray(batch_labels)
        return
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("data must be a tf.data.Dataset of (image, label) or an (images, labels) "
                         f"pair of arrays, got {type(data).__name__}")
    images, all_labels = np.asarray(data[0], np.float32), np.asarray(data[1])
    if len(images) != len(all_labels):
        raise ValueError(f"images and labels differ in length: {len(images)} and {len(all_labels)}")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], all_labels[start:start + batch_size]


def evaluate_tta(model, data, labels=None, flips: bool = True, scales=VGG_TEST_SCALES,
                 batch_size: int = 64, from_logits: bool = False, fill_value: float = 0.5) -> dict:
    """Top-1 accuracy without and with test-time augmentation, in one pass over the data.

    Args:
      model: as in ``predict_tta``.
      data: a tf.data.Dataset of (image, label) pairs or {"image", "label"} dicts, batched or not;
        or an (images [N, H, W, C], labels [N]) pair of arrays; or the images, with ``labels``.
      labels: integer class ids [N] (or one-hot [N, num_classes]) when ``data`` is the images.
      flips, scales, batch_size, from_logits, fill_value: as in ``predict_tta``.

    Returns:
      {"accuracy": plain top-1 (the images at the model's input size, unflipped),
       "tta_accuracy": top-1 of the averaged probabilities, "num_examples": N,
       "num_views": views per image, "scales": [...], "flips": bool}.
    """
    flips, scales = _check_views(flips, scales)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # The plain prediction is the unflipped scale-1 view: reuse it when it is one of the views.
    identity_index = 2 * scales.index(1.0) if flips and 1.0 in scales else (
        scales.index(1.0) if 1.0 in scales else None)
    count = plain_correct = tta_correct = 0
    for images, batch_labels in _batches(data, labels, int(batch_size)):
        if batch_labels.ndim == 2:
            batch_labels = batch_labels.argmax(axis=-1)
        batch_labels = batch_labels.reshape(-1).astype(np.int64)
        views = _batch_view_probabilities(model, images, flips, scales, from_logits, fill_value)
        plain = views[identity_index] if identity_index is not None else \
            _batch_view_probabilities(model, images, False, (1.0,), from_logits, fill_value)[0]
        plain_correct += int((plain.argmax(axis=-1) == batch_labels).sum())
        tta_correct += int((views.mean(axis=0).argmax(axis=-1) == batch_labels).sum())
        count += len(batch_labels)
    if count == 0:
        raise ValueError("data has no examples")
    return {"accuracy": plain_correct / count, "tta_accuracy": tta_correct / count,
            "num_examples": count, "num_views": len(scales) * (2 if flips else 1),
            "scales": list(scales), "flips": flips}
