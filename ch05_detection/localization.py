"""Object localization and landmark detection: one network outputs what, where and which points.

What this file teaches: the step from classification to detection. A classifier's last layer says
*what*; give it four more outputs and it also says *where*. For an image with zero or one object the
network outputs one vector (the lecture's notation)

    y = [p_c, b_x, b_y, b_h, b_w, c_1, ..., c_K]

p_c: is there an object; (b_x, b_y): the centre of its box and (b_h, b_w): its height and width, all
as fractions of the image side; c_1..c_K: which class (one-hot). With landmarks the box becomes a
list of points, y = [p_c, x_1, y_1, ..., x_L, y_L] (here plus a visibility flag per point, because
shapes have different numbers of corners). Regressing coordinates from a convolutional network's
features is how OverFeat localised (Sermanet et al., "OverFeat: Integrated Recognition, Localization
and Detection using Convolutional Networks", ICLR 2014, sec. 4) and how DeepPose found body joints
(Toshev & Szegedy, CVPR 2014) and Sun et al. facial points (CVPR 2013).

The network (`build_localizer`): a chapter-4 backbone (`resnet_small` by default) and a head of two
branches. *What* (p_c, the class or the points' visibility) global-average-pools the deepest feature
map, so a shape is recognised wherever it is. *Where* is the lecture's dense regression for the box:
a 1x1 convolution thins a finer map, flatten keeps where each feature is, dense layers output
(b_x, b_y, b_h, b_w). For landmarks the default *where* is one heatmap per point and its soft-argmax
(`SpatialSoftArgmax`, integral regression, Sun et al. ECCV 2018): far more precise than a dense layer
on the same budget; `point_head="dense"` keeps the regression. The raw output is
[p_c logit, b_x, b_y, b_h, b_w, K class logits] or [p_c logit, L (x, y), L visibility logits];
`decode_localization` / `decode_landmarks` apply the sigmoid and softmax.

Landmark 1 of a shape is the corner the generator marks with a small disc (a square turned by 90
degrees looks the same, so without the mark no image could say which corner is "landmark 1"); the
others follow clockwise. Training batches are flipped and transposed at random with the targets moved
to match and renumbered (`random_dihedral`, `sort_clockwise`).

Two losses, selectable with `kind` (both average the per-image losses over the batch):

    "lecture": squared error over every output when p_c = 1, only (p̂_c - p_c)^2 when p_c = 0,
               on p̂_c = sigmoid(logit) and ĉ = softmax(logits) (the course's formula)
    "modern":  binary cross-entropy for p_c, cross-entropy for the class and smooth L1 for the box
               (Girshick, "Fast R-CNN", ICCV 2015, eq. 2-3), the last two only when p_c = 1, each
               with a weight (Fast R-CNN's lambda, eq. 1, balances its two terms the same way)

Metrics (Keras metrics, logged during training as val_...): `presence_accuracy` (p̂_c > 0.5 vs
p_c, all images), `class_accuracy` and `mean_iou` (box IoU) over the images *with* an object, and for
landmarks `nme`, the normalised mean error: the mean Euclidean distance between predicted and true
visible points, as a fraction of the image side.

Data: the `shapes_localization` variant of `common.data` (common.synthetic.make_localization_example);
`localization_target` / `landmark_target` turn its examples into the y vectors. Train with
`python ch05_detection/train_localizer.py --task localization` (or `--task landmarks`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ch04_classification import models
from ch05_detection import boxes as box_ops
from common import synthetic

TASKS = ("localization", "landmarks")
POINT_HEADS = ("heatmap", "dense")
LOSS_KINDS = ("lecture", "modern")
NUM_LANDMARKS = synthetic.NUM_LANDMARKS
# Layout of the localization vector y = [p_c, b_x, b_y, b_h, b_w, c_1..c_K].
PRESENCE_INDEX = 0
BOX_SLICE = slice(1, 5)
CLASS_START = 5


def localization_size(num_classes: int) -> int:
    """Length of y for localization: 1 + 4 + num_classes."""
    return CLASS_START + int(num_classes)


def landmark_size(num_landmarks: int = NUM_LANDMARKS) -> int:
    """Length of y for landmarks: 1 (p_c) + 2 * L (x, y) + L (visibility)."""
    return 1 + 3 * int(num_landmarks)


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_kind(kind):
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")


def _check_last_dim(tensor, size, name, layout):
    if tensor.shape.rank is not None and tensor.shape.rank != 2:
        raise ValueError(f"{name} must have shape [batch, {size}] ({layout}), got {tensor.shape}")
    if tensor.shape[-1] is not None and tensor.shape[-1] != size:
        raise ValueError(f"{name} must have shape [batch, {size}] ({layout}), got {tensor.shape}")


# --------------------------------------------------------------------------------------------------
# Boxes as centre and size
# --------------------------------------------------------------------------------------------------
def box_to_center(boxes):
    """[..., 4] normalized [ymin, xmin, ymax, xmax] -> [..., 4] [b_x, b_y, b_h, b_w] (centre x, centre y,
    height, width), the lecture's box parametrisation."""
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, ymax - ymin, xmax - xmin], axis=-1)


