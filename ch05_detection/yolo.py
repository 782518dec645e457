"""YOLO: one-stage detection on an S x S grid (v1) and with anchor boxes (the v2 idea).

Redmon, Divvala, Girshick and Farhadi 2016, "You Only Look Once: Unified, Real-Time Object
Detection" (YOLO v1), and Redmon and Farhadi 2017, "YOLO9000: Better, Faster, Stronger"
(YOLO v2, its anchor boxes). Both read the image once: a backbone from chapter 4 turns it into
an ``S x S`` feature map (stride 16 on 128 px images gives ``S = 8``, cells of 16 px), and a
small convolutional head predicts, in every cell, boxes, how sure it is that they hold an
object, and the class. No proposals, no RoI pooling: one network, one pass, one loss.

**YOLO v1** (``YOLO(..., anchors=None)``, ``--model yolo``). Each cell predicts ``B`` boxes
``(x, y, w, h, confidence)`` and one set of class probabilities ``P(class | object)``: the
output is ``[batch, S, S, B * 5 + C]`` (sec. 2). ``(x, y)`` is the box centre as an offset
inside its cell, ``(w, h)`` the box size as a fraction of the image (sec. 2.2). In training
(sec. 2.2):

* the cell that contains an object's centre is *responsible* for it, and within that cell the
  predictor whose current box has the highest IoU with the object;
* the loss is a sum of squared errors: ``lambda_coord = 5`` times the error of ``(x, y)`` and
  of ``(sqrt w, sqrt h)`` (square roots, so a small error on a small box costs more than on a
  large one), the error of the responsible predictor's confidence against its target,
  ``lambda_noobj = 0.5`` times the confidence of every other predictor (target 0), and the error
  of the class probabilities of cells holding an object;
* the confidence target is the IoU of the predicted box with the object ("we want the confidence
  score to equal the IOU between the predicted box and the ground truth", sec. 2), which we
  follow (``confidence_target="iou"``; ``"one"`` is the simpler variant many re-implementations
  use).

At test time the class-specific confidence of a box is ``P(class | object) * confidence``
(sec. 2), followed by per-class NMS (``detector.select_detections``). A cell has one set of
class probabilities, so **v1 can learn one object per cell**: when the centres of two objects
fall into one cell, we keep the larger (ties: the first listed) and the other one is never
learnt (``yolo_v1_targets`` shows which). The paper says it: "each grid cell only predicts two
boxes and can only have one class", so YOLO "struggles with small objects that appear in
groups" (sec. 2.4).

Where we differ from the paper, and why: the paper's head ends in two fully connected layers on
a 448 px image; ours is convolutional (a 3x3 conv block or two, then a 1x1 conv), which keeps the
model small and every cell's prediction computed the same way. The paper's last layer is linear;
we squash ``x, y, sqrt w, sqrt h`` and the confidence with a sigmoid (they all lie in [0, 1]) and
the class scores with a softmax (so they are probabilities), and keep the paper's sum of squares
on those values. The paper sums the loss over the batch; we divide by the number of responsible
predictors (at least 1), so the learning rate does not depend on how crowded the batch is.

**YOLO with anchors** (``YOLO(..., anchors=[(h, w), ...])``, ``--model yolo_anchors``). Each
cell predicts one box per *anchor* shape, each with its own objectness and class scores:
``[batch, S, S, A * (5 + C)]``, so two objects of different shapes in one cell are both learnt.
From YOLO9000 (sec. 2, "Better"):

* "dimension clusters": the anchor shapes come from k-means on the training boxes with
  ``d = 1 - IoU`` as the distance (boxes compared by shape, aligned at a common centre), not
  picked by hand (``kmeans_anchors``, compared with ``hand_picked_anchors`` by
  ``mean_best_iou``: table 1 of the paper);
* "direct location prediction": ``b_x = sigma(t_x) + c_x`` (the centre stays in its cell) and
  ``b_w = p_w * exp(t_w)`` (a scale of the anchor ``p_w``), in grid units for the centre and
  in image fractions for the size;
* an object goes to the cell of its centre and, in that cell, to the anchor whose shape fits it
  best (highest IoU of the centred shapes); two objects wanting the same anchor of the same cell
  keep the larger, as in v1.

The loss: ``lambda_coord`` times the squared error of ``(sigma(t_x), sigma(t_y))`` against the
centre's offset in the cell and of ``(t_w, t_h)`` against ``log(w / p_w)``, ``log(h / p_h)``;
objectness by **binary cross-entropy** (target 1 for the assigned anchors, 0 for the others with
weight ``lambda_noobj``); predictions that already overlap some object with IoU >= ``ignore_iou``
are not pushed to 0 (Redmon and Farhadi 2018, "YOLOv3", sec. 2.1, threshold 0.5; darknet's v2
uses 0.6); classes per anchor by **softmax cross-entropy**. Everything is divided by the number of
assigned anchors (at least 1). Detections: ``sigma(t_o) * softmax(classes)`` per anchor, then
per-class NMS. Not here: v2's passthrough layer, multi-scale training and hierarchical classes.

Public API::

    YOLO, YOLOConfig                      the detector (detector.py's interface) and its options
    from_options, TRAIN_DEFAULTS,         what train_detector.py reads
        TRAIN_DEFAULTS_BY_MODEL
    kmeans_anchors(boxes, k, seed)        anchor shapes (h, w) by k-means with 1 - IoU
    mean_best_iou(boxes, anchors)         how well a set of shapes covers the boxes
    hand_picked_anchors(k)                k shapes chosen without looking at the data
    yolo_v1_targets, yolo_v1_loss         the v1 assignment and loss, as functions
    yolo_anchor_targets, yolo_anchor_loss the anchor assignment and loss
    decode_v1_boxes, decode_anchor_boxes  head outputs -> boxes
    v1_boxes_and_scores,                  every box with its class-specific scores (before NMS)
        anchor_boxes_and_scores

Try it (a few seconds; the default runs take about 15 minutes each)::

    python ch05_detection/train_detector.py --model yolo --fast
    python ch05_detection/train_detector.py --model yolo_anchors --anchors 5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import targets
from ch05_detection.detector import (
    Detector, DetectorConfig, _require, backbone_options_for, build_backbone, select_detections)

CONFIDENCE_TARGETS = ("iou", "one")
# t_w, t_h are clamped here before exp(): an untrained head never makes an inf box.
MAX_LOG_SCALE = box_ops.DEFAULT_MAX_LOG_SCALE
# Prior probability of an object under each anchor at initialisation (Lin et al. 2017,
# "Focal Loss", sec. 4.1): the many empty anchors then start with a small loss.
OBJECTNESS_PRIOR = 0.01

# The default runs on `shapes` (128 px, ~4000 images, batch 16, 2-core CPU, 15 minutes). A step
# took 0.10 s (v1) and 0.10-0.17 s (anchors) on the shared CPU, so an epoch of 250 steps takes
# 25-45 s: 28 epochs (~7000 steps) fit in 13.5 minutes on a quiet machine, and the harness ends
# earlier, with the cosine decay shortened to match, on a busy one. A short check (800 images,
# 80 s) had the loss falling steadily at 2e-3 with Adam; the warm-up protects BatchNorm's first
# steps.
TRAIN_DEFAULTS_BY_MODEL = {
    "yolo": {"epochs": 28, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 1.0,
             "time_budget_minutes": 13.5},
    "yolo_anchors": {"epochs": 28, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 1.0,
                     "time_budget_minutes": 13.5},
}
TRAIN_DEFAULTS = TRAIN_DEFAULTS_BY_MODEL["yolo"]
MODEL_NAMES = tuple(TRAIN_DEFAULTS_BY_MODEL)
# Output stride of the default runs: an 8 x 8 grid of 16 px cells on 128 px images (objects of
# `shapes` are 18-69 px; two centres share a 16 px cell for ~1% of the objects).
DEFAULT_OUTPUT_STRIDE = 16


# ----------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------
def _check_anchor_shapes(anchors, name="anchors"):
    """``anchors`` as a tuple of ``(height, width)`` float pairs in (0, 1]."""
    try:
        shapes = tuple((float(h), float(w)) for h, w in anchors)
    except (TypeError, ValueError):
        shapes = None
    _require(shapes is not None and len(shapes) >= 1
             and all(0.0 < h <= 1.0 and 0.0 < w <= 1.0 for h, w in shapes), name,
             "None (YOLO v1), an int k >= 1, or a list of (height, width) pairs in (0, 1] "
             "(fractions of the image)", anchors)
    return shapes


@dataclass
class YOLOConfig(DetectorConfig):
    """Every option of ``YOLO`` (with those of ``DetectorConfig``).

    Args:
        output_stride: backbone stride; the grid is ``image_size / output_stride`` cells a side
            (16: ``S = 8`` on 128 px images).
        anchors: ``None`` for YOLO v1; a list of ``(height, width)`` anchor shapes as fractions
            of the image for YOLO with anchors; an int ``k`` for ``hand_picked_anchors(k)``
            (``from_options`` passes ``kmeans_anchors`` of the training boxes instead).
        boxes_per_cell: ``B``, boxes each cell predicts in YOLO v1 (2 in the paper); unused
            with anchors (one box per anchor).
        head_filters, head_convs: the head, ``head_convs`` blocks of 3x3 convolution +
            BatchNorm + leaky ReLU (slope 0.1, as in the paper) before the 1x1 output.
        lambda_coord, lambda_noobj: weights of the box loss and of the no-object confidence
            loss (5 and 0.5, Redmon et al. 2016 sec. 2.2).
        confidence_target: v1's target for the responsible predictor's confidence: ``"iou"``
            (its IoU with the object, the paper) or ``"one"``.
        ignore_iou: with anchors, a prediction not assigned to an object but overlapping one
            with IoU >= this takes no part in the objectness loss (1.0 switches it off).
        detection_nms_iou: per-class NMS overlap of ``detect``.
    """

    output_stride: int = DEFAULT_OUTPUT_STRIDE
    anchors: Optional[tuple] = None
    boxes_per_cell: int = 2
    head_filters: int = 128
    head_convs: int = 2
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    confidence_target: str = "iou"
    ignore_iou: float = 0.5
    detection_nms_iou: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.anchors, (int, np.integer)) and not isinstance(self.anchors, bool):
            _require(int(self.anchors) >= 1, "anchors", "an int k >= 1", self.anchors)
            self.anchors = hand_picked_anchors(int(self.anchors))
        if self.anchors is not None:
            self.anchors = _check_anchor_shapes(self.anchors)
        for name in ("boxes_per_cell", "head_filters"):
            value = getattr(self, name)
            _require(int(value) >= 1, name, ">= 1", value)
            setattr(self, name, int(value))
        _require(int(self.head_convs) >= 0, "head_convs", ">= 0", self.head_convs)
        self.head_convs = int(self.head_convs)
        for name in ("lambda_coord", "lambda_noobj"):
            value = getattr(self, name)
            _require(float(value) >= 0.0, name, ">= 0", value)
            setattr(self, name, float(value))
        _require(self.confidence_target in CONFIDENCE_TARGETS, "confidence_target",
                 f"one of {CONFIDENCE_TARGETS}", self.confidence_target)
        for name in ("ignore_iou", "detection_nms_iou"):
            value = getattr(self, name)
            _require(0.0 <= float(value) <= 1.0, name, "in [0, 1]", value)
            setattr(self, name, float(value))


# ----------------------------------------------------------------------------------
# anchor shapes: k-means with 1 - IoU (YOLO9000, sec. 2 "Dimension Clusters")
# ----------------------------------------------------------------------------------
def _box_shapes(boxes, name="boxes"):
    """``[M, 4]`` yxyx boxes (or ``[M, 2]`` shapes) -> ``[M, 2]`` (height, width), float64,
    zero-size rows dropped."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] not in (2, 4):
        raise ValueError(f"`{name}` must be [M, 4] yxyx boxes or [M, 2] (height, width) shapes, "
                         f"got shape {boxes.shape}")
    shapes = boxes if boxes.shape[1] == 2 else boxes[:, 2:4] - boxes[:, 0:2]
    return shapes[(shapes[:, 0] > 0) & (shapes[:, 1] > 0)]


