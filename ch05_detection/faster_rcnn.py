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
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from common.training import synchronize_batchnorm
from ch05_detection import detection_head, roi_ops, rpn, targets

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
def _require(condition, name, expected, value):
    if not condition:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")


@dataclass
class DetectorConfig:
    """Options every detector of this chapter shares (``get_config`` serializes them).

    Args:
        num_classes: foreground classes (0-based ids; background is the model's business).
        class_names: optional names of the classes, for pictures and ``predict.py``
            (default ``("class 0", ..., "class N-1")``, see ``names``).
        image_size: (height, width) of the input in pixels (anchors are fixed to it).
        backbone: a name of ``ch04_classification.models.get_backbone``.
        output_stride: backbone stride (8 gives a 16x16 map for 128x128 images).
        backbone_options: extra builder options for the backbone (e.g. wider filters).
        synchronized_batch_norm: BatchNormalization with ``synchronized=True`` in the
            backbone: batch statistics over all replicas of a ``tf.distribute`` strategy.
        score_threshold, max_detections: post-processing of ``detect``.
        flip_augment: random horizontal flips inside ``train_step``.
        seed: seed of the stateless randomness of ``train_step`` (sampling, flips).
    """

    num_classes: int
    class_names: Optional[tuple] = None
    image_size: tuple = (128, 128)
    backbone: str = "resnet_small"
    output_stride: int = 8
    backbone_options: dict = field(default_factory=dict)
    synchronized_batch_norm: bool = False
    score_threshold: float = 0.05
    max_detections: int = 100
    flip_augment: bool = True
    seed: int = 0

    def __post_init__(self):
        _require(int(self.num_classes) >= 1, "num_classes", ">= 1", self.num_classes)
        self.num_classes = int(self.num_classes)
        if self.class_names is not None:
            names = tuple(str(name) for name in self.class_names)
            _require(len(names) == self.num_classes, "class_names",
                     f"{self.num_classes} names (one per class)", self.class_names)
            self.class_names = names
        size = self.image_size
        size = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
        _require(len(size) == 2 and min(size) >= 32, "image_size", "(height, width) >= 32",
                 self.image_size)
        self.image_size = size
        self.output_stride = int(self.output_stride)
        self.backbone_options = dict(self.backbone_options or {})
        self.synchronized_batch_norm = bool(self.synchronized_batch_norm)
        _require(0.0 <= self.score_threshold <= 1.0, "score_threshold", "in [0, 1]",
                 self.score_threshold)
        self.score_threshold = float(self.score_threshold)
        _require(int(self.max_detections) >= 1, "max_detections", ">= 1", self.max_detections)
        self.max_detections = int(self.max_detections)
        self.flip_augment = bool(self.flip_augment)
        self.seed = int(self.seed)

    @property
    def names(self):
        """The class names, ``"class i"`` where none were given."""
        if self.class_names is not None:
            return self.class_names
        return tuple(f"class {i}" for i in range(self.num_classes))

    def to_dict(self):
        """JSON-ready dict of every option (tuples as lists)."""
        config = dataclasses.asdict(self)
        for key, value in config.items():
            if isinstance(value, tuple):
                config[key] = list(value)
        return config

    @classmethod
    def from_dict(cls, config):
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} options {unknown}; known: {sorted(known)}")
        return cls(**config)


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


def check_images(images, name="images"):
    """Convert to float32 ``[batch, H, W, 3]``; a single ``[H, W, 3]`` image gets a batch axis."""
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    images = tf.cast(images, tf.float32)
    if images.shape.rank == 3:
        images = images[None]
    if images.shape.rank != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"`{name}` must be [batch, height, width, 3] (or one [height, width, 3] image), "
            f"got shape {images.shape}")
    return images


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


def build_backbone(config):
    """The chapter-4 backbone of a ``DetectorConfig`` (optionally with synchronized BN)."""
    from ch04_classification.models import get_backbone

    height, width = config.image_size
    backbone = get_backbone(config.backbone, (height, width, 3), output_stride=config.output_stride,
                            **config.backbone_options)
    return synchronize_batchnorm(backbone) if config.synchronized_batch_norm else backbone


