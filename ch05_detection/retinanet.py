"""RetinaNet: a one-stage detector on a feature pyramid, trained with the focal loss.

Lin, Goyal, Girshick, He and Dollár 2017, "Focal Loss for Dense Object Detection", sec. 4 and
fig. 3. One network, no proposals:

* a chapter-4 **backbone** and a **feature pyramid** (``fpn.py``) give maps ``P3``-``P5``
  (strides 8, 16, 32) of one width;
* at every location of every level sit **9 anchors**: 3 sizes an octave apart
  ``{2^0, 2^(1/3), 2^(2/3)}`` times the level's base size, times 3 aspect ratios
  ``{1:2, 1:1, 2:1}`` (sec. 4, "Anchors");
* two small fully convolutional **subnets**, shared by all levels: the *classification
  subnet* (4 conv3x3 + ReLU, then a conv3x3 with ``9 K`` sigmoid outputs) and the *box
  subnet* (the same, with ``9 x 4`` box deltas, class-agnostic);
* anchors are **matched** to objects at IoU >= 0.5, to background below 0.4 and ignored in
  between (``targets.match_iou``);
* the **loss** is the focal loss (``focal_loss.py``) over every anchor and class plus smooth
  L1 on the positive anchors' box deltas, both divided by the number of positive anchors;
* the classification subnet's last bias starts at ``-log((1 - pi) / pi)``, ``pi = 0.01``, so
  every anchor first predicts "object" with probability 0.01: the 10^4 background anchors do
  not swamp the first steps with a huge loss (sec. 4, "Initialization"). The box subnet's last
  bias starts at 0.
* **inference**: sigmoid scores, at most the top 1000 (anchor, class) pairs per level above
  0.05, their decoded boxes, then per-class NMS at IoU 0.5 (sec. 4, "Inference").

Sizes for the chapter's 128-px ``shapes`` images. The paper's anchors are 32² to 512² pixels on
P3-P7 (base size 4 x stride) for ~800-px images; our objects are about 18 to 67 px (median 38),
so the base sizes are **2 x stride: 16, 32, 64 px on P3, P4, P5** (``BASE_ANCHOR_SIZES``), i.e.
anchors from 16 to 102 px, and ``P6``/``P7`` are left out (``max_level=5``). Measured on 400
training scenes: 99.8% of the objects have an anchor at IoU >= 0.5 (mean best IoU 0.71, ~9
positive anchors per object, the best anchor on P3 / P4 / P5 for 29 / 70 / 1% of them); the
paper's rule (32, 64, 128 px) would leave 4% of them without one. The subnets are 64 channels
wide instead of 256 (``head_width``; the FPN's ``fpn_width`` too), enough for 5 classes and
quick on a CPU.

Two choices the paper does not make, both options of ``RetinaNetConfig``: every object's best
anchor is positive even below IoU 0.5 (``low_quality_matches``, as Detectron and torchvision
do), and the subnets' hidden convolutions start from He et al. 2015's initialisation instead
of sigma = 0.01 (``head_init``; why: ``RetinaNetSubnet``). The box encoding and loss follow
Detectron's RetinaNet: unit box weights, smooth L1 with beta = 0.1.

Classification loss for the ablation (``classification_loss``): ``"focal"`` (alpha 0.25,
gamma 2) or ``"cross_entropy"``, plain binary cross-entropy (no alpha, no modulating factor)
over the same anchors, normalised the same way, with the same prior initialisation.

Train it with ``python ch05_detection/train_detector.py --model retinanet``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from ch05_detection import boxes as box_ops
from ch05_detection import fpn as fpn_ops
from ch05_detection import targets
from ch05_detection.detector import (
    Detector, DetectorConfig, _require, backbone_options_for, select_detections)
from ch05_detection.focal_loss import sigmoid_focal_loss
from ch05_detection.rpn import smooth_l1

CLASSIFICATION_LOSSES = ("focal", "cross_entropy")
HEAD_INITS = ("he", "paper")
# Anchor base sizes (pixels of a 128-px image) on P3, P4, P5: 2 x stride (the paper: 4 x stride
# on ~800-px images, 32 on P3). Grown with the image by ``anchor_ops.anchor_scales_for``.
BASE_ANCHOR_SIZES = (16.0, 32.0, 64.0)
# Sec. 4, "Anchors": "at each level we use anchors at three aspect ratios {1:2, 1:1, 2:1} ...
# we add anchors of sizes {2^0, 2^(1/3), 2^(2/3)} of the original set of 3 aspect ratio anchors".
ANCHOR_SCALES = (1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0))
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Sec. 4, "Initialization": "b = -log((1 - pi)/pi) ... pi = .01 in all our experiments".
PRIOR_PROBABILITY = 0.01


# ----------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------
@dataclass
class RetinaNetConfig(DetectorConfig):
    """Every option of ``RetinaNet`` (with those of ``DetectorConfig``; its ``output_stride``
    is not used: the levels' strides are ``2**min_level`` .. ``2**max_level``).

    Args:
        min_level, max_level: pyramid levels (3..5; up to 7 adds the paper's P6 and P7).
        fpn_width: channels of every pyramid level (256 in the paper).
        head_width, head_depth: the subnets' conv3x3 + ReLU layers (256 wide, 4 deep in the paper).
        head_init: initialisation of those layers, ``"he"`` (default) or ``"paper"`` (Gaussian,
            sigma = 0.01); see ``RetinaNetSubnet``.
        anchor_sizes: base anchor size in pixels for each level, ``min_level`` first.
        anchor_scales: multipliers of the base size (an octave in 3 steps).
        aspect_ratios: anchor height / width.
        positive_iou, negative_iou: matching (>= 0.5 object, < 0.4 background, ignored between).
        low_quality_matches: also make each object's best anchor positive when its IoU is
            below ``positive_iou`` (as Detectron and torchvision do; the paper does not say):
            small objects between anchor centres keep a positive anchor.
        classification_loss: ``"focal"`` or ``"cross_entropy"`` (plain BCE, the ablation).
        focal_alpha, focal_gamma: the focal loss (0.25, 2).
        prior_probability: ``pi`` of the classification subnet's bias initialisation.
        box_weights: scale weights of the box encoding (1, 1, 1, 1 in Detectron's RetinaNet).
        smooth_l1_beta: smooth L1's transition point (0.1, Detectron2's RetinaNet).
        box_loss_weight: weight of the box loss in the total.
        pre_nms_top_k: candidates kept per level before NMS (1000).
        detection_nms_iou: per-class NMS threshold of ``detect`` (0.5).
    """

    min_level: int = 3
    max_level: int = 5
    fpn_width: int = 64
    head_width: int = 64
    head_depth: int = 4
    head_init: str = "he"
    anchor_sizes: tuple = BASE_ANCHOR_SIZES
    anchor_scales: tuple = ANCHOR_SCALES
    aspect_ratios: tuple = ASPECT_RATIOS
    positive_iou: float = 0.5
    negative_iou: float = 0.4
    low_quality_matches: bool = True
    classification_loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    prior_probability: float = PRIOR_PROBABILITY
    box_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 0.1
    box_loss_weight: float = 1.0
    pre_nms_top_k: int = 1000
    detection_nms_iou: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        _require(fpn_ops.MIN_LEVEL_RANGE[0] <= int(self.min_level) <= fpn_ops.MIN_LEVEL_RANGE[1],
                 "min_level", "in [2, 5]", self.min_level)
        self.min_level = int(self.min_level)
        _require(max(self.min_level, 3) <= int(self.max_level) <= fpn_ops.MAX_LEVEL_RANGE[1],
                 "max_level", f"in [max(min_level, 3), 7] (min_level={self.min_level})",
                 self.max_level)
        self.max_level = int(self.max_level)
        for name in ("fpn_width", "head_width", "head_depth", "pre_nms_top_k"):
            value = getattr(self, name)
            _require(int(value) >= (0 if name == "head_depth" else 1), name,
                     ">= 0" if name == "head_depth" else ">= 1", value)
            setattr(self, name, int(value))
        num_levels = self.max_level - self.min_level + 1
        sizes = tuple(float(s) for s in self.anchor_sizes)
        _require(len(sizes) == num_levels and min(sizes) > 0, "anchor_sizes",
                 f"{num_levels} positive sizes in pixels (one per level P{self.min_level}.."
                 f"P{self.max_level})", self.anchor_sizes)
        self.anchor_sizes = sizes
        for name in ("anchor_scales", "aspect_ratios"):
            values = tuple(float(v) for v in getattr(self, name))
            _require(len(values) >= 1 and min(values) > 0, name, "a non-empty list of positive "
                     "numbers", getattr(self, name))
            setattr(self, name, values)
        for name in ("positive_iou", "negative_iou", "focal_alpha", "detection_nms_iou"):
            value = getattr(self, name)
            _require(0.0 <= float(value) <= 1.0, name, "in [0, 1]", value)
            setattr(self, name, float(value))
        _require(self.negative_iou <= self.positive_iou, "negative_iou",
                 f"<= positive_iou ({self.positive_iou})", self.negative_iou)
        self.low_quality_matches = bool(self.low_quality_matches)
        _require(self.head_init in HEAD_INITS, "head_init", f"one of {HEAD_INITS}",
                 self.head_init)
        _require(self.classification_loss in CLASSIFICATION_LOSSES, "classification_loss",
                 f"one of {CLASSIFICATION_LOSSES}", self.classification_loss)
        _require(float(self.focal_gamma) >= 0.0, "focal_gamma", ">= 0", self.focal_gamma)
        self.focal_gamma = float(self.focal_gamma)
        _require(0.0 < float(self.prior_probability) < 1.0, "prior_probability", "in (0, 1)",
                 self.prior_probability)
        self.prior_probability = float(self.prior_probability)
        weights = tuple(float(w) for w in self.box_weights)
        _require(len(weights) == 4 and min(weights) > 0, "box_weights",
                 "4 positive numbers (wy, wx, wh, ww)", self.box_weights)
        self.box_weights = weights
        _require(float(self.smooth_l1_beta) > 0.0, "smooth_l1_beta", "> 0", self.smooth_l1_beta)
        self.smooth_l1_beta = float(self.smooth_l1_beta)
        _require(float(self.box_loss_weight) >= 0.0, "box_loss_weight", ">= 0",
                 self.box_loss_weight)
        self.box_loss_weight = float(self.box_loss_weight)

    @property
    def num_anchors_per_location(self):
        return len(self.anchor_scales) * len(self.aspect_ratios)


# ----------------------------------------------------------------------------------
# anchors
# ----------------------------------------------------------------------------------
def pyramid_anchors(image_size, level_sizes, anchor_sizes=BASE_ANCHOR_SIZES,
                    anchor_scales=ANCHOR_SCALES, aspect_ratios=ASPECT_RATIOS):
    """Anchors of every pyramid level, concatenated finest level first (NumPy).

    Level ``l`` with a ``h x w`` map has stride ``image / map``, and at each location
    ``len(anchor_scales) x len(aspect_ratios)`` anchors of sizes ``base * scale`` (area =
    size², ``anchors.generate_anchors``' order: location-major, ratio-major, scale-minor),
    the order of the subnets' reshaped outputs.

    Args:
        image_size: ``(height, width)`` in pixels.
        level_sizes: ``[(h, w), ...]`` feature-map size of each level.
        anchor_sizes: base size in pixels of each level; anchor_scales, aspect_ratios: as above.
    Returns:
        ``(anchors, counts)``: float32 ``[A, 4]`` normalized yxyx, and the number of anchors of
        each level (``h * w * k``).
    """
    height, width = image_size
    all_anchors, counts = [], []
    for (feature_height, feature_width), base in zip(level_sizes, anchor_sizes):
        level = anchor_ops.generate_anchors(
            int(feature_height), int(feature_width),
            (height / feature_height, width / feature_width),
            scales=[base * scale for scale in anchor_scales], aspect_ratios=aspect_ratios,
            image_height=height, image_width=width, normalized=True).numpy()
        all_anchors.append(level)
        counts.append(level.shape[0])
    return np.concatenate(all_anchors).astype(np.float32), tuple(counts)


# ----------------------------------------------------------------------------------
# the subnets
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class RetinaNetSubnet(keras.layers.Layer):
    """A RetinaNet subnet, shared by every pyramid level (Lin et al. 2017, sec. 4, fig. 3c/d).

    ``depth`` conv3x3 layers of ``width`` channels with ReLU, then a conv3x3 with
    ``num_anchors * outputs_per_anchor`` channels (no activation). The last conv starts from
    Gaussian weights with sigma = 0.01 and zero bias, except the last bias of the
    classification subnet: ``-log((1 - pi) / pi)`` when ``prior_probability`` is ``pi``
    (sec. 4, "Initialization"). The hidden convs (zero bias) start from He et al. 2015's
    normal initialisation (``hidden_init="he"``) or, as in the paper, sigma = 0.01
    (``"paper"``). The paper's sigma suits its 256-wide subnets trained with SGD; in our 64-
    (or 16-) wide subnets trained with Adam it shrinks the signal by ~5x per layer, and on a
    fixed batch the classification loss stays at its starting value for the first ~40 steps
    (measured), while with He's it falls at once.

    Input:
        ``feature_map`` ``[batch, H, W, C]`` (one pyramid level).
    Output:
        ``[batch, H * W * num_anchors, outputs_per_anchor]``: the class logits (``K``
        outputs) or the box deltas (4), in the anchors' order (location, then anchor).

    Args:
        num_anchors: anchors per location (9); outputs_per_anchor: ``K`` or 4.
        width, depth: the hidden convolutions (256 and 4 in the paper).
        prior_probability: ``pi`` for the classification subnet; None (the box subnet): bias 0.
        hidden_init: ``"he"`` or ``"paper"`` (sigma = 0.01), for the hidden convs.
    """

    def __init__(self, num_anchors, outputs_per_anchor, width=256, depth=4,
                 prior_probability=None, hidden_init="he", **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.outputs_per_anchor = int(outputs_per_anchor)
        self.width = int(width)
        self.depth = int(depth)
        self.prior_probability = None if prior_probability is None else float(prior_probability)
        if self.prior_probability is None:
            bias = 0.0
        else:
            if not 0.0 < self.prior_probability < 1.0:
                raise ValueError(f"`prior_probability` must be in (0, 1) or None, got "
                                 f"{prior_probability}")
            bias = -math.log((1.0 - self.prior_probability) / self.prior_probability)
        self.final_bias = bias
        if hidden_init not in HEAD_INITS:
            raise ValueError(f"`hidden_init` must be one of {HEAD_INITS}, got {hidden_init!r}")
        self.hidden_init = hidden_init

        def gaussian():
            return keras.initializers.RandomNormal(stddev=0.01)

        def hidden():
            return keras.initializers.HeNormal() if hidden_init == "he" else gaussian()

        self.hidden_convs = [
            keras.layers.Conv2D(self.width, 3, padding="same", activation="relu",
                                kernel_initializer=hidden(), bias_initializer="zeros",
                                name=f"conv{i + 1}")
            for i in range(self.depth)]
        self.final_conv = keras.layers.Conv2D(
            self.num_anchors * self.outputs_per_anchor, 3, padding="same",
            kernel_initializer=gaussian(),
            bias_initializer=keras.initializers.Constant(bias), name="final_conv")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for conv in self.hidden_convs:
            conv.build(shape)
            shape = (*shape[:3], self.width)
        self.final_conv.build(shape)
        self.built = True

    def call(self, feature_map):
        x = feature_map
        for conv in self.hidden_convs:
            x = conv(x)  # [batch, H, W, width]
        x = self.final_conv(x)  # [batch, H, W, num_anchors * outputs_per_anchor]
        shape = tf.shape(x)
        return tf.reshape(x, [shape[0], shape[1] * shape[2] * self.num_anchors,
                              self.outputs_per_anchor])

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self.num_anchors, outputs_per_anchor=self.outputs_per_anchor,
                      width=self.width, depth=self.depth,
                      prior_probability=self.prior_probability, hidden_init=self.hidden_init)
        return config


# ----------------------------------------------------------------------------------
# training targets and loss
# ----------------------------------------------------------------------------------
def assign_retinanet_targets(anchors, gt_boxes, gt_classes, num_classes, positive_iou=0.5,
                             negative_iou=0.4, low_quality_matches=True,
                             box_weights=(1.0, 1.0, 1.0, 1.0)):
    """Targets of every anchor (Lin et al. 2017, sec. 4, "Training"): no sampling.

    "Anchors are assigned to ground-truth object boxes using an intersection-over-union (IoU)
    threshold of 0.5; and to background if their IoU is in [0, 0.4). ... Anchors with IoU in
    [0.4, 0.5) are ignored during training."

    Args:
        anchors: ``[A, 4]`` normalized yxyx.
        gt_boxes: ``[batch, N, 4]`` normalized yxyx; gt_classes: ``[batch, N]`` (-1 padding).
        num_classes: ``K``.
        positive_iou, negative_iou, low_quality_matches: the matcher (``targets.match_iou``).
        box_weights: scale weights of ``boxes.encode_boxes``.
    Returns:
        dict: ``labels`` ``[batch, A]`` int32 (1 object, 0 background, -1 ignored),
        ``class_targets`` ``[batch, A, K]`` float32 (one-hot rows for positives, zeros
        otherwise), ``box_targets`` ``[batch, A, 4]`` (encoded, zero unless positive),
        ``matched_iou`` ``[batch, A]``.
    """
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    gt_boxes, gt_classes, gt_valid = targets.check_detection_targets(gt_boxes, gt_classes)
    iou = box_ops.pairwise_iou(anchors[None], gt_boxes)  # [batch, A, N]
    matched_index, labels, matched_iou = targets.match_iou(
        iou, gt_valid, positive_threshold=positive_iou, negative_threshold=negative_iou,
        negative_lower_bound=0.0, allow_low_quality_matches=low_quality_matches)
    positive = tf.equal(labels, targets.POSITIVE)  # [batch, A]
    matched_classes = tf.gather(gt_classes, matched_index, batch_dims=1)  # [batch, A]
    class_targets = tf.one_hot(tf.where(positive, matched_classes, -1), num_classes)  # -1: zeros
    matched_boxes = tf.gather(gt_boxes, matched_index, batch_dims=1)  # [batch, A, 4]
    box_targets = box_ops.encode_boxes(matched_boxes, anchors[None], weights=box_weights)
    box_targets = tf.where(positive[..., None], box_targets, 0.0)
    return {"labels": labels, "class_targets": class_targets, "box_targets": box_targets,
            "matched_iou": matched_iou}


def retinanet_loss(class_logits, box_deltas, labels, class_targets, box_targets,
                   classification_loss="focal", alpha=0.25, gamma=2.0, smooth_l1_beta=0.1,
                   box_loss_weight=1.0):
    """RetinaNet's two losses, both divided by the number of positive anchors (at least 1).

    * classification: the focal loss (``"focal"``) or plain binary cross-entropy
      (``"cross_entropy"``: no alpha, gamma = 0) summed over every non-ignored anchor and
      every class (sec. 4, "Training");
    * box: smooth L1 of the deltas of the positive anchors, summed over the 4 coordinates.

    Args:
        class_logits: ``[batch, A, K]``; box_deltas: ``[batch, A, 4]``.
        labels, class_targets, box_targets: from ``assign_retinanet_targets``.
        classification_loss: ``"focal"`` or ``"cross_entropy"``.
        alpha, gamma: the focal loss; smooth_l1_beta, box_loss_weight: the box loss.
    Returns:
        ``(class_loss, box_loss)``: scalars. The positive count is averaged over the replicas
        under ``tf.distribute`` (``targets.mean_over_replicas``).
    """
    if classification_loss not in CLASSIFICATION_LOSSES:
        raise ValueError(f"`classification_loss` must be one of {CLASSIFICATION_LOSSES}, got "
                         f"{classification_loss!r}")
    labels = tf.cast(labels, tf.int32)
    positive = tf.cast(tf.equal(labels, targets.POSITIVE), tf.float32)  # [batch, A]
    counted = tf.cast(labels != targets.IGNORED, tf.float32)  # [batch, A]
    num_positives = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(positive)), 1.0)
    if classification_loss == "focal":
        per_element = sigmoid_focal_loss(class_targets, class_logits, alpha=alpha, gamma=gamma)
    else:  # the ablation: plain binary cross-entropy
        per_element = sigmoid_focal_loss(class_targets, class_logits, alpha=None, gamma=0.0)
    class_loss = tf.reduce_sum(per_element * counted[..., None]) / num_positives
    box_error = tf.reduce_sum(
        smooth_l1(tf.cast(box_deltas, tf.float32) - box_targets, smooth_l1_beta), axis=-1)
    box_loss = box_loss_weight * tf.reduce_sum(box_error * positive) / num_positives
    return class_loss, box_loss


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
def build_pyramid_backbone(config):
    """The chapter-4 backbone cut at the strides ``2**min_level`` .. 32 (a dict of maps),
    with synchronized BatchNorm if the config asks for it."""
    from ch04_classification.models import get_feature_pyramid
    from common.training import synchronize_batchnorm

    backbone = get_feature_pyramid(config.backbone, (*config.image_size, 3),
                                   strides=fpn_ops.backbone_strides(config.min_level),
                                   **config.backbone_options)
    if config.synchronized_batch_norm:
        backbone = synchronize_batchnorm(backbone)
    return backbone


@keras.saving.register_keras_serializable(package="ch05_detection")
class RetinaNet(Detector):
    """RetinaNet (Lin et al. 2017) on a chapter-4 backbone with a feature pyramid.

    Input:
        ``images`` ``[batch, H, W, 3]`` float in [0, 1] (resized to ``image_size``).
    ``call`` returns the raw outputs, a dict:
        ``class_logits`` ``[batch, A, K]`` and ``box_deltas`` ``[batch, A, 4]`` for the ``A``
        anchors of every level (``self.anchors``, ``[A, 4]`` normalized yxyx, finest level
        first; ``self.level_anchor_counts`` anchors per level).
    ``detect`` / ``predict`` return the padded detections of the detector interface.

    ``fit`` takes batches of the detection contract. Build it from options,
    ``RetinaNet(5, image_size=(64, 64), anchor_sizes=(8, 16, 32))``, or from a
    ``RetinaNetConfig``; see there for every option.
    """

    CONFIG_CLASS = RetinaNetConfig
    LOSS_NAMES = ("loss", "class_loss", "box_loss")

    def __init__(self, num_classes=None, config=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        config = self.config
        self.backbone = build_pyramid_backbone(config)
        self.fpn = fpn_ops.FeaturePyramid(config.fpn_width, config.min_level, config.max_level,
                                          name="fpn")
        num_anchors = config.num_anchors_per_location
        self.class_subnet = RetinaNetSubnet(num_anchors, config.num_classes, config.head_width,
                                            config.head_depth,
                                            prior_probability=config.prior_probability,
                                            hidden_init=config.head_init, name="class_subnet")
        self.box_subnet = RetinaNetSubnet(num_anchors, 4, config.head_width, config.head_depth,
                                          prior_probability=None, hidden_init=config.head_init,
                                          name="box_subnet")
        self.level_names = fpn_ops.level_names(config.min_level, config.max_level)
        self.level_sizes = self._level_sizes()
        # Anchors depend only on the fixed image size: NumPy constants, not weights.
        self.anchors, self.level_anchor_counts = pyramid_anchors(
            config.image_size, self.level_sizes, config.anchor_sizes, config.anchor_scales,
            config.aspect_ratios)  # [A, 4], (A_3, A_4, ...)
        self.build_weights()

    def _level_sizes(self):
        """``[(h, w)]`` of every level: the backbone's maps, then halved (rounding up, the
        stride-2 'same' convolutions of P6 and P7)."""
        maps = self.backbone.output
        sizes = [tuple(int(s) for s in maps[f"stride_{2 ** level}"].shape[1:3])
                 for level in range(self.config.min_level, fpn_ops.BACKBONE_MAX_LEVEL + 1)]
        for _ in range(fpn_ops.BACKBONE_MAX_LEVEL + 1, self.config.max_level + 1):
            height, width = sizes[-1]
            sizes.append((-(-height // 2), -(-width // 2)))
        return sizes

    @property
    def level_strides(self):
        """Image pixels per feature cell of every level (8, 16, 32 for 128-px images)."""
        height = self.config.image_size[0]
        return tuple(height / size[0] for size in self.level_sizes)

    def pyramid(self, images, training=False):
        """The feature pyramid ``{"P3": [batch, H/8, W/8, fpn_width], ...}`` of ``images``."""
        features = self.backbone(self._resize(images), training=training)
        return self.fpn(features)

    def call(self, images, training=False):
        """Raw outputs: ``class_logits`` ``[batch, A, K]``, ``box_deltas`` ``[batch, A, 4]``."""
        pyramid = self.pyramid(images, training=training)
        class_logits = tf.concat([self.class_subnet(pyramid[name]) for name in self.level_names],
                                 axis=1)  # [batch, A, K]
        box_deltas = tf.concat([self.box_subnet(pyramid[name]) for name in self.level_names],
                               axis=1)  # [batch, A, 4]
        return {"class_logits": class_logits, "box_deltas": box_deltas}

    def assign_targets(self, gt_boxes, gt_classes):
        """``assign_retinanet_targets`` with this model's anchors and options."""
        config = self.config
        return assign_retinanet_targets(
            self.anchors, gt_boxes, gt_classes, config.num_classes,
            positive_iou=config.positive_iou, negative_iou=config.negative_iou,
            low_quality_matches=config.low_quality_matches, box_weights=config.box_weights)

    def losses_for(self, images, gt_boxes, gt_classes, training, step):
        """``loss`` = ``class_loss`` + ``box_loss`` (``retinanet_loss``); no sampling, so
        ``step`` is not used."""
        config = self.config
        outputs = self(images, training=training)
        assigned = self.assign_targets(gt_boxes, gt_classes)
        class_loss, box_loss = retinanet_loss(
            outputs["class_logits"], outputs["box_deltas"], assigned["labels"],
            assigned["class_targets"], assigned["box_targets"],
            classification_loss=config.classification_loss, alpha=config.focal_alpha,
            gamma=config.focal_gamma, smooth_l1_beta=config.smooth_l1_beta,
            box_loss_weight=config.box_loss_weight)
        return {"loss": class_loss + box_loss, "class_loss": class_loss, "box_loss": box_loss}

    def decode(self, outputs):
        """Sigmoid scores, the top ``pre_nms_top_k`` (anchor, class) pairs of each level, their
        boxes, then per-class NMS and the best ``max_detections`` (sec. 4, "Inference").

        Returns the padded detections (``detector.select_detections``; its score threshold,
        ``score_threshold`` = 0.05, drops the weak candidates).
        """
        config = self.config
        num_classes = config.num_classes
        scores = tf.sigmoid(tf.cast(outputs["class_logits"], tf.float32))  # [batch, A, K]
        boxes = box_ops.decode_boxes(tf.cast(outputs["box_deltas"], tf.float32),
                                     self.anchors[None], weights=config.box_weights)  # [b, A, 4]
        candidate_boxes, candidate_scores = [], []
        start = 0
        for count in self.level_anchor_counts:
            level_scores = tf.reshape(scores[:, start:start + count],
                                      [-1, count * num_classes])  # [batch, a * K]
            top_k = min(config.pre_nms_top_k, count * num_classes)
            top_scores, top_index = tf.math.top_k(level_scores, k=top_k)  # [batch, k]
            anchor_index = top_index // num_classes + start  # [batch, k]
            class_index = top_index % num_classes
            candidate_boxes.append(tf.gather(boxes, anchor_index, batch_dims=1))  # [b, k, 4]
            # Each candidate is one (anchor, class) pair: its score in its class's column.
            candidate_scores.append(tf.one_hot(class_index, num_classes) * top_scores[..., None])
            start += count
        return select_detections(
            tf.concat(candidate_boxes, axis=1), tf.concat(candidate_scores, axis=1),
            score_threshold=config.score_threshold, iou_threshold=config.detection_nms_iou,
            max_detections=config.max_detections)


# ----------------------------------------------------------------------------------
# train_detector.py
# ----------------------------------------------------------------------------------
# The default run: shapes, 128 px, ~4000 training images (250 steps of 16 per epoch) on a 2-core
# CPU. A step takes ~0.25 s with the CPU shared (measured, resnet_small width 32), less alone:
# 14 minutes hold ~13 to 20 epochs. The time budget ends the run after the last epoch that fits
# and shortens the cosine decay to end there, so 20 planned epochs use the whole budget. Adam at
# 2e-3 after a 1-epoch warm-up, as Faster R-CNN's default run.
TRAIN_DEFAULTS = {"epochs": 20, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 1.0,
                  "time_budget_minutes": 14.0}


def from_options(options, num_classes, class_names, train_boxes):
    """Build RetinaNet for ``train_detector.py`` from its options (see the module doc).

    Uses ``image_size``, ``backbone``, ``backbone_width`` (resnet_small: filters
    ``[w, 2w, 4w, 8w]``), ``seed``, ``flip``, ``max_detections`` and ``classification_loss``;
    the anchor base sizes are ``BASE_ANCHOR_SIZES`` grown with the image size. ``train_boxes``
    is not used: RetinaNet's anchors are fixed by design, not fitted to the data.
    """
    del train_boxes  # the anchors are designed, not learnt from the boxes (unlike YOLOv2's)
    size = int(options.image_size)
    backbone_options = backbone_options_for(options.backbone, options.backbone_width)
    return RetinaNet(
        num_classes, class_names=tuple(class_names), image_size=(size, size),
        backbone=options.backbone, backbone_options=backbone_options,
        anchor_sizes=anchor_ops.anchor_scales_for(size, base_scales=BASE_ANCHOR_SIZES),
        classification_loss=getattr(options, "classification_loss", "focal"),
        flip_augment=bool(options.flip), seed=int(options.seed),
        max_detections=int(options.max_detections), name="retinanet")
