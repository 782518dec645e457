"""Tests of SSD (ch05_detection/ssd.py): default boxes, box coding, matching, hard-negative
mining, the loss, and the model on tiny inputs (64 px, width 8)."""

import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from ch05_detection import boxes as box_ops
from ch05_detection import ssd
from common import synthetic
from detection_checks import check_detect_contract  # tests/detection_checks.py

SIZE = 64


def tiny_model(**options):
    settings = dict(image_size=(SIZE, SIZE), backbone="resnet_small",
                    backbone_options={"filters": [8, 16, 32, 64]}, head_filters=16,
                    max_detections=10)
    settings.update(options)
    return ssd.SSD(5, **settings)


def shapes_batch(count, max_boxes=6, start=0):
    images = np.zeros((count, SIZE, SIZE, 3), np.float32)
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    classes = -np.ones((count, max_boxes), np.int32)
    for i in range(count):
        scene = synthetic.make_scene(start + i, "train", image_size=SIZE, min_objects=1)
        n = len(scene["classes"])
        images[i], boxes[i, :n], classes[i, :n] = scene["image"], scene["boxes"], scene["classes"]
    return {"image": images, "boxes": boxes, "classes": classes}


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(8)


@pytest.fixture(scope="module")
def trained(batch):
    """A tiny SSD after 25 steps on one fixed batch."""
    keras.utils.set_random_seed(1)
    model = tiny_model(flip_augment=False)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=1,
                        epochs=25, verbose=0, shuffle=False).history["loss"]
    return model, history


# ----------------------------------------------------------------------------------
# default boxes
# ----------------------------------------------------------------------------------
def test_scales_follow_eq_4():
    # s_k = s_min + (s_max - s_min) / (m - 1) (k - 1); s_(m+1) continues the spacing.
    np.testing.assert_allclose(ssd.default_box_scales(3, 0.2, 0.5), [0.2, 0.35, 0.5, 0.65])
    np.testing.assert_allclose(ssd.default_box_scales(6, 0.2, 0.9),
                               [0.2, 0.34, 0.48, 0.62, 0.76, 0.9, 1.04])  # the paper's six maps
    np.testing.assert_allclose(ssd.default_box_scales(1, 0.3, 0.6), [0.3, 0.6])
    with pytest.raises(ValueError, match="num_levels"):
        ssd.default_box_scales(0)


def test_default_boxes_hand_computed():
    # One 2x2 map, s_1 = 0.5, s_2 = 0.8, ratios (1, 2) + the extra box sqrt(0.4).
    boxes = ssd.default_boxes([(2, 2)], [0.5, 0.8], aspect_ratios=(1.0, 2.0), extra_box=True)
    assert boxes.shape == (2 * 2 * 3, 4)
    tall_h, tall_w = 0.5 * math.sqrt(2), 0.5 / math.sqrt(2)  # height / width = 2, area 0.25
    extra = math.sqrt(0.5 * 0.8)
    cell = lambda cy, cx: [  # noqa: E731
        [cy - 0.25, cx - 0.25, cy + 0.25, cx + 0.25],
        [cy - tall_h / 2, cx - tall_w / 2, cy + tall_h / 2, cx + tall_w / 2],
        [cy - extra / 2, cx - extra / 2, cy + extra / 2, cx + extra / 2]]
    # Location-major (row, then column), then the 3 boxes of the cell.
    expected = cell(0.25, 0.25) + cell(0.25, 0.75) + cell(0.75, 0.25) + cell(0.75, 0.75)
    np.testing.assert_allclose(boxes, expected, atol=1e-6)


def test_default_boxes_agree_with_the_anchor_generator():
    # The s_k boxes of a map are anchors of scale s_k * image at stride image / f.
    levels = ssd.default_boxes([(4, 4), (2, 2)], [0.25, 0.5, 0.75], aspect_ratios=(1.0, 2.0, 0.5),
                               extra_box=True, per_level=True)
    for level, (f, scale) in enumerate([(4, 0.25), (2, 0.5)]):
        reference = anchor_ops.generate_anchors(
            f, f, 64 / f, scales=[scale * 64], aspect_ratios=(1.0, 2.0, 0.5), image_height=64,
            image_width=64, normalized=True).numpy().reshape(f, f, 3, 4)
        np.testing.assert_allclose(levels[level][:, :, :3], reference, atol=1e-6)


