"""Sliding windows (ch05_detection/sliding_windows.py): the convolutional form computes exactly the
per-window scores, at every window position, on random and on trained weights.

Run: python -m pytest -q tests/test_ch05_sliding_windows.py
"""

import keras
import numpy as np
import pytest

from ch05_detection import sliding_windows as sw
from common import synthetic

IMAGE_SIZE = 64
WINDOW_SIZES = (24, 32, 48)
TOLERANCE = 1e-5


def scene(index, split="validation"):
    return synthetic.make_scene(index, split, image_size=IMAGE_SIZE)


def classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return sw.build_window_classifier(5)


def assert_maps_equal(detector, image):
    loop = detector.score_maps(image, mode="loop")
    conv = detector.score_maps(image, mode="conv")
    assert list(loop) == list(conv) == list(WINDOW_SIZES)
    for side, resized, count in detector.plan:
        assert loop[side].shape == conv[side].shape == (count, count, 6)
        np.testing.assert_allclose(conv[side], loop[side], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(loop[side].sum(-1), 1.0, atol=1e-5)
    # The test has power: the scores change from window to window by far more than the
    # tolerance, so a map shifted by one position (or read at another scale) would fail.
    largest = loop[WINDOW_SIZES[0]]
    assert np.abs(np.diff(largest, axis=0)).max() > 100 * TOLERANCE
    assert np.abs(np.diff(largest, axis=1)).max() > 100 * TOLERANCE
    return loop


def test_scale_plan_and_window_boxes_by_hand():
    # 128 px: a 24-px window is 32 px in the image resized to round(128 * 32 / 24) = 171 px,
    # where (171 - 32) // 4 + 1 = 35 windows fit per side.
    assert sw.scale_plan(128) == [(24, 171, 35), (32, 128, 25), (48, 85, 14), (64, 64, 9)]
    boxes = sw.window_grid_boxes(64, 9)
    assert boxes.shape == (9, 9, 4)
    np.testing.assert_allclose(boxes[0, 0], [0, 0, 0.5, 0.5])
    np.testing.assert_allclose(boxes[2, 3], [8 / 64, 12 / 64, 40 / 64, 44 / 64])
    np.testing.assert_allclose(boxes[-1, -1], [0.5, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="does not fit"):
        sw.scale_plan(64, window_sizes=(128,))


def test_convolutionalize_reshapes_the_dense_kernels():
    model = classifier()
    fcn = sw.convolutionalize(model)
    dense_kernel = model.get_layer("fc1").kernel.numpy()  # [4 * 4 * 64, 128]
    conv_kernel = fcn.get_layer("fc1_conv").kernel.numpy()
    assert conv_kernel.shape == (4, 4, 64, 128)
    # Flatten's order (row, column, channel) is the kernel's: row 1, column 2, channel 3.
    np.testing.assert_array_equal(conv_kernel[1, 2, 3], dense_kernel[(1 * 4 + 2) * 64 + 3])
    assert fcn.get_layer("logits_conv").kernel.shape == (1, 1, 128, 6)
    # On one window the convolutional network is the classifier.
    window = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(fcn(window).numpy()[:, 0, 0], model(window).numpy(), atol=1e-5)


def test_convolutional_scores_equal_the_per_window_loop_with_random_weights():
    detector = sw.SlidingWindowDetector(classifier(1), image_size=IMAGE_SIZE,
                                        window_sizes=WINDOW_SIZES)
    assert_maps_equal(detector, scene(0)["image"])


def test_convolutional_scores_equal_the_per_window_loop_after_training():
    examples = [scene(i, "train") for i in range(8)]
    model, history = sw.train_window_classifier(examples, epochs=2, window_sizes=WINDOW_SIZES,
                                                classifier=classifier(2), learning_rate=3e-3)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]  # a few steps changed the weights
    detector = sw.SlidingWindowDetector(model, image_size=IMAGE_SIZE, window_sizes=WINDOW_SIZES)
    assert_maps_equal(detector, scene(1)["image"])


def test_label_windows_by_hand():
    gt_boxes = np.array([[0.0, 0.0, 0.5, 0.5]], np.float32)
    windows = np.array([[0.0, 0.0, 0.5, 0.5],      # IoU 1 -> class 3 + 1
                        [0.0, 0.0, 0.5, 0.35],     # IoU 0.7 -> positive
                        [0.0, 0.0, 0.5, 0.2],      # IoU 0.4 -> between: not used
                        [0.5, 0.5, 1.0, 1.0]],     # IoU 0 -> background
                       np.float32)
    np.testing.assert_array_equal(sw.label_windows(windows, gt_boxes, [3]), [4, 4, -1, 0])
    np.testing.assert_array_equal(sw.label_windows(windows, np.zeros((0, 4)), []), [0, 0, 0, 0])
    crops, labels = sw.window_training_set([scene(2, "train")], IMAGE_SIZE, WINDOW_SIZES)
    assert crops.shape[1:] == (32, 32, 3) and len(crops) == len(labels)
    assert set(np.unique(labels)) <= set(range(6))


def test_detect_contract_and_empty_image():
    detector = sw.SlidingWindowDetector(classifier(3), image_size=IMAGE_SIZE,
                                        window_sizes=WINDOW_SIZES, max_detections=10,
                                        score_threshold=0.0)
    images = np.stack([scene(3)["image"], np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)])
    for mode in sw.MODES:
        out = detector.detect(images, mode=mode)
        assert out["boxes"].shape == (2, 10, 4) and out["classes"].shape == (2, 10)
        for b in range(2):
            n = out["num_detections"][b]
            assert (out["classes"][b, n:] == -1).all() and (out["scores"][b, n:] == 0).all()
            assert ((out["classes"][b, :n] >= 0) & (out["classes"][b, :n] < 5)).all()
    np.testing.assert_allclose(detector.detect(images, mode="loop")["scores"],
                               detector.detect(images, mode="conv")["scores"], atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        detector.detect(images, mode="dense")


def test_time_detection_returns_both_timings():
    detector = sw.SlidingWindowDetector(classifier(4), image_size=IMAGE_SIZE,
                                        window_sizes=WINDOW_SIZES)
    timing = sw.time_detection(detector, scene(4)["image"][None])
    assert timing["loop_seconds_per_image"] > 0 and timing["conv_seconds_per_image"] > 0
    assert timing["speedup"] == pytest.approx(
        timing["loop_seconds_per_image"] / timing["conv_seconds_per_image"])
    assert timing["windows_per_image"] == 14 * 14 + 9 * 9 + 3 * 3


def test_drawing_helpers_run():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detector = sw.SlidingWindowDetector(classifier(5), image_size=IMAGE_SIZE,
                                        window_sizes=WINDOW_SIZES)
    image = scene(5)["image"]
    figure = sw.draw_windows(image, window_sizes=(24, 48))
    assert len(figure.axes) == 2
    figure = sw.draw_score_maps(detector, image, window_side=32, class_index=2)
    assert "largest" in figure.axes[3].get_title()  # the difference panel
    plt.close("all")
    with pytest.raises(ValueError, match="window_side"):
        sw.draw_score_maps(detector, image, window_side=40)


def test_fast_run_of_the_sliding_windows_variant(tmp_path):
    """train_rcnn.py --variant sliding_windows: same data and evaluation as the detectors, both
    timings, and the window grid's recall."""
    import json

    from ch05_detection import train_rcnn

    out = tmp_path / "sliding"
    train_rcnn.main(["--variant", "sliding_windows", "--fast", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_map50"] == pytest.approx(saved["val_pycocotools_map50"], abs=1e-6)
    assert saved["seconds_per_image_loop"] > 0 and saved["seconds_per_image_conv"] > 0
    assert saved["max_score_map_difference"] < TOLERANCE
    # FAST is 64 px: window sides 12, 16, 24, 32 -> 35, 25, 14 and 9 positions per side.
    assert saved["window_sizes"] == [12, 16, 24, 32]
    assert saved["windows_per_image"] == 35 ** 2 + 25 ** 2 + 14 ** 2 + 9 ** 2
    assert 0 <= saved["proposal_recall_70"] <= saved["proposal_recall_50"] <= 1
    for name in ("detections.png", "window_classifier.keras", "val_detections.json"):
        assert (out / name).exists(), name
