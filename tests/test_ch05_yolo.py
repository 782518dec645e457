"""Tests of YOLO v1 and YOLO with anchors (ch05_detection/yolo.py).

The references: losses computed by hand on 2 x 2 grids (the numbers are in the comments), IoUs
of box shapes worked out on paper, cluster means computed directly with NumPy, and the model's
own outputs before and after a save/load round trip.
"""

import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import yolo
from ch05_detection.yolo import YOLO, YOLOConfig
from common import synthetic
from detection_checks import check_detect_contract  # tests/detection_checks.py

SIZE = 64  # 64 px at stride 16: a 4 x 4 grid of 16 px cells
TINY = dict(image_size=(SIZE, SIZE), backbone="resnet_small", output_stride=16,
            backbone_options={"filters": [8, 16, 32, 64]}, head_filters=16, max_detections=10)


def logit(p):
    return math.log(p / (1.0 - p))


def shapes_batch(count, max_boxes=6, start=0):
    images = np.zeros((count, SIZE, SIZE, 3), np.float32)
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    classes = -np.ones((count, max_boxes), np.int32)
    for i in range(count):
        scene = synthetic.make_scene(start + i, "train", image_size=SIZE)
        n = len(scene["classes"])
        images[i], boxes[i, :n], classes[i, :n] = scene["image"], scene["boxes"], scene["classes"]
    return {"image": images, "boxes": boxes, "classes": classes}


# ----------------------------------------------------------------------------------
# YOLO v1: the loss by hand on a 2 x 2 grid, B = 2, C = 2
# ----------------------------------------------------------------------------------
# The object: centre (0.3, 0.3) in cell (0, 0) (cells are 0.5 wide), height 0.36, width 0.16.
OBJECT = [0.12, 0.22, 0.48, 0.38]
# Predictor "good": centre offset (0.5, 0.5) -> (0.25, 0.25), sqrt w 0.4, sqrt h 0.6 (the
# object's size). Its box [0.07, 0.17, 0.43, 0.33] meets the object on 0.31 x 0.11 = 0.0341,
# union 2 x 0.0576 - 0.0341 = 0.0811: IoU 0.42047.
GOOD_IOU = 0.0341 / 0.0811
# Predictor "tiny": same centre, sqrt sizes 0.05: IoU 0.0025² / 0.0576 ~ 1e-4 < GOOD_IOU.


def v1_predictions(good_slot=0):
    """[1, 2, 2, 12] logits: every value sigmoid 0.5 / softmax uniform, except cell (0, 0)."""
    raw = np.zeros((1, 2, 2, 2 * 5 + 2), np.float32)
    good = [0.0, 0.0, logit(0.4), logit(0.6), 0.0]  # x, y, sqrt w, sqrt h, confidence (0.5)
    tiny = [0.0, 0.0, logit(0.05), logit(0.05), 0.0]
    raw[0, 0, 0, 5 * good_slot:5 * good_slot + 5] = good
    raw[0, 0, 0, 5 * (1 - good_slot):5 * (1 - good_slot) + 5] = tiny
    return tf.constant(raw)


# Hand-computed terms of the one-object case.
V1_BOX = 5.0 * ((0.5 - 0.6) ** 2 + (0.5 - 0.6) ** 2 + 0.0 + 0.0)  # offsets 0.6 = 0.3 * 2
V1_OBJECT = (0.5 - GOOD_IOU) ** 2  # the confidence target is the IoU (the paper)
V1_NO_OBJECT = 0.5 * 7 * 0.5 ** 2  # the other 7 predictors of the 4 cells
V1_CLASS = 2 * 0.5 ** 2  # (0.5 - 1)² + (0.5 - 0)²


def v1_loss(raw, boxes, classes, **options):
    losses = yolo.yolo_v1_loss(raw, np.asarray([boxes], np.float32),
                               np.asarray([classes], np.int32), boxes_per_cell=2, **options)
    return {name: float(value) for name, value in losses.items()}


