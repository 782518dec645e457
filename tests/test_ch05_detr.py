"""Tests of DETR (ch05_detection/detr.py): the Hungarian matcher against brute force and scipy,
generalized IoU on hand-computed pairs and against keras' IoU, the sine positional encoding,
the set loss against a NumPy recomputation, then the model on tiny inputs (64 px, width 8)."""

import itertools
import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import linear_sum_assignment

from ch05_detection import detr
from ch05_detection.detr import DETR, DETRConfig
from common import synthetic
from detection_checks import check_detect_contract  # tests/detection_checks.py

SIZE = 64
NUM_CLASSES = 5


FAST_OPTIONS = detr.FAST_CONVERGENCE_OPTIONS  # what train_detector.py trains by default


def tiny_model(**options):
    settings = dict(image_size=(SIZE, SIZE), backbone_options={"filters": [8, 16, 32, 64]},
                    d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                    dim_feedforward=64, num_queries=8, max_detections=10)
    settings.update(options)
    return DETR(NUM_CLASSES, **settings)


def shapes_batch(count, max_boxes=6, start=0):
    images = np.zeros((count, SIZE, SIZE, 3), np.float32)
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    classes = -np.ones((count, max_boxes), np.int32)
    for i in range(count):
        scene = synthetic.make_scene(start + i, "train", image_size=SIZE)
        n = min(len(scene["classes"]), max_boxes)
        images[i], boxes[i, :n], classes[i, :n] = (scene["image"], scene["boxes"][:n],
                                                   scene["classes"][:n])
    return {"image": images, "boxes": boxes, "classes": classes}


# ----------------------------------------------------------------------------------
# the matcher
# ----------------------------------------------------------------------------------
def brute_force_min_cost(cost):
    """Least total cost of a one-to-one assignment of min(Q, n) pairs, by enumeration."""
    queries, objects = cost.shape
    if objects == 0:
        return 0.0
    if objects <= queries:  # every object gets a distinct query
        return min(sum(cost[q, j] for j, q in enumerate(chosen))
                   for chosen in itertools.permutations(range(queries), objects))
    return min(sum(cost[i, j] for i, j in enumerate(chosen))  # every query gets an object
               for chosen in itertools.permutations(range(objects), queries))


def matched_cost(cost, valid, matches):
    """Total cost of ``matches`` and checks that it is a valid one-to-one assignment."""
    queries = matches[matches >= 0]
    assert len(set(queries.tolist())) == len(queries), "a query answers two objects"
    assert (matches[~valid] == -1).all(), "a padding row was matched"
    assert (matches >= 0).sum() == min(valid.sum(), cost.shape[0])
    return sum(cost[q, j] for j, q in enumerate(matches) if q >= 0)


def test_matcher_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    num_queries, max_objects = 5, 6
    valid = np.zeros((6, max_objects), bool)
    valid[0, :3] = True  # padding at the end, as batches have it
    valid[1, [0, 2, 5]] = True  # absent rows in the middle (degenerate boxes dropped)
    # valid[2]: an image with no objects at all
    valid[3, :5] = True  # as many objects as queries
    valid[4, :] = True  # more objects than queries: only 5 can be matched
    valid[5, :1] = True
    cost = rng.normal(size=(6, num_queries, max_objects)).astype(np.float32)
    matches = detr.hungarian_match(cost, valid).numpy()
    assert matches.shape == (6, max_objects) and matches.dtype == np.int32
    assert (matches[2] == -1).all()
    for image in range(6):
        objects = np.flatnonzero(valid[image])
        ours = matched_cost(cost[image], valid[image], matches[image])
        best = brute_force_min_cost(cost[image][:, objects].astype(np.float64))
        assert ours == pytest.approx(best, abs=1e-5), image