def center_to_box(centers):
    """[..., 4] [b_x, b_y, b_h, b_w] -> [..., 4] [ymin, xmin, ymax, xmax] (sizes floored at 0)."""
    centers = tf.convert_to_tensor(centers, tf.float32)
    b_x, b_y, b_h, b_w = tf.unstack(centers, axis=-1)
    half_h, half_w = tf.maximum(b_h, 0.0) / 2, tf.maximum(b_w, 0.0) / 2
    return tf.stack([b_y - half_h, b_x - half_w, b_y + half_h, b_x + half_w], axis=-1)


# --------------------------------------------------------------------------------------------------
# Targets: contract examples -> y vectors
# --------------------------------------------------------------------------------------------------
def _first_object(classes, *per_object):
    """(present, class, [row of each per-object tensor]) for the first row whose class is >= 0."""
    classes = tf.convert_to_tensor(classes, tf.int32)
    padded_classes = tf.concat([classes, [-1]], axis=0)  # one padding row: works with N = 0
    valid = padded_classes >= 0
    first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)  # the padding row if none valid
    present = tf.reduce_any(valid)
    rows = []
    for tensor in per_object:
        tensor = tf.convert_to_tensor(tensor)
        padding = tf.zeros(tf.concat([[1], tf.shape(tensor)[1:]], axis=0), tensor.dtype)
        rows.append(tf.gather(tf.concat([tensor, padding], axis=0), first))
    return present, tf.gather(padded_classes, first), rows


def localization_target(boxes, classes, num_classes: int):
    """The localization vector y of one image: [5 + num_classes] float32.

    Args:
        boxes: [N, 4] normalized yxyx; classes: [N] int (class -1 = padding). N may be 0. The first
            valid object is used (the localization data have at most one).
    Returns:
        y = [p_c, b_x, b_y, b_h, b_w, one-hot class]; all zeros when there is no object.
    """
    num_classes = _check_count(num_classes, "num_classes")
    present, class_id, (box,) = _first_object(classes, tf.reshape(tf.cast(boxes, tf.float32), [-1, 4]))
    p = tf.cast(present, tf.float32)
    one_hot = tf.one_hot(tf.maximum(class_id, 0), num_classes) * p
    return tf.concat([p[None], box_to_center(box) * p, one_hot], axis=0)


def landmark_target(landmarks, visibility, classes, num_landmarks: int = NUM_LANDMARKS):
    """The landmark vector y of one image: [1 + 3 L] float32.

    Args:
        landmarks: [N, L, 2] normalized (x, y); visibility: [N, L] (1 = a real point);
        classes: [N] (class -1 = padding; only presence is used). N may be 0.
    Returns:
        y = [p_c, x_1, y_1, ..., x_L, y_L, v_1, ..., v_L]; all zeros when there is no object.
    """
    num_landmarks = _check_count(num_landmarks, "num_landmarks")
    landmarks = tf.reshape(tf.cast(landmarks, tf.float32), [-1, num_landmarks, 2])
    visibility = tf.reshape(tf.cast(visibility, tf.float32), [-1, num_landmarks])
    present, _, (points, visible) = _first_object(classes, landmarks, visibility)
    p = tf.cast(present, tf.float32)
    return tf.concat([p[None], tf.reshape(points * visible[:, None], [-1]) * p, visible * p], axis=0)