@pytest.mark.parametrize("good_slot", [0, 1])
def test_v1_loss_one_object_by_hand(good_slot):
    raw = v1_predictions(good_slot)
    losses = v1_loss(raw, [OBJECT, [0, 0, 0, 0]], [1, -1])  # a padding row
    assert losses["box_loss"] == pytest.approx(V1_BOX, rel=1e-5)
    assert losses["object_loss"] == pytest.approx(V1_OBJECT, rel=1e-4)
    assert losses["no_object_loss"] == pytest.approx(V1_NO_OBJECT, rel=1e-5)
    assert losses["class_loss"] == pytest.approx(V1_CLASS, rel=1e-5)
    assert losses["loss"] == pytest.approx(V1_BOX + V1_OBJECT + V1_NO_OBJECT + V1_CLASS, rel=1e-5)
    # The predictor with the highest IoU is responsible, wherever it sits in the cell.
    parts = yolo.split_v1_predictions(raw, 2)
    target = yolo.yolo_v1_targets(yolo.decode_v1_boxes(parts, (2, 2)), [[OBJECT]], [[1]], (2, 2))
    expected = np.zeros((1, 4, 2), bool)
    expected[0, 0, good_slot] = True
    np.testing.assert_array_equal(target["responsible"].numpy(), expected)
    np.testing.assert_allclose(target["iou"].numpy()[0, 0, good_slot], GOOD_IOU, rtol=1e-4)
    # "one" as the confidence target: (0.5 - 1)².
    assert v1_loss(raw, [OBJECT], [1], confidence_target="one")["object_loss"] == \
        pytest.approx(0.25, rel=1e-5)


def test_v1_two_objects_in_one_cell_keep_the_larger():
    # A smaller object (area 0.04 < 0.0576), centre (0.2, 0.2): also in cell (0, 0).
    small = [0.1, 0.1, 0.3, 0.3]
    raw = v1_predictions()
    alone = v1_loss(raw, [OBJECT], [1])
    for boxes, classes, larger in [([OBJECT, small], [1, 0], 0), ([small, OBJECT], [0, 1], 1)]:
        both = v1_loss(raw, boxes, classes)
        # v1 learns one object per cell: the larger, in either order; the smaller is lost.
        for name in alone:
            assert both[name] == pytest.approx(alone[name], rel=1e-6), name
        parts = yolo.split_v1_predictions(raw, 2)
        target = yolo.yolo_v1_targets(yolo.decode_v1_boxes(parts, (2, 2)), [boxes], [classes],
                                      (2, 2))
        assert target["object_index"].numpy().tolist() == [[larger, -1, -1, -1]]
        assert target["classes"].numpy().tolist() == [[1, -1, -1, -1]]
    # Without the larger one the cell learns the smaller (the loss does see it).
    assert v1_loss(raw, [small], [0])["box_loss"] != pytest.approx(alone["box_loss"])


def test_v1_empty_image_only_the_no_object_term():
    raw = tf.zeros((1, 2, 2, 12))
    losses = v1_loss(raw, [[0.2, 0.2, 0.4, 0.4]], [-1])  # only a padding row
    assert losses["no_object_loss"] == pytest.approx(0.5 * 8 * 0.25, rel=1e-6)  # 8 predictors
    for name in ("box_loss", "object_loss", "class_loss"):
        assert losses[name] == 0.0
    assert losses["loss"] == pytest.approx(1.0, rel=1e-6)


def test_v1_scores_are_class_probability_times_confidence():
    raw = v1_predictions(0)
    boxes, scores = yolo.v1_boxes_and_scores(raw, 2)
    assert boxes.shape == (1, 8, 4) and scores.shape == (1, 8, 2)
    np.testing.assert_allclose(boxes.numpy()[0, 0], [0.07, 0.17, 0.43, 0.33], atol=1e-6)
    # Other cells: centre of cell (1, 1) at (0.75, 0.75), size 0.5² = 0.25.
    np.testing.assert_allclose(boxes.numpy()[0, 6], [0.625, 0.625, 0.875, 0.875], atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), 0.5 * 0.5, atol=1e-6)  # 0.5 confidence x 0.5


# ----------------------------------------------------------------------------------
# YOLO with anchors: assignment and loss by hand
# ----------------------------------------------------------------------------------
ANCHORS = [(0.4, 0.2), (0.2, 0.4)]  # a tall and a wide shape


def anchor_loss(raw, boxes, classes, **options):
    losses = yolo.yolo_anchor_loss(raw, np.asarray([boxes], np.float32),
                                   np.asarray([classes], np.int32), ANCHORS, **options)
    return {name: float(value) for name, value in losses.items()}


