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

Training (``fit``) uses **approximate joint training** (sec. 3.2, "ii"): one loss, the
sum of the RPN loss and the detector loss, one backward pass, with the proposals
treated as constants (no gradient through their coordinates). The paper's **4-step
alternating training** (sec. 3.2, "i") is available through ``set_training_stage``:

1. ``"rpn"``: train backbone + RPN on the RPN loss;
2. ``"detector"``: train backbone + head on the detector loss, on the proposals of
   the step-1 RPN. *Simplification*: the paper trains a separate network with its own
   ImageNet-initialised backbone here; we keep one backbone (initialised the same way
   for both) and freeze the RPN layers, so the proposals come from the step-1 RPN on
   the backbone being trained;
3. ``"rpn_finetune"``: freeze the shared convolutions, retrain the RPN layers only;
4. ``"detector_finetune"``: shared convolutions frozen, retrain the detector layers.

``train_faster_rcnn.py`` runs either schedule; ``detect(images)`` returns padded
detections. Try it::

    python ch05_detection/train_faster_rcnn.py --fast
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import anchors as anchor_ops
from ch05_detection import boxes as box_ops
from ch05_detection import detection_head, roi_ops, rpn

TRAINING_STAGES = ("joint", "rpn", "detector", "rpn_finetune", "detector_finetune")
# What each stage trains: (backbone, rpn layers, detector layers, rpn loss, detector loss).
_STAGE_SETTINGS = {
    "joint": (True, True, True, True, True),
    "rpn": (True, True, False, True, False),
    "detector": (True, False, True, False, True),
    "rpn_finetune": (False, True, False, True, False),
    "detector_finetune": (False, False, True, False, True),
}
# The 4-step alternating schedule of Ren et al. 2015, sec. 3.2.
ALTERNATING_SCHEDULE = ("rpn", "detector", "rpn_finetune", "detector_finetune")


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


@keras.saving.register_keras_serializable(package="ch05_detection")
class FasterRCNN(keras.Model):
    """Faster R-CNN (Ren et al. 2015) with a chapter-4 backbone.

    Input:
        ``images`` ``[batch, image_size, image_size, 3]`` float in [0, 1].
    Output of ``call`` / ``predict`` / ``detect``:
        dict ``boxes`` ``[batch, D, 4]`` normalized yxyx, ``classes`` ``[batch, D]``
        int32 (0-based, -1 padding), ``scores`` ``[batch, D]``, ``num_detections``
        ``[batch]`` with ``D = max_detections``.

    ``fit`` takes batches of the detection contract (dicts with ``image``, ``boxes``,
    ``classes`` padded with -1), e.g. from ``common.data.batch_detection``.

    Args:
        num_classes: foreground classes.
        image_size: (height, width) of the input in pixels (anchors are fixed to it).
        backbone: a name of ``ch04_classification.models.get_backbone``.
        output_stride: backbone stride (8 gives a 16x16 map for 128x128 images).
        backbone_options: extra builder options for the backbone (e.g. wider filters).
        anchor_scales: anchor sizes in pixels; aspect_ratios: height / width.
        rpn_filters: channels of the RPN's 3x3 convolution.
        rpn_*: proposal layer counts, NMS threshold, minimum size (pixels) and the
            anchor sampling (256 per image, half positive).
        roi_op, pool_size: "align" or "pool", and the pooled size (7 x 7).
        head_type, head_units, head_channels: detection head ("dense" or "conv"),
            its width, and an optional 1x1 convolution reducing the feature map before
            the RoI op (saves time in the fully connected head).
        rois_per_image, foreground_fraction, background_iou_low: RoI sampling.
        score_threshold, detection_nms_iou, max_detections: post-processing.
        flip_augment: random horizontal flips inside ``train_step``.
    """

    def __init__(self, num_classes, image_size=(128, 128), backbone="resnet_small",
                 output_stride=8, backbone_options=None, anchor_scales=(24, 48, 96),
                 aspect_ratios=(0.5, 1.0, 2.0), rpn_filters=128,
                 rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=300,
                 rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=100,
                 rpn_nms_iou=0.7, rpn_min_size=2.0, rpn_num_samples=256,
                 rpn_positive_fraction=0.5, roi_op="align", pool_size=7, head_type="dense",
                 head_units=256, head_channels=None, rois_per_image=64,
                 foreground_fraction=0.25, background_iou_low=0.0, score_threshold=0.05,
                 detection_nms_iou=0.5, max_detections=100, flip_augment=True,
                 training_stage="joint", **kwargs):
        super().__init__(**kwargs)
        from ch04_classification.models import get_backbone

        if int(num_classes) < 1:
            raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 32:
            raise ValueError(f"`image_size` must be (height, width) >= 32, got {image_size}")
        self.num_classes = int(num_classes)
        self.image_size = image_size
        self.backbone_name = backbone
        self.output_stride = int(output_stride)
        self.backbone_options = dict(backbone_options or {})
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.rpn_filters = int(rpn_filters)
        self.rpn_num_samples = int(rpn_num_samples)
        self.rpn_positive_fraction = float(rpn_positive_fraction)
        self.roi_op = roi_op
        self.pool_size = int(pool_size)
        self.head_type = head_type
        self.head_units = int(head_units)
        self.head_channels = None if head_channels is None else int(head_channels)
        self.rois_per_image = int(rois_per_image)
        self.foreground_fraction = float(foreground_fraction)
        self.background_iou_low = float(background_iou_low)
        self.score_threshold = float(score_threshold)
        self.detection_nms_iou = float(detection_nms_iou)
        self.max_detections = int(max_detections)
        self.flip_augment = bool(flip_augment)
        self._proposal_options = dict(
            rpn_pre_nms_top_n_train=int(rpn_pre_nms_top_n_train),
            rpn_post_nms_top_n_train=int(rpn_post_nms_top_n_train),
            rpn_pre_nms_top_n_test=int(rpn_pre_nms_top_n_test),
            rpn_post_nms_top_n_test=int(rpn_post_nms_top_n_test),
            rpn_nms_iou=float(rpn_nms_iou), rpn_min_size=float(rpn_min_size))

        height, width = image_size
        self.backbone = get_backbone(backbone, (height, width, 3), output_stride=self.output_stride,
                                     **self.backbone_options)
        feature_height, feature_width = self.backbone.output_shape[1:3]
        self.feature_size = (int(feature_height), int(feature_width))
        # Anchors depend only on the (fixed) image size: computed once, stored as NumPy
        # (not a weight). Stride = image pixels per feature cell.
        self.anchor_stride = (height / feature_height, width / feature_width)
        self.anchors = anchor_ops.generate_anchors(
            feature_height, feature_width, self.anchor_stride, self.anchor_scales,
            self.aspect_ratios, image_height=height, image_width=width,
            normalized=True).numpy()  # [H * W * k, 4]
        num_anchors = len(self.anchor_scales) * len(self.aspect_ratios)
        self.rpn_head = rpn.RPNHead(num_anchors, self.rpn_filters, name="rpn_head")
        self.proposal_layer = rpn.ProposalLayer(
            pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            post_nms_top_n_train=rpn_post_nms_top_n_train,
            pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            post_nms_top_n_test=rpn_post_nms_top_n_test, nms_iou_threshold=rpn_nms_iou,
            min_size=float(rpn_min_size) / max(height, width), name="proposal_layer")
        self.head_reduce = (keras.layers.Conv2D(self.head_channels, 1, activation="relu",
                                                name="head_reduce")
                            if self.head_channels else None)
        self.roi_layer = make_roi_layer(roi_op, self.pool_size)
        self.detection_head = detection_head.FastRCNNHead(
            self.num_classes, head_type=head_type, hidden_units=self.head_units,
            name="detection_head")

        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "rpn_class_loss", "rpn_box_loss", "head_class_loss", "head_box_loss")}
        self.training_stage = "joint"
        self.set_training_stage(training_stage)
        # Build every weight now with one dummy image, so a fresh model, a loaded one
        # and a summary all see the same variables.
        self(tf.zeros((1, height, width, 3)), training=False)

    # ------------------------------------------------------------------ stages
    def set_training_stage(self, stage):
        """Choose what ``fit`` trains: one of ``TRAINING_STAGES`` (see module doc).

        Recompile after changing the stage (a new optimizer for the new variables).
        """
        if stage not in _STAGE_SETTINGS:
            raise ValueError(f"`stage` must be one of {TRAINING_STAGES}, got {stage!r}")
        self.training_stage = stage
        train_backbone, train_rpn, train_head, _, _ = _STAGE_SETTINGS[stage]
        self.backbone.trainable = train_backbone
        self.rpn_head.trainable = train_rpn
        self.detection_head.trainable = train_head
        if self.head_reduce is not None:
            self.head_reduce.trainable = train_head

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    # ------------------------------------------------------------------ pieces
    def features(self, images, training=False):
        """Backbone feature map ``[batch, h, w, C]`` (BatchNorm frozen unless training it)."""
        train_backbone = _STAGE_SETTINGS[self.training_stage][0]
        return self.backbone(images, training=bool(training and train_backbone))

    def head_features(self, feature_map):
        return feature_map if self.head_reduce is None else self.head_reduce(feature_map)

    def pool_rois(self, feature_map, rois):
        """RoIAlign / RoI pooling of ``rois`` ``[batch, R, 4]`` -> ``[batch, R, p, p, C]``."""
        head_map = self.head_features(feature_map)
        pooled = self.roi_layer(head_map, rois)
        # Keep the static channel count (the RoI op may return it as unknown in a graph).
        channels = head_map.shape[-1]
        return tf.reshape(pooled, [tf.shape(rois)[0], tf.shape(rois)[1], self.pool_size,
                                   self.pool_size, channels])

    def _resize(self, images):
        images = check_images(images)
        if tuple(images.shape[1:3]) != self.image_size:
            images = tf.image.resize(images, self.image_size)
        return images

    def propose(self, images, training=False):
        """RPN outputs for a batch, for pictures and checks.

        Returns dict: ``pre_nms_boxes`` ``[batch, n, 4]`` and ``pre_nms_scores``
        (top-N before NMS), ``proposals`` ``[batch, P, 4]``, ``proposal_scores``,
        ``num_proposals`` ``[batch]`` (after NMS), ``objectness_logits``, ``rpn_deltas``.
        """
        images = self._resize(images)
        feature_map = self.features(images, training=False)
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
        feature_map = self.features(images, training=False)
        logits, deltas = self.rpn_head(feature_map)
        proposals, _, count = self.proposal_layer(logits, deltas, self.anchors, training=False)
        proposal_valid = tf.range(tf.shape(proposals)[1])[None, :] < count[:, None]
        pooled = self.pool_rois(feature_map, proposals)
        class_logits, box_deltas = self.detection_head(pooled, training=False)
        return detection_head.postprocess_detections(
            proposals, class_logits, box_deltas, roi_valid=proposal_valid,
            score_threshold=self.score_threshold, nms_iou_threshold=self.detection_nms_iou,
            max_detections=self.max_detections)

    def _inference(self, images):
        return self(images, training=False)

    def detect(self, images, batch_size=16):
        """Detections for images (NumPy or tensors, ``[B, H, W, 3]`` or one ``[H, W, 3]``).

        Images of another size are resized to ``image_size`` (boxes are normalized, so
        they stay valid for the original image). Returns a dict of NumPy arrays
        (see the class docstring).
        """
        images = check_images(images)
        if not hasattr(self, "_detect_function"):
            self._detect_function = tf.function(self._inference, reduce_retracing=True)
        outputs = []
        for start in range(0, int(images.shape[0]), batch_size):
            batch = self._resize(images[start:start + batch_size])
            outputs.append({k: v.numpy() for k, v in self._detect_function(batch).items()})
        if not outputs:
            return {"boxes": np.zeros((0, self.max_detections, 4), np.float32),
                    "classes": np.zeros((0, self.max_detections), np.int32),
                    "scores": np.zeros((0, self.max_detections), np.float32),
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
        gt_boxes, gt_classes, _ = rpn.check_detection_targets(
            data["boxes"], data["classes"], num_classes=self.num_classes)
        return images, gt_boxes, gt_classes

    def _flip(self, images, gt_boxes, gt_classes):
        """Random horizontal flip per image (images and boxes together)."""
        flip = tf.random.uniform([tf.shape(images)[0]]) < 0.5  # [batch]
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        ymin, xmin, ymax, xmax = tf.unstack(gt_boxes, axis=-1)
        flipped = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
        flipped = tf.where((gt_classes >= 0)[..., None], flipped, gt_boxes)
        return images, tf.where(flip[:, None, None], flipped, gt_boxes)

    def compute_losses(self, images, gt_boxes, gt_classes, training=True):
        """All four losses of the current stage (and the proposals) for one batch.

        Returns a dict with ``loss`` (the weighted total), ``rpn_class_loss``,
        ``rpn_box_loss``, ``head_class_loss``, ``head_box_loss``, ``proposals``,
        ``num_proposals``.
        """
        _, _, _, use_rpn_loss, use_head_loss = _STAGE_SETTINGS[self.training_stage]
        feature_map = self.features(images, training=training)
        logits, deltas = self.rpn_head(feature_map)  # [batch, A], [batch, A, 4]
        zero = tf.constant(0.0)
        result = {"rpn_class_loss": zero, "rpn_box_loss": zero, "head_class_loss": zero,
                  "head_box_loss": zero}
        if use_rpn_loss:
            labels, box_targets = rpn.assign_rpn_targets(
                self.anchors, gt_boxes, gt_classes, num_samples=self.rpn_num_samples,
                positive_fraction=self.rpn_positive_fraction)
            result["rpn_class_loss"], result["rpn_box_loss"] = rpn.rpn_loss(
                logits, deltas, labels, box_targets)
        proposals, _, count = self.proposal_layer(logits, deltas, self.anchors, training=True)
        result["proposals"], result["num_proposals"] = proposals, count
        if use_head_loss:
            proposal_valid = tf.range(tf.shape(proposals)[1])[None, :] < count[:, None]
            sample = detection_head.sample_rois(
                proposals, proposal_valid, gt_boxes, gt_classes, num_rois=self.rois_per_image,
                foreground_fraction=self.foreground_fraction,
                background_iou_low=self.background_iou_low)
            pooled = self.pool_rois(feature_map, sample["rois"])
            class_logits, box_deltas = self.detection_head(pooled, training=training)
            result["head_class_loss"], result["head_box_loss"] = detection_head.detection_loss(
                class_logits, box_deltas, sample["class_targets"], sample["box_targets"])
        result["loss"] = (result["rpn_class_loss"] + result["rpn_box_loss"]
                          + result["head_class_loss"] + result["head_box_loss"])
        return result

    def _update_trackers(self, losses, batch_size):
        for name, tracker in self.loss_trackers.items():
            tracker.update_state(losses[name], sample_weight=batch_size)
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def train_step(self, data):
        images, gt_boxes, gt_classes = self._unpack(data)
        if self.flip_augment:
            images, gt_boxes = self._flip(images, gt_boxes, gt_classes)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(images, gt_boxes, gt_classes, training=True)
        variables = self.trainable_variables
        gradients = tape.gradient(losses["loss"], variables)
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        self.optimizer.apply_gradients(pairs)
        return self._update_trackers(losses, tf.cast(tf.shape(images)[0], tf.float32))

    def test_step(self, data):
        images, gt_boxes, gt_classes = self._unpack(data)
        losses = self.compute_losses(images, gt_boxes, gt_classes, training=False)
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
        config.update(
            num_classes=self.num_classes, image_size=list(self.image_size),
            backbone=self.backbone_name, output_stride=self.output_stride,
            backbone_options=self.backbone_options, anchor_scales=list(self.anchor_scales),
            aspect_ratios=list(self.aspect_ratios), rpn_filters=self.rpn_filters,
            rpn_num_samples=self.rpn_num_samples,
            rpn_positive_fraction=self.rpn_positive_fraction, roi_op=self.roi_op,
            pool_size=self.pool_size, head_type=self.head_type, head_units=self.head_units,
            head_channels=self.head_channels, rois_per_image=self.rois_per_image,
            foreground_fraction=self.foreground_fraction,
            background_iou_low=self.background_iou_low, score_threshold=self.score_threshold,
            detection_nms_iou=self.detection_nms_iou, max_detections=self.max_detections,
            flip_augment=self.flip_augment, **self._proposal_options)
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
