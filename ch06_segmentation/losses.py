"""Losses and metrics for dense prediction: segmentation and denoising.

This file teaches how to score an output that has one value per pixel:

* ``SparseCrossEntropyIgnore``: per-pixel cross-entropy that skips pixels
  labelled 255 ("ignore", e.g. the object borders of PASCAL VOC and the
  Oxford pets trimaps), averaged over the pixels that count.
* ``WeightedSparseCrossEntropy``: the same with one weight per class, so rare
  classes count more; ``median_frequency_weights`` gives the weights of
  Eigen & Fergus 2015 ("Predicting depth, surface normals and semantic labels
  with a common multi-scale convolutional architecture", sec. 4.3).
* ``SoftDiceLoss``: 1 - Dice coefficient of the softmax probabilities, the
  overlap loss of Milletari, Navab & Ahmadi 2016 ("V-Net", sec. 3), which
  does not care how many background pixels there are.
* ``MeanIoU`` and ``PixelAccuracy`` metrics from a confusion matrix, both
  skipping ignored pixels (the PASCAL VOC / FCN evaluation, Long et al. 2015,
  sec. 5), with optional sample weights. The matrix is counted in one pass
  (``confusion_matrix``), and the two metrics share it inside a compiled
  step. ``tests/test_ch06_losses.py`` checks ``MeanIoU`` against
  ``keras.metrics.MeanIoU`` and ``PixelAccuracy`` against NumPy.
* ``psnr`` and ``ssim`` for denoising (SSIM: Wang, Bovik, Sheikh & Simoncelli
  2004, "Image quality assessment: from error visibility to structural
  similarity"), checked against ``tf.image.psnr`` / ``tf.image.ssim``.
* ``validate_segmentation_example``: clear ``ValueError`` for masks whose
  size differs from the image and for labels outside [0, num_classes) other
  than the ignore label.

Run the tests: ``python -m pytest -q tests/test_ch06_losses.py``.
"""

from __future__ import annotations

import numpy as np
import keras
import tensorflow as tf

PACKAGE = "ch06_segmentation"
IGNORE_LABEL = 255  # docs/design.md: semantic masks use 255 for "do not score this pixel"


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def validate_mask_values(mask, num_classes: int, ignore_label: int = IGNORE_LABEL, name: str = "mask"):
    """ValueError unless every value of ``mask`` is in [0, num_classes) or ``ignore_label``.

    Works on NumPy arrays and eager tensors (it reads the values).
    """
    values = np.asarray(mask)
    if values.size == 0:
        return
    bad = (values < 0) | ((values >= num_classes) & (values != ignore_label))
    if bad.any():
        offending = np.unique(values[bad])[:10].tolist()
        raise ValueError(
            f"{name} values must be class ids in [0, {num_classes - 1}] or the ignore label "
            f"{ignore_label}; found {offending}. Check num_classes (= {num_classes}) or remap the labels.")


def validate_segmentation_example(image, mask, num_classes: int, ignore_label: int = IGNORE_LABEL,
                                  source: str | None = None):
    """ValueError unless ``mask`` [..., H, W] matches ``image`` [..., H, W, C] and has valid labels.

    ``source`` (a file name, or e.g. "validation example 12") starts every
    message, so the user knows which example to fix. Own folders loaded with
    ``common.data.load`` are already checked file by file as they are read.
    """
    prefix = f"{source}: " if source else ""
    image_shape = tuple(np.shape(image))
    mask_shape = tuple(np.shape(mask))
    if len(image_shape) not in (3, 4):
        raise ValueError(f"{prefix}image must be [H, W, C] or [batch, H, W, C], got shape "
                         f"{image_shape}")
    if mask_shape != image_shape[:-1]:
        raise ValueError(
            f"{prefix}mask must have the image's height and width: image {image_shape} needs "
            f"mask {image_shape[:-1]}, got {mask_shape}. Resize the mask with nearest-neighbour "
            "interpolation, never bilinear.")
    validate_mask_values(mask, num_classes, ignore_label, name=f"{prefix}mask")