def test_anchor_loss_one_object_by_hand():
    # All logits 0 on a 2 x 2 grid, 2 anchors, 3 classes. The object (h 0.36, w 0.16) fits the
    # tall anchor best: IoU 0.0576 / 0.08 = 0.72 against 0.032 / 0.1056 = 0.303.
    raw = tf.zeros((1, 2, 2, 2 * (5 + 3)))
    losses = anchor_loss(raw, [OBJECT], [2], ignore_iou=1.0)
    box = 5.0 * (0.1 ** 2 + 0.1 ** 2 + math.log(0.36 / 0.4) ** 2 + math.log(0.16 / 0.2) ** 2)
    assert losses["box_loss"] == pytest.approx(box, rel=1e-5)
    assert losses["object_loss"] == pytest.approx(math.log(2.0), rel=1e-6)  # BCE(0.5, 1)
    assert losses["no_object_loss"] == pytest.approx(0.5 * 7 * math.log(2.0), rel=1e-6)
    assert losses["class_loss"] == pytest.approx(math.log(3.0), rel=1e-6)  # uniform softmax
    # The wide anchor of cell (0, 0) predicts [0.15, 0.05, 0.35, 0.45]: IoU 0.032 / 0.1056 =
    # 0.303 with the object. At ignore_iou 0.3 it is no longer a negative (6 remain).
    ignored = anchor_loss(raw, [OBJECT], [2], ignore_iou=0.3)
    assert ignored["no_object_loss"] == pytest.approx(0.5 * 6 * math.log(2.0), rel=1e-6)
    target = yolo.yolo_anchor_targets([[OBJECT]], [[2]], ANCHORS, (2, 2))
    assert np.argwhere(target["positive"].numpy()).tolist() == [[0, 0, 0]]


def test_anchor_empty_image_only_the_no_object_term():
    raw = tf.zeros((1, 2, 2, 2 * (5 + 3)))
    losses = anchor_loss(raw, np.zeros((3, 4)), [-1, -1, -1])
    assert losses["no_object_loss"] == pytest.approx(0.5 * 8 * math.log(2.0), rel=1e-6)
    for name in ("box_loss", "object_loss", "class_loss"):
        assert losses[name] == 0.0


# Two objects whose centres both lie in cell (1, 1) of a 4 x 4 grid ([0.25, 0.5) a side): a
# tall bar (class 0) and a wide bar (class 1), crossing like a plus sign.
TALL = [0.16, 0.31, 0.66, 0.50]  # centre (0.41, 0.405), 0.50 x 0.19
WIDE = [0.33, 0.16, 0.50, 0.66]  # centre (0.415, 0.41), 0.17 x 0.50
BAR_ANCHORS = [(0.5, 0.2), (0.2, 0.5), (0.3, 0.3)]


def test_two_shapes_in_one_cell_go_to_different_anchors():
    target = yolo.yolo_anchor_targets([[TALL, WIDE]], [[0, 1]], BAR_ANCHORS, (4, 4))
    # Cell (1, 1) is cell 5: the tall bar on the tall anchor, the wide bar on the wide one.
    assert np.argwhere(target["positive"].numpy()).tolist() == [[0, 5, 0], [0, 5, 1]]
    assert target["object_index"].numpy()[0, 5].tolist() == [0, 1, -1]
    assert target["classes"].numpy()[0, 5].tolist() == [0, 1, -1]
    # v1 keeps one of them: the larger, the tall bar (0.095 > 0.085).
    predicted = tf.zeros((1, 16, 2, 4))
    v1_target = yolo.yolo_v1_targets(predicted, [[TALL, WIDE]], [[0, 1]], (4, 4))
    assert v1_target["object_index"].numpy()[0, 5] == 0
    assert v1_target["has_object"].numpy().sum() == 1


def two_bars_image():
    image = np.full((SIZE, SIZE, 3), 0.5, np.float32)
    for box, colour in [(TALL, (0.9, 0.1, 0.1)), (WIDE, (0.1, 0.2, 0.9))]:
        top, left, bottom, right = (np.array(box) * SIZE).round().astype(int)
        image[top:bottom, left:right] = colour
    return image


def two_bars_batch():
    """The two-bar image twice (TF 2.21's oneDNN kernels crash on the filter gradient of a
    strided 1x1 convolution for a static batch of one)."""
    return {"image": np.stack([two_bars_image()] * 2),
            "boxes": np.array([[TALL, WIDE, [0, 0, 0, 0]]] * 2, np.float32),
            "classes": np.array([[0, 1, -1]] * 2, np.int32)}


def _iou(a, b):
    height = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    width = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = height * width
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union


def best_match(detections, box, class_id, min_score=0.2):
    """IoU of the best detection of `class_id` (score >= min_score) with `box` (0 when none)."""
    n = detections["num_detections"][0]
    ious = [_iou(found, box) for found, found_class, score in zip(
        detections["boxes"][0, :n], detections["classes"][0, :n], detections["scores"][0, :n])
        if found_class == class_id and score >= min_score]
    return max(ious, default=0.0)


