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
an uninterrupted one would. The random numbers are TensorFlow's own
(``tf.random.stateless_uniform``), drawn so that a step compiled with XLA gets the same
bits (``stateless_uniform``), and the sampler keeps the candidates with the largest
numbers with ``top_k`` (``keep_largest``) rather than full sorts.

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
    step_seed = stateless_fold_in(base, tf.cast(step, tf.int64))
    image_index = tf.cast(tf.convert_to_tensor(image_index), tf.int64)
    # stateless_fold_in(step_seed, index) for every image: [random int64 of step_seed, index],
    # the random part the same for all images (drawn once).
    first = _random_bits([], step_seed, tf.int64)
    return tf.stack([tf.fill(tf.shape(image_index), first), image_index], axis=1)


# Philox-4x32 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): the
# multipliers and round constants, and the key TensorFlow's CPU kernels start from.
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_ROUND_CONSTANTS = (0x9E3779B9, 0xBB67AE85)
_TF_SEED_KEY = (0x3EC8F720, 0x02461E29)
_LOW_32 = 0xFFFFFFFF


def _philox_rounds(counter, key):
    """Ten rounds of Philox-4x32 on four uint32 words with a two-word key (TF ops)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key

    def multiply(word, multiplier):  # 32 x 32 -> 64 bits: (high, low) words
        product = tf.cast(word, tf.uint64) * tf.constant(multiplier, tf.uint64)
        high = tf.bitwise.right_shift(product, tf.constant(32, tf.uint64))
        low = tf.bitwise.bitwise_and(product, tf.constant(_LOW_32, tf.uint64))
        return tf.cast(high, tf.uint32), tf.cast(low, tf.uint32)

    for _ in range(10):
        high0, low0 = multiply(c0, _PHILOX_MULTIPLIERS[0])
        high1, low1 = multiply(c2, _PHILOX_MULTIPLIERS[1])
        c0, c1, c2, c3 = (tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(high1, c1), k0), low1,
                          tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(high0, c3), k1), low0)
        k0 = k0 + tf.constant(_PHILOX_ROUND_CONSTANTS[0], tf.uint32)
        k1 = k1 + tf.constant(_PHILOX_ROUND_CONSTANTS[1], tf.uint32)
    return c0, c1, c2, c3


def _key_and_counter(seed):
    """The Philox key and counter TensorFlow's CPU kernels derive from ``[..., 2]`` int64 seeds.

    XLA derives them from the low 32 bits of each seed word only, so for seeds beyond 32
    bits (every seed ``image_seeds`` makes) a compiled step would draw other numbers. We
    derive them as the CPU kernel does (one Philox block of the seed's four 32-bit words
    under a fixed key), then hand them to the random op explicitly.

    Returns:
        ``(key, counter)``: uint64 ``[..., 1]`` and ``[..., 2]``.
    """
    seed = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)  # [..., 2]

    def split(word):
        low = tf.cast(tf.bitwise.bitwise_and(word, tf.constant(_LOW_32, tf.uint64)), tf.uint32)
        high = tf.cast(tf.bitwise.right_shift(word, tf.constant(32, tf.uint64)), tf.uint32)
        return low, high

    def join(low, high):
        return tf.bitwise.bitwise_or(tf.cast(low, tf.uint64), tf.bitwise.left_shift(
            tf.cast(high, tf.uint64), tf.constant(32, tf.uint64)))

    mixed = _philox_rounds((*split(seed[..., 0]), *split(seed[..., 1])),
                           tuple(tf.constant(k, tf.uint32) for k in _TF_SEED_KEY))
    key = join(mixed[0], mixed[1])[..., tf.newaxis]
    counter = tf.stack([tf.zeros_like(key[..., 0]), join(mixed[2], mixed[3])], axis=-1)
    return key, counter


def _random_bits(shape, seed, dtype, key_and_counter=None):
    """``tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=dtype)``
    (full-range integers) for one ``[2]`` seed, bit for bit, with and without XLA."""
    key, counter = key_and_counter or _key_and_counter(seed)
    return tf.raw_ops.StatelessRandomUniformFullIntV2(shape=shape, key=key, counter=counter,
                                                      alg=1, dtype=dtype)  # alg 1: Philox


def _bits_to_uniform(words):
    """uint32 words -> floats in [0, 1) as TensorFlow's CPU kernel converts them: the low 23
    bits become the mantissa of a float in [1, 2), minus 1."""
    mantissa = tf.bitwise.bitwise_and(words, tf.constant(0x7FFFFF, tf.uint32))
    one_to_two = tf.bitwise.bitwise_or(mantissa, tf.constant(0x3F800000, tf.uint32))
    return tf.bitcast(one_to_two, tf.float32) - 1.0


def stateless_fold_in(seed, data):
    """``tf.random.experimental.stateless_fold_in(seed, data)``, bit for bit, also under XLA:
    the new seed ``[random int64 from seed, data]``."""
    data = tf.cast(data, tf.int64)
    return tf.stack([_random_bits([], seed, tf.int64), data])


def stateless_uniform(shape, seed):
    """``tf.random.stateless_uniform(shape, seed)`` (floats in [0, 1)), bit for bit, also under XLA.

    TensorFlow's CPU kernel and XLA turn a seed into random words differently
    (``_key_and_counter``) and those words into floats differently, so a sampler compiled
    with ``jit_compile=True`` would pick other anchors than the same step without XLA. We
    draw the words as the CPU kernel does and convert them as it does
    (``_bits_to_uniform``).
    """
    return _bits_to_uniform(_random_bits(shape, seed, tf.uint32))


def uniform_per_image(seeds, num_values):
    """``[batch, num_values]`` uniform numbers in [0, 1), row ``b`` from ``seeds[b]``
    (``stateless_uniform``: the same numbers with and without XLA)."""
    keys, counters = _key_and_counter(seeds)  # all images at once: [batch, 1], [batch, 2]
    words = tf.map_fn(
        lambda key_counter: _random_bits([num_values], None, tf.uint32, key_counter),
        (keys, counters), fn_output_signature=tf.uint32)
    return _bits_to_uniform(words)


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

    num_candidates = labels.shape[1]
    keep_positive = keep_largest(positive, random, num_positive, max_positive, num_candidates)
    keep_negative = keep_largest(negative, random, num_negative, int(num_samples), num_candidates)
    return tf.where(keep_positive, POSITIVE, tf.where(keep_negative, NEGATIVE, IGNORED))


def keep_largest(mask, random, count, max_count, num_candidates=None):
    """The ``count[b]`` candidates of image ``b`` (where ``mask``) with the largest ``random``.

    Equal numbers: the lower index wins (the order of a stable descending sort). Only the
    best ``max_count`` (a Python int >= every ``count``) are ever needed, so ``top_k``
    finds them (a partial sort, with a static ``k``: XLA-friendly) and a scatter marks them.

    Args:
        mask: ``[batch, A]`` bool candidates; random: ``[batch, A]`` numbers in [0, 1).
        count: ``[batch]`` int32 how many to keep (at most the number of candidates).
        max_count: upper bound on ``count``.
        num_candidates: ``A`` if known when tracing (None: read from ``mask``).
    Returns:
        ``[batch, A]`` bool.
    """
    num_candidates = num_candidates or mask.shape[1]
    if num_candidates is None:
        k = tf.minimum(int(max_count), tf.shape(mask)[1])
    else:
        k = min(int(max_count), int(num_candidates))
    # Non-candidates get -1, below every random number, so they come last.
    _, best = tf.math.top_k(tf.where(mask, random, -1.0), k=k)  # [batch, k]
    chosen = tf.range(k)[None, :] < count[:, None]  # the first count[b] of them
    batch_index = tf.broadcast_to(tf.range(tf.shape(mask)[0])[:, None], tf.shape(best))
    return tf.scatter_nd(tf.stack([batch_index, best], axis=-1), chosen, tf.shape(mask))


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