# ----------------------------------------------------------------------------------
# box coding
# ----------------------------------------------------------------------------------
def test_box_coding_with_variances_equals_weights_10_10_5_5():
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.2, 0.8, (20, 2))
    sizes = rng.uniform(0.05, 0.4, (20, 2))
    gt = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1).astype(np.float32)
    defaults = np.roll(gt, 3, axis=0) * 0.9 + 0.05
    # The SSD formula written out with its variances (0.1, 0.1, 0.2, 0.2).
    def center_size(b):
        height, width = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, height, width
    gy, gx, gh, gw = center_size(gt.astype(np.float64))
    dy, dx, dh, dw = center_size(defaults.astype(np.float64))
    expected = np.stack([(gy - dy) / dh / 0.1, (gx - dx) / dw / 0.1,
                         np.log(gh / dh) / 0.2, np.log(gw / dw) / 0.2], 1)
    ours = ssd.encode_ssd_boxes(gt, defaults).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ours, box_ops.encode_boxes(gt, defaults, weights=(10, 10, 5, 5)).numpy(), atol=1e-6)
    assert ssd.variances_to_weights() == (10.0, 10.0, 5.0, 5.0)
    # Keras's encoder with the same variances (an independent implementation).
    keras_deltas = keras.utils.bounding_boxes.encode_box_to_deltas(
        defaults, gt, anchor_format="yxyx", box_format="yxyx", encoding_format="center_yxhw",
        variance=[0.1, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(ours, np.asarray(keras_deltas), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ssd.decode_ssd_boxes(ours, defaults).numpy(), gt, atol=1e-5)


# ----------------------------------------------------------------------------------
# matching
# ----------------------------------------------------------------------------------
def test_matching_best_box_then_iou_half():
    defaults = np.array([[0.0, 0.0, 0.5, 0.5],      # 0: IoU 1 with object A
                         [0.0, 0.1, 0.5, 0.6],      # 1: IoU 0.667 with A
                         [0.0, 0.25, 0.5, 0.75],    # 2: IoU 1/3 with A
                         [0.6, 0.6, 0.7, 0.7],      # 3: IoU 0.25 with B, its best
                         [0.6, 0.6, 0.65, 0.65]],   # 4: IoU 0.0625 with B
                        np.float32)
    gt = np.array([[[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.8, 0.8], [0, 0, 0, 0]]], np.float32)
    classes = np.array([[2, 4, -1]], np.int32)
    out = ssd.assign_ssd_targets(defaults, gt, classes)
    # Box 3 is below 0.5 but is object B's best box: positive ("each ground truth box to the
    # default box with the best jaccard overlap").
    np.testing.assert_array_equal(out["positive"].numpy()[0], [True, True, False, True, False])
    np.testing.assert_array_equal(out["negative"].numpy()[0], [False, False, True, False, True])
    np.testing.assert_array_equal(out["class_targets"].numpy()[0], [3, 3, 0, 5, 0])
    np.testing.assert_allclose(out["matched_iou"].numpy()[0], [1, 2 / 3, 1 / 3, 0.25, 0.0625],
                               atol=1e-6)
    expected = ssd.encode_ssd_boxes(gt[0, [0, 0, 1]], defaults[[0, 1, 3]]).numpy()
    np.testing.assert_allclose(out["box_targets"].numpy()[0, [0, 1, 3]], expected, atol=1e-5)
    np.testing.assert_array_equal(out["box_targets"].numpy()[0, [2, 4]], 0.0)
    # An image with no objects: everything negative, nothing to regress.
    empty = ssd.assign_ssd_targets(defaults, np.zeros((1, 3, 4), np.float32),
                                   -np.ones((1, 3), np.int32))
    assert not empty["positive"].numpy().any() and empty["negative"].numpy().all()
    np.testing.assert_array_equal(empty["class_targets"].numpy(), 0)


# ----------------------------------------------------------------------------------
# hard-negative mining
# ----------------------------------------------------------------------------------
def reference_mining(loss, positive, negative, ratio=3, minimum=3):
    """Python reference: sort the negatives by (-loss, index), keep the first n."""
    kept = np.zeros_like(negative)
    for b in range(loss.shape[0]):
        candidates = sorted(np.flatnonzero(negative[b]), key=lambda i: (-loss[b, i], i))
        count = min(max(int(ratio * positive[b].sum()), minimum), len(candidates))
        kept[b, candidates[:count]] = True
    return kept


def test_mining_keeps_the_top_loss_negatives_three_per_positive():
    loss = np.array([
        # one positive (index 0, huge loss: must never count as a negative) -> 3 negatives
        [9.0, 0.1, 0.8, 0.3, 0.9, 0.7, 0.2, 0.6, 0.5, 0.4],
        # two positives -> 6 negatives; the cut falls inside a tie of 0.5 (indices 3, 5, 7, 8):
        # the lower indices 3 and 5 are kept, exactly 6 in all
        [0.1, 0.9, 0.5, 0.5, 0.8, 0.5, 0.7, 0.5, 0.5, 0.6],
        # no positives -> the minimum, 3 negatives
        [0.0, 0.3, 0.3, 0.9, 0.1, 0.2, 0.3, 0.0, 0.8, 0.1],
        # three positives but only 4 negatives -> all 4
        [0.5, 0.5, 0.5, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0],
    ], np.float32)
    positive = np.zeros_like(loss, bool)
    positive[0, 0] = True
    positive[1, [0, 2]] = True
    positive[3, [0, 1, 2]] = True
    negative = ~positive
    negative[3, 7:] = False  # e.g. not labelled (neither positive nor negative)
    kept = ssd.mine_hard_negatives(loss, positive, negative, negative_ratio=3.0,
                                   min_negatives=3).numpy()
    expected = np.zeros_like(kept)
    expected[0, [4, 2, 5]] = True
    expected[1, [1, 4, 6, 9, 3, 5]] = True
    expected[2, [3, 8, 1]] = True  # 0.9, 0.8, then the first of the three 0.3s
    expected[3, [3, 4, 5, 6]] = True
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(kept, reference_mining(loss, positive, negative))
    np.testing.assert_array_equal(kept.sum(1), [3, 6, 3, 4])
    # The floor is an option: without it an image with no objects trains nothing.
    none = ssd.mine_hard_negatives(loss, positive, negative, min_negatives=0).numpy()
    assert none[2].sum() == 0 and none[0].sum() == 3


def test_mining_matches_the_reference_on_random_losses():
    rng = np.random.default_rng(3)
    loss = np.round(rng.uniform(0, 2, (6, 200)), 1).astype(np.float32)  # many ties
    positive = rng.uniform(size=(6, 200)) < rng.uniform(0, 0.1, (6, 1))
    negative = ~positive & (rng.uniform(size=(6, 200)) < 0.9)
    for ratio, minimum in [(3.0, 3), (1.5, 0), (3.0, 50)]:
        kept = ssd.mine_hard_negatives(loss, positive, negative, ratio, minimum).numpy()
        np.testing.assert_array_equal(
            kept, reference_mining(loss, positive, negative, ratio, minimum))


# ----------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------
def test_loss_by_hand():
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]],
                      np.float32)
    offsets = np.array([[[0.5, 0, 0, 0], [2.0, -1.0, 0, 0], [9, 9, 9, 9], [9, 9, 9, 9]]],
                       np.float32)
    class_targets = np.array([[1, 2, 0, 0]])
    box_targets = np.zeros((1, 4, 4), np.float32)
    positive = np.array([[True, True, False, False]])
    mined = np.array([[False, False, True, False]])
    class_loss, box_loss = ssd.ssd_loss(logits, offsets, class_targets, box_targets, positive,
                                        mined)

    def cross_entropy(row, label):
        return -row[label] + np.log(np.exp(row).sum())
    expected_class = (cross_entropy(logits[0, 0], 1) + cross_entropy(logits[0, 1], 2)
                      + cross_entropy(logits[0, 2], 0)) / 2  # box 3 neither positive nor mined
    # smooth L1 (beta 1): 0.5 * 0.5² for box 0; (2 - 0.5) + (1 - 0.5) for box 1
    expected_box = (0.125 + 1.5 + 0.5) / 2
    np.testing.assert_allclose(float(class_loss), expected_class, rtol=1e-5)
    np.testing.assert_allclose(float(box_loss), expected_box, rtol=1e-5)
    # No positives: divided by 1, still finite.
    class_loss, box_loss = ssd.ssd_loss(logits, offsets, np.zeros((1, 4)), box_targets,
                                        np.zeros((1, 4), bool), mined)
    np.testing.assert_allclose(float(class_loss), cross_entropy(logits[0, 2], 0), rtol=1e-5)
    assert float(box_loss) == 0.0


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
def test_output_shapes_and_default_boxes(batch):
    model = tiny_model()
    assert model.feature_sizes == [(8, 8), (4, 4), (2, 2)]
    assert model.boxes_per_location == 4
    num_boxes = (64 + 16 + 4) * 4
    assert model.default_boxes.shape == (num_boxes, 4)
    out = model(batch["image"][:3])
    assert out["class_logits"].shape == (3, num_boxes, 6)
    assert out["box_offsets"].shape == (3, num_boxes, 4)
    levels = ssd.default_boxes_per_level(model)
    assert [level["boxes"].shape for level in levels] == [(8, 8, 4, 4), (4, 4, 4, 4),
                                                          (2, 2, 4, 4)]
    np.testing.assert_allclose([level["scale"] for level in levels], [0.2, 0.35, 0.5])
    assert [level["stride"] for level in levels] == [8.0, 16.0, 32.0]
    np.testing.assert_allclose(levels[2]["extra_scale"], math.sqrt(0.5 * 0.65))
    np.testing.assert_array_equal(
        np.concatenate([level["boxes"].reshape(-1, 4) for level in levels]), model.default_boxes)
    # The paper's extra feature layer: one more map at stride 64 (1x1 on 64 px).
    extra = tiny_model(extra_levels=1, extra_filters=16)
    assert extra.feature_sizes[-1] == (1, 1)
    assert extra(batch["image"][:1])["class_logits"].shape == (1, num_boxes + 4, 6)
    # The paper's head: the predictors straight on the maps (the stride-32 map has 8w = 64
    # channels), instead of on the 16 channels of a head convolution.
    plain = tiny_model(head_convs=0)
    assert not plain.level_heads and plain.class_predictors[2].kernel.shape[2] == 64
    assert model.class_predictors[2].kernel.shape[2] == 16
    assert plain(batch["image"][:1])["box_offsets"].shape == (1, num_boxes, 4)


