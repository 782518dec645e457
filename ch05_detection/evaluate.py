"""Detection evaluation from scratch: VOC AP and COCO mAP@[.5:.95], PR curves, COCO JSON.

A detector outputs scored boxes; average precision (AP) asks how well the scores
rank correct boxes above wrong ones. For one class: sort all detections of the data
set by score, call a detection a true positive when it overlaps a not-yet-matched
ground-truth box of its class with IoU above a threshold, and trace precision against
recall down the list. AP summarises that curve.

* **PASCAL VOC** (Everingham et al. 2010, sec. 4.2): IoU > 0.5. VOC2007 averages the
  interpolated precision at 11 recall points 0, 0.1, ..., 1 (``use_11_point=True``);
  VOC2010 and later take the exact area under the monotone precision envelope.
  VOC matches a detection to the ground-truth box it overlaps *most*; if that box is
  already taken the detection is a false positive.
* **COCO** (Lin et al. 2014; the ``COCOeval`` rules): IoU >= t for the ten thresholds
  t = 0.50, 0.55, ..., 0.95; a detection takes the best-overlapping ground-truth box
  that is *still free*; at most 100 detections per image and class; precision is
  read at 101 recall points 0, 0.01, ..., 1 from the envelope; AP is averaged over
  thresholds, then over the classes that have ground truth (classes without any get
  -1 and are left out of the mean). ``map50`` and ``map75`` are the same at a single
  threshold.

``evaluate_detections`` computes both from Python lists (one dict per image, the
repo's detection contract: normalized or absolute ``[ymin, xmin, ymax, xmax]`` boxes,
class -1 rows are padding). IoU does not change when both axes are scaled, so
normalized and absolute boxes give the same AP. ``to_coco_json`` exports ground truth
and detections in COCO format and ``coco_map_with_pycocotools`` runs the official
``COCOeval`` on those files; ``tests/test_ch05_evaluate.py`` checks both agree.
Crowd annotations and area ranges (small / medium / large) are not implemented: the
repo's data has no crowd boxes and the chapter reports the "all areas" numbers.

Example::

    from ch05_detection.evaluate import evaluate_detections
    metrics = evaluate_detections(ground_truth, detections, num_classes=5)
    print(metrics["map"], metrics["map50"], metrics["voc_map50"])
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np

# COCOeval's thresholds, built the same way so that 0.7 is exactly its 0.7000000000000001.
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1,
                                  endpoint=True)
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_MAX_DETECTIONS = 100


# ----------------------------------------------------------------------------------
# average precision from a precision-recall curve
# ----------------------------------------------------------------------------------
def voc_ap(recall, precision, use_11_point=False):
    """PASCAL VOC average precision of one class (Everingham et al. 2010).

    Args:
        recall: ``[D]`` recall after each detection, sorted by decreasing score
            (non-decreasing).
        precision: ``[D]`` precision after each detection.
        use_11_point: VOC2007's 11-point interpolated AP instead of the VOC2010+
            area under the precision envelope.
    Returns:
        AP as a float (0 when there are no detections).
    """
    recall = np.asarray(recall, np.float64).reshape(-1)
    precision = np.asarray(precision, np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(
            f"`recall` and `precision` must have the same length, got {recall.shape} and "
            f"{precision.shape}")
    if use_11_point:
        # Interpolated precision at r: the best precision at any recall >= r.
        total = 0.0
        for threshold in np.linspace(0.0, 1.0, 11):
            reached = precision[recall >= threshold]
            total += reached.max() if reached.size else 0.0
        return float(total / 11.0)
    # Area under the envelope: pad the curve, make precision non-increasing from the
    # right, then sum rectangles where the recall changes.
    padded_recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(envelope) - 2, -1, -1):
        envelope[i] = max(envelope[i], envelope[i + 1])
    steps = np.nonzero(padded_recall[1:] != padded_recall[:-1])[0]
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


def coco_interpolated_precision(recall, precision, recall_points=COCO_RECALL_POINTS):
    """COCO's precision at fixed recall points (101 by default), from the envelope.

    The envelope at recall point r is the best precision at the first detection whose
    recall is >= r; points beyond the final recall get 0.
    """
    recall = np.asarray(recall, np.float64)
    envelope = np.asarray(precision, np.float64).copy()
    for i in range(len(envelope) - 2, -1, -1):
        envelope[i] = max(envelope[i], envelope[i + 1])
    positions = np.searchsorted(recall, recall_points, side="left")
    reached = positions < len(envelope)
    interpolated = np.zeros(len(recall_points))
    interpolated[reached] = envelope[positions[reached]]
    return interpolated


# ----------------------------------------------------------------------------------
# input checking
# ----------------------------------------------------------------------------------
def _boxes_array(value, where):
    boxes = np.asarray(value, np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} 'boxes' must be [N, 4] yxyx, got shape {boxes.shape}")
    return boxes


def _prepare(ground_truth, detections, num_classes):
    """Validate the per-image dicts, drop class -1 padding, return clean NumPy lists."""
    if len(ground_truth) != len(detections):
        raise ValueError(
            f"`ground_truth` and `detections` must have one entry per image, got "
            f"{len(ground_truth)} and {len(detections)}")
    clean_gt, clean_dets = [], []
    for index, (gt, det) in enumerate(zip(ground_truth, detections)):
        for key in ("boxes", "classes"):
            if key not in gt:
                raise ValueError(f"ground_truth[{index}] needs keys 'boxes' and 'classes'")
        for key in ("boxes", "classes", "scores"):
            if key not in det:
                raise ValueError(f"detections[{index}] needs keys 'boxes', 'classes', 'scores'")
        gt_boxes = _boxes_array(gt["boxes"], f"ground_truth[{index}]")
        gt_classes = np.asarray(gt["classes"], np.int64).reshape(-1)
        det_boxes = _boxes_array(det["boxes"], f"detections[{index}]")
        det_classes = np.asarray(det["classes"], np.int64).reshape(-1)
        det_scores = np.asarray(det["scores"], np.float64).reshape(-1)
        if len(gt_boxes) != len(gt_classes):
            raise ValueError(f"ground_truth[{index}]: {len(gt_boxes)} boxes but "
                             f"{len(gt_classes)} classes")
        if not len(det_boxes) == len(det_classes) == len(det_scores):
            raise ValueError(f"detections[{index}]: boxes, classes and scores differ in length")
        keep_gt, keep_det = gt_classes != -1, det_classes != -1  # -1 = padding
        gt_boxes, gt_classes = gt_boxes[keep_gt], gt_classes[keep_gt]
        det_boxes, det_classes, det_scores = (det_boxes[keep_det], det_classes[keep_det],
                                              det_scores[keep_det])
        for name, classes in (("ground_truth", gt_classes), ("detections", det_classes)):
            bad = (classes < 0) | ((classes >= num_classes) if num_classes is not None else False)
            if np.any(bad):
                raise ValueError(
                    f"{name}[{index}] has class ids {np.unique(classes[bad]).tolist()}; "
                    f"expected 0 <= class < num_classes={num_classes} (or -1 for padding)")
        clean_gt.append((gt_boxes, gt_classes))
        clean_dets.append((det_boxes, det_classes, det_scores))
    if num_classes is None:
        largest = [c.max() for _, c in clean_gt if c.size] + [c.max() for _, c, _ in clean_dets
                                                              if c.size]
        num_classes = int(max(largest)) + 1 if largest else 0
    return clean_gt, clean_dets, num_classes


def _iou_matrix(boxes_a, boxes_b):
    """NumPy pairwise IoU, yxyx, [N, 4] x [M, 4] -> [N, M] (0 for empty boxes)."""
    top = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    left = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    bottom = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    right = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    intersection = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)

    def area(boxes):
        heights = np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
        return heights * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)

    union = area(boxes_a)[:, None] + area(boxes_b)[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


# ----------------------------------------------------------------------------------
# matching
# ----------------------------------------------------------------------------------
def _coco_match_class(clean_gt, clean_dets, class_id, iou_thresholds, max_detections):
    """COCO matching of one class over all images.

    Returns:
        scores ``[D]`` sorted by decreasing score, true_positive ``[T, D]`` bool,
        and the number of ground-truth boxes of the class.
    """
    all_scores, all_hits, num_gt = [], [], 0
    for (gt_boxes, gt_classes), (det_boxes, det_classes, det_scores) in zip(clean_gt, clean_dets):
        gt = gt_boxes[gt_classes == class_id]
        in_class = det_classes == class_id
        boxes, scores = det_boxes[in_class], det_scores[in_class]
        num_gt += len(gt)
        if len(gt) == 0 and len(boxes) == 0:
            continue
        # Highest score first (stable, like COCOeval), at most max_detections per image.
        order = np.argsort(-scores, kind="mergesort")[:max_detections]
        boxes, scores = boxes[order], scores[order]
        ious = _iou_matrix(boxes, gt)  # [D, G]
        hits = np.zeros((len(iou_thresholds), len(boxes)), bool)
        for t, threshold in enumerate(iou_thresholds):
            taken = np.zeros(len(gt), bool)
            for d in range(len(boxes)):
                # The free ground-truth box with the highest IoU >= threshold (COCOeval
                # keeps the last one on a tie, and caps the threshold just below 1).
                best_iou, best_gt = min(threshold, 1 - 1e-10), -1
                for g in range(len(gt)):
                    if not taken[g] and ious[d, g] >= best_iou:
                        best_iou, best_gt = ious[d, g], g
                if best_gt >= 0:
                    taken[best_gt] = True
                    hits[t, d] = True
        all_scores.append(scores)
        all_hits.append(hits)
    if not all_scores:
        return np.zeros(0), np.zeros((len(iou_thresholds), 0), bool), num_gt
    scores = np.concatenate(all_scores)
    hits = np.concatenate(all_hits, axis=1)
    order = np.argsort(-scores, kind="mergesort")
    return scores[order], hits[:, order], num_gt


def _precision_recall(hits, num_gt):
    """Cumulative precision and recall down a score-sorted list of hit flags."""
    true_positives = np.cumsum(hits).astype(np.float64)
    false_positives = np.cumsum(~hits).astype(np.float64)
    recall = true_positives / max(num_gt, 1)
    # np.spacing(1) as in COCOeval: avoids 0/0 without changing any real value.
    precision = true_positives / (true_positives + false_positives + np.spacing(1))
    return precision, recall


def _voc_match_class(clean_gt, clean_dets, class_id, iou_threshold=0.5):
    """VOC devkit matching of one class: each detection goes to its highest-IoU
    ground-truth box; a hit if IoU > threshold and that box is still free."""
    records = []  # (score, image index, box)
    taken, gt_per_image, num_gt = {}, {}, 0
    for image, ((gt_boxes, gt_classes), (det_boxes, det_classes, det_scores)) in enumerate(
            zip(clean_gt, clean_dets)):
        gt_per_image[image] = gt_boxes[gt_classes == class_id]
        taken[image] = np.zeros(len(gt_per_image[image]), bool)
        num_gt += len(gt_per_image[image])
        for box, score in zip(det_boxes[det_classes == class_id],
                              det_scores[det_classes == class_id]):
            records.append((score, image, box))
    order = np.argsort([-r[0] for r in records], kind="mergesort")
    hits = np.zeros(len(records), bool)
    for position, index in enumerate(order):
        _, image, box = records[index]
        gt = gt_per_image[image]
        if len(gt) == 0:
            continue
        ious = _iou_matrix(box[None, :], gt)[0]
        best = int(np.argmax(ious))
        if ious[best] > iou_threshold and not taken[image][best]:
            taken[image][best] = True
            hits[position] = True
    return hits, num_gt


# ----------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------
def evaluate_detections(ground_truth, detections, num_classes=None,
                        iou_thresholds=COCO_IOU_THRESHOLDS,
                        max_detections=COCO_MAX_DETECTIONS, class_names=None):
    """COCO mAP@[.5:.95], AP50, AP75 and VOC AP50 of a set of detections.

    Args:
        ground_truth: list (one per image) of dicts ``boxes [N, 4]`` yxyx (normalized or
            absolute, the same as the detections), ``classes [N]`` (0-based, -1 = padding).
        detections: list (one per image, same order) of dicts ``boxes [D, 4]``,
            ``classes [D]``, ``scores [D]``.
        num_classes: number of foreground classes; default: largest id seen + 1.
        iou_thresholds: COCO thresholds averaged into ``map`` (default 0.50:0.05:0.95).
        max_detections: COCO's per-image, per-class cap (100).
        class_names: optional names, used for the ``per_class`` table.
    Returns:
        dict with ``map``, ``map50``, ``map75`` (COCO, 101-point; ``map50`` / ``map75``
        are None if that threshold is not in ``iou_thresholds``), ``voc_map50``
        (all-point, VOC2010+), ``voc07_map50`` (11-point), and per-class lists
        ``per_class_ap``, ``per_class_ap50``, ``per_class_voc_ap50``, ``num_ground_truth``.
        Classes with no ground truth get -1 and are left out of every mean; with no
        ground truth at all every mean is -1 (as COCOeval reports).
    """
    clean_gt, clean_dets, num_classes = _prepare(ground_truth, detections, num_classes)
    iou_thresholds = np.asarray(iou_thresholds, np.float64).reshape(-1)
    if iou_thresholds.size == 0 or np.any((iou_thresholds <= 0) | (iou_thresholds > 1)):
        raise ValueError(f"`iou_thresholds` must be values in (0, 1], got {iou_thresholds}")
    if int(max_detections) < 1:
        raise ValueError(f"`max_detections` must be >= 1, got {max_detections}")
    if class_names is not None and len(class_names) < num_classes:
        raise ValueError(f"`class_names` has {len(class_names)} names for {num_classes} classes")

    per_threshold_ap = np.full((num_classes, len(iou_thresholds)), -1.0)
    voc_ap50 = np.full(num_classes, -1.0)
    voc07_ap50 = np.full(num_classes, -1.0)
    num_ground_truth = np.zeros(num_classes, np.int64)
    for class_id in range(num_classes):
        _, hits, num_gt = _coco_match_class(clean_gt, clean_dets, class_id, iou_thresholds,
                                            int(max_detections))
        num_ground_truth[class_id] = num_gt
        if num_gt == 0:
            continue  # COCOeval leaves such a class at -1
        for t in range(len(iou_thresholds)):
            precision, recall = _precision_recall(hits[t], num_gt)
            per_threshold_ap[class_id, t] = coco_interpolated_precision(recall, precision).mean()
        voc_hits, _ = _voc_match_class(clean_gt, clean_dets, class_id, 0.5)
        precision, recall = _precision_recall(voc_hits, num_gt)
        voc_ap50[class_id] = voc_ap(recall, precision)
        voc07_ap50[class_id] = voc_ap(recall, precision, use_11_point=True)

    has_gt = num_ground_truth > 0

    def mean(values):
        return float(np.mean(values[has_gt])) if np.any(has_gt) else -1.0

    def at(threshold):
        match = np.nonzero(np.isclose(iou_thresholds, threshold))[0]
        return None if match.size == 0 else per_threshold_ap[:, match[0]]

    per_class_ap = np.where(has_gt, per_threshold_ap.mean(axis=1), -1.0)
    ap50, ap75 = at(0.5), at(0.75)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    return {
        "map": mean(per_class_ap),
        "map50": None if ap50 is None else mean(ap50),
        "map75": None if ap75 is None else mean(ap75),
        "voc_map50": mean(voc_ap50),
        "voc07_map50": mean(voc07_ap50),
        "per_class_ap": per_class_ap.tolist(),
        "per_class_ap50": None if ap50 is None else ap50.tolist(),
        "per_class_voc_ap50": voc_ap50.tolist(),
        "num_ground_truth": num_ground_truth.tolist(),
        "class_names": names[:num_classes],
    }


def precision_recall_curve(ground_truth, detections, class_id, iou_threshold=0.5,
                           max_detections=COCO_MAX_DETECTIONS):
    """Precision and recall of one class down the score-sorted detections (COCO matching).

    Returns:
        ``(precision [D], recall [D], scores [D])``, D = detections of the class, highest
        score first. Recall is 0 everywhere if the class has no ground truth.
    """
    clean_gt, clean_dets, _ = _prepare(ground_truth, detections, None)
    scores, hits, num_gt = _coco_match_class(clean_gt, clean_dets, int(class_id),
                                             [float(iou_threshold)], int(max_detections))
    precision, recall = _precision_recall(hits[0], num_gt)
    return precision, recall, scores


def plot_pr_curves(ground_truth, detections, class_names=None, iou_threshold=0.5,
                   num_classes=None, save_path=None, title=None):
    """One precision-recall curve per class (COCO matching at ``iou_threshold``).

    Returns:
        a matplotlib ``Figure`` (created without pyplot, so it works headless); written
        to ``save_path`` as PNG when given.
    """
    from matplotlib.figure import Figure

    _, _, inferred = _prepare(ground_truth, detections, num_classes)
    num_classes = num_classes if num_classes is not None else inferred
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot(1, 1, 1)
    for class_id in range(num_classes):
        precision, recall, _ = precision_recall_curve(ground_truth, detections, class_id,
                                                      iou_threshold)
        name = class_names[class_id] if class_names is not None else f"class {class_id}"
        if len(precision) == 0:
            axes.plot([], [], label=f"{name} (no detections)")
            continue
        interpolated = coco_interpolated_precision(recall, precision)
        ap = float(interpolated.mean())
        # Draw the raw curve starting at recall 0 with the first precision.
        axes.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]),
                  label=f"{name} (AP {ap:.3f})")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    axes.set_title(title or f"Precision-recall at IoU {iou_threshold:g}")
    figure.tight_layout()
    if save_path is not None:
        figure.savefig(save_path, dpi=100)
    return figure


# ----------------------------------------------------------------------------------
# COCO JSON export and the pycocotools cross-check
# ----------------------------------------------------------------------------------
def _to_pixel_xywh(boxes, height, width, normalized):
    """yxyx (normalized or pixels) -> COCO [x, y, width, height] in pixels."""
    if normalized:
        boxes = boxes * np.array([height, width, height, width], np.float64)
    return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                     boxes[:, 2] - boxes[:, 0]], axis=1)


def to_coco_json(ground_truth, detections, image_sizes, class_names, gt_path=None,
                 det_path=None, normalized=True):
    """COCO-format ground truth and results, optionally written as JSON files.

    Image ``i`` gets id ``i + 1`` and class ``c`` category id ``c + 1`` (COCO ids start
    at 1). Boxes become absolute ``[x, y, width, height]`` pixels; ``area`` is
    ``width * height`` (no "+1"); ``iscrowd`` is 0. Class -1 rows are skipped.

    Args:
        ground_truth: list of ``{boxes, classes}`` per image (see ``evaluate_detections``).
        detections: list of ``{boxes, classes, scores}`` per image, or None.
        image_sizes: list of ``(height, width)`` in pixels, one per image.
        class_names: the names of the foreground classes.
        gt_path, det_path: where to write the two JSON files (optional).
        normalized: the boxes are in [0, 1] (the repo's contract); False for pixels.
    Returns:
        ``(ground_truth_dict, results_list)``.
    """
    if detections is None:
        detections = [{"boxes": np.zeros((0, 4)), "classes": np.zeros(0), "scores": np.zeros(0)}
                      for _ in ground_truth]
    clean_gt, clean_dets, _ = _prepare(ground_truth, detections, len(class_names))
    if len(image_sizes) != len(clean_gt):
        raise ValueError(f"`image_sizes` needs one (height, width) per image: got "
                         f"{len(image_sizes)} for {len(clean_gt)} images")
    images, annotations, results = [], [], []
    for index, ((gt_boxes, gt_classes), (det_boxes, det_classes, det_scores)) in enumerate(
            zip(clean_gt, clean_dets)):
        height, width = (int(v) for v in image_sizes[index])
        image_id = index + 1
        images.append({"id": image_id, "height": height, "width": width,
                       "file_name": f"{image_id:06d}.png"})
        for box, class_id in zip(_to_pixel_xywh(gt_boxes, height, width, normalized), gt_classes):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": int(class_id) + 1, "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]), "iscrowd": 0})
        for box, class_id, score in zip(_to_pixel_xywh(det_boxes, height, width, normalized),
                                        det_classes, det_scores):
            results.append({"image_id": image_id, "category_id": int(class_id) + 1,
                            "bbox": [float(v) for v in box], "score": float(score)})
    ground_truth_dict = {
        "info": {"description": "exported by ch05_detection.evaluate.to_coco_json"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": str(name)} for i, name in enumerate(class_names)],
    }
    for path, content in ((gt_path, ground_truth_dict), (det_path, results)):
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as file:
                json.dump(content, file)
    return ground_truth_dict, results


def coco_map_with_pycocotools(gt_json_path, det_json_path, verbose=False, iou_type="bbox"):
    """Run the official ``pycocotools`` COCOeval on two COCO JSON files: ``iou_type`` "bbox"
    (box IoU) or "segm" (mask IoU on RLE masks, Mask R-CNN's ``ch06_segmentation/mask_rcnn.py``).

    pycocotools cannot load an empty result list; then every class with ground truth
    has AP 0 (and with no ground truth at all the answer is -1, like COCOeval).

    Returns:
        dict ``map`` (AP@[.5:.95]), ``map50``, ``map75``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"`iou_type` must be 'bbox' or 'segm', got {iou_type!r}")
    # loadRes only accepts a str path (a pathlib.Path would be taken for a result list).
    gt_json_path, det_json_path = os.fspath(gt_json_path), os.fspath(det_json_path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        coco_gt = COCO(gt_json_path)
        with open(det_json_path) as file:
            results = json.load(file)
        if not results:
            value = 0.0 if coco_gt.dataset.get("annotations") else -1.0
            return {"map": value, "map50": value, "map75": value}
        coco_dt = coco_gt.loadRes(det_json_path)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(output.getvalue())
    stats = evaluator.stats
    return {"map": float(stats[0]), "map50": float(stats[1]), "map75": float(stats[2])}


# ----------------------------------------------------------------------------------
# Running a detector over examples (shared by the training scripts and the notebooks)
# ----------------------------------------------------------------------------------
def ground_truth_list(examples):
    """The ground truth of a list of detection examples as evaluate_detections takes it:
    one dict per image with ``boxes`` [N, 4] (normalized yxyx) and ``classes`` [N]."""
    return [{"boxes": np.asarray(e["boxes"], np.float32).reshape(-1, 4),
             "classes": np.asarray(e["classes"], np.int32).reshape(-1)} for e in examples]


def run_detection(model, examples, batch_size=16, progress=False):
    """Detections of any chapter-5 detector (anything with ``detect(images)``) for a list of examples.

    Returns one dict per image with ``boxes`` [D, 4], ``classes`` [D] and ``scores`` [D] (the padded
    rows of ``detect`` removed). ``progress=True`` shows a progress bar.
    """
    if not examples:
        return []
    detections = []
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(examples), unit_name="image")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        output = model.detect(np.stack([example["image"] for example in chunk]), batch_size=batch_size)
        scores = output["scores"] if "scores" in output else output["confidence"]
        for i in range(len(chunk)):
            n = int(output["num_detections"][i])
            detections.append({"boxes": np.asarray(output["boxes"][i, :n]),
                               "classes": np.asarray(output["classes"][i, :n]),
                               "scores": np.asarray(scores[i, :n])})
        if bar is not None:
            bar.update(min(start + batch_size, len(examples)))
    return detections