def shape_iou(shapes_a, shapes_b):
    """IoU of box shapes aligned at a common centre (only sizes matter).

    Args:
        shapes_a: ``[M, 2]`` (height, width); shapes_b: ``[K, 2]``.
    Returns:
        ``[M, K]`` NumPy IoU: ``min(h) min(w) / (h_a w_a + h_b w_b - min(h) min(w))``.
    """
    a = np.asarray(shapes_a, np.float64)[:, None, :]
    b = np.asarray(shapes_b, np.float64)[None, :, :]
    intersection = np.minimum(a[..., 0], b[..., 0]) * np.minimum(a[..., 1], b[..., 1])
    union = a[..., 0] * a[..., 1] + b[..., 0] * b[..., 1] - intersection
    return intersection / np.maximum(union, 1e-12)


def mean_best_iou(boxes, anchors):
    """Average over the boxes of the IoU with the best-fitting anchor shape (YOLO9000, table 1).

    Args:
        boxes: ``[M, 4]`` normalized yxyx boxes (or ``[M, 2]`` (height, width) shapes).
        anchors: ``[K, 2]`` (height, width) anchor shapes.
    Returns:
        float in [0, 1].
    """
    shapes = _box_shapes(boxes)
    if len(shapes) == 0:
        raise ValueError("`boxes` holds no box of non-zero size")
    return float(shape_iou(shapes, _box_shapes(anchors, "anchors")).max(axis=1).mean())


