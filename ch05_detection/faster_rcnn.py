"""Faster R-CNN as one Keras model: backbone -> RPN -> proposals -> RoIAlign -> Fast R-CNN head.

Ren, He, Girshick and Sun 2015, "Faster R-CNN: Towards Real-Time Object Detection
with Region Proposal Networks". The model reads like the paper's figure 2:

* a backbone from chapter 4 (``ch04_classification.models.get_backbone``) computes the
  shared feature map;
* the RPN (``rpn.py``) scores and regresses the anchors (``anchors.py``), and the
  ``ProposalLayer`` turns them into proposals;
* RoIAlign or RoI pooling (``roi_ops.py``) cuts a fixed-size feature for each
  proposal, and the Fast R-CNN head (``detection_head.py``) classifies it and refines
  its box.

The training targets of both stages (matching, balanced sampling) come from
``targets.py``. Every option lives once, in ``FasterRCNNConfig``, which ``get_config``
writes and ``from_config`` reads.

Two ways to train (sec. 3.2), chosen by ``schedule``:

* ``"joint"``, **approximate joint training** ("ii"): one backbone, one loss, the sum
  of the RPN loss and the detector loss, one backward pass, with the proposals
  treated as constants (no gradient through their coordinates);
* ``"alternating"``, the paper's **4-step alternating training** ("i"). The model then
  holds two backbones from the start, initialised with the same weights, so its set
  of variables never changes between the steps (checkpoints stay simple).
  ``set_training_stage`` walks through ``ALTERNATING_SCHEDULE``:

  1. ``"rpn"``: train the RPN's backbone and the RPN on the RPN loss;
  2. ``"detector"``: train a *separate* detector network, its own backbone and the
     detection head, on the proposals of the step-1 RPN (frozen);
  3. ``"rpn_finetune"``: give the RPN the detector's backbone (its weights are copied
     into the RPN's backbone, and both paths run through one backbone), frozen, and
     fine-tune the RPN layers only: the two networks now share their convolutions;
  4. ``"detector_finetune"``: shared convolutions still frozen, fine-tune the detector
     layers only.

``detect(images)`` returns padded detections under keras-hub's key names; ``propose``
returns the RPN's proposals. Try it::

    python ch05_detection/train_faster_rcnn.py --fast
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from ch05_detection import detection_head, roi_ops, rpn, targets
from ch05_detection.detector import (  # noqa: F401  (check_images: re-exported, the older home)
    Detector, DetectorConfig, _require, build_backbone, check_images, load_backbone_weights)

TRAINING_STAGES = ("joint", "rpn", "detector", "rpn_finetune", "detector_finetune")
# The 4-step alternating schedule of Ren et al. 2015, sec. 3.2.
ALTERNATING_SCHEDULE = ("rpn", "detector", "rpn_finetune", "detector_finetune")
SCHEDULES = ("joint", "alternating")
# Stages a model of each schedule accepts. "rpn" alone on a joint model trains just the
# proposal network (to look at proposals without a detector).
_SCHEDULE_STAGES = {"joint": ("joint", "rpn"), "alternating": ALTERNATING_SCHEDULE}

# What a stage trains and which losses it uses.
_Stage = collections.namedtuple(
    "_Stage", "backbone detector_backbone rpn detector rpn_loss detector_loss")
_STAGES = {
    "joint": _Stage(True, False, True, True, True, True),
    "rpn": _Stage(True, False, True, False, True, False),
    "detector": _Stage(False, True, False, True, False, True),
    "rpn_finetune": _Stage(False, False, True, False, True, False),
    "detector_finetune": _Stage(False, False, False, True, False, True),
}
# From step 3 on, the RPN and the detector run on one (the detector's) backbone.
_SHARED_STAGES = ("rpn_finetune", "detector_finetune")


# ----------------------------------------------------------------------------------
# configuration: every option once
# ----------------------------------------------------------------------------------
@dataclass
class FasterRCNNConfig(DetectorConfig):
    """Every option of ``FasterRCNN`` (with those of ``DetectorConfig``).

    Args:
        schedule: ``"joint"`` (one backbone) or ``"alternating"`` (the paper's 4 steps,
            two backbones).
        anchor_scales: anchor sizes in pixels; aspect_ratios: height / width.
        rpn_filters: channels of the RPN's 3x3 convolution.
        rpn_pre_nms_top_n_*, rpn_post_nms_top_n_*, rpn_nms_iou, rpn_min_size: the
            proposal layer in training / at test (minimum size in pixels).
        rpn_num_samples, rpn_positive_fraction: anchors sampled per image (256, half
            positive); rpn_positive_iou, rpn_negative_iou: matching (0.7, 0.3).
        rpn_ignore_cross_boundary: ignore anchors crossing the image border in training
            (Ren et al. 2015, sec. 3.3).
        roi_op, pool_size: "align" or "pool", and the pooled size (7 x 7).
        head_type, head_units, head_channels: detection head ("dense" or "conv"), its
            width, and an optional 1x1 convolution reducing the feature map before the
            RoI op (saves time in the fully connected head).
        rois_per_image, foreground_fraction, foreground_iou, background_iou_low: RoI
            sampling (background IoU in [background_iou_low, foreground_iou)).
        detection_nms_iou: per-class NMS of ``detect``.
    """

    schedule: str = "joint"
    anchor_scales: tuple = (24.0, 48.0, 96.0)
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_filters: int = 128
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 100
    rpn_nms_iou: float = 0.7
    rpn_min_size: float = 2.0
    rpn_num_samples: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_ignore_cross_boundary: bool = True
    roi_op: str = "align"
    pool_size: int = 7
    head_type: str = "dense"
    head_units: int = 256
    head_channels: Optional[int] = None
    rois_per_image: int = 64
    foreground_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou_low: float = 0.0
    detection_nms_iou: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        _require(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)
        _require(self.roi_op in ("align", "pool"), "roi_op", "'align' or 'pool'", self.roi_op)
        _require(self.head_type in ("dense", "conv"), "head_type", "'dense' or 'conv'",
                 self.head_type)
        self.anchor_scales = tuple(float(s) for s in self.anchor_scales)
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        for name in ("rpn_filters", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                     "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "rpn_num_samples",
                     "pool_size", "head_units", "rois_per_image"):
            value = getattr(self, name)
            _require(int(value) >= 1, name, ">= 1", value)
            setattr(self, name, int(value))
        for name in ("rpn_nms_iou", "rpn_positive_fraction", "rpn_positive_iou",
                     "rpn_negative_iou", "foreground_fraction", "foreground_iou",
                     "background_iou_low", "detection_nms_iou"):
            value = getattr(self, name)
            _require(0.0 <= float(value) <= 1.0, name, "in [0, 1]", value)
            setattr(self, name, float(value))
        _require(self.rpn_negative_iou <= self.rpn_positive_iou, "rpn_negative_iou",
                 f"<= rpn_positive_iou ({self.rpn_positive_iou})", self.rpn_negative_iou)
        _require(self.background_iou_low <= self.foreground_iou, "background_iou_low",
                 f"<= foreground_iou ({self.foreground_iou})", self.background_iou_low)
        self.rpn_min_size = float(self.rpn_min_size)
        self.rpn_ignore_cross_boundary = bool(self.rpn_ignore_cross_boundary)
        if self.head_channels is not None:
            _require(int(self.head_channels) >= 1, "head_channels", ">= 1 or None",
                     self.head_channels)
            self.head_channels = int(self.head_channels)


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def make_roi_layer(roi_op="align", pool_size=7, name="roi_op"):
    """The RoI feature extractor: ``"align"`` (RoIAlign, He et al. 2017) or ``"pool"``
    (RoI max pooling, Girshick 2015), from ``roi_ops.py``."""
    if roi_op == "align":
        return roi_ops.RoIAlign(pool_size, name=name)
    if roi_op == "pool":
        return roi_ops.RoIPooling(pool_size, name=name)
    raise ValueError(f"`roi_op` must be 'align' or 'pool', got {roi_op!r}")


def _check_anchor_shapes_fit(anchor_valid, config):
    """ValueError if some anchor shape is never inside the image.

    Such an anchor is always ignored in training (cross-boundary), so its objectness is
    never learnt: at test time it keeps its initial score (~0.5), above the trained
    proposals, and floods the top-N. The paper's anchors all fit in its ~1000 x 600
    images; ours must fit too.
    """
    ratios, scales = config.aspect_ratios, config.anchor_scales
    fits = np.asarray(anchor_valid).reshape(-1, len(ratios) * len(scales)).any(axis=0)
    if fits.all():
        return
    # Anchor order: ratio-major, scale-minor (anchors.generate_anchors).
    never = [(scales[k % len(scales)], ratios[k // len(scales)]) for k in np.flatnonzero(~fits)]
    raise ValueError(
        f"`anchor_scales` {scales} with `aspect_ratios` {ratios}: the anchors (scale, ratio) "
        f"{never} never lie inside the {config.image_size} image, so with "
        "`rpn_ignore_cross_boundary=True` (Ren et al. 2015, sec. 3.3) they would never be "
        "trained; use smaller scales or rpn_ignore_cross_boundary=False")


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class FasterRCNN(Detector):
    """Faster R-CNN (Ren et al. 2015) with a chapter-4 backbone.

    Input:
        ``images`` ``[batch, image_size, image_size, 3]`` float in [0, 1].
    Output of ``predict`` / ``detect`` (the detector interface, ``detector.py``):
        dict ``boxes`` ``[batch, D, 4]`` normalized yxyx, ``classes`` ``[batch, D]``
        int32 (0-based, -1 padding), ``confidence`` ``[batch, D]`` (also under
        ``scores``), ``num_detections`` ``[batch]``, with ``D = max_detections``.
        ``call`` returns the raw outputs (proposals and head outputs), ``decode`` the above.

    ``fit`` takes batches of the detection contract (dicts with ``image``, ``boxes``,
    ``classes`` padded with -1), e.g. from ``common.data.batch_detection``.

    Build it from options, ``FasterRCNN(5, image_size=(64, 64), ...)``, or from a
    config, ``FasterRCNN(config=FasterRCNNConfig(5, ...))``; ``model.config`` holds
    them (see ``FasterRCNNConfig`` for each option). ``training_stage`` is one of
    ``TRAINING_STAGES`` (default: the first stage of the schedule).
    """

    CONFIG_CLASS = FasterRCNNConfig
    LOSS_NAMES = ("loss", "rpn_class_loss", "rpn_box_loss", "head_class_loss", "head_box_loss")

    def __init__(self, num_classes=None, config=None, training_stage=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        config = self.config
        height, width = config.image_size

        self.backbone = build_backbone(config)
        # The alternating schedule trains a separate detector network in step 2, its
        # backbone initialised like the RPN's (same weights).
        if config.schedule == "alternating":
            self.detector_backbone = build_backbone(config)
            self.detector_backbone.set_weights(self.backbone.get_weights())
        else:
            self.detector_backbone = None
        feature_height, feature_width = self.backbone.output_shape[1:3]
        self.feature_size = (int(feature_height), int(feature_width))
        # Anchors depend only on the (fixed) image size: computed once, stored as NumPy
        # (not a weight). Stride = image pixels per feature cell.
        self.anchor_stride = (height / feature_height, width / feature_width)
        self.anchors = anchor_ops.generate_anchors(
            feature_height, feature_width, self.anchor_stride, config.anchor_scales,
            config.aspect_ratios, image_height=height, image_width=width,
            normalized=True).numpy()  # [H * W * k, 4]
        # Cross-boundary anchors take no part in the RPN loss (sec. 3.3).
        num_anchors = len(config.anchor_scales) * len(config.aspect_ratios)
        self.anchor_valid = None
        if config.rpn_ignore_cross_boundary:
            self.anchor_valid = targets.inside_image(self.anchors).numpy()
            _check_anchor_shapes_fit(self.anchor_valid, config)
        self.rpn_head = rpn.RPNHead(num_anchors, config.rpn_filters, name="rpn_head")
        self.proposal_layer = rpn.ProposalLayer(
            pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
            post_nms_top_n_train=config.rpn_post_nms_top_n_train,
            pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
            post_nms_top_n_test=config.rpn_post_nms_top_n_test,
            nms_iou_threshold=config.rpn_nms_iou,
            min_size=config.rpn_min_size / max(height, width), name="proposal_layer")
        self.head_reduce = (keras.layers.Conv2D(config.head_channels, 1, activation="relu",
                                                name="head_reduce")
                            if config.head_channels else None)
        self.roi_layer = make_roi_layer(config.roi_op, config.pool_size)
        self.detection_head = detection_head.FastRCNNHead(
            config.num_classes, head_type=config.head_type, hidden_units=config.head_units,
            name="detection_head")

        # Build every weight now with one dummy image, so a fresh model, a loaded one
        # and a summary all see the same variables. (Before choosing the stage: a
        # variable created while its layer is frozen is never watched by GradientTape.)
        self.training_stage = _SCHEDULE_STAGES[config.schedule][0]
        self.build_weights()  # (a subclass adding layers creates them there: Mask R-CNN)
        self.set_training_stage(training_stage or self.training_stage)

    # ------------------------------------------------------------------ XLA
    # ``compile(jit_compile=...)`` ends by setting this property: with XLA on (True after Keras
    # resolved "auto"), the model switches to its XLA-compatible ops, else back to the default
    # ones. (A property rather than a ``compile`` override: Keras restores the compile config of a
    # saved model only when ``compile`` is its own.)
    @property
    def jit_compile(self):
        return keras.Model.jit_compile.fget(self)

    @jit_compile.setter
    def jit_compile(self, value):
        keras.Model.jit_compile.fset(self, value)
        if hasattr(self, "proposal_layer"):  # Keras sets it once before the layers exist
            self.use_xla_ops(self._jit_compile is True)

    def use_xla_ops(self, enabled=True):
        """Choose the ops of the step: XLA-compatible ones or TensorFlow's kernels.

        With ``enabled``, every RoIAlign gathers its bilinear samples
        (``roi_ops.roi_align_gather``) instead of calling ``tf.image.crop_and_resize``, and
        the proposal layer runs one batched, static-shape NMS (``boxes.nms_padded``) instead
        of ``tf.image.non_max_suppression`` image by image: neither kernel exists in XLA.
        Both pairs give the same numbers (tested), so this changes speed, not results.
        ``compile(jit_compile=True)`` calls it (see the ``jit_compile`` property). RoI
        *pooling* (``roi_op="pool"``) does not compile: its cells gather a number of rows
        that depends on the RoIs (a dynamic shape). Off by default (TensorFlow's kernels
        are faster without XLA on a CPU: ``bench/bench_faster_rcnn_xla.py``).
        """
        for layer in self._flatten_layers():
            if isinstance(layer, roi_ops.RoIAlign):
                layer.set_implementation("gather" if enabled else "crop_and_resize")
            elif isinstance(layer, rpn.ProposalLayer):
                layer.set_nms("batched" if enabled else "per_image")
        if hasattr(self, "_detect_function"):
            del self._detect_function  # traced with the other ops

    # ------------------------------------------------------------------ stages
    def set_training_stage(self, stage):
        """Choose what ``fit`` trains: one of ``TRAINING_STAGES`` (see the module doc).

        A joint model accepts ``"joint"`` and ``"rpn"``; an alternating one the four
        steps of ``ALTERNATING_SCHEDULE``. Entering step 3 or 4 copies the detector's
        backbone into the RPN's (``share_backbone``). Recompile after changing the stage
        (a new optimizer for the new set of trained variables).
        """
        if stage not in TRAINING_STAGES:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        allowed = _SCHEDULE_STAGES[self.config.schedule]
        if stage not in allowed:
            raise ValueError(
                f"`stage` {stage!r} needs a model built with "
                f"schedule={'joint' if stage == 'joint' else 'alternating'!r}; this model's "
                f"schedule is {self.config.schedule!r}, its stages are {allowed}")
        if stage in _SHARED_STAGES:
            self.share_backbone()
        self.training_stage = stage
        settings = _STAGES[stage]
        self.backbone.trainable = settings.backbone
        if self.detector_backbone is not None:
            self.detector_backbone.trainable = settings.detector_backbone
        self.rpn_head.trainable = settings.rpn
        self.detection_head.trainable = settings.detector
        if self.head_reduce is not None:
            self.head_reduce.trainable = settings.detector

    def share_backbone(self):
        """Step 3 of the alternating schedule: the RPN takes the detector's backbone.

        Copies the detector backbone's weights into the RPN's backbone (from then on
        both paths run through the detector's backbone). Nothing to do on a joint model.
        """
        if self.detector_backbone is not None:
            self.backbone.set_weights(self.detector_backbone.get_weights())

    # ------------------------------------------------------------------ pieces
    def _rpn_backbone(self):
        if self.detector_backbone is not None and self.training_stage in _SHARED_STAGES:
            return self.detector_backbone
        return self.backbone

    def _detector_backbone(self):
        return self.backbone if self.detector_backbone is None else self.detector_backbone

    def _one_backbone(self):
        return self._rpn_backbone() is self._detector_backbone()

    @staticmethod
    def _run_backbone(backbone, images, training):
        # BatchNorm uses batch statistics only while its backbone is being trained.
        return backbone(images, training=bool(training and backbone.trainable))

    def rpn_features(self, images, training=False):
        """Feature map ``[batch, h, w, C]`` the RPN sees."""
        return self._run_backbone(self._rpn_backbone(), images, training)

    def detector_features(self, images, training=False):
        """Feature map ``[batch, h, w, C]`` the detection head sees (the same tensor as
        ``rpn_features`` on a joint model and from step 3 of the alternating schedule)."""
        return self._run_backbone(self._detector_backbone(), images, training)

    features = rpn_features  # the older name

    def head_features(self, feature_map):
        return feature_map if self.head_reduce is None else self.head_reduce(feature_map)

    def pool_rois(self, feature_map, rois):
        """RoIAlign / RoI pooling of ``rois`` ``[batch, R, 4]`` -> ``[batch, R, p, p, C]``."""
        head_map = self.head_features(feature_map)
        pooled = self.roi_layer(head_map, rois)
        # Keep the static channel count (the RoI op may return it as unknown in a graph).
        channels = head_map.shape[-1]
        pool_size = self.config.pool_size
        return tf.reshape(pooled, [tf.shape(rois)[0], tf.shape(rois)[1], pool_size, pool_size,
                                   channels])

    def _both_feature_maps(self, images, training=False):
        rpn_map = self.rpn_features(images, training)
        detector_map = (rpn_map if self._one_backbone()
                        else self.detector_features(images, training))
        return rpn_map, detector_map

    def propose(self, images, training=False):
        """RPN outputs for a batch, for pictures and checks.

        Returns dict: ``pre_nms_boxes`` ``[batch, n, 4]`` and ``pre_nms_scores``
        (top-N before NMS), ``proposals`` ``[batch, P, 4]``, ``proposal_scores``,
        ``num_proposals`` ``[batch]`` (after NMS), ``objectness_logits``, ``rpn_deltas``.
        """
        images = self._resize(images)
        feature_map = self.rpn_features(images, training=False)
        logits, deltas = self.rpn_head(feature_map)
        pre_boxes, pre_scores = self.proposal_layer.decode_and_filter(
            logits, deltas, self.anchors, training=training)
        proposals, scores, count = self.proposal_layer(logits, deltas, self.anchors,
                                                       training=training)
        return {"pre_nms_boxes": pre_boxes, "pre_nms_scores": pre_scores,
                "proposals": proposals, "proposal_scores": scores, "num_proposals": count,
                "objectness_logits": logits, "rpn_deltas": deltas}

    def call(self, images, training=False):
        """Raw outputs: the proposals and the detection head's outputs for each of them.

        Returns dict: ``proposals`` ``[batch, P, 4]``, ``num_proposals`` ``[batch]``,
        ``class_logits`` ``[batch, P, K + 1]`` (background first), ``box_deltas``
        ``[batch, P, K, 4]``; ``decode`` turns them into detections.
        """
        images = self._resize(images)
        rpn_map, detector_map = self._both_feature_maps(images, training=False)
        logits, deltas = self.rpn_head(rpn_map)
        proposals, _, count = self.proposal_layer(logits, deltas, self.anchors, training=False)
        pooled = self.pool_rois(detector_map, proposals)
        class_logits, box_deltas = self.detection_head(pooled, training=False)
        return {"proposals": proposals, "num_proposals": count, "class_logits": class_logits,
                "box_deltas": box_deltas}

    def decode(self, outputs):
        """Per-class boxes and scores of every proposal, then per-class NMS (Fast R-CNN sec. 3.1)."""
        proposals = outputs["proposals"]
        proposal_valid = (tf.range(tf.shape(proposals)[1])[None, :]
                          < outputs["num_proposals"][:, None])
        return detection_head.postprocess_detections(
            proposals, outputs["class_logits"], outputs["box_deltas"], roi_valid=proposal_valid,
            score_threshold=self.config.score_threshold,
            nms_iou_threshold=self.config.detection_nms_iou,
            max_detections=self.config.max_detections)

    # ------------------------------------------------------------------ training
    def losses_for(self, images, gt_boxes, gt_classes, training, step, **extra):
        """The losses of the current stage: ``loss`` (the total), ``rpn_class_loss``,
        ``rpn_box_loss``, ``head_class_loss``, ``head_box_loss`` (0 for those the stage does
        not use), and those of ``roi_losses`` (``extra``: the subclass's ``extra_inputs``)."""
        config, stage = self.config, _STAGES[self.training_stage]
        index = targets.global_image_index(tf.shape(images)[0])
        zero = tf.constant(0.0)
        losses = {name: zero for name in self.LOSS_NAMES if name != "loss"}
        rpn_map = self.rpn_features(images, training=training)
        logits, deltas = self.rpn_head(rpn_map)  # [batch, A], [batch, A, 4]
        if stage.rpn_loss:
            labels, box_targets = rpn.assign_rpn_targets(
                self.anchors, gt_boxes, gt_classes, positive_threshold=config.rpn_positive_iou,
                negative_threshold=config.rpn_negative_iou, num_samples=config.rpn_num_samples,
                positive_fraction=config.rpn_positive_fraction,
                seed=targets.image_seeds(step, index, config.seed, targets.RPN_SAMPLING_STREAM),
                anchor_valid=self.anchor_valid)
            losses["rpn_class_loss"], losses["rpn_box_loss"] = rpn.rpn_loss(
                logits, deltas, labels, box_targets)
        if stage.detector_loss:
            proposals, _, count = self.proposal_layer(logits, deltas, self.anchors,
                                                      training=True)
            proposal_valid = tf.range(tf.shape(proposals)[1])[None, :] < count[:, None]
            sample = detection_head.sample_rois(
                proposals, proposal_valid, gt_boxes, gt_classes, num_rois=config.rois_per_image,
                foreground_fraction=config.foreground_fraction,
                foreground_iou=config.foreground_iou,
                background_iou_high=config.foreground_iou,
                background_iou_low=config.background_iou_low,
                seed=targets.image_seeds(step, index, config.seed, targets.ROI_SAMPLING_STREAM))
            detector_map = (rpn_map if self._one_backbone()
                            else self.detector_features(images, training=training))
            pooled = self.pool_rois(detector_map, sample["rois"])
            class_logits, box_deltas = self.detection_head(pooled, training=training)
            losses["head_class_loss"], losses["head_box_loss"] = detection_head.detection_loss(
                class_logits, box_deltas, sample["class_targets"], sample["box_targets"])
            losses.update(self.roi_losses(detector_map, sample, gt_boxes, gt_classes,
                                          training=training, **extra))
        losses["loss"] = sum(losses[name] for name in self.LOSS_NAMES if name != "loss")
        return losses

    def roi_losses(self, feature_map, sample, gt_boxes, gt_classes, training=False, **extra):
        """Losses of further heads on the sampled RoIs (``sample``: ``detection_head.sample_rois``'s
        dict), added to the total: Mask R-CNN's mask branch (``ch06_segmentation/mask_rcnn.py``).
        None here."""
        return {}

    # ------------------------------------------------------------------ saving
    def get_config(self):
        config = super().get_config()
        config.update(self.config.to_dict())
        config["training_stage"] = self.training_stage
        return config


def proposals_before_after_nms(model, images):
    """For notebooks and figures: ``(pre_nms_boxes, pre_nms_scores, proposals, num_proposals)``
    as NumPy arrays for a batch of images (inference settings)."""
    out = model.propose(images, training=False)
    return (out["pre_nms_boxes"].numpy(), out["pre_nms_scores"].numpy(),
            out["proposals"].numpy(), out["num_proposals"].numpy())
