"""Tests of the shared target assignment (ch05_detection/targets.py): matcher and sampler."""

import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from ch05_detection import boxes as box_ops
from ch05_detection import rpn, targets


def random_boxes(rng, shape, min_size=0.05):
    corner = rng.uniform(-0.1, 0.8, size=shape + (2,))
    size = rng.uniform(min_size, 0.5, size=shape + (2,))
    return np.concatenate([corner, corner + size], -1).astype(np.float32)


def numpy_iou(a, b):
    """IoU of two yxyx boxes, written out (no vectorisation)."""
    height = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    width = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    intersection = height * width
    union = ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection)
    return intersection / union if union > 0 else 0.0


def match_reference(candidates, gt, gt_valid, candidate_valid, positive, negative, lower,
                    low_quality):
    """The matching rule with plain loops: labels and the matched index of positives."""
    gt_rows = [j for j in range(len(gt)) if gt_valid[j]]
    iou = np.array([[numpy_iou(c, gt[j]) for j in gt_rows] for c in candidates]).reshape(
        len(candidates), len(gt_rows))
    labels, index = [], []
    for i in range(len(candidates)):
        best = iou[i].max() if gt_rows else 0.0
        label = -1
        if lower <= best < negative:
            label = 0
        if gt_rows and best >= positive:
            label = 1
        labels.append(label)
        index.append(gt_rows[int(iou[i].argmax())] if gt_rows else 0)
    if low_quality:
        usable = [i for i in range(len(candidates)) if candidate_valid[i]]
        # For each usable candidate: the objects it is (one of) the best candidates for.
        for i in usable:
            best_for = [column for column, _ in enumerate(gt_rows)
                        if iou[i, column] > 0 and iou[i, column] == max(iou[k, column]
                                                                       for k in usable)]
            if best_for:
                labels[i] = 1
                index[i] = gt_rows[max(best_for, key=lambda column: iou[i, column])]
    labels = [label if candidate_valid[i] else -1 for i, label in enumerate(labels)]
    return np.array(labels), np.array(index)