def _kmeans_plus_plus(shapes, k, rng):
    """k-means++ seeding (Arthur and Vassilvitskii 2007) with d = 1 - IoU: each new centroid a
    box drawn with probability proportional to d² to the nearest centroid chosen so far."""
    centroids = [shapes[rng.integers(len(shapes))]]
    for _ in range(1, k):
        distance = 1.0 - shape_iou(shapes, np.stack(centroids)).max(axis=1)
        weights = distance ** 2
        if weights.sum() <= 0:  # every box already equals a centroid
            weights = np.ones(len(shapes))
        centroids.append(shapes[rng.choice(len(shapes), p=weights / weights.sum())])
    return np.stack(centroids)


def kmeans_anchors(boxes, k, seed=0, restarts=5, max_iterations=300):
    """Anchor shapes by k-means on the box shapes with the distance ``d = 1 - IoU``.

    YOLO9000 sec. 2: Euclidean k-means on (w, h) lets large boxes make larger errors than small
    ones; "what we really want are priors that lead to good IOU scores", so the distance is
    ``1 - IoU(box, centroid)`` with both boxes centred at one point. Lloyd's algorithm: give every
    box to its nearest centroid (highest IoU), move each centroid to the mean shape of its boxes,
    repeat until no box changes cluster (a cluster left empty restarts at the box the centroids
    fit worst). Lloyd's algorithm stops in a local optimum that depends on the start, so it
    starts ``restarts`` times from k-means++ seeds and keeps the anchors with the highest
    ``mean_best_iou``.

    Args:
        boxes: ``[M, 4]`` normalized yxyx boxes (or ``[M, 2]`` shapes); zero-size rows skipped.
        k: number of anchors.
        seed: seed of the starts (the same seed gives the same anchors).
        restarts: number of starts; max_iterations: upper bound on the rounds of each.
    Returns:
        ``[k, 2]`` float32 (height, width) anchor shapes, sorted by area.
    """
    shapes = _box_shapes(boxes)
    _require(isinstance(k, (int, np.integer)) and k >= 1, "k", "an int >= 1", k)
    _require(isinstance(restarts, (int, np.integer)) and restarts >= 1, "restarts",
             "an int >= 1", restarts)
    distinct = np.unique(shapes, axis=0)
    _require(len(distinct) >= k, "boxes", f"at least k={k} distinct box shapes",
             f"{len(distinct)} distinct shapes")
    rng = np.random.default_rng(seed)
    best, best_iou = None, -1.0
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(distinct, k, rng)
        assignment = None
        for _ in range(max_iterations):
            iou = shape_iou(shapes, centroids)  # [M, k]
            new_assignment = iou.argmax(axis=1)
            if assignment is not None and np.array_equal(new_assignment, assignment):
                break
            assignment = new_assignment
            for cluster in range(k):
                members = shapes[assignment == cluster]
                if len(members):
                    centroids[cluster] = members.mean(axis=0)
                else:  # restart an empty cluster where the current anchors fit worst
                    centroids[cluster] = shapes[iou.max(axis=1).argmin()]
        mean_iou = shape_iou(shapes, centroids).max(axis=1).mean()
        if mean_iou > best_iou:
            best, best_iou = centroids.copy(), mean_iou
    order = np.argsort(best[:, 0] * best[:, 1])
    return best[order].astype(np.float32)


