"""Tests of CenterNet (ch05_detection/centernet.py): Gaussian targets, the penalty-reduced focal
loss, peak extraction and decoding against hand-computed values and independent references
(NumPy, scipy), then the model on tiny inputs (64 px, width 8)."""

import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from ch05_detection import centernet
from ch05_detection.centernet import CenterNet, CenterNetConfig
from common import synthetic
from detection_checks import check_detect_contract  # tests/detection_checks.py

SIZE = 64
NUM_CLASSES = 5


def tiny_model(**options):
    settings = dict(image_size=(SIZE, SIZE), backbone_options={"filters": [8, 16, 32, 64]},
                    decoder_channels=(16, 16, 16), head_channels=16, max_detections=10)
    settings.update(options)
    return CenterNet(NUM_CLASSES, **settings)


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


def iou(a, b):
    """IoU of two (ymin, xmin, ymax, xmax) boxes, plain Python."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ----------------------------------------------------------------------------------
# the radius rule
# ----------------------------------------------------------------------------------
def test_gaussian_radius_hand_computed_10x10_box():
    # o = 0.7, h = w = 10, s = 20, hw = 100:
    # case 1 (shift):  (20 - sqrt(400 - 4 * 100 * 0.3 / 1.7)) / 2 = 0.9251
    # case 2 (shrink): (20 - sqrt(400 - 4 * 0.3 * 100)) / 4      = 0.8167
    # case 3 (grow):   (-20 + sqrt(400 + 4 * 0.3 * 100 / 0.7)) / 4 = 0.9763
    radius = float(centernet.gaussian_radius(10.0, 10.0, 0.7))
    assert radius == pytest.approx((20 - math.sqrt(280.0)) / 4, abs=1e-5)
    assert radius == pytest.approx(0.8167, abs=1e-4)
    # The released code's formula (larger root, / 2) would give 2.73 for the same box.
    assert radius < 1.0


def test_gaussian_radius_keeps_exactly_the_minimum_iou():
    """At the radius, every corner perturbation keeps IoU >= o and the binding one equals o."""
    rng = np.random.default_rng(0)
    for h, w in rng.uniform(2.0, 40.0, size=(20, 2)):
        for o in (0.5, 0.7, 0.9):
            r = float(centernet.gaussian_radius(h, w, o))
            box = (0.0, 0.0, h, w)
            ious = [iou(box, (r, r, h + r, w + r)),            # shifted
                    iou(box, (r, r, h - r, w - r)),            # shrunk by 2r
                    iou(box, (-r, -r, h + r, w + r))]          # grown by 2r
            assert min(ious) == pytest.approx(o, abs=1e-4), (h, w, o, ious)
            assert all(value >= o - 1e-4 for value in ious)
    with pytest.raises(ValueError, match="min_overlap"):
        centernet.gaussian_radius(10.0, 10.0, 1.0)


# ----------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------
def test_center_targets_hand_computed():
    # 16 x 16 map: box rows 2..8, columns 4..7 (cells) -> centre (5.0, 5.5), size (6, 3).
    box = np.array([[[2 / 16, 4 / 16, 8 / 16, 7 / 16]]], np.float32)
    cells, offsets, sizes = centernet.center_targets(box, (16, 16))
    np.testing.assert_array_equal(cells.numpy()[0, 0], [5, 5])
    np.testing.assert_allclose(offsets.numpy()[0, 0], [0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(sizes.numpy()[0, 0], [6.0, 3.0], atol=1e-5)
    # A centre on the bottom border stays on the map.
    cells, offsets, _ = centernet.center_targets(np.array([[0.9, 0.0, 1.0, 1.0]]), (16, 16))
    np.testing.assert_array_equal(cells.numpy()[0], [15, 8])


def test_heatmap_splat_hand_computed():
    box = np.array([[2 / 16, 4 / 16, 8 / 16, 7 / 16]], np.float32)  # centre cell (5, 5), 6 x 3
    # TTFNet rule, alpha = 1: sigma_y = 6 / 6 = 1, sigma_x = 3 / 6 = 0.5; cut beyond 3 sigma.
    heat = centernet.heatmap_targets(box, [2], 3, (16, 16), "box", box_sigma_factor=1.0).numpy()
    assert heat.shape == (16, 16, 3)
    assert heat[5, 5, 2] == 1.0 and heat[..., :2].max() == 0.0
    assert heat[6, 5, 2] == pytest.approx(math.exp(-0.5), abs=1e-6)          # dy = 1
    assert heat[5, 6, 2] == pytest.approx(math.exp(-2.0), abs=1e-6)          # dx = 1
    assert heat[7, 6, 2] == pytest.approx(math.exp(-2.0 - 2.0), abs=1e-6)    # dy = 2, dx = 1
    assert heat[8, 5, 2] == pytest.approx(math.exp(-4.5), abs=1e-6)          # dy = 3 = 3 sigma
    assert heat[9, 5, 2] == 0.0 and heat[5, 7, 2] == 0.0                     # beyond 3 sigma
    # Default alpha 0.54: sigma_y = 0.54, sigma_x = 0.27 (dx = 1 > 3 sigma_x: cut).
    heat = centernet.heatmap_targets(box, [0], 1, (16, 16)).numpy()[..., 0]
    assert heat[6, 5] == pytest.approx(math.exp(-1.0 / (2 * 0.54 ** 2)), abs=1e-6)
    assert heat[5, 6] == 0.0
    # Corrected-IoU rule on a 10 x 10-cell box: sigma = (2 * 0.8167 + 1) / 6 on both axes.
    square = np.array([[0.0, 0.0, 10 / 16, 10 / 16]], np.float32)  # centre cell (5, 5)
    heat = centernet.heatmap_targets(square, [0], 1, (16, 16), "iou").numpy()[..., 0]
    sigma = (2 * (20 - math.sqrt(280.0)) / 4 + 1) / 6
    assert heat[5, 6] == pytest.approx(math.exp(-1 / (2 * sigma ** 2)), abs=1e-5)
    assert heat[4, 4] == pytest.approx(math.exp(-1 / sigma ** 2), abs=1e-5)


def test_heatmap_merges_by_max_and_ignores_padding():
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.15, 0.15, 0.55, 0.55], [0.5, 0.5, 0.9, 0.9],
                       [0.0, 0.0, 0.0, 0.0]]], np.float32)
    classes = np.array([[1, 1, 0, -1]], np.int32)
    merged = centernet.heatmap_targets(boxes, classes, 2, (16, 16)).numpy()[0]
    one = [centernet.heatmap_targets(boxes[0, i:i + 1], classes[0, i:i + 1], 2, (16, 16)).numpy()
           for i in range(3)]
    np.testing.assert_allclose(merged[..., 1], np.maximum(one[0][..., 1], one[1][..., 1]))
    np.testing.assert_allclose(merged[..., 0], one[2][..., 0])
    assert (merged == 1.0).sum() == 3  # one exact 1 per object (the positives)
    # An image with no objects: all zeros (not -inf from an empty max).
    empty = centernet.heatmap_targets(np.zeros((1, 3, 4)), -np.ones((1, 3)), 2, (8, 8)).numpy()
    assert empty.shape == (1, 8, 8, 2) and not empty.any()


# ----------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------
def test_penalty_reduced_focal_loss_hand_computed():
    logits = np.array([1.0, -0.5, 2.0, -3.0], np.float32).reshape(1, 1, 4, 1)
    target = np.array([1.0, 0.5, 0.0, 0.9], np.float32).reshape(1, 1, 4, 1)
    p = 1 / (1 + np.exp(-logits.ravel().astype(np.float64)))
    y = target.ravel()
    expected = (-(1 - p[0]) ** 2 * np.log(p[0])                          # the centre
                + sum(-(1 - y[i]) ** 4 * p[i] ** 2 * np.log(1 - p[i]) for i in (1, 2, 3)))
    loss = centernet.penalty_reduced_focal_loss(logits, target)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # beta reduces the penalty near a centre: Y = 0.9 weighs (0.1)^4 of Y = 0.
    near = centernet.penalty_reduced_focal_loss(np.full((1, 1, 1, 1), 0.3), np.full((1, 1, 1, 1), 0.9))
    far = centernet.penalty_reduced_focal_loss(np.full((1, 1, 1, 1), 0.3), np.zeros((1, 1, 1, 1)))
    assert float(near) / float(far) == pytest.approx(0.1 ** 4, rel=1e-5)
    # Confident and right: ~0, and finite for extreme logits.
    good = centernet.penalty_reduced_focal_loss(np.array([30.0, -30.0]).reshape(1, 1, 2, 1),
                                                np.array([1.0, 0.0]).reshape(1, 1, 2, 1))
    assert 0.0 <= float(good) < 1e-9


def test_losses_match_a_numpy_recomputation():
    model = tiny_model()
    batch = shapes_batch(2)
    losses = model.compute_losses(batch)
    outputs = {k: v.numpy() for k, v in model(batch["image"]).items()}
    h = w = SIZE // 4
    heat = centernet.heatmap_targets(batch["boxes"], batch["classes"], NUM_CLASSES, (h, w)).numpy()
    z = outputs["heatmap_logits"].astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    focal = np.where(heat == 1.0, -(1 - p) ** 2 * np.log(p), -(1 - heat) ** 4 * p ** 2 * np.log(1 - p))
    size_l1 = offset_l1 = 0.0
    count = 0
    for b in range(2):
        for box, cls in zip(batch["boxes"][b], batch["classes"][b]):
            if cls < 0:
                continue
            count += 1
            cy, cx = (box[0] + box[2]) / 2 * h, (box[1] + box[3]) / 2 * w
            i, j = int(cy), int(cx)
            size_l1 += np.abs(outputs["sizes"][b, i, j] - [(box[2] - box[0]) * h,
                                                           (box[3] - box[1]) * w]).sum()
            offset_l1 += np.abs(outputs["offsets"][b, i, j] - [cy - i, cx - j]).sum()
    assert count > 0
    assert float(losses["heatmap_loss"]) == pytest.approx(focal.sum() / count, rel=1e-4)
    assert float(losses["size_loss"]) == pytest.approx(size_l1 / count, rel=1e-4)
    assert float(losses["offset_loss"]) == pytest.approx(offset_l1 / count, rel=1e-4)
    total = losses["heatmap_loss"] + 0.1 * losses["size_loss"] + losses["offset_loss"]
    assert float(losses["loss"]) == pytest.approx(float(total), rel=1e-6)


# ----------------------------------------------------------------------------------
# peaks and decoding
# ----------------------------------------------------------------------------------
def test_peaks_on_a_hand_built_heatmap():
    heat = np.zeros((7, 8), np.float32)
    heat[1, 1] = 0.9                      # an isolated peak
    heat[1, 2] = 0.4                      # its neighbour: suppressed
    heat[5, 1] = heat[5, 2] = 0.7         # two adjacent equal values: BOTH kept
    heat[2:4, 5:7] = 0.5                  # a 2 x 2 plateau: all four kept
    heat[0, 7] = 0.3                      # a peak on the border (padding never wins)
    heat[6, 5] = 0.2                      # small but alone: a peak (the threshold is decode's job)
    peaks = centernet.heatmap_peaks(heat[None, :, :, None]).numpy()[0, :, :, 0]
    expected = np.zeros_like(heat)
    for cell in [(1, 1), (5, 1), (5, 2), (2, 5), (2, 6), (3, 5), (3, 6), (0, 7), (6, 5)]:
        expected[cell] = heat[cell]
    np.testing.assert_array_equal(peaks, expected)  # zeros elsewhere: 0-valued "peaks" drop out
    # Independent reference: scipy's maximum filter on random maps with ties.
    rng = np.random.default_rng(0)
    random_heat = rng.integers(0, 6, size=(2, 9, 11, 3)).astype(np.float32) / 5
    peaks = centernet.heatmap_peaks(random_heat).numpy()
    reference = ndimage.maximum_filter(random_heat, size=(1, 3, 3, 1), mode="constant",
                                       cval=-np.inf)
    np.testing.assert_array_equal(peaks, np.where(random_heat == reference, random_heat, 0.0))


def test_decode_top_k_threshold_and_padding():
    h = w = 8
    heat = np.zeros((1, h, w, 3), np.float32)
    heat[0, 1, 1, 0], heat[0, 4, 6, 2], heat[0, 6, 2, 1] = 0.9, 0.6, 0.04
    sizes = np.full((1, h, w, 2), 2.0, np.float32)
    offsets = np.full((1, h, w, 2), 0.5, np.float32)
    out = centernet.decode_centers(heat, sizes, offsets, max_detections=4, score_threshold=0.05)
    assert out["num_detections"].numpy().tolist() == [2]
    np.testing.assert_allclose(out["scores"].numpy()[0], [0.9, 0.6, 0.0, 0.0])
    np.testing.assert_array_equal(out["classes"].numpy()[0], [0, 2, -1, -1])
    # Centre (1.5, 1.5) cells, size 2 -> (0.5, 0.5, 2.5, 2.5) / 8.
    np.testing.assert_allclose(out["boxes"].numpy()[0, 0], np.array([0.5, 0.5, 2.5, 2.5]) / 8,
                               atol=1e-6)
    np.testing.assert_array_equal(out["boxes"].numpy()[0, 2:], 0.0)
    top1 = centernet.decode_centers(heat, sizes, offsets, max_detections=1, score_threshold=0.0)
    assert top1["classes"].numpy().tolist() == [[0]]
    # More detections than cells x classes: padded, not an error.
    small = centernet.decode_centers(heat[:, :2, :2], sizes[:, :2, :2], offsets[:, :2, :2],
                                     max_detections=20)
    assert small["boxes"].shape == (1, 20, 4) and small["num_detections"].numpy()[0] == 1


def test_decode_of_perfect_outputs_recovers_the_ground_truth():
    batch = shapes_batch(6, start=10)
    h = w = SIZE // 4
    heat = centernet.heatmap_targets(batch["boxes"], batch["classes"], NUM_CLASSES, (h, w))
    cells, offsets, sizes = centernet.center_targets(batch["boxes"], (h, w))
    size_map = np.zeros((6, h, w, 2), np.float32)
    offset_map = np.zeros((6, h, w, 2), np.float32)
    for b in range(6):
        for n in np.flatnonzero(batch["classes"][b] >= 0):
            i, j = cells.numpy()[b, n]
            size_map[b, i, j], offset_map[b, i, j] = sizes.numpy()[b, n], offsets.numpy()[b, n]
    logits = np.log(np.clip(heat, 1e-7, 1 - 1e-7) / (1 - np.clip(heat, 1e-7, 1 - 1e-7)))
    model = tiny_model(max_detections=10)
    out = model.decode({"heatmap_logits": tf.constant(logits, tf.float32),
                        "sizes": tf.constant(size_map), "offsets": tf.constant(offset_map)})
    total = 0
    for b in range(6):
        valid = batch["classes"][b] >= 0
        n = int(out["num_detections"][b])
        assert n == valid.sum()
        total += n
        order = np.lexsort(batch["boxes"][b, valid].T[::-1])
        found = np.lexsort(out["boxes"].numpy()[b, :n].T[::-1])
        np.testing.assert_allclose(out["boxes"].numpy()[b, :n][found],
                                   batch["boxes"][b, valid][order], atol=1e-5)
        np.testing.assert_array_equal(out["classes"].numpy()[b, :n][found],
                                      batch["classes"][b, valid][order])
        np.testing.assert_allclose(out["scores"].numpy()[b, :n], 1.0, atol=1e-5)
    assert total >= 6


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """A tiny model after 25 steps on one fixed batch."""
    keras.utils.set_random_seed(1)
    batch = shapes_batch(8)
    model = tiny_model(flip_augment=False)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=1,
                        epochs=25, verbose=0).history
    return model, batch, history


def test_output_shapes_and_heatmap_bias():
    model = tiny_model()
    outputs = model(np.zeros((2, SIZE, SIZE, 3), np.float32))
    assert outputs["heatmap_logits"].shape == (2, 16, 16, NUM_CLASSES)
    assert outputs["sizes"].shape == (2, 16, 16, 2) and outputs["offsets"].shape == (2, 16, 16, 2)
    assert model.output_size == (16, 16)
    np.testing.assert_allclose(model.heatmap_head[-1].bias.numpy(), -2.19)
    assert not model.size_head[-1].bias.numpy().any()
    assert not model.offset_head[-1].bias.numpy().any()
    # Images of another size are resized; stride 8 halves the maps.
    assert model(np.zeros((1, 40, 50, 3)))["sizes"].shape == (1, 16, 16, 2)
    assert tiny_model(output_stride=8)(np.zeros((1, SIZE, SIZE, 3)))["sizes"].shape == (1, 8, 8, 2)


def test_empty_images_give_finite_losses():
    model = tiny_model()
    batch = {"image": np.random.default_rng(0).random((2, SIZE, SIZE, 3)).astype(np.float32),
             "boxes": np.zeros((2, 4, 4), np.float32), "classes": -np.ones((2, 4), np.int32)}
    losses = model.compute_losses(batch)
    assert set(losses) == set(CenterNet.LOSS_NAMES)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["size_loss"]) == 0.0 and float(losses["offset_loss"]) == 0.0
    assert float(losses["heatmap_loss"]) > 0.0  # every cell is a negative


def test_fit_reduces_the_loss(trained):
    _, _, history = trained
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
    assert set(CenterNet.LOSS_NAMES) <= set(history)


def test_detect_contract(trained):
    model, batch, _ = trained
    out = model.detect(batch["image"][:3])
    check_detect_contract(out, 3, 10, NUM_CLASSES, min_score=0.05)
    predicted = model.predict(batch["image"][:2], verbose=0)
    np.testing.assert_allclose(predicted["scores"], out["scores"][:2], atol=1e-5)


def test_keras_round_trip_gives_identical_outputs(tmp_path, trained):
    model, batch, _ = trained
    path = tmp_path / "centernet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, CenterNet) and loaded.config == model.config
    for key, value in model(batch["image"][:2]).items():
        np.testing.assert_array_equal(loaded(batch["image"][:2])[key].numpy(), value.numpy())


def test_config_validation_and_from_options():
    with pytest.raises(ValueError, match="output_stride"):
        CenterNetConfig(5, output_stride=2)
    with pytest.raises(ValueError, match="radius_rule"):
        CenterNetConfig(5, radius_rule="cornernet")
    with pytest.raises(ValueError, match="decoder_channels"):
        CenterNetConfig(5, decoder_channels=(32, 16))
    with pytest.raises(ValueError, match="image_size"):
        CenterNetConfig(5, image_size=(80, 80))
    with pytest.raises(ValueError, match="min_overlap"):
        CenterNetConfig(5, min_overlap=1.5)
    options = SimpleNamespace(image_size=SIZE, backbone="resnet_small", backbone_width=8, seed=3,
                              flip=False, max_detections=7, anchors=9, classification_loss="focal")
    model = centernet.from_options(options, 3, ("a", "b", "c"), np.zeros((4, 4), np.float32))
    assert model.config.image_size == (SIZE, SIZE) and model.class_names == ("a", "b", "c")
    assert model.config.backbone_options == {"filters": [8, 16, 32, 64]}
    assert model.config.max_detections == 7 and not model.config.flip_augment
    assert model.config.seed == 3 and model.config.output_stride == 4
    assert set(centernet.TRAIN_DEFAULTS) == {"epochs", "learning_rate", "batch_size",
                                             "warmup_epochs", "time_budget_minutes"}