def test_matcher_on_many_objects_equals_scipy_inside_a_traced_function():
    rng = np.random.default_rng(1)
    num_queries = 16
    for num_objects in (12, 16, 25):  # more objects than usual, then more than queries
        cost = rng.random((2, num_queries, 32)).astype(np.float32)
        valid = np.zeros((2, 32), bool)
        valid[0, :num_objects] = True
        valid[1, rng.choice(32, size=3, replace=False)] = True

        @tf.function(input_signature=[tf.TensorSpec([None, num_queries, 32], tf.float32),
                                      tf.TensorSpec([None, 32], tf.bool)])
        def traced(cost, valid):
            matches = detr.hungarian_match(cost, valid)
            assert matches.shape.as_list() == [None, 32]  # the shape is set after numpy_function
            return matches

        matches = traced(cost, valid).numpy()
        for image in range(2):
            objects = np.flatnonzero(valid[image])
            rows, columns = linear_sum_assignment(cost[image][:, objects])
            expected = cost[image][:, objects][rows, columns].sum()
            assert matched_cost(cost[image], valid[image], matches[image]) == pytest.approx(
                expected, abs=1e-5)


def test_matching_cost_hand_computed():
    probabilities = np.array([[[0.7, 0.2, 0.1]]], np.float32)  # 1 image, 1 query, K = 2
    pred = np.array([[[0.5, 0.5, 0.2, 0.2]]], np.float32)  # cx, cy, w, h
    gt = np.array([[[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]], np.float32)
    cost = detr.matching_cost(probabilities, pred, gt, np.array([[0, 1]]),
                              class_weight=1.0, l1_weight=5.0, giou_weight=2.0).numpy()
    # Object 0: same box, GIoU 1: -0.7 + 0 - 2. Object 1: shifted by 0.1 in x: L1 0.1,
    # IoU 0.1 * 0.2 / (0.08 - 0.02) = 1/3, enclosing 0.3 x 0.2 = union: GIoU 1/3.
    np.testing.assert_allclose(cost[0, 0], [-0.7 - 2.0, -0.2 + 0.5 - 2.0 / 3.0], atol=1e-5)


# ----------------------------------------------------------------------------------
# generalized IoU
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("box_a, box_b, expected", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),  # identical
    ([0, 0, 4, 4], [1, 1, 2, 2], 1.0 / 16.0),  # nested: enclosing = union, GIoU = IoU
    ([0, 0, 2, 2], [1, 1, 3, 3], 1.0 / 7.0 - 2.0 / 9.0),  # overlap 1, union 7, enclosing 9
    ([0, 0, 1, 1], [2, 2, 3, 3], -7.0 / 9.0),  # disjoint: union 2, enclosing 9
    ([0, 0, 1, 1], [0, 1, 1, 2], 0.0),  # touching: enclosing = union = 2
    ([0, 0, 1, 1], [0, 9, 1, 10], -8.0 / 10.0),  # far apart: close to -1
    ([1, 1, 1, 1], [0, 0, 2, 2], 0.0),  # degenerate point inside: IoU 0, enclosing = union
    ([3, 0, 3, 2], [0, 0, 2, 2], -1.0 / 3.0),  # degenerate line outside: union 4, enclosing 6
    ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # nothing has area: 0, not NaN
])
def test_generalized_iou_hand_computed(box_a, box_b, expected):
    value = detr.generalized_iou(np.array(box_a, np.float32), np.array(box_b, np.float32))
    assert float(value) == pytest.approx(expected, abs=1e-6)
    swapped = detr.generalized_iou(np.array(box_b, np.float32), np.array(box_a, np.float32))
    assert float(swapped) == pytest.approx(expected, abs=1e-6)  # symmetric


