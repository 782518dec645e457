"""Tests for ch05_detection/evaluate.py.

References: hand-computed AP values (VOC 11-point and all-point, COCO 101-point) and
the official pycocotools COCOeval run on our own COCO JSON export, on random and on
hand-made edge cases (no ground truth in an image, a class with no detections, a class
with no ground truth, no detections at all, more than 100 detections in an image).
"""

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from ch05_detection import evaluate as E

CLASS_NAMES = ("circle", "square", "triangle")


def det(boxes, classes, scores):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "classes": np.asarray(classes, np.int32), "scores": np.asarray(scores, np.float32)}


def gt(boxes, classes):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "classes": np.asarray(classes, np.int32)}


def pycocotools_map(tmp_path, ground_truth, detections, image_sizes, class_names=CLASS_NAMES):
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dt.json"
    E.to_coco_json(ground_truth, detections, image_sizes, class_names, gt_path, det_path)
    return E.coco_map_with_pycocotools(gt_path, det_path)  # pathlib.Path works too


def assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, image_sizes,
                                   tolerance=1e-6):
    ours = E.evaluate_detections(ground_truth, detections, num_classes=len(CLASS_NAMES))
    theirs = pycocotools_map(tmp_path, ground_truth, detections, image_sizes)
    for key in ("map", "map50", "map75"):
        assert ours[key] == pytest.approx(theirs[key], abs=tolerance), key
    return ours, theirs


# ------------------------------------------------------------------ AP by hand
# 3 ground-truth boxes; 5 detections by decreasing score: hit, miss, hit, miss, hit.
HAND_RECALL = np.array([1, 1, 2, 2, 3]) / 3
HAND_PRECISION = np.array([1 / 1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
# All-point: envelope 1 on recall (0, 1/3], 2/3 on (1/3, 2/3], 0.6 on (2/3, 1].
HAND_ALL_POINT = (1 + 2 / 3 + 0.6) / 3
# 11-point: r = 0 .. 0.3 -> 1 (4 points), 0.4 .. 0.6 -> 2/3 (3), 0.7 .. 1.0 -> 0.6 (4).
HAND_11_POINT = (4 * 1 + 3 * 2 / 3 + 4 * 0.6) / 11
# COCO 101-point: r = 0.00 .. 0.33 -> 1 (34), 0.34 .. 0.66 -> 2/3 (33), 0.67 .. 1 -> 0.6 (34).
HAND_101_POINT = (34 * 1 + 33 * 2 / 3 + 34 * 0.6) / 101


def test_voc_ap_by_hand():
    assert E.voc_ap(HAND_RECALL, HAND_PRECISION) == pytest.approx(HAND_ALL_POINT, abs=1e-12)
    assert E.voc_ap(HAND_RECALL, HAND_PRECISION, use_11_point=True) == pytest.approx(
        HAND_11_POINT, abs=1e-12)
    assert E.voc_ap([], []) == 0.0
    assert E.voc_ap([1.0], [1.0]) == pytest.approx(1.0)
    assert E.voc_ap([1.0], [1.0], use_11_point=True) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="recall"):
        E.voc_ap([0.1, 0.2], [1.0])


def hand_example():
    gt_boxes = [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.7, 0.7], [0.1, 0.6, 0.3, 0.9]]
    far = [0.8, 0.0, 0.9, 0.1]
    boxes = [gt_boxes[0], far, gt_boxes[1], far, gt_boxes[2]]
    return ([gt(gt_boxes, [0, 0, 0])],
            [det(boxes, [0] * 5, [0.9, 0.8, 0.7, 0.6, 0.5])])


def test_hand_example_through_evaluate_and_pycocotools(tmp_path):
    ground_truth, detections = hand_example()
    ours, theirs = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, [(100, 120)])
    assert ours["voc_map50"] == pytest.approx(HAND_ALL_POINT, abs=1e-9)
    assert ours["voc07_map50"] == pytest.approx(HAND_11_POINT, abs=1e-9)
    assert ours["map50"] == pytest.approx(HAND_101_POINT, abs=1e-9)
    assert ours["map"] == pytest.approx(HAND_101_POINT, abs=1e-9)  # exact boxes: every IoU
    precision, recall, scores = E.precision_recall_curve(ground_truth, detections, 0)
    np.testing.assert_allclose(precision, HAND_PRECISION, atol=1e-12)
    np.testing.assert_allclose(recall, HAND_RECALL, atol=1e-12)
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7, 0.6, 0.5], atol=1e-6)


# ------------------------------------------------------------------ hand-made edge cases
def test_perfect_detections(tmp_path):
    ground_truth = [gt([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]], [0, 1]),
                    gt([[0.2, 0.3, 0.6, 0.7]], [2])]
    detections = [det(g["boxes"], g["classes"], [0.9] * len(g["classes"])) for g in ground_truth]
    ours, _ = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections,
                                             [(100, 100), (64, 80)])
    for key in ("map", "map50", "map75", "voc_map50", "voc07_map50"):
        assert ours[key] == pytest.approx(1.0), key


