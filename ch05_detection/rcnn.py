"""R-CNN and Fast R-CNN: classify selective-search regions, one crop at a time or on one shared map.

Two steps of the chapter's history of removing waste, both fed the same region proposals.

**Selective search** (Uijlings et al. 2013) groups the superpixels of a graph-based segmentation
bottom-up, by colour, texture, size and fill, and returns the box of every group it forms: a few
thousand class-agnostic regions per 500-pixel image that cover almost every object. OpenCV's
``cv2.ximgproc.segmentation`` implements it; its "fast" mode (2 colour spaces, 2 segmentation
scales, 2 similarity mixes) is the setting R-CNN used. On our 128-pixel ``shapes`` scenes it takes
60-90 ms of one CPU core per image; ``selective_search`` drops regions under ``min_size``
pixels (4), removes duplicates and keeps at most ``max_proposals`` (300 by default): 77 regions
per validation image are left on average (at most ~200, so at 128 px the cap almost never binds),
and on the 500 validation images they cover 99.9% of the ground-truth boxes at IoU 0.5 and 99.7%
at IoU 0.7.
OpenCV ranks the regions with a random factor it does not let Python seed (sec. 3.3 of the
paper: rank = level x random), so we sort them by area, largest first: the proposals are then a
pure function of the image, which is what lets ``ProposalCache`` store them once per image.
``proposal_recall`` measures how many ground-truth boxes some proposal covers at IoU 0.5 / 0.7.

**R-CNN** (Girshick, Donahue, Darrell and Malik 2014), in the paper's steps:

1. each region is dilated so that ``context_pixels`` of the surrounding image remain around it
   at the CNN's input size (16 px at 227 px in the paper, appendix A; scaled to our
   ``region_size``), then warped (stretched, any aspect) to ``region_size x region_size``
   (``warp_regions``; what falls outside the image is the image's mean colour);
2. a chapter-4 CNN is fine-tuned on warped regions, K + 1 classes: IoU >= 0.5 with a
   ground-truth box is that box's class, everything else background, in batches of 32 positive
   and 96 background regions (sec. 2.3; ``RCNN.losses_for`` samples ``regions_per_image`` per
   image, ``foreground_fraction`` a quarter positive: 16 images x 8 regions = 128). The paper
   over-samples positives because they are rare among VOC's regions; a third of a ``shapes``
   scene's regions are positive, and ``train_rcnn.py`` takes half (it learns the classes faster);
3. the fine-tuned CNN's penultimate features (global-average-pooled) are extracted for every
   region (``region_table``);
4. one linear SVM per class (``train_svms``, scikit-learn's ``LinearSVC``) separates the
   ground-truth boxes of the class from regions with IoU < 0.3 with every box of the class, in
   rounds of **hard-negative mining**: train on the positives and a cache of negatives, score
   every negative, add the highest-scoring ones (``select_hard_negatives``), train again; the
   number of false positives (negatives scoring above 0) drops round after round;
5. a ridge regressor per class (``train_box_regressors``, scikit-learn's ``Ridge``) predicts,
   from the same features, the offsets ``boxes.encode_boxes(ground truth, region)`` of regions
   with IoU > 0.6 (appendix C);
6. at test time every region is scored by every SVM, moved by its class's regressor, and NMS
   runs class by class (``detector.select_detections``).

The SVMs and regressors are linear layers on the features (``svm``, ``box_regressor``; their
weights come from scikit-learn, see ``fit_svms_and_regressors``), so ``RCNN`` is a ``Detector``:
``detect``, ``save``/``load_model`` and ``predict.py`` work as for any detector. It crops and
runs the CNN once per region: ~80 forward passes per image.

**Fast R-CNN** (Girshick 2015) computes the feature map once per image and cuts a fixed-size
feature for every region out of it with RoI max pooling (``roi_ops.RoIPooling``, sec. 2.1);
the multi-task head of ``detection_head.py`` (softmax over K + 1 classes and class-specific box
deltas) is trained end to end with the backbone on ``detection_head.sample_rois`` (64 RoIs per
image, a quarter foreground) and ``detection_head.detection_loss`` (sec. 2.3, eq. 1);
``detection_head.postprocess_detections`` decodes. One network instead of a CNN + SVMs +
regressors, one forward pass per image instead of one per region.

**Where the regions come from.** In training, the batch carries them: ``"proposals"``
``[batch, P, 4]`` (normalized yxyx, zero rows as padding) and ``"num_proposals"`` ``[batch]``,
computed once per image (``ProposalCache``; ``train_rcnn.py`` attaches them). ``detect(images)``
and any batch without them run selective search inside the graph (``ProposalDetector.propose``,
a ``tf.numpy_function`` around OpenCV), so inference takes plain images like every other
detector and its time includes the proposals, as the papers count it.

Train both with ``python ch05_detection/train_rcnn.py --variant rcnn`` (or ``fast_rcnn``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import boxes as box_ops
from ch05_detection import detection_head, targets
from ch05_detection.detector import (Detector, DetectorConfig, _require, build_backbone,
                                     check_images, select_detections)

SELECTIVE_SEARCH_MODES = ("fast", "quality", "single")
# R-CNN's warp (appendix A): 16 pixels of context around the region at the 227-pixel input.
PAPER_INPUT_SIZE = 227
PAPER_CONTEXT_PIXELS = 16.0
# R-CNN's released code scales the features to an average L2 norm of 20 before the SVMs.
SVM_FEATURE_NORM = 20.0
SCORERS = ("svm", "softmax")
# Bins of the SVM-score histograms ``train_svms`` keeps per round (scores clipped into them).
SVM_SCORE_BINS = np.linspace(-4.0, 4.0, 33)
ROI_OPS = ("pool", "align")


# ----------------------------------------------------------------------------------
# selective search
# ----------------------------------------------------------------------------------
def to_uint8(image):
    """``[H, W, 3]`` float in [0, 1] (or uint8) -> uint8, rounded like the training cache."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def selective_search_raw(image, mode="fast"):
    """Every region OpenCV's selective search returns for one RGB image, unfiltered.

    Args:
        image: ``[H, W, 3]`` RGB, float in [0, 1] or uint8.
        mode: ``"fast"`` (the R-CNN setting), ``"quality"`` (more strategies, slower) or
            ``"single"`` (one strategy: quickest, fewest regions).
    Returns:
        ``[R, 4]`` float32 normalized yxyx boxes, in OpenCV's (randomised) order.
    """
    import cv2  # imported here: the module loads without OpenCV until regions are needed

    if mode not in SELECTIVE_SEARCH_MODES:
        raise ValueError(f"`mode` must be one of {SELECTIVE_SEARCH_MODES}, got {mode!r}")
    image = to_uint8(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`image` must be [height, width, 3], got shape {image.shape}")
    height, width = image.shape[:2]
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    {"fast": search.switchToSelectiveSearchFast, "quality": search.switchToSelectiveSearchQuality,
     "single": search.switchToSingleStrategy}[mode]()
    regions = np.asarray(search.process(), np.float32).reshape(-1, 4)  # [R, 4] x, y, w, h pixels
    x, y, w, h = regions.T
    return np.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=1)


