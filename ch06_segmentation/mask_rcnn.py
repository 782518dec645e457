"""Mask R-CNN: chapter 5's Faster R-CNN plus a small mask branch for every box.

He, Gkioxari, Dollár and Girshick 2017, "Mask R-CNN". Semantic segmentation (U-Net) gives
every pixel a class, so two touching shapes of one class become one blob; instance
segmentation gives every *object* its own mask. Mask R-CNN does it by adding a third
branch to Faster R-CNN's second stage, beside classification and box regression:

* **RoIAlign** (``ch05_detection/roi_ops.py``) cuts a 14 x 14 feature for each RoI without
  rounding its coordinates (sec. 3, "RoIAlign"): the exact position matters for masks;
* the **mask head** (``MaskHead``, fig. 4 right): four 3x3 convolutions, a 2x2 transposed
  convolution with stride 2 (14 -> 28) and a 1x1 convolution to ``K`` mask logits, one
  28 x 28 mask per class;
* **mask targets** (``mask_targets``): the ground-truth mask of the object a positive RoI
  was matched to, cropped to the RoI and resized to 28 x 28 (``tf.image.crop_and_resize``),
  binarized at 0.5 (sec. 3, "Training": "the intersection between an RoI and its
  associated ground-truth mask");
* the **mask loss** (``mask_loss``): per-pixel binary cross-entropy on the channel of the
  ground-truth class *only*, averaged over the 28 x 28 pixels and the positive RoIs (sec. 3,
  "Loss function"): the classes do not compete for a pixel, the box branch chooses the
  class. (A softmax over classes per pixel costs 5.5 AP, table 2b.)
* at **inference** (sec. 3, "Inference"): the box branch's detections go through NMS first,
  then the mask branch runs on the (at most 100) detected boxes; each detection's mask is
  the channel of its predicted class, resized to its box, pasted into the image
  (``paste_masks``) and binarized at 0.5.

``MaskRCNN`` subclasses ``FasterRCNN`` (same options, RPN, heads and training schedule) and
adds the branch through Faster R-CNN's ``roi_losses`` hook. ``detect(images)`` returns the
detector interface's padded detections plus ``masks`` ``[batch, D, H, W]`` uint8 and
``mask_probabilities`` ``[batch, D, 28, 28]``. ``fit`` takes batches of the instance
segmentation contract: detection keys plus ``masks`` ``[batch, N, H, W]``
(``common.data.batch_detection(..., with_masks=True)``).

Below the model: pycocotools ``segm`` evaluation on RLE masks (``coco_mask_json``,
``coco_mask_map``), the semantic-versus-instance object count (``compare_semantic_and_instance``)
and pictures (``draw_instances``, ``draw_mask_targets``, ``draw_semantic_vs_instance``).
Train it::

    python ch06_segmentation/train_mask_rcnn.py --fast
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import roi_ops, targets
from ch05_detection.detector import _require
from ch05_detection.faster_rcnn import _STAGES, FasterRCNN, FasterRCNNConfig

MASK_THRESHOLD = 0.5  # sec. 3, "Inference": "binarized at a threshold of 0.5"


# ----------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------
@dataclass
class MaskRCNNConfig(FasterRCNNConfig):
    """Every option of ``MaskRCNN``: those of ``FasterRCNNConfig`` and the mask branch's.

    Args:
        mask_pool_size: RoIAlign output of the mask branch (14 x 14, He et al. 2017, fig. 4);
            the masks are twice that (28 x 28) after the transposed convolution.
        mask_channels: channels of the mask head's convolutions (256 in the paper; fewer
            suffice for the 128-pixel shapes and keep the CPU step short).
        mask_convs: 3x3 convolutions before the upsampling (4 in the paper).
        mask_feature_channels: a 1x1 convolution (ReLU) reduces the detector's feature map to
            this many channels before the mask branch's RoIAlign (0: no reduction). The
            paper's FPN features have as many channels as its mask head (256); here the
            backbone's 256 channels at 14 x 14 x 4 samples per RoI would make RoIAlign and its
            gradient the slowest part of the CPU step.
        mask_sampling_ratio: RoIAlign samples per bin and axis (2: "four regular locations",
            sec. 3; the paper finds the results insensitive to it).
        mask_loss_weight: weight of the mask loss in the total (1 in the paper: "L = L_cls +
            L_box + L_mask").
        mask_threshold: binarization of the pasted mask probabilities (0.5).
    """

    mask_pool_size: int = 14
    mask_channels: int = 32
    mask_convs: int = 4
    mask_feature_channels: int = 32
    mask_sampling_ratio: int = 2
    mask_loss_weight: float = 1.0
    mask_threshold: float = MASK_THRESHOLD

    def __post_init__(self):
        super().__post_init__()
        for name in ("mask_pool_size", "mask_channels", "mask_convs", "mask_sampling_ratio"):
            value = getattr(self, name)
            _require(int(value) >= 1, name, ">= 1", value)
            setattr(self, name, int(value))
        _require(int(self.mask_feature_channels) >= 0, "mask_feature_channels", ">= 0 (0: none)",
                 self.mask_feature_channels)
        self.mask_feature_channels = int(self.mask_feature_channels)
        _require(float(self.mask_loss_weight) >= 0.0, "mask_loss_weight", ">= 0",
                 self.mask_loss_weight)
        self.mask_loss_weight = float(self.mask_loss_weight)
        _require(0.0 < float(self.mask_threshold) < 1.0, "mask_threshold", "in (0, 1)",
                 self.mask_threshold)
        self.mask_threshold = float(self.mask_threshold)

    @property
    def mask_size(self):
        """Side of the predicted masks: twice ``mask_pool_size`` (28)."""
        return 2 * self.mask_pool_size


# ----------------------------------------------------------------------------------
# the mask head
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch06_segmentation")
class MaskHead(keras.layers.Layer):
    """The mask branch of Mask R-CNN (He et al. 2017, fig. 4, right: the head on FPN features).

    ``num_convs`` 3x3 convolutions with ReLU, a 2x2 transposed convolution with stride 2
    (doubling the RoI grid) with ReLU, and a 1x1 convolution to one logit per class and pixel.

    Input:
        ``pooled_features`` ``[batch, R, p, p, C]`` (RoIAlign, ``p = 14``).
    Output:
        ``mask_logits`` ``[batch, R, 2p, 2p, num_classes]`` (28 x 28 per class).

    Args:
        num_classes: foreground classes K (one mask each; no background mask).
        channels: width of the convolutions (256 in the paper).
        num_convs: 3x3 convolutions before upsampling (4 in the paper).
    """

    def __init__(self, num_classes, channels=256, num_convs=4, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
        if int(channels) < 1 or int(num_convs) < 1:
            raise ValueError(f"`channels` and `num_convs` must be >= 1, got {channels}, "
                             f"{num_convs}")
        self.num_classes, self.channels, self.num_convs = (int(num_classes), int(channels),
                                                           int(num_convs))
        self.convs = [keras.layers.Conv2D(self.channels, 3, padding="same", activation="relu",
                                          kernel_initializer="he_normal", name=f"mask_conv{i + 1}")
                      for i in range(self.num_convs)]
        self.upsample = keras.layers.Conv2DTranspose(
            self.channels, 2, strides=2, activation="relu", kernel_initializer="he_normal",
            name="mask_deconv")
        self.predictor = keras.layers.Conv2D(self.num_classes, 1, name="mask_logits")

    def build(self, input_shape):
        pool_h, pool_w, channels = input_shape[-3], input_shape[-2], input_shape[-1]
        if None in (pool_h, pool_w, channels):
            raise ValueError(f"`pooled_features` needs a static pool size and channel count, got "
                             f"{input_shape}")
        self.pooled_shape = (int(pool_h), int(pool_w), int(channels))
        shape = (None, pool_h, pool_w, channels)
        for conv in self.convs:
            conv.build(shape)
            shape = (None, pool_h, pool_w, self.channels)
        self.upsample.build(shape)
        self.predictor.build((None, 2 * pool_h, 2 * pool_w, self.channels))

    def call(self, pooled_features):
        shape = tf.shape(pooled_features)
        batch_size, num_rois = shape[0], shape[1]
        pool_h, pool_w, channels = self.pooled_shape
        x = tf.reshape(pooled_features, [-1, pool_h, pool_w, channels])  # [batch*R, p, p, C]
        for conv in self.convs:
            x = conv(x)  # [batch*R, p, p, channels]
        x = self.upsample(x)  # [batch*R, 2p, 2p, channels]
        logits = self.predictor(x)  # [batch*R, 2p, 2p, K]
        return tf.reshape(logits, [batch_size, num_rois, 2 * pool_h, 2 * pool_w,
                                   self.num_classes])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], 2 * input_shape[2], 2 * input_shape[3],
                self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, channels=self.channels,
                      num_convs=self.num_convs)
        return config


# ----------------------------------------------------------------------------------
# targets, loss, pasting
# ----------------------------------------------------------------------------------
def aligned_crop_boxes(rois, height, width, crop_size):
    """The boxes to give ``tf.image.crop_and_resize`` so it samples a RoI's grid cell centres.

    ``crop_and_resize`` maps a normalized coordinate ``t`` to the pixel index ``t * (H - 1)``
    and samples from the first to the last edge inclusive. A 28 x 28 mask target should read
    the mask at the *centres* of 28 equal cells of the RoI's continuous span ``[ymin * H,
    ymax * H]`` (pixel ``k`` has its centre at ``k + 0.5``): sample ``i`` at index
    ``ymin * H + (i + 0.5) * h / 28 - 0.5`` with ``h = (ymax - ymin) * H``, the same grid as
    ``roi_ops.roi_align`` (``aligned=True``). Returns ``[..., 4]`` boxes that put the first and
    last samples there.
    """
    rois = tf.cast(rois, tf.float32)
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(rois, num=4, axis=-1)
    half_y = 0.5 * (ymax - ymin) * height / crop_size
    half_x = 0.5 * (xmax - xmin) * width / crop_size
    # max(size - 1, 1): a 1-pixel mask has a single index.
    return tf.stack([(ymin * height + half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
                     (xmin * width + half_x - 0.5) / tf.maximum(width - 1.0, 1.0),
                     (ymax * height - half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
                     (xmax * width - half_x - 0.5) / tf.maximum(width - 1.0, 1.0)], axis=-1)


def matched_ground_truth(rois, gt_boxes, gt_classes):
    """Index ``[batch, R]`` of the ground-truth box each RoI overlaps most (padding rows never).

    The same rule as ``targets.match_iou`` (argmax of the IoU over the valid boxes), which
    ``detection_head.sample_rois`` used to label a RoI foreground: for a foreground RoI this is
    the object whose class and box it was given.
    """
    iou = box_ops.pairwise_iou(tf.cast(rois, tf.float32), tf.cast(gt_boxes, tf.float32))
    iou = tf.where((gt_classes >= 0)[:, None, :], iou, -1.0)  # [batch, R, N]
    # A column of -1 keeps argmax defined when N == 0 (index N is mapped to 0).
    shape = tf.shape(iou)
    padded = tf.concat([iou, -tf.ones(tf.stack([shape[0], shape[1], 1]))], axis=-1)
    index = tf.argmax(padded, axis=-1, output_type=tf.int32)
    return tf.where(index >= tf.shape(iou)[-1], 0, index)


def mask_targets(gt_masks, rois, matched_index, mask_size=28, binarize=True):
    """Mask R-CNN's mask targets: each RoI's matched ground-truth mask cropped to the RoI and
    resized to ``mask_size`` x ``mask_size``, binarized at 0.5 (He et al. 2017, sec. 3).

    Args:
        gt_masks: ``[batch, N, H, W]`` instance masks (0/1, any dtype), one per ground-truth box.
        rois: ``[batch, R, 4]`` normalized yxyx.
        matched_index: ``[batch, R]`` int, the ground-truth row of each RoI.
        mask_size: side of the targets (28).
        binarize: threshold at 0.5 (False: the bilinear samples, for pictures and tests).
    Returns:
        ``[batch, R, mask_size, mask_size]`` float32 in {0, 1}. Samples outside the image read 0.
    """
    gt_masks = tf.cast(gt_masks, tf.float32)
    shape = tf.shape(gt_masks)
    batch, num_gt, height, width = shape[0], shape[1], shape[2], shape[3]
    num_rois = tf.shape(rois)[1]
    images = tf.reshape(gt_masks, tf.stack([batch * num_gt, height, width, 1]))
    # With no ground truth at all (N = 0) there is no mask to read: one zero mask is appended
    # (row batch * N), which the RoIs of such a batch (matched index 0) read.
    images = tf.concat([images, tf.zeros(tf.stack([1, height, width, 1]))], axis=0)
    # Row of the flattened masks for each RoI: image b's object j is row b * N + j.
    rows = tf.range(batch)[:, None] * num_gt + tf.cast(matched_index, tf.int32)  # [batch, R]
    rows = tf.minimum(rows, batch * num_gt)
    boxes = aligned_crop_boxes(rois, height, width, mask_size)
    crops = tf.image.crop_and_resize(images, tf.reshape(boxes, [-1, 4]), tf.reshape(rows, [-1]),
                                     [mask_size, mask_size], method="bilinear",
                                     extrapolation_value=0.0)  # [batch*R, m, m, 1]
    crops = tf.reshape(crops, tf.stack([batch, num_rois, mask_size, mask_size]))
    return tf.cast(crops >= 0.5, tf.float32) if binarize else crops


def mask_loss(mask_logits, mask_targets_, class_targets):
    """Average per-pixel binary cross-entropy on the ground-truth class's channel only.

    He et al. 2017, sec. 3 ("Loss function"): for a RoI of ground-truth class k, only the k-th
    mask contributes; the other K - 1 channels get no gradient, so classes do not compete.
    Defined on positive RoIs only; averaged over the m x m pixels and over the positives
    (``max(1, count)``, all-reduced under ``tf.distribute``).

    Args:
        mask_logits: ``[batch, R, m, m, K]``.
        mask_targets_: ``[batch, R, m, m]`` in {0, 1}.
        class_targets: ``[batch, R]`` int (``c + 1`` for a RoI of class c, 0 background,
            -1 padding: the Fast R-CNN head's targets).
    Returns:
        scalar loss.
    """
    class_targets = tf.cast(class_targets, tf.int32)
    positive = tf.cast(class_targets > 0, tf.float32)  # [batch, R]
    channel = tf.maximum(class_targets - 1, 0)
    logits = tf.cast(mask_logits, tf.float32)
    logits = tf.transpose(logits, [0, 1, 4, 2, 3])  # [batch, R, K, m, m]
    chosen = tf.gather(logits, channel, axis=2, batch_dims=2)  # [batch, R, m, m]
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(mask_targets_, tf.float32),
                                                  logits=chosen)
    per_roi = tf.reduce_mean(bce, axis=[2, 3])  # [batch, R]
    count = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(positive)), 1.0)
    return tf.reduce_sum(per_roi * positive) / count


def _paste_weights(start, end, size, mask_size):
    """Bilinear weights ``[..., size, mask_size]`` reading a mask of ``mask_size`` cells that
    spans ``[start, end]`` (normalized) at the centres of ``size`` image pixels; pixels whose
    centre is outside the span get all-zero rows."""
    size_float = tf.cast(size, tf.float32)
    centres = (tf.range(size_float) + 0.5)  # [size] pixel centres
    start_px, end_px = start[..., None] * size_float, end[..., None] * size_float  # [..., 1]
    extent = tf.maximum(end_px - start_px, 1e-6)
    # Inverse of the target grid: mask cell i has its centre at start + (i + 0.5) * extent / m.
    position = (centres - start_px) / extent * mask_size - 0.5  # [..., size]
    position = tf.clip_by_value(position, 0.0, mask_size - 1.0)  # border cells hold to the edge
    lower = tf.floor(position)
    fraction = position - lower
    lower = tf.cast(lower, tf.int32)
    upper = tf.minimum(lower + 1, mask_size - 1)
    weights = (tf.one_hot(lower, mask_size) * (1.0 - fraction)[..., None]
               + tf.one_hot(upper, mask_size) * fraction[..., None])
    inside = tf.logical_and(centres >= start_px, centres <= end_px)  # [..., size]
    return weights * tf.cast(inside, tf.float32)[..., None]


def paste_masks(mask_probabilities, boxes, height, width):
    """Resize each box's m x m mask to the box and paste it into an ``height`` x ``width`` image.

    He et al. 2017, sec. 3 ("Inference"): "The m x m floating-number mask output is then
    resized to the RoI size". Pixel ``(y, x)`` whose centre lies in the box reads the mask by
    bilinear interpolation at its position in the box (the inverse of ``mask_targets``' grid);
    pixels outside the box are 0. Bilinear resizing is separable, so the paste is two small
    matrix products: ``W_y [H, m] @ mask [m, m] @ W_x [m, W]``.

    Args:
        mask_probabilities: ``[batch, D, m, m]`` in [0, 1].
        boxes: ``[batch, D, 4]`` normalized yxyx.
        height, width: output size in pixels.
    Returns:
        ``[batch, D, height, width]`` float32 probabilities (threshold them at 0.5).
    """
    mask_probabilities = tf.cast(mask_probabilities, tf.float32)
    mask_size = int(mask_probabilities.shape[-1])
    ymin, xmin, ymax, xmax = tf.unstack(tf.cast(boxes, tf.float32), num=4, axis=-1)
    rows = _paste_weights(ymin, ymax, height, mask_size)  # [batch, D, H, m]
    cols = _paste_weights(xmin, xmax, width, mask_size)  # [batch, D, W, m]
    half = tf.einsum("bdhi,bdij->bdhj", rows, mask_probabilities)  # [batch, D, H, m]
    return tf.einsum("bdhj,bdwj->bdhw", half, cols)  # [batch, D, H, W]


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch06_segmentation")
class MaskRCNN(FasterRCNN):
    """Mask R-CNN (He et al. 2017): ``FasterRCNN`` with a mask branch.

    Input: ``images`` ``[batch, H, W, 3]`` in [0, 1] (resized to ``image_size``).
    ``detect`` / ``predict`` return the detector interface's dict (``boxes``, ``classes``,
    ``confidence`` = ``scores``, ``num_detections``, with ``D = max_detections`` rows) plus
    ``masks`` ``[batch, D, H, W]`` uint8 (0/1 at the model's ``image_size``; zeros in padded
    rows) and ``mask_probabilities`` ``[batch, D, 28, 28]`` (the branch's output for the
    detection's class, before pasting).

    ``fit`` takes batches with ``image``, ``boxes``, ``classes`` (padded with -1) and ``masks``
    ``[batch, N, H, W]`` (``common.data.batch_detection(..., with_masks=True)``). Options: those
    of ``FasterRCNN`` plus the mask branch's (``MaskRCNNConfig``); the losses are Faster R-CNN's
    four and ``mask_loss``.
    """

    CONFIG_CLASS = MaskRCNNConfig
    LOSS_NAMES = FasterRCNN.LOSS_NAMES + ("mask_loss",)

    def build_weights(self):
        """Create the mask branch's layers, then every weight with one dummy image.

        ``FasterRCNN.__init__`` calls this after building its own layers (Keras takes no new
        layers once the model is built, so the branch is created here, not after ``__init__``).
        """
        if not hasattr(self, "mask_head"):
            config = self.config
            self.mask_reduce = (keras.layers.Conv2D(config.mask_feature_channels, 1,
                                                    activation="relu", name="mask_reduce")
                                if config.mask_feature_channels else None)
            self.mask_roi_layer = roi_ops.RoIAlign(
                config.mask_pool_size, sampling_ratio=config.mask_sampling_ratio,
                name="mask_roi_align")
            self.mask_head = MaskHead(config.num_classes, channels=config.mask_channels,
                                      num_convs=config.mask_convs, name="mask_head")
        super().build_weights()

    @property
    def mask_size(self):
        return self.config.mask_size

    # ------------------------------------------------------------------ the branch
    def mask_logits_for(self, feature_map, rois):
        """Mask logits ``[batch, R, 28, 28, K]`` for ``rois`` ``[batch, R, 4]`` on the detector's
        feature map (after the branch's 1x1 reduction, ``mask_feature_channels``)."""
        head_map = feature_map if self.mask_reduce is None else self.mask_reduce(feature_map)
        pooled = self.mask_roi_layer(head_map, rois)
        pool = self.config.mask_pool_size
        pooled = tf.reshape(pooled, [tf.shape(rois)[0], tf.shape(rois)[1], pool, pool,
                                     head_map.shape[-1]])
        return self.mask_head(pooled)

    def set_training_stage(self, stage):
        """As ``FasterRCNN.set_training_stage``; the mask branch trains with the detector."""
        super().set_training_stage(stage)
        if hasattr(self, "mask_head"):
            for layer in (self.mask_reduce, self.mask_head):
                if layer is not None:
                    layer.trainable = _STAGES[stage].detector

    # ------------------------------------------------------------------ inference
    def call(self, images, training=False):
        """Raw outputs: Faster R-CNN's (``proposals``, ``num_proposals``, ``class_logits``,
        ``box_deltas``), its NMS'd box detections (``detection_boxes`` ``[batch, D, 4]``,
        ``detection_classes``, ``detection_scores``, ``num_detections``) and the mask branch on
        them (``mask_logits`` ``[batch, D, 28, 28, K]``, zeros in padded rows).

        The mask branch runs on the detections, not the proposals (sec. 3, "Inference": fewer,
        more accurate boxes), and only on the first ``max(num_detections)`` rows of the batch
        (detections come first, padding after).
        """
        images = self._resize(images)
        rpn_map, detector_map = self._both_feature_maps(images, training=False)
        logits, deltas = self.rpn_head(rpn_map)
        proposals, _, count = self.proposal_layer(logits, deltas, self.anchors, training=False)
        class_logits, box_deltas = self.detection_head(self.pool_rois(detector_map, proposals),
                                                       training=False)
        outputs = {"proposals": proposals, "num_proposals": count, "class_logits": class_logits,
                   "box_deltas": box_deltas}
        detections = FasterRCNN.decode(self, outputs)
        max_detections = self.config.max_detections
        used = tf.reduce_max(tf.concat([detections["num_detections"], [0]], axis=0))
        mask_logits = self.mask_logits_for(detector_map, detections["boxes"][:, :used])
        mask_logits = tf.pad(mask_logits, [[0, 0], [0, max_detections - used], [0, 0], [0, 0],
                                           [0, 0]])  # [batch, D, m, m, K]
        outputs.update(detection_boxes=detections["boxes"],
                       detection_classes=detections["classes"],
                       detection_scores=detections["scores"],
                       num_detections=detections["num_detections"], mask_logits=mask_logits)
        return outputs

    def decode(self, outputs):
        """Padded detections with ``masks`` (pasted, 0/1 uint8) and ``mask_probabilities``."""
        classes = outputs["detection_classes"]
        valid = classes >= 0
        logits = tf.transpose(outputs["mask_logits"], [0, 1, 4, 2, 3])  # [batch, D, K, m, m]
        chosen = tf.gather(logits, tf.maximum(classes, 0), axis=2, batch_dims=2)  # [b, D, m, m]
        probabilities = tf.where(valid[..., None, None], tf.sigmoid(chosen), 0.0)
        height, width = self.image_size
        pasted = paste_masks(probabilities, outputs["detection_boxes"], height, width)
        masks = tf.logical_and(pasted >= self.config.mask_threshold, valid[..., None, None])
        scores = outputs["detection_scores"]
        return {"boxes": outputs["detection_boxes"], "classes": classes, "confidence": scores,
                "scores": scores, "num_detections": outputs["num_detections"],
                "masks": tf.cast(masks, tf.uint8), "mask_probabilities": probabilities}

    def detect(self, images, batch_size=16):
        """``FasterRCNN.detect`` plus ``masks`` ``[B, D, H, W]`` uint8 (at ``image_size``) and
        ``mask_probabilities`` ``[B, D, 28, 28]``; zero images give empty arrays."""
        result = super().detect(images, batch_size=batch_size)
        if "masks" not in result:  # no images: the base class's empty dict
            height, width = self.image_size
            result["masks"] = np.zeros((0, self.max_detections, height, width), np.uint8)
            result["mask_probabilities"] = np.zeros(
                (0, self.max_detections, self.mask_size, self.mask_size), np.float32)
        return result

    # ------------------------------------------------------------------ training
    def extra_inputs(self, batch, images):
        """The batch's instance ``masks`` ``[batch, N, H, W]`` for the mask targets."""
        if "masks" not in batch:
            raise ValueError("MaskRCNN.fit expects batches with 'masks' [batch, N, H, W] beside "
                             "'image', 'boxes' and 'classes' (common.data.batch_detection(..., "
                             "with_masks=True))")
        masks = tf.convert_to_tensor(batch["masks"])
        if masks.shape.rank != 4:
            raise ValueError(f"`masks` must be [batch, N, height, width], got shape {masks.shape}")
        boxes_shape = tf.convert_to_tensor(batch["boxes"]).shape
        if (masks.shape[1] is not None and boxes_shape[1] is not None
                and masks.shape[1] != boxes_shape[1]):
            raise ValueError(f"`masks` must hold one mask per box row: {masks.shape[1]} masks for "
                             f"{boxes_shape[1]} boxes")
        return {"gt_masks": masks}

    def flip_extra_inputs(self, extra, images, step):
        """Flip the masks with their images (the same per-image decision as ``_flip``)."""
        masks = tf.transpose(extra["gt_masks"], [0, 2, 3, 1])  # [batch, H, W, N]: an "image"
        batch = tf.shape(masks)[0]
        flipped, _ = self._flip(masks, tf.zeros([batch, 0, 4]), tf.zeros([batch, 0], tf.int32),
                                step)
        return {**extra, "gt_masks": tf.transpose(flipped, [0, 3, 1, 2])}

    def roi_losses(self, feature_map, sample, gt_boxes, gt_classes, training=False,
                   gt_masks=None):
        """The mask loss on the sampled foreground RoIs (``sample_rois`` puts them first)."""
        if gt_masks is None:
            raise ValueError("MaskRCNN's losses need `gt_masks` (the batch's 'masks')")
        config = self.config
        # At most round(rois * fraction) foreground RoIs per image, and they come first: the
        # branch runs on those rows only (background rows would get no loss anyway).
        count = max(1, min(config.rois_per_image,
                           int(round(config.rois_per_image * config.foreground_fraction))))
        rois = sample["rois"][:, :count]
        class_targets = sample["class_targets"][:, :count]
        matched = matched_ground_truth(rois, gt_boxes, gt_classes)
        targets_ = tf.stop_gradient(mask_targets(gt_masks, rois, matched, self.mask_size))
        logits = self.mask_logits_for(feature_map, rois)
        return {"mask_loss": config.mask_loss_weight * mask_loss(logits, targets_, class_targets)}


# ----------------------------------------------------------------------------------
# COCO "segm" evaluation with RLE masks
# ----------------------------------------------------------------------------------
def encode_rle(mask):
    """One binary mask ``[H, W]`` -> COCO RLE dict (``counts`` as str, JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_mask_json(ground_truth, detections, class_names, gt_path=None, det_path=None):
    """COCO ground truth and results with RLE ``segmentation`` (and ``bbox``), as JSON files.

    Image ``i`` gets id ``i + 1``, class ``c`` category id ``c + 1`` (as
    ``ch05_detection.evaluate.to_coco_json``). Each annotation's ``bbox`` is its normalized box
    in pixels and ``area`` its mask's pixel count.

    Args:
        ground_truth: one dict per image: ``boxes`` ``[N, 4]`` normalized, ``classes`` ``[N]``
            (-1 rows skipped), ``masks`` ``[N, H, W]`` 0/1.
        detections: one dict per image: ``boxes``, ``classes``, ``scores``, ``masks``
            ``[D, H, W]`` (the valid rows only, as ``run_mask_detection`` gives them).
        class_names: foreground class names.
    Returns:
        ``(ground_truth_dict, results_list)``.
    """
    if len(ground_truth) != len(detections):
        raise ValueError(f"`detections` needs one entry per image: {len(detections)} for "
                         f"{len(ground_truth)} images")
    images, annotations, results = [], [], []
    for index, (gt, det) in enumerate(zip(ground_truth, detections)):
        gt_masks = np.asarray(gt["masks"], np.uint8)
        height, width = gt_masks.shape[1:] if gt_masks.ndim == 3 else np.asarray(
            det["masks"]).shape[1:]
        image_id = index + 1
        images.append({"id": image_id, "height": int(height), "width": int(width),
                       "file_name": f"{image_id:06d}.png"})
        scale = np.array([width, height, width, height], np.float64)
        for box, class_id, mask in zip(np.asarray(gt["boxes"]).reshape(-1, 4),
                                       np.asarray(gt["classes"]).reshape(-1), gt_masks):
            if class_id < 0:
                continue
            rle = encode_rle(mask)
            x0, y0, x1, y1 = np.asarray(box)[[1, 0, 3, 2]] * scale
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(class_id) + 1, "segmentation": rle,
                                "area": float(np.count_nonzero(mask)),
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "iscrowd": 0})
        for box, class_id, score, mask in zip(np.asarray(det["boxes"]).reshape(-1, 4),
                                              np.asarray(det["classes"]).reshape(-1),
                                              np.asarray(det["scores"]).reshape(-1),
                                              np.asarray(det["masks"], np.uint8)):
            if class_id < 0:
                continue
            x0, y0, x1, y1 = np.asarray(box)[[1, 0, 3, 2]] * scale
            results.append({"image_id": image_id, "category_id": int(class_id) + 1,
                            "segmentation": encode_rle(mask), "score": float(score),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    ground_truth_dict = {
        "info": {"description": "exported by ch06_segmentation.mask_rcnn.coco_mask_json"},
        "images": images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": str(name)} for i, name in enumerate(class_names)]}
    for path, content in ((gt_path, ground_truth_dict), (det_path, results)):
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as file:
                json.dump(content, file)
    return ground_truth_dict, results


def coco_mask_map(gt_json_path, det_json_path, iou_type="segm"):
    """pycocotools ``COCOeval`` on two COCO JSON files: ``iou_type`` "segm" (mask IoU on the RLE
    masks) or "bbox". Returns ``map`` (AP@[.5:.95]), ``map50``, ``map75``; an empty result list
    scores 0 (-1 without ground truth): ``evaluate.coco_map_with_pycocotools``."""
    from ch05_detection import evaluate

    return evaluate.coco_map_with_pycocotools(gt_json_path, det_json_path, iou_type=iou_type)


def run_mask_detection(model, examples, batch_size=16, progress=False):
    """``model.detect`` over a list of examples: one dict per image with the valid rows only
    (``boxes``, ``classes``, ``scores``, ``masks`` ``[D, H, W]`` uint8)."""
    detections = []
    bar = keras.utils.Progbar(len(examples), unit_name="image") if progress and examples else None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        output = model.detect(np.stack([e["image"] for e in chunk]), batch_size=batch_size)
        for i in range(len(chunk)):
            n = int(output["num_detections"][i])
            detections.append({"boxes": output["boxes"][i, :n], "classes": output["classes"][i, :n],
                               "scores": output["scores"][i, :n], "masks": output["masks"][i, :n]})
        if bar is not None:
            bar.update(min(start + batch_size, len(examples)))
    return detections


# ----------------------------------------------------------------------------------
# semantic versus instance segmentation: how many objects does each recover?
# ----------------------------------------------------------------------------------
def semantic_from_instances(masks, classes):
    """The semantic mask ``[H, W]`` int32 (0 background, ``class + 1``) of instance masks
    ``[N, H, W]`` (``N`` may be 0): the instances merged by class, U-Net's contract."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"`masks` must be [N, H, W], got shape {masks.shape}")
    semantic = np.zeros(masks.shape[1:], np.int32)
    for mask, class_id in zip(masks, np.asarray(classes).reshape(-1)):
        if class_id >= 0:
            semantic[np.asarray(mask) > 0] = int(class_id) + 1
    return semantic


def connected_segments(semantic, num_classes):
    """Objects a semantic mask can offer: the connected components (8-connectivity) of each
    class. Returns ``(masks [S, H, W] uint8, classes [S] int32)``."""
    import cv2

    semantic = np.asarray(semantic)
    masks, classes = [], []
    for class_id in range(num_classes):
        count, labels = cv2.connectedComponents((semantic == class_id + 1).astype(np.uint8),
                                                connectivity=8)
        for label in range(1, count):
            masks.append((labels == label).astype(np.uint8))
            classes.append(class_id)
    if not masks:
        return np.zeros((0,) + semantic.shape, np.uint8), np.zeros(0, np.int32)
    return np.stack(masks), np.array(classes, np.int32)


def mask_iou(masks_a, masks_b):
    """Pairwise IoU ``[A, B]`` of binary masks ``[A, H, W]`` and ``[B, H, W]``."""
    a = np.asarray(masks_a, bool).reshape(len(masks_a), -1).astype(np.float64)
    b = np.asarray(masks_b, bool).reshape(len(masks_b), -1).astype(np.float64)
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1.0), 0.0)


def recovered_objects(gt_masks, gt_classes, masks, classes, iou_threshold=0.5):
    """How many ground-truth objects a set of predicted masks recovers: one-to-one greedy
    matching (highest IoU first) of same-class masks with IoU >= ``iou_threshold``."""
    gt_classes = np.asarray(gt_classes).reshape(-1)
    keep = gt_classes >= 0
    gt_masks, gt_classes = np.asarray(gt_masks)[keep], gt_classes[keep]
    classes = np.asarray(classes).reshape(-1)
    if len(gt_masks) == 0 or len(masks) == 0:
        return 0
    iou = mask_iou(gt_masks, masks)
    iou[gt_classes[:, None] != classes[None, :]] = 0.0
    found = 0
    while True:
        g, p = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[g, p] < iou_threshold:
            return found
        found += 1
        iou[g, :], iou[:, p] = -1.0, -1.0


def touching_same_class(masks, classes):
    """True if two instances of one class touch (8-neighbourhood), so that a semantic mask
    merges them into one blob."""
    import cv2

    masks, classes = np.asarray(masks), np.asarray(classes).reshape(-1)
    kernel = np.ones((3, 3), np.uint8)
    for i in range(len(masks)):
        if classes[i] < 0:
            continue
        grown = cv2.dilate(masks[i].astype(np.uint8), kernel) > 0
        for j in range(i + 1, len(masks)):
            if classes[j] == classes[i] and (grown & (masks[j] > 0)).any():
                return True
    return False


def compare_semantic_and_instance(examples, detections, num_classes, semantic_masks=None,
                                  min_score=0.5, iou_threshold=0.5):
    """Objects recovered by instance masks vs by the connected components of a semantic mask.

    Issue item "semantic vs instance": a semantic mask (U-Net's output) can only offer its
    connected components as objects, so touching shapes of one class come out as one blob;
    Mask R-CNN gives each its own mask. An object counts as recovered when a predicted mask of
    its class overlaps it with mask IoU >= ``iou_threshold`` (one-to-one).

    Args:
        examples: validation examples with ``masks`` ``[N, H, W]`` and ``classes``.
        detections: per image ``classes``, ``scores``, ``masks`` (``run_mask_detection``);
            detections below ``min_score`` are dropped.
        num_classes: foreground classes.
        semantic_masks: per image ``[H, W]`` (0 background, ``class + 1``), e.g. a U-Net's
            argmax; None uses the ground-truth semantic mask (the instances merged by class),
            a perfect semantic segmenter, so every loss it shows is the merging alone.
    Returns:
        dict ``objects``, ``instance_recovered``, ``semantic_recovered``, ``semantic_segments``
        and the same restricted to the images with touching same-class shapes
        (``touching_images``, ``touching_objects``, ``touching_instance_recovered``,
        ``touching_semantic_recovered``).
    """
    totals = dict.fromkeys(("objects", "instance_recovered", "semantic_recovered",
                            "semantic_segments", "touching_images", "touching_objects",
                            "touching_instance_recovered", "touching_semantic_recovered"), 0)
    for index, (example, det) in enumerate(zip(examples, detections)):
        gt_masks, gt_classes = np.asarray(example["masks"]), np.asarray(example["classes"])
        semantic = (semantic_from_instances(gt_masks, gt_classes)
                    if semantic_masks is None else np.asarray(semantic_masks[index]))
        segments, segment_classes = connected_segments(semantic, num_classes)
        keep = np.asarray(det["scores"]) >= min_score
        instance = recovered_objects(gt_masks, gt_classes, np.asarray(det["masks"])[keep],
                                     np.asarray(det["classes"])[keep], iou_threshold)
        semantic_found = recovered_objects(gt_masks, gt_classes, segments, segment_classes,
                                           iou_threshold)
        objects = int((gt_classes >= 0).sum())
        totals["objects"] += objects
        totals["instance_recovered"] += instance
        totals["semantic_recovered"] += semantic_found
        totals["semantic_segments"] += len(segments)
        if touching_same_class(gt_masks, gt_classes):
            totals["touching_images"] += 1
            totals["touching_objects"] += objects
            totals["touching_instance_recovered"] += instance
            totals["touching_semantic_recovered"] += semantic_found
    return totals


# ----------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------
def _grey(image):
    """A dimmed grey copy of an RGB image: the shapes are coloured themselves, and masks drawn
    over the grey stand out."""
    image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    return 0.25 + 0.5 * np.repeat(image.mean(axis=-1, keepdims=True), 3, axis=-1)


def instance_overlay(image, masks, alpha=0.65):
    """RGB ``[H, W, 3]``: each instance mask ``[N, H, W]`` in its own colour over ``image``
    (in grey)."""
    from common import viz

    return viz.overlay_mask(_grey(image), np.asarray(masks, np.uint8).reshape(
        (-1,) + np.asarray(image).shape[:2]), alpha=alpha)


def draw_instances(ax, image, masks, boxes=None, classes=None, scores=None, class_names=None,
                   min_score=0.5, title=None):
    """Instance masks (one colour per object) and their boxes and labels over ``image`` on ``ax``.

    Args:
        ax: a matplotlib axis. image: ``[H, W, 3]``.
        masks: ``[N, H, W]`` 0/1; boxes ``[N, 4]`` normalized yxyx (optional); classes ``[N]``
            (-1 rows skipped); scores ``[N]`` (rows below ``min_score`` skipped; None: all).
    """
    from common import viz

    masks = np.asarray(masks)
    keep = np.ones(len(masks), bool)
    if classes is not None:
        keep &= np.asarray(classes).reshape(-1)[:len(masks)] >= 0
    if scores is not None:
        keep &= np.asarray(scores).reshape(-1)[:len(masks)] >= min_score
    ax.imshow(instance_overlay(image, masks[keep]))
    if boxes is not None:
        viz.draw_boxes(ax, np.asarray(boxes).reshape(-1, 4)[keep],
                       None if classes is None else np.asarray(classes).reshape(-1)[keep],
                       None if scores is None else np.asarray(scores).reshape(-1)[keep],
                       class_names)
    if title:
        ax.set_title(title, fontsize=8)
    ax.axis("off")
    return ax


def show_instances(examples, detections, class_names=None, save_path=None, min_score=0.5):
    """Top row: ground-truth instance masks; bottom row: Mask R-CNN's masks (score >=
    ``min_score``) on the same images. Returns the figure."""
    import matplotlib.pyplot as plt

    from common import viz

    count = len(examples)
    if count == 0:
        return None
    figure, axes = plt.subplots(2, count, figsize=(2.8 * count, 5.8), squeeze=False)
    for i, (example, det) in enumerate(zip(examples, detections)):
        draw_instances(axes[0, i], example["image"], example["masks"], example["boxes"],
                       example["classes"], class_names=class_names, title="ground truth")
        draw_instances(axes[1, i], example["image"], det["masks"], det["boxes"], det["classes"],
                       det["scores"], class_names, min_score, title=f"Mask R-CNN (>= {min_score})")
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure


def draw_mask_targets(image, gt_masks, rois, matched_index, mask_size=28, save_path=None):
    """For the chapter's picture of the training targets: each RoI drawn on the image, and
    beside it the 28 x 28 target ``mask_targets`` cuts from its matched ground-truth mask."""
    import matplotlib.pyplot as plt

    from common import viz

    rois = np.asarray(rois, np.float32).reshape(-1, 4)
    crops = mask_targets(np.asarray(gt_masks)[None], rois[None],
                         np.asarray(matched_index, np.int32).reshape(1, -1), mask_size).numpy()[0]
    figure, axes = plt.subplots(1, len(rois) + 1, figsize=(2.4 * (len(rois) + 1), 2.6),
                                squeeze=False)
    axes[0, 0].imshow(np.clip(image, 0, 1))
    viz.draw_boxes(axes[0, 0], rois, np.arange(len(rois)), show_labels=False)
    axes[0, 0].set_title("RoIs", fontsize=8)
    for i, crop in enumerate(crops):
        axes[0, i + 1].imshow(crop, cmap="gray", vmin=0, vmax=1)
        axes[0, i + 1].set_title(f"target of RoI {i}", fontsize=8, color=viz.class_colour(i))
    for ax in axes.flat:
        ax.axis("off")
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure


def draw_semantic_vs_instance(example, detection, num_classes, semantic_mask=None,
                              class_names=None, min_score=0.5, save_path=None):
    """One image three ways: the semantic mask, its connected components (what a semantic
    segmenter can count as objects) and Mask R-CNN's instances."""
    import matplotlib.pyplot as plt

    from common import viz

    masks, classes = np.asarray(example["masks"]), np.asarray(example["classes"])
    semantic = (semantic_from_instances(masks, classes)
                if semantic_mask is None else np.asarray(semantic_mask))
    segments, _ = connected_segments(semantic, num_classes)
    keep = np.asarray(detection["scores"]) >= min_score
    figure, axes = plt.subplots(1, 3, figsize=(8.4, 3.0), squeeze=False)
    axes[0, 0].imshow(viz.overlay_mask(_grey(example["image"]), semantic, alpha=0.65))
    axes[0, 0].set_title("semantic mask (by class)", fontsize=8)
    axes[0, 1].imshow(instance_overlay(example["image"], segments))
    axes[0, 1].set_title(f"{len(segments)} connected components", fontsize=8)
    draw_instances(axes[0, 2], example["image"], np.asarray(detection["masks"])[keep],
                   np.asarray(detection["boxes"])[keep], np.asarray(detection["classes"])[keep],
                   np.asarray(detection["scores"])[keep], class_names, min_score,
                   title=f"{int(keep.sum())} Mask R-CNN instances")
    for ax in axes.flat:
        ax.axis("off")
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure
