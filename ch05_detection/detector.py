"""The detector interface every model of chapter 5 follows (Faster R-CNN, YOLO, SSD, ...).

A detector is a ``keras.Model`` subclass of ``Detector``. It adds three things to a model:

* ``call(images)`` returns the network's **raw head outputs** (a dict of tensors: logits, box
  regressions, proposals ...), what the loss and the decoding read;
* ``compute_losses(batch)`` returns a dict of **named scalar losses** with the total under
  ``"loss"`` (``train_step`` differentiates it, ``fit`` logs every name in ``LOSS_NAMES``);
* ``detect(images)`` returns **padded detections** under the key names of keras-hub's
  ``ObjectDetector``: ``boxes`` ``[batch, D, 4]`` (normalized ``[ymin, xmin, ymax, xmax]``),
  ``classes`` ``[batch, D]`` int32 (0-based, -1 in padded rows), ``confidence``
  ``[batch, D]`` (also under ``scores``, the name ``evaluate.py`` reads), ``num_detections``
  ``[batch]``, with ``D = config.max_detections``.

What is shared lives here, once: the options every detector has (``DetectorConfig``), turning
images of any size into the model's input, batching ``detect`` through one ``tf.function``,
checking a batch of the detection contract (``image``, ``boxes``, ``classes`` padded with -1),
random horizontal flips of images and boxes together, the loss trackers, ``train_step`` /
``test_step`` / ``predict_step``, serialization, and the final per-class NMS
(``select_detections``). A subclass writes ``__init__`` (its layers), ``call``,
``losses_for`` and ``decode``, and nothing else. Because of this, ``evaluate.run_detection``,
the COCO export, the pictures, ``predict.py --model any.keras`` and ``train_detector.py``
work for every detector without knowing which one it is.

A minimal detector, to read before the real ones::

    @keras.saving.register_keras_serializable("ch05_detection")
    class Tiny(Detector):
        CONFIG_CLASS = DetectorConfig
        LOSS_NAMES = ("loss",)

        def __init__(self, num_classes=None, config=None, **kwargs):
            super().__init__(num_classes, config, **kwargs)
            self.head = keras.layers.Conv2D(self.num_classes + 4, 1)
            self.build_weights()

        def call(self, images, training=False):
            return {"maps": self.head(self._resize(images))}

        def losses_for(self, images, gt_boxes, gt_classes, training, step):
            return {"loss": tf.reduce_mean(self(images, training=training)["maps"] ** 2)}

        def decode(self, outputs):
            ...  # boxes [B, N, 4] and scores [B, N, K] -> select_detections(...)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import targets


def _require(condition, name, expected, value):
    if not condition:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")


@dataclass
class DetectorConfig:
    """Options every detector of this chapter shares (``get_config`` serializes them).

    A detector with more options subclasses this dataclass (as ``FasterRCNNConfig`` does).

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


def check_images(images, name="images"):
    """Convert to float32 ``[batch, H, W, 3]``; a single ``[H, W, 3]`` image gets a batch axis
    and uint8 images are scaled to [0, 1]."""
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


def build_backbone(config, name="backbone"):
    """The chapter-4 feature extractor a detector config names (``[B, H/s, W/s, C]``)."""
    from ch04_classification.models import get_backbone
    from common.training import synchronize_batchnorm

    backbone = get_backbone(config.backbone, input_shape=(*config.image_size, 3),
                            output_stride=config.output_stride, **config.backbone_options)
    if config.synchronized_batch_norm:
        backbone = synchronize_batchnorm(backbone)
    return backbone


def backbone_options_for(backbone, width):
    """Builder options of a chapter-4 backbone from a script's ``--backbone-width``: resnet_small's
    stage widths ``[w, 2w, 4w, 8w]``; the other backbones have fixed widths (no options)."""
    if backbone == "resnet_small":
        width = int(width)
        return {"filters": [width, 2 * width, 4 * width, 8 * width]}
    return {}