def _check_logits_and_labels(y_true, y_pred):
    """Static shape check: labels [batch, H, W] (or [..., 1]) against logits [batch, H, W, classes]."""
    true_shape = tuple(y_true.shape)
    pred_shape = tuple(y_pred.shape)
    if len(true_shape) == len(pred_shape) and true_shape[-1] == 1:
        true_shape = true_shape[:-1]
    if len(true_shape) != len(pred_shape) - 1 or any(
            t is not None and p is not None and t != p for t, p in zip(true_shape, pred_shape[:-1])):
        raise ValueError(
            f"y_true must be a mask [batch, H, W] matching y_pred [batch, H, W, num_classes]; "
            f"got y_true {tuple(y_true.shape)} and y_pred {pred_shape}")


def _flatten_valid(y_true, y_pred, ignore_label, num_classes=None):
    """Labels [P] and scores [P, classes] of the pixels that are not ignored."""
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.convert_to_tensor(y_true)
    _check_logits_and_labels(y_true, y_pred)
    num_classes = num_classes or y_pred.shape[-1]
    labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])  # [P]
    scores = tf.reshape(y_pred, [-1, tf.shape(y_pred)[-1]])  # [P, classes]
    if tf.executing_eagerly():
        validate_mask_values(labels.numpy(), num_classes, ignore_label, name="y_true")
    valid = tf.not_equal(labels, ignore_label)
    return labels, scores, valid


def _pixel_terms(y_true, y_pred, ignore_label, from_logits):
    """What cross-entropy and Dice share, computed once: truth, log-probabilities, probabilities.

    Returns ``truth`` [P, classes], the one-hot true class of each pixel (all
    zeros for an ignored pixel, so it counts nowhere); ``log_probabilities``
    [P, classes]; ``probabilities`` [P, classes], zero for ignored pixels.
    Ignored pixels get a stand-in label 0 and zero weight instead of being
    dropped with ``boolean_mask``, so shapes stay static and the losses also
    compile with XLA. The cross-entropy is ``-sum(truth * log_probabilities)``;
    with the truth one-hot already there for Dice, this costs less than
    ``tf.nn.sparse_softmax_cross_entropy_with_logits`` next to a second softmax
    for Dice (bench/RESULTS.md, "U-Net training step").
    """
    labels, scores, valid = _flatten_valid(y_true, y_pred, ignore_label)
    counted = tf.cast(valid, scores.dtype)[:, None]  # [P, 1]: 1 for pixels that count
    truth = tf.one_hot(tf.where(valid, labels, 0), scores.shape[-1], dtype=scores.dtype) * counted
    if from_logits:
        log_probabilities = tf.nn.log_softmax(scores, axis=-1)  # [P, classes]
        probabilities = tf.exp(log_probabilities)
    else:
        log_probabilities = tf.math.log(tf.clip_by_value(scores, 1e-7, 1.0))
        probabilities = scores
    return truth, log_probabilities, probabilities * counted


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package=PACKAGE)
class SparseCrossEntropyIgnore(keras.losses.Loss):
    """Per-pixel softmax cross-entropy that skips the ignore label.

    Inputs: ``y_true`` int [batch, H, W] with values in [0, classes) or
    ``ignore_label``; ``y_pred`` [batch, H, W, classes], logits (default) or
    probabilities. Output: scalar, the mean over the pixels that are not
    ignored (0 when every pixel is ignored), as in FCN's training
    (Long et al. 2015, sec. 4.3).

    Optional ``class_weights`` [classes] multiply each pixel's loss by the
    weight of its true class; the mean is then a weighted mean (divided by
    the sum of the weights), so the loss scale does not depend on them.
    """

    def __init__(self, from_logits=True, ignore_label=IGNORE_LABEL, class_weights=None,
                 name="sparse_ce_ignore", **kwargs):
        kwargs.setdefault("reduction", "sum_over_batch_size")
        super().__init__(name=name, **kwargs)
        self.from_logits = from_logits
        self.ignore_label = int(ignore_label)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def call(self, y_true, y_pred):
        return self.from_pixel_terms(*_pixel_terms(y_true, y_pred, self.ignore_label, self.from_logits))

    def from_pixel_terms(self, truth, log_probabilities, probabilities):
        """The loss from ``_pixel_terms``' outputs (``CrossEntropyPlusDice`` shares them)."""
        del probabilities  # cross-entropy needs only the log-probabilities
        if self.class_weights is not None:
            if len(self.class_weights) != truth.shape[-1]:
                raise ValueError(f"class_weights must have one entry per class ({truth.shape[-1]}), "
                                 f"got {len(self.class_weights)}")
            # Each pixel's one-hot row now holds the weight of its true class.
            truth = truth * tf.constant(self.class_weights, truth.dtype)  # [P, classes]
        total = -tf.reduce_sum(truth * log_probabilities)
        # The (weighted) mean over counted pixels, returned once for the whole batch.
        return tf.math.divide_no_nan(total, tf.reduce_sum(truth))[None]

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, ignore_label=self.ignore_label,
                      class_weights=self.class_weights)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedSparseCrossEntropy(SparseCrossEntropyIgnore):
    """Class-weighted per-pixel cross-entropy (ignores label 255).

    ``class_weights`` [classes] is required; see ``median_frequency_weights``.
    Shapes as ``SparseCrossEntropyIgnore``.
    """

    def __init__(self, class_weights, from_logits=True, ignore_label=IGNORE_LABEL,
                 name="weighted_sparse_ce", **kwargs):
        if class_weights is None or len(class_weights) == 0:
            raise ValueError("class_weights must be a non-empty list of per-class weights")
        if any(float(w) < 0 for w in class_weights):
            raise ValueError(f"class_weights must be >= 0, got {list(class_weights)}")
        super().__init__(from_logits=from_logits, ignore_label=ignore_label,
                         class_weights=class_weights, name=name, **kwargs)


