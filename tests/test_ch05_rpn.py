"""Tests of the region proposal network pieces (ch05_detection/rpn.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from ch05_detection import boxes as box_ops
from ch05_detection import rpn
from common import synthetic

IMAGE_SIZE = 128
SCALES = (24, 48, 96)


def shapes_batch(count, split="train", max_boxes=6):
    """A padded detection batch straight from the synthetic generator."""
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    classes = -np.ones((count, max_boxes), np.int32)
    for i in range(count):
        scene = synthetic.make_scene(i, split)
        n = len(scene["classes"])
        boxes[i, :n], classes[i, :n] = scene["boxes"], scene["classes"]
    return boxes, classes


def shapes_anchors():
    return anchor_ops.generate_anchors(16, 16, 8, SCALES, image_height=IMAGE_SIZE,
                                       image_width=IMAGE_SIZE, normalized=True)


def test_rpn_head_shapes_params_and_config():
    head = rpn.RPNHead(num_anchors=9, filters=32)
    logits, deltas = head(tf.zeros([2, 16, 16, 24]))
    assert logits.shape == (2, 16 * 16 * 9)
    assert deltas.shape == (2, 16 * 16 * 9, 4)
    # 3x3 conv (24 -> 32) + 1x1 (32 -> 9) + 1x1 (32 -> 36), with biases: by hand.
    expected = (3 * 3 * 24 * 32 + 32) + (32 * 9 + 9) + (32 * 36 + 36)
    assert head.count_params() == expected
    clone = rpn.RPNHead.from_config(head.get_config())
    assert clone.num_anchors == 9 and clone.filters == 32


def test_rpn_head_order_matches_anchor_order():
    """Channel a*4..a*4+3 at location (i, j) must be row (i*W + j)*k + a of the output."""
    head = rpn.RPNHead(num_anchors=3, filters=4)
    feature_map = tf.random.normal([1, 2, 3, 5], seed=1)
    _, deltas = head(feature_map)
    raw = head.deltas(head.conv(feature_map)).numpy()  # [1, 2, 3, 12]
    i, j, a = 1, 2, 1
    np.testing.assert_allclose(deltas[0, (i * 3 + j) * 3 + a].numpy(), raw[0, i, j, 4 * a:4 * a + 4],
                               rtol=1e-6)


def test_positive_anchors_exist_on_shapes_data():
    boxes, classes = shapes_batch(16)
    labels, targets = rpn.assign_rpn_targets(shapes_anchors(), boxes, classes)
    labels = labels.numpy()
    for i in range(16):
        num_objects = int((classes[i] >= 0).sum())
        positives = int((labels[i] == 1).sum())
        if num_objects:
            # Every object gets at least its best anchor (low-quality rule).
            assert positives >= num_objects
        assert (labels[i] >= 0).sum() <= 256
        assert positives <= 128
    assert np.isfinite(targets.numpy()).all()


def test_padded_ground_truth_is_ignored():
    anchors = shapes_anchors()
    boxes, classes = shapes_batch(4, max_boxes=5)
    padded_boxes = boxes.copy()
    padded_boxes[classes < 0] = [0.2, 0.2, 0.6, 0.6]  # garbage in padding rows
    total = anchors.shape[0]
    # No subsampling (keep all labelled anchors) -> the labels are deterministic.
    reference, _ = rpn.assign_rpn_targets(anchors, boxes, classes, num_samples=total,
                                          positive_fraction=1.0)
    with_garbage, _ = rpn.assign_rpn_targets(anchors, padded_boxes, classes, num_samples=total,
                                             positive_fraction=1.0)
    np.testing.assert_array_equal(reference.numpy(), with_garbage.numpy())


def test_empty_image_gives_only_negatives_and_finite_loss():
    anchors = shapes_anchors()
    boxes = np.zeros((2, 3, 4), np.float32)
    classes = -np.ones((2, 3), np.int32)
    labels, targets = rpn.assign_rpn_targets(anchors, boxes, classes)
    labels = labels.numpy()
    assert (labels == 1).sum() == 0
    assert ((labels == 0).sum(axis=1) == 256).all()
    logits = tf.zeros([2, anchors.shape[0]])
    deltas = tf.zeros([2, anchors.shape[0], 4])
    class_loss, box_loss = rpn.rpn_loss(logits, deltas, labels, targets)
    # Logit 0 = probability 0.5: log loss log(2) on every sampled anchor; no box term.
    np.testing.assert_allclose(float(class_loss), np.log(2.0), rtol=1e-6)
    assert float(box_loss) == 0.0


def test_anchor_equal_to_box_is_positive_with_zero_target():
    anchors = tf.constant([[0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9], [0.0, 0.5, 0.1, 0.6]])
    boxes = tf.constant([[[0.1, 0.1, 0.4, 0.4]]])
    classes = tf.constant([[2]])
    labels, targets = rpn.assign_rpn_targets(anchors, boxes, classes)
    np.testing.assert_array_equal(labels.numpy()[0], [1, 0, 0])
    np.testing.assert_allclose(targets.numpy()[0, 0], 0.0, atol=1e-6)


def test_rpn_loss_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    deltas = rng.normal(size=(2, 50, 4)).astype(np.float32)
    targets = rng.normal(size=(2, 50, 4)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(2, 50)).astype(np.int32)
    class_loss, box_loss = rpn.rpn_loss(logits, deltas, labels, targets, smooth_l1_beta=1.0)
    sampled = labels >= 0
    p = 1 / (1 + np.exp(-logits))
    y = (labels == 1).astype(np.float64)
    log_loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    np.testing.assert_allclose(float(class_loss), log_loss[sampled].mean(), rtol=1e-5)
    diff = np.abs(deltas - targets)
    sl1 = np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).sum(-1)
    np.testing.assert_allclose(float(box_loss), sl1[labels == 1].sum() / sampled.sum(), rtol=1e-5)


def test_proposal_layer_counts_and_nms():
    anchors = shapes_anchors()
    num = anchors.shape[0]
    layer = rpn.ProposalLayer(pre_nms_top_n_train=500, post_nms_top_n_train=50,
                              pre_nms_top_n_test=200, post_nms_top_n_test=20)
    logits = tf.random.normal([2, num], seed=3)
    deltas = 0.1 * tf.random.normal([2, num, 4], seed=4)
    proposals, scores, count = layer(logits, deltas, anchors, training=True)
    assert proposals.shape == (2, 50, 4) and scores.shape == (2, 50)
    test_proposals, _, test_count = layer(logits, deltas, anchors, training=False)
    assert test_proposals.shape == (2, 20, 4)
    assert (test_count.numpy() <= 20).all() and (count.numpy() <= 50).all()
    for i in range(2):
        kept = proposals.numpy()[i, :count[i]]
        assert kept.min() >= 0.0 and kept.max() <= 1.0  # clipped to the image
        iou = box_ops.pairwise_iou(kept, kept).numpy() - np.eye(len(kept))
        assert iou.max() <= 0.7 + 1e-6  # NMS at 0.7
        assert np.all(np.diff(scores.numpy()[i, :count[i]]) <= 1e-7)  # sorted by score
        assert np.all(proposals.numpy()[i, count[i]:] == 0)  # padding


def test_proposal_layer_matches_numpy_reference():
    anchors = shapes_anchors().numpy()
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, len(anchors))).astype(np.float32)
    deltas = (0.2 * rng.normal(size=(1, len(anchors), 4))).astype(np.float32)
    layer = rpn.ProposalLayer(pre_nms_top_n_test=300, post_nms_top_n_test=40, min_size=0.05)
    proposals, _, count = layer(logits, deltas, anchors, training=False)
    # Reference: the same steps written out with NumPy and nms_reference.
    scores = 1 / (1 + np.exp(-logits[0]))
    a_h, a_w = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    a_y, a_x = anchors[:, 0] + a_h / 2, anchors[:, 1] + a_w / 2
    y, x = a_y + deltas[0, :, 0] * a_h, a_x + deltas[0, :, 1] * a_w
    h, w = a_h * np.exp(deltas[0, :, 2]), a_w * np.exp(deltas[0, :, 3])
    decoded = np.clip(np.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], 1), 0, 1)
    big = ((decoded[:, 2] - decoded[:, 0]) >= 0.05) & ((decoded[:, 3] - decoded[:, 1]) >= 0.05)
    candidates = np.flatnonzero(big)
    top = candidates[np.argsort(-scores[candidates], kind="stable")[:300]]
    keep = box_ops.nms_reference(decoded[top], scores[top], 0.7, max_output_size=40)
    expected = decoded[top][keep]
    assert int(count[0]) == len(expected)
    np.testing.assert_allclose(proposals.numpy()[0, :len(expected)], expected, atol=1e-5)


def test_no_gradient_through_proposal_coordinates():
    anchors = shapes_anchors()
    layer = rpn.ProposalLayer(post_nms_top_n_train=30)
    logits = tf.Variable(tf.random.normal([1, anchors.shape[0]], seed=5))
    deltas = tf.Variable(0.1 * tf.random.normal([1, anchors.shape[0], 4], seed=6))
    with tf.GradientTape() as tape:
        proposals, scores, _ = layer(logits, deltas, anchors, training=True)
        total = tf.reduce_sum(proposals) + tf.reduce_sum(scores)
    gradients = tape.gradient(total, [logits, deltas])
    for gradient in gradients:
        assert gradient is None or float(tf.reduce_max(tf.abs(gradient))) == 0.0


def test_proposal_layer_config_round_trip_and_graph_mode():
    layer = rpn.ProposalLayer(pre_nms_top_n_train=77, post_nms_top_n_test=11, min_size=0.01)
    clone = rpn.ProposalLayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    anchors = shapes_anchors()

    @tf.function
    def run(logits, deltas):
        return clone(logits, deltas, anchors, training=False)

    proposals, _, _ = run(tf.zeros([3, anchors.shape[0]]), tf.zeros([3, anchors.shape[0], 4]))
    assert proposals.shape == (3, 11, 4)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_anchors"):
        rpn.RPNHead(num_anchors=0)
    with pytest.raises(ValueError, match="nms_iou_threshold"):
        rpn.ProposalLayer(nms_iou_threshold=1.5)
    with pytest.raises(ValueError, match="gt_boxes"):
        rpn.check_detection_targets(np.zeros((3, 4)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="gt_classes"):
        rpn.check_detection_targets(np.zeros((1, 2, 4)), [[7, -1]], num_classes=5)


def test_degenerate_and_out_of_range_boxes_are_safe():
    anchors = shapes_anchors()
    boxes = np.array([[[0.5, 0.5, 0.5, 0.5],     # zero area
                       [0.7, 0.7, 0.2, 0.2],     # inverted
                       [-0.3, -0.2, 1.4, 1.5],   # outside the image: clipped
                       [0.2, 0.2, 0.5, 0.5]]], np.float32)
    classes = np.array([[0, 1, 2, 3]], np.int32)
    _, _, valid = rpn.check_detection_targets(boxes, classes)
    np.testing.assert_array_equal(valid.numpy(), [[False, False, True, True]])
    labels, targets = rpn.assign_rpn_targets(anchors, boxes, classes)
    logits = tf.zeros([1, anchors.shape[0]])
    deltas = tf.zeros([1, anchors.shape[0], 4])
    losses = rpn.rpn_loss(logits, deltas, labels, targets)
    assert all(np.isfinite(float(v)) for v in losses)
    assert (labels.numpy() == 1).sum() >= 2


def test_proposal_recall_by_hand():
    gt = np.array([[[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[0, 1, -1]])
    proposals = np.array([[[0.1, 0.1, 0.3, 0.31], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 0.9]]],
                         np.float32)
    # Only the first two rows are valid: the second object (matched only by row 3) is missed.
    assert float(rpn.proposal_recall(proposals, [2], gt, classes)) == pytest.approx(0.5)
    assert float(rpn.proposal_recall(proposals, [3], gt, classes)) == pytest.approx(1.0)
    keras.utils.set_random_seed(0)


def test_cross_boundary_anchors_are_ignored():
    """Ren et al. 2015 sec. 3.3: anchors crossing the border take no part in the loss."""
    from ch05_detection import targets

    anchors = shapes_anchors()
    inside = targets.inside_image(anchors).numpy()
    boxes, classes = shapes_batch(6)
    total = anchors.shape[0]
    labels, _ = rpn.assign_rpn_targets(anchors, boxes, classes, num_samples=total,
                                       positive_fraction=1.0, anchor_valid=inside)
    labels = labels.numpy()
    assert (labels[:, ~inside] == -1).all()
    # Every object still gets a positive (its best anchor among those inside).
    for i in range(6):
        if (classes[i] >= 0).any():
            assert (labels[i] == 1).sum() >= (classes[i] >= 0).sum()
    # Inside the image the labels are those of the plain matcher except where the best
    # anchor of an object moved inside.
    plain, _ = rpn.assign_rpn_targets(anchors, boxes, classes, num_samples=total,
                                      positive_fraction=1.0)
    plain = plain.numpy()
    assert ((plain[:, inside] == labels[:, inside]) | (labels[:, inside] == 1)).all()


def test_rpn_loss_paper_normalisation():
    """num_locations: the box term divided by the anchor locations (N_reg), eq. (1)."""
    rng = np.random.default_rng(4)
    labels = rng.integers(-1, 2, size=(2, 30)).astype(np.int32)
    deltas = rng.normal(size=(2, 30, 4)).astype(np.float32)
    targets_ = rng.normal(size=(2, 30, 4)).astype(np.float32)
    _, box_loss = rpn.rpn_loss(np.zeros((2, 30), np.float32), deltas, labels, targets_,
                               box_loss_weight=10.0, smooth_l1_beta=1.0, num_locations=10)
    diff = np.abs(deltas - targets_)
    sl1 = np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).sum(-1)
    np.testing.assert_allclose(float(box_loss), 10.0 * sl1[labels == 1].sum() / (10 * 2),
                               rtol=1e-5)


def test_batched_nms_gives_the_per_image_proposals_also_under_xla():
    """ProposalLayer(nms="batched") (boxes.nms_padded, static shapes) against the default
    per-image tf.image.non_max_suppression path, training and test counts, with some boxes
    dropped as too small; and compiled with XLA (which the per-image path cannot be)."""
    anchors = shapes_anchors()
    num = anchors.shape[0]
    rng = np.random.default_rng(12)
    logits = tf.constant(3.0 * rng.normal(size=(3, num)), tf.float32)
    deltas = tf.constant(0.3 * rng.normal(size=(3, num, 4)), tf.float32)
    options = dict(pre_nms_top_n_train=600, post_nms_top_n_train=80, pre_nms_top_n_test=200,
                   post_nms_top_n_test=30, min_size=0.08)
    per_image = rpn.ProposalLayer(**options)
    batched = rpn.ProposalLayer(nms="batched", **options)
    assert rpn.ProposalLayer.from_config(batched.get_config()).nms == "batched"
    for training in (True, False):
        expected = per_image(logits, deltas, anchors, training=training)
        assert int(tf.reduce_min(expected[2])) > 0
        for ours, theirs in zip(batched(logits, deltas, anchors, training=training), expected):
            np.testing.assert_array_equal(ours, theirs)
    compiled = tf.function(lambda l, d: batched(l, d, anchors, training=True), jit_compile=True)
    expected = per_image(logits, deltas, anchors, training=True)
    proposals, scores, count = compiled(logits, deltas)
    np.testing.assert_array_equal(count, expected[2])
    np.testing.assert_allclose(proposals, expected[0], atol=1e-6)
    np.testing.assert_allclose(scores, expected[1], atol=1e-6)
    with pytest.raises(ValueError, match="nms"):
        rpn.ProposalLayer(nms="soft")
