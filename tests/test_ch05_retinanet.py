"""Tests of RetinaNet (ch05_detection/retinanet.py) on tiny inputs."""

import dataclasses
import json
import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import retinanet
from ch05_detection.focal_loss import sigmoid_focal_loss
from ch05_detection.retinanet import RetinaNet, RetinaNetConfig
from common import synthetic
from detection_checks import check_detect_contract  # tests/detection_checks.py

SIZE = 64
NUM_CLASSES = 5


def tiny_model(**options):
    settings = dict(image_size=(SIZE, SIZE), backbone="resnet_small",
                    backbone_options={"filters": [8, 16, 32, 64]}, fpn_width=16, head_width=16,
                    anchor_sizes=(8.0, 16.0, 32.0), max_detections=10)
    settings.update(options)
    return RetinaNet(NUM_CLASSES, **settings)


def shapes_batch(count, max_boxes=6, start=0):
    images = np.zeros((count, SIZE, SIZE, 3), np.float32)
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    classes = -np.ones((count, max_boxes), np.int32)
    for i in range(count):
        scene = synthetic.make_scene(start + i, "train", image_size=SIZE, min_objects=1)
        n = len(scene["classes"])
        images[i], boxes[i, :n], classes[i, :n] = scene["image"], scene["boxes"], scene["classes"]
    return {"image": images, "boxes": boxes, "classes": classes}


def numpy_iou(a, b):
    """Independent IoU of boxes a [A, 4] with b [N, 4] (yxyx)."""
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(8)


@pytest.fixture(scope="module")
def trained(batch):
    """A tiny model after 40 steps on one fixed batch."""
    keras.utils.set_random_seed(1)
    model = tiny_model(flip_augment=False)
    # 40 steps are too few for BatchNorm's running averages at momentum 0.99 (inference
    # would see other features than training); let them follow the batches faster.
    for layer in model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=1,
                        epochs=40, verbose=0).history["loss"]
    return model, history


def test_outputs_and_anchors():
    model = tiny_model()
    # Levels P3-P5 of a 64-px image: 8x8, 4x4, 2x2 cells, 9 anchors each.
    assert model.level_sizes == [(8, 8), (4, 4), (2, 2)]
    assert model.level_strides == (8.0, 16.0, 32.0)
    assert model.level_anchor_counts == (8 * 8 * 9, 4 * 4 * 9, 2 * 2 * 9)
    num_anchors = sum(model.level_anchor_counts)
    assert model.anchors.shape == (num_anchors, 4)
    out = model(np.zeros((3, SIZE, SIZE, 3), np.float32))
    assert out["class_logits"].shape == (3, num_anchors, NUM_CLASSES)
    assert out["box_deltas"].shape == (3, num_anchors, 4)
    # The 9 anchors of the first location of each level: sizes base * {1, 2^1/3, 2^2/3}
    # (area = size^2) for 3 ratios, centred on the cell centre ((i + 0.5) * stride).
    start = 0
    for base, stride, count in zip((8.0, 16.0, 32.0), (8, 16, 32), model.level_anchor_counts):
        first = model.anchors[start:start + 9] * SIZE
        heights, widths = first[:, 2] - first[:, 0], first[:, 3] - first[:, 1]
        expected = [base * 2 ** (i / 3) for i in range(3)] * 3
        np.testing.assert_allclose(np.sqrt(heights * widths), expected, rtol=1e-5)
        np.testing.assert_allclose(heights / widths, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-5)
        np.testing.assert_allclose((first[:, 0] + first[:, 2]) / 2, stride / 2, rtol=1e-5)
        start += count