# ------------------------------------------------------------------ matcher
def test_match_by_hand_with_ignore_band_padding_and_border():
    # IoUs by hand: anchor 0 = gt 0 (IoU 1); anchor 1 overlaps gt 0 by 0.5 (ignored band);
    # anchor 2 overlaps gt 1 by 0.2 but is its best anchor (low quality -> positive);
    # anchor 3 touches nothing (negative); anchor 4 equals gt 1 shifted out of the image
    # (cross-boundary: ignored, and not allowed to be gt 1's best anchor).
    candidates = np.array([[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.2, 0.4], [0.6, 0.6, 0.8, 1.0],
                           [0.3, 0.3, 0.4, 0.4], [0.6, 0.9, 0.8, 1.1]], np.float32)
    gt = np.array([[0.0, 0.0, 0.2, 0.2], [0.6, 0.9, 0.8, 1.1], [0.3, 0.3, 0.4, 0.4]], np.float32)
    gt_valid = np.array([True, True, False])  # row 2 is padding (even though it matches)
    inside = targets.inside_image(candidates).numpy()
    np.testing.assert_array_equal(inside, [True, True, True, True, False])
    iou = box_ops.pairwise_iou(candidates, gt)
    np.testing.assert_allclose(iou.numpy()[:3, :2], [[1, 0], [0.5, 0], [0, 0.2]], atol=1e-6)
    index, labels, best = targets.match_iou(iou, gt_valid, 0.7, 0.3, candidate_valid=inside)
    np.testing.assert_array_equal(labels, [1, -1, 1, 0, -1])
    np.testing.assert_array_equal(index.numpy()[[0, 2]], [0, 1])
    np.testing.assert_allclose(best.numpy()[:4], [1, 0.5, 0.2, 0], atol=1e-6)
    # Without the border rule anchor 4 is gt 1's exact match, and anchor 2 is not best.
    _, labels, _ = targets.match_iou(iou, gt_valid, 0.7, 0.3)
    np.testing.assert_array_equal(labels, [1, -1, 0, 0, 1])
    # No low-quality matches: anchor 2 (IoU 0.2) is a negative.
    _, labels, _ = targets.match_iou(iou, gt_valid, 0.7, 0.3, allow_low_quality_matches=False,
                                     candidate_valid=inside)
    np.testing.assert_array_equal(labels, [1, -1, 0, 0, -1])
    # Fast R-CNN's RoI rule: fg >= 0.5, bg in [0.1, 0.5): anchor 1 (0.5) is foreground,
    # anchor 2 (0.2) background, anchor 3 (0) below 0.1: ignored.
    _, labels, _ = targets.match_iou(iou, gt_valid, 0.5, 0.5, negative_lower_bound=0.1,
                                     allow_low_quality_matches=False, candidate_valid=inside)
    np.testing.assert_array_equal(labels, [1, 1, 0, -1, -1])


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_random_against_loop_reference(low_quality):
    rng = np.random.default_rng(3)
    for trial in range(8):
        gt = random_boxes(rng, (5,))
        candidates = random_boxes(rng, (40,))
        candidates[:5] = gt + rng.normal(0, 0.01, size=gt.shape).astype(np.float32)
        gt_valid = rng.uniform(size=5) < 0.7
        candidate_valid = rng.uniform(size=40) < 0.8
        positive, negative = [(0.7, 0.3), (0.5, 0.4), (0.5, 0.5)][trial % 3]
        lower = 0.1 if trial % 2 else 0.0
        iou = box_ops.pairwise_iou(candidates, gt)
        index, labels, _ = targets.match_iou(iou, gt_valid, positive, negative, lower,
                                             low_quality, candidate_valid)
        ref_labels, ref_index = match_reference(candidates, gt, gt_valid, candidate_valid,
                                                positive, negative, lower, low_quality)
        np.testing.assert_array_equal(labels.numpy(), ref_labels)
        positives = ref_labels == 1
        np.testing.assert_array_equal(index.numpy()[positives], ref_index[positives])


def test_match_batched_graph_mode_equals_per_image():
    rng = np.random.default_rng(4)
    anchors = random_boxes(rng, (30,))
    gt = random_boxes(rng, (3, 4))
    gt_valid = np.array([[True, True, False, False], [False] * 4, [True] * 4])
    anchor_valid = targets.inside_image(anchors)
    batched = tf.function(targets.match_boxes)(anchors, gt, gt_valid, anchor_valid=anchor_valid)
    for i in range(3):
        single = targets.match_boxes(anchors, gt[i], gt_valid[i], anchor_valid=anchor_valid)
        np.testing.assert_array_equal(batched[1][i], single[1])
        np.testing.assert_array_equal(batched[0][i], single[0])
    # boxes.match_boxes is the same matcher.
    np.testing.assert_array_equal(box_ops.match_boxes(anchors, gt, gt_valid)[1],
                                  targets.match_boxes(anchors, gt, gt_valid)[1])


def test_images_without_objects():
    rng = np.random.default_rng(5)
    candidates = random_boxes(rng, (6,))
    for gt, gt_valid in [(np.zeros((3, 4), np.float32), [False] * 3),
                         (np.zeros((0, 4), np.float32), np.zeros((0,), bool))]:
        iou = box_ops.pairwise_iou(candidates, gt)
        index, labels, best = targets.match_iou(iou, gt_valid, 0.7, 0.3)
        np.testing.assert_array_equal(labels, np.zeros(6))
        np.testing.assert_array_equal(best, np.zeros(6))
        assert index.shape == (6,)
        # With a lower bound for negatives (Fast R-CNN's 0.1) nothing is usable.
        _, labels, _ = targets.match_iou(iou, gt_valid, 0.5, 0.5, negative_lower_bound=0.1)
        np.testing.assert_array_equal(labels, -np.ones(6))