def example_to_target(task: str, num_classes: int, num_landmarks: int = NUM_LANDMARKS):
    """A ``dataset.map`` function: a shapes_localization example -> (image, y) for ``task``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "localization":
        return lambda example: (example["image"], localization_target(
            example["boxes"], example["classes"], num_classes))
    return lambda example: (example["image"], landmark_target(
        example["landmarks"], example["landmark_visibility"], example["classes"], num_landmarks))


# --------------------------------------------------------------------------------------------------
# Augmentation: the eight flips and quarter turns of a square, applied to images *and* targets
# --------------------------------------------------------------------------------------------------
def sort_clockwise(points, visible):
    """Re-number landmarks 2.. clockwise from landmark 1 about landmark 0 (the centre).

    points [b, L, 2] (x, y), visible [b, L] -> the same, with landmark 1 (the marked corner) kept
    first and the other visible corners following it clockwise on screen (y pointing down), the
    padding after them: the data's convention (common.synthetic). A mirror image reverses the order
    of the corners, so augmented targets must be numbered again.
    """
    points = tf.convert_to_tensor(points, tf.float32)
    visible = tf.convert_to_tensor(visible, tf.float32)
    center, corners = points[:, :1], points[:, 1:]  # [b, 1, 2], [b, L - 1, 2]
    offset = corners - center
    angle = tf.atan2(offset[..., 0], -offset[..., 1])  # 0 = up, pi / 2 = right: clockwise on screen
    angle = tf.math.floormod(angle - angle[:, :1], 2.0 * np.pi)  # 0 for landmark 1
    slot = tf.range(tf.shape(corners)[1], dtype=tf.float32)[None]
    key = tf.where(visible[:, 1:] > 0, angle, 10.0 + slot)  # padding after every real corner
    order = tf.argsort(key, axis=-1, stable=True)
    corners = tf.gather(corners, order, batch_dims=1)
    corner_visible = tf.gather(visible[:, 1:], order, batch_dims=1)
    return (tf.concat([center, corners], axis=1), tf.concat([visible[:, :1], corner_visible], axis=1))


def dihedral_transform(images, targets, transpose, flip_x, flip_y, task: str,
                       num_landmarks: int = NUM_LANDMARKS):
    """Transpose and/or mirror each square image and its target vector exactly (no resampling).

    images [b, S, S, C]; targets y [b, D] in the `task`'s layout; transpose, flip_x, flip_y: bool [b]
    (applied in that order: x <-> y, then x -> 1 - x, then y -> 1 - y; together the 8 symmetries of
    a square: flips and quarter turns). Boxes: (b_x, b_y, b_h, b_w) -> (b_y, b_x, b_w, b_h) under the
    transpose, b_x -> 1 - b_x under flip_x; landmarks move the same way and are renumbered
    (`sort_clockwise`). Entries of absent objects / padded points stay 0.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    images = tf.convert_to_tensor(images)
    targets = tf.convert_to_tensor(targets, tf.float32)
    if images.shape.rank != 4 or (images.shape[1] is not None and images.shape[1] != images.shape[2]):
        raise ValueError(f"images must be square [b, S, S, C] (a transpose must keep the shape), "
                         f"got {images.shape}")
    transpose, flip_x, flip_y = (tf.cast(t, tf.bool) for t in (transpose, flip_x, flip_y))

    def pick(condition, when_true, when_false):
        condition = tf.reshape(condition, [-1] + [1] * (when_true.shape.rank - 1))
        return tf.where(condition, when_true, when_false)

    images = pick(transpose, tf.transpose(images, [0, 2, 1, 3]), images)
    images = pick(flip_x, tf.reverse(images, axis=[2]), images)
    images = pick(flip_y, tf.reverse(images, axis=[1]), images)
    present = targets[:, :1]  # [b, 1]
    if task == "localization":
        b_x, b_y, b_h, b_w = tf.unstack(targets[:, BOX_SLICE], axis=-1)
        b_x, b_y, b_h, b_w = (tf.where(transpose, b_y, b_x), tf.where(transpose, b_x, b_y),
                              tf.where(transpose, b_w, b_h), tf.where(transpose, b_h, b_w))
        b_x = tf.where(flip_x, 1.0 - b_x, b_x)
        b_y = tf.where(flip_y, 1.0 - b_y, b_y)
        box = tf.stack([b_x, b_y, b_h, b_w], axis=-1) * present
        return images, tf.concat([present, box, targets[:, CLASS_START:]], axis=-1)
    points = tf.reshape(targets[:, 1:1 + 2 * num_landmarks], [-1, num_landmarks, 2])
    visible = targets[:, 1 + 2 * num_landmarks:]
    x, y = points[..., 0], points[..., 1]
    x, y = tf.where(transpose[:, None], y, x), tf.where(transpose[:, None], x, y)
    x = tf.where(flip_x[:, None], 1.0 - x, x)
    y = tf.where(flip_y[:, None], 1.0 - y, y)
    points, visible = sort_clockwise(tf.stack([x, y], axis=-1) * visible[..., None], visible)
    return images, tf.concat([present, tf.reshape(points, [-1, 2 * num_landmarks]), visible], axis=-1)


def random_dihedral(images, targets, seed, task: str, num_landmarks: int = NUM_LANDMARKS):
    """`dihedral_transform` with each image's symmetry drawn uniformly from the 8 (stateless: the same
    ``seed``, a [2] int tensor, gives the same draws). Works in ``tf.data`` after ``.batch()``."""
    choices = tf.random.stateless_uniform([3, tf.shape(images)[0]], seed, maxval=2, dtype=tf.int32) > 0
    return dihedral_transform(images, targets, choices[0], choices[1], choices[2], task, num_landmarks)