def filter_proposals(boxes, image_shape, min_size=4.0, max_proposals=300):
    """Drop regions under ``min_size`` pixels (height or width) and duplicates, sort by area
    (largest first, then by coordinates: a deterministic order) and keep ``max_proposals``.

    Args: boxes ``[R, 4]`` normalized yxyx; image_shape ``(height, width)`` in pixels.
    Returns: ``[P, 4]`` float32, ``P <= max_proposals``.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    height, width = image_shape
    big_enough = ((boxes[:, 2] - boxes[:, 0]) * height >= min_size) & (
        (boxes[:, 3] - boxes[:, 1]) * width >= min_size)
    boxes = np.unique(boxes[big_enough], axis=0)  # sorted rows: duplicates removed
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-area, kind="stable")
    return boxes[order][:int(max_proposals)].astype(np.float32)


def selective_search(image, mode="fast", max_proposals=300, min_size=4.0):
    """Filtered selective-search proposals of one image: ``[P, 4]`` float32 normalized yxyx
    (``selective_search_raw`` then ``filter_proposals``)."""
    image = to_uint8(image)
    return filter_proposals(selective_search_raw(image, mode), image.shape[:2], min_size,
                            max_proposals)


def pad_proposals(proposals, max_proposals=None):
    """A list of ``[P_i, 4]`` arrays -> ``([N, P, 4]`` zero-padded, ``[N]`` counts), with ``P``
    the largest ``P_i`` (at least 1) or ``max_proposals``."""
    counts = np.array([len(p) for p in proposals], np.int32)
    size = int(max_proposals or max(1, counts.max(initial=0)))
    padded = np.zeros((len(proposals), size, 4), np.float32)
    for i, boxes in enumerate(proposals):
        padded[i, :min(len(boxes), size)] = np.asarray(boxes, np.float32).reshape(-1, 4)[:size]
    return padded, np.minimum(counts, size)


def selective_search_batch(images, mode="fast", max_proposals=300, min_size=4.0):
    """Proposals of a batch ``[B, H, W, 3]`` (uint8 or float): ``([B, P, 4]`` float32 padded with
    zeros, ``[B]`` int32 counts)."""
    found = [selective_search(image, mode, max_proposals, min_size) for image in np.asarray(images)]
    return pad_proposals(found)


def proposal_recall(proposals, gt_boxes, iou_thresholds=(0.5, 0.7)):
    """Share of ground-truth boxes covered by some proposal with IoU >= each threshold.

    Args:
        proposals: list (one per image) of ``[P_i, 4]`` boxes; gt_boxes: list of ``[N_i, 4]``.
    Returns:
        dict ``{threshold: recall}`` (1.0 when there is no ground-truth box at all).
    """
    best = []
    for boxes, gt in zip(proposals, gt_boxes):
        gt = np.asarray(gt, np.float32).reshape(-1, 4)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(gt) == 0:
            continue
        if len(boxes) == 0:
            best.append(np.zeros(len(gt)))
            continue
        best.append(box_ops.pairwise_iou(boxes, gt).numpy().max(axis=0))  # [N_i]
    best = np.concatenate(best) if best else np.zeros(0)
    return {float(t): (float(np.mean(best >= t)) if len(best) else 1.0) for t in iou_thresholds}


class ProposalCache:
    """Selective-search proposals stored on disk, one entry per image content.

    Selective search costs ~70 ms of CPU per 128-pixel image, more than a training step of a
    whole batch, so a run computes it once per image and every later run (and the other
    variant) reads it back. Entries are keyed by a SHA-1 of the uint8 pixels and the settings,
    so any data set, split or order works and a changed image is never served stale regions.

    Args:
        directory: folder of the cache file (created on demand); None or "" = no file (the
            proposals are still computed once per call).
        mode, max_proposals, min_size: the ``selective_search`` settings.
    """

    def __init__(self, directory, mode="fast", max_proposals=300, min_size=4.0):
        if mode not in SELECTIVE_SEARCH_MODES:
            raise ValueError(f"`mode` must be one of {SELECTIVE_SEARCH_MODES}, got {mode!r}")
        self.mode, self.max_proposals, self.min_size = mode, int(max_proposals), float(min_size)
        self.path = None
        if directory:
            self.path = Path(directory) / f"{mode}_max{self.max_proposals}_min{self.min_size:g}.npz"
        self.computed_seconds = 0.0  # selective search time of the last ``get``
        self.computed_images = 0

    def key(self, image):
        image = to_uint8(image)
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        digest.update(str(image.shape).encode())
        return digest.hexdigest()

    def _load(self):
        if self.path is None or not self.path.is_file():
            return {}
        with np.load(self.path) as stored:
            keys, counts, boxes = stored["keys"], stored["counts"], stored["boxes"]
        ends = np.cumsum(counts)
        return {str(k): boxes[end - n:end] for k, n, end in zip(keys, counts, ends)}

    def _save(self, entries):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(entries)
        boxes = [entries[k] for k in keys]
        # Written to a temporary file, then renamed: a killed run never leaves half a cache.
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".npz")
        os.close(handle)
        np.savez(temporary, keys=np.array(keys), counts=np.array([len(b) for b in boxes], np.int64),
                 boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))
        os.replace(temporary, self.path)

    def get(self, images, progress=False):
        """Proposals of each image (computing and storing those not in the cache yet).

        Args: images: a sequence of ``[H, W, 3]`` images (uint8 or float in [0, 1]).
        Returns: list of ``[P_i, 4]`` float32 arrays.
        """
        entries = self._load()
        keys = [self.key(image) for image in images]
        missing = [i for i, k in enumerate(keys) if k not in entries]
        bar = keras.utils.Progbar(len(missing), unit_name="image") if progress and missing else None
        start = time.perf_counter()
        for done, i in enumerate(missing, start=1):
            entries[keys[i]] = selective_search(images[i], self.mode, self.max_proposals,
                                                self.min_size)
            if bar is not None and (done % 50 == 0 or done == len(missing)):
                bar.update(done)
        self.computed_seconds = time.perf_counter() - start
        self.computed_images = len(missing)
        if missing and self.path is not None:
            self._save(entries)
        return [entries[k] for k in keys]


# ----------------------------------------------------------------------------------
# warping regions with context (R-CNN appendix A)
# ----------------------------------------------------------------------------------
def default_context_pixels(region_size):
    """R-CNN's 16 pixels of context at 227 pixels, scaled to a ``region_size`` input."""
    return PAPER_CONTEXT_PIXELS * float(region_size) / PAPER_INPUT_SIZE


