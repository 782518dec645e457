"""R-CNN and Fast R-CNN (ch05_detection/rcnn.py, train_rcnn.py): selective search, warping with
context, hard-negative mining, box-regression targets, both detectors on the interface, and a
FAST run of each variant.

Run: python -m pytest -q tests/test_ch05_rcnn.py
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import detection_head, rcnn, rcnn_figures, train_rcnn
from common import data as common_data

SIZE = 64
SMALL = {"image_size": (SIZE, SIZE), "backbone_options": {"filters": [8, 16, 32, 64]},
         "max_proposals": 40, "max_detections": 10, "flip_augment": False}


# ----------------------------------------------------------------------------------
# selective search and proposal recall
# ----------------------------------------------------------------------------------
def square_image():
    image = np.full((SIZE, SIZE, 3), 0.2, np.float32)
    image[16:48, 20:44] = (0.9, 0.1, 0.1)  # a red 32 x 24 rectangle
    return image


def test_selective_search_finds_a_plain_rectangle():
    image = square_image()
    proposals = rcnn.selective_search(image, max_proposals=300, min_size=4)
    assert proposals.dtype == np.float32 and proposals.shape[1] == 4
    assert (proposals >= 0).all() and (proposals <= 1).all()
    truth = np.array([[16 / SIZE, 20 / SIZE, 48 / SIZE, 44 / SIZE]], np.float32)
    assert rcnn.proposal_recall([proposals], [truth])[0.7] == 1.0
    # The same image gives the same proposals (OpenCV's order is random: we sort).
    np.testing.assert_array_equal(proposals, rcnn.selective_search(image, max_proposals=300))


def test_filter_proposals_by_hand():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5],
                      [0.0, 0.0, 0.5, 0.5],      # duplicate
                      [0.1, 0.1, 0.12, 0.6],     # 2 x 50 pixels at 100 px: too thin
                      [0.2, 0.2, 1.0, 1.0],      # the largest
                      [0.5, 0.5, 0.6, 0.6]], np.float32)
    kept = rcnn.filter_proposals(boxes, (100, 100), min_size=4, max_proposals=10)
    np.testing.assert_allclose(kept, [[0.2, 0.2, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5],
                                      [0.5, 0.5, 0.6, 0.6]])
    assert len(rcnn.filter_proposals(boxes, (100, 100), min_size=4, max_proposals=2)) == 2


def test_proposal_recall_by_hand():
    gt = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], np.float32)
    proposals = np.array([[0.0, 0.0, 0.5, 0.5],      # IoU 1 with the first box
                          [0.5, 0.5, 1.0, 0.8]], np.float32)  # IoU 0.6 with the second
    recall = rcnn.proposal_recall([proposals], [gt])
    assert recall == {0.5: 1.0, 0.7: 0.5}
    # An image without objects does not count; one without proposals misses its boxes.
    recall = rcnn.proposal_recall([proposals, np.zeros((0, 4)), np.zeros((3, 4))],
                                  [gt, gt[:1], np.zeros((0, 4))])
    assert recall == {0.5: pytest.approx(2 / 3), 0.7: pytest.approx(1 / 3)}


def test_proposal_cache_computes_each_image_once(tmp_path):
    images = [square_image(), np.zeros((SIZE, SIZE, 3), np.uint8)]
    cache = rcnn.ProposalCache(tmp_path, max_proposals=50)
    first = cache.get(images)
    assert cache.computed_images == 2 and cache.path.is_file()
    again = rcnn.ProposalCache(tmp_path, max_proposals=50)
    second = again.get(images[::-1])
    assert again.computed_images == 0
    for a, b in zip(first, second[::-1]):
        np.testing.assert_array_equal(a, b)
    # Other settings, another file.
    assert rcnn.ProposalCache(tmp_path, max_proposals=20).path != cache.path


# ----------------------------------------------------------------------------------
# warping with context (R-CNN appendix A)
# ----------------------------------------------------------------------------------
def two_colour_image(top, left, bottom, right, inside=(1.0, 0.5, 0.0), outside=(0.0, 0.25, 1.0)):
    image = np.empty((100, 100, 3), np.float32)
    image[:] = outside
    image[top:bottom, left:right] = inside
    return image


def test_dilate_boxes_by_hand():
    # 4 px of context at 32 px: the box fills the inner 24 px, so each side grows by 4/24 of it.
    dilated = rcnn.dilate_boxes([[0.2, 0.2, 0.8, 0.8]], 32, 4.0).numpy()
    np.testing.assert_allclose(dilated, [[0.1, 0.1, 0.9, 0.9]], atol=1e-6)
    # The paper's numbers: 16 px at 227 px, the region fills 195 px.
    dilated = rcnn.dilate_boxes([[0.0, 0.0, 195.0, 390.0]], 227, 16.0).numpy()
    np.testing.assert_allclose(dilated, [[-16.0, -32.0, 211.0, 422.0]], atol=1e-4)
    assert rcnn.default_context_pixels(227) == 16.0
    with pytest.raises(ValueError, match="context_pixels"):
        rcnn.dilate_boxes([[0, 0, 1, 1]], 32, 16.0)


def test_warp_with_context_by_hand():
    # A 60 x 60 square at pixels 20..79 of a 100 x 100 image, warped to 32 px with 4 px of
    # context: the grid covers pixels 10..90 in steps of 2.5, so output rows/columns 4..27 sample
    # the square and 0..3, 28..31 the surroundings (cell centres at 18.75 and 21.25, 78.75 and
    # 81.25 fall on either side of its edges).
    inside, outside = np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.25, 1.0])
    image = two_colour_image(20, 20, 80, 80, inside, outside)
    crop = rcnn.warp_regions(image[None], [[0.2, 0.2, 0.8, 0.8]], [0], 32, 4.0).numpy()[0]
    expected = np.empty((32, 32, 3), np.float32)
    expected[:] = outside
    expected[4:28, 4:28] = inside
    np.testing.assert_allclose(crop, expected, atol=1e-5)
    # Without context the square fills the whole output.
    crop = rcnn.warp_regions(image[None], [[0.2, 0.2, 0.8, 0.8]], [0], 32, 0.0).numpy()[0]
    np.testing.assert_allclose(crop, np.broadcast_to(inside, crop.shape), atol=1e-5)


def test_warp_context_outside_the_image_is_the_mean_colour():
    # Square at pixels 0..59: the dilated box starts at -10 px, so the first 4 output rows and
    # columns lie outside the image and read its mean colour.
    inside, outside = np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.25, 1.0])
    image = two_colour_image(0, 0, 60, 60, inside, outside)
    crop = rcnn.warp_regions(image[None], [[0.0, 0.0, 0.6, 0.6]], [0], 32, 4.0).numpy()[0]
    mean = image.mean(axis=(0, 1))
    np.testing.assert_allclose(crop[:4], np.broadcast_to(mean, (4, 32, 3)), atol=1e-5)
    np.testing.assert_allclose(crop[:, :4], np.broadcast_to(mean, (32, 4, 3)), atol=1e-5)
    np.testing.assert_allclose(crop[5:27, 5:27], np.broadcast_to(inside, (22, 22, 3)), atol=1e-5)


# ----------------------------------------------------------------------------------
# SVMs with hard-negative mining, box regression
# ----------------------------------------------------------------------------------
def test_select_hard_negatives_keeps_the_highest_scoring_new_ones():
    scores = np.array([0.5, -2.0, 3.0, -0.5, 1.0, -0.9])
    in_cache = np.array([False, False, False, False, True, False])
    # Index 4 is cached already, index 1 is outside the margin (-1): the rest by score.
    np.testing.assert_array_equal(rcnn.select_hard_negatives(scores, in_cache, 2), [2, 0])
    np.testing.assert_array_equal(rcnn.select_hard_negatives(scores, in_cache, 10), [2, 0, 3, 5])
    assert len(rcnn.select_hard_negatives(scores, in_cache, 0)) == 0


def test_hard_negative_mining_removes_the_false_positives():
    # Class 0: positives near x = 2; 2000 easy negatives near x = -2 and 20 hard ones near
    # x = 1, which 30 random negatives almost surely miss: the first SVM fires on the hard
    # ones, mining adds them, the next SVM does not.
    rng = np.random.default_rng(0)
    positives = rng.normal([2.0, 0.0], 0.1, (50, 2))
    easy = rng.normal([-2.0, 0.0], 0.3, (2000, 2))
    hard = rng.normal([1.0, 0.0], 0.05, (20, 2))
    features = np.concatenate([positives, easy, hard]).astype(np.float32)
    is_positive = np.arange(len(features)) < 50
    weights, bias, history = rcnn.train_svms(
        features, is_positive[:, None], ~is_positive[:, None], rounds=3, C=1.0,
        initial_negatives=30, hard_negatives_per_round=40, seed=0)
    false_positives = [r["false_positives"][0] for r in history]
    assert false_positives[0] >= 15 and false_positives[-1] == 0
    # Only negatives inside the margin are added: the hard cluster (minus any drawn at random),
    # not 40 of the easy ones.
    added = history[0]["hard_added"][0]
    assert 15 <= added <= 20 and history[1]["cache"][0] == 30 + added
    scores = features @ weights[:, 0] + bias[0]
    assert (scores[:50] > 0).all() and (scores[50:] < 0).all()
    # The score histograms count every negative / positive, and the negatives above 0 are the
    # false positives (0 is a bin edge).
    upper = rcnn.SVM_SCORE_BINS[1:] > 0
    for record in history:
        negatives = np.asarray(record["negative_histogram"][0])
        assert negatives.sum() == 2020 and sum(record["positive_histogram"][0]) == 50
        assert negatives[upper].sum() == record["false_positives"][0]


def test_box_regression_targets_are_encode_boxes():
    regions = np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]],
                       np.float32)
    matched = np.array([[0.12, 0.1, 0.5, 0.52], [0.6, 0.6, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]],
                       np.float32)
    rows, deltas = rcnn.box_regression_targets(regions, matched, [0.8, 0.5, 0.61])
    np.testing.assert_array_equal(rows, [0, 2])  # IoU > 0.6 only
    np.testing.assert_allclose(deltas, box_ops.encode_boxes(
        matched[rows], regions[rows], weights=detection_head.HEAD_BOX_WEIGHTS).numpy(), atol=1e-6)
    # By hand: region centre (0.3, 0.3) size 0.4; box centre (0.31, 0.31) size 0.38 x 0.42.
    np.testing.assert_allclose(deltas[0], [10 * 0.01 / 0.4, 10 * 0.01 / 0.4,
                                           5 * np.log(0.38 / 0.4), 5 * np.log(0.42 / 0.4)],
                               atol=1e-5)
    np.testing.assert_allclose(deltas[1], 0.0, atol=1e-6)


def test_ridge_regressors_fit_their_targets_per_class():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(12, 40)).astype(np.float32)  # more features than pairs
    classes = np.array([0] * 6 + [2] * 6)
    deltas = rng.normal(size=(12, 4)).astype(np.float32)
    kernel, bias = rcnn.train_box_regressors(features, classes, deltas, num_classes=3, alpha=1e-6)
    assert kernel.shape == (40, 12) and bias.shape == (12,)
    predicted = features @ kernel + bias  # [12, 3 * 4]
    np.testing.assert_allclose(predicted[:6, 0:4], deltas[:6], atol=1e-3)
    np.testing.assert_allclose(predicted[6:, 8:12], deltas[6:], atol=1e-3)
    assert (kernel[:, 4:8] == 0).all()  # class 1 had no pairs: its regions stay put


# ----------------------------------------------------------------------------------
# the two detectors on the interface
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    dataset = common_data.load("shapes", "train", image_size=SIZE, num_examples=4, seed=0)
    batch = next(iter(common_data.batch_detection(dataset, 4, 8, drop_remainder=True)))
    proposals, counts = rcnn.selective_search_batch(batch["image"].numpy(), max_proposals=40)
    return dict(batch, proposals=tf.constant(proposals), num_proposals=tf.constant(counts))


def build(kind, seed=0):
    keras.utils.set_random_seed(seed)
    if kind == "rcnn":
        return rcnn.RCNN(5, region_size=32, **SMALL)
    return rcnn.FastRCNN(5, rois_per_image=16, **SMALL)


@pytest.mark.parametrize("kind", ["rcnn", "fast_rcnn"])
def test_detector_shapes_empty_image_and_save_load(kind, batch, tmp_path):
    model = build(kind)
    if kind == "rcnn":  # give the SVMs and regressors weights, so the round trip means something
        rng = np.random.default_rng(0)
        model.set_svms(rng.normal(size=(64, 5)), rng.normal(size=5), 3.0)
        model.set_box_regressors(0.01 * rng.normal(size=(64, 20)), np.zeros(20))
    outputs = model(batch["image"], proposals=batch["proposals"],
                    num_proposals=batch["num_proposals"])
    num_proposals = batch["proposals"].shape[1]
    assert outputs["class_logits"].shape == (4, num_proposals, 6)
    assert outputs["box_deltas"].shape == (4, num_proposals, 5, 4)
    if kind == "rcnn":
        assert outputs["svm_scores"].shape == (4, num_proposals, 5)
    # An image without objects gives finite losses.
    empty = dict(batch, boxes=tf.zeros_like(batch["boxes"]),
                 classes=tf.fill(tf.shape(batch["classes"]), -1))
    for name, value in model.compute_losses(empty).items():
        assert np.isfinite(value.numpy()), name
    # The detect contract, with selective search inside the graph.
    detections = model.detect(batch["image"].numpy())
    assert detections["boxes"].shape == (4, 10, 4)
    for b in range(4):
        n = detections["num_detections"][b]
        assert (detections["classes"][b, n:] == -1).all()
        assert (detections["scores"][b, n:] == 0).all()
    # Save and load: the same outputs.
    path = tmp_path / f"{kind}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    again = loaded(batch["image"], proposals=batch["proposals"],
                   num_proposals=batch["num_proposals"])
    for key in outputs:
        np.testing.assert_allclose(again[key].numpy(), outputs[key].numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["rcnn", "fast_rcnn"])
def test_fit_on_a_fixed_batch_reduces_the_loss(kind, batch):
    model = build(kind, seed=1)
    # Training mode (batch statistics): a few steps move BatchNorm's moving averages too little
    # for an inference-mode loss to show what was learnt. Step 0: the same sampled regions.
    before = float(model.compute_losses(batch, training=True)["loss"])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(5), epochs=1, verbose=0)
    after = float(model.compute_losses(batch, training=True)["loss"])
    assert after < 0.7 * before, (before, after)


def test_decode_ablations_by_hand(batch):
    """``decode(scorer=..., box_regression=False)``: the softmax without its background column,
    and the regions themselves, checked against NumPy."""
    model = build("rcnn")
    rng = np.random.default_rng(1)
    model.set_svms(rng.normal(size=(64, 5)), rng.normal(size=5), 3.0)
    model.set_box_regressors(0.05 * rng.normal(size=(64, 20)), 0.1 * np.ones(20))
    outputs = model(batch["image"], proposals=batch["proposals"],
                    num_proposals=batch["num_proposals"])
    logits = outputs["class_logits"].numpy().astype(np.float64)
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(model.region_scores(outputs, "softmax").numpy(), softmax[..., 1:],
                               atol=1e-6)
    np.testing.assert_allclose(model.region_scores(outputs, "svm").numpy(),
                               1 / (1 + np.exp(-outputs["svm_scores"].numpy())), atol=1e-6)
    fixed = model.regressed_boxes(outputs, box_regression=False).numpy()
    np.testing.assert_array_equal(fixed, np.repeat(batch["proposals"].numpy()[:, :, None], 5, 2))
    moved = model.regressed_boxes(outputs).numpy()
    assert np.abs(moved - fixed).max() > 1e-3  # the regressors move the regions
    # Without regression every detection is one of the image's proposals.
    detections = model.decode(outputs, scorer="softmax", box_regression=False)
    for b in range(4):
        n = int(detections["num_detections"][b])
        iou = box_ops.pairwise_iou(detections["boxes"][b, :n], batch["proposals"][b]).numpy()
        assert n == 0 or np.allclose(iou.max(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="scorer"):
        model.region_scores(outputs, "boosting")


def test_configs_refuse_bad_options():
    with pytest.raises(ValueError, match="region_size"):
        rcnn.RCNN(5, region_size=16, **SMALL)
    with pytest.raises(ValueError, match="scorer"):
        rcnn.RCNNConfig(5, scorer="boosting")
    with pytest.raises(ValueError, match="roi_op"):
        rcnn.FastRCNNConfig(5, roi_op="warp")
    with pytest.raises(ValueError, match="selective_search"):
        rcnn.FastRCNNConfig(5, selective_search="slow")


# ----------------------------------------------------------------------------------
# train_rcnn.py
# ----------------------------------------------------------------------------------
def test_help_lists_the_variants(capsys):
    with pytest.raises(SystemExit) as stop:
        train_rcnn.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--variant" in text and "fast_rcnn" in text and "--proposal-cache" in text
    assert "sliding_windows" in text and "--foreground-fraction" in text


def test_bad_options_are_refused_with_the_flag(capsys, tmp_path):
    for flag, value in (("--foreground-fraction", "0"), ("--region-size", "16")):
        with pytest.raises(SystemExit):
            train_rcnn.main(["--variant", "rcnn", "--fast", "--out", str(tmp_path / "run"),
                             flag, value])
        assert flag in capsys.readouterr().err


def test_fast_runs_of_both_variants(tmp_path):
    cache = str(tmp_path / "proposals")
    searched = {}
    for variant in ("rcnn", "fast_rcnn"):
        out = tmp_path / variant
        metrics = train_rcnn.main(["--variant", variant, "--fast", "--out", str(out),
                                   "--proposal-cache", cache])
        saved = json.loads((out / "metrics.json").read_text())
        for key in ("val_map50", "val_map", "train_seconds", "seconds_per_image",
                    "proposals_per_image", "proposal_recall_50", "val_pycocotools_map50"):
            assert key in saved and saved[key] is not None, key
        assert saved["val_map50"] == pytest.approx(saved["val_pycocotools_map50"], abs=1e-6)
        assert 0 < saved["proposals_per_image"] <= 50 and 0 <= saved["proposal_recall_50"] <= 1
        for name in ("detections.png", "proposals.png", f"{variant}.keras",
                     "val_detections.json"):
            assert (out / name).exists(), name
        searched[variant] = metrics["proposal_images_searched"]
    assert (tmp_path / "rcnn" / "hard_negatives.png").exists()
    assert len(saved.get("svm_false_positives_per_round", [])) == 0  # fast_rcnn has no SVMs
    rcnn_metrics = json.loads((tmp_path / "rcnn" / "metrics.json").read_text())
    assert len(rcnn_metrics["svm_false_positives_per_round"]) == 3
    # The ablation decodes outputs computed on the cached proposals; the evaluation ran
    # selective search inside detect: the same regions, so the SVM row is the headline number.
    ablations = rcnn_metrics["ablations"]
    assert set(ablations) == {"svm", "softmax", "svm_without_box_regression",
                              "softmax_without_box_regression"}
    assert ablations["svm"]["val_map50"] == pytest.approx(rcnn_metrics["val_map50"], abs=1e-4)
    # The second variant read every proposal from the cache the first one wrote.
    assert searched["rcnn"] == 24 and searched["fast_rcnn"] == 0


def test_drawing_helpers_run(batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = batch["image"][0].numpy()
    figure = rcnn_figures.draw_region_filtering(image, max_proposals=10, gt_boxes=batch["boxes"][0])
    assert figure.axes[1].get_title() == "after filtering: 10"
    rcnn_figures.draw_warped_regions(image, batch["proposals"][0][:3], region_size=32)
    _, _, history = rcnn.train_svms(np.eye(4, dtype=np.float32).repeat(5, 0),
                                    np.arange(20)[:, None] < 5, np.arange(20)[:, None] >= 5,
                                    rounds=2, initial_negatives=5, hard_negatives_per_round=5)
    record = {"svm_score_bins": rcnn.SVM_SCORE_BINS.tolist(),
              "svm_negative_score_histograms": [r["negative_histogram"] for r in history],
              "svm_positive_score_histograms": [r["positive_histogram"] for r in history]}
    assert len(rcnn_figures.draw_svm_scores(record, 0).axes) == 2
    model = build("rcnn")
    example = {"image": image, "boxes": batch["boxes"][0].numpy()[:1]}
    rcnn_figures.draw_box_regression(model, example, batch["proposals"][0][:5].numpy(), count=3)
    plt.close("all")