# --------------------------------------------------------------------------------------------------
# Points from heatmaps: the soft-argmax
# --------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="ch05_detection")
class SpatialSoftArgmax(keras.layers.Layer):
    """Heatmap logits -> the expected position of each channel: [b, H, W, L] -> [b, 2 L] (x_1, y_1, ...).

    Each channel becomes a probability map by a softmax over its H x W positions; the point is the
    mean of the cell centres ((j + 0.5) / W, (i + 0.5) / H) under it, in normalized image
    coordinates. Differentiable, so a network trained on coordinates learns the heatmaps by itself
    ("integral regression", Sun et al., "Integral Human Pose Regression", ECCV 2018, sec. 2; the
    spatial soft-argmax of Levine et al., JMLR 2016). A heatmap lights up where the point is, which a
    convolutional network does the same way at every position, where a dense layer regressing
    coordinates has to learn every position separately.
    """

    def call(self, logits):
        logits = tf.convert_to_tensor(logits)
        height, width, channels = logits.shape[1], logits.shape[2], logits.shape[3]
        probabilities = tf.nn.softmax(tf.reshape(logits, [-1, height * width, channels]), axis=1)
        ys, xs = tf.meshgrid((tf.range(height, dtype=logits.dtype) + 0.5) / height,
                             (tf.range(width, dtype=logits.dtype) + 0.5) / width, indexing="ij")
        x = tf.reduce_sum(probabilities * tf.reshape(xs, [1, -1, 1]), axis=1)  # [b, L]
        y = tf.reduce_sum(probabilities * tf.reshape(ys, [1, -1, 1]), axis=1)
        return tf.reshape(tf.stack([x, y], axis=-1), [-1, 2 * channels])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------