@pytest.fixture(scope="module", params=[None, BAR_ANCHORS], ids=["v1", "anchors"])
def trained(request):
    """A tiny 2-class model after 60 steps of fit on the two-bar image, and its loss history."""
    keras.utils.set_random_seed(0)
    model = YOLO(2, **{**TINY, "anchors": request.param, "flip_augment": False,
                       "score_threshold": 0.2})
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensors(two_bars_batch()).repeat(),
                        steps_per_epoch=10, epochs=6, verbose=0).history
    return model, history


def test_anchors_learn_both_objects_of_one_cell_v1_only_one(trained):
    model, _ = trained
    images = two_bars_batch()["image"]
    # Decoded with the batch's own BatchNorm statistics: after 60 steps the moving averages
    # (momentum 0.99) are still far from them, and what is tested is what the weights learnt.
    detections = {k: v.numpy() for k, v in model.decode(model(images, training=True)).items()}
    assert best_match(detections, TALL, 0) > 0.6
    if model.uses_anchors:
        assert best_match(detections, WIDE, 1) > 0.6  # both, on two anchors of one cell
    else:
        assert best_match(detections, WIDE, 1) == 0.0  # v1: the wide bar is never learnt


# ----------------------------------------------------------------------------------
# k-means anchors
# ----------------------------------------------------------------------------------
def test_mean_best_iou_by_hand():
    # (0.2, 0.2) fits the anchor exactly; (0.4, 0.1): 0.02 / (0.04 + 0.04 - 0.02) = 1/3.
    boxes = np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.6]])
    assert yolo.mean_best_iou(boxes, [[0.2, 0.2]]) == pytest.approx((1 + 1 / 3) / 2)
    assert yolo.mean_best_iou(boxes, [[0.2, 0.2], [0.4, 0.1]]) == pytest.approx(1.0)


def test_kmeans_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.1, 0.1], [0.4, 0.2], [0.2, 0.5]])  # (h, w)
    labels = rng.integers(0, 3, 300)
    shapes = centres[labels] * rng.uniform(0.95, 1.05, (300, 2))
    boxes = np.concatenate([np.full((300, 2), 0.25), 0.25 + shapes], axis=1)  # yxyx
    anchors = yolo.kmeans_anchors(boxes, 3, seed=0)
    assert anchors.shape == (3, 2) and anchors.dtype == np.float32
    # The cluster means, computed directly from the planted labels, sorted by area.
    means = np.stack([shapes[labels == c].mean(axis=0) for c in range(3)])
    means = means[np.argsort(means[:, 0] * means[:, 1])]
    np.testing.assert_allclose(anchors, means, rtol=1e-5)
    assert yolo.mean_best_iou(boxes, anchors) > 0.9
    # k = 1: the mean shape.
    np.testing.assert_allclose(yolo.kmeans_anchors(boxes, 1), shapes.mean(axis=0)[None], rtol=1e-5)