def class_frequencies(masks, num_classes: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Fraction of (non-ignored) pixels of each class, [num_classes]."""
    values = np.asarray(masks).ravel()
    validate_mask_values(values, num_classes, ignore_label, name="masks")
    values = values[values != ignore_label]
    counts = np.bincount(values, minlength=num_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def median_frequency_weights(masks, num_classes: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015, sec. 4.3).

    weight_c = median(freq) / freq_c, so a class at the median frequency gets
    weight 1, rarer classes more. Absent classes get weight 0 (nothing to
    weight). Returns float32 [num_classes].
    """
    frequencies = class_frequencies(masks, num_classes, ignore_label)
    present = frequencies > 0
    weights = np.zeros(num_classes)
    if present.any():
        weights[present] = np.median(frequencies[present]) / frequencies[present]
    return weights.astype(np.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SoftDiceLoss(keras.losses.Loss):
    """Soft (differentiable) multi-class Dice loss (Milletari et al. 2016, eq. 1).

    For each class c, with p the softmax probability and g the one-hot
    truth over all non-ignored pixels of the batch:

        dice_c = (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)

    and the loss is 1 - mean_c dice_c. Each class counts equally whatever its
    pixel count, which is why Dice copes with class imbalance. ``smooth``
    keeps the ratio defined for a class absent from both prediction and
    truth (its dice is then 1). ``include_background=False`` averages over
    classes 1.. only.

    Inputs: ``y_true`` int [batch, H, W]; ``y_pred`` [batch, H, W, classes]
    logits (default) or probabilities. Output: scalar in [0, 1].
    """

    def __init__(self, from_logits=True, smooth=1.0, ignore_label=IGNORE_LABEL,
                 include_background=True, name="soft_dice", **kwargs):
        kwargs.setdefault("reduction", "sum_over_batch_size")
        super().__init__(name=name, **kwargs)
        self.from_logits = from_logits
        self.smooth = float(smooth)
        self.ignore_label = int(ignore_label)
        self.include_background = include_background

    def call(self, y_true, y_pred):
        return self.from_pixel_terms(*_pixel_terms(y_true, y_pred, self.ignore_label, self.from_logits))

    def from_pixel_terms(self, truth, log_probabilities, probabilities):
        """The loss from ``_pixel_terms``' outputs (ignored pixels are zero in both)."""
        del log_probabilities  # Dice needs only the probabilities
        intersection = tf.reduce_sum(probabilities * truth, axis=0)  # [classes]
        sizes = tf.reduce_sum(probabilities, axis=0) + tf.reduce_sum(truth, axis=0)  # [classes]
        dice = (2.0 * intersection + self.smooth) / (sizes + self.smooth)  # [classes]
        if not self.include_background:
            dice = dice[1:]
        return (1.0 - tf.reduce_mean(dice))[None]

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, smooth=self.smooth,
                      ignore_label=self.ignore_label, include_background=self.include_background)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class CrossEntropyPlusDice(keras.losses.Loss):
    """Sum of ``SparseCrossEntropyIgnore`` and ``dice_weight * SoftDiceLoss``.

    A common compromise: cross-entropy gives sharp per-pixel gradients, Dice
    keeps small classes from being swamped. Shapes as the two parts.
    """

    def __init__(self, dice_weight=1.0, ignore_label=IGNORE_LABEL, name="ce_plus_dice", **kwargs):
        kwargs.setdefault("reduction", "sum_over_batch_size")
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self.ignore_label = int(ignore_label)
        self.cross_entropy = SparseCrossEntropyIgnore(ignore_label=ignore_label)
        self.dice = SoftDiceLoss(ignore_label=ignore_label)

    def call(self, y_true, y_pred):
        # One softmax and one one-hot truth serve both parts.
        terms = _pixel_terms(y_true, y_pred, self.ignore_label, from_logits=True)
        return (self.cross_entropy.from_pixel_terms(*terms)
                + self.dice_weight * self.dice.from_pixel_terms(*terms))

    def get_config(self):
        config = super().get_config()
        config.update(dice_weight=self.dice_weight, ignore_label=self.ignore_label)
        return config


def get_loss(name: str, num_classes: int, class_weights=None):
    """Loss by name: "ce", "weighted_ce", "dice", "ce+dice"."""
    if name == "ce":
        return SparseCrossEntropyIgnore()
    if name == "weighted_ce":
        return WeightedSparseCrossEntropy(class_weights if class_weights is not None
                                          else [1.0] * num_classes)
    if name == "dice":
        return SoftDiceLoss()
    if name == "ce+dice":
        return CrossEntropyPlusDice()
    raise ValueError(f"loss must be one of 'ce', 'weighted_ce', 'dice', 'ce+dice', got {name!r}")


# ---------------------------------------------------------------------------
# Segmentation metrics
# ---------------------------------------------------------------------------

def confusion_matrix(y_true, y_pred_labels, num_classes: int, ignore_label: int = IGNORE_LABEL,
                     sample_weight=None):
    """Confusion matrix [num_classes, num_classes] float64, rows = truth, columns = prediction.

    ``y_true`` and ``y_pred_labels`` are integer label maps of the same
    shape [batch, H, W]; entry (t, p) counts the pixels of true class t
    predicted as p. Pixels whose truth is ``ignore_label`` are not counted,
    nor, as in ``keras.metrics.MeanIoU``, pixels whose truth or prediction is
    outside [0, num_classes). ``sample_weight`` (optional): a scalar, one
    weight per image [batch], or weights broadcastable to [batch, H, W];
    each pixel then adds its weight instead of 1.

    One pass over the pixels: the pair (t, p) is the single number
    ``t * num_classes + p``, and one ``unsorted_segment_sum`` adds up the
    weights of each of the num_classes**2 numbers (no one-hot [pixels,
    classes] tensors, no matrix product). Its output size is a constant, so
    it also compiles with XLA (``tf.math.bincount``'s depends on the data).
    """
    truth = tf.cast(tf.convert_to_tensor(y_true), tf.int32)
    prediction = tf.cast(tf.convert_to_tensor(y_pred_labels), tf.int32)
    if not truth.shape.is_compatible_with(prediction.shape):
        raise ValueError(f"y_true and y_pred_labels must have the same shape, got {truth.shape} "
                         f"and {prediction.shape}")
    counted = (tf.not_equal(truth, ignore_label) & (truth >= 0) & (truth < num_classes)
               & (prediction >= 0) & (prediction < num_classes))  # [batch, H, W]
    weights = tf.cast(counted, tf.float64)
    if sample_weight is not None:
        sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
        if sample_weight.shape.rank == 1 and truth.shape.rank > 1:
            # One weight per image: [batch] -> [batch, 1, 1].
            sample_weight = tf.reshape(sample_weight, [-1] + [1] * (truth.shape.rank - 1))
        try:
            weights = weights * sample_weight
        except (ValueError, tf.errors.InvalidArgumentError) as error:
            raise ValueError(f"sample_weight must be a scalar, [batch] or broadcastable to y_true "
                             f"{truth.shape}, got shape {sample_weight.shape}") from error
    # Pixels that do not count go to bin 0 with weight 0.
    pairs = tf.where(counted, truth * num_classes + prediction, 0)  # [batch, H, W]
    counts = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), tf.reshape(pairs, [-1]),
                                          num_classes * num_classes)  # [classes**2]
    return tf.reshape(counts, [num_classes, num_classes])


