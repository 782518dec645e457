"""Tests of the Fast R-CNN head pieces (ch05_detection/detection_head.py)."""

import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import detection_head as head_ops


def random_boxes(rng, shape, min_size=0.05):
    corner = rng.uniform(0, 0.8, size=shape + (2,))
    size = rng.uniform(min_size, 0.4, size=shape + (2,))
    return np.concatenate([corner, np.minimum(corner + size, 1.0)], -1).astype(np.float32)


@pytest.mark.parametrize("head_type", ["dense", "conv"])
def test_head_shapes_and_config(head_type):
    head = head_ops.FastRCNNHead(num_classes=5, head_type=head_type, hidden_units=16)
    logits, deltas = head(tf.zeros([2, 7, 7, 7, 8]))
    assert logits.shape == (2, 7, 6) and deltas.shape == (2, 7, 5, 4)
    if head_type == "dense":
        # fc6 (392 -> 16) + fc7 (16 -> 16) + cls (16 -> 6) + box (16 -> 20), with biases.
        expected = (7 * 7 * 8 * 16 + 16) + (16 * 16 + 16) + (16 * 6 + 6) + (16 * 20 + 20)
        assert head.count_params() == expected
    clone = head_ops.FastRCNNHead.from_config(head.get_config())
    assert clone.get_config() == head.get_config()


def test_sample_rois_fractions_and_thresholds():
    rng = np.random.default_rng(0)
    gt = random_boxes(rng, (2, 3))
    classes = np.array([[0, 3, -1], [4, -1, -1]], np.int32)
    # Proposals: jittered copies of the ground truth (foreground) and random boxes.
    jitter = gt[:, :2] + rng.normal(0, 0.02, size=(2, 2, 4)).astype(np.float32)
    proposals = np.concatenate([np.repeat(jitter, 20, axis=1), random_boxes(rng, (2, 100))], 1)
    valid = np.ones(proposals.shape[:2], bool)
    out = head_ops.sample_rois(proposals, valid, gt, classes, num_rois=32,
                               foreground_fraction=0.25, background_iou_low=0.1)
    rois = out["rois"].numpy()
    targets = out["class_targets"].numpy()
    assert rois.shape == (2, 32, 4) and targets.shape == (2, 32)
    for i in range(2):
        valid_gt = gt[i][classes[i] >= 0]
        iou = box_ops.pairwise_iou(rois[i], valid_gt).numpy().max(-1)  # independent IoU
        fg, bg = targets[i] > 0, targets[i] == 0
        assert fg.sum() <= 8 and fg.sum() >= 1
        assert np.all(iou[fg] >= 0.5)
        assert np.all((iou[bg] < 0.5) & (iou[bg] >= 0.1))
        # The class of a foreground RoI is its best ground-truth box's class + 1.
        best = box_ops.pairwise_iou(rois[i][fg], valid_gt).numpy().argmax(-1)
        np.testing.assert_array_equal(targets[i][fg], classes[i][classes[i] >= 0][best] + 1)
    # Box targets decode back to the matched ground truth.
    decoded = box_ops.decode_boxes(out["box_targets"], out["rois"]).numpy()
    fg = targets > 0
    for i in range(2):
        valid_gt = gt[i][classes[i] >= 0]
        for box in decoded[i][fg[i]]:
            assert box_ops.pairwise_iou(box[None], valid_gt).numpy().max() > 0.999


def test_sample_rois_adds_ground_truth_and_pads():
    gt = np.array([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[2, -1]], np.int32)
    proposals = np.zeros((1, 4, 4), np.float32)
    valid = np.zeros((1, 4), bool)  # no valid proposal at all
    out = head_ops.sample_rois(proposals, valid, gt, classes, num_rois=8)
    targets = out["class_targets"].numpy()[0]
    # Only the added ground-truth box is a candidate: 1 foreground of class 2 + 1, rest padding.
    assert (targets == 3).sum() == 1 and (targets == -1).sum() == 7
    np.testing.assert_allclose(out["rois"].numpy()[0][targets == 3][0], gt[0, 0])


def test_sample_rois_empty_image_is_all_background():
    rng = np.random.default_rng(1)
    proposals = random_boxes(rng, (1, 50))
    out = head_ops.sample_rois(proposals, np.ones((1, 50), bool), np.zeros((1, 2, 4), np.float32),
                               -np.ones((1, 2), np.int32), num_rois=16)
    assert (out["class_targets"].numpy() == 0).all()
    assert np.isfinite(out["box_targets"].numpy()).all()