def build_localizer(input_shape=(64, 64, 3), num_classes: int = synthetic.NUM_CLASSES,
                    task: str = "localization", num_landmarks: int = NUM_LANDMARKS,
                    backbone: str = "resnet_small", point_head: str = "heatmap", what_stride: int = 32,
                    where_stride: int = 16, reduced_channels: int = 32, hidden_units: int = 256,
                    name: str | None = None):
    """A chapter-4 backbone with a localization or landmark head: [b, H, W, 3] -> [b, outputs] raw.

    The head has two branches, because *what* and *where* need different things:
      what:  the deepest feature map (stride `what_stride`) -> global average pooling -> dense ->
             p_c logit and the class (or visibility) logits. Pooling forgets positions, so a shape
             is recognised the same way wherever it is.
      where: the lecture's dense regression: a finer feature map (stride `where_stride`) -> a 1x1
             convolution (a dense layer applied at every position, thinning the channels) ->
             flatten, which keeps each feature's position -> dense -> the box (or the points).
             For landmarks, ``point_head="heatmap"`` instead computes one heatmap per point from
             the stride-8 map (with the stride-16 map upsampled onto it), upsamples it 2x and takes
             each heatmap's soft-argmax (`SpatialSoftArgmax`).
    Their outputs are put together in the lecture's order.

    Args:
        input_shape: (H, W, 3) images in [0, 1].
        num_classes: K, the classes of the localization head.
        task: "localization" -> [b, 5 + K] = [p_c logit, b_x, b_y, b_h, b_w, K class logits];
            "landmarks" -> [b, 1 + 3 L] = [p_c logit, L (x, y), L visibility logits].
        num_landmarks: L.
        backbone: a name of `ch04_classification.models.BACKBONE_NAMES`.
        point_head: landmarks only: "heatmap" (soft-argmax of heatmaps) or "dense" (regression).
        what_stride, where_stride: strides (4, 8, 16 or 32) of the feature maps of the two branches
            (`where_stride` is the dense regression's).
        reduced_channels: channels of the 1x1 convolution of the dense "where" branch (and of the
            heatmap branch's 3x3 convolution, doubled).
        hidden_units: width of each branch's dense layer.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if point_head not in POINT_HEADS:
        raise ValueError(f"point_head must be one of {POINT_HEADS}, got {point_head!r}")
    num_classes = _check_count(num_classes, "num_classes")
    num_landmarks = _check_count(num_landmarks, "num_landmarks")
    reduced_channels = _check_count(reduced_channels, "reduced_channels")
    hidden_units = _check_count(hidden_units, "hidden_units")
    for stride, argument in ((what_stride, "what_stride"), (where_stride, "where_stride")):
        if stride not in (4, 8, 16, 32):
            raise ValueError(f"{argument} must be 4, 8, 16 or 32, got {stride!r}")
    heatmaps = task == "landmarks" and point_head == "heatmap"
    if task == "localization":
        what_outputs, where_outputs = num_classes, 4  # class logits; b_x, b_y, b_h, b_w
    else:
        what_outputs, where_outputs = num_landmarks, 2 * num_landmarks  # visibility; points
    strides = {what_stride, where_stride} | ({8, 16} if heatmaps else set())
    pyramid = models.get_feature_pyramid(backbone, input_shape, strides=sorted(strides))
    inputs = keras.Input(shape=input_shape, name="image")
    feature_maps = pyramid(inputs)  # {"stride_16": [b, H / 16, W / 16, C16], "stride_32": ...}

    what = keras.layers.GlobalAveragePooling2D(name="what_pool")(feature_maps[f"stride_{what_stride}"])
    what = keras.layers.Dense(hidden_units, activation="relu", name="what_hidden")(what)
    presence = keras.layers.Dense(1, name="presence_logit")(what)  # [b, 1]
    what = keras.layers.Dense(what_outputs, name="what_logits")(what)  # [b, K] or [b, L]

    if heatmaps:
        coarse = keras.layers.UpSampling2D(2, interpolation="bilinear", name="where_up16")(
            feature_maps["stride_16"])  # [b, H / 8, W / 8, C16]
        where = keras.layers.Concatenate(name="where_merge")([feature_maps["stride_8"], coarse])
        for index in (1, 2):
            where = keras.layers.Conv2D(2 * reduced_channels, 3, padding="same", activation="relu",
                                        name=f"where_3x3_{index}")(where)
        where = keras.layers.Conv2D(num_landmarks, 1, name="where_heatmaps")(where)  # [b, H/8, W/8, L]
        where = keras.layers.UpSampling2D(2, interpolation="bilinear", name="where_up8")(where)
        where = SpatialSoftArgmax(name="where_output")(where)  # [b, 2 L] (x, y) in [0, 1]
    else:
        where = keras.layers.Conv2D(reduced_channels, 1, activation="relu", name="where_1x1")(
            feature_maps[f"stride_{where_stride}"])
        where = keras.layers.Flatten(name="where_flatten")(where)  # [b, H / s * W / s * reduced]
        where = keras.layers.Dense(hidden_units, activation="relu", name="where_hidden")(where)
        where = keras.layers.Dense(where_outputs, name="where_output")(where)  # [b, 4] or [b, 2 L]

    # The lecture's order: [p_c, box, classes] or [p_c, points, visibility].
    y = keras.layers.Concatenate(name=f"{task}_output")([presence, where, what])
    return keras.Model(inputs, y, name=name or f"{backbone}_{task}")


def decode_localization(outputs, num_classes: int) -> dict:
    """Raw [b, 5 + K] outputs -> {"presence" [b] = sigmoid(p_c logit), "boxes" [b, 4] yxyx clipped to
    the image, "classes" [b] argmax, "class_scores" [b] its softmax probability,
    "class_probabilities" [b, K]}."""
    outputs = tf.convert_to_tensor(outputs, tf.float32)
    _check_last_dim(outputs, localization_size(num_classes), "outputs", "p_c, box, class logits")
    probabilities = tf.nn.softmax(outputs[:, CLASS_START:], axis=-1)
    return {
        "presence": tf.sigmoid(outputs[:, PRESENCE_INDEX]),
        "boxes": box_ops.clip_boxes(center_to_box(outputs[:, BOX_SLICE])),
        "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
        "class_scores": tf.reduce_max(probabilities, axis=-1),
        "class_probabilities": probabilities,
    }


def decode_landmarks(outputs, num_landmarks: int = NUM_LANDMARKS) -> dict:
    """Raw [b, 1 + 3 L] outputs -> {"presence" [b], "landmarks" [b, L, 2] (x, y), "visibility" [b, L]
    probabilities}."""
    outputs = tf.convert_to_tensor(outputs, tf.float32)
    _check_last_dim(outputs, landmark_size(num_landmarks), "outputs", "p_c, L (x, y), L visibility")
    return {
        "presence": tf.sigmoid(outputs[:, 0]),
        "landmarks": tf.reshape(outputs[:, 1:1 + 2 * num_landmarks], [-1, num_landmarks, 2]),
        "visibility": tf.sigmoid(outputs[:, 1 + 2 * num_landmarks:]),
    }


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def smooth_l1(x, beta: float = 1.0):
    """Smooth L1 (Girshick 2015, eq. 3, with the transition at ``beta``): 0.5 x^2 / beta if |x| < beta,
    else |x| - 0.5 beta. Elementwise; equals keras.losses.Huber(delta=beta) / beta."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    x = tf.abs(x)
    return tf.where(x < beta, 0.5 * tf.square(x) / beta, x - 0.5 * beta)