def hand_picked_anchors(k, min_size=0.125, max_size=0.5, aspect_ratios=(1.0, 2.0, 0.5)):
    """``k`` anchor shapes chosen the way one would without looking at the data.

    Sizes (square roots of the areas) spread geometrically from ``min_size`` to ``max_size`` of
    the image; the aspect ratios (height / width) cycle through ``aspect_ratios``. The baseline
    ``kmeans_anchors`` is compared with (YOLO9000, table 1, compares with Faster R-CNN's 9).

    Returns:
        ``[k, 2]`` float32 (height, width), sorted by area.
    """
    _require(isinstance(k, (int, np.integer)) and k >= 1, "k", "an int >= 1", k)
    if k > 1:
        sizes = np.geomspace(min_size, max_size, k)
    else:
        sizes = np.array([math.sqrt(min_size * max_size)])
    ratios = np.array([aspect_ratios[i % len(aspect_ratios)] for i in range(k)], np.float64)
    heights = np.minimum(sizes * np.sqrt(ratios), 1.0)
    widths = np.minimum(sizes / np.sqrt(ratios), 1.0)
    return np.stack([heights, widths], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------
# shared pieces: cells, one object per slot
# ----------------------------------------------------------------------------------
def _centers_and_sizes(boxes):
    """yxyx ``[..., 4]`` -> centre y, centre x, height, width (each ``[...]``)."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    return 0.5 * (ymin + ymax), 0.5 * (xmin + xmax), ymax - ymin, xmax - xmin


def _grid_cells(grid_size):
    """Row and column of every cell, row-major: two ``[S_h * S_w]`` float32 NumPy arrays."""
    rows, cols = np.meshgrid(np.arange(grid_size[0]), np.arange(grid_size[1]), indexing="ij")
    return rows.reshape(-1).astype(np.float32), cols.reshape(-1).astype(np.float32)


def center_cells(gt_boxes, grid_size):
    """The cell containing each box's centre.

    Args:
        gt_boxes: ``[batch, N, 4]`` normalized yxyx; grid_size: ``(S_h, S_w)``.
    Returns:
        ``(cell, offset_y, offset_x)``: ``cell`` ``[batch, N]`` int32 row-major index
        ``row * S_w + column``, and the centre's position inside its cell in [0, 1].
    """
    center_y, center_x, _, _ = _centers_and_sizes(gt_boxes)
    grid_h, grid_w = float(grid_size[0]), float(grid_size[1])
    # A centre exactly on the last edge (1.0) belongs to the last cell.
    row = tf.clip_by_value(tf.floor(center_y * grid_h), 0.0, grid_h - 1.0)
    col = tf.clip_by_value(tf.floor(center_x * grid_w), 0.0, grid_w - 1.0)
    cell = tf.cast(row * grid_w + col, tf.int32)
    return cell, center_y * grid_h - row, center_x * grid_w - col


def one_object_per_slot(slot_index, gt_boxes, gt_valid, num_slots):
    """Which object each slot (a v1 cell, or a cell's anchor) learns.

    Several objects may want one slot; the slot keeps the **largest** (by area; ties: the
    first listed), the others are not learnt. Order-independent, so a shuffled label list gives
    the same targets.

    Args:
        slot_index: ``[batch, N]`` int32 slot of each object; gt_boxes ``[batch, N, 4]``;
        gt_valid ``[batch, N]`` bool; num_slots: number of slots per image.
    Returns:
        ``(has_object, object_index)``: ``[batch, num_slots]`` bool and int32 (the index in
        ``gt_boxes`` of the slot's object, 0 where it has none).
    """
    wants = tf.logical_and(tf.one_hot(slot_index, num_slots, on_value=True, off_value=False,
                                      dtype=tf.bool), gt_valid[..., None])  # [batch, N, slots]
    area = box_ops.box_area(gt_boxes)[..., None]  # [batch, N, 1]
    # [batch, 1, slots]: the largest area wanting each slot.
    best_area = tf.reduce_max(tf.where(wants, area, -1.0), axis=1, keepdims=True)
    is_best = tf.logical_and(wants, tf.equal(area, best_area))
    num_objects = tf.shape(slot_index)[1]
    index = tf.range(num_objects, dtype=tf.int32)[None, :, None]  # [1, N, 1]
    # The first of the largest: the smallest index among them (tf.argmax leaves ties open).
    object_index = tf.reduce_min(tf.where(is_best, index, num_objects), axis=1)  # [batch, slots]
    has_object = tf.reduce_any(wants, axis=1)
    return has_object, tf.where(has_object, object_index, 0)


def _valid_objects(gt_boxes, gt_classes):
    """Objects that take part: class >= 0 (not padding) and a box of non-zero area."""
    return tf.logical_and(gt_classes >= 0, box_ops.box_area(gt_boxes) > 0.0)


def _grid_size_of(predictions):
    height, width = predictions.shape[1], predictions.shape[2]
    if height is None or width is None:
        raise ValueError(f"`predictions` must have a static grid size [batch, S_h, S_w, channels], "
                         f"got shape {predictions.shape}")
    return int(height), int(width)


def _count_positives(mask):
    """max(1, positives of the batch), averaged over replicas under tf.distribute."""
    count = tf.reduce_sum(tf.cast(mask, tf.float32))
    return tf.maximum(targets.mean_over_replicas(count), 1.0)


# ----------------------------------------------------------------------------------
# YOLO v1 (Redmon et al. 2016)
# ----------------------------------------------------------------------------------
def split_v1_predictions(predictions, boxes_per_cell):
    """The v1 head output ``[batch, S_h, S_w, B * 5 + C]`` -> its parts, cells flattened.

    Channels ``5 p .. 5 p + 4`` are predictor ``p``'s ``(x, y, w, h, confidence)`` (the paper's
    order), the last ``C`` the cell's class scores. Returns dict (``cells = S_h * S_w``):
    ``offset_y``, ``offset_x`` ``[batch, cells, B]`` (the centre in its cell, in [0, 1]),
    ``sqrt_h``, ``sqrt_w`` ``[batch, cells, B]`` (square roots of the size as a fraction of the
    image), ``confidence`` ``[batch, cells, B]``, ``class_probabilities`` ``[batch, cells, C]``
    (softmax: ``P(class | object)``).
    """
    grid_h, grid_w = _grid_size_of(predictions)
    channels = predictions.shape[-1]
    per_box = predictions[..., :5 * boxes_per_cell]
    per_box = tf.reshape(per_box, [-1, grid_h * grid_w, boxes_per_cell, 5])
    values = tf.sigmoid(per_box)  # every box value lies in [0, 1]
    class_scores = tf.reshape(predictions[..., 5 * boxes_per_cell:],
                              [-1, grid_h * grid_w, channels - 5 * boxes_per_cell])
    return {"offset_x": values[..., 0], "offset_y": values[..., 1], "sqrt_w": values[..., 2],
            "sqrt_h": values[..., 3], "confidence": values[..., 4],
            "class_probabilities": tf.nn.softmax(class_scores, axis=-1)}


def decode_v1_boxes(parts, grid_size):
    """Boxes of every predictor: ``[batch, cells, B, 4]`` normalized yxyx.

    Centre ``((row + y) / S_h, (column + x) / S_w)``, size ``(sqrt_h², sqrt_w²)``.
    """
    rows, cols = _grid_cells(grid_size)
    center_y = (rows[None, :, None] + parts["offset_y"]) / float(grid_size[0])
    center_x = (cols[None, :, None] + parts["offset_x"]) / float(grid_size[1])
    height, width = tf.square(parts["sqrt_h"]), tf.square(parts["sqrt_w"])
    return tf.stack([center_y - 0.5 * height, center_x - 0.5 * width,
                     center_y + 0.5 * height, center_x + 0.5 * width], axis=-1)


def yolo_v1_targets(predicted_boxes, gt_boxes, gt_classes, grid_size):
    """YOLO v1's assignment (sec. 2.2): one object per cell, one responsible predictor.

    The cell containing an object's centre is responsible for it (of two objects in one cell,
    the larger); within the cell, the predictor whose box has the highest IoU with the object
    (ties: the first).

    Args:
        predicted_boxes: ``[batch, cells, B, 4]`` current boxes (``decode_v1_boxes``; no
            gradient flows through the choice).
        gt_boxes: ``[batch, N, 4]`` normalized yxyx; gt_classes: ``[batch, N]``, -1 = padding.
        grid_size: ``(S_h, S_w)``.
    Returns:
        dict: ``has_object`` ``[batch, cells]`` bool; ``object_index`` ``[batch, cells]`` int32
        (the cell's object in ``gt_boxes``, -1 for none); ``responsible`` ``[batch, cells, B]``
        bool; ``iou`` ``[batch, cells, B]`` of each predictor's box with the cell's object;
        ``classes`` ``[batch, cells]`` int32; and the regression targets ``offset_y``,
        ``offset_x``, ``sqrt_h``, ``sqrt_w`` ``[batch, cells]`` (0 in empty cells).
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    gt_valid = _valid_objects(gt_boxes, gt_classes)
    num_cells = grid_size[0] * grid_size[1]
    cell, offset_y, offset_x = center_cells(gt_boxes, grid_size)
    has_object, object_index = one_object_per_slot(cell, gt_boxes, gt_valid, num_cells)
    cell_boxes = tf.gather(gt_boxes, object_index, batch_dims=1)  # [batch, cells, 4]
    cell_classes = tf.gather(gt_classes, object_index, batch_dims=1)
    # IoU of each predictor with its cell's object: [batch, cells, B, 1] -> [batch, cells, B].
    iou = box_ops.pairwise_iou(predicted_boxes, cell_boxes[:, :, None, :])[..., 0]
    iou = tf.where(has_object[..., None], iou, 0.0)
    num_predictors = predicted_boxes.shape[2]
    # The best predictor of each cell; of equal IoUs (e.g. all 0) the first (tf.argmax leaves
    # ties open).
    best_iou = tf.reduce_max(iou, axis=-1, keepdims=True)
    first_best = tf.reduce_min(tf.where(tf.equal(iou, best_iou),
                                        tf.range(num_predictors)[None, None, :], num_predictors),
                               axis=-1)
    responsible = tf.logical_and(tf.one_hot(first_best, num_predictors, on_value=True,
                                            off_value=False, dtype=tf.bool),
                                 has_object[..., None])
    _, _, height, width = _centers_and_sizes(cell_boxes)

    def per_cell(values):  # an object's value on its cell, 0 elsewhere
        return tf.where(has_object, tf.gather(values, object_index, batch_dims=1), 0.0)

    return {"has_object": has_object, "object_index": tf.where(has_object, object_index, -1),
            "responsible": responsible, "iou": iou,
            "classes": tf.where(has_object, cell_classes, -1),
            "offset_y": per_cell(offset_y), "offset_x": per_cell(offset_x),
            "sqrt_h": tf.where(has_object, tf.sqrt(tf.maximum(height, 0.0)), 0.0),
            "sqrt_w": tf.where(has_object, tf.sqrt(tf.maximum(width, 0.0)), 0.0)}


def yolo_v1_loss(predictions, gt_boxes, gt_classes, boxes_per_cell=2, lambda_coord=5.0,
                 lambda_noobj=0.5, confidence_target="iou"):
    """YOLO v1's sum-squared loss (Redmon et al. 2016, eq. 3 of sec. 2.2), by term.

    With ``1_ij`` = predictor ``j`` of cell ``i`` is responsible, ``1_i`` = cell ``i`` holds an
    object::

        box_loss       = lambda_coord sum 1_ij [(x - x^)² + (y - y^)²
                                                + (√w - √w^)² + (√h - √h^)²]
        object_loss    =              sum 1_ij (C - C^)²,   C^ = IoU(predicted box, object)
        no_object_loss = lambda_noobj sum (1 - 1_ij) C²
        class_loss     =              sum 1_i  sum_c (p(c) - p^(c))²

    each divided by the number of responsible predictors in the batch (at least 1).

    Args:
        predictions: ``[batch, S_h, S_w, B * 5 + C]`` the head's raw output.
        gt_boxes: ``[batch, N, 4]`` normalized yxyx; gt_classes ``[batch, N]``, -1 = padding.
        boxes_per_cell: ``B``; lambda_coord, lambda_noobj: the paper's 5 and 0.5.
        confidence_target: ``"iou"`` (the paper) or ``"one"``.
    Returns:
        dict of scalars ``loss`` (the sum), ``box_loss``, ``object_loss``, ``no_object_loss``,
        ``class_loss``.
    """
    _require(confidence_target in CONFIDENCE_TARGETS, "confidence_target",
             f"one of {CONFIDENCE_TARGETS}", confidence_target)
    grid_size = _grid_size_of(predictions)
    parts = split_v1_predictions(predictions, boxes_per_cell)
    predicted_boxes = decode_v1_boxes(parts, grid_size)
    target = yolo_v1_targets(tf.stop_gradient(predicted_boxes), gt_boxes, gt_classes, grid_size)
    responsible = tf.cast(target["responsible"], tf.float32)  # [batch, cells, B]
    normaliser = _count_positives(target["responsible"])

    coordinate_error = sum(tf.square(parts[name] - target[name][..., None])
                           for name in ("offset_x", "offset_y", "sqrt_w", "sqrt_h"))
    box_loss = lambda_coord * tf.reduce_sum(responsible * coordinate_error)
    confidence = parts["confidence"]
    confidence_goal = (tf.stop_gradient(target["iou"]) if confidence_target == "iou"
                       else tf.ones_like(confidence))
    object_loss = tf.reduce_sum(responsible * tf.square(confidence - confidence_goal))
    no_object_loss = lambda_noobj * tf.reduce_sum((1.0 - responsible) * tf.square(confidence))
    num_classes = parts["class_probabilities"].shape[-1]
    class_goal = tf.one_hot(tf.maximum(target["classes"], 0), num_classes)
    class_error = tf.reduce_sum(tf.square(parts["class_probabilities"] - class_goal), axis=-1)
    class_loss = tf.reduce_sum(tf.cast(target["has_object"], tf.float32) * class_error)

    losses = {"box_loss": box_loss, "object_loss": object_loss,
              "no_object_loss": no_object_loss, "class_loss": class_loss}
    losses = {name: value / normaliser for name, value in losses.items()}
    losses["loss"] = sum(losses.values())
    return losses


# ----------------------------------------------------------------------------------
# YOLO with anchors (Redmon and Farhadi 2017)
# ----------------------------------------------------------------------------------
def split_anchor_predictions(predictions, num_anchors):
    """The anchor head output ``[batch, S_h, S_w, A * (5 + C)]`` -> its parts.

    Per anchor: ``(t_x, t_y, t_w, t_h, t_o)`` then ``C`` class logits (YOLO9000's order).
    Returns dict: ``t_x``, ``t_y``, ``t_w``, ``t_h``, ``objectness_logits``
    ``[batch, cells, A]`` and ``class_logits`` ``[batch, cells, A, C]``.
    """
    grid_h, grid_w = _grid_size_of(predictions)
    per_anchor = predictions.shape[-1] // num_anchors
    values = tf.reshape(predictions, [-1, grid_h * grid_w, num_anchors, per_anchor])
    return {"t_x": values[..., 0], "t_y": values[..., 1], "t_w": values[..., 2],
            "t_h": values[..., 3], "objectness_logits": values[..., 4],
            "class_logits": values[..., 5:]}


def decode_anchor_boxes(parts, anchors, grid_size):
    """YOLO9000's "direct location prediction": ``[batch, cells, A, 4]`` normalized yxyx.

    ``b_y = (sigma(t_y) + row) / S_h``, ``b_x = (sigma(t_x) + column) / S_w``,
    ``b_h = p_h exp(t_h)``, ``b_w = p_w exp(t_w)`` with the anchor shape ``(p_h, p_w)``
    (``t_h``, ``t_w`` clamped at ``MAX_LOG_SCALE``).
    """
    rows, cols = _grid_cells(grid_size)
    anchors = np.asarray(anchors, np.float32)
    center_y = (rows[None, :, None] + tf.sigmoid(parts["t_y"])) / float(grid_size[0])
    center_x = (cols[None, :, None] + tf.sigmoid(parts["t_x"])) / float(grid_size[1])
    height = anchors[:, 0] * tf.exp(tf.minimum(parts["t_h"], MAX_LOG_SCALE))
    width = anchors[:, 1] * tf.exp(tf.minimum(parts["t_w"], MAX_LOG_SCALE))
    return tf.stack([center_y - 0.5 * height, center_x - 0.5 * width,
                     center_y + 0.5 * height, center_x + 0.5 * width], axis=-1)


def best_anchor(gt_boxes, anchors):
    """Index of the anchor shape that fits each box best (IoU of the centred shapes).

    Args:
        gt_boxes: ``[..., 4]`` yxyx; anchors: ``[A, 2]`` (height, width).
    Returns:
        ``[...]`` int32.
    """
    anchors = np.asarray(anchors, np.float32)
    _, _, height, width = _centers_and_sizes(tf.cast(gt_boxes, tf.float32))
    intersection = (tf.minimum(height[..., None], anchors[:, 0])
                    * tf.minimum(width[..., None], anchors[:, 1]))  # [..., A]
    union = height[..., None] * width[..., None] + anchors[:, 0] * anchors[:, 1] - intersection
    iou = tf.math.divide_no_nan(intersection, union)
    return tf.argmax(iou, axis=-1, output_type=tf.int32)


def yolo_anchor_targets(gt_boxes, gt_classes, anchors, grid_size):
    """Which anchor of which cell learns each object.

    An object goes to the cell containing its centre and, there, to the anchor whose shape fits
    it best; two objects wanting the same anchor of the same cell: the larger keeps it.

    Args:
        gt_boxes: ``[batch, N, 4]`` normalized yxyx; gt_classes ``[batch, N]``, -1 = padding.
        anchors: ``[A, 2]`` (height, width); grid_size: ``(S_h, S_w)``.
    Returns:
        dict: ``positive`` ``[batch, cells, A]`` bool; ``object_index`` ``[batch, cells, A]``
        int32 (-1 for none); ``classes`` ``[batch, cells, A]`` int32 (-1 for none);
        ``boxes`` ``[batch, cells, A, 4]``; regression targets ``offset_y``, ``offset_x`` (the
        centre in its cell) and ``log_h``, ``log_w`` (``log(h / p_h)``, ``log(w / p_w)``),
        each ``[batch, cells, A]`` (0 where not positive).
    """
    anchors = np.asarray(anchors, np.float32)
    num_anchors = len(anchors)
    num_cells = grid_size[0] * grid_size[1]
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    gt_valid = _valid_objects(gt_boxes, gt_classes)
    cell, offset_y, offset_x = center_cells(gt_boxes, grid_size)
    slot = cell * num_anchors + best_anchor(gt_boxes, anchors)  # [batch, N]
    positive, object_index = one_object_per_slot(slot, gt_boxes, gt_valid,
                                                 num_cells * num_anchors)
    _, _, height, width = _centers_and_sizes(gt_boxes)
    anchor_h = np.tile(anchors[:, 0], num_cells)  # [cells * A], the slot's anchor shape
    anchor_w = np.tile(anchors[:, 1], num_cells)

    def per_slot(values):
        return tf.gather(values, object_index, batch_dims=1)

    # Sizes are > 0 for valid objects; elsewhere use the anchor (log 1 = 0) to stay finite.
    slot_h = tf.where(positive, per_slot(height), anchor_h)
    slot_w = tf.where(positive, per_slot(width), anchor_w)
    shape = [-1, num_cells, num_anchors]
    result = {
        "positive": positive,
        "object_index": tf.where(positive, object_index, -1),
        "classes": tf.where(positive, per_slot(gt_classes), -1),
        "boxes": tf.where(positive[..., None], per_slot(gt_boxes), 0.0),
        "offset_y": tf.where(positive, per_slot(offset_y), 0.0),
        "offset_x": tf.where(positive, per_slot(offset_x), 0.0),
        "log_h": tf.math.log(slot_h / anchor_h),
        "log_w": tf.math.log(slot_w / anchor_w),
    }
    return {name: tf.reshape(value, shape + ([4] if name == "boxes" else []))
            for name, value in result.items()}


def yolo_anchor_loss(predictions, gt_boxes, gt_classes, anchors, lambda_coord=5.0,
                     lambda_noobj=0.5, ignore_iou=0.5):
    """The loss of YOLO with anchors, by term.

    With ``1_k`` = anchor slot ``k`` is assigned an object (``yolo_anchor_targets``)::

        box_loss       = lambda_coord sum 1_k [(sigma(t_x) - x^)² + (sigma(t_y) - y^)²
                                               + (t_w - log(w / p_w))² + (t_h - log(h / p_h))²]
        object_loss    =              sum 1_k BCE(sigma(t_o), 1)
        no_object_loss = lambda_noobj sum (1 - 1_k) [max IoU(box_k, objects) < ignore_iou]
                                                    BCE(sigma(t_o), 0)
        class_loss     =              sum 1_k softmax cross-entropy(class logits, class)

    each divided by the number of assigned slots in the batch (at least 1).

    Args:
        predictions: ``[batch, S_h, S_w, A * (5 + C)]`` the head's raw output.
        gt_boxes ``[batch, N, 4]``, gt_classes ``[batch, N]`` (-1 = padding).
        anchors: ``[A, 2]`` (height, width) shapes.
        lambda_coord, lambda_noobj, ignore_iou: see ``YOLOConfig``.
    Returns:
        dict of scalars ``loss``, ``box_loss``, ``object_loss``, ``no_object_loss``,
        ``class_loss``.
    """
    anchors = np.asarray(anchors, np.float32)
    grid_size = _grid_size_of(predictions)
    parts = split_anchor_predictions(predictions, len(anchors))
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    target = yolo_anchor_targets(gt_boxes, gt_classes, anchors, grid_size)
    positive = tf.cast(target["positive"], tf.float32)  # [batch, cells, A]
    normaliser = _count_positives(target["positive"])

    coordinate_error = (tf.square(tf.sigmoid(parts["t_x"]) - target["offset_x"])
                        + tf.square(tf.sigmoid(parts["t_y"]) - target["offset_y"])
                        + tf.square(parts["t_w"] - target["log_w"])
                        + tf.square(parts["t_h"] - target["log_h"]))
    box_loss = lambda_coord * tf.reduce_sum(positive * coordinate_error)

    logits = parts["objectness_logits"]
    object_loss = tf.reduce_sum(positive * tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.ones_like(logits), logits=logits))
    # Predictions already overlapping an object well are neither positive nor negative.
    predicted_boxes = tf.stop_gradient(decode_anchor_boxes(parts, anchors, grid_size))
    batch = tf.shape(predicted_boxes)[0]
    flat_boxes = tf.reshape(predicted_boxes, [batch, -1, 4])  # [batch, cells * A, 4]
    overlap = box_ops.pairwise_iou(flat_boxes, gt_boxes)  # [batch, cells * A, N]
    valid = _valid_objects(gt_boxes, tf.cast(gt_classes, tf.int32))
    best_overlap = tf.reduce_max(tf.where(valid[:, None, :], overlap, 0.0), axis=-1)
    best_overlap = tf.reshape(best_overlap, tf.shape(logits))
    negative = (1.0 - positive) * tf.cast(best_overlap < ignore_iou, tf.float32)
    no_object_loss = lambda_noobj * tf.reduce_sum(
        negative * tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.zeros_like(logits),
                                                           logits=logits))

    class_loss = tf.reduce_sum(positive * tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.maximum(target["classes"], 0), logits=parts["class_logits"]))

    losses = {"box_loss": box_loss, "object_loss": object_loss,
              "no_object_loss": no_object_loss, "class_loss": class_loss}
    losses = {name: value / normaliser for name, value in losses.items()}
    losses["loss"] = sum(losses.values())
    return losses