def load_backbone_weights(model_or_backbone, classifier_path):
    """Initialise a backbone from a chapter-4 classifier: ImageNet pre-training in miniature.

    Faster R-CNN starts its shared convolutions from a network pre-trained for ImageNet
    classification (Ren et al. 2015, sec. 3.2 and 4). Here the classifier is the
    ``<out>/model.keras`` that ``ch04_classification/train_classifier.py`` writes: a
    functional network whose layers have the same names as the backbone's (the backbone
    is the same network cut at ``output_stride``). Each backbone layer with weights takes
    the weights of the classifier layer of the same name; the classifier's head is left
    out. The input size may differ (convolution weights do not depend on it).

    Args:
        model_or_backbone: a ``FasterRCNN`` (all its backbones are initialised) or a
            backbone ``keras.Model``.
        classifier_path: path of the classifier's ``.keras`` file.
    Returns:
        list of the names of the layers whose weights were copied.
    Raises:
        ValueError: no such file, or the architectures do not match (a backbone layer
            missing in the classifier, or weights of other shapes).
    """
    path = Path(classifier_path)
    if not path.is_file():
        raise ValueError(f"`classifier_path`: no file {str(path)!r} (expected the model.keras "
                         "written by ch04_classification/train_classifier.py to its --out)")
    if isinstance(model_or_backbone, FasterRCNN):
        backbones = [model_or_backbone.backbone]
        if model_or_backbone.detector_backbone is not None:
            backbones.append(model_or_backbone.detector_backbone)
    elif isinstance(model_or_backbone, keras.Model):
        backbones = [model_or_backbone]
    else:
        raise ValueError(f"`model_or_backbone` must be a FasterRCNN or a keras.Model, got "
                         f"{type(model_or_backbone).__name__}")
    import ch04_classification  # the chapter's loader registers its layers first

    classifier = ch04_classification.load_model(path, compile=False)
    classifier_layers = {layer.name: layer for layer in classifier.layers}
    copied = []
    for backbone in backbones:
        missing, mismatched, pairs = [], [], []
        for layer in backbone.layers:
            if not layer.weights:
                continue
            source = classifier_layers.get(layer.name)
            if source is None:
                missing.append(layer.name)
                continue
            theirs = [tuple(w.shape) for w in source.weights]
            ours = [tuple(w.shape) for w in layer.weights]
            if theirs != ours:
                mismatched.append(f"{layer.name}: classifier {theirs} vs backbone {ours}")
                continue
            pairs.append((layer, source))
        if missing or mismatched:
            problems = ([f"layers missing in the classifier: {missing[:5]}"] if missing else []) + (
                [f"weights of other shapes: {mismatched[:3]}"] if mismatched else [])
            raise ValueError(
                f"`classifier_path` {str(path)!r} ({classifier.name}) does not match the backbone "
                f"{backbone.name}: " + "; ".join(problems) + ". Train the classifier with the same "
                "network and widths as the detector's backbone (e.g. --model resnet_small).")
        for layer, source in pairs:
            layer.set_weights(source.get_weights())
        copied = [layer.name for layer, _ in pairs]
    return copied


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class FasterRCNN(keras.Model):
    """Faster R-CNN (Ren et al. 2015) with a chapter-4 backbone.

    Input:
        ``images`` ``[batch, image_size, image_size, 3]`` float in [0, 1].
    Output of ``call`` / ``predict`` / ``detect``:
        dict ``boxes`` ``[batch, D, 4]`` normalized yxyx, ``classes`` ``[batch, D]``
        int32 (0-based, -1 padding), ``confidence`` ``[batch, D]`` (also under
        ``scores``), ``num_detections`` ``[batch]``, with ``D = max_detections``.

    ``fit`` takes batches of the detection contract (dicts with ``image``, ``boxes``,
    ``classes`` padded with -1), e.g. from ``common.data.batch_detection``.

    Build it from options, ``FasterRCNN(5, image_size=(64, 64), ...)``, or from a
    config, ``FasterRCNN(config=FasterRCNNConfig(5, ...))``; ``model.config`` holds
    them (see ``FasterRCNNConfig`` for each option). ``training_stage`` is one of
    ``TRAINING_STAGES`` (default: the first stage of the schedule).
    """

    def __init__(self, num_classes=None, config=None, training_stage=None, **kwargs):
        keras_options = {key: kwargs.pop(key) for key in ("name", "trainable", "dtype")
                         if key in kwargs}
        if config is None:
            if num_classes is None:
                raise ValueError("`num_classes` is required (or pass `config`)")
            unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(FasterRCNNConfig)})
            if unknown:
                raise ValueError(f"unknown FasterRCNN options {unknown}")
            config = FasterRCNNConfig(num_classes=num_classes, **kwargs)
        elif num_classes is not None or kwargs:
            raise ValueError("pass either `config` or `num_classes` and options, not both")
        elif isinstance(config, dict):
            config = FasterRCNNConfig.from_dict(config)
        elif not isinstance(config, FasterRCNNConfig):
            raise ValueError(f"`config` must be a FasterRCNNConfig or a dict, got "
                             f"{type(config).__name__}")
        super().__init__(**keras_options)
        self.config = config
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

        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "rpn_class_loss", "rpn_box_loss", "head_class_loss", "head_box_loss")}
        # Build every weight now with one dummy image, so a fresh model, a loaded one
        # and a summary all see the same variables. (Before choosing the stage: a
        # variable created while its layer is frozen is never watched by GradientTape.)
        self.training_stage = _SCHEDULE_STAGES[config.schedule][0]
        self(tf.zeros((1, height, width, 3)), training=False)
        self.set_training_stage(training_stage or self.training_stage)

    # ------------------------------------------------------------------ options
    @property
    def num_classes(self):
        return self.config.num_classes

    @property
    def image_size(self):
        return self.config.image_size

    @property
    def class_names(self):
        """Names of the classes (``"class i"`` when the config gives none)."""
        return self.config.names

    @property
    def max_detections(self):
        return self.config.max_detections

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

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

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

    def _resize(self, images):
        images = check_images(images)
        if tuple(images.shape[1:3]) != self.image_size:
            images = tf.image.resize(images, self.image_size)
        return images

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
        images = self._resize(images)
        rpn_map, detector_map = self._both_feature_maps(images, training=False)
        logits, deltas = self.rpn_head(rpn_map)
        proposals, _, count = self.proposal_layer(logits, deltas, self.anchors, training=False)
        proposal_valid = tf.range(tf.shape(proposals)[1])[None, :] < count[:, None]
        pooled = self.pool_rois(detector_map, proposals)
        class_logits, box_deltas = self.detection_head(pooled, training=False)
        return detection_head.postprocess_detections(
            proposals, class_logits, box_deltas, roi_valid=proposal_valid,
            score_threshold=self.config.score_threshold,
            nms_iou_threshold=self.config.detection_nms_iou,
            max_detections=self.config.max_detections)

    def _inference(self, images):
        return self(images, training=False)

    def detect(self, images, batch_size=16):
        """Detections for images (NumPy or tensors, ``[B, H, W, 3]`` or one ``[H, W, 3]``).

        Images of another size are resized to ``image_size`` (boxes are normalized, so
        they stay valid for the original image). Returns a dict of NumPy arrays:
        ``boxes``, ``confidence`` (also as ``scores``), ``classes``, ``num_detections``
        (see the class docstring); ``model.class_names[c]`` names class ``c``.
        """
        images = check_images(images)
        if not hasattr(self, "_detect_function"):
            self._detect_function = tf.function(self._inference, reduce_retracing=True)
        outputs = []
        for start in range(0, int(images.shape[0]), batch_size):
            batch = self._resize(images[start:start + batch_size])
            outputs.append({k: v.numpy() for k, v in self._detect_function(batch).items()})
        if not outputs:
            count = self.config.max_detections
            empty_scores = np.zeros((0, count), np.float32)
            return {"boxes": np.zeros((0, count, 4), np.float32),
                    "classes": np.zeros((0, count), np.int32),
                    "confidence": empty_scores, "scores": empty_scores,
                    "num_detections": np.zeros((0,), np.int32)}
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

    # ------------------------------------------------------------------ training
    def _unpack(self, data):
        if isinstance(data, (tuple, list)):
            data = data[0]
        if not isinstance(data, dict) or not {"image", "boxes", "classes"} <= set(data):
            raise ValueError("FasterRCNN.fit expects batches of dicts with keys "
                             "'image', 'boxes' [batch, N, 4] and 'classes' [batch, N]")
        images = self._resize(data["image"])
        gt_boxes, gt_classes, _ = targets.check_detection_targets(
            data["boxes"], data["classes"], num_classes=self.num_classes)
        return images, gt_boxes, gt_classes

    def _flip(self, images, gt_boxes, gt_classes, step):
        """Random horizontal flip per image (images and boxes together); stateless,
        keyed on (seed, step, global image index) like the samplers."""
        index = targets.global_image_index(tf.shape(images)[0])
        seeds = targets.image_seeds(step, index, self.config.seed, targets.FLIP_STREAM)
        flip = targets.uniform_per_image(seeds, 1)[:, 0] < 0.5  # [batch]
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        ymin, xmin, ymax, xmax = tf.unstack(gt_boxes, axis=-1)
        flipped = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
        flipped = tf.where((gt_classes >= 0)[..., None], flipped, gt_boxes)
        return images, tf.where(flip[:, None, None], flipped, gt_boxes)

    def _stage_losses(self, images, gt_boxes, gt_classes, training, step):
        """The losses of the current stage for checked tensors; see ``compute_losses``."""
        config, stage = self.config, _STAGES[self.training_stage]
        index = targets.global_image_index(tf.shape(images)[0])
        zero = tf.constant(0.0)
        losses = {"rpn_class_loss": zero, "rpn_box_loss": zero, "head_class_loss": zero,
                  "head_box_loss": zero}
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
        losses["loss"] = (losses["rpn_class_loss"] + losses["rpn_box_loss"]
                          + losses["head_class_loss"] + losses["head_box_loss"])
        return losses

    def compute_losses(self, batch, training=False, step=0):
        """The named losses of the current stage for one batch (the detector interface).

        Args:
            batch: a dict of the detection contract (``image``, ``boxes``, ``classes``
                padded with -1), or a tuple whose first element is one.
            training: BatchNorm in training mode for the backbones being trained.
            step: training step the sampling randomness is keyed on.
        Returns:
            dict of scalars: ``loss`` (the total), ``rpn_class_loss``, ``rpn_box_loss``,
            ``head_class_loss``, ``head_box_loss`` (0 for the losses the stage does not use).
        """
        images, gt_boxes, gt_classes = self._unpack(batch)
        return self._stage_losses(images, gt_boxes, gt_classes, training=training, step=step)

    def _update_trackers(self, losses, batch_size):
        for name, tracker in self.loss_trackers.items():
            tracker.update_state(losses[name], sample_weight=batch_size)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def train_step(self, data):
        images, gt_boxes, gt_classes = self._unpack(data)
        # The step keys every random choice (flips, sampled anchors and RoIs).
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        if self.config.flip_augment:
            images, gt_boxes = self._flip(images, gt_boxes, gt_classes, step)
        with tf.GradientTape() as tape:
            losses = self._stage_losses(images, gt_boxes, gt_classes, training=True, step=step)
            # The optimizer sums the replicas' gradients: divide by their number.
            loss = self.optimizer.scale_loss(targets.scale_loss_for_replicas(losses["loss"]))
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        self.optimizer.apply_gradients(pairs)
        return self._update_trackers(losses, tf.cast(tf.shape(images)[0], tf.float32))

    def test_step(self, data):
        images, gt_boxes, gt_classes = self._unpack(data)
        # Step 0: the validation loss samples the same anchors and RoIs every epoch.
        losses = self._stage_losses(images, gt_boxes, gt_classes, training=False, step=0)
        return self._update_trackers(losses, tf.cast(tf.shape(images)[0], tf.float32))

    def predict_step(self, data):
        if isinstance(data, dict):
            data = data["image"]
        elif isinstance(data, (tuple, list)):
            data = data[0]
            data = data["image"] if isinstance(data, dict) else data
        return self(data, training=False)

    # ------------------------------------------------------------------ saving
    def get_config(self):
        config = super().get_config()
        config.update(self.config.to_dict())
        config["training_stage"] = self.training_stage
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("trainable", "dtype"):
            config.pop(key, None)
        return cls(**config)


def proposals_before_after_nms(model, images):
    """For notebooks and figures: ``(pre_nms_boxes, pre_nms_scores, proposals, num_proposals)``
    as NumPy arrays for a batch of images (inference settings)."""
    out = model.propose(images, training=False)
    return (out["pre_nms_boxes"].numpy(), out["pre_nms_scores"].numpy(),
            out["proposals"].numpy(), out["num_proposals"].numpy())
