"""Anchor boxes: the fixed reference boxes a region proposal network starts from.

Faster R-CNN (Ren et al. 2015, sec. 3.1.1) slides a small network over the last
shared feature map. At every feature-map location it considers ``k`` reference boxes,
*anchors*, centred on that location: 3 scales x 3 aspect ratios = 9 in the paper
(box areas 128², 256², 512² pixels, height:width ratios 1:2, 1:1, 2:1). The RPN then
predicts, for every anchor, an objectness score and 4 deltas that move the anchor
onto an object (``boxes.encode_boxes``). For a ~1000 x 600 image and stride 16 that is
about 60 x 40 x 9 ≈ 20 000 anchors (sec. 3.1.4).

This module gives ``generate_anchors`` (a function of the feature-map size) and the
``AnchorGenerator`` Keras layer, which reads the size from a feature-map tensor, so it
also works for images whose size is only known at run time.

Conventions:

* Boxes are ``[ymin, xmin, ymax, xmax]``, in pixels (``normalized=False``) or as
  fractions of the image (``normalized=True``, the repo's data contract).
* The anchor of cell ``(i, j)`` is centred at ``((i + 0.5) * stride, (j + 0.5) * stride)``,
  the centre of the image patch the cell stands for.
* Aspect ratio means **height / width**. An anchor of scale ``s`` and ratio ``r`` has
  height ``s * sqrt(r)`` and width ``s / sqrt(r)``, so its area is always ``s²``.
* Order: location-major (row, then column), then the ``k`` anchors of that location in
  ratio-major, scale-minor order (``for ratio in aspect_ratios: for scale in scales``).
  Reshaping the ``[H * W * k, 4]`` result to ``[H, W, k, 4]`` therefore lines up with a
  convolutional head whose output is ``[H, W, k * 4]``.

Try it::

    python -c "from ch05_detection import anchors; print(anchors.generate_anchors(1, 1, 16))"
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Ren et al. 2015, sec. 3.1.1: "3 scales with box areas of 128², 256², and 512² pixels,
# and 3 aspect ratios of 1:1, 1:2, and 2:1".
DEFAULT_SCALES = (128.0, 256.0, 512.0)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def num_anchors_per_location(scales=DEFAULT_SCALES, aspect_ratios=DEFAULT_ASPECT_RATIOS):
    """Number of anchors ``k`` at each feature-map location: len(scales) * len(ratios)."""
    return len(tuple(scales)) * len(tuple(aspect_ratios))


def _check_sizes(scales, aspect_ratios):
    scales = tuple(float(s) for s in scales)
    aspect_ratios = tuple(float(r) for r in aspect_ratios)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"`scales` must be a non-empty list of positive sizes, got {scales}")
    if not aspect_ratios or any(r <= 0 for r in aspect_ratios):
        raise ValueError(
            f"`aspect_ratios` must be a non-empty list of positive height/width ratios, "
            f"got {aspect_ratios}")
    return scales, aspect_ratios


def _check_stride(stride):
    """Accept one stride or a (stride_y, stride_x) pair."""
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2:
            raise ValueError(f"`stride` must be a number or (stride_y, stride_x), got {stride}")
        stride_y, stride_x = float(stride[0]), float(stride[1])
    else:
        stride_y = stride_x = float(stride)
    if stride_y <= 0 or stride_x <= 0:
        raise ValueError(f"`stride` must be positive, got {stride}")
    return stride_y, stride_x


def base_anchor_sizes(scales=DEFAULT_SCALES, aspect_ratios=DEFAULT_ASPECT_RATIOS):
    """Heights and widths of the ``k`` anchors of one location, in the documented order.

    Returns:
        ``(heights, widths)``: float32 tensors ``[k]``.
    """
    scales, aspect_ratios = _check_sizes(scales, aspect_ratios)
    heights, widths = [], []
    for ratio in aspect_ratios:  # ratio-major ...
        for scale in scales:  # ... scale-minor
            # height / width = ratio and height * width = scale²
            heights.append(scale * ratio ** 0.5)
            widths.append(scale / ratio ** 0.5)
    return tf.constant(heights, tf.float32), tf.constant(widths, tf.float32)


def generate_anchors(feature_height, feature_width, stride, scales=DEFAULT_SCALES,
                     aspect_ratios=DEFAULT_ASPECT_RATIOS, image_height=None, image_width=None,
                     normalized=False):
    """All anchors of a feature map, ``[feature_height * feature_width * k, 4]`` yxyx.

    Args:
        feature_height, feature_width: feature-map size (ints or scalar int tensors, so a
            run-time size works inside ``tf.function``).
        stride: image pixels per feature-map cell (16 for VGG-16 conv5 / ResNet C4), or a
            ``(stride_y, stride_x)`` pair.
        scales: anchor sizes in pixels (anchor area = scale²).
        aspect_ratios: anchor height / width ratios.
        image_height, image_width: image size in pixels; required when ``normalized``.
        normalized: divide by the image size, giving coordinates in [0, 1] for anchors
            inside the image (anchors may extend past the border; clip them if needed).
    Returns:
        float32 ``[H * W * k, 4]`` anchors, location-major then anchor (see module doc).
    """
    stride_y, stride_x = _check_stride(stride)
    heights, widths = base_anchor_sizes(scales, aspect_ratios)  # [k] each
    if isinstance(feature_height, int) and feature_height < 0:
        raise ValueError(f"`feature_height` must be >= 0, got {feature_height}")
    if isinstance(feature_width, int) and feature_width < 0:
        raise ValueError(f"`feature_width` must be >= 0, got {feature_width}")
    if normalized and (image_height is None or image_width is None):
        raise ValueError("`normalized=True` needs `image_height` and `image_width` (pixels)")

    centers_y = (tf.cast(tf.range(feature_height), tf.float32) + 0.5) * stride_y  # [H]
    centers_x = (tf.cast(tf.range(feature_width), tf.float32) + 0.5) * stride_x  # [W]
    grid_y, grid_x = tf.meshgrid(centers_y, centers_x, indexing="ij")  # [H, W] each
    grid_y = grid_y[:, :, tf.newaxis]  # [H, W, 1]
    grid_x = grid_x[:, :, tf.newaxis]
    anchors = tf.stack(
        [grid_y - 0.5 * heights, grid_x - 0.5 * widths,
         grid_y + 0.5 * heights, grid_x + 0.5 * widths],
        axis=-1,
    )  # [H, W, k, 4]
    anchors = tf.reshape(anchors, [-1, 4])  # [H * W * k, 4]
    if normalized:
        image_height = tf.cast(image_height, tf.float32)
        image_width = tf.cast(image_width, tf.float32)
        anchors = anchors / tf.stack([image_height, image_width, image_height, image_width])
    return anchors


@keras.saving.register_keras_serializable(package="ch05_detection")
class AnchorGenerator(keras.layers.Layer):
    """Anchors for a feature map whose size may only be known at run time.

    Ren et al. 2015, "Faster R-CNN", sec. 3.1.1 (translation-invariant anchors).

    Input:
        ``feature_map`` ``[batch, H, W, C]`` (only its H and W are used), and optionally
        ``image`` ``[batch, image_H, image_W, channels]`` whose size is used to normalise.
    Output:
        ``[H * W * k, 4]`` yxyx anchors (the same for every image), or
        ``[batch, H * W * k, 4]`` with ``broadcast_to_batch=True``.

    With ``normalized=True`` the anchors are divided by the image size: the ``image``
    passed to ``call``, else ``image_size`` from the constructor, else ``H * stride`` by
    ``W * stride`` (exact when the image size is a multiple of the stride).

    Args:
        stride: image pixels per feature-map cell.
        scales: anchor sizes in pixels (area = scale²).
        aspect_ratios: anchor height / width ratios.
        normalized: output [0, 1] coordinates instead of pixels.
        image_size: optional fixed ``(height, width)`` in pixels.
        broadcast_to_batch: repeat the anchors for every image in the batch.
    """

    def __init__(self, stride=16, scales=DEFAULT_SCALES, aspect_ratios=DEFAULT_ASPECT_RATIOS,
                 normalized=False, image_size=None, broadcast_to_batch=False, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride if not isinstance(stride, (list, tuple)) else tuple(stride)
        _check_stride(self.stride)
        self.scales, self.aspect_ratios = _check_sizes(scales, aspect_ratios)
        if image_size is not None:
            if len(image_size) != 2 or any(s <= 0 for s in image_size):
                raise ValueError(
                    f"`image_size` must be (height, width) in pixels, got {image_size}")
            image_size = (int(image_size[0]), int(image_size[1]))
        self.image_size = image_size
        self.normalized = bool(normalized)
        self.broadcast_to_batch = bool(broadcast_to_batch)

    @property
    def num_anchors_per_location(self):
        return num_anchors_per_location(self.scales, self.aspect_ratios)

    def call(self, feature_map, image=None):
        feature_shape = tf.shape(feature_map)
        feature_height, feature_width = feature_shape[1], feature_shape[2]
        image_height = image_width = None
        if self.normalized:
            stride_y, stride_x = _check_stride(self.stride)
            if image is not None:
                image_shape = tf.shape(image)
                image_height, image_width = image_shape[1], image_shape[2]
            elif self.image_size is not None:
                image_height, image_width = self.image_size
            else:
                image_height = tf.cast(feature_height, tf.float32) * stride_y
                image_width = tf.cast(feature_width, tf.float32) * stride_x
        anchors = generate_anchors(
            feature_height, feature_width, self.stride, self.scales, self.aspect_ratios,
            image_height=image_height, image_width=image_width, normalized=self.normalized)
        if self.broadcast_to_batch:
            batch_size = feature_shape[0]
            anchors = tf.broadcast_to(anchors[tf.newaxis], [batch_size, tf.shape(anchors)[0], 4])
        return anchors

    def compute_output_shape(self, feature_map_shape, image_shape=None):
        height, width = feature_map_shape[1], feature_map_shape[2]
        count = None
        if height is not None and width is not None:
            count = height * width * self.num_anchors_per_location
        if self.broadcast_to_batch:
            return (feature_map_shape[0], count, 4)
        return (count, 4)

    def get_config(self):
        config = super().get_config()
        config.update(
            stride=self.stride,
            scales=list(self.scales),
            aspect_ratios=list(self.aspect_ratios),
            normalized=self.normalized,
            image_size=None if self.image_size is None else list(self.image_size),
            broadcast_to_batch=self.broadcast_to_batch,
        )
        return config


# The anchor sizes of the chapter's default run, in pixels of a 128x128 image: shapes are ~20 to
# ~56 px, so 24 / 48 / 72 px anchors (x 3 aspect ratios) cover them with IoU >= 0.5. The largest is 72,
# not 96: a 72 px anchor of aspect 2 (102 x 51 px) still lies inside the image at some positions,
# and anchors that cross the border are not trained (Ren et al. 2015, sec. 3.3).
BASE_IMAGE_SIZE = 128
BASE_ANCHOR_SCALES = (24.0, 48.0, 72.0)


def anchor_scales_for(image_size, base_scales=BASE_ANCHOR_SCALES, base_image_size=BASE_IMAGE_SIZE):
    """Anchor sizes in pixels for square images of ``image_size``: the base scales grown with the image
    (objects of the embedded data take the same fraction of any image size)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    return tuple(float(s) * image_size / base_image_size for s in base_scales)