def test_detect_contract(batch, trained):
    model, _ = trained
    out = model.detect(batch["image"][:3])
    check_detect_contract(out, 3, 10, 5, boxes_in_image=True)


def test_train_steps_reduce_loss_on_a_fixed_batch(batch, trained):
    model, history = trained
    assert np.all(np.isfinite(history))
    assert np.mean(history[-3:]) < 0.6 * np.mean(history[:3]), history
    # After fitting one batch, its objects are found at IoU >= 0.5 with the right class. (With
    # BatchNorm's batch statistics, as in training: 25 steps are too few for its moving averages.)
    out = {k: v.numpy() for k, v in model.decode(model(batch["image"], training=True)).items()}
    found = total = 0
    for i in range(len(batch["image"])):
        valid = batch["classes"][i] >= 0
        n = int(out["num_detections"][i])
        iou = box_ops.pairwise_iou(batch["boxes"][i][valid], out["boxes"][i, :n]).numpy()
        same = batch["classes"][i][valid][:, None] == out["classes"][i, :n][None]
        found += int(((iou >= 0.5) & same).any(axis=1).sum())
        total += int(valid.sum())
    assert found >= 0.8 * total, (found, total)


def test_empty_images_give_finite_losses(batch):
    model = tiny_model()
    empty = {"image": batch["image"][:2], "boxes": np.zeros((2, 4, 4), np.float32),
             "classes": -np.ones((2, 4), np.int32)}
    losses = {k: float(v) for k, v in model.compute_losses(empty).items()}
    assert set(losses) == set(ssd.SSD.LOSS_NAMES)
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["box_loss"] == 0.0 and losses["class_loss"] > 0.0  # the mined background
    # One image with objects and one without, inside a traced function with unknown batch.
    mixed = {k: np.concatenate([batch[k][:1], empty[k][:1, :, ...]], 0) if k == "image"
             else np.concatenate([batch[k][:1, :4], empty[k][:1]], 0) for k in empty}
    spec = {"image": tf.TensorSpec([None, SIZE, SIZE, 3]), "boxes": tf.TensorSpec([None, 4, 4]),
            "classes": tf.TensorSpec([None, 4], tf.int32)}
    traced = tf.function(lambda b: model.compute_losses(b, training=True), input_signature=[spec])
    assert all(np.isfinite(float(v)) for v in traced(mixed).values())