def test_threshold_validation():
    with pytest.raises(ValueError, match="negative_threshold"):
        targets.match_iou(np.zeros((2, 1)), None, 0.3, 0.7)
    with pytest.raises(ValueError, match="negative_lower_bound"):
        targets.match_iou(np.zeros((2, 1)), None, 0.5, 0.4, negative_lower_bound=0.45)
    with pytest.raises(ValueError, match="iou"):
        targets.match_iou(np.zeros((3,)), None)


def test_inside_image_counts_on_the_default_anchors():
    # 16 x 16 cells of 8 px, 128 px image. An anchor of height h, width w centred at
    # 8 i + 4 is inside iff h / 2 <= 8 i + 4 <= 128 - h / 2 (same for x): count by hand.
    scales, ratios = (24, 48, 96), (0.5, 1.0, 2.0)
    anchors = anchor_ops.generate_anchors(16, 16, 8, scales, ratios, image_height=128,
                                          image_width=128, normalized=True)
    inside = targets.inside_image(anchors).numpy()
    centres = 8 * np.arange(16) + 4
    expected = 0
    for ratio in ratios:
        for scale in scales:
            height, width = scale * np.sqrt(ratio), scale / np.sqrt(ratio)
            rows = ((centres >= height / 2 - 1e-4) & (centres <= 128 - height / 2 + 1e-4)).sum()
            columns = ((centres >= width / 2 - 1e-4) & (centres <= 128 - width / 2 + 1e-4)).sum()
            expected += rows * columns
    assert inside.sum() == expected
    # The 96 px anchors of ratio 1:2 and 2:1 (136 px long) never fit (k = 2 and 8 in the
    # ratio-major, scale-minor order); the 24 px square ones fit everywhere but the rim.
    per_location = inside.reshape(256, 9)
    assert not per_location[:, [2, 8]].any()
    assert per_location[:, 3].sum() == 14 * 14


# ------------------------------------------------------------------ ground truth
def test_class_ids_checked_eagerly_and_in_a_graph_with_one_message():
    good = np.array([[0, 4, -1]], np.int32)
    np.testing.assert_array_equal(targets.check_class_ids(good, 5), good)
    bad = np.array([[0, 7, -1], [-2, 1, 7]], np.int32)
    with pytest.raises(ValueError, match=r"num_classes=5\); bad class ids: \[-2, 7\]"):
        targets.check_class_ids(bad, 5)

    @tf.function
    def traced(classes):
        return targets.check_detection_targets(tf.zeros([2, 3, 4]), classes, num_classes=5)[1]

    np.testing.assert_array_equal(traced(tf.constant([[0, 4, -1], [1, -1, -1]])),
                                  [[-1, -1, -1], [-1, -1, -1]])  # zero-area rows: absent
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?s)num_classes=5\); bad class ids:.*7"):
        traced(tf.constant(bad))


def test_check_detection_targets_marks_padding_and_degenerate_rows():
    boxes = np.array([[[0.5, 0.5, 0.5, 0.5], [0.7, 0.7, 0.2, 0.2], [-0.3, -0.2, 1.4, 1.5],
                       [0.2, 0.2, 0.5, 0.5], [0.1, 0.1, 0.3, 0.3]]], np.float32)
    classes = np.array([[0, 1, 2, 3, -1]], np.int32)
    clipped, classes_out, valid = targets.check_detection_targets(boxes, classes)
    np.testing.assert_array_equal(valid, [[False, False, True, True, False]])
    np.testing.assert_array_equal(classes_out, [[-1, -1, 2, 3, -1]])
    np.testing.assert_allclose(clipped.numpy()[0, 2], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="gt_boxes"):
        targets.check_detection_targets(np.zeros((3, 4)), np.zeros((1, 3)))