def dilate_boxes(boxes, region_size, context_pixels):
    """Boxes grown so that, warped to ``region_size``, ``context_pixels`` surround the original.

    The original box fills the inner ``region_size - 2 p`` pixels, so each side grows by
    ``p / (region_size - 2 p)`` of the box's own height (width). Works on normalized boxes
    (the ratio does not depend on the image size). ``[..., 4]`` -> ``[..., 4]``.
    """
    if not 0.0 <= 2.0 * context_pixels < region_size:
        raise ValueError(f"`context_pixels` must be in [0, region_size / 2), got {context_pixels} "
                         f"for region_size {region_size}")
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    grow = context_pixels / (region_size - 2.0 * context_pixels)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    dy, dx = grow * (ymax - ymin), grow * (xmax - xmin)
    return tf.stack([ymin - dy, xmin - dx, ymax + dy, xmax + dx], axis=-1)


def warp_regions(images, boxes, box_indices, region_size, context_pixels=0.0):
    """R-CNN's input: each region with context, warped to ``region_size x region_size``.

    Output pixel ``(i, j)`` of a region samples (bilinearly) the image point at the centre of
    cell ``(i, j)`` of a ``region_size x region_size`` grid laid over the dilated box (pixel ``k``
    of the image covers ``[k, k + 1)``). The grid is stretched to the box, whatever its aspect
    (the paper's "warp"). Points outside the image read the image's mean colour (the paper
    fills with the mean, which is 0 after its mean subtraction).

    Args:
        images: ``[B, H, W, 3]`` float.
        boxes: ``[N, 4]`` normalized yxyx regions; box_indices: ``[N]`` int, image of each.
        region_size: side of the output; context_pixels: ``p`` of ``dilate_boxes``.
    Returns:
        ``[N, region_size, region_size, 3]`` float32.
    """
    images = tf.cast(check_images(images), tf.float32)
    boxes = dilate_boxes(boxes, region_size, context_pixels)
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    # crop_and_resize samples from index t * (size - 1) to index b * (size - 1) inclusive: hand it
    # the indices of the first and last cell centres (continuous c is index c - 0.5).
    half_y = 0.5 * (ymax - ymin) * height / region_size
    half_x = 0.5 * (xmax - xmin) * width / region_size
    sample_boxes = tf.stack([(ymin * height + half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
                             (xmin * width + half_x - 0.5) / tf.maximum(width - 1.0, 1.0),
                             (ymax * height - half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
                             (xmax * width - half_x - 0.5) / tf.maximum(width - 1.0, 1.0)], axis=-1)
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)  # [B, 1, 1, 3]
    box_indices = tf.cast(box_indices, tf.int32)
    crops = tf.image.crop_and_resize(images - mean, sample_boxes, box_indices,
                                     [region_size, region_size], extrapolation_value=0.0)
    return crops + tf.gather(mean, box_indices)


# ----------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------
@dataclass
class ProposalConfig(DetectorConfig):
    """Options of a detector fed selective-search regions (with those of ``DetectorConfig``).

    Args:
        selective_search: ``"fast"``, ``"quality"`` or ``"single"`` (``selective_search_raw``).
        max_proposals: regions kept per image (largest first).
        min_proposal_size: smallest region side in pixels of the model's input.
        detection_nms_iou: per-class NMS of ``detect`` (0.3 in the papers' code).
    """

    selective_search: str = "fast"
    max_proposals: int = 300
    min_proposal_size: float = 4.0
    detection_nms_iou: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        _require(self.selective_search in SELECTIVE_SEARCH_MODES, "selective_search",
                 f"one of {SELECTIVE_SEARCH_MODES}", self.selective_search)
        _require(int(self.max_proposals) >= 1, "max_proposals", ">= 1", self.max_proposals)
        self.max_proposals = int(self.max_proposals)
        _require(float(self.min_proposal_size) >= 0.0, "min_proposal_size", ">= 0",
                 self.min_proposal_size)
        self.min_proposal_size = float(self.min_proposal_size)
        _require(0.0 <= float(self.detection_nms_iou) <= 1.0, "detection_nms_iou", "in [0, 1]",
                 self.detection_nms_iou)
        self.detection_nms_iou = float(self.detection_nms_iou)


def _check_fraction(config, name):
    value = getattr(config, name)
    _require(0.0 <= float(value) <= 1.0, name, "in [0, 1]", value)
    setattr(config, name, float(value))


@dataclass
class RCNNConfig(ProposalConfig):
    """Every option of ``RCNN``.

    Args:
        region_size: side of the CNN's input (227 in the paper).
        context_pixels: context around each region at that size (None: the paper's 16 px at
            227 scaled, ``default_context_pixels``).
        output_stride: stride of the backbone cut (32: the whole chapter-4 network, then global
            average pooling gives the features).
        regions_per_image: regions sampled per image in a fine-tuning batch.
        foreground_fraction, foreground_iou: a quarter positive, IoU >= 0.5 (sec. 2.3).
        scorer: ``"svm"`` (the paper) or ``"softmax"`` (the fine-tuned classifier, appendix B).
    """

    region_size: int = 32
    context_pixels: Optional[float] = None
    output_stride: int = 32
    regions_per_image: int = 8
    foreground_fraction: float = 0.25
    foreground_iou: float = 0.5
    scorer: str = "svm"

    def __post_init__(self):
        super().__post_init__()
        _require(int(self.region_size) >= 32, "region_size", ">= 32", self.region_size)
        self.region_size = int(self.region_size)
        if self.context_pixels is None:
            self.context_pixels = default_context_pixels(self.region_size)
        _require(0.0 <= float(self.context_pixels) < self.region_size / 4.0, "context_pixels",
                 f"in [0, region_size / 4 = {self.region_size / 4:g})", self.context_pixels)
        self.context_pixels = float(self.context_pixels)
        _require(int(self.regions_per_image) >= 1, "regions_per_image", ">= 1",
                 self.regions_per_image)
        self.regions_per_image = int(self.regions_per_image)
        _check_fraction(self, "foreground_fraction")
        _check_fraction(self, "foreground_iou")
        _require(self.scorer in SCORERS, "scorer", f"one of {SCORERS}", self.scorer)


@dataclass
class FastRCNNConfig(ProposalConfig):
    """Every option of ``FastRCNN``.

    Args:
        roi_op, pool_size: ``"pool"`` (RoI max pooling, the paper) or ``"align"``; 7 x 7.
        head_type, head_units: the ``detection_head.FastRCNNHead`` (two fully connected layers).
        rois_per_image, foreground_fraction, foreground_iou, background_iou_low: RoI sampling
            (64 per image, 25% with IoU >= 0.5; background IoU in [low, 0.5): 0.1 in the paper,
            0 by default here as in ``train_faster_rcnn.py``, so the head also sees plain
            background, which most selective-search regions of a ``shapes`` scene are).
    """

    roi_op: str = "pool"
    pool_size: int = 7
    head_type: str = "dense"
    head_units: int = 256
    rois_per_image: int = 64
    foreground_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou_low: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _require(self.roi_op in ROI_OPS, "roi_op", f"one of {ROI_OPS}", self.roi_op)
        _require(self.head_type in ("dense", "conv"), "head_type", "'dense' or 'conv'",
                 self.head_type)
        for name in ("pool_size", "head_units", "rois_per_image"):
            _require(int(getattr(self, name)) >= 1, name, ">= 1", getattr(self, name))
            setattr(self, name, int(getattr(self, name)))
        for name in ("foreground_fraction", "foreground_iou", "background_iou_low"):
            _check_fraction(self, name)
        _require(self.background_iou_low <= self.foreground_iou, "background_iou_low",
                 f"<= foreground_iou ({self.foreground_iou})", self.background_iou_low)


# ----------------------------------------------------------------------------------
# what both detectors share: regions from the batch or from selective search
# ----------------------------------------------------------------------------------
class ProposalDetector(Detector):
    """A ``Detector`` whose regions come from outside the network (selective search).

    Batches may carry ``"proposals"`` ``[batch, P, 4]`` and ``"num_proposals"`` ``[batch]``;
    without them (and in ``call(images)`` / ``detect``) ``propose`` runs selective search
    inside the graph. ``train_step`` flips the proposals with their images (``flip_extra_inputs``).
    """

    CONFIG_CLASS = ProposalConfig

    def _search(self, images_uint8):
        height, width = self.image_size
        # The minimum size is in pixels of the model's input; these images have that size.
        proposals, counts = selective_search_batch(
            images_uint8, self.config.selective_search, self.config.max_proposals,
            self.config.min_proposal_size * min(images_uint8.shape[1] / height,
                                                images_uint8.shape[2] / width))
        return proposals, counts.astype(np.int32)

    def propose(self, images):
        """Selective search inside the graph (``tf.numpy_function``; CPU, ~70 ms per 128-px image).

        Args: images ``[batch, H, W, 3]`` float in [0, 1].
        Returns: ``(proposals [batch, P, 4]`` zero-padded to the batch's largest count,
        ``num_proposals [batch]`` int32).
        """
        pixels = tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)
        proposals, counts = tf.numpy_function(self._search, [pixels], [tf.float32, tf.int32],
                                              stateful=False, name="selective_search")
        proposals.set_shape([None, None, 4])
        counts.set_shape([None])
        return proposals, counts

    def _regions(self, proposals, num_proposals, images):
        """(proposals ``[B, P, 4]``, num_proposals ``[B]``), from selective search if None."""
        if proposals is None:
            return self.propose(images)
        proposals = tf.cast(proposals, tf.float32)
        if num_proposals is None:  # count the rows that are not zero padding
            num_proposals = tf.reduce_sum(tf.cast(box_ops.box_area(proposals) > 0, tf.int32), 1)
        return proposals, tf.cast(num_proposals, tf.int32)

    @staticmethod
    def _valid(proposals, num_proposals):
        return tf.range(tf.shape(proposals)[1])[None, :] < num_proposals[:, None]

    def extra_inputs(self, batch, images):
        """The batch's ``proposals`` (or selective search) and their validity, for ``losses_for``."""
        proposals, num_proposals = self._regions(batch.get("proposals"),
                                                 batch.get("num_proposals"), images)
        return {"proposals": proposals, "proposal_valid": self._valid(proposals, num_proposals)}

    def flip_extra_inputs(self, extra, images, step):
        """The flip of each image is keyed on (seed, step, image): the same for its proposals."""
        valid = extra["proposal_valid"]
        _, proposals = self._flip(images, extra["proposals"], tf.where(valid, 0, -1), step)
        return {**extra, "proposals": proposals}

    def build_weights(self):
        """Create every weight with one dummy image and one dummy region (no selective search)."""
        height, width = self.image_size
        self(tf.zeros((1, height, width, 3)), training=False,
             proposals=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), num_proposals=tf.constant([1]))

    def _sample(self, proposals, proposal_valid, gt_boxes, gt_classes, step, num_rois,
                foreground_fraction, foreground_iou, background_iou_low):
        index = targets.global_image_index(tf.shape(gt_boxes)[0])
        return detection_head.sample_rois(
            proposals, proposal_valid, gt_boxes, gt_classes, num_rois=num_rois,
            foreground_fraction=foreground_fraction, foreground_iou=foreground_iou,
            background_iou_high=foreground_iou, background_iou_low=background_iou_low,
            add_ground_truth=True,
            seed=targets.image_seeds(step, index, self.config.seed, targets.ROI_SAMPLING_STREAM))


