"""CenterNet: objects as points (a heatmap peak per object, no anchors, no NMS).

Zhou, Wang and Krähenbühl 2019, "Objects as Points". Instead of scoring thousands of anchor
boxes, the network paints one **heatmap per class** at output stride 4 and marks every object by
a peak at its centre; two small maps read off the box at the peak: its **size** (height, width)
and the **offset** of the true centre inside the peak's cell (the stride-4 grid rounds it away).

* network (sec. 4): a chapter-4 backbone (``get_feature_pyramid``, strides 4 to 32), an
  upsampling path back to stride 4 (bilinear 2x resize, 3x3 convolution, plus a 1x1 projection
  of the backbone's map at that stride: the skip connections of the paper's ResNet / DLA
  variants without their deformable convolutions), and three heads of a 3x3 convolution and a
  1x1 output each: class heatmaps ``[B, H/4, W/4, C]`` (logits; sigmoid for probabilities),
  sizes ``[B, H/4, W/4, 2]`` and offsets ``[B, H/4, W/4, 2]``;
* targets (sec. 3): object ``k`` with centre ``p`` (input pixels) sits at the cell
  ``floor(p / R)`` of its class's heatmap, where a Gaussian is splatted; overlapping splats of
  one class merge by element-wise maximum. Its size target is ``(h, w) / R`` and its offset
  target ``p / R - floor(p / R)``, both in **output-map cells** (``R`` = output stride);
* loss (sec. 3, eq. 1-4): the penalty-reduced pixel-wise focal loss (alpha = 2, beta = 4)
  normalised by the number of objects, plus L1 size (weight 0.1) and offset (weight 1) losses
  read at object centres only;
* decoding (sec. 4): a peak is a heatmap value that equals the maximum of its 3x3
  neighbourhood (3x3 max pooling replaces NMS); the top ``max_detections`` peaks over all
  classes become boxes ``centre + offset +- size / 2``.

**The Gaussian's size.** The paper takes the "object size-adaptive standard deviation" of
CornerNet (Law and Deng 2018, sec. 3.2): the radius ``r`` within which a shifted box still has
IoU >= 0.7 with the ground truth, and ``sigma = (2r + 1) / 6``. The released code's
``gaussian_radius`` solves its three quadratics with the wrong formula (the larger root in the
first two cases, and ``/ 2`` in place of ``/ (2a)``), so the radii it uses are several times what
the IoU rule gives (2.7 cells instead of 0.82 for a 10 x 10-cell box). Here
``gaussian_radius`` is the **corrected** rule (the smallest root of each case, minimum over the
three cases), available as ``radius_rule="iou"``; it gives splats of about one cell, nearly
hard targets. The default, ``radius_rule="box"``, is TTFNet's (Liu et al. 2020, sec. 3.2):
an elliptical Gaussian with ``sigma_y = alpha h / 6`` and ``sigma_x = alpha w / 6`` (sizes in
output cells, alpha = 0.54, the value TTFNet found best), about the size of the released code's
splats (sigma ~ 0.09 of the side for square boxes). Either way the splat is cut to 0 beyond 3 sigma on each axis and its centre cell is
exactly 1 (the positives of the focal loss).

Try it::

    python ch05_detection/train_detector.py --model centernet --fast
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import targets
from ch05_detection.detector import (
    Detector, DetectorConfig, _require, backbone_options_for, pad_detections)

RADIUS_RULES = ("box", "iou")
# Initial heatmap probability 0.1: bias -log((1 - 0.1) / 0.1) = -2.197 (CenterNet's -2.19).
HEATMAP_BIAS = -2.19


# ----------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------
@dataclass
class CenterNetConfig(DetectorConfig):
    """Every option of ``CenterNet`` (with those of ``DetectorConfig``).

    Args:
        output_stride: stride of the heatmaps (4 in the paper; 8 or 16 for a cheaper model).
        decoder_channels: channels of the upsampling path at strides 16, 8, 4 (one entry per
            step from the backbone's stride 32 down to ``output_stride``; a shorter path uses
            the first entries).
        head_channels: channels of each head's 3x3 convolution (256 in the paper).
        radius_rule: ``"box"`` (TTFNet's sigma = alpha * side / 6 per axis) or ``"iou"``
            (sigma = (2 r + 1) / 6 with the corrected CornerNet radius for ``min_overlap``).
        box_sigma_factor: TTFNet's alpha for ``"box"`` (0.54).
        min_overlap: the IoU the radius keeps for ``"iou"`` (0.7).
        focal_alpha, focal_beta: exponents of the penalty-reduced focal loss (2 and 4).
        size_weight, offset_weight: loss weights (0.1 and 1, Zhou et al. 2019, eq. 4).
    """

    output_stride: int = 4
    decoder_channels: tuple = (64, 48, 32)
    head_channels: int = 32
    radius_rule: str = "box"
    box_sigma_factor: float = 0.54
    min_overlap: float = 0.7
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    size_weight: float = 0.1
    offset_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _require(self.output_stride in (4, 8, 16), "output_stride", "4, 8 or 16",
                 self.output_stride)
        height, width = self.image_size
        _require(height % 32 == 0 and width % 32 == 0, "image_size",
                 "(height, width), multiples of 32 (the backbone's coarsest stride)",
                 self.image_size)
        channels = self.decoder_channels
        channels = (channels,) if isinstance(channels, (int, np.integer)) else tuple(channels)
        steps = {4: 3, 8: 2, 16: 1}[self.output_stride]
        _require(len(channels) >= steps and all(int(c) >= 1 for c in channels),
                 "decoder_channels", f"at least {steps} positive ints for output_stride "
                 f"{self.output_stride}", self.decoder_channels)
        self.decoder_channels = tuple(int(c) for c in channels)
        _require(int(self.head_channels) >= 1, "head_channels", ">= 1", self.head_channels)
        self.head_channels = int(self.head_channels)
        _require(self.radius_rule in RADIUS_RULES, "radius_rule", f"one of {RADIUS_RULES}",
                 self.radius_rule)
        _require(float(self.box_sigma_factor) > 0.0, "box_sigma_factor", "> 0",
                 self.box_sigma_factor)
        _require(0.0 < float(self.min_overlap) < 1.0, "min_overlap", "in (0, 1)",
                 self.min_overlap)
        for name in ("focal_alpha", "focal_beta", "size_weight", "offset_weight"):
            value = getattr(self, name)
            _require(float(value) >= 0.0, name, ">= 0", value)
        for name in ("box_sigma_factor", "min_overlap", "focal_alpha", "focal_beta",
                     "size_weight", "offset_weight"):
            setattr(self, name, float(getattr(self, name)))


# ----------------------------------------------------------------------------------
# targets: Gaussian splats, sizes and offsets
# ----------------------------------------------------------------------------------
def gaussian_radius(height, width, min_overlap=0.7):
    """The largest centre shift that keeps IoU >= ``min_overlap``: CornerNet's rule, corrected.

    Law and Deng 2018 (sec. 3.2), used by Zhou et al. 2019 (sec. 3): for a box of ``height`` x
    ``width``, three ways of moving its corners by ``r`` and the IoU each leaves with the
    original (``o`` = ``min_overlap``, ``s = h + w``):

    1. both corners move the same way (the box shifts by ``r`` in x and y):
       ``(h - r)(w - r) / (2hw - (h - r)(w - r)) >= o``, i.e.
       ``r^2 - s r + hw (1 - o) / (1 + o) >= 0``;
    2. both corners move inwards (the box shrinks by ``2r``): ``(h - 2r)(w - 2r) / hw >= o``,
       i.e. ``4 r^2 - 2 s r + (1 - o) hw >= 0``;
    3. both corners move outwards (it grows by ``2r``): ``hw / ((h + 2r)(w + 2r)) >= o``, i.e.
       ``4 o r^2 + 2 o s r - (1 - o) hw <= 0``.

    Each inequality holds from ``r = 0`` up to the *smaller* root of its quadratic
    ``a r^2 + b r + c`` (for case 3 the positive root), ``(-b - sqrt(b^2 - 4ac)) / (2a)``;
    the radius is the minimum over the three. (The released CornerNet / CenterNet code takes the
    larger root of cases 1 and 2 and divides by 2 instead of ``2a`` in cases 2 and 3.)

    Args:
        height, width: box sides (any unit; the radius comes out in the same unit), scalars or
            broadcastable tensors.
        min_overlap: the IoU to keep, in (0, 1).
    Returns:
        float32 tensor of radii (shape of the broadcast inputs).

    Example: a 10 x 10 box with ``min_overlap=0.7`` gives case 1: 0.925, case 2: 0.817,
    case 3: 0.976, so 0.817.
    """
    if not 0.0 < float(min_overlap) < 1.0:
        raise ValueError(f"`min_overlap` must be in (0, 1), got {min_overlap!r}")
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    o = float(min_overlap)
    total, area = height + width, height * width
    # Case 1: a = 1, b = -s, c = hw (1 - o) / (1 + o): smaller root (s - sqrt(s^2 - 4c)) / 2.
    r1 = (total - tf.sqrt(total ** 2 - 4.0 * area * (1.0 - o) / (1.0 + o))) / 2.0
    # Case 2: a = 4, b = -2s, c = (1 - o) hw: smaller root (2s - sqrt(4s^2 - 16c)) / 8.
    r2 = (total - tf.sqrt(total ** 2 - 4.0 * (1.0 - o) * area)) / 4.0
    # Case 3: a = 4o, b = 2os, c = -(1 - o) hw: positive root (-2os + sqrt(4o^2s^2 + 16o(1-o)hw)) / 8o.
    r3 = (-total + tf.sqrt(total ** 2 + 4.0 * (1.0 - o) * area / o)) / 4.0
    return tf.minimum(tf.minimum(r1, r2), r3)


def gaussian_sigmas(sizes, radius_rule="box", box_sigma_factor=0.54, min_overlap=0.7):
    """Standard deviations ``[..., 2]`` (y, x) of the splats of boxes of ``sizes`` (h, w).

    ``"box"``: ``box_sigma_factor * (h, w) / 6`` (TTFNet, Liu et al. 2020, sec. 3.2);
    ``"iou"``: ``(2 r + 1) / 6`` on both axes with ``r = gaussian_radius(h, w, min_overlap)``
    (CornerNet's diameter ``2r + 1`` covering 6 sigma, with the corrected radius).

    Args:
        sizes: ``[..., 2]`` box heights and widths (output-map cells).
    Returns:
        float32 ``[..., 2]``, at least 1e-3 (a degenerate box still gets a centre of 1).
    """
    sizes = tf.cast(sizes, tf.float32)
    if radius_rule == "box":
        sigmas = float(box_sigma_factor) * sizes / 6.0
    elif radius_rule == "iou":
        radius = gaussian_radius(sizes[..., 0], sizes[..., 1], min_overlap)
        sigmas = tf.stack([(2.0 * radius + 1.0) / 6.0] * 2, axis=-1)
    else:
        raise ValueError(f"`radius_rule` must be one of {RADIUS_RULES}, got {radius_rule!r}")
    return tf.maximum(sigmas, 1e-3)


def center_targets(gt_boxes, output_size):
    """Centre cells, offsets and sizes of boxes on an output map (Zhou et al. 2019, sec. 3).

    Args:
        gt_boxes: ``[..., 4]`` normalized yxyx.
        output_size: ``(H, W)`` of the output map (the image size over the output stride).
    Returns:
        ``(cells, offsets, sizes)``: int32 ``[..., 2]`` (row, column) = ``floor`` of the centre
        in cells, clipped to the map; float32 ``[..., 2]`` centre minus cell (in [0, 1]);
        float32 ``[..., 2]`` (height, width) in cells.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    scale = tf.constant([float(output_size[0]), float(output_size[1])])
    centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2.0 * scale  # [..., 2] in cells
    sizes = (gt_boxes[..., 2:] - gt_boxes[..., :2]) * scale
    limit = tf.constant([output_size[0] - 1, output_size[1] - 1], tf.int32)
    cells = tf.clip_by_value(tf.cast(tf.floor(centers), tf.int32), 0, limit)
    offsets = centers - tf.cast(cells, tf.float32)
    return cells, offsets, sizes


def heatmap_targets(gt_boxes, gt_classes, num_classes, output_size, radius_rule="box",
                    box_sigma_factor=0.54, min_overlap=0.7):
    """Class heatmaps with a Gaussian splat at every object's centre cell (Zhou et al. 2019).

    Object ``k`` of class ``c`` adds ``exp(-(dy^2 / 2 sigma_y^2 + dx^2 / 2 sigma_x^2))`` around
    its centre cell (``center_targets``) to heatmap ``c``, cut to 0 where ``|dy| > 3 sigma_y``
    or ``|dx| > 3 sigma_x``; splats of one class merge by element-wise maximum, so every centre
    cell holds exactly 1 (``gaussian_sigmas`` gives the sigmas of ``radius_rule``).

    Args:
        gt_boxes: ``[batch, N, 4]`` normalized yxyx (or one image's ``[N, 4]``).
        gt_classes: ``[batch, N]`` int, -1 rows are padding (or ``[N]``).
        num_classes: ``C``.
        output_size: ``(H, W)`` of the heatmaps.
        radius_rule, box_sigma_factor, min_overlap: see ``gaussian_sigmas``.
    Returns:
        float32 ``[batch, H, W, C]`` (``[H, W, C]`` for one image) in [0, 1].
    """
    gt_boxes = tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32)
    gt_classes = tf.cast(tf.convert_to_tensor(gt_classes), tf.int32)
    single = gt_boxes.shape.rank == 2
    if single:
        gt_boxes, gt_classes = gt_boxes[None], gt_classes[None]
    height, width = int(output_size[0]), int(output_size[1])
    cells, _, sizes = center_targets(gt_boxes, (height, width))  # [B, N, 2] each
    sigmas = gaussian_sigmas(sizes, radius_rule, box_sigma_factor, min_overlap)  # [B, N, 2]
    cells = tf.cast(cells, tf.float32)
    dy = tf.range(height, dtype=tf.float32)[None, None, :] - cells[..., 0:1]  # [B, N, H]
    dx = tf.range(width, dtype=tf.float32)[None, None, :] - cells[..., 1:2]  # [B, N, W]
    sigma_y, sigma_x = sigmas[..., 0:1], sigmas[..., 1:2]
    # Separable: the 2-D Gaussian is the product of one along y and one along x.
    along_y = tf.where(tf.abs(dy) <= 3.0 * sigma_y, tf.exp(-dy ** 2 / (2.0 * sigma_y ** 2)), 0.0)
    along_x = tf.where(tf.abs(dx) <= 3.0 * sigma_x, tf.exp(-dx ** 2 / (2.0 * sigma_x ** 2)), 0.0)
    splats = along_y[:, :, :, None] * along_x[:, :, None, :]  # [B, N, H, W]
    # Padding rows (class -1) one-hot to all zeros: they splat nothing.
    one_hot = tf.one_hot(gt_classes, num_classes, dtype=tf.float32)  # [B, N, C]
    per_class = splats[..., None] * one_hot[:, :, None, None, :]  # [B, N, H, W, C]
    # Max over objects (an image with none gives zeros: reduce_max of an empty axis is -inf).
    heatmap = tf.maximum(tf.reduce_max(per_class, axis=1), 0.0)  # [B, H, W, C]
    return heatmap[0] if single else heatmap


# ----------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------
def penalty_reduced_focal_loss(heatmap_logits, heatmap_target, alpha=2.0, beta=4.0):
    """CenterNet's pixel-wise focal loss, summed (Zhou et al. 2019, eq. 1).

    ``-(1 - p)^alpha log(p)`` where the target is 1 (object centres), and
    ``-(1 - Y)^beta p^alpha log(1 - p)`` elsewhere: the ``(1 - Y)^beta`` factor reduces the
    penalty for firing near a centre, where the target Gaussian ``Y`` is close to 1.
    ``log p`` and ``log(1 - p)`` come from the logits (``log_sigmoid``), so no clipping is needed.

    Args:
        heatmap_logits, heatmap_target: ``[batch, H, W, C]``.
    Returns:
        scalar: the **sum** over every cell and class (divide by the number of objects).
    """
    logits = tf.cast(heatmap_logits, tf.float32)
    target = tf.cast(heatmap_target, tf.float32)
    probability = tf.sigmoid(logits)
    positive = tf.cast(tf.equal(target, 1.0), tf.float32)
    positive_loss = -((1.0 - probability) ** alpha) * tf.math.log_sigmoid(logits)
    negative_loss = (-((1.0 - target) ** beta) * probability ** alpha
                     * tf.math.log_sigmoid(-logits))
    return tf.reduce_sum(positive * positive_loss + (1.0 - positive) * negative_loss)


def gather_at_cells(feature_map, cells):
    """``feature_map`` ``[batch, H, W, D]`` read at ``cells`` ``[batch, N, 2]`` -> ``[batch, N, D]``."""
    return tf.gather_nd(feature_map, cells, batch_dims=1)


# ----------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------
def heatmap_peaks(heatmap, pool_size=3):
    """Keep a value iff it equals the maximum of its ``pool_size`` neighbourhood (sec. 4).

    3x3 max pooling with stride 1 ("SAME": the border is padded with -inf, so it never wins)
    replaces NMS. Ties are kept: two adjacent equal maxima are both peaks, and every cell of a
    plateau whose neighbourhood holds nothing larger is a peak, as in the paper's decoder.

    Args:
        heatmap: ``[batch, H, W, C]`` probabilities.
    Returns:
        ``[batch, H, W, C]``: the heatmap where it is a peak, 0 elsewhere.
    """
    heatmap = tf.cast(heatmap, tf.float32)
    pooled = tf.nn.max_pool2d(heatmap, pool_size, strides=1, padding="SAME")
    return tf.where(tf.equal(heatmap, pooled), heatmap, 0.0)


def decode_centers(heatmap, sizes, offsets, max_detections=100, score_threshold=0.05):
    """Top-K peaks over all classes -> padded detections (Zhou et al. 2019, sec. 4; no NMS).

    Args:
        heatmap: ``[batch, H, W, C]`` probabilities (sigmoid of the heatmap logits).
        sizes: ``[batch, H, W, 2]`` (height, width) in cells.
        offsets: ``[batch, H, W, 2]`` (dy, dx) of the centre inside its cell.
        max_detections: ``K``; score_threshold: peaks scoring below it are padding.
    Returns:
        the padded detection dict of ``detector.pad_detections`` (boxes normalized yxyx and
        clipped to the image, ``[batch, K, ...]``), best first.
    """
    peaks = heatmap_peaks(heatmap)
    height, width, num_classes = (int(d) for d in heatmap.shape[1:4])
    flat = tf.reshape(peaks, [tf.shape(peaks)[0], height * width * num_classes])
    k = min(int(max_detections), height * width * num_classes)
    scores, index = tf.math.top_k(flat, k=k)  # [B, k], sorted: best first
    classes = index % num_classes
    cell = index // num_classes
    rows, cols = cell // width, cell % width
    cells = tf.stack([rows, cols], axis=-1)  # [B, k, 2]
    box_sizes = gather_at_cells(tf.cast(sizes, tf.float32), cells)  # [B, k, 2]
    centers = tf.cast(cells, tf.float32) + gather_at_cells(tf.cast(offsets, tf.float32), cells)
    scale = tf.constant([float(height), float(width)])
    half = tf.maximum(box_sizes, 0.0) / 2.0
    boxes = tf.clip_by_value(tf.concat([centers - half, centers + half], axis=-1)
                             / tf.concat([scale, scale], axis=0), 0.0, 1.0)  # [B, k, 4]
    if k < max_detections:  # a tiny map holds fewer cells than detections: pad
        pad = int(max_detections) - k
        boxes = tf.pad(boxes, [[0, 0], [0, pad], [0, 0]])
        scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-1.0)
        classes = tf.pad(classes, [[0, 0], [0, pad]])
    valid = scores >= float(score_threshold)
    return pad_detections(boxes, scores, classes, valid, int(max_detections))