# ----------------------------------------------------------------------------------
# detections: every box with its class-specific scores
# ----------------------------------------------------------------------------------
def v1_boxes_and_scores(predictions, boxes_per_cell):
    """YOLO v1's boxes and class-specific confidences (Redmon et al. 2016, sec. 2, eq. 1).

    ``Pr(class_i | object) * Pr(object) * IoU = P(class | object) * confidence``: the cell's class
    probabilities times each of its boxes' confidence.

    Args:
        predictions: ``[batch, S_h, S_w, B * 5 + C]``; boxes_per_cell: ``B``.
    Returns:
        ``boxes`` ``[batch, cells * B, 4]`` normalized yxyx (cell-major, then predictor) and
        ``scores`` ``[batch, cells * B, C]``.
    """
    grid_size = _grid_size_of(predictions)
    parts = split_v1_predictions(predictions, boxes_per_cell)
    boxes = decode_v1_boxes(parts, grid_size)  # [batch, cells, B, 4]
    # One class distribution per cell, shared by its B boxes: [batch, cells, B, C].
    scores = parts["confidence"][..., None] * parts["class_probabilities"][:, :, None, :]
    batch, num_classes = tf.shape(predictions)[0], scores.shape[-1]
    return tf.reshape(boxes, [batch, -1, 4]), tf.reshape(scores, [batch, -1, num_classes])


