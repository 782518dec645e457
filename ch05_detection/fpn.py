"""Feature Pyramid Network: one feature map per scale, every one of them semantically strong.

Lin, Dollár, Girshick, He, Hariharan and Belongie 2017, "Feature Pyramid Networks for
Object Detection". A backbone already computes maps at several strides (``C3``, ``C4``,
``C5`` at strides 8, 16, 32), but only the deepest is rich in semantics; the shallow ones
are sharp but "dumb". FPN (sec. 3, fig. 3) combines both:

* **lateral connections**: a 1x1 convolution brings every ``C_l`` to one width ``d``
  (256 in the paper);
* **top-down pathway**: starting from the coarsest level, upsample the merged map by 2
  (nearest neighbour) and add it to the next finer lateral map;
* **smoothing**: a 3x3 convolution on each merged map "to reduce the aliasing effect of
  upsampling" gives the output ``P_l``. (The top-down pathway carries the merged maps,
  before smoothing.)

RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection", sec. 4) adds two
coarser levels for large objects: ``P6`` is a 3x3 stride-2 convolution on ``C5``, ``P7`` a
ReLU then a 3x3 stride-2 convolution on ``P6``. Our 128-px images have no object larger
than about 70 px, so the chapter's RetinaNet stops at ``P5``; ``max_level=6`` or ``7`` adds
them.

Level ``l`` has stride ``2**l``. The backbone is any chapter-4 network:
``ch04_classification.models.get_feature_pyramid`` cuts it at the strides ``8, 16, 32``.

Try it::

    python -c "from ch05_detection import fpn; m = fpn.build_fpn('resnet_small', (128, 128, 3)); \
print({k: v.shape for k, v in m.output.items()})"
"""

from __future__ import annotations

import keras
import tensorflow as tf

# The backbone gives levels up to C5 (stride 32); coarser levels come from extra convolutions.
BACKBONE_MAX_LEVEL = 5
# The levels a backbone endpoint exists for: strides 4 .. 32 (get_feature_pyramid).
MIN_LEVEL_RANGE = (2, 5)
MAX_LEVEL_RANGE = (3, 7)


def level_names(min_level, max_level):
    """``("P3", "P4", "P5")`` for levels 3..5: the keys of the pyramid's output dict."""
    return tuple(f"P{level}" for level in range(min_level, max_level + 1))


def _check_levels(min_level, max_level):
    min_level, max_level = int(min_level), int(max_level)
    if not MIN_LEVEL_RANGE[0] <= min_level <= MIN_LEVEL_RANGE[1]:
        raise ValueError(f"`min_level` must be in [{MIN_LEVEL_RANGE[0]}, {MIN_LEVEL_RANGE[1]}] "
                         f"(stride 2**min_level), got {min_level}")
    if not max(min_level, MAX_LEVEL_RANGE[0]) <= max_level <= MAX_LEVEL_RANGE[1]:
        raise ValueError(f"`max_level` must be in [max(min_level, 3), 7] (levels above 5 come from "
                         f"stride-2 convolutions, RetinaNet's P6 and P7), got {max_level}")
    return min_level, max_level


def backbone_strides(min_level=3):
    """Strides of the backbone maps the pyramid reads: ``(8, 16, 32)`` for ``min_level=3``."""
    return tuple(2 ** level for level in range(int(min_level), BACKBONE_MAX_LEVEL + 1))


def upsample_like(feature_map, reference):
    """Nearest-neighbour upsampling of ``feature_map`` to the height and width of ``reference``.

    FPN sec. 3 upsamples "by a factor of 2 (using nearest neighbor upsampling for simplicity)".
    Resizing to the finer map's size (instead of a fixed factor 2) also covers images whose
    size is not a multiple of 32, where a map is not exactly twice the next one.

    Args:
        feature_map: ``[batch, h, w, C]``; reference: ``[batch, H, W, C']`` with ``H ~ 2h``.
    Returns:
        ``[batch, H, W, C]``.
    """
    size = tf.shape(reference)[1:3]
    return tf.image.resize(feature_map, size, method="nearest")


