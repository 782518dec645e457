"""Bad input to the chapter-5 Python API gives a clear error, not a silent wrong answer.

Each test reproduces a problem a user hit (issue 18, item 12):

* ``nms`` (TensorFlow's kernel, which sorts the corners of every box) and
  ``nms_reference`` (which treats a box with ``xmin > xmax`` as degenerate, the
  convention of ``boxes.py``) kept different boxes for flipped boxes;
* ``roi_align`` / ``roi_pool`` given pixel coordinates instead of normalized ones
  returned zeros (or the corner cell) silently;
* a NaN RoI ended in a cryptic ``gather`` error;
* a score vector of the wrong length or an ``iou_threshold`` outside [0, 1]
  surfaced as a raw TensorFlow error.

The references are hand-computed expectations (a flipped box has area 0, so its IoU
with anything is 0 and NMS never suppresses it nor lets it suppress) and ``pairwise_iou``.
"""

import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import boxes as B
from ch05_detection import roi_ops


# ------------------------------------------------------------------ NMS
def test_flipped_box_is_degenerate_in_both_nms():
    """Box 1 is box 0 with its corners swapped: by the module's convention it is a
    degenerate box (area 0, IoU 0 with everything), so nothing suppresses it."""
    boxes = np.array([[0.1, 0.1, 0.5, 0.5],
                      [0.5, 0.5, 0.1, 0.1],    # ymin > ymax and xmin > xmax
                      [0.1, 0.5, 0.5, 0.1],    # xmin > xmax only
                      [0.12, 0.1, 0.5, 0.5]], np.float32)  # a real duplicate of box 0
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    # Hand check of the convention with pairwise_iou: the flipped boxes overlap nothing.
    iou = B.pairwise_iou(boxes, boxes).numpy()
    np.testing.assert_array_equal(iou[1], 0.0)
    np.testing.assert_array_equal(iou[2], 0.0)
    assert iou[0, 3] > 0.9
    expected = [0, 1, 2]  # box 3 is suppressed by box 0, the flipped ones survive
    np.testing.assert_array_equal(B.nms_reference(boxes, scores, 0.5), expected)
    np.testing.assert_array_equal(B.nms(boxes, scores, 0.5, 10).numpy(), expected)
    np.testing.assert_array_equal(tf.function(B.nms)(boxes, scores, 0.5, 10).numpy(), expected)


def test_nms_agrees_with_reference_on_random_flipped_boxes():
    rng = np.random.default_rng(3)
    fast = tf.function(B.nms, reduce_retracing=True)
    for _ in range(20):
        count = int(rng.integers(2, 80))
        corner = rng.uniform(0, 0.8, size=(count, 2))
        size = rng.uniform(0.01, 0.4, size=(count, 2))
        boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
        flip = rng.uniform(size=count) < 0.3
        boxes[flip] = boxes[flip][:, [2, 3, 0, 1]]  # swap min and max corners
        scores = rng.permutation(count).astype(np.float32) / count
        threshold = float(rng.uniform(0.1, 0.8))
        reference = B.nms_reference(boxes, scores, threshold, count)
        np.testing.assert_array_equal(fast(boxes, scores, threshold, count).numpy(), reference)
        np.testing.assert_array_equal(B.nms(boxes, scores, threshold, count).numpy(), reference)


def test_nms_scores_of_wrong_length():
    boxes = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="scores"):
        B.nms(boxes, np.zeros(4, np.float32), 0.5, 10)
    with pytest.raises(ValueError, match="scores"):
        B.nms(boxes, np.zeros((5, 1), np.float32), 0.5, 10)
    with pytest.raises(ValueError, match="scores"):
        B.nms_reference(boxes, np.zeros(4), 0.5)


def test_nms_scores_of_wrong_length_in_graph_with_unknown_shapes():
    run = tf.function(B.nms, input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None]),
                                              tf.TensorSpec([]), tf.TensorSpec([], tf.int32)])
    assert run(tf.zeros((3, 4)), tf.zeros(3), 0.5, 10).shape == (3,)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`scores` must have one score"):
        run(tf.zeros((3, 4)), tf.zeros(2), 0.5, 10)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`iou_threshold` must be in"):
        run(tf.zeros((3, 4)), tf.zeros(3), 1.5, 10)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_iou_threshold_outside_unit_interval(threshold):
    boxes, scores = np.zeros((2, 4), np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="iou_threshold"):
        B.nms(boxes, scores, threshold, 10)
    with pytest.raises(ValueError, match="iou_threshold"):
        B.nms(boxes, scores, tf.constant(threshold), 10)  # an eager tensor too
    with pytest.raises(ValueError, match="iou_threshold"):
        B.nms_reference(boxes, scores, threshold)