def load_backbone_weights(model_or_backbone, classifier_path):
    """Initialise a detector's backbone from a chapter-4 classifier: ImageNet pre-training in
    miniature.

    Detectors start their convolutions from a network pre-trained for ImageNet classification
    (Ren et al. 2015, sec. 3.2 and 4; Redmon et al. 2016, sec. 2.2). Here the classifier is the
    ``<out>/model.keras`` that ``ch04_classification/train_classifier.py`` writes: a functional
    network whose layers have the same names as the backbone's (the backbone is the same network
    cut at ``output_stride``). Each backbone layer with weights takes the weights of the classifier
    layer of the same name; the classifier's head is left out. The input size may differ
    (convolution weights do not depend on it).

    Args:
        model_or_backbone: a ``Detector`` (its ``backbone``, and a Faster R-CNN's
            ``detector_backbone`` when it has one, are initialised) or a backbone ``keras.Model``.
        classifier_path: path of the classifier's ``.keras`` file.
    Returns:
        list of the names of the layers whose weights were copied.
    Raises:
        ValueError: no such file, or the architectures do not match (a backbone layer missing in
            the classifier, or weights of other shapes).
    """
    from pathlib import Path

    path = Path(classifier_path)
    if not path.is_file():
        raise ValueError(f"`classifier_path`: no file {str(path)!r} (expected the model.keras "
                         "written by ch04_classification/train_classifier.py to its --out)")
    if isinstance(model_or_backbone, Detector):
        backbones = [model_or_backbone.backbone]
        if getattr(model_or_backbone, "detector_backbone", None) is not None:
            backbones.append(model_or_backbone.detector_backbone)
    elif isinstance(model_or_backbone, keras.Model):
        backbones = [model_or_backbone]
    else:
        raise ValueError(f"`model_or_backbone` must be a Detector or a keras.Model, got "
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


def pad_detections(boxes, scores, classes, valid, max_detections):
    """The padded detection dict from already-selected rows.

    Args:
        boxes ``[batch, D, 4]``, scores ``[batch, D]``, classes ``[batch, D]`` (any int dtype),
        valid ``[batch, D]`` bool (real detections first, then padding), with ``D`` equal to
        ``max_detections``.
    Returns:
        dict ``boxes``, ``classes`` (-1 where padded), ``confidence`` = ``scores`` (0 where padded),
        ``num_detections``.
    """
    valid = tf.cast(valid, tf.bool)
    confidence = tf.where(valid, tf.cast(scores, tf.float32), 0.0)
    return {"boxes": tf.where(valid[..., None], tf.cast(boxes, tf.float32), 0.0),
            "classes": tf.where(valid, tf.cast(classes, tf.int32), -1),
            "confidence": confidence,
            "scores": confidence,
            "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)}


def select_detections(boxes, scores, score_threshold=0.05, iou_threshold=0.5, max_detections=100,
                      max_per_class=None):
    """Score threshold, per-class NMS, then the best ``max_detections`` over all classes.

    Fast R-CNN's rule (Girshick 2015, sec. 3.1: NMS "independently for each class"), shared by
    every detector of the chapter. ``tf.image.combined_non_max_suppression`` does the work: NMS
    class by class, then the top boxes over all classes.

    Args:
        boxes: ``[batch, N, 4]`` (one box per candidate, shared by its classes: YOLO, SSD,
            RetinaNet) or ``[batch, N, K, 4]`` (one box per class: Faster R-CNN's head), normalized
            yxyx.
        scores: ``[batch, N, K]`` per-class probabilities (no background column).
        score_threshold: minimum probability; iou_threshold: per-class NMS overlap.
        max_detections: detections per image (the output is padded to this).
        max_per_class: kept per class before the final cut (default ``max_detections``).
    Returns:
        the padded detection dict (see ``pad_detections``).
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    if boxes.shape.rank == 3:
        boxes = boxes[:, :, None, :]  # one box for every class: q = 1
    max_per_class = max_detections if max_per_class is None else max_per_class
    result = tf.image.combined_non_max_suppression(
        boxes, scores, max_output_size_per_class=max_per_class, max_total_size=max_detections,
        iou_threshold=iou_threshold, score_threshold=score_threshold, pad_per_class=False,
        clip_boxes=True)
    valid = tf.range(max_detections)[None, :] < tf.cast(result.valid_detections, tf.int32)[:, None]
    return pad_detections(result.nmsed_boxes, result.nmsed_scores, result.nmsed_classes, valid,
                          max_detections)


def empty_detections(max_detections):
    """The ``detect`` result for zero images (NumPy)."""
    scores = np.zeros((0, max_detections), np.float32)
    return {"boxes": np.zeros((0, max_detections, 4), np.float32),
            "classes": np.zeros((0, max_detections), np.int32),
            "confidence": scores, "scores": scores, "num_detections": np.zeros((0,), np.int32)}


class Detector(keras.Model):
    """Base class of the chapter's detectors (see the module docstring for the interface).

    A subclass sets ``CONFIG_CLASS`` (a ``DetectorConfig`` dataclass) and ``LOSS_NAMES`` (the
    keys of ``losses_for``'s dict, ``"loss"`` first), builds its layers in ``__init__`` after
    ``super().__init__(num_classes, config, **kwargs)``, ends ``__init__`` with
    ``self.build_weights()``, and writes ``call``, ``losses_for`` and ``decode``.

    Build a detector from options, ``YOLO(5, image_size=(64, 64))``, or from a config,
    ``YOLO(config=YOLOConfig(5, ...))`` (or its dict); ``model.config`` holds them.
    """

    CONFIG_CLASS = DetectorConfig
    LOSS_NAMES = ("loss",)

    def __init__(self, num_classes=None, config=None, **kwargs):
        keras_options = {key: kwargs.pop(key) for key in ("name", "trainable", "dtype")
                         if key in kwargs}
        config_class = self.CONFIG_CLASS
        kind = type(self).__name__
        if config is None:
            if num_classes is None:
                raise ValueError(f"{kind}: `num_classes` is required (or pass `config`)")
            known = {f.name for f in dataclasses.fields(config_class)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ValueError(f"unknown {kind} options {unknown}; known: {sorted(known)}")
            config = config_class(num_classes=num_classes, **kwargs)
        elif num_classes is not None or kwargs:
            raise ValueError(f"{kind}: pass either `config` or `num_classes` and options, not both")
        elif isinstance(config, dict):
            config = config_class.from_dict(config)
        elif not isinstance(config, config_class):
            raise ValueError(f"{kind}: `config` must be a {config_class.__name__} or a dict, got "
                             f"{type(config).__name__}")
        super().__init__(**keras_options)
        self.config = config
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in self.LOSS_NAMES}

    def build_weights(self):
        """Create every weight with one dummy image, so a fresh model, a loaded one and a
        summary all see the same variables (call it at the end of ``__init__``)."""
        height, width = self.config.image_size
        self(tf.zeros((1, height, width, 3)), training=False)

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

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    # ------------------------------------------------------------------ what a subclass writes
    def call(self, images, training=False):
        """Raw head outputs for ``images`` ``[batch, H, W, 3]`` in [0, 1] (a dict of tensors)."""
        raise NotImplementedError

    def losses_for(self, images, gt_boxes, gt_classes, training, step):
        """Named scalar losses (``"loss"`` the total) for checked, resized tensors.

        ``gt_boxes`` ``[batch, N, 4]`` normalized yxyx and ``gt_classes`` ``[batch, N]`` with
        -1 rows as padding; ``step`` (int64) keys any randomness (sampling) of the step.
        """
        raise NotImplementedError

    def decode(self, outputs):
        """Padded detections (see the module docstring) from ``call``'s raw outputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference
    def _resize(self, images):
        images = check_images(images)
        if tuple(images.shape[1:3]) != tuple(self.image_size):
            images = tf.image.resize(images, self.image_size)
        return images

    def _inference(self, images):
        return self.decode(self(images, training=False))

    def detect(self, images, batch_size=16):
        """Detections for images (NumPy or tensors, ``[B, H, W, 3]`` or one ``[H, W, 3]``,
        float in [0, 1] or uint8).

        Images of another size are resized to ``image_size`` (boxes are normalized, so they
        stay valid for the original image). Returns a dict of NumPy arrays: ``boxes``,
        ``confidence`` (also as ``scores``), ``classes``, ``num_detections``;
        ``model.class_names[c]`` names class ``c``.
        """
        images = check_images(images)
        if not hasattr(self, "_detect_function"):
            self._detect_function = tf.function(self._inference, reduce_retracing=True)
        outputs = []
        for start in range(0, int(images.shape[0]), batch_size):
            batch = self._resize(images[start:start + batch_size])
            outputs.append({k: v.numpy() for k, v in self._detect_function(batch).items()})
        if not outputs:
            return empty_detections(self.max_detections)
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

    # ------------------------------------------------------------------ training
    def _unpack(self, data):
        if isinstance(data, (tuple, list)):
            data = data[0]
        if not isinstance(data, dict) or not {"image", "boxes", "classes"} <= set(data):
            raise ValueError(f"{type(self).__name__}.fit expects batches of dicts with keys "
                             "'image', 'boxes' [batch, N, 4] and 'classes' [batch, N]")
        images = self._resize(data["image"])
        gt_boxes, gt_classes, _ = targets.check_detection_targets(
            data["boxes"], data["classes"], num_classes=self.num_classes)
        return images, gt_boxes, gt_classes

    def _flip(self, images, gt_boxes, gt_classes, step):
        """Random horizontal flip per image (images and boxes together); stateless, keyed on
        (seed, step, global image index) like the samplers."""
        index = targets.global_image_index(tf.shape(images)[0])
        seeds = targets.image_seeds(step, index, self.config.seed, targets.FLIP_STREAM)
        flip = targets.uniform_per_image(seeds, 1)[:, 0] < 0.5  # [batch]
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        ymin, xmin, ymax, xmax = tf.unstack(gt_boxes, axis=-1)
        flipped = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
        flipped = tf.where((gt_classes >= 0)[..., None], flipped, gt_boxes)
        return images, tf.where(flip[:, None, None], flipped, gt_boxes)

    def extra_inputs(self, batch, images):
        """Keyword arguments of ``losses_for`` beyond the images and boxes, read from the batch
        dict (e.g. precomputed proposals); none by default. ``images`` are the checked ones."""
        return {}

    def flip_extra_inputs(self, extra, images, step):
        """``extra_inputs`` flipped with their images by ``train_step``'s random flip (boxes
        must follow it: use ``self._flip`` with the same ``step``); unchanged by default."""
        return extra

    def _unpack_all(self, data):
        images, gt_boxes, gt_classes = self._unpack(data)
        batch = data[0] if isinstance(data, (tuple, list)) else data
        return images, gt_boxes, gt_classes, self.extra_inputs(batch, images)

    def compute_losses(self, batch, training=False, step=0):
        """The named losses for one batch of the detection contract (the detector interface).

        Args:
            batch: a dict with ``image``, ``boxes``, ``classes`` (padded with -1), or a tuple
                whose first element is one.
            training: BatchNorm (and dropout) in training mode.
            step: training step any sampling randomness is keyed on.
        Returns:
            dict of scalars: ``loss`` (the total) and the parts named in ``LOSS_NAMES``.
        """
        images, gt_boxes, gt_classes, extra = self._unpack_all(batch)
        step = tf.cast(step, tf.int64)
        return self.losses_for(images, gt_boxes, gt_classes, training=training, step=step, **extra)

    def _update_trackers(self, losses, batch_size):
        for name, tracker in self.loss_trackers.items():
            tracker.update_state(losses[name], sample_weight=batch_size)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def train_step(self, data):
        images, gt_boxes, gt_classes, extra = self._unpack_all(data)
        # The step keys every random choice (flips, sampled anchors and RoIs).
        step = tf.cast(tf.convert_to_tensor(self.optimizer.iterations), tf.int64)
        if self.config.flip_augment:
            extra = self.flip_extra_inputs(extra, images, step)
            images, gt_boxes = self._flip(images, gt_boxes, gt_classes, step)
        with tf.GradientTape() as tape:
            losses = self.losses_for(images, gt_boxes, gt_classes, training=True, step=step,
                                     **extra)
            # The optimizer sums the replicas' gradients: divide by their number.
            loss = self.optimizer.scale_loss(targets.scale_loss_for_replicas(losses["loss"]))
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        self.optimizer.apply_gradients(pairs)
        return self._update_trackers(losses, tf.cast(tf.shape(images)[0], tf.float32))

    def test_step(self, data):
        images, gt_boxes, gt_classes, extra = self._unpack_all(data)
        # Step 0: a validation loss that samples does so the same way every epoch.
        losses = self.losses_for(images, gt_boxes, gt_classes, training=False,
                                 step=tf.constant(0, tf.int64), **extra)
        return self._update_trackers(losses, tf.cast(tf.shape(images)[0], tf.float32))

    def predict_step(self, data):
        """``model.predict(images)`` returns the padded detections (like ``detect``)."""
        if isinstance(data, dict):
            data = data["image"]
        elif isinstance(data, (tuple, list)):
            data = data[0]
            data = data["image"] if isinstance(data, dict) else data
        return self._inference(self._resize(data))

    # ------------------------------------------------------------------ saving
    def get_config(self):
        config = super().get_config()
        config.update(self.config.to_dict())
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("trainable", "dtype"):
            config.pop(key, None)
        return cls(**config)