def _bce_with_logits(labels, logits):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)


def localization_loss(y_true, y_pred, kind: str = "modern", box_weight: float = 1.0,
                      beta: float = 0.1, class_weight: float = 1.0):
    """Per-image localization loss: [b, 5 + K] targets and raw outputs -> [b].

    "lecture": p = 1: sum_i (ŷ_i - y_i)^2 over all 5 + K outputs; p = 0: (p̂_c - p_c)^2, with
        p̂_c = sigmoid(logit), box as is, ĉ = softmax(class logits).
    "modern": BCE(p̂_c, p_c) + p_c * [class_weight * CE(class) + box_weight * sum smooth_l1(box
        error, beta)].
    ``box_weight``, ``beta`` and ``class_weight`` are used by "modern" only (beta = 0.1 of the image
    side: squared below about 6 pixels of a 64-pixel image, linear above).
    """
    _check_kind(kind)
    y_true = tf.convert_to_tensor(y_true, tf.float32)
    y_pred = tf.convert_to_tensor(y_pred, tf.float32)
    _check_last_dim(y_pred, y_true.shape[-1], "y_pred", "the same size as y_true")
    present = y_true[:, PRESENCE_INDEX]  # [b], 1 or 0
    box_true, box_pred = y_true[:, BOX_SLICE], y_pred[:, BOX_SLICE]  # [b, 4]
    class_true, class_logits = y_true[:, CLASS_START:], y_pred[:, CLASS_START:]  # [b, K]
    presence_logit = y_pred[:, PRESENCE_INDEX]
    if kind == "lecture":
        presence_error = tf.square(tf.sigmoid(presence_logit) - present)
        box_error = tf.reduce_sum(tf.square(box_pred - box_true), axis=-1)
        class_error = tf.reduce_sum(tf.square(tf.nn.softmax(class_logits) - class_true), axis=-1)
        return presence_error + present * (box_error + class_error)
    presence_loss = _bce_with_logits(present, presence_logit)
    class_loss = tf.nn.softmax_cross_entropy_with_logits(labels=class_true, logits=class_logits)
    box_loss = tf.reduce_sum(smooth_l1(box_pred - box_true, beta), axis=-1)
    return presence_loss + present * (class_weight * class_loss + box_weight * box_loss)


def landmark_loss(y_true, y_pred, kind: str = "modern", num_landmarks: int = NUM_LANDMARKS,
                  point_weight: float = 5.0, beta: float = 0.02):
    """Per-image landmark loss: [b, 1 + 3 L] targets and raw outputs -> [b].

    "lecture": p = 1: (p̂ - p)^2 + sum over visible points of (x̂ - x)^2 + (ŷ - y)^2
        + sum_k (v̂_k - v_k)^2; p = 0: (p̂ - p)^2 (p̂, v̂ after the sigmoid).
    "modern": BCE(p̂, p) + p * [point_weight * sum over visible points of smooth L1 of x and y
        + sum_k BCE(v̂_k, v_k)].
    Points that are not visible (padding) never count.
    """
    _check_kind(kind)
    num_landmarks = _check_count(num_landmarks, "num_landmarks")
    y_true = tf.convert_to_tensor(y_true, tf.float32)
    y_pred = tf.convert_to_tensor(y_pred, tf.float32)
    _check_last_dim(y_pred, landmark_size(num_landmarks), "y_pred", "p_c, L (x, y), L visibility")
    present = y_true[:, 0]
    points_true = tf.reshape(y_true[:, 1:1 + 2 * num_landmarks], [-1, num_landmarks, 2])
    points_pred = tf.reshape(y_pred[:, 1:1 + 2 * num_landmarks], [-1, num_landmarks, 2])
    visible = y_true[:, 1 + 2 * num_landmarks:]  # [b, L]
    visibility_logits = y_pred[:, 1 + 2 * num_landmarks:]
    error = points_pred - points_true  # [b, L, 2]
    if kind == "lecture":
        presence_error = tf.square(tf.sigmoid(y_pred[:, 0]) - present)
        point_error = tf.reduce_sum(visible * tf.reduce_sum(tf.square(error), axis=-1), axis=-1)
        visibility_error = tf.reduce_sum(tf.square(tf.sigmoid(visibility_logits) - visible), axis=-1)
        return presence_error + present * (point_error + visibility_error)
    presence_loss = _bce_with_logits(present, y_pred[:, 0])
    point_loss = tf.reduce_sum(visible * tf.reduce_sum(smooth_l1(error, beta), axis=-1), axis=-1)
    visibility_loss = tf.reduce_sum(_bce_with_logits(visible, visibility_logits), axis=-1)
    return presence_loss + present * (point_weight * point_loss + visibility_loss)