def test_detection_loss_against_numpy_and_ignores_background_boxes():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 4)).astype(np.float32)  # 3 classes + background
    deltas = rng.normal(size=(2, 6, 3, 4)).astype(np.float32)
    box_targets = rng.normal(size=(2, 6, 4)).astype(np.float32)
    targets = np.array([[0, 1, 2, 3, -1, 0], [3, 3, 0, -1, -1, 1]], np.int32)
    class_loss, box_loss = head_ops.detection_loss(logits, deltas, targets, box_targets)
    sampled = targets >= 0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_cls = -np.mean([log_probs[b, r, targets[b, r]] for b, r in zip(*np.nonzero(sampled))])
    np.testing.assert_allclose(float(class_loss), expected_cls, rtol=1e-5)
    total = 0.0
    for b, r in zip(*np.nonzero(targets > 0)):
        diff = np.abs(deltas[b, r, targets[b, r] - 1] - box_targets[b, r])
        total += np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).sum()
    np.testing.assert_allclose(float(box_loss), total / sampled.sum(), rtol=1e-5)
    # Changing the deltas of background / padding RoIs changes nothing.
    changed = deltas.copy()
    changed[targets <= 0] += 100.0
    _, box_loss_changed = head_ops.detection_loss(logits, changed, targets, box_targets)
    np.testing.assert_allclose(float(box_loss_changed), float(box_loss), rtol=1e-6)


def brute_force_postprocess(rois, logits, deltas, score_threshold, iou_threshold, max_detections):
    """Per-class NMS written out with NumPy and nms_reference, for one image."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    boxes = np.clip(box_ops.decode_boxes(deltas, rois[:, None, :]).numpy(), 0, 1)
    found = []
    for c in range(deltas.shape[1]):
        scores = probs[:, c + 1]
        keep = box_ops.nms_reference(boxes[:, c], scores, iou_threshold,
                                     score_threshold=score_threshold)
        found += [(scores[k], c, boxes[k, c]) for k in keep]
    found.sort(key=lambda item: -item[0])
    return found[:max_detections]


def test_postprocess_matches_brute_force_per_class_nms():
    rng = np.random.default_rng(3)
    rois = random_boxes(rng, (2, 40))
    logits = (2 * rng.normal(size=(2, 40, 4))).astype(np.float32)
    deltas = (0.5 * rng.normal(size=(2, 40, 3, 4))).astype(np.float32)
    out = head_ops.postprocess_detections(rois, logits, deltas, score_threshold=0.2,
                                          nms_iou_threshold=0.5, max_detections=15)
    for i in range(2):
        expected = brute_force_postprocess(rois[i], logits[i], deltas[i], 0.2, 0.5, 15)
        n = int(out["num_detections"][i])
        assert n == len(expected)
        np.testing.assert_allclose(out["scores"].numpy()[i, :n], [e[0] for e in expected],
                                   rtol=1e-5)
        np.testing.assert_array_equal(out["classes"].numpy()[i, :n], [e[1] for e in expected])
        np.testing.assert_allclose(out["boxes"].numpy()[i, :n], np.stack([e[2] for e in expected]),
                                   atol=1e-5)
        assert (out["classes"].numpy()[i, n:] == -1).all()


def test_postprocess_ignores_invalid_rois():
    rois = np.array([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]]], np.float32)
    logits = np.array([[[0, 10, 0], [0, 10, 0]]], np.float32)
    deltas = np.zeros((1, 2, 2, 4), np.float32)
    out = head_ops.postprocess_detections(rois, logits, deltas, roi_valid=[[True, False]],
                                          max_detections=5)
    assert int(out["num_detections"][0]) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_type"):
        head_ops.FastRCNNHead(3, head_type="mlp")
    with pytest.raises(ValueError, match="num_classes"):
        head_ops.FastRCNNHead(0)
    with pytest.raises(ValueError, match="num_rois"):
        head_ops.sample_rois(np.zeros((1, 2, 4)), np.ones((1, 2), bool), np.zeros((1, 1, 4)),
                             [[0]], num_rois=0)


def test_sample_rois_is_a_function_of_its_seeds():
    from ch05_detection import targets

    rng = np.random.default_rng(5)
    gt = random_boxes(rng, (2, 3))
    classes = np.array([[0, 1, 2], [3, -1, -1]], np.int32)
    proposals = random_boxes(rng, (2, 120))
    valid = np.ones((2, 120), bool)

    def sample(step, indices):
        seeds = targets.image_seeds(step, indices, seed=0, stream=targets.ROI_SAMPLING_STREAM)
        return head_ops.sample_rois(proposals, valid, gt, classes, num_rois=16,
                                    seed=seeds)["rois"].numpy()

    first = sample(3, [0, 1])
    np.testing.assert_array_equal(sample(3, [0, 1]), first)
    assert not np.array_equal(sample(4, [0, 1]), first)


def test_postprocess_uses_keras_hub_key_names():
    rng = np.random.default_rng(6)
    rois = random_boxes(rng, (1, 10))
    logits = (3 * rng.normal(size=(1, 10, 3))).astype(np.float32)
    out = head_ops.postprocess_detections(rois, logits, np.zeros((1, 10, 2, 4), np.float32),
                                          max_detections=4)
    assert {"boxes", "confidence", "classes", "num_detections"} <= set(out)
    np.testing.assert_array_equal(out["confidence"], out["scores"])