def test_image_without_ground_truth_gives_false_positives(tmp_path):
    # Image 1 has no objects; its detection outscores the true one: precision [0, 1/2].
    ground_truth = [gt([[0.1, 0.1, 0.5, 0.5]], [0]), gt(np.zeros((0, 4)), [])]
    detections = [det([[0.1, 0.1, 0.5, 0.5]], [0], [0.9]),
                  det([[0.2, 0.2, 0.6, 0.6]], [0], [0.95])]
    ours, _ = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections,
                                             [(50, 50), (50, 50)])
    assert ours["map50"] == pytest.approx(0.5) and ours["voc_map50"] == pytest.approx(0.5)


def test_class_with_ground_truth_but_no_detections(tmp_path):
    ground_truth = [gt([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], [0, 1])]
    detections = [det([[0.1, 0.1, 0.5, 0.5]], [0], [0.8])]
    ours, _ = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, [(60, 90)])
    assert ours["per_class_ap"][:2] == pytest.approx([1.0, 0.0])
    assert ours["map"] == pytest.approx(0.5)


def test_class_without_ground_truth_is_left_out(tmp_path):
    ground_truth = [gt([[0.1, 0.1, 0.5, 0.5]], [0])]
    detections = [det([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]], [0, 2], [0.8, 0.99])]
    ours, _ = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, [(60, 90)])
    assert ours["per_class_ap"] == pytest.approx([1.0, -1.0, -1.0])
    assert ours["map"] == pytest.approx(1.0)


def test_no_detections_at_all_and_no_ground_truth_at_all(tmp_path):
    ground_truth = [gt([[0.1, 0.1, 0.5, 0.5]], [1]), gt(np.zeros((0, 4)), [])]
    empty = [det(np.zeros((0, 4)), [], []), det(np.zeros((0, 4)), [], [])]
    ours = E.evaluate_detections(ground_truth, empty, num_classes=3)
    assert ours["map"] == 0.0 and ours["map50"] == 0.0 and ours["voc_map50"] == 0.0
    assert pycocotools_map(tmp_path, ground_truth, empty, [(10, 10)] * 2)["map"] == 0.0
    no_gt = [gt(np.zeros((0, 4)), [])]
    ours, _ = assert_agrees_with_pycocotools(tmp_path, no_gt, [det([[0, 0, 1, 1]], [0], [0.5])],
                                             [(10, 10)])
    assert ours["map"] == -1.0


def test_padding_rows_are_ignored():
    padded_gt = [gt([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]], [0, -1])]
    padded_det = [det([[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]], [0, -1], [0.9, 0.0])]
    assert E.evaluate_detections(padded_gt, padded_det)["map"] == pytest.approx(1.0)


def test_bad_input_raises_value_error():
    ground_truth, detections = hand_example()
    with pytest.raises(ValueError, match="num_classes"):
        E.evaluate_detections(ground_truth, [det([[0, 0, 1, 1]], [7], [0.5])], num_classes=3)
    with pytest.raises(ValueError, match="one entry per image"):
        E.evaluate_detections(ground_truth, detections * 2)
    with pytest.raises(ValueError, match="boxes"):
        E.evaluate_detections([gt(np.zeros((2, 4)), [0, 0])],
                              [{"boxes": np.zeros((2, 3)), "classes": [0, 0], "scores": [1, 1]}])
    with pytest.raises(ValueError, match="scores"):
        E.evaluate_detections(ground_truth, [{"boxes": np.zeros((0, 4)), "classes": []}])


# ------------------------------------------------------------------ random vs pycocotools
def random_case(seed, num_images=8, crowded_image=False):
    """Random scenes and noisy detections: jittered true boxes, duplicates, wrong
    classes and pure false positives, with continuous random scores (no ties)."""
    rng = np.random.default_rng(seed)
    ground_truth, detections, sizes = [], [], []
    for image in range(num_images):
        count = int(rng.integers(0, 6))
        corner = rng.uniform(0, 0.7, size=(count, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.3, size=(count, 2))], axis=1)
        classes = rng.integers(0, len(CLASS_NAMES), size=count)
        ground_truth.append(gt(boxes, classes))
        det_boxes, det_classes = [], []
        for box, class_id in zip(boxes, classes):
            for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 (a duplicate) detections
                size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
                det_boxes.append(box + rng.normal(0, 0.08, size=4) * size)
                det_classes.append(class_id if rng.uniform() < 0.85 else rng.integers(0, 3))
        extra = 150 if crowded_image and image == 0 else int(rng.integers(0, 4))
        for _ in range(extra):  # false positives anywhere
            corner = rng.uniform(0, 0.8, size=2)
            det_boxes.append(np.concatenate([corner, corner + rng.uniform(0.05, 0.2, size=2)]))
            det_classes.append(0 if crowded_image and image == 0 else rng.integers(0, 3))
        scores = rng.uniform(0.01, 1.0, size=len(det_boxes))
        detections.append(det(np.array(det_boxes).reshape(-1, 4), det_classes, scores))
        sizes.append((int(rng.integers(60, 400)), int(rng.integers(60, 400))))
    return ground_truth, detections, sizes


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_agree_with_pycocotools(seed, tmp_path):
    ground_truth, detections, sizes = random_case(seed)
    ours, theirs = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, sizes)
    assert 0.0 < theirs["map"] < 1.0  # a non-trivial case