@keras.saving.register_keras_serializable(package="ch05_detection")
class LocalizationLoss(keras.losses.Loss):
    """`localization_loss` as a Keras loss (mean over the batch): y_true [b, 5 + K], y_pred raw [b, 5 + K]."""

    def __init__(self, kind="modern", box_weight=1.0, beta=0.1, class_weight=1.0,
                 name="localization_loss", **kwargs):
        _check_kind(kind)
        super().__init__(name=name, **kwargs)
        self.kind, self.box_weight, self.beta = kind, float(box_weight), float(beta)
        self.class_weight = float(class_weight)

    def call(self, y_true, y_pred):
        return localization_loss(y_true, y_pred, self.kind, self.box_weight, self.beta, self.class_weight)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "box_weight": self.box_weight,
                "beta": self.beta, "class_weight": self.class_weight}


@keras.saving.register_keras_serializable(package="ch05_detection")
class LandmarkLoss(keras.losses.Loss):
    """`landmark_loss` as a Keras loss (mean over the batch): y_true and raw y_pred [b, 1 + 3 L]."""

    def __init__(self, kind="modern", num_landmarks=NUM_LANDMARKS, point_weight=5.0, beta=0.02,
                 name="landmark_loss", **kwargs):
        _check_kind(kind)
        super().__init__(name=name, **kwargs)
        self.kind, self.num_landmarks = kind, _check_count(num_landmarks, "num_landmarks")
        self.point_weight, self.beta = float(point_weight), float(beta)

    def call(self, y_true, y_pred):
        return landmark_loss(y_true, y_pred, self.kind, self.num_landmarks, self.point_weight, self.beta)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "num_landmarks": self.num_landmarks,
                "point_weight": self.point_weight, "beta": self.beta}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
class _RatioMetric(keras.metrics.Metric):
    """A sum over counted items divided by their number (0 when nothing was counted)."""

    def __init__(self, name, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def _add(self, values, weights):
        self.total.assign_add(tf.reduce_sum(values * weights))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self):
        return tf.math.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)