# ----------------------------------------------------------------------------------
# R-CNN
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class RCNN(ProposalDetector):
    """R-CNN (Girshick et al. 2014): a CNN on every warped region, linear SVMs, box regressors.

    ``call(images, proposals=None, num_proposals=None)`` returns ``proposals`` ``[B, P, 4]``,
    ``num_proposals`` ``[B]``, ``class_logits`` ``[B, P, K + 1]`` (the fine-tuned softmax),
    ``svm_scores`` ``[B, P, K]`` and ``box_deltas`` ``[B, P, K, 4]``; ``decode`` turns them into
    detections (SVM scores through a sigmoid, so 0.5 is the SVM's boundary). The losses are those
    of the fine-tuning (step 2): ``loss`` = ``class_loss``, the softmax cross-entropy of the
    sampled regions. ``fit_svms_and_regressors`` does steps 3-5 after ``fit``.
    """

    CONFIG_CLASS = RCNNConfig
    LOSS_NAMES = ("loss", "class_loss")

    def __init__(self, num_classes=None, config=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        from ch04_classification.models import get_backbone
        from common.training import synchronize_batchnorm

        config, size = self.config, self.config.region_size
        self.backbone = get_backbone(config.backbone, input_shape=(size, size, 3),
                                     output_stride=config.output_stride, **config.backbone_options)
        if config.synchronized_batch_norm:
            self.backbone = synchronize_batchnorm(self.backbone)
        self.region_pool = keras.layers.GlobalAveragePooling2D(name="region_pool")
        self.region_classifier = keras.layers.Dense(config.num_classes + 1,
                                                    name="region_classifier")
        # Set from scikit-learn after fine-tuning (fit_svms_and_regressors), never by the optimizer.
        self.svm = keras.layers.Dense(config.num_classes, kernel_initializer="zeros",
                                      trainable=False, name="svm")
        self.box_regressor = keras.layers.Dense(4 * config.num_classes, kernel_initializer="zeros",
                                                trainable=False, name="box_regressor")
        self.feature_scale = self.add_weight(shape=(), initializer="ones", trainable=False,
                                             name="feature_scale")
        self.build_weights()

    @property
    def feature_size(self):
        return int(self.region_classifier.kernel.shape[0])

    def region_features(self, images, rois, training=False):
        """CNN features of warped regions: images ``[B, H, W, 3]``, rois ``[B, R, 4]`` ->
        ``[B, R, D]`` (the global-average-pooled last feature map, before any scaling)."""
        shape = tf.shape(rois)
        image_of_roi = tf.repeat(tf.range(shape[0]), shape[1])  # [B * R]
        crops = warp_regions(images, tf.reshape(rois, [-1, 4]), image_of_roi,
                             self.config.region_size, self.config.context_pixels)  # [B*R, S, S, 3]
        features = self.region_pool(self.backbone(crops, training=training))  # [B*R, D]
        return tf.reshape(features, [shape[0], shape[1], features.shape[-1]])

    def call(self, images, training=False, proposals=None, num_proposals=None):
        images = self._resize(images)
        proposals, num_proposals = self._regions(proposals, num_proposals, images)
        features = self.region_features(images, proposals, training=training)  # [B, P, D]
        scaled = features * self.feature_scale
        shape = tf.shape(proposals)
        box_deltas = tf.reshape(self.box_regressor(scaled),
                                [shape[0], shape[1], self.num_classes, 4])
        return {"proposals": proposals, "num_proposals": num_proposals,
                "class_logits": self.region_classifier(features),
                "svm_scores": self.svm(scaled), "box_deltas": box_deltas}

    def region_scores(self, outputs, scorer=None):
        """Per-class scores in [0, 1] of every region: ``[B, P, K]`` (sigmoid of the SVM scores,
        or the fine-tuned softmax without the background column). ``scorer`` overrides the
        config's (``"svm"`` / ``"softmax"``), for appendix B's comparison on one set of outputs."""
        scorer = self.config.scorer if scorer is None else scorer
        if scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {SCORERS}, got {scorer!r}")
        if scorer == "svm":
            return tf.sigmoid(outputs["svm_scores"])
        return tf.nn.softmax(outputs["class_logits"], axis=-1)[..., 1:]

    def regressed_boxes(self, outputs, box_regression=True):
        """Every region moved by every class's regressor: ``[B, P, K, 4]`` (clipped); with
        ``box_regression=False`` the regions themselves, repeated for each class."""
        proposals = outputs["proposals"]
        if not box_regression:
            return tf.tile(proposals[:, :, None, :], [1, 1, self.num_classes, 1])
        return box_ops.clip_boxes(box_ops.decode_boxes(
            outputs["box_deltas"], proposals[:, :, None, :],
            weights=detection_head.HEAD_BOX_WEIGHTS))

    def decode(self, outputs, scorer=None, box_regression=True):
        """Box regression of every region for every class, then class-wise NMS (sec. 2.2).
        ``scorer`` / ``box_regression=False``: the ablations (appendix B, sec. 3.4 / appendix C)
        on outputs computed once."""
        proposals = outputs["proposals"]
        valid = self._valid(proposals, outputs["num_proposals"])
        boxes = self.regressed_boxes(outputs, box_regression)  # [B, P, K, 4]
        scores = tf.where(valid[..., None], self.region_scores(outputs, scorer), 0.0)
        return select_detections(boxes, scores, score_threshold=self.config.score_threshold,
                                 iou_threshold=self.config.detection_nms_iou,
                                 max_detections=self.config.max_detections)

    def losses_for(self, images, gt_boxes, gt_classes, training, step, proposals=None,
                   proposal_valid=None):
        """Fine-tuning loss (sec. 2.3): softmax cross-entropy over ``regions_per_image`` regions
        per image, a quarter with IoU >= 0.5 (labelled with the box's class), the rest
        background (IoU < 0.5); the ground-truth boxes are candidates too."""
        config = self.config
        if proposals is None:
            proposals, counts = self.propose(images)
            proposal_valid = self._valid(proposals, counts)
        sample = self._sample(proposals, proposal_valid, gt_boxes, gt_classes, step,
                              config.regions_per_image, config.foreground_fraction,
                              config.foreground_iou, 0.0)
        features = self.region_features(images, sample["rois"], training=training)
        logits = self.region_classifier(features)  # [B, R, K + 1]
        class_targets = sample["class_targets"]  # 0 background, c + 1, -1 padding
        sampled = tf.cast(class_targets >= 0, tf.float32)
        log_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.maximum(class_targets, 0), logits=logits)
        count = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(sampled)), 1.0)
        class_loss = tf.reduce_sum(log_loss * sampled) / count
        return {"loss": class_loss, "class_loss": class_loss}

    # ------------------------------------------------------------------ steps 3-5
    def set_svms(self, weights, bias, feature_scale):
        """Install the SVMs: scores = (features * feature_scale) @ weights + bias.
        weights ``[D, K]``, bias ``[K]``."""
        self.feature_scale.assign(float(feature_scale))
        self.svm.set_weights([np.asarray(weights, np.float32), np.asarray(bias, np.float32)])

    def set_box_regressors(self, kernel, bias):
        """Install the regressors: deltas = (features * feature_scale) @ kernel + bias,
        kernel ``[D, 4K]`` (class k's deltas in columns 4k .. 4k + 3), bias ``[4K]``."""
        self.box_regressor.set_weights([np.asarray(kernel, np.float32),
                                        np.asarray(bias, np.float32)])