# ----------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class CenterNet(Detector):
    """CenterNet (Zhou et al. 2019) with a chapter-4 backbone and an upsampling path.

    ``call(images)`` returns the raw head outputs: ``heatmap_logits`` ``[B, H/R, W/R, C]``,
    ``sizes`` ``[B, H/R, W/R, 2]`` (box height, width in output cells) and ``offsets``
    ``[B, H/R, W/R, 2]`` (centre minus its cell, in cells), ``R = output_stride`` (4).
    ``decode`` / ``detect`` give the padded detections of the detector interface.

    Build it from options, ``CenterNet(5, image_size=(128, 128))``, or from a
    ``CenterNetConfig``; ``fit`` takes batches of the detection contract.
    """

    CONFIG_CLASS = CenterNetConfig
    LOSS_NAMES = ("loss", "heatmap_loss", "size_loss", "offset_loss")

    def __init__(self, num_classes=None, config=None, **kwargs):
        super().__init__(num_classes, config, **kwargs)
        from ch04_classification.models import get_feature_pyramid

        config = self.config
        height, width = config.image_size
        stride = config.output_stride
        self.strides = tuple(s for s in (4, 8, 16, 32) if s >= stride)
        self.backbone = get_feature_pyramid(config.backbone, (height, width, 3),
                                            strides=self.strides, **config.backbone_options)
        if config.synchronized_batch_norm:
            from common.training import synchronize_batchnorm

            self.backbone = synchronize_batchnorm(self.backbone)
        self.output_size = (height // stride, width // stride)

        # Upsampling path, coarse to fine: the stride-32 map, then for each finer stride
        # x <- relu(bn(conv3x3(resize2x(x)) + conv1x1(backbone map at that stride))).
        finer = self.strides[:-1][::-1]  # e.g. (16, 8, 4)
        self.upsample = keras.layers.UpSampling2D(2, interpolation="bilinear", name="upsample")
        self.up_convs, self.laterals, self.merge_norms = [], [], []
        for level, channels in zip(finer, config.decoder_channels):
            self.up_convs.append(keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                                     name=f"up{level}_conv"))
            self.laterals.append(keras.layers.Conv2D(channels, 1, use_bias=False,
                                                     name=f"lateral{level}"))
            self.merge_norms.append(keras.layers.BatchNormalization(name=f"up{level}_bn"))
        self.finer = finer

        # Three heads: 3x3 conv + ReLU, then a 1x1 output (Zhou et al. 2019, sec. 4).
        def head(name, outputs, bias):
            return [keras.layers.Conv2D(config.head_channels, 3, padding="same",
                                        activation="relu", name=f"{name}_conv"),
                    keras.layers.Conv2D(outputs, 1, bias_initializer=bias, name=f"{name}_out")]

        self.heatmap_head = head("heatmap", config.num_classes,
                                 keras.initializers.Constant(HEATMAP_BIAS))
        self.size_head = head("size", 2, "zeros")
        self.offset_head = head("offset", 2, "zeros")
        self.build_weights()

    # ------------------------------------------------------------------ network
    def features(self, images, training=False):
        """The stride-``R`` feature map ``[batch, H/R, W/R, decoder_channels[-1]]``."""
        pyramid = self.backbone(images, training=training)
        x = pyramid["stride_32"]
        for level, up_conv, lateral, norm in zip(self.finer, self.up_convs, self.laterals,
                                                 self.merge_norms):
            x = up_conv(self.upsample(x)) + lateral(pyramid[f"stride_{level}"])
            x = tf.nn.relu(norm(x, training=training))
        return x

    @staticmethod
    def _run_head(layers, x):
        for layer in layers:
            x = layer(x)
        return x

    def call(self, images, training=False):
        """Raw outputs: ``heatmap_logits`` ``[B, h, w, C]``, ``sizes`` and ``offsets``
        ``[B, h, w, 2]`` with ``(h, w) = output_size``."""
        x = self.features(self._resize(images), training=training)
        return {"heatmap_logits": self._run_head(self.heatmap_head, x),
                "sizes": self._run_head(self.size_head, x),
                "offsets": self._run_head(self.offset_head, x)}

    def decode(self, outputs):
        """3x3-max-pool peaks, top ``max_detections`` over all classes, no NMS."""
        return decode_centers(tf.sigmoid(outputs["heatmap_logits"]), outputs["sizes"],
                              outputs["offsets"], max_detections=self.config.max_detections,
                              score_threshold=self.config.score_threshold)

    # ------------------------------------------------------------------ training
    def heatmap_targets(self, gt_boxes, gt_classes):
        """``heatmap_targets`` with this model's output size and radius rule."""
        config = self.config
        return heatmap_targets(gt_boxes, gt_classes, config.num_classes, self.output_size,
                               config.radius_rule, config.box_sigma_factor, config.min_overlap)

    def losses_for(self, images, gt_boxes, gt_classes, training, step):
        """``heatmap_loss`` (eq. 1), ``size_loss`` and ``offset_loss`` (L1 at centres, eq. 2
        and 3), each divided by the number of objects of the batch (at least 1), and
        ``loss = heatmap_loss + size_weight * size_loss + offset_weight * offset_loss`` (eq. 4).
        """
        config = self.config
        outputs = self(images, training=training)
        valid = tf.cast(gt_classes >= 0, tf.float32)  # [B, N]
        num_objects = tf.maximum(targets.mean_over_replicas(tf.reduce_sum(valid)), 1.0)
        heatmap = self.heatmap_targets(gt_boxes, gt_classes)  # [B, h, w, C]
        heatmap_loss = penalty_reduced_focal_loss(
            outputs["heatmap_logits"], heatmap, config.focal_alpha, config.focal_beta) / num_objects
        cells, offsets, sizes = center_targets(gt_boxes, self.output_size)  # [B, N, 2] each
        # L1 of the 2-vectors (both coordinates summed), padding rows masked out. Two objects
        # whose centres share a cell both pull on it (rare at stride 4).
        size_error = tf.abs(gather_at_cells(outputs["sizes"], cells) - sizes)
        offset_error = tf.abs(gather_at_cells(outputs["offsets"], cells) - offsets)
        size_loss = tf.reduce_sum(size_error * valid[..., None]) / num_objects
        offset_loss = tf.reduce_sum(offset_error * valid[..., None]) / num_objects
        return {"loss": (heatmap_loss + config.size_weight * size_loss
                         + config.offset_weight * offset_loss),
                "heatmap_loss": heatmap_loss, "size_loss": size_loss, "offset_loss": offset_loss}