def test_generalized_iou_gradient_is_finite_on_degenerate_boxes():
    boxes = tf.Variable([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(1.0 - detr.generalized_iou(boxes, tf.constant([[1.0, 1.0, 1.0, 1.0],
                                                                            [0.0, 0.0, 1.0, 1.0]])))
    assert np.isfinite(tape.gradient(loss, boxes).numpy()).all()


def test_generalized_iou_against_keras_iou():
    """Keras ships no GIoU (keras.losses has none, keras_cv is not installed;
    keras.utils.bounding_boxes has compute_iou and compute_ciou): GIoU equals keras' IoU where
    the enclosing box is the union (nested boxes) and lies in [IoU - 1, IoU] everywhere."""
    rng = np.random.default_rng(2)
    corners = np.sort(rng.random((40, 2, 2)), axis=1)  # [n, (min, max), (y, x)]
    corners[:, 1] = np.minimum(corners[:, 1] + 0.1, 1.1)  # sides >= 0.1
    boxes_a = np.concatenate([corners[:, 0], corners[:, 1]], axis=1).astype(np.float32)  # yxyx
    corners = np.sort(rng.random((30, 2, 2)), axis=1)
    boxes_b = np.concatenate([corners[:, 0], corners[:, 1]], axis=1).astype(np.float32)
    keras_iou = keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.compute_iou(boxes_a, boxes_b, "yxyx"))  # [40, 30]
    giou = detr.generalized_iou(boxes_a[:, None], boxes_b[None]).numpy()  # pairwise by broadcast
    assert giou.shape == keras_iou.shape == (40, 30)
    assert (giou <= keras_iou + 1e-5).all() and (giou >= keras_iou - 1.0 - 1e-5).all()
    assert (giou < keras_iou - 0.05).any()  # the penalty is not always zero
    # Nested pairs: a random box inside every box of a (keras adds a tiny epsilon: rtol).
    fractions = np.sort(rng.random((40, 2, 2)), axis=1)  # [n, (min, max), (y, x)] in [0, 1]
    low, side = boxes_a[:, :2], boxes_a[:, 2:] - boxes_a[:, :2]
    inner = np.concatenate([low + fractions[:, 0] * side, low + fractions[:, 1] * side],
                           axis=1).astype(np.float32)
    nested_keras = np.diag(keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.compute_iou(boxes_a, inner, "yxyx")))
    np.testing.assert_allclose(detr.generalized_iou(boxes_a, inner).numpy(), nested_keras,
                               rtol=2e-3, atol=1e-6)


def test_box_format_round_trip():
    boxes = np.array([[0.1, 0.2, 0.5, 0.9]], np.float32)  # yxyx
    cxcywh = detr.yxyx_to_cxcywh(boxes).numpy()
    np.testing.assert_allclose(cxcywh, [[0.55, 0.3, 0.7, 0.4]], atol=1e-6)
    np.testing.assert_allclose(detr.cxcywh_to_yxyx(cxcywh).numpy(), boxes, atol=1e-6)


# ----------------------------------------------------------------------------------
# positional encoding
# ----------------------------------------------------------------------------------
def test_sine_position_encoding_hand_computed():
    encoding = detr.sine_position_encoding(2, 2, 8)  # F = 4: frequencies 1, 1, 100, 100
    assert encoding.shape == (4, 8)
    # Row-major: row 1 is (y = 1, x = 2) in 1-based positions: angles pi (y) and 2 pi (x).
    y, x = math.pi, 2.0 * math.pi
    expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    np.testing.assert_allclose(encoding[1], expected, atol=1e-6)
    # Every token differs from every other (the encoder can tell positions apart).
    distinct = detr.sine_position_encoding(8, 8, 32)
    distances = np.linalg.norm(distinct[:, None] - distinct[None], axis=-1)
    assert (distances + np.eye(64) > 1e-3).all()
    with pytest.raises(ValueError, match="d_model"):
        detr.sine_position_encoding(2, 2, 6)


def test_sine_point_encoding_equals_the_grid_encoding_at_token_positions():
    height, width = 3, 4
    grid = detr.sine_position_encoding(height, width, 16)
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    points = np.stack([(columns.ravel() + 1) / width, (rows.ravel() + 1) / height], axis=-1)
    np.testing.assert_allclose(detr.sine_point_encoding(points, 16).numpy(), grid, atol=1e-5)


