"""Object localization and landmarks: the shapes_localization data, targets, losses, metrics, model.

Referees: hand-computed cases (the lecture's squared-error loss, IoU of two known boxes, a 3-4-5
distance), keras.losses (BinaryCrossentropy, CategoricalCrossentropy, Huber), OpenCV's rasterised
mask of each shape (landmarks on the shape), common.synthetic (the data registry).
"""

import json
import math

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import localization as loc
from common import data, synthetic

K = synthetic.NUM_CLASSES
L = synthetic.NUM_LANDMARKS


# ---------------------------------------------------------------------------------------------
# The data: zero or one shape, its box, class and landmarks
# ---------------------------------------------------------------------------------------------
def test_localization_examples_follow_the_contract():
    counts = []
    for index in range(60):
        example = synthetic.make_localization_example(index, "validation", image_size=48)
        n = len(example["classes"])
        counts.append(n)
        assert example["image"].shape == (48, 48, 3) and example["image"].dtype == np.float32
        assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
        assert example["boxes"].shape == (n, 4) and example["boxes"].dtype == np.float32
        assert example["classes"].dtype == np.int32
        assert example["landmarks"].shape == (n, L, 2) and example["landmarks"].dtype == np.float32
        assert example["landmark_visibility"].shape == (n, L)
        if n:
            name = synthetic.CLASS_NAMES[example["classes"][0]]
            visible = example["landmark_visibility"][0]
            assert visible.sum() == synthetic.LANDMARK_COUNTS[name]
            assert np.all(visible[:visible.sum()] == 1)  # real points first, padding after
            assert np.all(example["landmarks"][0][visible == 0] == 0)
    assert set(counts) == {0, 1}
    assert 0.1 < counts.count(0) / len(counts) < 0.45  # empty_fraction 0.25


def test_landmarks_sit_on_the_drawn_shape_and_the_box_is_tight():
    size = 96
    checked = 0
    for index in range(80):
        example = synthetic.make_localization_example(index, "train", seed=3, image_size=size)
        if not len(example["classes"]):
            continue
        checked += 1
        name = synthetic.CLASS_NAMES[example["classes"][0]]
        visible = example["landmark_visibility"][0].astype(bool)
        points = example["landmarks"][0][visible] * size - 0.5  # pixel coordinates (x, y)
        ymin, xmin, ymax, xmax = example["boxes"][0] * size
        # Every landmark is inside the tight box (corners on its edges, within a pixel).
        assert np.all(points[:, 0] >= xmin - 1.0) and np.all(points[:, 0] <= xmax)
        assert np.all(points[:, 1] >= ymin - 1.0) and np.all(points[:, 1] <= ymax)
        # The centre is the middle of the corners for the point-symmetric shapes.
        if name in ("square", "cross"):
            np.testing.assert_allclose(points[1:].mean(axis=0), points[0], atol=1e-3)
        # Polygon of the corners / tips: for the convex shapes it is the shape itself, so its
        # rasterisation (OpenCV, from our landmarks alone) must overlap the box almost exactly.
        if name in ("square", "triangle"):
            polygon = np.zeros((size, size), np.uint8)
            cv2.fillPoly(polygon, [np.round(points[1:] * 16).astype(np.int32)], 1, shift=4)
            rows, cols = np.flatnonzero(polygon.any(axis=1)), np.flatnonzero(polygon.any(axis=0))
            np.testing.assert_allclose([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1],
                                       [ymin, xmin, ymax, xmax], atol=1.01)
        # Numbered clockwise on screen: the cross product of consecutive corners about the centre is
        # positive (y points down) ...
        corners = points[1:] - points[0]
        if len(corners) >= 3:
            cross = corners[:, 0] * np.roll(corners[:, 1], -1) - corners[:, 1] * np.roll(corners[:, 0], -1)
            assert np.all(cross > 0), (index, name)
        # ... starting at the marked corner: a black or white disc between the centre and landmark 1.
        if len(corners):
            x, y = np.round(points[0] + synthetic.MARK_POSITION * corners[0]).astype(int)
            pixel = example["image"][y, x]
            assert np.all(pixel < 0.2) or np.all(pixel > 0.8), (index, name, pixel)
    assert checked > 40