@keras.saving.register_keras_serializable(package="ch05_detection")
class PresenceAccuracy(_RatioMetric):
    """Fraction of images whose sigmoid(p_c logit) > 0.5 agrees with p_c (column 0 of both tensors)."""

    def __init__(self, name="presence_accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        predicted = tf.cast(y_pred[:, 0] > 0.0, tf.float32)  # sigmoid(z) > 0.5 <=> z > 0
        self._add(tf.cast(tf.equal(predicted, y_true[:, 0]), tf.float32), tf.ones_like(predicted))


@keras.saving.register_keras_serializable(package="ch05_detection")
class ClassAccuracy(_RatioMetric):
    """Top-1 class accuracy over the images with an object (p_c = 1), localization layout."""

    def __init__(self, name="class_accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        correct = tf.equal(tf.argmax(y_pred[:, CLASS_START:], axis=-1),
                           tf.argmax(y_true[:, CLASS_START:], axis=-1))
        self._add(tf.cast(correct, tf.float32), y_true[:, PRESENCE_INDEX])


@keras.saving.register_keras_serializable(package="ch05_detection")
class MeanBoxIoU(_RatioMetric):
    """Mean IoU of the predicted box (clipped to the image) with the true one, over images with an
    object (p_c = 1), localization layout."""

    def __init__(self, name="mean_iou", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        true_boxes = center_to_box(y_true[:, BOX_SLICE])[:, None, :]  # [b, 1, 4]
        pred_boxes = box_ops.clip_boxes(center_to_box(y_pred[:, BOX_SLICE]))[:, None, :]
        iou = box_ops.pairwise_iou(pred_boxes, true_boxes)[:, 0, 0]  # [b]
        self._add(iou, y_true[:, PRESENCE_INDEX])


@keras.saving.register_keras_serializable(package="ch05_detection")
class NormalizedMeanError(_RatioMetric):
    """NME: mean Euclidean distance between predicted and true visible landmarks of images with an
    object, in units of the image side (coordinates are normalized). Landmark layout."""

    def __init__(self, num_landmarks=NUM_LANDMARKS, name="nme", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_landmarks = _check_count(num_landmarks, "num_landmarks")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
        count = self.num_landmarks
        true_points = tf.reshape(y_true[:, 1:1 + 2 * count], [-1, count, 2])
        pred_points = tf.reshape(y_pred[:, 1:1 + 2 * count], [-1, count, 2])
        distance = tf.norm(pred_points - true_points, axis=-1)  # [b, L]
        weights = y_true[:, 1 + 2 * count:] * y_true[:, :1]  # visible points of present objects
        self._add(distance, weights)

    def get_config(self):
        return {**super().get_config(), "num_landmarks": self.num_landmarks}


def localization_metrics():
    """The metrics of `--task localization`: presence accuracy, class accuracy, mean box IoU."""
    return [PresenceAccuracy(), ClassAccuracy(), MeanBoxIoU()]


def landmark_metrics(num_landmarks: int = NUM_LANDMARKS):
    """The metrics of `--task landmarks`: presence accuracy and NME."""
    return [PresenceAccuracy(), NormalizedMeanError(num_landmarks)]


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------
def show_localization(images, outputs, targets, class_names, save_path=None, cols: int = 4):
    """Predicted boxes (solid, with class and p̂_c) and true boxes (dashed white) on images.

    images [b, H, W, 3]; outputs raw [b, 5 + K]; targets y [b, 5 + K]. A prediction is drawn when
    p̂_c > 0.5; the title says "p=..", predicted class and, if there is an object, the IoU.
    """
    from common import viz

    num_classes = len(class_names)
    decoded = decode_localization(outputs, num_classes)
    targets = tf.convert_to_tensor(targets, tf.float32)
    present = decoded["presence"].numpy() > 0.5
    true_present = targets[:, 0].numpy() > 0.5
    true_boxes = center_to_box(targets[:, BOX_SLICE])
    true_classes = tf.argmax(targets[:, CLASS_START:], axis=-1, output_type=tf.int32).numpy()
    iou = box_ops.pairwise_iou(decoded["boxes"][:, None], true_boxes[:, None])[:, 0, 0].numpy()
    titles = []
    for i in range(len(present)):
        title = f"p={decoded['presence'][i]:.2f}"
        if present[i]:
            title += f" {class_names[int(decoded['classes'][i])]}"
        if true_present[i]:
            title += f" IoU {iou[i]:.2f}"
        titles.append(title)
    classes = np.where(present, decoded["classes"].numpy(), -1)[:, None]
    return viz.show_detections(
        np.asarray(images), decoded["boxes"].numpy()[:, None], classes,
        scores=decoded["class_scores"].numpy()[:, None], class_names=class_names,
        gt_boxes=true_boxes.numpy()[:, None], gt_classes=np.where(true_present, true_classes, -1)[:, None],
        cols=cols, save_path=save_path, titles=titles)


def show_landmarks(images, outputs, targets, num_landmarks: int = NUM_LANDMARKS, save_path=None,
                   cols: int = 4):
    """Predicted landmarks (numbered coloured dots) and true ones (white rings) on images.

    images [b, H, W, 3]; outputs raw and targets y [b, 1 + 3 L]. Predicted points are drawn where
    p̂_c > 0.5 and their visibility > 0.5; the title gives p̂_c and the image's mean error.
    """
    import matplotlib.pyplot as plt

    from common import viz

    images = np.asarray(images)
    decoded = decode_landmarks(outputs, num_landmarks)
    targets = np.asarray(targets, np.float32)
    true_points = targets[:, 1:1 + 2 * num_landmarks].reshape(-1, num_landmarks, 2)
    true_visible = targets[:, 1 + 2 * num_landmarks:] > 0.5
    points = decoded["landmarks"].numpy()
    presence = decoded["presence"].numpy()
    visible = decoded["visibility"].numpy() > 0.5
    rows = int(np.ceil(len(images) / cols))
    figure, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= len(images):
            continue
        height, width = images[i].shape[:2]
        ax.imshow(np.clip(images[i], 0, 1))
        # Normalized x in [0, 1] spans the pixels' edges: pixel centres are at (x * width - 0.5).
        for k in np.flatnonzero(true_visible[i]):
            ax.scatter(true_points[i, k, 0] * width - 0.5, true_points[i, k, 1] * height - 0.5, s=90,
                       facecolors="none", edgecolors="white", linewidths=1.2)
        if presence[i] > 0.5:
            for k in np.flatnonzero(visible[i]):
                x, y = points[i, k, 0] * width - 0.5, points[i, k, 1] * height - 0.5
                ax.scatter(x, y, s=24, color=colours(k % 10))
                ax.text(x + 1, y - 1, str(k), color=colours(k % 10), fontsize=7)
        title = f"p={presence[i]:.2f}"
        if true_visible[i].any():
            error = np.linalg.norm(points[i] - true_points[i], axis=-1)[true_visible[i]].mean()
            title += f" error {error:.3f}"
        ax.set_title(title, fontsize=9)
    figure.tight_layout()
    return viz.save_figure(figure, save_path)
