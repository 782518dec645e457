"""Box operations for object detection: formats, IoU, encoding, matching and NMS.

Every detector in this chapter is built from the same handful of box operations.
This module collects them, each written as plain TensorFlow ops that work eagerly,
inside ``tf.function`` and inside Keras layers:

* format conversion: normalized ``[ymin, xmin, ymax, xmax]`` (the repo's contract,
  and the order ``tf.image`` uses) <-> absolute pixels <-> COCO ``[x, y, width, height]``;
* ``box_area`` and ``pairwise_iou`` (intersection over union, the overlap measure of
  every matching rule and of the evaluation);
* ``encode_boxes`` / ``decode_boxes``: the box parametrisation of R-CNN (Girshick et
  al. 2014, appendix C), Fast R-CNN (Girshick 2015, sec. 2.3) and Faster R-CNN (Ren et
  al. 2015, eq. 2), with the usual scale weights and a clamped log-scale so a bad
  prediction never produces ``inf`` or ``NaN``;
* ``clip_boxes`` and ``box_size_mask`` (the proposal layer's clean-up);
* ``match_boxes``: label anchors positive / negative / ignored from their IoU with
  the ground truth (Ren et al. 2015, sec. 3.1.2), a front for ``targets.py``;
* non-maximum suppression three times: ``nms_reference``, a readable greedy loop in NumPy
  (the lesson), ``nms``, the fast ``tf.image.non_max_suppression`` path used in the
  models, and ``nms_padded``, the same greedy rule for a whole batch with static shapes
  (what XLA can compile). ``tests/test_ch05_boxes.py`` checks they keep the same boxes, and
  ``bench/bench_nms.py`` times the first two.

Conventions. Boxes are ``[..., 4]`` in ``[ymin, xmin, ymax, xmax]`` order unless a
function says otherwise. Widths and heights are ``xmax - xmin`` and ``ymax - ymin``
(no "+1 pixel", the modern COCO convention), so every function works the same on
normalized and on absolute coordinates. A box with ``ymax <= ymin`` or
``xmax <= xmin`` is *degenerate*: its area is 0 and its IoU with anything is 0.

Try it (prints 1/7: the squares share a 1x1 corner out of a union of 7)::

  python -c "from ch05_detection import boxes; print(boxes.pairwise_iou([[0,0,2,2]], [[1,1,3,3]]))"
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

# Scale weights of the box encoding: the regression targets are multiplied by
# these so that they have roughly unit variance (Detectron / torchvision default for
# Faster R-CNN; Keras expresses the same thing as "variance" = 1 / weight).
DEFAULT_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Largest log-scale a decoded box may use: a box at most 1000/16 ~ 62 times its anchor
# (the same clamp as Detectron and torchvision).
DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16.0)
# Keeps divisions and logarithms finite for zero-size boxes and anchors.
EPSILON = 1e-8


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def _as_boxes(boxes, name="boxes"):
    """Convert to a float tensor and check that the last dimension is 4."""
    tensor = tf.convert_to_tensor(boxes)
    if not tensor.dtype.is_floating:
        tensor = tf.cast(tensor, tf.float32)
    if tensor.shape.rank is not None:
        if tensor.shape.rank == 0 or (tensor.shape[-1] is not None and tensor.shape[-1] != 4):
            raise ValueError(
                f"`{name}` must have shape [..., 4] (ymin, xmin, ymax, xmax), "
                f"got shape {tensor.shape}"
            )
    return tensor


def _unstack(boxes):
    """Split ``[..., 4]`` into four ``[...]`` tensors."""
    return tf.unstack(boxes, num=4, axis=-1)


# ----------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------
def yxyx_to_xywh(boxes):
    """``[ymin, xmin, ymax, xmax]`` -> COCO ``[x, y, width, height]`` (x, y = top-left).

    Args:
        boxes: ``[..., 4]`` yxyx boxes (normalized or absolute).
    Returns:
        ``[..., 4]`` xywh boxes in the same units.
    """
    boxes = _as_boxes(boxes)
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=-1)


def xywh_to_yxyx(boxes):
    """COCO ``[x, y, width, height]`` -> ``[ymin, xmin, ymax, xmax]``.

    Args:
        boxes: ``[..., 4]`` xywh boxes.
    Returns:
        ``[..., 4]`` yxyx boxes in the same units.
    """
    boxes = _as_boxes(boxes)
    x, y, width, height = _unstack(boxes)
    return tf.stack([y, x, y + height, x + width], axis=-1)


def to_absolute(boxes, height, width):
    """Normalized yxyx (fractions of the image) -> absolute pixel yxyx.

    Args:
        boxes: ``[..., 4]`` normalized yxyx boxes.
        height, width: image size in pixels (Python numbers or scalar tensors).
    Returns:
        ``[..., 4]`` yxyx boxes in pixels.
    """
    boxes = _as_boxes(boxes)
    height = tf.cast(height, boxes.dtype)
    width = tf.cast(width, boxes.dtype)
    return boxes * tf.stack([height, width, height, width])


def to_normalized(boxes, height, width):
    """Absolute pixel yxyx -> normalized yxyx (divide by the image size).

    Args:
        boxes: ``[..., 4]`` yxyx boxes in pixels.
        height, width: image size in pixels (Python numbers or scalar tensors).
    Returns:
        ``[..., 4]`` normalized yxyx boxes.
    """
    boxes = _as_boxes(boxes)
    height = tf.cast(height, boxes.dtype)
    width = tf.cast(width, boxes.dtype)
    return boxes / tf.stack([height, width, height, width])


# ----------------------------------------------------------------------------------
# area and IoU
# ----------------------------------------------------------------------------------
def box_area(boxes):
    """Area of each box; degenerate boxes (max < min) have area 0.

    Args:
        boxes: ``[..., 4]`` yxyx boxes.
    Returns:
        ``[...]`` areas.
    """
    boxes = _as_boxes(boxes)
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)


def pairwise_iou(boxes_a, boxes_b):
    """Intersection over union of every box in ``boxes_a`` with every box in ``boxes_b``.

    IoU = area(A ∩ B) / area(A ∪ B). Boxes of zero area give IoU 0 (never NaN).

    Args:
        boxes_a: ``[..., N, 4]`` yxyx boxes.
        boxes_b: ``[..., M, 4]`` yxyx boxes; leading (batch) dimensions broadcast with
            those of ``boxes_a``.
    Returns:
        ``[..., N, M]`` IoU matrix.
    """
    boxes_a = _as_boxes(boxes_a, "boxes_a")
    boxes_b = tf.cast(_as_boxes(boxes_b, "boxes_b"), boxes_a.dtype)
    if boxes_a.shape.rank is not None and boxes_a.shape.rank < 2:
        raise ValueError(f"`boxes_a` must have shape [..., N, 4], got {boxes_a.shape}")
    if boxes_b.shape.rank is not None and boxes_b.shape.rank < 2:
        raise ValueError(f"`boxes_b` must have shape [..., M, 4], got {boxes_b.shape}")
    a_ymin, a_xmin, a_ymax, a_xmax = _unstack(boxes_a[..., :, tf.newaxis, :])  # [..., N, 1]
    b_ymin, b_xmin, b_ymax, b_xmax = _unstack(boxes_b[..., tf.newaxis, :, :])  # [..., 1, M]
    # The intersection is itself a box: the largest min corner, the smallest max corner.
    intersection_height = tf.maximum(tf.minimum(a_ymax, b_ymax) - tf.maximum(a_ymin, b_ymin), 0.0)
    intersection_width = tf.maximum(tf.minimum(a_xmax, b_xmax) - tf.maximum(a_xmin, b_xmin), 0.0)
    intersection = intersection_height * intersection_width  # [..., N, M]
    area_a = box_area(boxes_a)[..., :, tf.newaxis]  # [..., N, 1]
    area_b = box_area(boxes_b)[..., tf.newaxis, :]  # [..., 1, M]
    union = area_a + area_b - intersection
    # Two zero-area boxes have union 0: divide_no_nan turns 0/0 into 0.
    return tf.math.divide_no_nan(intersection, union)


# ----------------------------------------------------------------------------------
# encoding and decoding (the box regression targets)
# ----------------------------------------------------------------------------------
def _centers_and_sizes(boxes):
    """yxyx -> (center_y, center_x, height, width); sizes floored at EPSILON."""
    ymin, xmin, ymax, xmax = _unstack(boxes)
    height = tf.maximum(ymax - ymin, EPSILON)
    width = tf.maximum(xmax - xmin, EPSILON)
    return ymin + 0.5 * (ymax - ymin), xmin + 0.5 * (xmax - xmin), height, width


def _check_weights(weights):
    if weights is None:
        return (1.0, 1.0, 1.0, 1.0)
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ValueError(
            f"`weights` must be 4 positive numbers (wy, wx, wh, ww), got {weights}"
        )
    return weights


def encode_boxes(boxes, anchors, weights=DEFAULT_BOX_WEIGHTS):
    """Regression targets that move ``anchors`` onto ``boxes`` (Ren et al. 2015, eq. 2).

    With anchor centre (ya, xa) and size (ha, wa) and box centre (y, x), size (h, w)::

        ty = wy * (y - ya) / ha        tx = wx * (x - xa) / wa
        th = wh * log(h / ha)          tw = ww * log(w / wa)

    The weights (10, 10, 5, 5) scale the targets to roughly unit variance
    (Fast R-CNN, sec. 2.3, normalises the targets the same way). Keras's
    ``keras.utils.bounding_boxes.encode_box_to_deltas`` computes the same thing with
    ``variance = 1 / weights``. Zero-size boxes or anchors are floored at ``EPSILON``
    so the result stays finite.

    Args:
        boxes: ``[..., 4]`` yxyx target boxes.
        anchors: ``[..., 4]`` yxyx anchors (or proposals), broadcastable to ``boxes``.
        weights: 4 positive scale weights (wy, wx, wh, ww); ``None`` means all 1.
    Returns:
        ``[..., 4]`` deltas ``(ty, tx, th, tw)``.
    """
    weights = _check_weights(weights)
    boxes = _as_boxes(boxes)
    anchors = tf.cast(_as_boxes(anchors, "anchors"), boxes.dtype)
    center_y, center_x, height, width = _centers_and_sizes(boxes)
    anchor_y, anchor_x, anchor_height, anchor_width = _centers_and_sizes(anchors)
    deltas = tf.stack(
        [
            weights[0] * (center_y - anchor_y) / anchor_height,
            weights[1] * (center_x - anchor_x) / anchor_width,
            weights[2] * tf.math.log(height / anchor_height),
            weights[3] * tf.math.log(width / anchor_width),
        ],
        axis=-1,
    )
    return deltas


def decode_boxes(deltas, anchors, weights=DEFAULT_BOX_WEIGHTS,
                 max_log_scale=DEFAULT_MAX_LOG_SCALE):
    """Apply predicted ``deltas`` to ``anchors``: the inverse of ``encode_boxes``.

    ``h = ha * exp(th / wh)`` and ``w = wa * exp(tw / ww)``; the log-scales
    ``th / wh`` and ``tw / ww`` are clamped at ``max_log_scale`` first, so an untrained
    head predicting huge values gives a huge but finite box, never ``inf`` (whose
    ``inf - inf`` would then give ``NaN``).

    Args:
        deltas: ``[..., 4]`` ``(ty, tx, th, tw)``.
        anchors: ``[..., 4]`` yxyx anchors, broadcastable to ``deltas``.
        weights: the same 4 weights used to encode.
        max_log_scale: upper clamp on ``th / wh`` and ``tw / ww`` (default log(1000/16)).
    Returns:
        ``[..., 4]`` yxyx boxes in the anchors' units.
    """
    weights = _check_weights(weights)
    deltas = _as_boxes(deltas, "deltas")
    anchors = tf.cast(_as_boxes(anchors, "anchors"), deltas.dtype)
    anchor_y, anchor_x, anchor_height, anchor_width = _centers_and_sizes(anchors)
    ty, tx, th, tw = _unstack(deltas)
    center_y = ty / weights[0] * anchor_height + anchor_y
    center_x = tx / weights[1] * anchor_width + anchor_x
    height = tf.exp(tf.minimum(th / weights[2], max_log_scale)) * anchor_height
    width = tf.exp(tf.minimum(tw / weights[3], max_log_scale)) * anchor_width
    return tf.stack(
        [center_y - 0.5 * height, center_x - 0.5 * width,
         center_y + 0.5 * height, center_x + 0.5 * width],
        axis=-1,
    )


# ----------------------------------------------------------------------------------
# clipping and filtering
# ----------------------------------------------------------------------------------
def clip_boxes(boxes, height=1.0, width=1.0):
    """Clip boxes to the image ``[0, height] x [0, width]``.

    Args:
        boxes: ``[..., 4]`` yxyx boxes.
        height, width: image size in the boxes' units (1.0 for normalized boxes).
    Returns:
        ``[..., 4]`` clipped boxes.
    """
    boxes = _as_boxes(boxes)
    height = tf.cast(height, boxes.dtype)
    width = tf.cast(width, boxes.dtype)
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.stack(
        [tf.clip_by_value(ymin, 0.0, height), tf.clip_by_value(xmin, 0.0, width),
         tf.clip_by_value(ymax, 0.0, height), tf.clip_by_value(xmax, 0.0, width)],
        axis=-1,
    )


def box_size_mask(boxes, min_size):
    """True for boxes at least ``min_size`` tall *and* wide (proposal clean-up).

    Args:
        boxes: ``[..., 4]`` yxyx boxes.
        min_size: minimum height and width, in the boxes' units.
    Returns:
        ``[...]`` bool mask.
    """
    boxes = _as_boxes(boxes)
    min_size = tf.cast(min_size, boxes.dtype)
    ymin, xmin, ymax, xmax = _unstack(boxes)
    return tf.logical_and(ymax - ymin >= min_size, xmax - xmin >= min_size)


# ----------------------------------------------------------------------------------
# matching anchors to ground truth
# ----------------------------------------------------------------------------------
def match_boxes(anchors, gt_boxes, gt_valid, positive_threshold=0.7,
                negative_threshold=0.3, allow_low_quality_matches=True, anchor_valid=None):
    """Label anchors positive / negative / ignored (Ren et al. 2015, sec. 3.1.2).

    The matcher lives in ``targets.py`` with the sampler (every detector's targets);
    this name stays here for the box lessons. See ``targets.match_boxes``.

    Returns:
        ``(matched_gt_index, match_labels)``: int32 ``[A]`` (or ``[batch, A]``) each.
    """
    from ch05_detection import targets  # targets imports this module

    return targets.match_boxes(anchors, gt_boxes, gt_valid, positive_threshold,
                               negative_threshold, allow_low_quality_matches, anchor_valid)


# ----------------------------------------------------------------------------------
# non-maximum suppression
# ----------------------------------------------------------------------------------
def _check_iou_threshold(iou_threshold):
    """ValueError unless ``0 <= iou_threshold <= 1``; when the value is only known when
    the graph runs, returns an in-graph assert instead (else None)."""
    value = tf.get_static_value(iou_threshold) if tf.is_tensor(iou_threshold) else iou_threshold
    message = "`iou_threshold` must be in [0, 1] (an IoU)"
    if value is not None:
        value = float(np.asarray(value))
        if not 0.0 <= value <= 1.0:  # False for NaN too
            raise ValueError(f"{message}, got {value}")
        return None
    threshold = tf.cast(iou_threshold, tf.float32)
    return tf.debugging.Assert(tf.logical_and(threshold >= 0.0, threshold <= 1.0),
                        [message + ", got", threshold])


def _check_max_output_size(max_output_size):
    if max_output_size is not None and not tf.is_tensor(max_output_size) and max_output_size < 0:
        raise ValueError(f"`max_output_size` must be >= 0, got {max_output_size}")


def _iou_one_to_many(box, others):
    """NumPy IoU of one yxyx box [4] with many boxes [K, 4] -> [K]."""
    intersection_height = np.maximum(
        np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0.0)
    intersection_width = np.maximum(
        np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0.0)
    intersection = intersection_height * intersection_width
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    other_areas = (np.maximum(others[:, 2] - others[:, 0], 0.0)
                   * np.maximum(others[:, 3] - others[:, 1], 0.0))
    union = area + other_areas - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def nms_reference(boxes, scores, iou_threshold, max_output_size=None, score_threshold=None):
    """Greedy non-maximum suppression, written to be read (NumPy).

    Repeat: take the highest-scoring box still in play, keep it, and remove every
    remaining box that overlaps it with IoU > ``iou_threshold`` (these are
    duplicate detections of the same object). Stop when no box is left or
    ``max_output_size`` boxes are kept. Boxes scoring ``<= score_threshold`` never
    take part. This is the rule of ``tf.image.non_max_suppression``.

    A degenerate box (``ymax <= ymin`` or ``xmax <= xmin``, also one whose corners are
    swapped) has area 0 and IoU 0 with everything, as everywhere in this module: it is
    kept if its score allows, and it suppresses nothing.

    Args:
        boxes: ``[K, 4]`` yxyx boxes (array-like).
        scores: ``[K]`` scores.
        iou_threshold: overlap in [0, 1] above which a lower-scoring box is suppressed.
        max_output_size: keep at most this many (None: no limit).
        score_threshold: drop boxes scoring at or below this first (None: keep all).
    Returns:
        int64 NumPy array of kept indices, highest score first.
    """
    _check_iou_threshold(iou_threshold)
    _check_max_output_size(max_output_size)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(
            f"`boxes` [K, 4] and `scores` [K] must have the same K, got {len(boxes)} and "
            f"{len(scores)}")
    # Visit boxes from the highest score down (stable, so ties keep input order).
    order = np.argsort(-scores, kind="stable")
    if score_threshold is not None:
        order = order[scores[order] > score_threshold]
    keep = []
    while order.size > 0:
        if max_output_size is not None and len(keep) >= max_output_size:
            break
        best = order[0]
        keep.append(best)
        rest = order[1:]
        overlaps = _iou_one_to_many(boxes[best], boxes[rest])
        order = rest[overlaps <= iou_threshold]  # survivors stay in score order
    return np.asarray(keep, dtype=np.int64)


def nms(boxes, scores, iou_threshold, max_output_size, score_threshold=float("-inf")):
    """Fast greedy NMS: ``tf.image.non_max_suppression`` (the path the models use).

    Same rule as ``nms_reference``, degenerate boxes included: TensorFlow's kernel
    would sort the corners of a box whose ``ymin > ymax`` (treating it as a real box),
    so such a box is first collapsed to zero height (width), which the kernel gives
    IoU 0 like ``nms_reference`` and ``pairwise_iou`` do. Works inside ``tf.function``;
    the checks cost nothing there when shapes and thresholds are known when tracing
    (otherwise they are in-graph asserts, no trip to the host).

    Args:
        boxes: ``[K, 4]`` yxyx boxes.
        scores: ``[K]`` scores.
        iou_threshold: overlap in [0, 1] above which a lower-scoring box is suppressed.
        max_output_size: keep at most this many.
        score_threshold: boxes scoring at or below this are dropped first.
    Returns:
        int32 ``[kept]`` indices into ``boxes``, highest score first.
    """
    boxes = _as_boxes(boxes)
    if boxes.shape.rank is not None and boxes.shape.rank != 2:
        raise ValueError(f"`boxes` must have shape [K, 4], got {boxes.shape}")
    scores = tf.convert_to_tensor(scores)
    if scores.shape.rank is not None and scores.shape.rank != 1:
        raise ValueError(f"`scores` must have shape [K] (one score per box), got {scores.shape}")
    _check_max_output_size(max_output_size)
    # In-graph asserts for what is unknown when tracing; the NMS waits for them.
    graph_checks = [_check_iou_threshold(iou_threshold)]
    num_boxes, num_scores = boxes.shape[0], scores.shape[0]
    if num_boxes is not None and num_scores is not None:
        if num_boxes != num_scores:
            raise ValueError(f"`scores` must have one score per box: `boxes` has {num_boxes} "
                             f"boxes, `scores` has {num_scores} values")
    else:
        graph_checks.append(tf.debugging.assert_equal(
            tf.shape(scores)[0], tf.shape(boxes)[0],
            message="`scores` must have one score per box (`scores` [K], `boxes` [K, 4])"))
    graph_checks = [check for check in graph_checks if check is not None]
    if graph_checks:
        with tf.control_dependencies(graph_checks):
            boxes = tf.identity(boxes)
    boxes = tf.cast(boxes, tf.float32)
    ymin, xmin, ymax, xmax = _unstack(boxes)
    # A swapped corner becomes a zero extent: degenerate, IoU 0 (see the docstring).
    boxes = tf.stack([ymin, xmin, tf.maximum(ymax, ymin), tf.maximum(xmax, xmin)], axis=-1)
    return tf.image.non_max_suppression(
        boxes, tf.cast(scores, tf.float32), max_output_size,
        iou_threshold=iou_threshold, score_threshold=score_threshold)


def nms_padded(boxes, scores, iou_threshold, max_output_size, score_threshold=float("-inf"),
               tile_size=128):
    """Batched greedy NMS with static shapes: the same boxes as ``nms``, XLA-compatible.

    ``tf.image.non_max_suppression`` returns a different number of boxes per image, so a
    batch needs a Python-side (``tf.map_fn``) loop, which XLA cannot compile. Here every
    image keeps exactly ``max_output_size`` slots (padding after ``num_valid``) and the
    whole batch runs at once. The rule is greedy NMS (``nms_reference``), computed tile by
    tile in score order:

    1. sort by score (ties: lower index first, as TensorFlow's kernel);
    2. for each tile of ``tile_size`` boxes: drop the boxes that overlap (IoU >
       ``iou_threshold``) a box *kept* in an earlier tile (one [batch, tile, K] IoU
       matrix); then, inside the tile, "kept" is the fixed point of
       ``keep[i] = candidate[i] and no kept j < i overlaps i``, found by repeating that
       update from "all candidates" until nothing changes: after ``m`` rounds the first
       ``m`` boxes are final, and the fixed point is unique, so it is greedy NMS
       (the tiled scheme of ``tf.image.non_max_suppression_padded``);
    3. stop early once every image has ``max_output_size`` boxes.

    Degenerate boxes (a swapped corner) have IoU 0 and suppress nothing, as in ``nms``.

    Args:
        boxes: ``[batch, K, 4]`` yxyx boxes.
        scores: ``[batch, K]``.
        iou_threshold: overlap above which a lower-scoring box is suppressed.
        max_output_size: slots per image (a Python int).
        score_threshold: boxes scoring at or below this never take part.
        tile_size: boxes per tile (more: fewer loop rounds, more IoU work per round; 128
            was the fastest of 128, 256, 512 for 1000 boxes on a 2-core CPU under XLA).
    Returns:
        ``(indices, num_valid)``: int32 ``[batch, max_output_size]`` indices into ``boxes``,
        highest score first, 0 after ``num_valid`` (int32 ``[batch]``).
    """
    _check_iou_threshold(iou_threshold)
    _check_max_output_size(max_output_size)
    max_output_size, tile_size = int(max_output_size), int(tile_size)
    if tile_size < 1:
        raise ValueError(f"`tile_size` must be >= 1, got {tile_size}")
    boxes = tf.cast(_as_boxes(boxes), tf.float32)
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    if boxes.shape.rank != 3 or scores.shape.rank != 2:
        raise ValueError(f"`boxes` must be [batch, K, 4] and `scores` [batch, K], got "
                         f"{boxes.shape} and {scores.shape}")
    num_boxes = boxes.shape[1]
    if num_boxes is None:
        raise ValueError(f"`boxes` needs a static number of boxes K for nms_padded, got "
                         f"{boxes.shape}")
    ymin, xmin, ymax, xmax = _unstack(boxes)
    boxes = tf.stack([ymin, xmin, tf.maximum(ymax, ymin), tf.maximum(xmax, xmin)], axis=-1)
    # 1. score order; top_k is stable, so equal scores keep the lower index first.
    sorted_scores, order = tf.math.top_k(scores, k=num_boxes)  # [batch, K]
    sorted_boxes = tf.gather(boxes, order, batch_dims=1)  # [batch, K, 4]
    candidate = sorted_scores > score_threshold
    # Pad to whole tiles (padding rows are never candidates).
    num_tiles = max(1, math.ceil(max(num_boxes, max_output_size) / tile_size))
    padded = num_tiles * tile_size
    sorted_boxes = tf.pad(sorted_boxes, [[0, 0], [0, padded - num_boxes], [0, 0]])
    candidate = tf.pad(candidate, [[0, 0], [0, padded - num_boxes]])
    order = tf.pad(order, [[0, 0], [0, padded - num_boxes]])
    batch_size = tf.shape(sorted_boxes)[0]
    earlier = tf.range(tile_size)[:, None] < tf.range(tile_size)[None, :]  # [j, i]: j < i

    def tile_round(tile, keep):
        start = tile * tile_size
        tile_boxes = tf.slice(sorted_boxes, [0, start, 0], [-1, tile_size, 4])  # [b, T, 4]
        tile_candidate = tf.slice(candidate, [0, start], [-1, tile_size])  # [b, T]
        # 2a. boxes kept in earlier tiles (keep is False from this tile on).
        cross = pairwise_iou(sorted_boxes, tile_boxes) > iou_threshold  # [b, K', T]
        suppressed = tf.reduce_any(tf.logical_and(cross, keep[:, :, None]), axis=1)
        tile_candidate = tf.logical_and(tile_candidate, tf.logical_not(suppressed))
        # 2b. inside the tile: the fixed point of the greedy rule.
        overlaps = tf.logical_and(pairwise_iou(tile_boxes, tile_boxes) > iou_threshold,
                                  earlier)  # [b, T(j), T(i)]: j earlier and overlapping i

        def update(tile_keep, _):
            beaten = tf.reduce_any(tf.logical_and(overlaps, tile_keep[:, :, None]), axis=1)
            new_keep = tf.logical_and(tile_candidate, tf.logical_not(beaten))
            return [new_keep, tf.reduce_any(tf.not_equal(new_keep, tile_keep))]

        tile_keep, _ = tf.while_loop(lambda _, changed: changed, update,
                                     [tile_candidate, tf.constant(True)],
                                     maximum_iterations=tile_size + 1)
        # Write the tile into keep (a where on [batch, tiles, T]: no dynamic shapes).
        this_tile = tf.equal(tf.range(num_tiles), tile)[None, :, None]
        keep = tf.where(this_tile, tile_keep[:, None, :],
                        tf.reshape(keep, [-1, num_tiles, tile_size]))
        return [tile + 1, tf.reshape(keep, [-1, padded])]

    def not_done(tile, keep):
        count = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
        return tf.logical_and(tile < num_tiles, tf.reduce_any(count < max_output_size))

    _, keep = tf.while_loop(not_done, tile_round,
                            [tf.constant(0), tf.zeros([batch_size, padded], tf.bool)])
    # 3. the kept positions in score order, first max_output_size of them.
    position = tf.range(padded)
    rank_key = tf.where(keep, padded - position, 0)  # kept first, earlier first
    _, kept_position = tf.math.top_k(rank_key, k=max_output_size)  # [b, max_output_size]
    num_valid = tf.minimum(tf.reduce_sum(tf.cast(keep, tf.int32), axis=1), max_output_size)
    valid = tf.range(max_output_size)[None, :] < num_valid[:, None]
    indices = tf.gather(order, kept_position, batch_dims=1)
    return tf.where(valid, indices, 0), num_valid