# ------------------------------------------------------------------ sampler
def test_sampler_counts_and_subset():
    labels = np.full((2, 1000), -1, np.int32)
    labels[0, :600] = 1  # many positives
    labels[0, 600:] = 0
    labels[1, :10] = 1  # few positives: negatives fill the rest
    labels[1, 10:500] = 0
    sampled = targets.sample_balanced(labels, 256, 0.5, seed=3).numpy()
    assert (sampled[0] == 1).sum() == 128 and (sampled[0] == 0).sum() == 128
    assert (sampled[1] == 1).sum() == 10 and (sampled[1] == 0).sum() == 246
    assert np.all((sampled == -1) | (sampled == labels))
    # Fewer labelled candidates than the budget: all of them are kept.
    few = np.array([[1, 0, -1, 0]], np.int32)
    np.testing.assert_array_equal(targets.sample_balanced(few, 256, 0.5), few)
    assert rpn.sample_anchors is targets.sample_balanced  # the RPN's (older) name


def test_sampler_equals_numpy_reference_on_the_same_random_numbers():
    rng = np.random.default_rng(6)
    labels = rng.choice([-1, 0, 1], size=(3, 200), p=[0.3, 0.6, 0.1]).astype(np.int32)
    seeds = targets.image_seeds(11, tf.range(3), seed=4, stream=1)
    sampled = targets.sample_balanced(labels, 64, 0.25, seed=seeds).numpy()
    random = targets.uniform_per_image(seeds, 200).numpy()
    for b in range(3):
        expected = -np.ones(200, np.int32)
        positives = np.flatnonzero(labels[b] == 1)
        negatives = np.flatnonzero(labels[b] == 0)
        keep_positive = positives[np.argsort(-random[b, positives])][:16]
        keep_negative = negatives[np.argsort(-random[b, negatives])][:64 - len(keep_positive)]
        expected[keep_positive], expected[keep_negative] = 1, 0
        np.testing.assert_array_equal(sampled[b], expected)


def test_sampler_is_uniform_over_candidates():
    """Each of 20 negatives is kept with probability 5/20 (binomial bounds over 800 draws)."""
    labels = np.zeros((800, 20), np.int32)
    seeds = targets.image_seeds(0, tf.range(800), seed=1)
    kept = (targets.sample_balanced(labels, 5, 0.5, seed=seeds).numpy() == 0).mean(axis=0)
    # std of a frequency: sqrt(0.25 * 0.75 / 800) = 0.0153; 4.5 sigma bounds.
    assert np.all(np.abs(kept - 0.25) < 0.07), kept


def test_sampling_is_keyed_on_step_and_global_image_index():
    rng = np.random.default_rng(7)
    labels = rng.choice([-1, 0, 1], size=(4, 300), p=[0.2, 0.7, 0.1]).astype(np.int32)

    def sample(step, rows, indices):
        seeds = targets.image_seeds(step, indices, seed=9, stream=targets.RPN_SAMPLING_STREAM)
        return targets.sample_balanced(labels[rows], 32, 0.5, seed=seeds).numpy()

    whole = sample(5, slice(0, 4), tf.range(4))
    # Two replicas of 2 images, global indices 0, 1 and 2, 3: the same samples.
    halves = np.concatenate([sample(5, slice(0, 2), [0, 1]), sample(5, slice(2, 4), [2, 3])])
    np.testing.assert_array_equal(whole, halves)
    np.testing.assert_array_equal(sample(5, slice(0, 4), tf.range(4)), whole)  # stateless
    assert not np.array_equal(sample(6, slice(0, 4), tf.range(4)), whole)  # next step differs
    # Keyed on the *global* index: the second half sampled as images 0, 1 differs.
    assert not np.array_equal(sample(5, slice(2, 4), [0, 1]), whole[2:])
    # Other streams (e.g. the RoI sampler) draw other numbers.
    a = targets.uniform_per_image(targets.image_seeds(5, [0], 9, 1), 10)
    b = targets.uniform_per_image(targets.image_seeds(5, [0], 9, 2), 10)
    assert not np.allclose(a, b)
    # Default strategy: one replica, local index = global index; normalisers unchanged.
    np.testing.assert_array_equal(targets.global_image_index(3), [0, 1, 2])
    assert float(targets.mean_over_replicas(7.0)) == 7.0
    assert float(targets.scale_loss_for_replicas(tf.constant(3.0))) == 3.0