def test_kmeans_beats_hand_picked_on_shapes_and_is_a_fixed_point():
    boxes = np.concatenate([synthetic.make_scene(i, "train", image_size=128)["boxes"]
                            for i in range(150)])
    anchors = yolo.kmeans_anchors(boxes, 5, seed=3)
    np.testing.assert_array_equal(anchors, yolo.kmeans_anchors(boxes, 5, seed=3))
    assert yolo.mean_best_iou(boxes, anchors) > yolo.mean_best_iou(boxes,
                                                                  yolo.hand_picked_anchors(5))
    # Lloyd's fixed point: every anchor is the mean of the boxes nearest to it (by IoU).
    shapes = boxes[:, 2:] - boxes[:, :2]
    nearest = yolo.shape_iou(shapes, anchors).argmax(axis=1)
    for k in range(5):
        np.testing.assert_allclose(anchors[k], shapes[nearest == k].mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        yolo.kmeans_anchors(boxes[:3], 5)


# ----------------------------------------------------------------------------------
# the model: shapes, contract, saving, training
# ----------------------------------------------------------------------------------
def test_config_validation_names_the_option():
    for options, name in [({"anchors": [(0.0, 0.2)]}, "anchors"), ({"anchors": 0}, "anchors"),
                          ({"boxes_per_cell": 0}, "boxes_per_cell"),
                          ({"lambda_noobj": -1}, "lambda_noobj"),
                          ({"confidence_target": "half"}, "confidence_target"),
                          ({"ignore_iou": 1.5}, "ignore_iou")]:
        with pytest.raises(ValueError, match=name):
            YOLOConfig(5, **options)
    assert YOLOConfig(5, anchors=3).anchors == tuple(map(tuple, yolo.hand_picked_anchors(3)
                                                         .tolist()))


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(4)


def test_output_shapes(trained, batch):
    model, _ = trained
    predictions = model(batch["image"][:3])["predictions"]
    channels = 3 * (5 + 2) if model.uses_anchors else 2 * 5 + 2
    assert predictions.shape == (3, 4, 4, channels)
    boxes, scores = model.boxes_and_scores({"predictions": predictions})
    assert boxes.shape == (3, 16 * model.num_anchors, 4)
    assert scores.shape == (3, 16 * model.num_anchors, 2)


def test_fit_reduces_the_loss(trained):
    _, history = trained
    assert set(YOLO.LOSS_NAMES) <= set(history)
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def check_contract(out, count):
    check_detect_contract(out, count, 10, 2, min_score=0.2, boxes_in_image=True)  # 0.2: the threshold


def test_detect_contract(trained, batch):
    model, _ = trained
    out = model.detect(batch["image"][:3])
    check_contract(out, 3)
    np.testing.assert_allclose(model.predict(batch["image"][:3], verbose=0)["scores"],
                               out["scores"], atol=1e-5)
    # With the batch's BatchNorm statistics the model finds the bars: real rows, then padding.
    images = two_bars_batch()["image"]
    decoded = {k: v.numpy() for k, v in model.decode(model(images, training=True)).items()}
    assert 0 < decoded["num_detections"][0] < 10
    check_contract(decoded, 2)
    assert model.detect(images[0])["boxes"].shape == (1, 10, 4)  # one [H, W, 3] image


def test_save_and_load_give_identical_outputs(tmp_path, trained, batch):
    model, _ = trained
    path = tmp_path / "yolo.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, YOLO) and loaded.config == model.config
    np.testing.assert_array_equal(loaded(batch["image"][:2])["predictions"].numpy(),
                                  model(batch["image"][:2])["predictions"].numpy())
    np.testing.assert_array_equal(loaded.detect(batch["image"][:2])["boxes"],
                                  model.detect(batch["image"][:2])["boxes"])


def test_empty_images_give_finite_losses_in_a_traced_step(trained):
    model, _ = trained
    # Batch size unknown at trace time; no object in any image.
    step = tf.function(lambda images, boxes, classes: model.compute_losses(
        {"image": images, "boxes": boxes, "classes": classes}, training=True),
        input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3]), tf.TensorSpec([None, 4, 4]),
                         tf.TensorSpec([None, 4], tf.int32)])
    losses = step(tf.zeros((2, SIZE, SIZE, 3)), tf.zeros((2, 4, 4)), -tf.ones((2, 4), tf.int32))
    assert set(losses) == set(YOLO.LOSS_NAMES)
    assert all(np.isfinite(float(value)) for value in losses.values())
    assert float(losses["box_loss"]) == 0.0 and float(losses["class_loss"]) == 0.0
    assert float(losses["no_object_loss"]) > 0.0


def test_from_options_builds_both_models(capsys):
    boxes = np.concatenate([synthetic.make_scene(i, "train", image_size=SIZE)["boxes"]
                            for i in range(40)])
    options = SimpleNamespace(model="yolo", image_size=SIZE, backbone="resnet_small",
                              backbone_width=8, seed=0, flip=False, max_detections=7, anchors=3,
                              classification_loss="focal")
    v1 = yolo.from_options(options, 5, synthetic.CLASS_NAMES, boxes)
    assert not v1.uses_anchors and v1.grid_size == (4, 4)
    assert v1.class_names == synthetic.CLASS_NAMES
    assert v1.config.max_detections == 7 and not v1.config.flip_augment
    options.model = "yolo_anchors"
    with_anchors = yolo.from_options(options, 5, synthetic.CLASS_NAMES, boxes)
    np.testing.assert_allclose(with_anchors.anchor_shapes, yolo.kmeans_anchors(boxes, 3, seed=0))
    assert "mean best IoU" in capsys.readouterr().out
    assert {"yolo", "yolo_anchors"} == set(yolo.TRAIN_DEFAULTS_BY_MODEL)
    for defaults in yolo.TRAIN_DEFAULTS_BY_MODEL.values():
        assert {"epochs", "learning_rate", "batch_size", "warmup_epochs",
                "time_budget_minutes"} <= set(defaults)
    options.model = "yolo9000"
    with pytest.raises(ValueError, match="options.model"):
        yolo.from_options(options, 5, synthetic.CLASS_NAMES, boxes)