def region_table(model, images, gt_boxes, gt_classes, proposals, batch_size=8, progress=False):
    """Step 3: CNN features of every region (ground-truth boxes first, then the proposals) of
    every image, with what steps 4 and 5 need to know about each region.

    Args:
        model: an ``RCNN``; images ``[N, H, W, 3]`` (uint8 or float); gt_boxes / gt_classes /
            proposals: lists of per-image arrays (``[n_i, 4]``, ``[n_i]``, ``[p_i, 4]``).
    Returns:
        dict of NumPy arrays over all M regions: ``features`` ``[M, D]`` (unscaled), ``boxes``
        ``[M, 4]``, ``image`` ``[M]``, ``is_gt`` ``[M]`` bool, ``gt_class`` ``[M]`` (class of a
        ground-truth region, -1 for proposals), ``class_iou`` ``[M, K]`` (best IoU with a box of
        each class), ``matched_box`` ``[M, 4]`` / ``matched_class`` ``[M]`` / ``max_iou`` ``[M]``
        (the ground-truth box of highest IoU; class -1 and IoU 0 when the image has none).
    """
    num_classes = model.num_classes
    features_of = tf.function(lambda x, r: model.region_features(x, r), reduce_retracing=True)
    columns = {key: [] for key in ("features", "boxes", "image", "is_gt", "gt_class", "class_iou",
                                   "matched_box", "matched_class", "max_iou")}
    bar = keras.utils.Progbar(len(images), unit_name="image") if progress else None
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        regions = [np.concatenate([np.asarray(gt_boxes[i], np.float32).reshape(-1, 4),
                                   np.asarray(proposals[i], np.float32).reshape(-1, 4)])
                   for i in range(start, stop)]
        padded, counts = pad_proposals(regions)
        batch = np.stack([np.asarray(images[i]) for i in range(start, stop)])
        batch = batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else batch
        features = features_of(tf.convert_to_tensor(batch, tf.float32), tf.constant(padded)).numpy()
        for offset, i in enumerate(range(start, stop)):
            boxes, count = regions[offset], counts[offset]
            gt = np.asarray(gt_boxes[i], np.float32).reshape(-1, 4)
            classes = np.asarray(gt_classes[i], np.int32).reshape(-1)
            num_gt = len(gt)
            columns["features"].append(features[offset, :count])
            columns["boxes"].append(boxes)
            columns["image"].append(np.full(count, i, np.int32))
            columns["is_gt"].append(np.arange(count) < num_gt)
            columns["gt_class"].append(np.concatenate([classes,
                                                       np.full(count - num_gt, -1, np.int32)]))
            iou = (box_ops.pairwise_iou(boxes, gt).numpy() if num_gt
                   else np.zeros((count, 0), np.float32))  # [count, num_gt]
            class_iou = np.zeros((count, num_classes), np.float32)
            for k in range(num_classes):
                if np.any(classes == k):
                    class_iou[:, k] = iou[:, classes == k].max(axis=1)
            best = iou.argmax(axis=1) if num_gt else np.zeros(count, np.int64)
            columns["class_iou"].append(class_iou)
            columns["max_iou"].append(iou.max(axis=1) if num_gt else np.zeros(count, np.float32))
            columns["matched_box"].append(gt[best] if num_gt else np.zeros((count, 4), np.float32))
            columns["matched_class"].append(classes[best] if num_gt
                                            else np.full(count, -1, np.int32))
        if bar is not None:
            bar.update(stop)
    return {key: np.concatenate(value) for key, value in columns.items()}


