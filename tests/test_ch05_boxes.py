"""Tests for ch05_detection/boxes.py.

References: hand-computed examples, keras.utils.bounding_boxes (IoU and the box
encoding), a loop-based NumPy matcher written here, and tf.image.non_max_suppression
against our NumPy NMS.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import boxes as B


def random_boxes(rng, count, batch_shape=(), scale=1.0, min_size=0.01):
    """Valid yxyx boxes (max > min) of random position and size."""
    corner = rng.uniform(0, 0.8, size=(*batch_shape, count, 2))
    size = rng.uniform(min_size, 0.5, size=(*batch_shape, count, 2))
    return (np.concatenate([corner, corner + size], axis=-1) * scale).astype(np.float32)


# ------------------------------------------------------------------ formats
def test_format_conversion_by_hand():
    yxyx = np.array([[10.0, 20.0, 50.0, 80.0]], np.float32)  # y 10..50, x 20..80
    np.testing.assert_allclose(B.yxyx_to_xywh(yxyx), [[20.0, 10.0, 60.0, 40.0]])
    np.testing.assert_allclose(B.xywh_to_yxyx([[20.0, 10.0, 60.0, 40.0]]), yxyx)
    normalized = B.to_normalized(yxyx, height=100, width=200)
    np.testing.assert_allclose(normalized, [[0.1, 0.1, 0.5, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(B.to_absolute(normalized, 100, 200), yxyx, rtol=1e-6)


def test_format_matches_keras_convert_format():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 20, scale=300.0)
    ours = B.yxyx_to_xywh(boxes).numpy()
    theirs = keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.convert_format(boxes, source="yxyx", target="xywh"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)


def test_bad_shape_raises_value_error():
    with pytest.raises(ValueError, match="boxes"):
        B.box_area(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="boxes_b"):
        B.pairwise_iou(np.zeros((3, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="weights"):
        B.encode_boxes(np.zeros((1, 4)), np.zeros((1, 4)), weights=(1.0, 1.0, 1.0))


# ------------------------------------------------------------------ area and IoU
def test_area_and_iou_by_hand():
    np.testing.assert_allclose(B.box_area([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 0.0, 3.0]]), [6.0, 0.0])
    # Two 2x2 squares sharing a 1x1 corner: IoU = 1 / (4 + 4 - 1).
    iou = B.pairwise_iou([[0.0, 0.0, 2.0, 2.0]], [[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0],
                                                 [0.0, 0.0, 2.0, 2.0]])
    np.testing.assert_allclose(iou, [[1.0 / 7.0, 0.0, 1.0]], rtol=1e-6)


def test_iou_matches_keras_compute_iou():
    rng = np.random.default_rng(1)
    boxes_a, boxes_b = random_boxes(rng, 30), random_boxes(rng, 17)
    theirs = keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.compute_iou(boxes_a, boxes_b, bounding_box_format="yxyx"))
    np.testing.assert_allclose(B.pairwise_iou(boxes_a, boxes_b), theirs, atol=1e-5)
    # Batched: [batch, N, 4] x [batch, M, 4] -> [batch, N, M].
    batch_a, batch_b = random_boxes(rng, 7, (3,)), random_boxes(rng, 5, (3,))
    theirs = keras.ops.convert_to_numpy(
        keras.utils.bounding_boxes.compute_iou(batch_a, batch_b, bounding_box_format="yxyx"))
    ours = B.pairwise_iou(batch_a, batch_b)
    assert ours.shape == (3, 7, 5)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_iou_degenerate_boxes_give_zero_not_nan():
    degenerate = np.array([[0.5, 0.5, 0.5, 0.5],   # a point
                           [0.6, 0.2, 0.1, 0.9],   # inverted
                           [0.0, 0.0, 0.0, 0.0]], np.float32)  # padding row
    iou = B.pairwise_iou(degenerate, np.concatenate([degenerate, [[0.0, 0.0, 1.0, 1.0]]]))
    assert np.all(np.isfinite(iou)) and np.all(iou.numpy() == 0.0)


def test_iou_empty_inputs():
    assert B.pairwise_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)
    assert B.pairwise_iou(np.zeros((2, 4)), np.zeros((0, 4))).shape == (2, 0)


# ------------------------------------------------------------------ encode / decode
def test_encode_by_hand():
    anchor = [[0.0, 0.0, 10.0, 20.0]]  # centre (5, 10), size 10 x 20
    box = [[2.0, 4.0, 22.0, 24.0]]     # centre (12, 14), size 20 x 20
    expected = [10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]
    np.testing.assert_allclose(B.encode_boxes(box, anchor), [expected], rtol=1e-6)


def test_encode_decode_match_keras_with_variance():
    """Keras divides by `variance`; our weights multiply: variance = 1 / weights."""
    rng = np.random.default_rng(2)
    anchors, targets = random_boxes(rng, 50, scale=500.0), random_boxes(rng, 50, scale=500.0)
    variance = [0.1, 0.1, 0.2, 0.2]
    theirs = keras.ops.convert_to_numpy(keras.utils.bounding_boxes.encode_box_to_deltas(
        anchors, targets, anchor_format="yxyx", box_format="yxyx",
        encoding_format="center_yxhw", variance=variance))
    ours = B.encode_boxes(targets, anchors, weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    deltas = rng.normal(0, 1, size=(50, 4)).astype(np.float32)
    theirs = keras.ops.convert_to_numpy(keras.utils.bounding_boxes.decode_deltas_to_boxes(
        anchors, deltas, anchor_format="yxyx", box_format="yxyx",
        encoded_format="center_yxhw", variance=variance))
    np.testing.assert_allclose(B.decode_boxes(deltas, anchors), theirs, rtol=1e-4, atol=1e-2)


def test_encode_decode_round_trip_batched():
    rng = np.random.default_rng(3)
    anchors = random_boxes(rng, 40)                       # [A, 4]
    targets = random_boxes(rng, 40, batch_shape=(2,))     # [2, A, 4] broadcasts with anchors
    decoded = B.decode_boxes(B.encode_boxes(targets, anchors), anchors)
    np.testing.assert_allclose(decoded, targets, atol=1e-5)


def test_degenerate_and_huge_values_stay_finite():
    zero = np.zeros((3, 4), np.float32)
    anchors = np.array([[0.1, 0.1, 0.3, 0.2]] * 3, np.float32)
    assert np.all(np.isfinite(B.encode_boxes(zero, anchors)))   # zero-area box
    assert np.all(np.isfinite(B.encode_boxes(anchors, zero)))   # zero-area anchor
    huge = np.array([[1e4, -1e4, 1e4, 1e4], [0, 0, 1e30, 1e30], [0, 0, -1e4, -1e4]], np.float32)
    deltas = tf.constant(huge)
    with tf.GradientTape() as tape:
        tape.watch(deltas)
        decoded = B.decode_boxes(deltas, anchors)
    assert np.all(np.isfinite(decoded))
    assert np.all(np.isfinite(tape.gradient(decoded, deltas)))
    # The clamp: height is at most anchor height * 1000 / 16.
    height = decoded[1, 2] - decoded[1, 0]
    np.testing.assert_allclose(height, 0.2 * 1000 / 16, rtol=1e-4)
    decoded_zero_anchor = B.decode_boxes(np.ones((3, 4), np.float32), zero)
    assert np.all(np.isfinite(decoded_zero_anchor))


# ------------------------------------------------------------------ clip / size mask
def test_clip_and_size_mask():
    boxes = np.array([[-0.2, 0.1, 0.5, 1.4], [0.2, 0.2, 0.21, 0.9]], np.float32)
    np.testing.assert_allclose(B.clip_boxes(boxes), [[0.0, 0.1, 0.5, 1.0], [0.2, 0.2, 0.21, 0.9]])
    np.testing.assert_allclose(B.clip_boxes(boxes * 100, 40, 100),
                               [[0.0, 10.0, 40.0, 100.0], [20.0, 20.0, 21.0, 90.0]], rtol=1e-6)
    np.testing.assert_array_equal(B.box_size_mask(boxes, 0.05), [True, False])


# ------------------------------------------------------------------ matching
def match_reference(anchors, gt_boxes, gt_valid, positive=0.7, negative=0.3, low_quality=True):
    """Loop version of the Faster R-CNN labelling rule, written independently."""
    def iou(a, b):
        inter_h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        inter_w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = inter_h * inter_w
        union = (max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
                 + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter)
        return inter / union if union > 0 else 0.0

    valid = [j for j in range(len(gt_boxes)) if gt_valid[j]]
    table = {(i, j): iou(anchors[i], gt_boxes[j]) for i in range(len(anchors)) for j in valid}
    labels, index = [], []
    for i in range(len(anchors)):
        if not valid:
            labels.append(0)
            index.append(0)
            continue
        best_j = max(valid, key=lambda j: table[i, j])
        best = table[i, best_j]
        labels.append(1 if best >= positive else (0 if best < negative else -1))
        index.append(best_j)
    if low_quality:
        best_for = {}  # anchor -> the objects it is the best anchor for
        for j in valid:
            best = max(table[i, j] for i in range(len(anchors)))
            for i in range(len(anchors)):
                if best > 0 and table[i, j] == best:
                    labels[i] = 1
                    best_for.setdefault(i, []).append(j)
        for i, objects in best_for.items():
            index[i] = max(objects, key=lambda j: table[i, j])
    return np.array(index), np.array(labels)


def test_match_by_hand():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30],
                        [22, 22, 32, 32], [50, 50, 60, 60], [0, 0, 10, 20]], np.float32)
    gt = np.array([[0, 0, 10, 10], [21, 21, 31, 31], [50, 50, 60, 90], [0, 0, 0, 0]], np.float32)
    valid = np.array([True, True, True, False])
    index, labels = B.match_boxes(anchors, gt, valid)
    # anchor 0: IoU 1 with gt 0; anchor 1: 0.9 with gt 0; anchors 2, 3: 81/119 = 0.68 with
    # gt 1 (below 0.7) but both tie as gt 1's best anchor -> positive (low quality);
    # anchor 4: IoU 0.25 with gt 2 (its best anchor) -> positive by low quality;
    # anchor 5: IoU 0.5 with gt 0 -> ignored. The padding row never matches.
    np.testing.assert_array_equal(labels, [1, 1, 1, 1, 1, -1])
    np.testing.assert_array_equal(index, [0, 0, 1, 1, 2, 0])
    _, labels = B.match_boxes(anchors, gt, valid, allow_low_quality_matches=False)
    np.testing.assert_array_equal(labels, [1, 1, -1, -1, 0, -1])


def test_match_no_valid_gt_and_empty():
    anchors = random_boxes(np.random.default_rng(4), 6)
    for gt, valid in [(np.zeros((3, 4), np.float32), [False] * 3),
                      (np.zeros((0, 4), np.float32), np.zeros((0,), bool))]:
        index, labels = B.match_boxes(anchors, gt, valid)
        np.testing.assert_array_equal(labels, np.zeros(6))
        assert index.shape == (6,)
    # A padding row identical to an anchor must still not match it.
    index, labels = B.match_boxes(anchors, anchors[:2], [False, False])
    np.testing.assert_array_equal(labels, np.zeros(6))


def test_match_random_against_loop_reference_and_batched():
    rng = np.random.default_rng(5)
    batch_anchors, batch_gt, batch_valid = [], [], []
    for trial in range(12):
        anchors = random_boxes(rng, 40)
        gt = random_boxes(rng, 5)
        # Make some anchors strong matches, to have positives above 0.7.
        anchors[:5] = gt + rng.normal(0, 0.01, size=gt.shape).astype(np.float32)
        valid = rng.uniform(size=5) < 0.7
        for low_quality in (True, False):
            index, labels = B.match_boxes(anchors, gt, valid,
                                          allow_low_quality_matches=low_quality)
            ref_index, ref_labels = match_reference(anchors, gt, valid, low_quality=low_quality)
            np.testing.assert_array_equal(labels, ref_labels)
            # The index only matters for positives (negatives are not regressed).
            positive = ref_labels == 1
            assert positive.sum() >= 1
            np.testing.assert_array_equal(index.numpy()[positive], ref_index[positive])
        batch_anchors.append(anchors)
        batch_gt.append(gt)
        batch_valid.append(valid)
    # Batched call (and graph mode) agrees with per-image calls.
    batched = tf.function(B.match_boxes)(np.stack(batch_anchors), np.stack(batch_gt),
                                          np.stack(batch_valid))
    for i in range(12):
        single = B.match_boxes(batch_anchors[i], batch_gt[i], batch_valid[i])
        np.testing.assert_array_equal(batched[1][i], single[1])
        np.testing.assert_array_equal(batched[0][i], single[0])


def test_match_threshold_validation():
    with pytest.raises(ValueError, match="negative_threshold"):
        B.match_boxes(np.zeros((1, 4)), np.zeros((1, 4)), [True], 0.3, 0.7)


# ------------------------------------------------------------------ NMS
def test_nms_by_hand():
    boxes = np.array([[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, 2, 1, 3], [0, 2.5, 1, 3.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    # Box 3 (0.95) suppresses box 2 (IoU 1/3 > 0.3); box 0 suppresses box 1 (IoU 0.82).
    np.testing.assert_array_equal(B.nms_reference(boxes, scores, 0.3), [3, 0])
    np.testing.assert_array_equal(B.nms_reference(boxes, scores, 0.9), [3, 0, 1, 2])
    np.testing.assert_array_equal(B.nms_reference(boxes, scores, 0.9, max_output_size=2), [3, 0])
    np.testing.assert_array_equal(B.nms_reference(boxes, scores, 0.9, score_threshold=0.75),
                                  [3, 0, 1])
    assert B.nms_reference(np.zeros((0, 4)), np.zeros((0,)), 0.5).shape == (0,)


def test_nms_reference_equals_tensorflow_on_random_inputs():
    rng = np.random.default_rng(6)
    fast = tf.function(B.nms, reduce_retracing=True)
    for trial in range(60):
        count = int(rng.integers(1, 200))
        boxes = random_boxes(rng, count, min_size=0.02)
        scores = rng.permutation(count).astype(np.float32) / count  # distinct: no ties
        iou_threshold = float(rng.uniform(0.1, 0.9))
        max_output = int(rng.integers(1, count + 5))
        score_threshold = float(rng.uniform(-0.1, 0.5)) if trial % 2 else float("-inf")
        reference = B.nms_reference(boxes, scores, iou_threshold, max_output,
                                    None if trial % 2 == 0 else score_threshold)
        ours = fast(boxes, scores, iou_threshold, max_output, score_threshold).numpy()
        assert set(reference.tolist()) == set(ours.tolist())
        np.testing.assert_array_equal(reference, ours)  # same order too: score descending


def test_nms_empty_input_graph_mode():
    result = tf.function(B.nms)(tf.zeros((0, 4)), tf.zeros((0,)), 0.5, 10)
    assert result.shape == (0,)


def test_match_shared_anchors_with_batched_gt():
    """Anchors [A, 4] (the same for every image) with gt [batch, N, 4]."""
    rng = np.random.default_rng(7)
    anchors = random_boxes(rng, 30)
    gt = random_boxes(rng, 4, batch_shape=(3,))
    valid = np.array([[True, True, False, False], [False] * 4, [True] * 4])
    index, labels = B.match_boxes(anchors, gt, valid)
    assert labels.shape == (3, 30)
    for i in range(3):
        single_index, single_labels = B.match_boxes(anchors, gt[i], valid[i])
        np.testing.assert_array_equal(labels[i], single_labels)
        np.testing.assert_array_equal(index[i], single_index)


# ------------------------------------------------------------------ batched NMS (XLA)
def test_nms_padded_by_hand():
    """The worked example of test_nms_by_hand as a batch of two images, one of them empty
    (every score at the threshold), padded to 3 slots."""
    boxes = np.array([[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, 2, 1, 3], [0, 2.5, 1, 3.5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    indices, count = B.nms_padded(np.stack([boxes, boxes]), np.stack([scores, 0 * scores]),
                                  0.3, 3, score_threshold=0.0)
    np.testing.assert_array_equal(count, [2, 0])
    np.testing.assert_array_equal(indices, [[3, 0, 0], [0, 0, 0]])


def test_nms_padded_equals_tensorflow_greedy_nms():
    """Against tf.image.non_max_suppression image by image, with tied scores, zero-size and
    swapped-corner boxes, score thresholds, max_output_size above and below the box count
    and several tile sizes (suppression across tiles and inside one)."""
    rng = np.random.default_rng(8)
    for trial in range(24):
        count, batch = int(rng.integers(1, 300)), 3
        boxes = random_boxes(rng, count, batch_shape=(batch,), min_size=0.02)
        boxes[:, ::11, 2] = boxes[:, ::11, 0]  # zero height
        boxes[:, ::13] = boxes[:, ::13][..., [2, 3, 0, 1]]  # swapped corners
        scores = rng.uniform(-0.2, 1.0, size=(batch, count)).astype(np.float32)
        scores[:, ::4] = np.round(scores[:, ::4], 1)  # ties
        iou_threshold = float(rng.choice([0.3, 0.5, 0.7]))
        max_output = int(rng.integers(1, count + 20))
        score_threshold = 0.0 if trial % 2 else float("-inf")
        indices, num_valid = B.nms_padded(boxes, scores, iou_threshold, max_output,
                                          score_threshold, tile_size=int(rng.choice([8, 64, 256])))
        assert indices.shape == (batch, max_output)
        for b in range(batch):
            # B.nms: tf.image.non_max_suppression after collapsing swapped corners.
            expected = B.nms(boxes[b], scores[b], iou_threshold, max_output, score_threshold)
            if trial % 3 == 0:  # TensorFlow's kernel itself where no corner is swapped
                plain = tf.image.non_max_suppression(
                    np.delete(boxes[b], np.s_[::13], axis=0), np.delete(scores[b], np.s_[::13]),
                    max_output, iou_threshold, score_threshold)
                kept, _ = B.nms_padded(np.delete(boxes[b], np.s_[::13], axis=0)[None],
                                       np.delete(scores[b], np.s_[::13])[None], iou_threshold,
                                       max_output, score_threshold)
                np.testing.assert_array_equal(kept[0, :len(plain)], plain)
            np.testing.assert_array_equal(indices[b, :num_valid[b]], expected)
            np.testing.assert_array_equal(indices[b, num_valid[b]:], 0)


def test_nms_padded_compiles_with_xla():
    rng = np.random.default_rng(9)
    boxes = random_boxes(rng, 150, batch_shape=(2,), min_size=0.02)
    scores = rng.uniform(size=(2, 150)).astype(np.float32)
    compiled = tf.function(lambda b, s: B.nms_padded(b, s, 0.5, 40, 0.0, tile_size=32),
                           jit_compile=True)
    indices, num_valid = compiled(boxes, scores)
    for b in range(2):
        expected = B.nms_reference(boxes[b], scores[b], 0.5, 40, 0.0)
        np.testing.assert_array_equal(indices[b, :num_valid[b]], expected)
    with pytest.raises(ValueError, match="static number of boxes"):
        tf.function(lambda b, s: B.nms_padded(b, s, 0.5, 4), input_signature=[
            tf.TensorSpec([2, None, 4]), tf.TensorSpec([2, None])])(boxes, scores)