def test_grid_anchors():
    anchors = detr.grid_anchors(16, size=0.3)
    assert anchors.shape == (16, 4)
    np.testing.assert_allclose(anchors[:5], [[0.125, 0.125, 0.3, 0.3], [0.375, 0.125, 0.3, 0.3],
                                             [0.625, 0.125, 0.3, 0.3], [0.875, 0.125, 0.3, 0.3],
                                             [0.125, 0.375, 0.3, 0.3]])
    five = detr.grid_anchors(5)  # the first 5 cells of a 3 x 3 grid
    np.testing.assert_allclose(five[:, :2], [[1 / 6, 1 / 6], [0.5, 1 / 6], [5 / 6, 1 / 6],
                                             [1 / 6, 0.5], [0.5, 0.5]], atol=1e-6)


# ----------------------------------------------------------------------------------
# the set loss
# ----------------------------------------------------------------------------------
def numpy_giou(a, b):
    """GIoU of two yxyx boxes, the textbook formula in plain Python."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


def to_yxyx(box):
    cx, cy, w, h = box
    return [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]


def test_set_losses_match_a_numpy_recomputation():
    rng = np.random.default_rng(3)
    batch, layers, queries, num_classes = 3, 2, 4, 3
    logits = rng.normal(size=(batch, layers, queries, num_classes + 1)).astype(np.float32)
    pred = rng.uniform(0.2, 0.8, size=(batch, layers, queries, 4)).astype(np.float32)
    pred[..., 2:] = rng.uniform(0.05, 0.3, size=(batch, layers, queries, 2))
    gt_boxes = np.zeros((batch, 3, 4), np.float32)
    gt_classes = -np.ones((batch, 3), np.int32)
    gt_boxes[0, :2] = [[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.8]]
    gt_classes[0, :2] = [2, 0]
    gt_boxes[2, :3] = [[0.2, 0.2, 0.3, 0.3], [0.0, 0.5, 0.6, 1.0], [0.6, 0.1, 0.9, 0.3]]
    gt_classes[2, :3] = [1, 1, 2]  # image 1 has no objects
    num_objects = 5.0
    losses = detr.set_losses(logits, pred, gt_boxes, gt_classes, num_objects,
                             no_object_weight=0.1, class_weight=1.0, l1_weight=5.0,
                             giou_weight=2.0)

    class_loss = l1_loss = giou_loss = 0.0
    for layer in range(layers):
        weighted, weights = 0.0, 0.0
        for image in range(batch):
            z = logits[image, layer].astype(np.float64)
            probs = np.exp(z - z.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            objects = np.flatnonzero(gt_classes[image] >= 0)
            gt_cxcywh = [[(b[1] + b[3]) / 2, (b[0] + b[2]) / 2, b[3] - b[1], b[2] - b[0]]
                         for b in gt_boxes[image].astype(np.float64)]
            cost = np.zeros((queries, len(objects)))
            for q in range(queries):
                for j, o in enumerate(objects):
                    box = pred[image, layer, q].astype(np.float64)
                    cost[q, j] = (-probs[q, gt_classes[image, o]]
                                  + 5.0 * np.abs(box - gt_cxcywh[o]).sum()
                                  - 2.0 * numpy_giou(to_yxyx(box), to_yxyx(gt_cxcywh[o])))
            best = None  # brute force: the best distinct query for each object
            for chosen in itertools.permutations(range(queries), len(objects)):
                total = sum(cost[q, j] for j, q in enumerate(chosen))
                if best is None or total < best[0]:
                    best = (total, chosen)
            target = np.full(queries, num_classes)
            for j, q in enumerate(best[1]):
                o = objects[j]
                target[q] = gt_classes[image, o]
                box = pred[image, layer, q].astype(np.float64)
                l1_loss += np.abs(box - gt_cxcywh[o]).sum() / num_objects
                giou_loss += (1 - numpy_giou(to_yxyx(box), to_yxyx(gt_cxcywh[o]))) / num_objects
            for q in range(queries):
                w = 1.0 if target[q] < num_classes else 0.1
                weighted += -w * np.log(probs[q, target[q]])
                weights += w
        class_loss += weighted / weights
    assert float(losses["class_loss"]) == pytest.approx(class_loss, rel=1e-4)
    assert float(losses["l1_loss"]) == pytest.approx(l1_loss, rel=1e-4)
    assert float(losses["giou_loss"]) == pytest.approx(giou_loss, rel=1e-4)
    assert float(losses["loss"]) == pytest.approx(class_loss + 5 * l1_loss + 2 * giou_loss,
                                                  rel=1e-4)
    matches = losses["matches"].numpy()
    assert matches.shape == (batch, layers, 3) and (matches[1] == -1).all()


def test_token_losses_hand_computed():
    rng = np.random.default_rng(4)
    num_classes = 3
    centers = np.array([[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]], np.float32)
    gt_boxes = np.array([[[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.4, 0.4], [0, 0, 0, 0]]], np.float32)
    gt_classes = np.array([[2, 1, -1]], np.int32)
    logits = rng.normal(size=(1, 4, num_classes + 1)).astype(np.float32)
    boxes = rng.uniform(0.2, 0.6, size=(1, 4, 4)).astype(np.float32)
    losses = detr.token_losses(logits, boxes, centers, gt_boxes, gt_classes, 0.1)
    # Token 0 lies in both boxes: the smaller (class 1) owns it; token 1 only in box 0 (class 2);
    # tokens 2 and 3 in none: "no object" (class 3) with weight 0.1.
    targets, weights = [1, 2, 3, 3], [1.0, 1.0, 0.1, 0.1]
    z = logits[0].astype(np.float64)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected_class = sum(-w * log_probs[i, t] for i, (t, w) in enumerate(zip(targets, weights)))
    assert float(losses["class_loss"]) == pytest.approx(expected_class / 2.2, rel=1e-5)
    owners = {0: [0.0, 0.0, 0.4, 0.4], 1: [0.0, 0.0, 0.5, 1.0]}
    l1 = giou = 0.0
    for token, box in owners.items():
        gt = [(box[1] + box[3]) / 2, (box[0] + box[2]) / 2, box[3] - box[1], box[2] - box[0]]
        l1 += np.abs(boxes[0, token] - gt).sum()
        giou += 1 - numpy_giou(to_yxyx(boxes[0, token]), box)
    assert float(losses["l1_loss"]) == pytest.approx(l1 / 2, rel=1e-5)
    assert float(losses["giou_loss"]) == pytest.approx(giou / 2, rel=1e-5)
    empty = detr.token_losses(logits, boxes, centers, np.zeros((1, 1, 4), np.float32),
                              -np.ones((1, 1), np.int32), 0.1)
    assert float(empty["l1_loss"]) == 0.0 and float(empty["giou_loss"]) == 0.0
    assert float(empty["class_loss"]) == pytest.approx(-log_probs[:, 3].mean(), rel=1e-5)


def test_anchor_queries_start_at_their_anchors_and_attend_locally():
    model = tiny_model(**FAST_OPTIONS)
    outputs = model(np.random.default_rng(5).random((1, SIZE, SIZE, 3)).astype(np.float32))
    # A zero last layer of the box head: every layer predicts exactly its query's anchor.
    expected = np.broadcast_to(detr.grid_anchors(8), (1, 2, 8, 4))
    np.testing.assert_allclose(outputs["all_boxes"].numpy(), expected, atol=1e-5)
    # 4 x 4 tokens with centres 0.125, 0.375, ...: the anchor at (0.125, 0.125) sees the tokens
    # within 0.25 (max-norm): columns and rows 0 and 1.
    mask = model.cross_attention_mask(tf.constant([[0.125, 0.125], [0.9, 0.5]])).numpy()
    expected_first = np.zeros((4, 4), bool)
    expected_first[:2, :2] = True
    np.testing.assert_array_equal(mask[0].reshape(4, 4), expected_first)
    expected_second = np.zeros((4, 4), bool)  # x 0.9: column 3 (0.875), not 2 (0.275 away);
    expected_second[1:3, 3] = True  # y 0.5: rows 1 (0.375) and 2 (0.625)
    np.testing.assert_array_equal(mask[1].reshape(4, 4), expected_second)
    maps = model.cross_attention_maps(np.zeros((2, SIZE, SIZE, 3), np.float32)).numpy()
    allowed = model.cross_attention_mask(tf.sigmoid(model.anchor_logits[:, :2])).numpy()
    allowed = allowed.reshape(1, 1, 8, 4, 4)
    assert (maps[np.broadcast_to(~allowed, maps.shape)] < 1e-6).all()
    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    assert outputs["encoder_class_logits"].shape == (1, 16, NUM_CLASSES + 1)
    assert outputs["encoder_boxes"].shape == (1, 16, 4)


@pytest.mark.parametrize("options", [{}, FAST_OPTIONS], ids=["paper", "fast_convergence"])
def test_empty_images_give_finite_losses_and_gradients(options):
    model = tiny_model(**options)
    batch = {"image": np.random.default_rng(0).random((2, SIZE, SIZE, 3)).astype(np.float32),
             "boxes": np.zeros((2, 4, 4), np.float32), "classes": -np.ones((2, 4), np.int32)}
    with tf.GradientTape() as tape:
        losses = model.compute_losses(batch, training=True)
    assert set(losses) == set(DETR.LOSS_NAMES)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["l1_loss"]) == 0.0 and float(losses["giou_loss"]) == 0.0
    assert float(losses["class_loss"]) > 0.0  # every query should say "no object"
    gradients = tape.gradient(losses["loss"], model.trainable_variables)
    assert all(np.isfinite(g.numpy()).all() for g in gradients if g is not None)


# ----------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------
def test_decode_queries_hand_built():
    logits = np.full((1, 3, 3), -10.0, np.float32)  # 3 queries, K = 2 (+ no object)
    logits[0, 0, 1] = 10.0  # query 0: class 1, probability ~1
    logits[0, 1, 2] = 10.0  # query 1: "no object": dropped by the threshold
    logits[0, 2, [0, 2]] = 0.0  # query 2: class 0 at probability ~0.5
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1], [0.1, 0.9, 0.4, 0.4]]],
                     np.float32)
    out = detr.decode_queries(logits, boxes, max_detections=5, score_threshold=0.05)
    assert int(out["num_detections"][0]) == 2
    np.testing.assert_array_equal(out["classes"].numpy()[0], [1, 0, -1, -1, -1])
    np.testing.assert_allclose(out["scores"].numpy()[0, :2], [1.0, 0.5], atol=1e-4)
    np.testing.assert_allclose(out["boxes"].numpy()[0, :2],
                               [[0.3, 0.4, 0.7, 0.6], [0.7, 0.0, 1.0, 0.3]], atol=1e-6)  # clipped
    assert (out["boxes"].numpy()[0, 2:] == 0).all()


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A tiny model after 20 steps on one fixed batch, with its losses before and after
    (batch statistics in both, as in training)."""
    keras.utils.set_random_seed(1)
    batch = shapes_batch(8)
    model = tiny_model(flip_augment=False, **FAST_OPTIONS)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4, global_clipnorm=1.0),
                  jit_compile=False)
    before = {k: float(v) for k, v in model.compute_losses(batch, training=True).items()}
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=20,
                        epochs=1, verbose=0).history
    after = {k: float(v) for k, v in model.compute_losses(batch, training=True).items()}
    return model, batch, (before, after, history)


