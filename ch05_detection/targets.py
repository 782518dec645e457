"""Training targets shared by every detector: ground-truth checks, matching, sampling.

A detector learns from *targets*: for each candidate box (an anchor of the RPN, SSD,
RetinaNet or YOLO, or a proposal of the Fast R-CNN head) which object it should
predict, or that it is background, or that it takes no part in the loss. Every
detector of this chapter builds them from the same three pieces, collected here:

* ``check_detection_targets``: the padded ground truth of a batch (``boxes``
  ``[batch, N, 4]``, ``classes`` ``[batch, N]`` with -1 padding, the repo's data
  contract): clip the boxes, mark padding and zero-area rows absent, and refuse class
  ids outside ``[0, num_classes)`` with the same message eagerly and inside a traced
  ``train_step``.
* the **matcher**, ``match_iou`` (on an IoU matrix) and ``match_boxes`` (on boxes):
  positive at IoU >= a threshold, negative below another, ignored in between (the
  "ignore band"), optionally every object's best candidate made positive even below
  the threshold ("low-quality matches"), and candidates that must not be used (anchors
  crossing the image border, padding proposals) ignored. Faster R-CNN's RPN uses
  0.7 / 0.3 with best-anchor matches (Ren et al. 2015, sec. 3.1.2) and ignores
  cross-boundary anchors (sec. 3.3, ``inside_image``); its detection head uses
  IoU >= 0.5 foreground and [0.1, 0.5) background (Fast R-CNN, Girshick 2015,
  sec. 2.3); SSD and RetinaNet use 0.5 / 0.5 and 0.5 / 0.4.
* the **balanced sampler**, ``sample_balanced``: keep a fixed number of labelled
  candidates per image with at most a given share of positives (256 anchors, up to
  half positive, Ren et al. 2015 sec. 3.1.3; 64 RoIs, 25% foreground, Girshick 2015
  sec. 2.3).

The sampler's randomness is *stateless*: image ``i`` of training step ``t`` draws
from the seed ``(seed, stream, t, global index of i)`` (``image_seeds``). Under
``tf.distribute`` the global index is ``replica_id * per_replica_batch + i``
(``global_image_index``), so one replica with a global batch of 8 and two replicas
with 4 images each sample exactly the same anchors, and a resumed run samples what
an uninterrupted one would.

Two helpers make hand-written losses correct under ``tf.distribute`` (the optimizer
sums the gradients of the replicas):

* ``mean_over_replicas(count)``: a per-batch normaliser (sampled anchors, positives)
  all-reduced (SUM) and divided by the number of replicas: each replica divides by
  the same number, the average count of a replica's share of the batch;
* ``scale_loss_for_replicas(loss)``: the loss divided by ``num_replicas_in_sync``,
  Keras' own convention (``keras.src.losses.loss.scale_loss_for_distribution``, which
  Keras applies only to losses given to ``compile``). Together: the summed gradients
  are those of the loss of the global batch on one device.

Try it::

    python -m pytest -q tests/test_ch05_targets.py
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ch05_detection import boxes as box_ops

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1
# Streams of stateless randomness, so two samplers in one step never share numbers.
RPN_SAMPLING_STREAM = 1
ROI_SAMPLING_STREAM = 2
FLIP_STREAM = 3


# ----------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------
def check_class_ids(gt_classes, num_classes, name="gt_classes"):
    """Refuse class ids outside ``[0, num_classes)`` (-1 is padding and is fine).

    Eagerly raises ``ValueError``; inside a ``tf.function`` (a traced ``train_step``)
    adds a ``tf.debugging.Assert`` that fails with the same message followed by the bad
    ids (``tf.errors.InvalidArgumentError``) when the batch runs. (XLA drops asserts:
    with ``jit_compile=True`` the check is skipped.)

    Args:
        gt_classes: int ``[...]`` class ids.
        num_classes: number of foreground classes.
    Returns:
        ``gt_classes`` (int32), with the check attached in a graph.
    """
    gt_classes = tf.cast(tf.convert_to_tensor(gt_classes), tf.int32)
    message = (f"`{name}` must be -1 (padding) or a class id in [0, num_classes={num_classes}); "
               f"bad class ids:")
    bad = tf.logical_or(gt_classes < -1, gt_classes >= num_classes)
    if tf.executing_eagerly():
        bad_ids = np.unique(gt_classes.numpy()[bad.numpy()])
        if bad_ids.size:
            raise ValueError(f"{message} {bad_ids.tolist()}")
        return gt_classes
    bad_ids = tf.boolean_mask(gt_classes, bad)
    assertion = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [message, bad_ids])
    with tf.control_dependencies([assertion]):
        return tf.identity(gt_classes)


def check_detection_targets(gt_boxes, gt_classes, num_classes=None):
    """Validate a padded ground-truth batch; returns ``(gt_boxes, gt_classes, gt_valid)``.

    Rows with class -1 are padding. Degenerate rows (zero width or height) are treated
    as absent and boxes reaching outside [0, 1] are clipped, so a noisy label never
    makes a loss NaN. With ``num_classes``, class ids outside ``[0, num_classes)``
    raise (``check_class_ids``): eagerly and inside a traced step alike.

    Args:
        gt_boxes: ``[batch, N, 4]`` normalized yxyx.
        gt_classes: ``[batch, N]`` int, -1 for padding.
        num_classes: number of foreground classes (optional check).
    Returns:
        ``gt_boxes`` clipped to [0, 1] ``[batch, N, 4]``, ``gt_classes`` ``[batch, N]``
        int32 with absent rows set to -1, ``gt_valid`` ``[batch, N]`` bool.
    """
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_classes = tf.cast(tf.convert_to_tensor(gt_classes), tf.int32)
    if gt_boxes.shape.rank is not None and gt_boxes.shape.rank != 3:
        raise ValueError(f"`gt_boxes` must have shape [batch, N, 4], got {gt_boxes.shape}")
    if gt_classes.shape.rank is not None and gt_classes.shape.rank != 2:
        raise ValueError(f"`gt_classes` must have shape [batch, N], got {gt_classes.shape}")
    if num_classes is not None:
        gt_classes = check_class_ids(gt_classes, num_classes)
    gt_boxes = box_ops.clip_boxes(gt_boxes)
    # A box with no area cannot be matched by IoU: treat it as absent.
    valid = tf.logical_and(gt_classes >= 0, box_ops.box_area(gt_boxes) > 0.0)
    gt_classes = tf.where(valid, gt_classes, -1)
    return gt_boxes, gt_classes, valid


def inside_image(anchors, allowed_border=0.0):
    """True for anchors lying inside the image (Ren et al. 2015, sec. 3.3).

    "During training, we ignore all cross-boundary anchors so they do not contribute
    to the loss": an anchor crossing the border would teach the RPN to regress boxes
    it can only partly see. (At test time the proposals are clipped instead.)

    Args:
        anchors: ``[A, 4]`` normalized yxyx.
        allowed_border: how far (normalized units) an anchor may reach outside.
    Returns:
        ``[A]`` bool.
    """
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(anchors, num=4, axis=-1)
    low, high = -float(allowed_border), 1.0 + float(allowed_border)
    return tf.logical_and(tf.logical_and(ymin >= low, xmin >= low),
                          tf.logical_and(ymax <= high, xmax <= high))


# ----------------------------------------------------------------------------------
# matching
# ----------------------------------------------------------------------------------
def _check_thresholds(positive_threshold, negative_threshold, negative_lower_bound):
    if not 0.0 <= negative_lower_bound <= negative_threshold <= positive_threshold <= 1.0:
        raise ValueError(
            "need 0 <= negative_lower_bound <= negative_threshold <= positive_threshold <= 1, "
            f"got negative_lower_bound={negative_lower_bound}, "
            f"negative_threshold={negative_threshold}, positive_threshold={positive_threshold}")


def match_iou(iou, gt_valid=None, positive_threshold=0.7, negative_threshold=0.3,
              negative_lower_bound=0.0, allow_low_quality_matches=True, candidate_valid=None):
    """Label candidates positive / negative / ignored from their IoU with the ground truth.

    Ren et al. 2015, sec. 3.1.2 (the RPN's rule), written for any IoU matrix:

    * positive (1): best IoU with a valid ground-truth box >= ``positive_threshold``;
      with ``allow_low_quality_matches`` also the candidate (or tied candidates) with
      the highest IoU for some object, even below the threshold, so that every object
      gets a positive (a best IoU of 0 does not count: it does not touch the object);
    * negative (0): best IoU in ``[negative_lower_bound, negative_threshold)``;
    * ignored (-1): everything else (the band between the thresholds, IoU below
      ``negative_lower_bound``, and candidates with ``candidate_valid`` False, which
      also never take part in the low-quality rule).

    Invalid ground-truth rows (padding) never match; with no valid ground truth the best
    IoU is 0, so every valid candidate is negative (if ``negative_lower_bound`` is 0).

    Args:
        iou: ``[..., A, N]`` IoU of A candidates with N ground-truth boxes.
        gt_valid: ``[..., N]`` bool (None: all valid).
        positive_threshold, negative_threshold: IoU thresholds.
        negative_lower_bound: smallest IoU of a negative (Fast R-CNN's 0.1; 0 keeps all).
        allow_low_quality_matches: apply the best-candidate-per-object rule.
        candidate_valid: ``[..., A]`` bool (None: all valid), e.g. ``inside_image``.
    Returns:
        ``(matched_index, labels, matched_iou)``: int32 ``[..., A]`` index of the matched
        ground-truth box (for a low-quality positive, the object it is best for;
        meaningless unless positive), int32 ``[..., A]`` labels, float ``[..., A]`` best
        IoU (0 when there is no valid ground truth).
    """
    _check_thresholds(positive_threshold, negative_threshold, negative_lower_bound)
    iou = tf.convert_to_tensor(iou)
    if not iou.dtype.is_floating:
        iou = tf.cast(iou, tf.float32)
    if iou.shape.rank is not None and iou.shape.rank < 2:
        raise ValueError(f"`iou` must have shape [..., A, N], got {iou.shape}")
    if gt_valid is not None:
        # Padding rows get IoU -1: below every threshold, never the best.
        iou = tf.where(tf.cast(gt_valid, tf.bool)[..., tf.newaxis, :], iou, -1.0)
    if candidate_valid is not None:
        candidate_valid = tf.cast(candidate_valid, tf.bool)
        iou = tf.where(candidate_valid[..., tf.newaxis], iou, -1.0)
    # An extra column of -1 makes the reductions well defined when N == 0.
    # (iou[..., :1] would itself be empty then, so build the column from the shape.)
    iou_shape = tf.shape(iou)
    minus_one_column = -tf.ones(tf.concat([iou_shape[:-1], [1]], axis=0), iou.dtype)
    padded_iou = tf.concat([iou, minus_one_column], axis=-1)  # [..., A, N + 1]
    best_iou = tf.reduce_max(padded_iou, axis=-1)  # [..., A]
    num_gt = iou_shape[-1]
    matched_index = tf.argmax(padded_iou, axis=-1, output_type=tf.int32)
    matched_index = tf.where(matched_index >= num_gt, 0, matched_index)
    matched_iou = tf.maximum(best_iou, 0.0)  # "no object" counts as IoU 0

    labels = tf.fill(tf.shape(best_iou), tf.constant(IGNORED, tf.int32))
    negative = tf.logical_and(matched_iou >= negative_lower_bound,
                              matched_iou < negative_threshold)
    labels = tf.where(negative, NEGATIVE, labels)
    labels = tf.where(best_iou >= positive_threshold, POSITIVE, labels)

    if allow_low_quality_matches:
        # Best IoU of each ground-truth box over all candidates: [..., 1, N]. (Padding
        # rows and invalid candidates hold -1, so they never qualify.)
        minus_one_row = -tf.ones(
            tf.concat([iou_shape[:-2], [1], iou_shape[-1:]], axis=0), iou.dtype)
        padded_columns = tf.concat([iou, minus_one_row], axis=-2)  # [..., A + 1, N]
        best_iou_per_gt = tf.reduce_max(padded_columns, axis=-2, keepdims=True)
        is_best = tf.logical_and(tf.equal(iou, best_iou_per_gt), best_iou_per_gt > 0.0)
        low_quality = tf.reduce_any(is_best, axis=-1)  # [..., A]
        # Assign such a candidate to the object it is best for (highest IoU among those).
        candidate_iou = tf.concat([tf.where(is_best, iou, -2.0), 3.0 * minus_one_column],
                                  axis=-1)
        best_for_index = tf.argmax(candidate_iou, axis=-1, output_type=tf.int32)
        matched_index = tf.where(low_quality, best_for_index, matched_index)
        labels = tf.where(low_quality, POSITIVE, labels)
    if candidate_valid is not None:
        labels = tf.where(candidate_valid, labels, IGNORED)
    return matched_index, labels, matched_iou


def match_boxes(anchors, gt_boxes, gt_valid, positive_threshold=0.7, negative_threshold=0.3,
                allow_low_quality_matches=True, anchor_valid=None):
    """Label each anchor positive, negative or ignored (Ren et al. 2015, sec. 3.1.2).

    ``match_iou`` on ``boxes.pairwise_iou(anchors, gt_boxes)``; see there for the rule.

    Args:
        anchors: ``[A, 4]`` or ``[batch, A, 4]`` yxyx anchors.
        gt_boxes: ``[N, 4]`` or ``[batch, N, 4]`` yxyx boxes in the anchors' units.
        gt_valid: ``[N]`` or ``[batch, N]`` bool, False for padding rows.
        positive_threshold, negative_threshold: IoU thresholds (0.7 and 0.3 in the paper).
        allow_low_quality_matches: apply the best-anchor-per-object rule.
        anchor_valid: optional ``[A]`` (or ``[batch, A]``) bool; False = ignored
            (e.g. ``inside_image(anchors)``).
    Returns:
        ``(matched_gt_index, match_labels)``: int32 ``[A]`` (or ``[batch, A]``) each.
    """
    anchors = box_ops._as_boxes(anchors, "anchors")
    gt_boxes = tf.cast(box_ops._as_boxes(gt_boxes, "gt_boxes"), anchors.dtype)
    iou = box_ops.pairwise_iou(anchors, gt_boxes)  # [..., A, N]
    gt_valid = tf.cast(gt_valid, tf.bool)
    if anchor_valid is not None:
        # Broadcast [A] over the batch of the IoU matrix.
        anchor_valid = tf.broadcast_to(tf.cast(anchor_valid, tf.bool), tf.shape(iou)[:-1])
    matched_index, labels, _ = match_iou(
        iou, gt_valid, positive_threshold, negative_threshold,
        allow_low_quality_matches=allow_low_quality_matches, candidate_valid=anchor_valid)
    return matched_index, labels


# ----------------------------------------------------------------------------------
# stateless randomness keyed on (step, global image index)
# ----------------------------------------------------------------------------------
def global_image_index(batch_size):
    """Index of each image of this replica's batch in the global batch: ``[batch]`` int32.

    ``replica_id_in_sync_group * per_replica_batch + i`` under ``tf.distribute`` (each
    replica gets an equal, consecutive slice of the global batch), ``i`` otherwise.
    """
    batch_size = tf.cast(batch_size, tf.int32)
    context = tf.distribute.get_replica_context()
    replica_id = 0 if context is None else context.replica_id_in_sync_group
    return tf.cast(replica_id, tf.int32) * batch_size + tf.range(batch_size, dtype=tf.int32)


def image_seeds(step, image_index, seed=0, stream=0):
    """One stateless seed per image: a pure function of (seed, stream, step, image index).

    Args:
        step: training step (e.g. ``optimizer.iterations``), int scalar.
        image_index: ``[batch]`` int global image indices (``global_image_index``).
        seed: the run's seed; stream: which random quantity (``RPN_SAMPLING_STREAM``...).
    Returns:
        ``[batch, 2]`` int seeds for ``tf.random.stateless_*``.
    """
    base = tf.stack([tf.constant(int(seed), tf.int64), tf.constant(int(stream), tf.int64)])
    step_seed = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
    image_index = tf.cast(tf.convert_to_tensor(image_index), tf.int64)
    return tf.map_fn(lambda index: tf.random.experimental.stateless_fold_in(step_seed, index),
                     image_index, fn_output_signature=step_seed.dtype)


def uniform_per_image(seeds, num_values):
    """``[batch, num_values]`` uniform numbers in [0, 1), row ``b`` from ``seeds[b]``."""
    return tf.map_fn(lambda seed: tf.random.stateless_uniform([num_values], seed=seed),
                     seeds, fn_output_signature=tf.float32)


def _as_image_seeds(seed, batch_size):
    """``seed`` as ``[batch, 2]`` per-image seeds: None/int -> step 0, local indices."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return image_seeds(0, tf.range(batch_size), seed=0 if seed is None else int(seed))
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank is not None and seed.shape.rank != 2:
        raise ValueError(f"`seed` must be None, an int or [batch, 2] per-image seeds "
                         f"(targets.image_seeds), got shape {seed.shape}")
    return seed


# ----------------------------------------------------------------------------------
# the balanced sampler
# ----------------------------------------------------------------------------------
def sample_balanced(labels, num_samples, positive_fraction, seed=None):
    """Randomly keep ``num_samples`` labelled candidates per image, at most a share positive.

    Faster R-CNN sec. 3.1.3: "we randomly sample 256 anchors in an image ... where the
    sampled positive and negative anchors have a ratio of up to 1:1. If there are fewer
    than 128 positive samples in an image, we pad the mini-batch with negative ones";
    Fast R-CNN sec. 2.3 does the same for RoIs with 25% foreground. The batch is done
    without loops: every candidate gets a random number, and within positives (and
    within negatives) the ones with the largest numbers are kept.

    Args:
        labels: ``[batch, A]`` int in {1 positive, 0 negative, -1 ignored}.
        num_samples: candidates kept per image.
        positive_fraction: upper bound on the positive share.
        seed: ``[batch, 2]`` per-image stateless seeds (``image_seeds``), or an int /
            None (then image ``b`` uses ``image_seeds(0, b, seed)``).
    Returns:
        ``[batch, A]`` int32 labels, with candidates that were not sampled set to -1.
    """
    if int(num_samples) < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"`positive_fraction` must be in [0, 1], got {positive_fraction}")
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    if labels.shape.rank is not None and labels.shape.rank != 2:
        raise ValueError(f"`labels` must have shape [batch, A], got {labels.shape}")
    seeds = _as_image_seeds(seed, tf.shape(labels)[0])
    random = uniform_per_image(seeds, tf.shape(labels)[1])  # [batch, A]
    positive = tf.equal(labels, POSITIVE)
    negative = tf.equal(labels, NEGATIVE)
    max_positive = int(round(num_samples * positive_fraction))
    num_positive = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), max_positive)
    num_negative = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=1),
                              num_samples - num_positive)

    def random_rank(mask):
        # Rank 0 = candidate with the largest random number; non-candidates rank last.
        order = tf.argsort(tf.where(mask, random, -1.0), axis=1, direction="DESCENDING")
        return tf.argsort(order, axis=1)  # the inverse permutation: rank of each candidate

    keep_positive = tf.logical_and(positive, random_rank(positive) < num_positive[:, None])
    keep_negative = tf.logical_and(negative, random_rank(negative) < num_negative[:, None])
    return tf.where(keep_positive, POSITIVE, tf.where(keep_negative, NEGATIVE, IGNORED))


# ----------------------------------------------------------------------------------
# losses under tf.distribute
# ----------------------------------------------------------------------------------
def mean_over_replicas(value):
    """A per-batch normaliser averaged over the replicas (all-reduce SUM / replicas).

    With one device (or outside a replica context) it is ``value`` itself. Every
    replica then divides its loss by the same number, and with
    ``scale_loss_for_replicas`` the summed gradients equal those of the global batch.
    """
    value = tf.convert_to_tensor(value)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, value)
    return total / tf.cast(context.num_replicas_in_sync, total.dtype)


def scale_loss_for_replicas(loss):
    """Divide a replica's loss by ``num_replicas_in_sync`` before taking its gradient.

    The optimizer sums the replicas' gradients (``all_reduce`` SUM); dividing by the
    number of replicas makes that sum the gradient of the mean loss, as Keras does for
    the losses given to ``compile``. Report the unscaled loss in the metrics.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss / tf.cast(replicas, loss.dtype)