def iou_per_class(matrix):
    """IoU of every class from a confusion matrix: TP / (TP + FP + FN), [classes].

    A class that appears neither in truth nor prediction gets NaN (undefined).
    """
    matrix = tf.convert_to_tensor(matrix, tf.float64)
    true_positives = tf.linalg.diag_part(matrix)
    union = tf.reduce_sum(matrix, axis=0) + tf.reduce_sum(matrix, axis=1) - true_positives
    return tf.where(union > 0, true_positives / tf.maximum(union, 1.0),
                    tf.constant(np.nan, tf.float64))


def mean_iou_from_confusion(matrix):
    """Mean IoU over the classes that appear (in truth or prediction)."""
    ious = iou_per_class(matrix)
    defined = tf.logical_not(tf.math.is_nan(ious))
    return tf.math.divide_no_nan(tf.reduce_sum(tf.where(defined, ious, 0.0)),
                                 tf.reduce_sum(tf.cast(defined, tf.float64)))


def pixel_accuracy_from_confusion(matrix):
    """Fraction of counted pixels labelled correctly: trace / total."""
    matrix = tf.convert_to_tensor(matrix, tf.float64)
    return tf.math.divide_no_nan(tf.linalg.trace(matrix), tf.reduce_sum(matrix))


class _ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates a confusion matrix over batches (logits or labels in).

    ``MeanIoU`` and ``PixelAccuracy`` are two readings of the same matrix.
    Compiled together into one training step (``fit``'s ``tf.function``),
    their updates are the same ops on the same inputs, and TensorFlow's graph
    optimiser (common-subexpression elimination in Grappler, and in XLA)
    runs the argmax and the counting once for both.
    """

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, from_logits=True, name=None,
                 dtype=None):
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.from_logits = from_logits
        self.total_confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="float64",
            name="total_confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """y_true [batch, H, W] labels (or [batch, H, W, 1]); y_pred [batch, H, W, classes]
        scores (or labels [batch, H, W] when ``from_logits=False``); sample_weight optional,
        a scalar, [batch] or broadcastable to [batch, H, W] (as ``keras.metrics.MeanIoU``)."""
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        if self.from_logits:
            _check_logits_and_labels(y_true, y_pred)
            y_pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)  # [batch, H, W]
        if tf.executing_eagerly():
            validate_mask_values(y_true.numpy(), self.num_classes, self.ignore_label, name="y_true")
        if y_true.shape.rank == y_pred.shape.rank + 1 and y_true.shape[-1] == 1:
            y_true = tf.squeeze(y_true, -1)
        self.total_confusion.assign_add(
            confusion_matrix(y_true, y_pred, self.num_classes, self.ignore_label, sample_weight))

    def reset_state(self):
        self.total_confusion.assign(tf.zeros_like(self.total_confusion))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, ignore_label=self.ignore_label,
                      from_logits=self.from_logits)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MeanIoU(_ConfusionMatrixMetric):
    """Mean intersection over union over classes, skipping the ignore label.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) from the confusion matrix summed over
    every batch seen (not a mean of per-batch IoUs); the mean is over the
    classes that appear in truth or prediction (Long et al. 2015, sec. 5).
    Inputs as ``keras.metrics.MeanIoU(sparse_y_pred=False)`` plus ignored
    pixels. Output: scalar in [0, 1].
    """

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, from_logits=True, name="mean_iou",
                 dtype=None):
        super().__init__(num_classes, ignore_label, from_logits, name=name, dtype=dtype)

    def result(self):
        return tf.cast(mean_iou_from_confusion(self.total_confusion), self.dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelAccuracy(_ConfusionMatrixMetric):
    """Fraction of non-ignored pixels whose predicted class is right."""

    def __init__(self, num_classes, ignore_label=IGNORE_LABEL, from_logits=True,
                 name="pixel_accuracy", dtype=None):
        super().__init__(num_classes, ignore_label, from_logits, name=name, dtype=dtype)

    def result(self):
        return tf.cast(pixel_accuracy_from_confusion(self.total_confusion), self.dtype)


# ---------------------------------------------------------------------------
# Image quality: PSNR and SSIM
# ---------------------------------------------------------------------------

def psnr(image_a, image_b, max_val=1.0):
    """Peak signal-to-noise ratio in dB, one value per image.

    PSNR = 10 log10(max_val^2 / MSE), MSE over height, width and channels.
    Images [..., H, W, C]; returns [...]. Identical images give +inf.
    """
    image_a = tf.cast(image_a, tf.float32)
    image_b = tf.cast(image_b, tf.float32)
    if image_a.shape != image_b.shape:
        raise ValueError(f"image_a and image_b must have the same shape, got {image_a.shape} "
                         f"and {image_b.shape}")
    mse = tf.reduce_mean(tf.square(image_a - image_b), axis=[-3, -2, -1])
    return 10.0 * tf.math.log(max_val ** 2 / mse) / tf.math.log(10.0)


def _gaussian_window(size: int, sigma: float):
    """Normalised 2-D Gaussian [size, size]."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-coords ** 2 / (2.0 * sigma ** 2))
    window = np.outer(g, g)
    return (window / window.sum()).astype(np.float32)