# ----------------------------------------------------------------------------------
# train_detector.py
# ----------------------------------------------------------------------------------
# The default run: shapes at 128 px, ~4000 images, batch 16 (250 steps per epoch). A step of the
# width-32 model took ~0.28 s on the shared 2-core CPU, ~70 s an epoch: about 12 epochs fit in
# the 14-minute budget, which shortens the cosine decay to what fits. CenterNet's loss was still
# falling steadily after 600 steps, so the budget, not the epoch count, should end the run.
TRAIN_DEFAULTS = {"epochs": 14, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 0.5,
                  "time_budget_minutes": 14.0}


def from_options(options, num_classes, class_names, train_boxes):
    """Build the CenterNet of a ``train_detector.py`` run.

    Uses ``options.image_size``, ``backbone``, ``backbone_width`` (resnet_small:
    filters ``[w, 2w, 4w, 8w]``), ``seed``, ``flip`` and ``max_detections``; anchors and the
    classification loss do not apply (no anchors; the heatmap loss is CenterNet's own), and
    neither does ``train_boxes``.
    """
    del train_boxes  # no anchors to fit
    backbone_options = backbone_options_for(options.backbone, options.backbone_width)
    size = int(options.image_size)
    return CenterNet(num_classes, class_names=tuple(class_names), image_size=(size, size),
                     backbone=options.backbone, backbone_options=backbone_options,
                     max_detections=int(options.max_detections), flip_augment=bool(options.flip),
                     seed=int(options.seed), name="centernet")