def test_sampler_in_a_graph_and_bad_arguments():
    labels = tf.constant([[1, 0, 0, -1, 1, 0]])
    traced = tf.function(targets.sample_balanced)(labels, 3, 0.5,
                                                  seed=targets.image_seeds(2, [0]))
    assert int(tf.reduce_sum(tf.cast(traced >= 0, tf.int32))) == 3
    with pytest.raises(ValueError, match="num_samples"):
        targets.sample_balanced(labels, 0, 0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        targets.sample_balanced(labels, 4, 1.5)
    with pytest.raises(ValueError, match="seed"):
        targets.sample_balanced(labels, 4, 0.5, seed=tf.constant([1, 2]))


# ------------------------------------------------------------------ the same numbers under XLA
def test_stateless_randomness_equals_tensorflow_and_survives_xla():
    """targets.stateless_uniform / stateless_fold_in are TensorFlow's own functions bit for bit
    (also for seeds beyond 32 bits, which XLA's kernels would read differently), and give the
    same bits compiled with XLA, so a compiled step samples the same anchors."""
    rng = np.random.default_rng(10)
    uniform_xla = tf.function(targets.stateless_uniform, jit_compile=True)
    fold_in_xla = tf.function(targets.stateless_fold_in, jit_compile=True)
    for _ in range(6):
        seed = tf.constant(rng.integers(-2 ** 63, 2 ** 63 - 1, size=2, dtype=np.int64))
        data = tf.constant(int(rng.integers(-2 ** 40, 2 ** 40)), tf.int64)
        expected = tf.random.stateless_uniform([3, 37], seed=seed).numpy()
        np.testing.assert_array_equal(targets.stateless_uniform([3, 37], seed), expected)
        np.testing.assert_array_equal(uniform_xla([3, 37], seed), expected)
        folded = tf.random.experimental.stateless_fold_in(seed, data).numpy()
        np.testing.assert_array_equal(targets.stateless_fold_in(seed, data), folded)
        np.testing.assert_array_equal(fold_in_xla(seed, data), folded)
    # TensorFlow's own op under XLA draws other numbers for such a seed: why we need ours.
    seed = tf.constant([1, 2 ** 40], tf.int64)
    plain_xla = tf.function(lambda s: tf.random.stateless_uniform([8], seed=s), jit_compile=True)
    assert not np.array_equal(plain_xla(seed), tf.random.stateless_uniform([8], seed=seed))


def test_keep_largest_equals_a_stable_sort_with_ties_and_under_xla():
    """top_k + scatter against the rank-by-argsort rule (lower index first among equal numbers)."""
    rng = np.random.default_rng(11)

    def by_sorting(mask, random, count):
        order = np.argsort(-np.where(mask, random, -1.0), axis=1, kind="stable")
        rank = np.argsort(order, axis=1, kind="stable")
        return mask & (rank < count[:, None])

    for trial in range(12):
        size, max_count = int(rng.integers(1, 300)), int(rng.integers(1, 200))
        mask = rng.uniform(size=(3, size)) < rng.uniform()
        random = np.round(rng.uniform(size=(3, size)), 2).astype(np.float32)  # many ties
        count = np.minimum(mask.sum(1), rng.integers(0, max_count + 1, size=3)).astype(np.int32)
        expected = by_sorting(mask, random, count)
        np.testing.assert_array_equal(targets.keep_largest(mask, random, count, max_count),
                                      expected)
        if trial < 3:  # each compilation costs a second or so
            compiled = tf.function(lambda m, r, c: targets.keep_largest(m, r, c, max_count),
                                   jit_compile=True)
            np.testing.assert_array_equal(compiled(mask, random, count), expected)