def test_output_shapes_and_attention():
    model = tiny_model()
    outputs = model(np.zeros((2, SIZE, SIZE, 3), np.float32))
    assert outputs["class_logits"].shape == (2, 8, NUM_CLASSES + 1)
    assert outputs["boxes"].shape == (2, 8, 4)
    assert outputs["all_class_logits"].shape == (2, 2, 8, NUM_CLASSES + 1)
    assert outputs["all_boxes"].shape == (2, 2, 8, 4)
    np.testing.assert_array_equal(outputs["boxes"], outputs["all_boxes"][:, -1])
    boxes = outputs["all_boxes"].numpy()
    assert ((boxes > 0) & (boxes < 1)).all()  # sigmoid
    assert model.feature_size == (4, 4) and model.position_encoding.shape == (1, 16, 32)
    maps = model.cross_attention_maps(np.zeros((1, 40, 50, 3), np.float32)).numpy()  # resized
    assert maps.shape == (1, 4, 8, 4, 4)
    np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)


def test_fit_reduces_the_loss(trained):
    _, _, (before, after, history) = trained
    assert after["loss"] < 0.6 * before["loss"], (before, after)
    assert after["giou_loss"] < before["giou_loss"], (before, after)
    assert set(DETR.LOSS_NAMES) <= set(history)