def test_prior_bias_sits_on_the_classification_subnet(batch):
    """b = -log((1 - pi) / pi), pi = 0.01, on the class subnet's last conv; the box subnet's
    last bias is 0 (one widely used implementation puts the prior on the box subnet)."""
    keras.utils.set_random_seed(3)
    model = tiny_model()
    prior_bias = -math.log((1 - 0.01) / 0.01)  # -4.595
    class_bias = model.class_subnet.final_conv.bias.numpy()
    box_bias = model.box_subnet.final_conv.bias.numpy()
    assert class_bias.shape == (9 * NUM_CLASSES,) and box_bias.shape == (9 * 4,)
    np.testing.assert_allclose(class_bias, prior_bias, rtol=1e-6)
    np.testing.assert_array_equal(box_bias, 0.0)
    paper = tiny_model(head_init="paper")
    for subnet, hidden_std in ((model.class_subnet, math.sqrt(2 / (9 * 16))),
                               (model.box_subnet, math.sqrt(2 / (9 * 16))),
                               (paper.class_subnet, 0.01), (paper.box_subnet, 0.01)):
        assert len(subnet.hidden_convs) == 4  # 4 conv3x3 + ReLU, then the final conv
        kernels = np.concatenate([c.kernel.numpy().ravel() for c in subnet.hidden_convs])
        assert np.std(kernels) == pytest.approx(hidden_std, rel=0.1)  # He's, or the paper's
        assert np.std(subnet.final_conv.kernel.numpy()) == pytest.approx(0.01, rel=0.1)
        assert all((c.bias.numpy() == 0).all() for c in subnet.hidden_convs)
    np.testing.assert_allclose(paper.class_subnet.final_conv.bias.numpy(), prior_bias, rtol=1e-6)
    # Every anchor starts at p ~ 0.01, so the first focal loss is hand-computable: each
    # positive (class, anchor) costs 0.25 * 0.99^2 * -log(0.01), each other counted element
    # 0.75 * 0.01^2 * -log(0.99); divided by the number of positives.
    logits = model(batch["image"])["class_logits"].numpy()
    np.testing.assert_allclose(logits, prior_bias, atol=0.1)
    assigned = model.assign_targets(batch["boxes"], batch["classes"])
    labels = assigned["labels"].numpy()
    positives = (labels == 1).sum()
    negatives = (labels >= 0).sum() * NUM_CLASSES - positives
    expected = (positives * 0.25 * 0.99 ** 2 * -math.log(0.01)
                + negatives * 0.75 * 0.01 ** 2 * -math.log(0.99)) / positives
    losses = model.compute_losses(batch)
    assert float(losses["class_loss"]) == pytest.approx(expected, rel=0.02)
    # Plain cross-entropy (the ablation) on the same start.
    cross_entropy = tiny_model(classification_loss="cross_entropy")
    cross_entropy.set_weights(model.get_weights())
    expected_ce = (positives * -math.log(0.01) + negatives * -math.log(0.99)) / positives
    assert float(cross_entropy.compute_losses(batch)["class_loss"]) == pytest.approx(
        expected_ce, rel=0.02)


def test_matching_thresholds_and_box_targets(batch):
    model = tiny_model()
    anchors = model.anchors
    gt_boxes, gt_classes = batch["boxes"], batch["classes"]
    assigned = {k: v.numpy() for k, v in model.assign_targets(gt_boxes, gt_classes).items()}
    labels = assigned["labels"]
    for b in range(len(gt_boxes)):
        valid = gt_classes[b] >= 0
        iou = numpy_iou(anchors, gt_boxes[b][valid])  # [A, n]
        best = iou.max(axis=1)
        positive, negative, ignored = labels[b] == 1, labels[b] == 0, labels[b] == -1
        # Each object's best anchor is positive even below 0.5 (low-quality match; anchors
        # tied with it up to float rounding may be the one picked) ...
        near_best = np.isclose(iou, iou.max(axis=0, keepdims=True), atol=1e-6) & (iou > 0)
        assert (near_best & positive[:, None]).any(axis=0).all()
        best_for_object = near_best.any(axis=1)
        # ... the others: >= 0.5 positive, < 0.4 background, [0.4, 0.5) ignored. (Anchors
        # within 1e-5 of a threshold are left out: float rounding may put them either side.)
        clear = ~best_for_object & (np.abs(best - 0.5) > 1e-5) & (np.abs(best - 0.4) > 1e-5)
        np.testing.assert_array_equal(positive[clear], best[clear] >= 0.5)
        np.testing.assert_array_equal(negative[clear], best[clear] < 0.4)
        np.testing.assert_array_equal(ignored[clear], (best[clear] >= 0.4) & (best[clear] < 0.5))
        low_quality = positive & (best < 0.5)
        assert best_for_object[low_quality].all()
        assert positive.sum() >= valid.sum()  # every object has at least one anchor
        # Class targets: one-hot of the matched object's class for positives, zeros otherwise.
        targets = assigned["class_targets"][b]
        assert (targets[~positive] == 0).all() and (targets[positive].sum(axis=1) == 1).all()
        matched = iou.argmax(axis=1)[positive & ~low_quality]
        np.testing.assert_array_equal(targets[positive & ~low_quality].argmax(axis=1),
                                      gt_classes[b][valid][matched])
        # Box targets decode back onto the matched object.
        decoded = box_ops.decode_boxes(assigned["box_targets"][b][positive],
                                       anchors[positive], weights=(1, 1, 1, 1)).numpy()
        assert (numpy_iou(decoded, gt_boxes[b][valid]).max(axis=1) > 0.999).all()
    # Without low-quality matches, an object no anchor covers at IoU 0.5 has no positive.
    tiny_object = np.array([[[0.40, 0.40, 0.48, 0.46]]], np.float32)  # 5 x 4 px
    strict = retinanet.assign_retinanet_targets(anchors, tiny_object, [[2]], NUM_CLASSES,
                                                low_quality_matches=False)
    lenient = retinanet.assign_retinanet_targets(anchors, tiny_object, [[2]], NUM_CLASSES)
    assert numpy_iou(anchors, tiny_object[0]).max() < 0.5
    assert int(tf.reduce_sum(tf.cast(strict["labels"] == 1, tf.int32))) == 0
    assert int(tf.reduce_sum(tf.cast(lenient["labels"] == 1, tf.int32))) >= 1