def anchor_boxes_and_scores(predictions, anchors):
    """Boxes and scores of YOLO with anchors: ``sigma(t_o) * softmax(class logits)`` per anchor.

    Args:
        predictions: ``[batch, S_h, S_w, A * (5 + C)]``; anchors: ``[A, 2]`` (height, width).
    Returns:
        ``boxes`` ``[batch, cells * A, 4]`` normalized yxyx and ``scores``
        ``[batch, cells * A, C]``.
    """
    anchors = np.asarray(anchors, np.float32)
    grid_size = _grid_size_of(predictions)
    parts = split_anchor_predictions(predictions, len(anchors))
    boxes = decode_anchor_boxes(parts, anchors, grid_size)  # [batch, cells, A, 4]
    scores = (tf.sigmoid(parts["objectness_logits"])[..., None]
              * tf.nn.softmax(parts["class_logits"], axis=-1))  # [batch, cells, A, C]
    batch, num_classes = tf.shape(predictions)[0], scores.shape[-1]
    return tf.reshape(boxes, [batch, -1, 4]), tf.reshape(scores, [batch, -1, num_classes])


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class YOLO(Detector):
    """YOLO v1 (``anchors=None``) or YOLO with anchor boxes, on a chapter-4 backbone.

    Input: ``images`` ``[batch, H, W, 3]`` in [0, 1] (resized to ``image_size``).
    ``call`` returns ``{"predictions": [batch, S_h, S_w, channels]}``, the raw head output
    (``channels = B * 5 + C`` for v1, ``A * (5 + C)`` with anchors); ``decode`` and ``detect``
    give the padded detections of the detector interface (``detector.py``).

    Build it from options, ``YOLO(5, image_size=(128, 128), anchors=[(0.3, 0.3), ...])``, or from
    a ``YOLOConfig``; see ``YOLOConfig`` for every option.
    """

    CONFIG_CLASS = YOLOConfig
    LOSS_NAMES = ("loss", "box_loss", "object_loss", "no_object_loss", "class_loss")

    def __init__(self, num_classes=None, config=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        config = self.config
        self.backbone = build_backbone(config)
        self.grid_size = tuple(int(s) for s in self.backbone.output_shape[1:3])  # (S_h, S_w)
        self.anchor_shapes = (None if config.anchors is None
                              else np.asarray(config.anchors, np.float32))  # [A, 2] (h, w)
        if self.uses_anchors:
            channels = len(self.anchor_shapes) * (5 + config.num_classes)
        else:
            channels = config.boxes_per_cell * 5 + config.num_classes
        head = []
        for index in range(config.head_convs):
            head += [keras.layers.Conv2D(config.head_filters, 3, padding="same", use_bias=False,
                                         name=f"head_conv{index + 1}"),
                     keras.layers.BatchNormalization(name=f"head_bn{index + 1}"),
                     keras.layers.LeakyReLU(negative_slope=0.1, name=f"head_relu{index + 1}")]
        # [batch, S_h, S_w, channels]: everything every cell predicts.
        head.append(keras.layers.Conv2D(channels, 1, name="predictions"))
        self.head = keras.Sequential(head, name="head")
        self.build_weights()
        if self.uses_anchors:
            self._initialise_objectness_bias()

    @property
    def uses_anchors(self):
        """True for YOLO with anchors, False for YOLO v1."""
        return self.anchor_shapes is not None

    @property
    def num_anchors(self):
        """Boxes per cell: the number of anchors, or ``B`` for v1."""
        return len(self.anchor_shapes) if self.uses_anchors else self.config.boxes_per_cell

    def _initialise_objectness_bias(self):
        """Start every anchor at objectness ``OBJECTNESS_PRIOR``: with ~A x S² mostly empty
        anchors, a 0.5 start would make the first steps all about the background."""
        output = self.head.get_layer("predictions")
        bias = output.bias.numpy()
        per_anchor = 5 + self.num_classes
        bias[4::per_anchor] = math.log(OBJECTNESS_PRIOR / (1.0 - OBJECTNESS_PRIOR))
        output.bias.assign(bias)

    def call(self, images, training=False):
        """``{"predictions": [batch, S_h, S_w, channels]}`` for images ``[batch, H, W, 3]``."""
        images = self._resize(images)
        features = self.backbone(images, training=training)  # [batch, S_h, S_w, channels]
        return {"predictions": self.head(features, training=training)}

    def losses_for(self, images, gt_boxes, gt_classes, training, step):
        """``yolo_v1_loss`` or ``yolo_anchor_loss`` of a batch (no randomness: ``step`` unused)."""
        config = self.config
        predictions = self(images, training=training)["predictions"]
        if self.uses_anchors:
            return yolo_anchor_loss(predictions, gt_boxes, gt_classes, self.anchor_shapes,
                                    lambda_coord=config.lambda_coord,
                                    lambda_noobj=config.lambda_noobj,
                                    ignore_iou=config.ignore_iou)
        return yolo_v1_loss(predictions, gt_boxes, gt_classes,
                            boxes_per_cell=config.boxes_per_cell,
                            lambda_coord=config.lambda_coord, lambda_noobj=config.lambda_noobj,
                            confidence_target=config.confidence_target)

    def boxes_and_scores(self, outputs):
        """Every predicted box and its class-specific scores, before NMS (``v1_boxes_and_scores``
        or ``anchor_boxes_and_scores`` of ``outputs["predictions"]``)."""
        if self.uses_anchors:
            return anchor_boxes_and_scores(outputs["predictions"], self.anchor_shapes)
        return v1_boxes_and_scores(outputs["predictions"], self.config.boxes_per_cell)

    def decode(self, outputs):
        """Class-specific scores of every box, then per-class NMS (``select_detections``)."""
        boxes, scores = self.boxes_and_scores(outputs)
        return select_detections(boxes, scores, score_threshold=self.config.score_threshold,
                                 iou_threshold=self.config.detection_nms_iou,
                                 max_detections=self.config.max_detections)


# ----------------------------------------------------------------------------------
# train_detector.py
# ----------------------------------------------------------------------------------
def from_options(options, num_classes, class_names, train_boxes):
    """Build YOLO for ``train_detector.py``.

    Reads ``options.model`` (``"yolo"``: v1; ``"yolo_anchors"``: ``options.anchors`` anchor
    shapes by ``kmeans_anchors`` on ``train_boxes``, whose mean best IoU is printed beside that of
    ``hand_picked_anchors``), ``image_size``, ``backbone``, ``backbone_width``, ``seed``,
    ``flip`` and ``max_detections``. ``classification_loss`` (RetinaNet's ablation) does not
    apply to YOLO and is ignored.

    Args:
        options: the training script's options (attributes, see above).
        num_classes, class_names: of the data set.
        train_boxes: ``[M, 4]`` float32 every training box (normalized yxyx).
    Returns:
        an uncompiled ``YOLO``.
    """
    model_name = getattr(options, "model", "yolo")
    _require(model_name in MODEL_NAMES, "options.model", f"one of {MODEL_NAMES}", model_name)
    backbone_options = backbone_options_for(options.backbone, options.backbone_width)
    anchors = None
    if model_name == "yolo_anchors":
        k = int(options.anchors)
        anchors = kmeans_anchors(train_boxes, k, seed=options.seed)
        hand = hand_picked_anchors(k)
        shapes = ", ".join(f"{h:.3f}x{w:.3f}" for h, w in anchors)
        print(f"k-means anchors (k={k}, height x width): {shapes}; mean best IoU with the "
              f"{len(train_boxes)} training boxes {mean_best_iou(train_boxes, anchors):.3f} "
              f"(hand-picked: {mean_best_iou(train_boxes, hand):.3f})")
        anchors = anchors.tolist()
    size = int(options.image_size)
    return YOLO(num_classes, class_names=tuple(class_names), image_size=(size, size),
                backbone=options.backbone, output_stride=DEFAULT_OUTPUT_STRIDE,
                backbone_options=backbone_options, anchors=anchors, flip_augment=bool(options.flip),
                seed=int(options.seed), max_detections=int(options.max_detections),
                name=model_name)