def feature_scale_for(features, target_norm=SVM_FEATURE_NORM):
    """The factor that gives the features an average L2 norm of ``target_norm`` (R-CNN's code)."""
    mean_norm = float(np.mean(np.linalg.norm(np.asarray(features, np.float64), axis=1)))
    return target_norm / mean_norm if mean_norm > 0 else 1.0


def select_hard_negatives(scores, in_cache, count, margin=-1.0):
    """Hard-negative mining's choice: the ``count`` highest-scoring negatives not in the cache
    yet, among those inside the SVM's margin (score > ``margin``; the easy ones teach nothing).

    Args: scores ``[M]`` SVM scores of the negatives; in_cache ``[M]`` bool.
    Returns: int64 indices, highest score first.
    """
    scores = np.asarray(scores, np.float64)
    candidates = np.flatnonzero(~np.asarray(in_cache, bool) & (scores > margin))
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:max(0, int(count))]].astype(np.int64)


def train_svms(features, positives, negatives, rounds=3, C=1e-3, positive_weight=2.0,
               bias_scale=10.0, initial_negatives=1000, hard_negatives_per_round=2000, seed=0):
    """Step 4: one linear SVM per class with rounds of hard-negative mining (R-CNN sec. 2.3).

    Round 1 trains on the positives and ``initial_negatives`` random negatives; every later
    round adds the ``hard_negatives_per_round`` highest-scoring negatives the previous SVM got
    wrong or nearly wrong (``select_hard_negatives``) and trains again. The SVM is
    ``LinearSVC(loss="hinge", C=1e-3)`` with positives weighted 2 and the bias feature scaled by
    10, the settings of R-CNN's released code.

    Args:
        features: ``[M, D]`` scaled features of every region.
        positives, negatives: ``[M, K]`` bool, the regions of each class's two sides.
        rounds: SVM trainings per class (1 = no mining).
    Returns:
        ``(weights [D, K], bias [K], history)``; ``history`` has, per round, ``false_positives``
        (per class: negatives scoring > 0 among *all* negatives), ``cache`` (negatives trained
        on), ``hard_added`` (per class) and ``negative_histogram`` / ``positive_histogram`` (per
        class: counts of the scores of all negatives / positives in ``SVM_SCORE_BINS``, clipped).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    features = np.asarray(features, np.float32)
    positives, negatives = np.asarray(positives, bool), np.asarray(negatives, bool)
    num_classes = positives.shape[1]
    rng = np.random.default_rng(seed)
    weights = np.zeros((features.shape[1], num_classes), np.float32)
    bias = np.full((num_classes,), -1.0, np.float32)  # a class without data never fires
    empty = [0] * (len(SVM_SCORE_BINS) - 1)
    history = [{"false_positives": [0] * num_classes, "cache": [0] * num_classes,
                "hard_added": [0] * num_classes,
                "negative_histogram": [list(empty) for _ in range(num_classes)],
                "positive_histogram": [list(empty) for _ in range(num_classes)]}
               for _ in range(int(rounds))]
    for k in range(num_classes):
        positive_rows = np.flatnonzero(positives[:, k])
        negative_rows = np.flatnonzero(negatives[:, k])
        if len(positive_rows) == 0 or len(negative_rows) == 0:
            continue
        in_cache = np.zeros(len(negative_rows), bool)
        in_cache[rng.choice(len(negative_rows), size=min(initial_negatives, len(negative_rows)),
                            replace=False)] = True
        for round_index in range(int(rounds)):
            cached = negative_rows[in_cache]
            x = np.concatenate([features[positive_rows], features[cached]])
            y = np.concatenate([np.ones(len(positive_rows)), np.zeros(len(cached))])
            svm = LinearSVC(C=C, loss="hinge", class_weight={1: positive_weight, 0: 1.0},
                            intercept_scaling=bias_scale, max_iter=20000, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                svm.fit(x, y)
            weights[:, k], bias[k] = svm.coef_[0], svm.intercept_[0]
            scores = features[negative_rows] @ weights[:, k] + bias[k]  # every negative
            record = history[round_index]
            record["false_positives"][k] = int(np.sum(scores > 0))
            record["cache"][k] = int(in_cache.sum())
            for key, values in (("negative_histogram", scores),
                                ("positive_histogram",
                                 features[positive_rows] @ weights[:, k] + bias[k])):
                clipped = np.clip(values, SVM_SCORE_BINS[0], SVM_SCORE_BINS[-1])
                record[key][k] = np.histogram(clipped, SVM_SCORE_BINS)[0].astype(int).tolist()
            if round_index + 1 < int(rounds):
                hard = select_hard_negatives(scores, in_cache, hard_negatives_per_round)
                in_cache[hard] = True
                record["hard_added"][k] = int(len(hard))
    return weights, bias, history


def box_regression_targets(regions, matched_boxes, max_iou, min_iou=0.6,
                           box_weights=detection_head.HEAD_BOX_WEIGHTS):
    """Step 5's training pairs: regions with IoU > ``min_iou`` with their best ground-truth box,
    and the offsets ``boxes.encode_boxes(box, region)`` that move the region onto it.

    Args: regions ``[M, 4]``, matched_boxes ``[M, 4]``, max_iou ``[M]``.
    Returns: ``(rows [n] int64, targets [n, 4] float32)``.
    """
    rows = np.flatnonzero(np.asarray(max_iou) > min_iou)
    deltas = box_ops.encode_boxes(np.asarray(matched_boxes, np.float32)[rows],
                                  np.asarray(regions, np.float32)[rows], weights=box_weights)
    return rows.astype(np.int64), deltas.numpy().astype(np.float32)


def train_box_regressors(features, classes, deltas, num_classes, alpha=1000.0):
    """One ridge regression per class from features to the 4 offsets (R-CNN appendix C, with the
    paper's regularisation lambda = 1000 as ``alpha``).

    Args: features ``[n, D]``, classes ``[n]`` (class of each pair's box), deltas ``[n, 4]``.
    Returns: ``(kernel [D, 4K], bias [4K])`` for ``RCNN.set_box_regressors`` (zeros for a class
    without pairs: its regions stay where they are).
    """
    from sklearn.linear_model import Ridge

    features = np.asarray(features, np.float32)
    kernel = np.zeros((features.shape[1], 4 * num_classes), np.float32)
    bias = np.zeros((4 * num_classes,), np.float32)
    for k in range(num_classes):
        rows = np.flatnonzero(np.asarray(classes) == k)
        if len(rows) == 0:
            continue
        ridge = Ridge(alpha=alpha).fit(features[rows], np.asarray(deltas)[rows])
        kernel[:, 4 * k:4 * k + 4] = ridge.coef_.T
        bias[4 * k:4 * k + 4] = ridge.intercept_
    return kernel, bias


def fit_svms_and_regressors(model, table, svm_rounds=3, svm_C=1e-3, initial_negatives=1000,
                            hard_negatives_per_round=2000, negative_iou=0.3, regression_iou=0.6,
                            ridge_alpha=1000.0, seed=0):
    """Steps 4 and 5 on a ``region_table``: train the SVMs (with hard-negative mining) and the
    box regressors, and install them in ``model``.

    Positives of class k: its ground-truth boxes; negatives: regions with IoU < ``negative_iou``
    with every box of class k (other classes' boxes included).

    Returns:
        dict ``feature_scale``, ``svm_history`` (``train_svms``), ``positives`` / ``negatives``
        per class, ``regression_pairs`` per class.
    """
    num_classes = model.num_classes
    scale = feature_scale_for(table["features"])
    features = table["features"] * scale
    is_gt = table["is_gt"]
    positives = np.stack([is_gt & (table["gt_class"] == k) for k in range(num_classes)], axis=1)
    negatives = table["class_iou"] < negative_iou  # [M, K]
    weights, bias, history = train_svms(
        features, positives, negatives, rounds=svm_rounds, C=svm_C,
        initial_negatives=initial_negatives, hard_negatives_per_round=hard_negatives_per_round,
        seed=seed)
    model.set_svms(weights, bias, scale)
    # Regression pairs from the proposals only (a ground-truth region has nothing to learn).
    proposal_rows = np.flatnonzero(~is_gt)
    rows, deltas = box_regression_targets(table["boxes"][proposal_rows],
                                          table["matched_box"][proposal_rows],
                                          table["max_iou"][proposal_rows], min_iou=regression_iou)
    rows = proposal_rows[rows]
    classes = table["matched_class"][rows]
    kernel, box_bias = train_box_regressors(features[rows], classes, deltas, num_classes,
                                            alpha=ridge_alpha)
    model.set_box_regressors(kernel, box_bias)
    return {"feature_scale": float(scale), "svm_history": history,
            "positives": positives.sum(axis=0).tolist(),
            "negatives": negatives.sum(axis=0).tolist(),
            "regression_pairs": np.bincount(classes, minlength=num_classes).tolist()}


# ----------------------------------------------------------------------------------
# Fast R-CNN
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class FastRCNN(ProposalDetector):
    """Fast R-CNN (Girshick 2015): one feature map per image, RoI pooling over the regions, the
    multi-task head, trained end to end.

    ``call(images, proposals=None, num_proposals=None)`` returns ``proposals`` ``[B, P, 4]``,
    ``num_proposals`` ``[B]``, ``class_logits`` ``[B, P, K + 1]`` (background first) and
    ``box_deltas`` ``[B, P, K, 4]``. Losses: ``loss`` = ``class_loss`` + ``box_loss``
    (``detection_head.detection_loss``, eq. 1).
    """

    CONFIG_CLASS = FastRCNNConfig
    LOSS_NAMES = ("loss", "class_loss", "box_loss")

    def __init__(self, num_classes=None, config=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        from ch05_detection.faster_rcnn import make_roi_layer

        config = self.config
        self.backbone = build_backbone(config)
        self.roi_layer = make_roi_layer("pool" if config.roi_op == "pool" else "align",
                                        config.pool_size)
        self.detection_head = detection_head.FastRCNNHead(
            config.num_classes, head_type=config.head_type, hidden_units=config.head_units,
            name="detection_head")
        self.build_weights()

    def pool_rois(self, feature_map, rois):
        """RoI pooling of ``rois`` ``[B, R, 4]`` on ``feature_map`` -> ``[B, R, p, p, C]``."""
        pooled = self.roi_layer(feature_map, rois)
        size = self.config.pool_size  # keep the static shape the dense head needs
        return tf.reshape(pooled, [tf.shape(rois)[0], tf.shape(rois)[1], size, size,
                                   feature_map.shape[-1]])

    def call(self, images, training=False, proposals=None, num_proposals=None):
        images = self._resize(images)
        proposals, num_proposals = self._regions(proposals, num_proposals, images)
        feature_map = self.backbone(images, training=training)  # once per image
        class_logits, box_deltas = self.detection_head(self.pool_rois(feature_map, proposals),
                                                       training=training)
        return {"proposals": proposals, "num_proposals": num_proposals,
                "class_logits": class_logits, "box_deltas": box_deltas}

    def decode(self, outputs):
        proposals = outputs["proposals"]
        return detection_head.postprocess_detections(
            proposals, outputs["class_logits"], outputs["box_deltas"],
            roi_valid=self._valid(proposals, outputs["num_proposals"]),
            score_threshold=self.config.score_threshold,
            nms_iou_threshold=self.config.detection_nms_iou,
            max_detections=self.config.max_detections)

    def losses_for(self, images, gt_boxes, gt_classes, training, step, proposals=None,
                   proposal_valid=None):
        """Eq. 1 on ``rois_per_image`` sampled RoIs per image (sec. 2.3)."""
        config = self.config
        if proposals is None:
            proposals, counts = self.propose(images)
            proposal_valid = self._valid(proposals, counts)
        sample = self._sample(proposals, proposal_valid, gt_boxes, gt_classes, step,
                              config.rois_per_image, config.foreground_fraction,
                              config.foreground_iou, config.background_iou_low)
        feature_map = self.backbone(images, training=training)
        class_logits, box_deltas = self.detection_head(self.pool_rois(feature_map, sample["rois"]),
                                                       training=training)
        class_loss, box_loss = detection_head.detection_loss(
            class_logits, box_deltas, sample["class_targets"], sample["box_targets"])
        return {"loss": class_loss + box_loss, "class_loss": class_loss, "box_loss": box_loss}