def test_losses_names_empty_images_and_traced_unknown_batch(batch):
    model = tiny_model()
    assert RetinaNet.LOSS_NAMES == ("loss", "class_loss", "box_loss")
    losses = model.compute_losses(batch)
    assert set(losses) == set(RetinaNet.LOSS_NAMES)
    assert float(losses["loss"]) == pytest.approx(
        float(losses["class_loss"]) + float(losses["box_loss"]), rel=1e-6)
    assert float(losses["box_loss"]) > 0
    # Images with no objects: every anchor is background, the box loss is 0, the class loss
    # is the plain sum (divided by 1).
    empty = {"image": batch["image"][:2], "boxes": np.zeros((2, 4, 4), np.float32),
             "classes": -np.ones((2, 4), np.int32)}
    assigned = model.assign_targets(empty["boxes"], empty["classes"])
    assert (assigned["labels"].numpy() == 0).all()
    empty_losses = model.compute_losses(empty)
    assert all(np.isfinite(float(v)) for v in empty_losses.values())
    assert float(empty_losses["box_loss"]) == 0.0
    logits = model(empty["image"])["class_logits"]
    assert float(empty_losses["class_loss"]) == pytest.approx(
        float(tf.reduce_sum(sigmoid_focal_loss(tf.zeros_like(logits), logits))),
        rel=1e-5)
    # Inside tf.function with the batch size unknown at trace time.
    traced = tf.function(
        lambda images, boxes, classes: model.losses_for(images, boxes, classes, training=True,
                                                        step=tf.constant(0, tf.int64)),
        input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3]), tf.TensorSpec([None, None, 4]),
                         tf.TensorSpec([None, None], tf.int32)])
    for data in (batch, empty):
        assert np.isfinite(float(traced(data["image"], data["boxes"], data["classes"])["loss"]))


def test_decode_keeps_top_k_per_level_then_nms():
    model = tiny_model(pre_nms_top_k=2, max_detections=10)
    num_anchors = sum(model.level_anchor_counts)
    logits = np.full((1, num_anchors, NUM_CLASSES), -10.0, np.float32)
    deltas = np.zeros((1, num_anchors, 4), np.float32)  # boxes = anchors
    # Anchor 4 of a location is ratio 1:1, scale 2^(1/3). Five far-apart P3 locations
    # (no overlap) and one P4 location score high; a sixth P3 one scores below 0.05.
    def p3(row, col):
        return (row * 8 + col) * 9 + 4

    p4 = model.level_anchor_counts[0] + (1 * 4 + 1) * 9 + 4
    chosen = {p3(0, 0): (0.9, 1), p3(0, 4): (0.8, 2), p3(4, 0): (0.7, 3), p3(4, 4): (0.6, 0),
              p3(7, 7): (0.5, 4), p4: (0.85, 0)}
    for anchor, (score, cls) in chosen.items():
        logits[0, anchor, cls] = math.log(score / (1 - score))
    logits[0, p3(2, 2), 1] = math.log(0.04 / 0.96)
    out = {k: v.numpy() for k, v in model.decode(
        {"class_logits": tf.constant(logits), "box_deltas": tf.constant(deltas)}).items()}
    # Only the top 2 of P3 (0.9, 0.8) and the P4 one survive the per-level cut.
    assert out["num_detections"].tolist() == [3]
    np.testing.assert_allclose(out["scores"][0, :3], [0.9, 0.85, 0.8], rtol=1e-5)
    assert out["classes"][0, :3].tolist() == [1, 0, 2]
    np.testing.assert_allclose(out["boxes"][0, :3],
                               np.clip(model.anchors[[p3(0, 0), p4, p3(0, 4)]], 0, 1), atol=1e-6)
    assert (out["classes"][0, 3:] == -1).all() and (out["scores"][0, 3:] == 0).all()
    # With the paper's 1000 all five P3 candidates pass; the 0.04 one never does.
    wide = tiny_model(max_detections=10)
    out = wide.decode({"class_logits": tf.constant(logits), "box_deltas": tf.constant(deltas)})
    assert int(out["num_detections"][0]) == 6
    # Two overlapping candidates of one class: NMS at 0.5 keeps the better one; of two
    # classes: both stay (per-class NMS).
    logits[:] = -10.0
    logits[0, p3(3, 3), 2] = logits[0, p3(3, 3) + 1, 2] = 2.0  # same place, next scale
    logits[0, p3(3, 3) + 1, 2] = 1.0
    logits[0, p3(3, 3) + 1, 3] = 1.5
    out = wide.decode({"class_logits": tf.constant(logits), "box_deltas": tf.constant(deltas)})
    assert sorted(out["classes"][0, :int(out["num_detections"][0])].numpy().tolist()) == [2, 3]