def test_detect_contract(trained):
    model, batch, _ = trained
    out = model.detect(batch["image"][:3])
    check_detect_contract(out, 3, 10, NUM_CLASSES, min_score=0.05)
    assert (out["num_detections"] <= 8).all()  # at most one detection per query, no more
    predicted = model.predict(batch["image"][:2], verbose=0)
    np.testing.assert_allclose(predicted["scores"], out["scores"][:2], atol=1e-5)


def test_keras_round_trip_gives_identical_outputs(tmp_path, trained):
    model, batch, _ = trained
    path = tmp_path / "detr.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DETR) and loaded.config == model.config
    for key, value in model(batch["image"][:2]).items():
        np.testing.assert_array_equal(loaded(batch["image"][:2])[key].numpy(), value.numpy())


def test_config_validation_and_from_options(monkeypatch):
    with pytest.raises(ValueError, match="output_stride"):
        DETRConfig(5, output_stride=4)
    with pytest.raises(ValueError, match="d_model"):
        DETRConfig(5, d_model=30, num_heads=3)
    with pytest.raises(ValueError, match="num_queries"):
        DETRConfig(5, num_queries=0)
    with pytest.raises(ValueError, match="no_object_weight"):
        DETRConfig(5, no_object_weight=0.0)
    with pytest.raises(ValueError, match="image_size"):
        DETRConfig(5, image_size=(72, 72), output_stride=16)
    with pytest.raises(ValueError, match="attention_radius"):
        DETRConfig(5, attention_radius=0.25)  # needs anchor queries
    options = SimpleNamespace(image_size=SIZE, backbone="resnet_small", backbone_width=8, seed=3,
                              flip=False, max_detections=7, anchors=9, classification_loss="focal",
                              num_queries=6)
    model = detr.from_options(options, 3, ("a", "b", "c"), np.zeros((4, 4), np.float32))
    assert model.config.image_size == (SIZE, SIZE) and model.class_names == ("a", "b", "c")
    assert model.config.backbone_options == {"filters": [8, 16, 32, 64]}
    assert model.config.max_detections == 7 and not model.config.flip_augment
    assert model.config.seed == 3 and model.config.num_queries == 6
    assert model.config.anchor_queries and model.config.encoder_loss  # the fast-converging one
    options.paper_detr = True  # the paper's model: none of the additions (no need to build it)
    monkeypatch.setattr(detr, "DETR", lambda num_classes, **kwargs: kwargs)
    paper = detr.from_options(options, 3, ("a", "b", "c"), np.zeros((4, 4), np.float32))
    assert not set(detr.FAST_CONVERGENCE_OPTIONS) & set(paper) and paper["num_queries"] == 6
    assert model(np.zeros((1, SIZE, SIZE, 3)))["class_logits"].shape == (1, 6, 4)
    assert detr.TRAIN_DEFAULTS["time_budget_minutes"] <= 14
