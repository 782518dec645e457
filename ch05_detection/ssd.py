"""SSD: a single-shot detector with default boxes on several feature maps.

Liu, Anguelov, Erhan, Szegedy, Reed, Fu and Berg 2016, "SSD: Single Shot MultiBox
Detector". Where YOLO v1 predicts from one coarse grid, SSD predicts from several feature
maps of the same network, so each scale of object has a map of the right resolution:
fine early maps find small objects, coarse late maps large ones (sec. 2.1, "multi-scale
feature maps for detection"). The model reads like the paper's figure 2:

* a chapter-4 backbone gives feature maps at strides 8, 16 and 32 (on 128 px images:
  16x16, 8x8 and 4x4), optionally followed by extra stride-2 convolutions (the paper's
  "extra feature layers");
* every map has a set of **default boxes** per cell (``default_boxes``): sizes ``s_k``
  growing linearly from map to map (eq. 4), aspect ratios {1, 2, 1/2}, and one more
  square box of size ``s'_k = sqrt(s_k s_(k+1))`` (sec. 2.2, "choosing scales and aspect
  ratios for default boxes");
* a 3x3 convolution per map (after one 3x3 conv + BatchNorm + ReLU of its own, see
  ``SSDConfig.head_convs``) predicts, for every default box, ``num_classes + 1`` class
  logits (index 0 is background) and 4 box offsets (sec. 2.1, "convolutional
  predictors"), coded with the variances (0.1, 0.1, 0.2, 0.2) (``encode_ssd_boxes``).

Training (sec. 2.2): ``assign_ssd_targets`` matches each object to its best default box,
then every default box with IoU >= 0.5 ("matching strategy"); ``mine_hard_negatives``
keeps the negatives with the highest confidence loss, at most 3 per positive ("hard
negative mining"); ``ssd_loss`` is softmax cross-entropy over the positives and the mined
negatives plus smooth L1 over the positives, divided by the number of positives
("training objective", eq. 1-3). Inference: softmax scores, decoded boxes, per-class NMS
at IoU 0.45 (sec. 3, "inference time").

Scales used here. The paper spreads ``s_k`` over [0.2, 0.9] of the image for PASCAL VOC
objects. The shapes of the embedded data are 18-69 px on a 128 px image (0.14-0.54 of it),
so the default run uses ``s_min = 0.2`` and ``s_max = 0.5`` on its three maps: ``s_k`` =
0.2, 0.35, 0.5 (26, 45, 64 px) and ``s'_k`` = 0.26, 0.42, 0.57 (34, 54, 73 px; the last
uses ``s_4 = 0.65``, the next step of the same linear spacing). Every training object
then has a default box with IoU >= 0.5 (about 9 on average).

The model follows the chapter's detector interface (``detector.py``): ``call`` returns
the raw head outputs, ``compute_losses`` the named losses, ``detect`` padded detections.
Two helpers serve the notebook's figures: ``default_boxes_per_level(model)`` and
``matched_and_mined(model, batch)``. Try it::

    python ch05_detection/train_detector.py --model ssd --fast
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import targets
from ch05_detection.detector import (
    Detector, DetectorConfig, _require, backbone_options_for, select_detections)
from ch05_detection.rpn import smooth_l1

# The box-coding variances of the SSD code (Liu et al. 2016): offsets are divided by them.
# Dividing by 0.1 and 0.2 is multiplying by 10 and 5: ``boxes.encode_boxes`` with the
# weights (10, 10, 5, 5), the Faster R-CNN constants of this chapter.
BOX_VARIANCES = (0.1, 0.1, 0.2, 0.2)
# Backbone strides the feature maps may come from (``get_feature_pyramid``).
PYRAMID_STRIDES = (2, 4, 8, 16, 32)

# The default run on ``shapes`` at 128 px (train_detector.py reads this). A step of 16 images
# takes ~0.13 s at width 32 on this 2-core CPU when it is quiet (~0.25 s under load), so ~40 s
# per epoch of 4000 images: 20 epochs (5000 steps) fit the 14-minute budget, and on a busy
# machine the budget ends the run earlier with the learning-rate decay shortened to match.
# Adam with a one-epoch warm-up and cosine decay, as the other detectors of the chapter.
# ``backbone_width`` is the width these settings were chosen for (resnet_small's first stage).
TRAIN_DEFAULTS = {"epochs": 20, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 1.0,
                  "time_budget_minutes": 14.0, "backbone_width": 32}


# ----------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------
@dataclass
class SSDConfig(DetectorConfig):
    """Every option of ``SSD`` (with those of ``DetectorConfig``; ``output_stride`` is not
    used: the maps come from ``feature_strides``).

    Args:
        feature_strides: backbone strides of the feature maps that predict (ascending,
            from ``PYRAMID_STRIDES``): (8, 16, 32) gives 16x16, 8x8, 4x4 maps on 128 px.
        extra_levels: extra maps after the last one, each a 1x1 convolution then a 3x3
            stride-2 convolution (the paper's extra feature layers, sec. 2.1).
        extra_filters: channels of the extra maps.
        head_convs, head_filters: 3x3 convolutions (+ BatchNorm + ReLU) run on each map before
            its predictors. The paper predicts straight from its maps (``head_convs=0``), but
            they come from VGG-16, whose stride-8 map conv4_3 is 10 convolutions deep;
            resnet_small's stride-8 map is 5 deep, so by default one more layer gives the
            predictors of each map some depth of their own (cheap: the maps are small).
        min_scale, max_scale: ``s_min`` and ``s_max`` of eq. 4, as fractions of the image.
        aspect_ratios: height / width of the default boxes of size ``s_k`` in each cell.
        extra_box: add the square box of size ``sqrt(s_k s_(k+1))`` to each cell.
        positive_iou: a default box with IoU >= this with an object is positive (0.5).
        negative_ratio: mined negatives per positive in an image (3).
        min_negatives: negatives kept in an image even with fewer positives, so that an
            image without objects still teaches the background (3: as for one positive).
        box_variances: the variances of the box coding (0.1, 0.1, 0.2, 0.2).
        box_loss_weight: alpha of eq. 1 (1).
        smooth_l1_beta: transition point of the smooth L1 loss (1, as Fast R-CNN).
        detection_nms_iou: per-class NMS overlap of ``detect`` (0.45, sec. 3).
        score_threshold: minimum score of a detection (0.01, sec. 3).
    """

    feature_strides: tuple = (8, 16, 32)
    extra_levels: int = 0
    extra_filters: int = 128
    head_convs: int = 1
    head_filters: int = 128
    min_scale: float = 0.2
    max_scale: float = 0.5
    aspect_ratios: tuple = (1.0, 2.0, 0.5)
    extra_box: bool = True
    positive_iou: float = 0.5
    negative_ratio: float = 3.0
    min_negatives: int = 3
    box_variances: tuple = BOX_VARIANCES
    box_loss_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    detection_nms_iou: float = 0.45
    score_threshold: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        strides = self.feature_strides
        strides = (strides,) if isinstance(strides, (int, np.integer)) else strides
        strides = tuple(int(s) for s in strides)
        _require(len(strides) >= 1 and all(s in PYRAMID_STRIDES for s in strides)
                 and list(strides) == sorted(set(strides)), "feature_strides",
                 f"ascending distinct strides from {PYRAMID_STRIDES}", self.feature_strides)
        self.feature_strides = strides
        _require(int(self.extra_levels) >= 0, "extra_levels", ">= 0", self.extra_levels)
        self.extra_levels = int(self.extra_levels)
        _require(int(self.extra_filters) >= 1, "extra_filters", ">= 1", self.extra_filters)
        self.extra_filters = int(self.extra_filters)
        _require(int(self.head_convs) >= 0, "head_convs", ">= 0", self.head_convs)
        self.head_convs = int(self.head_convs)
        _require(int(self.head_filters) >= 1, "head_filters", ">= 1", self.head_filters)
        self.head_filters = int(self.head_filters)
        _require(0.0 < float(self.min_scale) <= float(self.max_scale) <= 1.0,
                 "min_scale, max_scale",
                 "0 < min_scale <= max_scale <= 1 (fractions of the image)",
                 (self.min_scale, self.max_scale))
        self.min_scale, self.max_scale = float(self.min_scale), float(self.max_scale)
        ratios = tuple(float(r) for r in self.aspect_ratios)
        _require(len(ratios) >= 1 and all(r > 0 for r in ratios), "aspect_ratios",
                 "a non-empty list of positive height / width ratios", self.aspect_ratios)
        self.aspect_ratios = ratios
        self.extra_box = bool(self.extra_box)
        _require(0.0 < float(self.positive_iou) <= 1.0, "positive_iou", "in (0, 1]",
                 self.positive_iou)
        self.positive_iou = float(self.positive_iou)
        _require(float(self.negative_ratio) >= 0.0, "negative_ratio", ">= 0", self.negative_ratio)
        self.negative_ratio = float(self.negative_ratio)
        _require(int(self.min_negatives) >= 0, "min_negatives", ">= 0", self.min_negatives)
        self.min_negatives = int(self.min_negatives)
        variances = tuple(float(v) for v in self.box_variances)
        _require(len(variances) == 4 and all(v > 0 for v in variances), "box_variances",
                 "4 positive numbers (y, x, height, width)", self.box_variances)
        self.box_variances = variances
        _require(float(self.box_loss_weight) >= 0.0, "box_loss_weight", ">= 0",
                 self.box_loss_weight)
        self.box_loss_weight = float(self.box_loss_weight)
        _require(float(self.smooth_l1_beta) > 0.0, "smooth_l1_beta", "> 0", self.smooth_l1_beta)
        self.smooth_l1_beta = float(self.smooth_l1_beta)
        _require(0.0 <= float(self.detection_nms_iou) <= 1.0, "detection_nms_iou", "in [0, 1]",
                 self.detection_nms_iou)
        self.detection_nms_iou = float(self.detection_nms_iou)

    @property
    def num_levels(self):
        """Number of feature maps that predict (backbone maps + extra maps)."""
        return len(self.feature_strides) + self.extra_levels


# ----------------------------------------------------------------------------------
# default boxes
# ----------------------------------------------------------------------------------
def default_box_scales(num_levels, min_scale=0.2, max_scale=0.9):
    """The sizes ``s_1 .. s_(m+1)`` of eq. 4 (Liu et al. 2016, sec. 2.2).

    ``s_k = s_min + (s_max - s_min) / (m - 1) * (k - 1)`` for the ``m`` maps; ``s_(m+1)``
    (only used by the extra box ``sqrt(s_m s_(m+1))`` of the last map) continues the same
    linear spacing. With one map, ``s_1 = s_min`` and ``s_2 = s_max``.

    Returns:
        list of ``m + 1`` floats (fractions of the image).
    """
    if int(num_levels) < 1:
        raise ValueError(f"`num_levels` must be >= 1, got {num_levels}")
    if num_levels == 1:
        return [float(min_scale), float(max_scale)]
    step = (max_scale - min_scale) / (num_levels - 1)
    return [float(min_scale + step * k) for k in range(num_levels + 1)]


def box_sizes_per_location(scale, next_scale, aspect_ratios=(1.0, 2.0, 0.5), extra_box=True):
    """``(heights, widths)`` of the default boxes of one cell, in order.

    One box of size ``scale`` per aspect ratio ``r`` (height / width): height
    ``scale * sqrt(r)``, width ``scale / sqrt(r)`` (area ``scale²``). Then, with
    ``extra_box``, the square box of size ``sqrt(scale * next_scale)``. (The paper writes
    ratios as width / height; the set {1, 2, 1/2} is the same either way.)
    """
    heights = [scale * math.sqrt(r) for r in aspect_ratios]
    widths = [scale / math.sqrt(r) for r in aspect_ratios]
    if extra_box:
        extra = math.sqrt(scale * next_scale)
        heights.append(extra)
        widths.append(extra)
    return heights, widths


def default_boxes(feature_sizes, scales, aspect_ratios=(1.0, 2.0, 0.5), extra_box=True,
                  per_level=False):
    """All default boxes of the feature maps, normalized yxyx (NumPy).

    The box ``k`` of cell ``(i, j)`` of a ``f_h x f_w`` map is centred at
    ``((i + 0.5) / f_h, (j + 0.5) / f_w)`` (sec. 2.2) with the sizes of
    ``box_sizes_per_location``. Boxes are not clipped (a large box at the border reaches
    outside the image; the detections are clipped).

    Args:
        feature_sizes: ``[(f_h, f_w), ...]`` one per map, finest first.
        scales: ``m + 1`` sizes from ``default_box_scales``.
        aspect_ratios, extra_box: see ``box_sizes_per_location``.
        per_level: return a list of ``[f_h, f_w, k, 4]`` arrays instead.
    Returns:
        float32 ``[A, 4]``: maps in order, each location-major (row, column), then the ``k``
        boxes of the cell. This lines up with a predictor whose output ``[f_h, f_w, k * d]``
        is reshaped to ``[f_h * f_w * k, d]``.
    """
    if len(scales) != len(feature_sizes) + 1:
        raise ValueError(f"`scales` needs {len(feature_sizes) + 1} sizes (one per map and one "
                         f"more), got {len(scales)}")
    levels = []
    for level, (feature_height, feature_width) in enumerate(feature_sizes):
        heights, widths = box_sizes_per_location(scales[level], scales[level + 1], aspect_ratios,
                                                 extra_box)
        heights, widths = np.asarray(heights), np.asarray(widths)  # [k]
        center_y = (np.arange(feature_height) + 0.5) / feature_height  # [f_h]
        center_x = (np.arange(feature_width) + 0.5) / feature_width  # [f_w]
        center_y, center_x = np.meshgrid(center_y, center_x, indexing="ij")  # [f_h, f_w]
        center_y, center_x = center_y[..., None], center_x[..., None]  # [f_h, f_w, 1]
        levels.append(np.stack([center_y - heights / 2, center_x - widths / 2,
                                center_y + heights / 2, center_x + widths / 2],
                               axis=-1).astype(np.float32))  # [f_h, f_w, k, 4]
    if per_level:
        return levels
    return np.concatenate([level.reshape(-1, 4) for level in levels], axis=0)


# ----------------------------------------------------------------------------------
# box coding, matching, mining, loss
# ----------------------------------------------------------------------------------
def variances_to_weights(variances=BOX_VARIANCES):
    """SSD's variances as the scale weights of ``boxes.encode_boxes``: ``1 / variance``
    ((0.1, 0.1, 0.2, 0.2) -> (10, 10, 5, 5))."""
    return tuple(1.0 / float(v) for v in variances)


def encode_ssd_boxes(boxes, default_boxes, variances=BOX_VARIANCES):
    """SSD's box offsets (Liu et al. 2016, eq. 2, with the variances of its code).

    ``((cy - d_cy) / d_h / v0, (cx - d_cx) / d_w / v1, log(h / d_h) / v2, log(w / d_w) / v3)``,
    which is ``boxes.encode_boxes`` with the weights ``1 / variances``: (10, 10, 5, 5).

    Args:
        boxes: ``[..., 4]`` yxyx; default_boxes: ``[..., 4]`` broadcastable to them.
    Returns:
        ``[..., 4]`` offsets ``(ty, tx, th, tw)``.
    """
    return box_ops.encode_boxes(boxes, default_boxes, weights=variances_to_weights(variances))


def decode_ssd_boxes(offsets, default_boxes, variances=BOX_VARIANCES):
    """Inverse of ``encode_ssd_boxes`` (the log-scale is clamped, see ``boxes.decode_boxes``)."""
    return box_ops.decode_boxes(offsets, default_boxes, weights=variances_to_weights(variances))


def assign_ssd_targets(default_boxes, gt_boxes, gt_classes, positive_iou=0.5,
                       variances=BOX_VARIANCES):
    """Match default boxes to objects (Liu et al. 2016, sec. 2.2, "matching strategy").

    "We begin by matching each ground truth box to the default box with the best jaccard
    overlap ... [then] default boxes to any ground truth with jaccard overlap higher than a
    threshold (0.5)". That is ``targets.match_iou`` with both thresholds at ``positive_iou``
    (no ignore band: every default box is positive or negative) and
    ``allow_low_quality_matches``. An image without objects has only negatives.

    Args:
        default_boxes: ``[A, 4]`` normalized yxyx.
        gt_boxes: ``[batch, N, 4]``; gt_classes: ``[batch, N]`` (0-based, -1 padding).
        positive_iou: the IoU threshold (0.5).
        variances: box-coding variances.
    Returns:
        dict ``class_targets`` ``[batch, A]`` int32 (0 background, ``c + 1`` for class c),
        ``box_targets`` ``[batch, A, 4]`` (zero unless positive), ``positive`` and
        ``negative`` ``[batch, A]`` bool, ``matched_index`` ``[batch, A]`` int32 (the object
        of a positive), ``matched_iou`` ``[batch, A]``.
    """
    default_boxes = tf.convert_to_tensor(default_boxes, tf.float32)
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    # One absent row more, so that the gathers below work even when N == 0.
    batch_size = tf.shape(gt_boxes)[0]
    gt_boxes = tf.concat([gt_boxes, tf.zeros([batch_size, 1, 4])], axis=1)  # [batch, N + 1, 4]
    gt_classes = tf.concat([gt_classes, -tf.ones([batch_size, 1], tf.int32)], axis=1)
    iou = box_ops.pairwise_iou(default_boxes[None], gt_boxes)  # [batch, A, N + 1]
    matched_index, labels, matched_iou = targets.match_iou(
        iou, gt_classes >= 0, positive_threshold=positive_iou, negative_threshold=positive_iou,
        allow_low_quality_matches=True)
    positive = tf.equal(labels, targets.POSITIVE)
    matched_boxes = tf.gather(gt_boxes, matched_index, batch_dims=1)  # [batch, A, 4]
    matched_classes = tf.gather(gt_classes, matched_index, batch_dims=1)  # [batch, A]
    box_targets = encode_ssd_boxes(matched_boxes, default_boxes[None], variances)
    return {"class_targets": tf.where(positive, matched_classes + 1, 0),
            "box_targets": tf.where(positive[..., None], box_targets, 0.0),
            "positive": positive,
            "negative": tf.equal(labels, targets.NEGATIVE),
            "matched_index": matched_index,
            "matched_iou": matched_iou}


def mine_hard_negatives(confidence_loss, positive, negative, negative_ratio=3.0, min_negatives=3):
    """The negatives with the highest confidence loss, ``negative_ratio`` per positive.

    Liu et al. 2016, sec. 2.2, "hard negative mining": "Instead of using all the negative
    examples, we sort them using the highest confidence loss for each default box and pick
    the top ones so that the ratio between the negatives and positives is at most 3:1."
    Per image: ``floor(negative_ratio * positives)`` negatives, at least ``min_negatives``
    (so an image with no objects still teaches the background), at most all of them.
    Ties in the loss go to the lower index (a stable sort), so exactly that many are kept.

    Args:
        confidence_loss: ``[batch, A]`` softmax cross-entropy of each default box (for a
            negative: ``-log p(background)``). Only its order matters (no gradient).
        positive, negative: ``[batch, A]`` bool.
        negative_ratio: negatives per positive; min_negatives: the floor per image.
    Returns:
        ``[batch, A]`` bool: the mined negatives.
    """
    confidence_loss = tf.stop_gradient(tf.cast(confidence_loss, tf.float32))
    positive, negative = tf.cast(positive, tf.bool), tf.cast(negative, tf.bool)
    num_positive = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)  # [batch]
    num_available = tf.reduce_sum(tf.cast(negative, tf.int32), axis=1)
    wanted = tf.cast(tf.floor(negative_ratio * num_positive), tf.int32)
    num_negative = tf.minimum(tf.maximum(wanted, int(min_negatives)), num_available)  # [batch]
    # Rank negatives by loss, highest first; everything else ranks after them.
    ranked_loss = tf.where(negative, confidence_loss, tf.float32.min)
    order = tf.argsort(ranked_loss, axis=1, direction="DESCENDING", stable=True)
    rank = tf.argsort(order, axis=1)  # the inverse permutation: rank of each default box
    return tf.logical_and(negative, rank < num_negative[:, None])


def ssd_loss(class_logits, box_offsets, class_targets, box_targets, positive, mined_negative,
             box_loss_weight=1.0, smooth_l1_beta=1.0):
    """SSD's objective, Liu et al. 2016 eq. 1-3.

    ``L = (L_conf + alpha L_loc) / N``: softmax cross-entropy over the positives and the
    mined negatives, smooth L1 over the positives' offsets, ``N`` the number of positives in
    the batch (at least 1, so an empty batch gives a finite loss; averaged over the replicas
    under ``tf.distribute``, ``targets.mean_over_replicas``).

    Args:
        class_logits: ``[batch, A, K + 1]``; box_offsets: ``[batch, A, 4]``.
        class_targets: ``[batch, A]`` (0 background); box_targets: ``[batch, A, 4]``.
        positive, mined_negative: ``[batch, A]`` bool.
    Returns:
        ``(class_loss, box_loss)``: scalars (``box_loss`` includes ``box_loss_weight``).
    """
    positive = tf.cast(positive, tf.float32)
    counted = tf.cast(tf.logical_or(tf.cast(positive, tf.bool), mined_negative), tf.float32)
    num_positive = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(positive)), 1.0)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(class_targets, tf.int32), logits=tf.cast(class_logits, tf.float32))
    class_loss = tf.reduce_sum(cross_entropy * counted) / num_positive
    box_error = tf.reduce_sum(
        smooth_l1(tf.cast(box_offsets, tf.float32) - box_targets, smooth_l1_beta), axis=-1)
    box_loss = box_loss_weight * tf.reduce_sum(box_error * positive) / num_positive
    return class_loss, box_loss


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class SSD(Detector):
    """SSD (Liu et al. 2016) with a chapter-4 backbone.

    Input:
        ``images`` ``[batch, H, W, 3]`` float in [0, 1] (resized to ``image_size``).
    ``call`` returns dict ``class_logits`` ``[batch, A, num_classes + 1]`` (background
    first) and ``box_offsets`` ``[batch, A, 4]``, for the ``A`` default boxes in
    ``model.default_boxes`` (``[A, 4]`` normalized yxyx, NumPy). ``detect`` returns the
    padded detections of the detector interface (``detector.py``).

    Build it from options, ``SSD(5, image_size=(128, 128), backbone_options=...)``, or
    from a config, ``SSD(config=SSDConfig(5, ...))`` (see ``SSDConfig``).
    """

    CONFIG_CLASS = SSDConfig
    LOSS_NAMES = ("loss", "class_loss", "box_loss")

    def __init__(self, num_classes=None, config=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        config = self.config
        height, width = config.image_size
        self.backbone = _build_pyramid(config)
        sizes = [tuple(int(s) for s in self.backbone.output[f"stride_{stride}"].shape[1:3])
                 for stride in config.feature_strides]
        # The paper's extra feature layers: 1x1 conv, then 3x3 stride-2 conv (sec. 2.1).
        self.extra_reduce, self.extra_convs = [], []
        for level in range(config.extra_levels):
            self.extra_reduce.append(keras.layers.Conv2D(
                max(1, config.extra_filters // 2), 1, activation="relu",
                name=f"extra_{level}_reduce"))
            self.extra_convs.append(keras.layers.Conv2D(
                config.extra_filters, 3, strides=2, padding="same", activation="relu",
                name=f"extra_{level}_conv"))
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))  # "same": ceil(n / 2)
        self.feature_sizes = sizes
        self.scales = default_box_scales(config.num_levels, config.min_scale, config.max_scale)
        self.boxes_per_location = len(config.aspect_ratios) + int(config.extra_box)
        # Default boxes depend only on the (fixed) image size: NumPy constants, not weights.
        self.default_boxes = default_boxes(sizes, self.scales, config.aspect_ratios,
                                           config.extra_box)  # [A, 4]
        k = self.boxes_per_location
        # Optional depth before the predictors of each map (see SSDConfig.head_convs).
        self.level_heads = [] if not config.head_convs else [
            keras.Sequential([layer for i in range(config.head_convs) for layer in (
                keras.layers.Conv2D(config.head_filters, 3, padding="same", use_bias=False,
                                    name=f"head_{level}_conv_{i}"),
                keras.layers.BatchNormalization(name=f"head_{level}_bn_{i}"),
                keras.layers.ReLU(name=f"head_{level}_relu_{i}"))], name=f"head_{level}")
            for level in range(config.num_levels)]
        self.class_predictors = [
            keras.layers.Conv2D(k * (config.num_classes + 1), 3, padding="same",
                                name=f"class_predictor_{level}")
            for level in range(config.num_levels)]
        self.box_predictors = [
            keras.layers.Conv2D(k * 4, 3, padding="same", name=f"box_predictor_{level}")
            for level in range(config.num_levels)]
        self.strides = [height / h for h, _ in sizes]  # image pixels per cell of each map
        self.build_weights()

    # ------------------------------------------------------------------ network
    def feature_maps(self, images, training=False):
        """The maps that predict, finest first: ``[[batch, f_h, f_w, C_l], ...]``."""
        pyramid = self.backbone(images, training=training)
        maps = [pyramid[f"stride_{stride}"] for stride in self.config.feature_strides]
        x = maps[-1]
        for reduce, conv in zip(self.extra_reduce, self.extra_convs):
            x = conv(reduce(x))
            maps.append(x)
        return maps

    def call(self, images, training=False):
        """Raw head outputs for every default box.

        Returns dict ``class_logits`` ``[batch, A, num_classes + 1]`` and ``box_offsets``
        ``[batch, A, 4]`` (in the order of ``model.default_boxes``).
        """
        images = self._resize(images)
        batch_size = tf.shape(images)[0]
        class_logits, box_offsets = [], []
        for level, feature_map in enumerate(self.feature_maps(images, training=training)):
            if self.level_heads:
                feature_map = self.level_heads[level](feature_map, training=training)
            # [batch, f_h, f_w, k * (K + 1)] -> [batch, f_h * f_w * k, K + 1]
            class_logits.append(tf.reshape(self.class_predictors[level](feature_map),
                                           [batch_size, -1, self.num_classes + 1]))
            box_offsets.append(tf.reshape(self.box_predictors[level](feature_map),
                                          [batch_size, -1, 4]))
        return {"class_logits": tf.concat(class_logits, axis=1),
                "box_offsets": tf.concat(box_offsets, axis=1)}

    # ------------------------------------------------------------------ inference
    def decode_boxes_and_scores(self, outputs):
        """``(boxes, scores)``: ``[batch, A, 4]`` decoded, clipped boxes and ``[batch, A, K]``
        softmax probabilities of the foreground classes (the background column dropped)."""
        probabilities = tf.nn.softmax(tf.cast(outputs["class_logits"], tf.float32), axis=-1)
        boxes = decode_ssd_boxes(tf.cast(outputs["box_offsets"], tf.float32),
                                 self.default_boxes[None], self.config.box_variances)
        return box_ops.clip_boxes(boxes), probabilities[..., 1:]

    def decode(self, outputs):
        """Softmax scores without background, decoded boxes, per-class NMS at IoU 0.45."""
        boxes, scores = self.decode_boxes_and_scores(outputs)
        return select_detections(boxes, scores, score_threshold=self.config.score_threshold,
                                 iou_threshold=self.config.detection_nms_iou,
                                 max_detections=self.config.max_detections)

    # ------------------------------------------------------------------ training
    def targets_and_mining(self, outputs, gt_boxes, gt_classes):
        """Matching and hard-negative mining for raw outputs: the dict of
        ``assign_ssd_targets`` plus ``mined_negative`` ``[batch, A]`` and
        ``confidence_loss`` ``[batch, A]``."""
        config = self.config
        assigned = assign_ssd_targets(self.default_boxes, gt_boxes, gt_classes,
                                      config.positive_iou, config.box_variances)
        confidence_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=assigned["class_targets"],
            logits=tf.cast(outputs["class_logits"], tf.float32))  # [batch, A]
        assigned["confidence_loss"] = confidence_loss
        assigned["mined_negative"] = mine_hard_negatives(
            confidence_loss, assigned["positive"], assigned["negative"], config.negative_ratio,
            config.min_negatives)
        return assigned

    def losses_for(self, images, gt_boxes, gt_classes, training, step):
        """``loss`` = ``class_loss`` + ``box_loss`` (Liu et al. 2016, eq. 1)."""
        outputs = self(images, training=training)
        assigned = self.targets_and_mining(outputs, gt_boxes, gt_classes)
        class_loss, box_loss = ssd_loss(
            outputs["class_logits"], outputs["box_offsets"], assigned["class_targets"],
            assigned["box_targets"], assigned["positive"], assigned["mined_negative"],
            box_loss_weight=self.config.box_loss_weight,
            smooth_l1_beta=self.config.smooth_l1_beta)
        return {"loss": class_loss + box_loss, "class_loss": class_loss, "box_loss": box_loss}


def _build_pyramid(config):
    """The chapter-4 backbone's feature maps at ``config.feature_strides`` (a dict model)."""
    from ch04_classification.models import get_feature_pyramid
    from common.training import synchronize_batchnorm

    pyramid = get_feature_pyramid(config.backbone, (*config.image_size, 3),
                                  strides=config.feature_strides, **config.backbone_options)
    if config.synchronized_batch_norm:
        pyramid = synchronize_batchnorm(pyramid)
    for stride in config.feature_strides:
        size = pyramid.output[f"stride_{stride}"].shape[1:3]
        if min(size) < 1:
            raise ValueError(f"`image_size` {config.image_size} is too small for stride {stride}")
    return pyramid


# ----------------------------------------------------------------------------------
# helpers for figures and for train_detector.py
# ----------------------------------------------------------------------------------
def default_boxes_per_level(model):
    """The default boxes of each feature map of an ``SSD``, for pictures.

    Returns:
        list (finest map first) of dicts: ``feature_size`` ``(f_h, f_w)``, ``stride``
        (image pixels per cell), ``scale`` ``s_k`` and ``extra_scale`` ``sqrt(s_k s_(k+1))``
        (fractions of the image; ``None`` without the extra box), ``aspect_ratios``, and
        ``boxes`` ``[f_h, f_w, k, 4]`` normalized yxyx (``boxes[i, j]`` are the ``k`` boxes
        of cell ``(i, j)``).
    """
    config = model.config
    levels = default_boxes(model.feature_sizes, model.scales, config.aspect_ratios,
                           config.extra_box, per_level=True)
    return [{"feature_size": tuple(model.feature_sizes[level]),
             "stride": float(model.strides[level]),
             "scale": model.scales[level],
             "extra_scale": (math.sqrt(model.scales[level] * model.scales[level + 1])
                             if config.extra_box else None),
             "aspect_ratios": tuple(config.aspect_ratios),
             "boxes": boxes}
            for level, boxes in enumerate(levels)]


def matched_and_mined(model, batch, index=0):
    """One image's positive and mined-negative default boxes, for a picture.

    Runs ``model`` in inference mode on the batch, matches and mines exactly as the loss
    does (``SSD.targets_and_mining``), and returns image ``index``'s part.

    Args:
        model: an ``SSD``.
        batch: a detection batch dict (``image`` ``[B, H, W, 3]``, ``boxes`` ``[B, N, 4]``,
            ``classes`` ``[B, N]`` padded with -1) or one example (``[H, W, 3]``, ``[N, 4]``,
            ``[N]``).
        index: which image of the batch.
    Returns:
        dict of NumPy arrays: ``image``, ``gt_boxes`` ``[n, 4]`` and ``gt_classes`` ``[n]``
        (padding removed), ``positive_boxes`` ``[P, 4]``, ``positive_classes`` ``[P]``
        (0-based class of the matched object), ``positive_iou`` ``[P]``,
        ``negative_boxes`` ``[M, 4]`` and ``negative_losses`` ``[M]`` (highest loss first),
        ``num_negatives`` (all negatives of the image, mined or not).
    """
    images = np.asarray(batch["image"], np.float32)
    gt_boxes = np.asarray(batch["boxes"], np.float32)
    gt_classes = np.asarray(batch["classes"], np.int32)
    if images.ndim == 3:
        images, gt_boxes, gt_classes = images[None], gt_boxes[None], gt_classes[None]
    images = model._resize(images)
    gt_boxes, gt_classes, _ = targets.check_detection_targets(gt_boxes, gt_classes,
                                                              model.num_classes)
    outputs = model(images, training=False)
    assigned = {k: v.numpy()[index]
                for k, v in model.targets_and_mining(outputs, gt_boxes, gt_classes).items()}
    positive, mined = assigned["positive"], assigned["mined_negative"]
    order = np.argsort(-assigned["confidence_loss"][mined], kind="stable")
    valid = gt_classes.numpy()[index] >= 0
    return {"image": images.numpy()[index],
            "gt_boxes": gt_boxes.numpy()[index][valid],
            "gt_classes": gt_classes.numpy()[index][valid],
            "positive_boxes": model.default_boxes[positive],
            "positive_classes": assigned["class_targets"][positive] - 1,
            "positive_iou": assigned["matched_iou"][positive],
            "negative_boxes": model.default_boxes[mined][order],
            "negative_losses": assigned["confidence_loss"][mined][order],
            "num_negatives": int(assigned["negative"].sum())}


def from_options(options, num_classes, class_names, train_boxes):
    """Build the SSD of ``train_detector.py --model ssd``.

    Reads ``options.image_size``, ``backbone``, ``backbone_width`` (resnet_small's filters
    ``[w, 2w, 4w, 8w]``), ``seed``, ``flip`` and ``max_detections``. The default boxes follow
    eq. 4 (``SSDConfig``: scales 0.2 to 0.5 of the image), so ``train_boxes`` and the YOLO /
    RetinaNet options (``anchors``, ``classification_loss``) are not used.
    """
    del train_boxes  # the default boxes are fixed by eq. 4, not fitted to the data
    backbone_options = backbone_options_for(options.backbone, options.backbone_width)
    size = int(options.image_size)
    return SSD(num_classes, class_names=tuple(class_names), image_size=(size, size),
               backbone=options.backbone, backbone_options=backbone_options,
               flip_augment=bool(options.flip), seed=int(options.seed),
               max_detections=int(options.max_detections), name="ssd")