def test_detect_contract_and_fit_reduces_loss(batch, trained):
    model, history = trained
    assert np.isfinite(history).all()
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:3])
    out = model.detect(batch["image"][:3])
    check_detect_contract(out, 3, 10, NUM_CLASSES, min_score=0.05)
    assert out["num_detections"].sum() > 0
    predicted = model.predict(batch["image"][:2], verbose=0)
    np.testing.assert_allclose(predicted["scores"], out["scores"][:2], atol=1e-5)
    assert model.detect(batch["image"][0])["boxes"].shape == (1, 10, 4)
    assert model.detect(np.zeros((1, 40, 50, 3), np.float32))["boxes"].shape == (1, 10, 4)
    assert model.detect(np.zeros((0, SIZE, SIZE, 3), np.float32))["boxes"].shape == (0, 10, 4)


def test_keras_round_trip_gives_identical_outputs(tmp_path, batch, trained):
    model, _ = trained
    path = tmp_path / "retinanet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RetinaNet)
    assert loaded.get_config() == model.get_config()
    expected = model(batch["image"], training=False)
    actual = loaded(batch["image"], training=False)
    assert set(expected) == {"class_logits", "box_deltas"}
    for key in expected:
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())
    decoded, loaded_decoded = model.decode(expected), loaded.decode(actual)
    for key in decoded:
        np.testing.assert_array_equal(loaded_decoded[key].numpy(), decoded[key].numpy())


def test_config_validation_and_from_options():
    config = RetinaNetConfig(num_classes=3)
    assert config.num_anchors_per_location == 9
    assert config.anchor_sizes == retinanet.BASE_ANCHOR_SIZES == (16.0, 32.0, 64.0)
    assert (config.positive_iou, config.negative_iou) == (0.5, 0.4)
    assert (config.focal_alpha, config.focal_gamma, config.prior_probability) == (0.25, 2.0, 0.01)
    assert config.head_depth == 4 and config.pre_nms_top_k == 1000
    assert config.detection_nms_iou == 0.5 and config.score_threshold == 0.05
    model = tiny_model(name="a")
    fields = {f.name for f in dataclasses.fields(RetinaNetConfig)}
    assert set(model.get_config()) == fields | {"name", "trainable", "dtype"}
    assert RetinaNet.from_config(json.loads(json.dumps(model.get_config()))).config == model.config
    with pytest.raises(ValueError, match="classification_loss"):
        RetinaNetConfig(num_classes=3, classification_loss="hinge")
    with pytest.raises(ValueError, match="anchor_sizes"):
        RetinaNetConfig(num_classes=3, max_level=6)  # 4 levels need 4 sizes
    with pytest.raises(ValueError, match="negative_iou"):
        RetinaNetConfig(num_classes=3, negative_iou=0.6)
    with pytest.raises(ValueError, match="prior_probability"):
        RetinaNetConfig(num_classes=3, prior_probability=0.0)
    with pytest.raises(ValueError, match="unknown RetinaNet options"):
        tiny_model(anchor_size=3)
    # train_detector.py's entry point.
    options = SimpleNamespace(image_size=SIZE, backbone="resnet_small", backbone_width=8, seed=3,
                              flip=False, max_detections=7, anchors=5,
                              classification_loss="cross_entropy")
    built = retinanet.from_options(options, 4, ("a", "b", "c", "d"),
                                   np.zeros((10, 4), np.float32))
    assert isinstance(built, RetinaNet)
    assert built.config.anchor_sizes == (8.0, 16.0, 32.0)  # 16, 32, 64 px at 128 -> at 64 px
    assert built.config.classification_loss == "cross_entropy"
    assert built.config.backbone_options == {"filters": [8, 16, 32, 64]}
    assert (built.config.image_size, built.config.max_detections, built.config.seed) == (
        (SIZE, SIZE), 7, 3)
    assert not built.config.flip_augment and built.class_names == ("a", "b", "c", "d")
    assert set(retinanet.TRAIN_DEFAULTS) == {"epochs", "learning_rate", "batch_size",
                                             "warmup_epochs", "time_budget_minutes"}
