"""The Fast R-CNN detection head of Faster R-CNN: RoI sampling, head, loss, post-processing.

Girshick 2015, "Fast R-CNN" (sec. 2 and 3), used as the second stage of Ren et al.
2015, "Faster R-CNN". Given proposals from the RPN, the detector

1. in training, samples a fixed number of RoIs per image with a foreground fraction
   (``sample_rois``: foreground IoU >= 0.5, background IoU in [0.1, 0.5) in the
   paper, [0, 0.5) by default here; the ground-truth boxes are added to the proposals
   so the head sees perfect examples from the first step);
2. pools a fixed-size feature for every RoI (RoI pooling or RoIAlign, ``roi_ops.py``);
3. runs a small head (``FastRCNNHead``: two fully connected layers, or a few
   convolutions) with two siblings: softmax over ``num_classes + 1`` (index 0 is
   background) and class-specific box deltas ``[num_classes, 4]``;
4. is trained with ``detection_loss``: log loss + smooth-L1 on the deltas of the true
   class, counted for foreground RoIs only (Fast R-CNN eq. 1, the ``[u >= 1]`` term);
5. at inference, ``postprocess_detections`` decodes the class-specific boxes, applies
   a score threshold, per-class NMS and keeps the best ``max_detections``.

All boxes are normalized ``[ymin, xmin, ymax, xmax]``. Try it::

    python -m pytest -q tests/test_ch05_head.py
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import targets
from ch05_detection.rpn import smooth_l1
from ch05_detection.targets import check_detection_targets

# Fast R-CNN sec. 2.3: regression targets normalized to ~unit variance; the
# (10, 10, 5, 5) weights are the equivalent Detectron / torchvision constants.
HEAD_BOX_WEIGHTS = box_ops.DEFAULT_BOX_WEIGHTS


# ----------------------------------------------------------------------------------
# RoI sampling (training only)
# ----------------------------------------------------------------------------------
def sample_rois(proposals, proposal_valid, gt_boxes, gt_classes, num_rois=64,
                foreground_fraction=0.25, foreground_iou=0.5, background_iou_high=0.5,
                background_iou_low=0.0, add_ground_truth=True, box_weights=HEAD_BOX_WEIGHTS,
                seed=None):
    """Choose the RoIs the head is trained on (Fast R-CNN sec. 2.3 "Mini-batch sampling").

    Fast R-CNN takes 25% of the RoIs from proposals with IoU >= 0.5 with a ground-truth
    box (foreground, labelled with that box's class) and the rest from IoU in
    [0.1, 0.5) (background, label 0). Faster R-CNN adds the ground-truth boxes to the
    proposals. When an image has too few candidates, the remaining slots are padding
    with class target -1 (they count in no loss). The matching is ``targets.match_iou``
    (no low-quality matches) and the sampling ``targets.sample_balanced``, the same
    pieces the RPN uses.

    Args:
        proposals: ``[batch, P, 4]`` normalized yxyx.
        proposal_valid: ``[batch, P]`` bool (False for padding rows of the proposal layer).
        gt_boxes: ``[batch, N, 4]``; gt_classes: ``[batch, N]`` (0-based, -1 padding).
        num_rois: RoIs per image (fixed, so the batch has a static shape).
        foreground_fraction: maximum share of foreground RoIs.
        foreground_iou: IoU at and above which a RoI is foreground.
        background_iou_high, background_iou_low: background IoU range [low, high).
        add_ground_truth: append the ground-truth boxes to the candidates.
        box_weights: weights of the box encoding.
        seed: per-image sampling seeds ``[batch, 2]`` (``targets.image_seeds``) or an int.
    Returns:
        dict: ``rois`` ``[batch, R, 4]``, ``class_targets`` ``[batch, R]`` int32
        (0 background, ``c + 1`` for class c, -1 padding), ``box_targets``
        ``[batch, R, 4]`` (encoded w.r.t. the RoI; zero for non-foreground),
        ``matched_iou`` ``[batch, R]``.
    """
    if int(num_rois) < 1:
        raise ValueError(f"`num_rois` must be >= 1, got {num_rois}")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"`foreground_fraction` must be in [0, 1], got {foreground_fraction}")
    if not 0.0 <= background_iou_low <= background_iou_high <= foreground_iou <= 1.0:
        raise ValueError("need 0 <= background_iou_low <= background_iou_high <= foreground_iou "
                         f"<= 1, got {background_iou_low}, {background_iou_high}, "
                         f"{foreground_iou}")
    gt_boxes, gt_classes, gt_valid = check_detection_targets(gt_boxes, gt_classes)
    proposals = tf.convert_to_tensor(proposals, tf.float32)
    proposal_valid = tf.cast(proposal_valid, tf.bool)
    if add_ground_truth:
        proposals = tf.concat([proposals, gt_boxes], axis=1)  # [batch, P + N, 4]
        proposal_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    iou = box_ops.pairwise_iou(proposals, gt_boxes)  # [batch, P', N]
    matched, labels, max_iou = targets.match_iou(
        iou, gt_valid, positive_threshold=foreground_iou,
        negative_threshold=background_iou_high, negative_lower_bound=background_iou_low,
        allow_low_quality_matches=False, candidate_valid=proposal_valid)  # [batch, P']
    labels = targets.sample_balanced(labels, num_rois, foreground_fraction, seed=seed)

    # Gather the sampled RoIs: foreground first, then background, then the rest
    # (top_k keeps the original order among equals).
    priority = tf.where(tf.equal(labels, targets.POSITIVE), 2,
                        tf.where(tf.equal(labels, targets.NEGATIVE), 1, 0))
    num_candidates = tf.shape(priority)[1]
    padding = tf.maximum(num_rois - num_candidates, 0)
    priority = tf.pad(priority, [[0, 0], [0, padding]], constant_values=-1)
    _, index = tf.math.top_k(priority, k=num_rois)  # [batch, R]

    def take(values, fill):
        pad_spec = [[0, 0], [0, padding]] + [[0, 0]] * (len(values.shape) - 2)
        return tf.gather(tf.pad(values, pad_spec, constant_values=fill), index, batch_dims=1)

    rois = take(proposals, 0.0)  # [batch, R, 4]
    roi_labels = take(labels, targets.IGNORED)
    is_foreground = tf.equal(roi_labels, targets.POSITIVE)
    roi_iou = take(max_iou, -1.0)
    matched_index = take(matched, 0)
    matched_boxes = tf.gather(gt_boxes, matched_index, batch_dims=1)  # [batch, R, 4]
    matched_classes = tf.gather(gt_classes, matched_index, batch_dims=1)  # [batch, R]
    class_targets = tf.where(is_foreground, matched_classes + 1,
                             tf.where(tf.equal(roi_labels, targets.NEGATIVE), 0, -1))
    box_targets = box_ops.encode_boxes(matched_boxes, rois, weights=box_weights)
    box_targets = tf.where(is_foreground[..., None], box_targets, 0.0)
    return {"rois": tf.stop_gradient(rois), "class_targets": class_targets,
            "box_targets": tf.stop_gradient(box_targets), "matched_iou": roi_iou}


# ----------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class FastRCNNHead(keras.layers.Layer):
    """Classification and class-specific box regression for pooled RoIs.

    Girshick 2015, "Fast R-CNN", sec. 2 and fig. 1: RoI features -> fully connected
    layers -> two siblings, a softmax over K + 1 classes and 4K box deltas. The
    ``"conv"`` variant replaces the fully connected layers by two 3x3 convolutions and
    global average pooling (as in ResNet-based Faster R-CNN, He et al. 2016, sec. A).

    Input:
        ``pooled_features`` ``[batch, R, pool_h, pool_w, C]``.
    Output:
        ``(class_logits, box_deltas)``: ``[batch, R, num_classes + 1]`` (index 0 =
        background) and ``[batch, R, num_classes, 4]``.

    Args:
        num_classes: foreground classes K.
        head_type: "dense" (2 fully connected) or "conv".
        hidden_units: width of the fully connected layers (or conv filters).
        dropout: dropout rate after each hidden layer (0 disables it).
    """

    def __init__(self, num_classes, head_type="dense", hidden_units=256, dropout=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
        if head_type not in ("dense", "conv"):
            raise ValueError(f"`head_type` must be 'dense' or 'conv', got {head_type!r}")
        self.num_classes = int(num_classes)
        self.head_type = head_type
        self.hidden_units = int(hidden_units)
        self.dropout = float(dropout)
        if head_type == "dense":
            self.hidden_layers = [
                keras.layers.Dense(self.hidden_units, activation="relu", name="fc6"),
                keras.layers.Dense(self.hidden_units, activation="relu", name="fc7")]
        else:
            self.hidden_layers = [
                keras.layers.Conv2D(self.hidden_units, 3, padding="same", activation="relu",
                                    name="head_conv1"),
                keras.layers.Conv2D(self.hidden_units, 3, padding="same", activation="relu",
                                    name="head_conv2")]
        self.dropout_layer = keras.layers.Dropout(self.dropout) if self.dropout > 0 else None
        # Fast R-CNN sec. 3.1: classifier std 0.01, box regressor std 0.001.
        self.class_layer = keras.layers.Dense(
            self.num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            name="class_logits")
        self.box_layer = keras.layers.Dense(
            self.num_classes * 4,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.001), name="box_deltas")

    def build(self, input_shape):
        pool_h, pool_w, channels = input_shape[-3], input_shape[-2], input_shape[-1]
        if None in (pool_h, pool_w, channels):
            raise ValueError(f"`pooled_features` needs static pool size and channels, got "
                             f"{input_shape}")
        self.pooled_shape = (int(pool_h), int(pool_w), int(channels))
        if self.head_type == "dense":
            shape = (None, pool_h * pool_w * channels)
            for layer in self.hidden_layers:
                layer.build(shape)
                shape = (None, self.hidden_units)
        else:
            shape = (None, pool_h, pool_w, channels)
            for layer in self.hidden_layers:
                layer.build(shape)
                shape = (None, pool_h, pool_w, self.hidden_units)
        self.class_layer.build((None, self.hidden_units))
        self.box_layer.build((None, self.hidden_units))

    def call(self, pooled_features, training=False):
        shape = tf.shape(pooled_features)
        batch_size, num_rois = shape[0], shape[1]
        pool_h, pool_w, channels = self.pooled_shape  # static (RoI ops may lose them)
        flat = tf.reshape(pooled_features, [-1, pool_h, pool_w, channels])  # [batch*R, h, w, C]
        if self.head_type == "dense":
            hidden = tf.reshape(flat, [-1, pool_h * pool_w * channels])
            for layer in self.hidden_layers:
                hidden = layer(hidden)
                if self.dropout_layer is not None:
                    hidden = self.dropout_layer(hidden, training=training)
        else:
            hidden = flat
            for layer in self.hidden_layers:
                hidden = layer(hidden)
            hidden = tf.reduce_mean(hidden, axis=[1, 2])  # [batch*R, units]
            if self.dropout_layer is not None:
                hidden = self.dropout_layer(hidden, training=training)
        class_logits = tf.reshape(self.class_layer(hidden),
                                  [batch_size, num_rois, self.num_classes + 1])
        box_deltas = tf.reshape(self.box_layer(hidden),
                                [batch_size, num_rois, self.num_classes, 4])
        return class_logits, box_deltas

    def compute_output_shape(self, input_shape):
        return ((input_shape[0], input_shape[1], self.num_classes + 1),
                (input_shape[0], input_shape[1], self.num_classes, 4))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, head_type=self.head_type,
                      hidden_units=self.hidden_units, dropout=self.dropout)
        return config


# ----------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------
def detection_loss(class_logits, box_deltas, class_targets, box_targets, box_loss_weight=1.0,
                   smooth_l1_beta=1.0):
    """Fast R-CNN multi-task loss, Girshick 2015 eq. (1).

    ``L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v)``: log loss over all sampled RoIs
    and smooth L1 on the deltas of the *true* class, for foreground RoIs only (a
    background RoI has no box to regress). Both terms are averaged over the sampled
    RoIs (padding, class -1, is excluded); under ``tf.distribute`` that count is
    averaged over the replicas (``targets.mean_over_replicas``).

    Args:
        class_logits: ``[batch, R, K + 1]``; box_deltas: ``[batch, R, K, 4]``.
        class_targets: ``[batch, R]`` (0 background, c + 1 foreground, -1 padding).
        box_targets: ``[batch, R, 4]``.
    Returns:
        ``(classification_loss, box_loss)``: scalars.
    """
    class_targets = tf.cast(class_targets, tf.int32)
    sampled = tf.cast(class_targets >= 0, tf.float32)
    foreground = tf.cast(class_targets > 0, tf.float32)
    # Under tf.distribute every replica divides by the same (all-reduced) count.
    num_sampled = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(sampled)), 1.0)
    log_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(class_targets, 0), logits=tf.cast(class_logits, tf.float32))
    classification_loss = tf.reduce_sum(log_loss * sampled) / num_sampled
    # Pick the 4 deltas of the true class: [batch, R, 4].
    true_class = tf.maximum(class_targets - 1, 0)
    true_deltas = tf.gather(tf.cast(box_deltas, tf.float32), true_class, axis=2, batch_dims=2)
    box_error = tf.reduce_sum(smooth_l1(true_deltas - box_targets, smooth_l1_beta), axis=-1)
    box_loss = box_loss_weight * tf.reduce_sum(box_error * foreground) / num_sampled
    return classification_loss, box_loss


# ----------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------
def decode_detections(rois, class_logits, box_deltas, box_weights=HEAD_BOX_WEIGHTS):
    """Class probabilities and class-specific boxes for every RoI.

    Returns:
        ``(boxes, scores)``: ``[batch, R, K, 4]`` clipped normalized yxyx and
        ``[batch, R, K]`` foreground probabilities (the background column removed).
    """
    probabilities = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)
    decoded = box_ops.decode_boxes(tf.cast(box_deltas, tf.float32),
                                   tf.cast(rois, tf.float32)[:, :, None, :], weights=box_weights)
    return box_ops.clip_boxes(decoded), probabilities[..., 1:]


def postprocess_detections(rois, class_logits, box_deltas, roi_valid=None, score_threshold=0.05,
                           nms_iou_threshold=0.5, max_detections=100, max_per_class=None,
                           box_weights=HEAD_BOX_WEIGHTS):
    """Final detections: decode, score threshold, per-class NMS, top ``max_detections``.

    Fast R-CNN sec. 3.1 ("non-maximum suppression independently for each class").
    Uses ``tf.image.combined_non_max_suppression``, which runs NMS class by class and
    then keeps the best boxes over all classes.

    Args:
        rois: ``[batch, R, 4]``; class_logits ``[batch, R, K + 1]``; box_deltas
            ``[batch, R, K, 4]``; roi_valid: optional ``[batch, R]`` bool (padding rows
            never become detections).
        score_threshold: minimum class probability.
        nms_iou_threshold: per-class NMS overlap threshold.
        max_detections: detections per image (the output is padded to this).
        max_per_class: kept per class before the final cut (default ``max_detections``).
    Returns:
        dict ``boxes`` ``[batch, D, 4]``, ``classes`` ``[batch, D]`` int32 (0-based,
        -1 padding), ``confidence`` ``[batch, D]`` (0 padding), ``num_detections``
        ``[batch]``: the keys of keras-hub's ``ObjectDetector``; ``scores`` is the same
        tensor as ``confidence`` under the name the evaluation code uses.
    """
    boxes, scores = decode_detections(rois, class_logits, box_deltas, box_weights)
    if roi_valid is not None:
        scores = tf.where(tf.cast(roi_valid, tf.bool)[..., None], scores, 0.0)
    max_per_class = max_detections if max_per_class is None else max_per_class
    result = tf.image.combined_non_max_suppression(
        boxes, scores, max_output_size_per_class=max_per_class, max_total_size=max_detections,
        iou_threshold=nms_iou_threshold, score_threshold=score_threshold,
        pad_per_class=False, clip_boxes=True)
    num_detections = tf.cast(result.valid_detections, tf.int32)
    valid = tf.range(max_detections)[None, :] < num_detections[:, None]
    classes = tf.where(valid, tf.cast(result.nmsed_classes, tf.int32), -1)
    confidence = tf.where(valid, result.nmsed_scores, 0.0)
    return {"boxes": tf.where(valid[..., None], result.nmsed_boxes, 0.0),
            "classes": classes,
            "confidence": confidence,
            "scores": confidence,
            "num_detections": num_detections}