def test_localization_examples_are_pure_and_registered():
    a = synthetic.make_localization_example(5, "test", seed=2)
    b = synthetic.make_localization_example(5, "test", seed=2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    loaded = list(data.load("shapes_localization", "test", num_examples=6, seed=2))
    for index, example in enumerate(loaded):
        expected = synthetic.make_localization_example(index, "test", seed=2)
        for key in expected:
            np.testing.assert_array_equal(example[key].numpy(), expected[key])
    info = data.get_info("shapes_localization")
    assert info.task == "detection" and info.class_names == synthetic.CLASS_NAMES
    assert info.image_size == (64, 64)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.make_localization_example(0, image_size=8)
    with pytest.raises(ValueError, match="empty_fraction"):
        synthetic.make_localization_example(0, empty_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def test_box_center_conversion_by_hand():
    centers = loc.box_to_center([[0.1, 0.2, 0.5, 0.8]])  # ymin, xmin, ymax, xmax
    np.testing.assert_allclose(centers, [[0.5, 0.3, 0.4, 0.6]], atol=1e-7)  # b_x, b_y, b_h, b_w
    np.testing.assert_allclose(loc.center_to_box(centers), [[0.1, 0.2, 0.5, 0.8]], atol=1e-7)


def test_localization_target_by_hand():
    y = loc.localization_target([[0.1, 0.2, 0.5, 0.8]], [2], num_classes=3)
    np.testing.assert_allclose(y, [1, 0.5, 0.3, 0.4, 0.6, 0, 0, 1], atol=1e-7)
    empty = loc.localization_target(np.zeros((0, 4)), np.zeros((0,), np.int32), num_classes=3)
    np.testing.assert_array_equal(empty, np.zeros(8))
    padded = loc.localization_target([[0, 0, 0, 0], [0.1, 0.2, 0.5, 0.8]], [-1, 0], num_classes=3)
    np.testing.assert_allclose(padded, [1, 0.5, 0.3, 0.4, 0.6, 1, 0, 0], atol=1e-7)
    only_padding = loc.localization_target([[0.1, 0.2, 0.5, 0.8]], [-1], num_classes=3)
    np.testing.assert_array_equal(only_padding, np.zeros(8))


def test_landmark_target_by_hand():
    points = [[[0.5, 0.5], [0.2, 0.3], [0.0, 0.0]]]
    y = loc.landmark_target(points, [[1, 1, 0]], [4], num_landmarks=3)
    np.testing.assert_allclose(y, [1, 0.5, 0.5, 0.2, 0.3, 0, 0, 1, 1, 0], atol=1e-7)
    empty = loc.landmark_target(np.zeros((0, 3, 2)), np.zeros((0, 3)), np.zeros((0,), np.int32), 3)
    np.testing.assert_array_equal(empty, np.zeros(10))


def test_example_to_target_on_the_registered_data():
    dataset = data.load("shapes_localization", "validation", num_examples=8)
    for task, size in (("localization", 5 + K), ("landmarks", 1 + 3 * L)):
        for (image, y), example in zip(dataset.map(loc.example_to_target(task, K)), dataset):
            assert image.shape == (64, 64, 3) and y.shape == (size,)
            assert float(y[0]) == float(len(example["classes"]))
    with pytest.raises(ValueError, match="task"):
        loc.example_to_target("pose", K)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def test_lecture_localization_loss_by_hand():
    # K = 3. With an object: every output counts.
    y_true = [[1, 0.5, 0.5, 0.2, 0.3, 0, 1, 0]]
    y_pred = [[0.0, 0.4, 0.6, 0.2, 0.1, 0, 0, 0]]  # p̂ = sigmoid(0) = 0.5, ĉ = (1/3, 1/3, 1/3)
    expected = (0.5 - 1) ** 2 + (0.01 + 0.01 + 0 + 0.04) + ((1 / 3) ** 2 + (2 / 3) ** 2 + (1 / 3) ** 2)
    loss = loc.localization_loss(y_true, y_pred, kind="lecture")
    np.testing.assert_allclose(loss, [expected], rtol=1e-6)
    # Without an object: only (p̂_c - p_c)^2, whatever the other outputs say.
    y_pred = [[math.log(3.0), 9, -9, 9, 9, 5, -5, 0]]  # p̂ = 0.75
    loss = loc.localization_loss([[0, 0, 0, 0, 0, 0, 0, 0]], y_pred, kind="lecture")
    np.testing.assert_allclose(loss, [0.75 ** 2], rtol=1e-6)


def test_modern_localization_loss_against_keras_losses():
    rng = np.random.default_rng(0)
    y_true = np.zeros((6, 5 + K), np.float32)
    y_true[:4, 0] = 1
    y_true[:4, 1:5] = rng.uniform(0.1, 0.9, size=(4, 4))
    y_true[np.arange(4), 5 + rng.integers(0, K, 4)] = 1
    y_pred = rng.normal(size=(6, 5 + K)).astype(np.float32) * 0.4
    y_pred[:, 1:5] = y_true[:, 1:5] + rng.normal(0, 0.15, size=(6, 4))  # some errors above beta
    beta, box_weight, class_weight = 0.1, 3.0, 2.5
    bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    huber = keras.losses.Huber(delta=beta, reduction=None)
    expected = []
    for i in range(6):
        value = float(bce(y_true[i:i + 1, :1], y_pred[i:i + 1, :1])[0])
        if y_true[i, 0]:
            value += class_weight * float(ce(y_true[i:i + 1, 5:], y_pred[i:i + 1, 5:])[0])
            # keras' Huber averages over the last axis; smooth L1 = Huber / beta, summed over 4.
            value += box_weight * 4 * float(huber(y_true[i:i + 1, 1:5], y_pred[i:i + 1, 1:5])[0]) / beta
        expected.append(value)
    loss = loc.localization_loss(y_true, y_pred, "modern", box_weight=box_weight, beta=beta,
                                 class_weight=class_weight)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The lecture's squared error has no weights: class_weight changes nothing there.
    np.testing.assert_allclose(loc.localization_loss(y_true, y_pred, "lecture", class_weight=5.0),
                               loc.localization_loss(y_true, y_pred, "lecture"), rtol=1e-6)
    # No object: only the binary cross-entropy of p_c, log(1 + e^z).
    only_presence = loc.localization_loss(np.zeros((1, 5 + K)), [[2.0] + [7.0] * (4 + K)], "modern")
    np.testing.assert_allclose(only_presence, [math.log(1 + math.e ** 2)], rtol=1e-6)


def test_smooth_l1_is_huber_over_beta():
    x = np.linspace(-0.5, 0.5, 41).astype(np.float32)
    for beta in (0.05, 0.1, 1.0):
        huber = keras.losses.Huber(delta=beta, reduction=None)(np.zeros((41, 1)), x[:, None])
        np.testing.assert_allclose(loc.smooth_l1(x, beta), np.asarray(huber) / beta, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="beta"):
        loc.smooth_l1(x, 0.0)


def test_landmark_losses_by_hand_and_padding_never_counts():
    # L = 2: point 0 visible, point 1 padding.
    y_true = [[1, 0.5, 0.5, 0, 0, 1, 0]]
    y_pred = [[0.0, 0.8, 0.1, 5, 5, 0, 0]]  # p̂ = 0.5, point 0 off by (0.3, -0.4), v̂ = (0.5, 0.5)
    lecture = loc.landmark_loss(y_true, y_pred, "lecture", num_landmarks=2)
    np.testing.assert_allclose(lecture, [0.25 + (0.09 + 0.16) + (0.25 + 0.25)], rtol=1e-6)
    modern = loc.landmark_loss(y_true, y_pred, "modern", num_landmarks=2, point_weight=2.0, beta=0.1)
    smooth = (0.3 - 0.05) + (0.4 - 0.05)  # both errors above beta: |x| - beta / 2
    expected = math.log(2) + 2.0 * smooth + 2 * math.log(2)
    np.testing.assert_allclose(modern, [expected], rtol=1e-5)
    # Moving the padded point changes nothing.
    moved = [[0.0, 0.8, 0.1, -7, 3, 0, 0]]
    np.testing.assert_allclose(loc.landmark_loss(y_true, moved, "modern", 2), loc.landmark_loss(
        y_true, y_pred, "modern", 2), rtol=1e-6)
    no_object = loc.landmark_loss([[0] * 7], [[0.0, 9, 9, 9, 9, 9, 9]], "lecture", 2)
    np.testing.assert_allclose(no_object, [0.25], rtol=1e-6)


@pytest.mark.parametrize("loss", [loc.LocalizationLoss("lecture"),
                                  loc.LocalizationLoss("modern", 2.0, 0.2, class_weight=3.0),
                                  loc.LandmarkLoss("modern", num_landmarks=2, point_weight=3.0)])
def test_loss_classes_average_over_the_batch_round_trip_and_trace(loss):
    size = 5 + K if isinstance(loss, loc.LocalizationLoss) else 7
    rng = np.random.default_rng(1)
    y_true = np.zeros((4, size), np.float32)
    y_true[:2] = rng.uniform(size=(2, size)).round(1)
    y_true[:2, 0] = 1
    y_pred = rng.normal(size=(4, size)).astype(np.float32)
    per_image = loss.call(tf.constant(y_true), tf.constant(y_pred))
    np.testing.assert_allclose(loss(y_true, y_pred), np.mean(per_image), rtol=1e-6)
    clone = loss.__class__.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    np.testing.assert_allclose(restored(y_true, y_pred), loss(y_true, y_pred), rtol=1e-6)
    np.testing.assert_allclose(tf.function(loss)(y_true, y_pred), loss(y_true, y_pred), rtol=1e-6)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="kind"):
        loc.LocalizationLoss("yolo")
    with pytest.raises(ValueError, match="kind"):
        loc.landmark_loss(np.zeros((1, 7)), np.zeros((1, 7)), "focal", 2)
    with pytest.raises(ValueError, match="y_pred"):
        loc.localization_loss(np.zeros((1, 8)), np.zeros((1, 9)))
    with pytest.raises(ValueError, match="num_landmarks"):
        loc.landmark_loss(np.zeros((1, 7)), np.zeros((1, 7)), num_landmarks=0)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def test_localization_metrics_by_hand():
    # K = 3. Image 0: object, class 1, box centred (0.5, 0.5) of 0.4 x 0.4 -> [0.3, 0.3, 0.7, 0.7].
    # Prediction shifted right by 0.1: intersection 0.4 x 0.3 = 0.12, union 0.16 + 0.16 - 0.12 = 0.2.
    # Image 1: object, class 0, predicted class 2 with a perfect box. Image 2: no object, predicted
    # as present (wrong). Image 3: no object, predicted absent (right).
    y_true = np.array([[1, 0.5, 0.5, 0.4, 0.4, 0, 1, 0],
                       [1, 0.3, 0.3, 0.2, 0.2, 1, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    y_pred = np.array([[3.0, 0.6, 0.5, 0.4, 0.4, 0, 5, 0],
                       [2.0, 0.3, 0.3, 0.2, 0.2, 0, 0, 4],
                       [1.0, 0.5, 0.5, 0.5, 0.5, 9, 0, 0],
                       [-1.0, 0.5, 0.5, 0.5, 0.5, 9, 0, 0]], np.float32)
    presence, classes, iou = loc.localization_metrics()
    for metric in (presence, classes, iou):
        metric.update_state(y_true, y_pred)
    assert float(presence.result()) == pytest.approx(3 / 4)
    assert float(classes.result()) == pytest.approx(1 / 2)  # over the two images with an object
    assert float(iou.result()) == pytest.approx((0.6 + 1.0) / 2, rel=1e-5)
    # A box sticking out of the image is clipped before the IoU: [0.8, 0.8, 1.2, 1.2] -> [.., 1, 1].
    iou.reset_state()
    iou.update_state([[1, 0.9, 0.9, 0.2, 0.2, 1, 0, 0]], [[0, 1.0, 1.0, 0.4, 0.4, 0, 0, 0]])
    assert float(iou.result()) == pytest.approx(1.0, rel=1e-5)
    # Nothing counted yet: 0, not NaN.
    classes.reset_state()
    assert float(classes.result()) == 0.0


def test_nme_by_hand_and_metric_round_trip():
    # L = 2; image 0: point 0 visible and off by (0.03, 0.04) -> 0.05; point 1 padding (ignored).
    # Image 1: no object (ignored). Image 2: both visible, errors 0 and 0.1.
    y_true = np.array([[1, 0.5, 0.5, 0, 0, 1, 0],
                       [0, 0, 0, 0, 0, 0, 0],
                       [1, 0.2, 0.2, 0.6, 0.6, 1, 1]], np.float32)
    y_pred = np.array([[0, 0.53, 0.54, 0.9, 0.9, 0, 0],
                       [0, 0.9, 0.9, 0.9, 0.9, 0, 0],
                       [0, 0.2, 0.2, 0.6, 0.7, 0, 0]], np.float32)
    nme = loc.NormalizedMeanError(num_landmarks=2)
    tf.function(nme.update_state)(y_true, y_pred)
    assert float(nme.result()) == pytest.approx((0.05 + 0.0 + 0.1) / 3, rel=1e-5)
    clone = keras.metrics.deserialize(keras.metrics.serialize(nme))
    assert clone.num_landmarks == 2 and clone.name == "nme"
    for metric in loc.localization_metrics() + loc.landmark_metrics(2):
        again = metric.__class__.from_config(metric.get_config())
        assert again.get_config() == metric.get_config()


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, size", [("localization", 5 + K), ("landmarks", 1 + 3 * L)])
def test_localizer_shapes_and_save_load(task, size, tmp_path):
    model = loc.build_localizer((48, 48, 3), num_classes=K, task=task, hidden_units=16)
    images = np.random.default_rng(0).uniform(size=(2, 48, 48, 3)).astype(np.float32)
    outputs = model(images)
    assert outputs.shape == (2, size)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(restored(images), outputs, rtol=1e-5, atol=1e-6)
    # The backbone is the chapter-4 one; the head ends in the documented layout.
    assert any(layer.name.startswith("resnet_small") for layer in model.layers)


def test_spatial_soft_argmax_by_hand_and_round_trip():
    logits = np.full((2, 4, 4, 2), -60.0, np.float32)
    logits[0, 1, 2, 0] = 60.0  # all the mass on row 1, column 2: the cell centre (2.5 / 4, 1.5 / 4)
    logits[0, :, :, 1] = 0.0  # uniform: the image centre
    logits[1, 0, 0, 0] = logits[1, 3, 3, 0] = 60.0  # two equal peaks: their midpoint
    logits[1, 3, 0, 1] = 60.0
    layer = loc.SpatialSoftArgmax()
    expected = [[0.625, 0.375, 0.5, 0.5], [0.5, 0.5, 0.125, 0.875]]
    np.testing.assert_allclose(layer(logits), expected, atol=1e-6)
    np.testing.assert_allclose(tf.function(layer)(logits), expected, atol=1e-6)
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    np.testing.assert_allclose(clone(logits), expected, atol=1e-6)
    # The gradient reaches the logits (it is what trains the heatmaps).
    variable = tf.Variable(logits[:1] * 0.0)
    with tf.GradientTape() as tape:
        value = layer(variable)[0, 0]
    assert float(tf.reduce_sum(tf.abs(tape.gradient(value, variable)))) > 0


@pytest.mark.parametrize("point_head", loc.POINT_HEADS)
def test_landmark_heads_output_points_in_the_layout(point_head):
    model = loc.build_localizer((64, 64, 3), task="landmarks", point_head=point_head, hidden_units=16)
    outputs = model(np.zeros((1, 64, 64, 3), np.float32))
    assert outputs.shape == (1, 1 + 3 * L)
    if point_head == "heatmap":  # soft-argmax points are inside the image by construction
        points = outputs.numpy()[0, 1:1 + 2 * L]
        assert np.all((points > 0) & (points < 1))
    with pytest.raises(ValueError, match="point_head"):
        loc.build_localizer(task="landmarks", point_head="hourglass")


def test_decode_by_hand():
    outputs = np.array([[0.0, 0.5, 0.5, 0.4, 0.6, 1.0, 3.0, 1.0]], np.float32)
    decoded = loc.decode_localization(outputs, num_classes=3)
    assert float(decoded["presence"][0]) == pytest.approx(0.5)
    np.testing.assert_allclose(decoded["boxes"], [[0.3, 0.2, 0.7, 0.8]], atol=1e-6)
    assert int(decoded["classes"][0]) == 1
    probabilities = np.exp([1.0, 3.0, 1.0]) / np.exp([1.0, 3.0, 1.0]).sum()
    assert float(decoded["class_scores"][0]) == pytest.approx(probabilities[1], rel=1e-6)
    points = loc.decode_landmarks(np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.0, -100.0]]), 2)
    np.testing.assert_allclose(points["landmarks"], [[[0.1, 0.2], [0.3, 0.4]]], atol=1e-7)
    np.testing.assert_allclose(points["visibility"], [[0.5, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="outputs"):
        loc.decode_localization(outputs, num_classes=4)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="task"):
        loc.build_localizer(task="segmentation")
    with pytest.raises(ValueError, match="num_classes"):
        loc.build_localizer(num_classes=0)
    with pytest.raises(ValueError, match="backbone|name"):
        loc.build_localizer(backbone="not_a_backbone")


def test_pictures_are_written(tmp_path):
    import matplotlib.pyplot as plt

    dataset = data.load("shapes_localization", "validation", num_examples=4)
    images = np.stack([e["image"].numpy() for e in dataset])
    targets = np.stack([y.numpy() for _, y in dataset.map(loc.example_to_target("localization", K))])
    outputs = targets.copy()
    outputs[:, 0] = np.where(targets[:, 0] > 0, 5.0, -5.0)  # perfect presence logits
    outputs[:, 5:] *= 10  # class logits
    loc.show_localization(images, outputs, targets, synthetic.CLASS_NAMES,
                          save_path=tmp_path / "localization.png")
    targets = np.stack([y.numpy() for _, y in dataset.map(loc.example_to_target("landmarks", K))])
    outputs = targets.copy()
    outputs[:, 0] = np.where(targets[:, 0] > 0, 5.0, -5.0)
    outputs[:, 1 + 2 * L:] = np.where(targets[:, 1 + 2 * L:] > 0, 5.0, -5.0)
    loc.show_landmarks(images, outputs, targets, save_path=tmp_path / "landmarks.png")
    plt.close("all")
    assert (tmp_path / "localization.png").stat().st_size > 1000
    assert (tmp_path / "landmarks.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Augmentation: flips and quarter turns move the targets with the pixels
# ---------------------------------------------------------------------------------------------
DIHEDRAL = [(t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True)]


def _numpy_dihedral(image, transpose, flip_x, flip_y):
    if transpose:
        image = np.transpose(image, (1, 0, 2))
    if flip_x:
        image = image[:, ::-1]
    if flip_y:
        image = image[::-1]
    return image


def _numpy_box(box, transpose, flip_x, flip_y):
    """yxyx box under the same symmetry, written directly in corner form."""
    ymin, xmin, ymax, xmax = box
    if transpose:
        ymin, xmin, ymax, xmax = xmin, ymin, xmax, ymax
    if flip_x:
        xmin, xmax = 1 - xmax, 1 - xmin
    if flip_y:
        ymin, ymax = 1 - ymax, 1 - ymin
    return np.array([ymin, xmin, ymax, xmax])


def _batch(task, count=12, size=48):
    dataset = data.load("shapes_localization", "train", num_examples=count, image_size=size, seed=4)
    pairs = list(dataset.map(loc.example_to_target(task, K)))
    examples = list(dataset)
    return (np.stack([p[0].numpy() for p in pairs]), np.stack([p[1].numpy() for p in pairs]), examples)


@pytest.mark.parametrize("transpose, flip_x, flip_y", DIHEDRAL)
def test_dihedral_transform_moves_images_and_boxes_together(transpose, flip_x, flip_y):
    images, targets, examples = _batch("localization")
    count = len(images)
    out_images, out_targets = loc.dihedral_transform(
        images, targets, [transpose] * count, [flip_x] * count, [flip_y] * count, "localization")
    for i, example in enumerate(examples):
        np.testing.assert_array_equal(out_images[i], _numpy_dihedral(images[i], transpose, flip_x, flip_y))
        if len(example["classes"]):
            expected = _numpy_box(example["boxes"][0].numpy(), transpose, flip_x, flip_y)
            np.testing.assert_allclose(loc.center_to_box(out_targets[i, 1:5]), expected, atol=1e-6)
            np.testing.assert_array_equal(out_targets[i, 5:], targets[i, 5:])  # the class stays
        else:
            np.testing.assert_array_equal(out_targets[i], np.zeros(5 + K))  # nothing appears


@pytest.mark.parametrize("transpose, flip_x, flip_y", DIHEDRAL)
def test_dihedral_transform_renumbers_landmarks_clockwise(transpose, flip_x, flip_y):
    images, targets, examples = _batch("landmarks", count=16)
    count = len(images)
    _, out_targets = loc.dihedral_transform(
        images, targets, [transpose] * count, [flip_x] * count, [flip_y] * count, "landmarks")
    out_targets = out_targets.numpy()
    for i in range(count):
        visible = targets[i, 1 + 2 * L:].astype(bool)
        np.testing.assert_array_equal(out_targets[i, 1 + 2 * L:], targets[i, 1 + 2 * L:])
        if not visible.any():
            np.testing.assert_array_equal(out_targets[i], np.zeros(1 + 3 * L))
            continue
        points = targets[i, 1:1 + 2 * L].reshape(L, 2)[visible]
        moved = out_targets[i, 1:1 + 2 * L].reshape(L, 2)[visible]
        # The same points, moved by the symmetry written in NumPy ...
        expected = points.copy()
        if transpose:
            expected = expected[:, ::-1]
        if flip_x:
            expected[:, 0] = 1 - expected[:, 0]
        if flip_y:
            expected[:, 1] = 1 - expected[:, 1]
        np.testing.assert_allclose(moved[0], expected[0], atol=1e-6)  # the centre stays number 0
        if len(moved) > 1:  # a circle has its centre only
            distances = np.linalg.norm(moved[1:, None] - expected[None, 1:], axis=-1)
            assert np.all(distances.min(axis=1) < 1e-5) and np.all(distances.min(axis=0) < 1e-5)
        # ... landmark 1 still the marked corner, the others clockwise (screen, y down) again.
        if len(moved) > 1:
            np.testing.assert_allclose(moved[1], expected[1], atol=1e-6)
        corners = moved[1:] - moved[0]
        if len(corners) >= 3:
            cross = corners[:, 0] * np.roll(corners[:, 1], -1) - corners[:, 1] * np.roll(corners[:, 0], -1)
            assert np.all(cross > 0)
        padded = out_targets[i, 1:1 + 2 * L].reshape(L, 2)[~visible]
        np.testing.assert_array_equal(padded, np.zeros_like(padded))


def test_random_dihedral_is_a_pure_function_of_the_seed_and_varies():
    images, targets, _ = _batch("localization", count=16)
    a = loc.random_dihedral(images, targets, tf.constant([1, 2]), "localization")
    b = tf.function(loc.random_dihedral, reduce_retracing=True)(
        images, targets, tf.constant([1, 2]), "localization")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = loc.random_dihedral(images, targets, tf.constant([1, 3]), "localization")
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="square"):
        loc.dihedral_transform(np.zeros((1, 4, 6, 3)), np.zeros((1, 5 + K)), [True], [False], [False],
                               "localization")


# ---------------------------------------------------------------------------------------------
# The script, FAST, in-process
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task, keys", [
    ("localization", {"val_presence_accuracy", "val_class_accuracy", "val_mean_iou", "val_loss"}),
    ("landmarks", {"val_presence_accuracy", "val_nme", "val_loss"}),
])
def test_fast_run_writes_outputs_and_metrics_that_match_the_saved_model(task, keys, tmp_path, capsys):
    from ch05_detection import train_localizer
    from common.training import RunError

    out = tmp_path / task
    argv = ["--fast", "--task", task, "--out", str(out)]
    metrics = train_localizer.main(argv)
    for name in ("metrics.json", "config.json", "predictions.png", "model.keras", "history.png",
                 "checkpoint/state.npz"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics  # main() returns the record it wrote
    assert keys | {"train_seconds", "epochs", "parameters", "replicas"} <= set(written)
    assert written["epochs"] == 2 and written["task"] == task
    # Independent recomputation from the saved network on the same validation images.
    model = keras.models.load_model(out / "model.keras")
    dataset = data.load("shapes_localization", "validation", image_size=32, num_examples=32)
    images, targets = zip(*dataset.map(loc.example_to_target(task, K)))
    images, targets = np.stack(images), np.stack(targets)
    outputs = model.predict(images, verbose=0)
    present = targets[:, 0] > 0
    expected_presence = np.mean((outputs[:, 0] > 0) == present)
    assert written["val_presence_accuracy"] == pytest.approx(expected_presence, abs=1e-6)
    if task == "landmarks":
        visible = targets[:, 1 + 2 * L:] > 0
        errors = np.linalg.norm(outputs[:, 1:1 + 2 * L].reshape(-1, L, 2)
                                - targets[:, 1:1 + 2 * L].reshape(-1, L, 2), axis=-1)
        assert written["val_nme"] == pytest.approx(errors[visible].mean(), rel=1e-4)
    else:
        correct = outputs[present, 5:].argmax(-1) == targets[present, 5:].argmax(-1)
        assert written["val_class_accuracy"] == pytest.approx(correct.mean(), abs=1e-6)
    # Re-running resumes (nothing left to do); other options into the same --out are refused.
    capsys.readouterr()
    again = train_localizer.main(argv)
    assert "already done" in capsys.readouterr().out and again["epochs_this_run"] == 0
    with pytest.raises(RunError, match="--loss"):
        train_localizer.main(argv + ["--loss", "lecture"])


@pytest.mark.parametrize("argv, option", [
    (["--task", "pose"], "--task"), (["--loss", "l2"], "--loss"), (["--image-size", "16"], "--image-size"),
    (["--beta", "0"], "--beta"), (["--num-train-examples", "8", "--batch-size", "16"], "--num-train-examples"),
    (["--class-weight", "0"], "--class-weight"), (["--learning-rate", "-1"], "--learning-rate"),
])
def test_bad_options_are_refused_naming_the_flag(argv, option, tmp_path, capsys):
    from ch05_detection import train_localizer

    with pytest.raises(SystemExit) as error:  # argparse (choices) or the harness (RunError)
        train_localizer.main(["--fast", "--out", str(tmp_path / "bad")] + argv)
    assert error.value.code == 2
    assert option in capsys.readouterr().err


def test_default_out_has_one_folder_per_task():
    from ch05_detection import train_localizer

    config = train_localizer.Config(task="landmarks")
    train_localizer.check_config(config)
    assert config.out == "runs/train_localizer/landmarks"
    config = train_localizer.Config(task="landmarks", out="elsewhere")
    train_localizer.check_config(config)
    assert config.out == "elsewhere"


def test_task_defaults_fill_only_what_the_user_left_unset():
    from ch05_detection import train_localizer

    for task in ("localization", "landmarks"):
        config = train_localizer.Config(task=task)
        train_localizer.check_config(config)
        assert config.learning_rate == train_localizer.LEARNING_RATES[task]
        assert config.coordinate_weight == train_localizer.COORDINATE_WEIGHTS[task]
    # The landmark run keeps the learning rate its measured default run used.
    assert train_localizer.LEARNING_RATES["landmarks"] == 2e-3
    config = train_localizer.Config(learning_rate=1e-4, coordinate_weight=0.5)
    train_localizer.check_config(config)
    assert (config.learning_rate, config.coordinate_weight) == (1e-4, 0.5)
    # The class weight reaches the loss the run trains with.
    config = train_localizer.Config(class_weight=3.0)
    train_localizer.check_config(config)
    assert train_localizer.make_loss(config).get_config()["class_weight"] == 3.0