def ssim(image_a, image_b, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity (Wang et al. 2004, eq. 13), one value per image.

    Local means, variances and covariance are Gaussian-weighted averages
    (11x11 window, sigma 1.5, sec. III-C) over every fully-inside window
    position ("valid"); per position

        SSIM = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2))

    with C1 = (k1 max_val)^2, C2 = (k2 max_val)^2, averaged over positions and
    channels. Images [..., H, W, C] with H, W >= ``filter_size`` (the window
    is shrunk to the image otherwise, as tf.image.ssim does); returns [...].
    """
    image_a = tf.cast(image_a, tf.float32)
    image_b = tf.cast(image_b, tf.float32)
    if image_a.shape != image_b.shape:
        raise ValueError(f"image_a and image_b must have the same shape, got {image_a.shape} "
                         f"and {image_b.shape}")
    height, width, channels = image_a.shape[-3:]
    size = min(filter_size, height, width)
    window = tf.constant(_gaussian_window(size, filter_sigma))[:, :, None, None]
    window = tf.tile(window, [1, 1, channels, 1])  # [size, size, C, 1], one filter per channel
    batch_shape = tf.shape(image_a)[:-3]
    flat_a = tf.reshape(image_a, [-1, height, width, channels])
    flat_b = tf.reshape(image_b, [-1, height, width, channels])

    def local_mean(x):
        return tf.nn.depthwise_conv2d(x, window, strides=[1, 1, 1, 1], padding="VALID")

    mean_a, mean_b = local_mean(flat_a), local_mean(flat_b)
    variance_a = local_mean(flat_a * flat_a) - mean_a ** 2
    variance_b = local_mean(flat_b * flat_b) - mean_b ** 2
    covariance = local_mean(flat_a * flat_b) - mean_a * mean_b
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    luminance = (2.0 * mean_a * mean_b + c1) / (mean_a ** 2 + mean_b ** 2 + c1)
    structure = (2.0 * covariance + c2) / (variance_a + variance_b + c2)
    per_image = tf.reduce_mean(luminance * structure, axis=[1, 2, 3])
    return tf.reshape(per_image, batch_shape)