def test_nms_thresholds_at_the_ends_are_valid():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    for threshold, expected in [(0.0, [0]), (1.0, [0, 1])]:
        np.testing.assert_array_equal(B.nms(boxes, scores, threshold, 10), expected)
        np.testing.assert_array_equal(B.nms_reference(boxes, scores, threshold), expected)


def test_nms_negative_max_output_size():
    with pytest.raises(ValueError, match="max_output_size"):
        B.nms(np.zeros((2, 4), np.float32), np.zeros(2, np.float32), 0.5, -1)
    with pytest.raises(ValueError, match="max_output_size"):
        B.nms_reference(np.zeros((2, 4)), np.zeros(2), 0.5, max_output_size=-1)


# ------------------------------------------------------------------ RoI ops
ROI_FUNCTIONS = [roi_ops.roi_align, roi_ops.roi_pool]


def feature_map_and_pixel_rois():
    feature_map = np.random.default_rng(0).uniform(1.0, 2.0, size=(1, 16, 16, 2))
    # A box in pixels of a 128 x 128 image: what a user passes who forgot to normalize.
    pixel_rois = np.array([[[16.0, 32.0, 80.0, 96.0]]], np.float32)
    return feature_map.astype(np.float32), pixel_rois


@pytest.mark.parametrize("function", ROI_FUNCTIONS)
def test_pixel_coordinates_are_rejected(function):
    feature_map, pixel_rois = feature_map_and_pixel_rois()
    with pytest.raises(ValueError, match="normalized"):
        function(feature_map, pixel_rois)
    # The same box normalized is accepted and pools real (non-zero) features.
    pooled = function(feature_map, pixel_rois / 128.0)
    assert np.all(pooled.numpy() >= 1.0)


@pytest.mark.parametrize("function", ROI_FUNCTIONS)
def test_pixel_coordinates_are_rejected_in_graph_mode(function):
    feature_map, pixel_rois = feature_map_and_pixel_rois()
    run = tf.function(function)
    with pytest.raises(tf.errors.InvalidArgumentError, match="normalized"):
        run(feature_map, pixel_rois)
    run(feature_map, pixel_rois / 128.0)  # fine


@pytest.mark.parametrize("function", ROI_FUNCTIONS)
@pytest.mark.parametrize("graph", [False, True])
def test_nan_roi_gives_a_clear_error(function, graph):
    feature_map, pixel_rois = feature_map_and_pixel_rois()
    rois = pixel_rois / 128.0
    rois[0, 0, 2] = np.nan
    run = tf.function(function) if graph else function
    error = tf.errors.InvalidArgumentError if graph else ValueError
    with pytest.raises(error, match="NaN or infinite"):
        run(feature_map, rois)


@pytest.mark.parametrize("layer", [roi_ops.RoIAlign(pool_size=2), roi_ops.RoIPooling(pool_size=2)])
def test_layers_reject_pixel_rois(layer):
    feature_map, pixel_rois = feature_map_and_pixel_rois()
    with pytest.raises(ValueError, match="normalized"):
        layer(feature_map, pixel_rois)


@pytest.mark.parametrize("function", ROI_FUNCTIONS)
def test_normal_inputs_still_pass(function):
    """Padding (all-zero) rows, boxes poking a little outside the image, no RoIs at all."""
    feature_map, _ = feature_map_and_pixel_rois()
    rois = np.array([[[0, 0, 0, 0], [-0.2, -0.1, 0.5, 1.3], [0.1, 0.2, 0.6, 0.9]]], np.float32)
    assert function(feature_map, rois).shape == (1, 3, 7, 7, 2)
    assert function(feature_map, np.zeros((1, 0, 4), np.float32)).shape == (1, 0, 7, 7, 2)
    run = tf.function(function)
    assert run(feature_map, rois).shape == (1, 3, 7, 7, 2)
    assert run(feature_map, np.zeros((1, 0, 4), np.float32)).shape == (1, 0, 7, 7, 2)