def test_matched_and_mined_for_one_image(batch):
    model = tiny_model()
    result = ssd.matched_and_mined(model, batch, index=1)
    positives = len(result["positive_boxes"])
    assert positives >= len(result["gt_boxes"]) >= 1  # every object has a positive
    assert len(result["negative_boxes"]) == min(3 * positives, result["num_negatives"])
    assert (np.diff(result["negative_losses"]) <= 1e-6).all()
    iou = box_ops.pairwise_iou(result["positive_boxes"], result["gt_boxes"]).numpy()
    assert (iou.max(1) == result["positive_iou"]).all()
    assert set(result["positive_classes"]) <= set(result["gt_classes"])
    # One unbatched example works too; an empty one has 3 (the minimum) mined negatives.
    single = {"image": batch["image"][0], "boxes": np.zeros((0, 4), np.float32),
              "classes": np.zeros((0,), np.int32)}
    empty = ssd.matched_and_mined(model, single)
    assert len(empty["positive_boxes"]) == 0 and len(empty["negative_boxes"]) == 3


def test_keras_round_trip_gives_identical_outputs(tmp_path, batch, trained):
    model, _ = trained
    path = tmp_path / "ssd.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ssd.SSD) and loaded.config == model.config
    for key, value in model(batch["image"][:2]).items():
        np.testing.assert_allclose(loaded(batch["image"][:2])[key].numpy(), value.numpy(),
                                   atol=1e-5)
    np.testing.assert_array_equal(loaded.default_boxes, model.default_boxes)
    a, b = model.detect(batch["image"][:2]), loaded.detect(batch["image"][:2])
    np.testing.assert_array_equal(a["classes"], b["classes"])
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-5)