def test_more_than_100_detections_in_an_image(tmp_path):
    """COCO keeps the 100 best detections per image and class."""
    ground_truth, detections, sizes = random_case(42, crowded_image=True)
    assert np.sum(detections[0]["classes"] == 0) > 100
    assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, sizes)
    # By hand: 150 false positives outscore the one correct box, which is 151st: cut.
    rng = np.random.default_rng(0)
    corners = rng.uniform(0.6, 0.8, size=(150, 2))
    false_boxes = np.concatenate([corners, corners + 0.1], axis=1)
    truth = [[0.1, 0.1, 0.3, 0.3]]
    ground_truth = [gt(truth, [0])]
    detections = [det(np.concatenate([false_boxes, truth]), [0] * 151,
                      np.concatenate([rng.uniform(0.5, 1.0, 150), [0.1]]))]
    ours, _ = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, [(100, 100)])
    assert ours["map"] == 0.0
    uncapped = E.evaluate_detections(ground_truth, detections, max_detections=1000)
    assert uncapped["map"] == pytest.approx(1 / 151 * 101 / 101, rel=1e-6)


def test_iou_exactly_at_threshold_coco_matches_voc_does_not(tmp_path):
    """COCO counts IoU >= t as a match, the VOC devkit needs IoU > 0.5."""
    ground_truth = [gt([[0.0, 0.0, 0.5, 0.5]], [0])]
    detections = [det([[0.0, 0.0, 0.5, 1.0]], [0], [0.9])]  # IoU exactly 0.25 / 0.5
    ours, _ = assert_agrees_with_pycocotools(tmp_path, ground_truth, detections, [(100, 100)])
    assert ours["map50"] == pytest.approx(1.0) and ours["map75"] == 0.0
    assert ours["voc_map50"] == 0.0


# ------------------------------------------------------------------ export and plots
def test_coco_json_export_by_hand(tmp_path):
    ground_truth = [gt([[0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0]], [1, -1])]
    detections = [det([[0.1, 0.2, 0.5, 0.6]], [1], [0.7])]
    gt_path, det_path = tmp_path / "out" / "gt.json", tmp_path / "out" / "dt.json"
    gt_dict, results = E.to_coco_json(ground_truth, detections, [(100, 200)], CLASS_NAMES,
                                      gt_path, det_path)
    on_disk = json.loads(gt_path.read_text())
    assert on_disk == gt_dict and json.loads(det_path.read_text()) == results
    [annotation] = gt_dict["annotations"]  # the padding row is skipped
    assert annotation["bbox"] == pytest.approx([40.0, 10.0, 80.0, 40.0])  # x, y, w, h pixels
    assert annotation["area"] == pytest.approx(3200.0)
    assert annotation["category_id"] == 2 and annotation["iscrowd"] == 0
    assert gt_dict["images"] == [{"id": 1, "height": 100, "width": 200, "file_name": "000001.png"}]
    assert [c["name"] for c in gt_dict["categories"]] == list(CLASS_NAMES)
    assert results[0]["bbox"] == pytest.approx([40.0, 10.0, 80.0, 40.0])
    assert results[0]["score"] == pytest.approx(0.7) and results[0]["category_id"] == 2
    # Absolute input gives the same file.
    absolute_gt = [gt([[10, 40, 50, 120]], [1])]
    gt_abs, _ = E.to_coco_json(absolute_gt, None, [(100, 200)], CLASS_NAMES, normalized=False)
    assert gt_abs["annotations"][0]["bbox"] == pytest.approx([40.0, 10.0, 80.0, 40.0])


def test_plot_pr_curves(tmp_path):
    ground_truth, detections, _ = random_case(1)
    path = tmp_path / "pr.png"
    figure = E.plot_pr_curves(ground_truth, detections, CLASS_NAMES, save_path=path)
    assert isinstance(figure, Figure) and path.stat().st_size > 1000
    assert len(figure.axes[0].get_lines()) == len(CLASS_NAMES)
