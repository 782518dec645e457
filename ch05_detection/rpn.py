"""The region proposal network (RPN) of Faster R-CNN, piece by piece.

Ren, He, Girshick and Sun 2015, "Faster R-CNN: Towards Real-Time Object Detection
with Region Proposal Networks", sec. 3.1. The RPN slides a small network over the
shared feature map: at every location it scores ``k`` anchors ("is there an object
here?") and regresses 4 box offsets for each. This module holds the four pieces a
reader can copy one at a time:

* ``RPNHead``: a 3x3 convolution, then sibling 1x1 convolutions for the objectness
  logits (``k`` per location) and the box deltas (``4k`` per location) (sec. 3.1).
* ``assign_rpn_targets``: label anchors positive (IoU >= 0.7, or the best anchor of
  an object), negative (IoU < 0.3) or ignored, ignore the anchors that cross the image
  border, then sample 256 anchors per image, at most half of them positive (sec.
  3.1.2, 3.1.3 and 3.3). The matcher and the sampler are ``targets.py``'s, shared with
  the detection head and the one-stage detectors.
* ``rpn_loss``: log loss over the sampled anchors + lambda * smooth-L1 over the
  positive ones (eq. 1).
* ``ProposalLayer``: turn scores and deltas into proposals: decode, clip to the
  image, drop tiny boxes, keep the top-N scores, NMS at IoU 0.7, keep the top-N
  again; fewer boxes at inference than in training (sec. 3.3). Gradients do not flow
  through the proposal coordinates (approximate joint training, sec. 3.2). Its NMS runs
  image by image (``tf.image.non_max_suppression``) or, for XLA, batched with static
  shapes (``boxes.nms_padded``): the same proposals.

We use one sigmoid logit per anchor instead of the paper's two-way softmax; the paper
notes both are possible ("for simplicity we implement the cls layer as a two-class
softmax layer. Alternatively, one may use logistic regression to produce k scores").

All boxes are normalized ``[ymin, xmin, ymax, xmax]``. Try it::

    python -m pytest -q tests/test_ch05_rpn.py
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import targets
from ch05_detection.targets import check_detection_targets

# The sampler lives in targets.py (shared with the detection head); the RPN's name for it.
sample_anchors = targets.sample_balanced

# Faster R-CNN sec. 3.1.3: "we randomly sample 256 anchors in an image ... where the
# sampled positive and negative anchors have a ratio of up to 1:1".
DEFAULT_NUM_SAMPLES = 256
DEFAULT_POSITIVE_FRACTION = 0.5
# The RPN regresses offsets of the same scale as the anchors; unit weights as in the
# paper's RPN (the detection head uses the (10, 10, 5, 5) weights).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
# How the proposal layer runs NMS (see ProposalLayer).
NMS_IMPLEMENTATIONS = ("per_image", "batched")


# ----------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class RPNHead(keras.layers.Layer):
    """The RPN's small sliding network (Ren et al. 2015, sec. 3.1, fig. 3).

    A 3x3 convolution with ReLU ("intermediate layer", 256-d for ZF, 512-d for VGG),
    then two sibling 1x1 convolutions: ``k`` objectness logits and ``4k`` box deltas.

    Input:
        ``feature_map`` ``[batch, H, W, C]``.
    Output:
        ``(objectness_logits, box_deltas)``: ``[batch, H * W * k]`` and
        ``[batch, H * W * k, 4]``, ordered location-major then anchor, the order of
        ``anchors.generate_anchors``.

    Args:
        num_anchors: anchors per location ``k`` (9 = 3 scales x 3 ratios).
        filters: channels of the 3x3 convolution.
    """

    def __init__(self, num_anchors=9, filters=256, **kwargs):
        super().__init__(**kwargs)
        if int(num_anchors) < 1:
            raise ValueError(f"`num_anchors` must be >= 1, got {num_anchors}")
        if int(filters) < 1:
            raise ValueError(f"`filters` must be >= 1, got {filters}")
        self.num_anchors = int(num_anchors)
        self.filters = int(filters)
        # Small Gaussian initialisation (std 0.01) as in the paper's sec. 3.1.3.
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = keras.layers.Conv2D(self.filters, 3, padding="same", activation="relu",
                                        kernel_initializer=init, name="rpn_conv")
        self.objectness = keras.layers.Conv2D(self.num_anchors, 1, kernel_initializer=init,
                                              name="rpn_objectness")
        self.deltas = keras.layers.Conv2D(4 * self.num_anchors, 1, kernel_initializer=init,
                                          name="rpn_deltas")

    def build(self, input_shape):
        self.conv.build(input_shape)
        hidden_shape = tuple(input_shape[:-1]) + (self.filters,)
        self.objectness.build(hidden_shape)
        self.deltas.build(hidden_shape)

    def call(self, feature_map):
        hidden = self.conv(feature_map)  # [batch, H, W, filters]
        batch_size = tf.shape(feature_map)[0]
        logits = tf.reshape(self.objectness(hidden), [batch_size, -1])  # [batch, H*W*k]
        deltas = tf.reshape(self.deltas(hidden), [batch_size, -1, 4])  # [batch, H*W*k, 4]
        return logits, deltas

    def compute_output_shape(self, input_shape):
        batch, height, width = input_shape[0], input_shape[1], input_shape[2]
        count = None if height is None or width is None else height * width * self.num_anchors
        return (batch, count), (batch, count, 4)

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self.num_anchors, filters=self.filters)
        return config


# ----------------------------------------------------------------------------------
# training targets
# ----------------------------------------------------------------------------------
def assign_rpn_targets(anchors, gt_boxes, gt_classes, positive_threshold=0.7,
                       negative_threshold=0.3, num_samples=DEFAULT_NUM_SAMPLES,
                       positive_fraction=DEFAULT_POSITIVE_FRACTION,
                       box_weights=RPN_BOX_WEIGHTS, seed=None, anchor_valid=None):
    """RPN training targets for a batch (Ren et al. 2015, sec. 3.1.2, 3.1.3 and 3.3).

    ``targets.match_boxes`` labels the anchors (with the best-anchor rule), then
    ``targets.sample_balanced`` keeps ``num_samples`` of them per image.

    Args:
        anchors: ``[A, 4]`` normalized yxyx anchors (shared by all images).
        gt_boxes: ``[batch, N, 4]`` normalized yxyx, padded.
        gt_classes: ``[batch, N]`` int, -1 for padding rows (ignored).
        positive_threshold, negative_threshold: IoU thresholds (0.7, 0.3).
        num_samples, positive_fraction: the mini-batch of anchors per image.
        box_weights: scale weights of the box encoding.
        seed: per-image sampling seeds ``[batch, 2]`` (``targets.image_seeds``) or an int.
        anchor_valid: optional ``[A]`` bool; False anchors are ignored (the paper ignores
            cross-boundary anchors in training: ``targets.inside_image(anchors)``).
    Returns:
        ``(labels, box_targets)``: ``[batch, A]`` int32 in {1, 0, -1} after sampling
        (-1 = not in the loss) and ``[batch, A, 4]`` encoded regression targets
        (meaningful where label == 1).
    """
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    gt_boxes, gt_classes, gt_valid = check_detection_targets(gt_boxes, gt_classes)
    batch_size = tf.shape(gt_boxes)[0]
    batch_anchors = tf.broadcast_to(anchors[None], [batch_size, tf.shape(anchors)[0], 4])
    matched_index, labels = targets.match_boxes(
        batch_anchors, gt_boxes, gt_valid, positive_threshold=positive_threshold,
        negative_threshold=negative_threshold, allow_low_quality_matches=True,
        anchor_valid=anchor_valid)  # [batch, A]
    labels = targets.sample_balanced(labels, num_samples, positive_fraction, seed=seed)
    matched_boxes = tf.gather(gt_boxes, matched_index, batch_dims=1)  # [batch, A, 4]
    box_targets = box_ops.encode_boxes(matched_boxes, batch_anchors, weights=box_weights)
    box_targets = tf.where(tf.equal(labels, 1)[..., None], box_targets, 0.0)
    return labels, box_targets


# ----------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------
def smooth_l1(difference, beta=1.0):
    """Smooth L1 (Fast R-CNN, Girshick 2015, eq. 3).

    ``0.5 x² / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta`` (beta = 1 in the paper).
    """
    absolute = tf.abs(difference)
    return tf.where(absolute < beta, 0.5 * tf.square(absolute) / beta, absolute - 0.5 * beta)


def rpn_loss(objectness_logits, box_deltas, labels, box_targets, box_loss_weight=1.0,
             smooth_l1_beta=1.0 / 9.0, num_locations=None):
    """The RPN loss, Ren et al. 2015 eq. (1).

    ``L = 1/N_cls sum_i L_cls(p_i, p_i*) + lambda 1/N_reg sum_i p_i* L_reg(t_i, t_i*)``

    ``L_cls`` is the log loss over the sampled anchors (N_cls = 256 per image);
    ``L_reg`` is smooth L1 over the positive anchors only. The paper normalizes the
    box term by the number of anchor locations (N_reg ~ 2400) with lambda = 10, and
    notes this is roughly the same as weighting both terms equally; by default we
    use that equal weighting (N_reg = N_cls, lambda = 1), as most implementations do.
    Pass ``num_locations`` (= H * W) and ``box_loss_weight=10`` for the paper's form.

    Args:
        objectness_logits: ``[batch, A]``.
        box_deltas: ``[batch, A, 4]``.
        labels: ``[batch, A]`` in {1, 0, -1} (from ``assign_rpn_targets``).
        box_targets: ``[batch, A, 4]``.
        box_loss_weight: lambda.
        smooth_l1_beta: transition point of smooth L1 (1/9, py-faster-rcnn's sigma=3).
        num_locations: optional N_reg per image for the paper's normalization.
    Returns:
        ``(classification_loss, box_loss)``: scalars. The normalisers are averaged over
        the replicas under ``tf.distribute`` (``targets.mean_over_replicas``).
    """
    labels = tf.cast(labels, tf.int32)
    sampled = tf.cast(labels >= 0, tf.float32)  # [batch, A]
    positive = tf.cast(tf.equal(labels, 1), tf.float32)
    # Under tf.distribute every replica divides by the same (all-reduced) count.
    num_sampled = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(sampled)), 1.0)
    log_loss = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=positive, logits=tf.cast(objectness_logits, tf.float32))  # [batch, A]
    classification_loss = tf.reduce_sum(log_loss * sampled) / num_sampled
    box_error = tf.reduce_sum(
        smooth_l1(tf.cast(box_deltas, tf.float32) - box_targets, smooth_l1_beta), axis=-1)
    if num_locations is None:
        normalizer = num_sampled
    else:
        batch_size = targets.mean_over_replicas(tf.cast(tf.shape(labels)[0], tf.float32))
        normalizer = float(num_locations) * batch_size
    box_loss = box_loss_weight * tf.reduce_sum(box_error * positive) / normalizer
    return classification_loss, box_loss


# ----------------------------------------------------------------------------------
# proposals
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class ProposalLayer(keras.layers.Layer):
    """Turn RPN outputs into region proposals (Ren et al. 2015, sec. 3.1 and 3.3).

    Per image: decode the deltas on the anchors, clip to the image, drop boxes smaller
    than ``min_size``, keep the ``pre_nms_top_n`` highest objectness scores, run NMS at
    IoU ``nms_iou_threshold`` (0.7 in the paper), keep ``post_nms_top_n`` (the paper
    uses 2000 in training and 300 at test time for ~600x1000 images; we scale the
    numbers down for small images). Inputs are wrapped in ``tf.stop_gradient``: the
    proposals are treated as constants by the detector (approximate joint training,
    sec. 3.2), so no gradient flows through the proposal coordinates.

    Input:
        ``objectness_logits`` ``[batch, A]``, ``box_deltas`` ``[batch, A, 4]``,
        ``anchors`` ``[A, 4]`` normalized yxyx.
    Output:
        ``(proposals, scores, num_valid)``: ``[batch, post_nms_top_n, 4]`` normalized
        yxyx (rows past ``num_valid`` are zeros), ``[batch, post_nms_top_n]``
        objectness probabilities (0 on padding), ``[batch]`` int32.

    Args:
        pre_nms_top_n_train, post_nms_top_n_train: counts in training.
        pre_nms_top_n_test, post_nms_top_n_test: counts at inference.
        nms_iou_threshold: NMS overlap threshold.
        min_size: minimum proposal height and width (normalized units).
        box_weights: weights of the RPN box encoding.
        nms: ``"per_image"``: ``tf.image.non_max_suppression`` image by image
            (``tf.map_fn``; TensorFlow's fast kernel, no XLA kernel) or ``"batched"``:
            ``boxes.nms_padded``, the same boxes for the whole batch with static shapes
            (compiles with XLA). A model switches it with ``set_nms``.
    """

    def __init__(self, pre_nms_top_n_train=1000, post_nms_top_n_train=300,
                 pre_nms_top_n_test=600, post_nms_top_n_test=100, nms_iou_threshold=0.7,
                 min_size=1.0 / 64.0, box_weights=RPN_BOX_WEIGHTS, nms="per_image", **kwargs):
        super().__init__(**kwargs)
        for name, value in [("pre_nms_top_n_train", pre_nms_top_n_train),
                            ("post_nms_top_n_train", post_nms_top_n_train),
                            ("pre_nms_top_n_test", pre_nms_top_n_test),
                            ("post_nms_top_n_test", post_nms_top_n_test)]:
            if int(value) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if not 0.0 < nms_iou_threshold <= 1.0:
            raise ValueError(f"`nms_iou_threshold` must be in (0, 1], got {nms_iou_threshold}")
        self.pre_nms_top_n_train = int(pre_nms_top_n_train)
        self.post_nms_top_n_train = int(post_nms_top_n_train)
        self.pre_nms_top_n_test = int(pre_nms_top_n_test)
        self.post_nms_top_n_test = int(post_nms_top_n_test)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.min_size = float(min_size)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.set_nms(nms)

    def set_nms(self, nms):
        """``"per_image"`` or ``"batched"`` NMS (see the class doc); retrace after a change."""
        if nms not in NMS_IMPLEMENTATIONS:
            raise ValueError(f"`nms` must be one of {NMS_IMPLEMENTATIONS}, got {nms!r}")
        self.nms = nms

    def counts(self, training):
        """``(pre_nms_top_n, post_nms_top_n)`` for training or inference."""
        if training:
            return self.pre_nms_top_n_train, self.post_nms_top_n_train
        return self.pre_nms_top_n_test, self.post_nms_top_n_test

    def decode_and_filter(self, objectness_logits, box_deltas, anchors, training=False):
        """The steps before NMS: decode, clip, drop tiny boxes, top-N by score.

        Returns:
            ``(boxes, scores)``: ``[batch, n, 4]`` and ``[batch, n]`` with
            ``n = min(pre_nms_top_n, A)``; dropped (tiny) boxes have score -1.
        """
        pre_nms_top_n, _ = self.counts(training)
        # Proposals are constants for the detector (approximate joint training).
        objectness_logits = tf.stop_gradient(tf.cast(objectness_logits, tf.float32))
        box_deltas = tf.stop_gradient(tf.cast(box_deltas, tf.float32))
        anchors = tf.convert_to_tensor(anchors, tf.float32)
        scores = tf.sigmoid(objectness_logits)  # [batch, A]
        decoded = box_ops.clip_boxes(
            box_ops.decode_boxes(box_deltas, anchors[None], weights=self.box_weights))
        big_enough = box_ops.box_size_mask(decoded, self.min_size)  # [batch, A]
        scores = tf.where(big_enough, scores, -1.0)
        num_anchors = scores.shape[1]  # static when the image size is (static k for XLA)
        top_n = (min(pre_nms_top_n, num_anchors) if num_anchors is not None
                 else tf.minimum(pre_nms_top_n, tf.shape(scores)[1]))
        top_scores, top_index = tf.math.top_k(scores, k=top_n)  # [batch, n]
        top_boxes = tf.gather(decoded, top_index, batch_dims=1)  # [batch, n, 4]
        return top_boxes, top_scores

    def call(self, objectness_logits, box_deltas, anchors, training=False):
        _, post_nms_top_n = self.counts(training)
        top_boxes, top_scores = self.decode_and_filter(objectness_logits, box_deltas, anchors,
                                                       training=training)
        if self.nms == "batched":
            # One call for the batch, static shapes; score_threshold 0 removes the dropped
            # (-1) boxes, as below.
            keep, num_valid = box_ops.nms_padded(top_boxes, top_scores, self.nms_iou_threshold,
                                                 post_nms_top_n, score_threshold=0.0)
            valid = tf.range(post_nms_top_n)[None, :] < num_valid[:, None]  # [batch, P]
            proposals = tf.where(valid[..., None],
                                 tf.gather(top_boxes, keep, batch_dims=1), 0.0)
            scores = tf.where(valid, tf.gather(top_scores, keep, batch_dims=1), 0.0)
            return proposals, scores, num_valid

        def one_image(inputs):
            image_boxes, image_scores = inputs
            # score_threshold 0 removes the dropped (-1) boxes.
            keep = box_ops.nms(image_boxes, image_scores, self.nms_iou_threshold,
                               post_nms_top_n, score_threshold=0.0)
            count = tf.shape(keep)[0]
            kept_boxes = tf.gather(image_boxes, keep)
            kept_scores = tf.gather(image_scores, keep)
            padding = post_nms_top_n - count
            kept_boxes = tf.pad(kept_boxes, [[0, padding], [0, 0]])
            kept_scores = tf.pad(kept_scores, [[0, padding]])
            return kept_boxes, kept_scores, count

        proposals, scores, num_valid = tf.map_fn(
            one_image, (top_boxes, top_scores),
            fn_output_signature=(tf.TensorSpec([post_nms_top_n, 4], tf.float32),
                                 tf.TensorSpec([post_nms_top_n], tf.float32),
                                 tf.TensorSpec([], tf.int32)))
        return proposals, scores, num_valid

    def get_config(self):
        config = super().get_config()
        config.update(
            pre_nms_top_n_train=self.pre_nms_top_n_train,
            post_nms_top_n_train=self.post_nms_top_n_train,
            pre_nms_top_n_test=self.pre_nms_top_n_test,
            post_nms_top_n_test=self.post_nms_top_n_test,
            nms_iou_threshold=self.nms_iou_threshold,
            min_size=self.min_size,
            box_weights=list(self.box_weights),
            nms=self.nms,
        )
        return config


def proposal_recall(proposals, num_valid, gt_boxes, gt_classes, iou_threshold=0.5):
    """Fraction of ground-truth boxes covered by some proposal with IoU >= threshold.

    The check that catches an RPN which "trains" but never proposes boxes on the
    objects: its recall is near 0.

    Args:
        proposals: ``[batch, P, 4]``; ``num_valid``: ``[batch]`` valid rows.
        gt_boxes: ``[batch, N, 4]``; ``gt_classes``: ``[batch, N]`` (-1 padding).
    Returns:
        scalar float: recalled objects / objects (1.0 when there is no object).
    """
    gt_boxes, gt_classes, gt_valid = check_detection_targets(gt_boxes, gt_classes)
    proposals = tf.convert_to_tensor(proposals, tf.float32)
    proposal_valid = tf.range(tf.shape(proposals)[1])[None, :] < tf.reshape(num_valid, [-1, 1])
    iou = box_ops.pairwise_iou(gt_boxes, proposals)  # [batch, N, P]
    iou = tf.where(proposal_valid[:, None, :], iou, 0.0)
    best = tf.reduce_max(tf.concat([iou, tf.zeros_like(iou[..., :1])], axis=-1), axis=-1)
    found = tf.logical_and(best >= iou_threshold, gt_valid)
    total = tf.reduce_sum(tf.cast(gt_valid, tf.float32))
    recall = tf.math.divide_no_nan(tf.reduce_sum(tf.cast(found, tf.float32)), total)
    return tf.where(total > 0, recall, 1.0)