def test_config_validation_and_from_options():
    for bad, match in [({"feature_strides": (16, 8)}, "feature_strides"),
                       ({"feature_strides": (8, 64)}, "feature_strides"),
                       ({"min_scale": 0.6, "max_scale": 0.5}, "min_scale"),
                       ({"aspect_ratios": ()}, "aspect_ratios"),
                       ({"negative_ratio": -1}, "negative_ratio"),
                       ({"min_negatives": -1}, "min_negatives"),
                       ({"box_variances": (0.1, 0.1, 0.2)}, "box_variances"),
                       ({"positive_iou": 0.0}, "positive_iou"),
                       ({"extra_levels": -1}, "extra_levels"),
                       ({"head_convs": -1}, "head_convs"),
                       ({"unknown_option": 1}, "unknown")]:
        with pytest.raises(ValueError, match=match):
            ssd.SSD(5, **bad)
    options = SimpleNamespace(image_size=SIZE, backbone="resnet_small", backbone_width=8, seed=3,
                              flip=False, max_detections=7, anchors=5,
                              classification_loss="focal")
    model = ssd.from_options(options, 5, synthetic.CLASS_NAMES, np.zeros((4, 4), np.float32))
    assert model.config.image_size == (SIZE, SIZE) and model.config.max_detections == 7
    assert model.config.backbone_options == {"filters": [8, 16, 32, 64]}
    assert model.class_names == synthetic.CLASS_NAMES and not model.config.flip_augment
    assert set(ssd.TRAIN_DEFAULTS) >= {"epochs", "learning_rate", "batch_size", "warmup_epochs",
                                       "time_budget_minutes"}