@keras.saving.register_keras_serializable(package="ch05_detection")
class FeaturePyramid(keras.layers.Layer):
    """The FPN top-down pathway with lateral connections (Lin et al. 2017, sec. 3, fig. 3).

    Input:
        backbone maps ``C_min_level .. C5``, either as a list (finest first) or as the dict of
        ``get_feature_pyramid`` (``{"stride_8": C3, "stride_16": C4, "stride_32": C5}``);
        ``C_l`` is ``[batch, H / 2**l, W / 2**l, channels_l]``.
    Output:
        dict ``{"P3": [batch, H/8, W/8, width], ..., "P<max_level>": ...}``.

    Args:
        width: channels ``d`` of every output level (256 in the paper).
        min_level: finest level (3: stride 8, as RetinaNet; 2 for FPN's Faster R-CNN).
        max_level: coarsest level; 6 and 7 add RetinaNet's ``P6 = conv3x3/2(C5)`` and
            ``P7 = conv3x3/2(ReLU(P6))``.
    """

    def __init__(self, width=256, min_level=3, max_level=5, **kwargs):
        super().__init__(**kwargs)
        if int(width) < 1:
            raise ValueError(f"`width` must be >= 1, got {width}")
        self.width = int(width)
        self.min_level, self.max_level = _check_levels(min_level, max_level)
        self.input_levels = tuple(range(self.min_level, BACKBONE_MAX_LEVEL + 1))
        # Every new convolution, one per level (created here: never inside call()).
        self.lateral_convs = {
            f"P{level}": keras.layers.Conv2D(self.width, 1, name=f"lateral_p{level}")
            for level in self.input_levels}
        self.output_convs = {
            f"P{level}": keras.layers.Conv2D(self.width, 3, padding="same",
                                             name=f"smooth_p{level}")
            for level in self.input_levels}
        self.extra_convs = {
            f"P{level}": keras.layers.Conv2D(self.width, 3, strides=2, padding="same",
                                             name=f"extra_p{level}")
            for level in range(BACKBONE_MAX_LEVEL + 1, self.max_level + 1)}

    def _as_list(self, features):
        if isinstance(features, dict):
            missing = [f"stride_{2 ** level}" for level in self.input_levels
                       if f"stride_{2 ** level}" not in features]
            if missing:
                raise ValueError(f"FeaturePyramid needs the backbone maps {missing} (keys of "
                                 f"get_feature_pyramid), got keys {sorted(features)}")
            return [features[f"stride_{2 ** level}"] for level in self.input_levels]
        features = list(features)
        if len(features) != len(self.input_levels):
            raise ValueError(f"FeaturePyramid needs {len(self.input_levels)} backbone maps "
                             f"(C{self.min_level}..C{BACKBONE_MAX_LEVEL}, finest first), "
                             f"got {len(features)}")
        return features

    def build(self, input_shape):
        shapes = dict(zip(self.input_levels, self._as_list(input_shape)))
        for level in self.input_levels:
            self.lateral_convs[f"P{level}"].build(shapes[level])
            self.output_convs[f"P{level}"].build((*tuple(shapes[level])[:3], self.width))
        previous = tuple(shapes[BACKBONE_MAX_LEVEL])
        for level in range(BACKBONE_MAX_LEVEL + 1, self.max_level + 1):
            self.extra_convs[f"P{level}"].build(previous)
            previous = (*previous[:3], self.width)
        self.built = True

    def call(self, features):
        backbone_maps = dict(zip(self.input_levels, self._as_list(features)))
        outputs = {}
        merged = None
        for level in reversed(self.input_levels):  # coarsest (C5) first: the top-down pathway
            lateral = self.lateral_convs[f"P{level}"](backbone_maps[level])  # [b, h_l, w_l, width]
            if merged is not None:
                lateral = lateral + upsample_like(merged, lateral)  # merge by addition
            merged = lateral  # the top-down pathway carries the merged map ...
            # ... the output is the smoothed map.
            outputs[f"P{level}"] = self.output_convs[f"P{level}"](merged)
        previous = backbone_maps[BACKBONE_MAX_LEVEL]  # P6 reads C5 (RetinaNet, sec. 4)
        for level in range(BACKBONE_MAX_LEVEL + 1, self.max_level + 1):
            if level > BACKBONE_MAX_LEVEL + 1:
                previous = tf.nn.relu(previous)  # P7 = conv(ReLU(P6))
            previous = self.extra_convs[f"P{level}"](previous)
            outputs[f"P{level}"] = previous
        return {name: outputs[name] for name in level_names(self.min_level, self.max_level)}

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width, min_level=self.min_level, max_level=self.max_level)
        return config


def build_fpn(backbone, input_shape, width=256, min_level=3, max_level=5, **backbone_options):
    """A chapter-4 backbone with a feature pyramid on top: images -> ``{"P3": ..., ...}``.

    Args:
        backbone: a name of ``ch04_classification.models.BACKBONE_NAMES``.
        input_shape: ``(height, width, 3)``.
        width, min_level, max_level: see ``FeaturePyramid``.
        **backbone_options: for the backbone builder (``weights``, ``filters`` ...).
    Returns:
        ``keras.Model`` ``[batch, H, W, 3]`` -> dict ``P<l>`` ``[batch, H / 2**l, W / 2**l, width]``
        (sizes rounded as the backbone rounds them).
    """
    from ch04_classification.models import get_feature_pyramid

    min_level, max_level = _check_levels(min_level, max_level)
    features = get_feature_pyramid(backbone, input_shape, strides=backbone_strides(min_level),
                                   **backbone_options)
    pyramid = FeaturePyramid(width, min_level, max_level, name="fpn")(features.output)
    return keras.Model(features.input, pyramid, name=f"{backbone}_fpn")
