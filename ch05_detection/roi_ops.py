"""RoI pooling and RoIAlign: a fixed-size feature for every region of interest.

The second stage of Fast / Faster R-CNN classifies each proposal with fully connected
layers, which need a fixed-size input, while proposals come in every size. Two layers
solve this; both take the backbone's feature map and a set of boxes and return one
``pool_height x pool_width x channels`` feature per box.

* ``RoIPooling`` (Girshick 2015, "Fast R-CNN", sec. 2.1): snap the RoI to feature-map
  cells, split its ``h x w`` window into a ``pool_height x pool_width`` grid of cells
  of about ``h / pool_height x w / pool_width``, and take the maximum in each cell.
  ``roi_pool_reference`` does exactly that with NumPy loops (read it first); the layer
  computes the same thing with vectorised TensorFlow ops.
* ``RoIAlign`` (He et al. 2017, "Mask R-CNN", sec. 3): no snapping. Each grid cell is
  sampled at ``sampling_ratio x sampling_ratio`` regular points by bilinear
  interpolation, and the samples are averaged (or max-pooled). This keeps the exact
  position of the box, which matters for masks and small objects.
  ``roi_align_reference`` is the plain NumPy version; ``roi_align`` samples with
  ``tf.image.crop_and_resize``, and ``roi_align_gather`` computes the same numbers with
  gathers of the four neighbours of every sample, which XLA can compile
  (``crop_and_resize`` has no XLA kernel); the ``RoIAlign`` layer runs either.

Boxes are **normalized** ``[ymin, xmin, ymax, xmax]`` relative to the image, the repo's
data contract. They are mapped to the feature map by multiplying by its height and
width, which assumes the feature map covers the image exactly (image size = feature
size x stride, true for the repo's backbones when the image size is a multiple of the
stride).

Shapes: ``feature_map [batch, H, W, C]``, ``rois [batch, R, 4]`` ->
``[batch, R, pool_height, pool_width, C]``. ``R`` may differ from call to call, also
under ``tf.function``; padded (all-zero) RoIs are harmless, their output is ignored by
the caller. RoIs with NaN / infinite coordinates, or outside ``ROI_RANGE`` (pixel
coordinates passed by mistake), are refused with a ValueError (an in-graph assert
under ``tf.function``) instead of pooling zeros.

Run the tests: ``python -m pytest -q tests/test_ch05_roi_ops.py``.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

BIN_BOUNDARIES = ("floor", "caffe")
POOLING_MODES = ("average", "max")
# How RoIAlign samples: "crop_and_resize" (TensorFlow's kernel; no XLA kernel) or "gather"
# (the bilinear interpolation written with gathers; compiles with XLA, e.g. on TPUs).
ROI_ALIGN_IMPLEMENTATIONS = ("crop_and_resize", "gather")


def _pair(value, name):
    """An int or a pair of ints -> (height, width)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be an int or (height, width), got {value}")
        pair = (int(value[0]), int(value[1]))
    else:
        pair = (int(value), int(value))
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"`{name}` must be positive, got {value}")
    return pair


def _check_inputs(feature_map, rois):
    feature_map = tf.convert_to_tensor(feature_map)
    rois = tf.cast(tf.convert_to_tensor(rois), tf.float32)
    if feature_map.shape.rank is not None and feature_map.shape.rank != 4:
        raise ValueError(
            f"`feature_map` must be [batch, height, width, channels], got shape "
            f"{feature_map.shape}")
    if rois.shape.rank is not None and (rois.shape.rank != 3 or rois.shape[-1] not in (None, 4)):
        raise ValueError(
            f"`rois` must be [batch, num_rois, 4] normalized yxyx boxes, got shape {rois.shape}")
    return feature_map, _check_roi_values(rois)


# Normalized RoIs are fractions of the image. A box may poke out of the image (an
# unclipped proposal, a jittered box), but one more than a whole image away cannot
# cover any feature: such values are pixel coordinates that were never divided by the
# image size, which would pool zeros (RoIAlign) or the corner cell (RoI pooling).
ROI_RANGE = (-1.0, 2.0)
_NOT_FINITE_MESSAGE = "`rois` contains NaN or infinite coordinates"
_RANGE_MESSAGE = (
    f"`rois` must be normalized [ymin, xmin, ymax, xmax] boxes (fractions of the image, "
    f"within [{ROI_RANGE[0]:g}, {ROI_RANGE[1]:g}]); pixel coordinates? divide them by the "
    f"image height and width (ch05_detection.boxes.to_normalized)")


def _check_roi_values(rois):
    """Clear errors for NaN / infinite RoIs and for pixel instead of normalized ones.

    Eagerly: a ValueError naming the first bad RoI. Inside ``tf.function``: in-graph
    asserts (no trip to the host; the cost is a few reductions over ``[batch, R, 4]``),
    and the returned ``rois`` depend on them, so no pooling runs on bad boxes (a NaN
    would otherwise become a huge gather index).
    """
    low, high = ROI_RANGE
    if tf.executing_eagerly():
        values = rois.numpy()
        finite = np.isfinite(values)
        if not finite.all():
            index = tuple(int(i) for i in np.argwhere(~finite.all(axis=-1))[0])
            raise ValueError(f"{_NOT_FINITE_MESSAGE}: RoI {index} is {values[index].tolist()}")
        inside = (values >= low) & (values <= high)
        if not inside.all():
            index = tuple(int(i) for i in np.argwhere(~inside.all(axis=-1))[0])
            raise ValueError(f"{_RANGE_MESSAGE}; RoI {index} is {values[index].tolist()}")
        return rois
    finite_check = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(rois)),
                                       [_NOT_FINITE_MESSAGE])
    with tf.control_dependencies([finite_check]):  # NaN gets its own message first
        inside = tf.logical_and(rois >= low, rois <= high)
        range_check = tf.debugging.Assert(
            tf.reduce_all(inside), [_RANGE_MESSAGE + "; smallest and largest coordinate:",
                                    tf.reduce_min(rois), tf.reduce_max(rois)])
    with tf.control_dependencies([range_check]):
        return tf.identity(rois)


# ----------------------------------------------------------------------------------
# RoI max pooling
# ----------------------------------------------------------------------------------
def _snap_to_cells(start, end, size):
    """Normalized [start, end) -> integer cells [first, last) on a map of ``size`` cells.

    Rounds both ends (half up), then keeps at least one cell inside the map.
    Works on NumPy arrays and on TF tensors.
    """
    if isinstance(start, np.ndarray) or np.isscalar(start):
        first = np.clip(np.floor(start * size + 0.5), 0, size - 1)
        last = np.clip(np.floor(end * size + 0.5), first + 1, size)
        return first.astype(np.int64), last.astype(np.int64)
    size_float = tf.cast(size, tf.float32)
    first = tf.clip_by_value(tf.floor(start * size_float + 0.5), 0.0, size_float - 1.0)
    last = tf.clip_by_value(tf.floor(end * size_float + 0.5), first + 1.0, size_float)
    return tf.cast(first, tf.int32), tf.cast(last, tf.int32)


def roi_pool_reference(feature_map, rois, pool_size=(7, 7), bin_boundaries="floor"):
    """RoI max pooling with plain loops, exactly as the chapter describes it (NumPy).

    For each RoI: snap it to feature-map cells (rows ``first_row .. last_row - 1``,
    ``h`` rows; the same for columns, ``w`` columns). Cell ``(i, j)`` of the output grid
    covers rows ``first_row + floor(i * h / pool_height)`` up to
    ``first_row + floor((i + 1) * h / pool_height)`` (exclusive) with ``"floor"``
    boundaries: the cells partition the window, e.g. 5 rows into 2 + 3. With
    ``"caffe"`` boundaries the end is ``ceil((i + 1) * h / pool_height)`` as in the
    original Caffe implementation, so neighbouring cells may share a row (5 rows ->
    rows 0-2 and 2-4). A RoI smaller than the grid (h < pool_height) would leave some
    "floor" cells empty; such a cell takes the one row it starts in. The output is the
    maximum over each cell.

    Args:
        feature_map: ``[batch, H, W, C]`` array.
        rois: ``[batch, R, 4]`` normalized yxyx boxes.
        pool_size: ``(pool_height, pool_width)`` or an int.
        bin_boundaries: ``"floor"`` or ``"caffe"``.
    Returns:
        ``[batch, R, pool_height, pool_width, C]`` array.
    """
    pool_height, pool_width = _pair(pool_size, "pool_size")
    feature_map = np.asarray(feature_map, np.float64)
    rois = np.asarray(rois, np.float64)
    batch, height, width, channels = feature_map.shape
    end_rounding = math.floor if bin_boundaries == "floor" else math.ceil
    output = np.zeros((batch, rois.shape[1], pool_height, pool_width, channels))
    for b in range(batch):
        for r, (ymin, xmin, ymax, xmax) in enumerate(rois[b]):
            first_row, last_row = _snap_to_cells(np.float64(ymin), np.float64(ymax), height)
            first_col, last_col = _snap_to_cells(np.float64(xmin), np.float64(xmax), width)
            h, w = last_row - first_row, last_col - first_col
            for i in range(pool_height):
                row_start = first_row + math.floor(i * h / pool_height)
                row_end = max(first_row + end_rounding((i + 1) * h / pool_height),
                              row_start + 1)  # never an empty cell
                for j in range(pool_width):
                    col_start = first_col + math.floor(j * w / pool_width)
                    col_end = max(first_col + end_rounding((j + 1) * w / pool_width),
                                  col_start + 1)
                    cell = feature_map[b, row_start:row_end, col_start:col_end, :]
                    output[b, r, i, j] = cell.max(axis=(0, 1))
    return output


def _cell_indices(first, last, pool_cells, bin_boundaries):
    """Feature-map indices covered by each output cell, padded to a common length.

    Args:
        first, last: ``[batch, R]`` int32 snapped RoI extent (last exclusive).
        pool_cells: number of output cells along this axis.
    Returns:
        ``[batch, R, pool_cells, max_cell_size]`` int32 indices. Short cells repeat
        their last index: a repeated element does not change a maximum.
    """
    extent = tf.cast(last - first, tf.float32)[..., tf.newaxis]  # [batch, R, 1]
    cell = tf.range(pool_cells, dtype=tf.float32)  # [pool_cells]
    starts = tf.floor(cell * extent / pool_cells)  # [batch, R, pool_cells]
    if bin_boundaries == "floor":
        ends = tf.floor((cell + 1.0) * extent / pool_cells)
    else:
        ends = tf.math.ceil((cell + 1.0) * extent / pool_cells)
    # A RoI with fewer cells than the grid would leave some "floor" cells empty: give
    # each cell at least the one row (column) it starts in.
    ends = tf.maximum(ends, starts + 1.0)
    starts = tf.cast(starts, tf.int32) + first[..., tf.newaxis]
    ends = tf.cast(ends, tf.int32) + first[..., tf.newaxis]
    sizes = ends - starts  # >= 1
    # Longest cell in this batch (+ a 1 so that zero RoIs still give a valid shape).
    max_cell_size = tf.reduce_max(tf.concat([tf.reshape(sizes, [-1]), [1]], axis=0))
    offsets = tf.range(max_cell_size)  # [max_cell_size]
    indices = starts[..., tf.newaxis] + offsets  # [batch, R, pool_cells, max_cell_size]
    return tf.minimum(indices, ends[..., tf.newaxis] - 1)


def roi_pool(feature_map, rois, pool_size=(7, 7), bin_boundaries="floor"):
    """Vectorised RoI max pooling (see ``roi_pool_reference`` for the same in loops).

    Every output cell gathers the feature-map rows it covers (padded to the longest
    cell in the batch) and takes their maximum, then does the same over its columns;
    no Python loop runs over RoIs,
    so it works in graph mode with any number of RoIs, and the gradient flows back to
    the maximal feature-map positions.

    Args:
        feature_map: ``[batch, H, W, C]``.
        rois: ``[batch, R, 4]`` normalized yxyx boxes.
        pool_size: ``(pool_height, pool_width)`` or an int.
        bin_boundaries: ``"floor"`` (cells partition the RoI) or ``"caffe"``.
    Returns:
        ``[batch, R, pool_height, pool_width, C]``.
    """
    pool_height, pool_width = _pair(pool_size, "pool_size")
    if bin_boundaries not in BIN_BOUNDARIES:
        raise ValueError(
            f"`bin_boundaries` must be one of {BIN_BOUNDARIES}, got {bin_boundaries!r}")
    feature_map, rois = _check_inputs(feature_map, rois)
    shape = tf.shape(feature_map)
    height, width = shape[1], shape[2]
    ymin, xmin, ymax, xmax = tf.unstack(rois, num=4, axis=-1)  # [batch, R] each
    first_row, last_row = _snap_to_cells(ymin, ymax, height)
    first_col, last_col = _snap_to_cells(xmin, xmax, width)
    rows = _cell_indices(first_row, last_row, pool_height, bin_boundaries)  # [b, R, ph, kh]
    cols = _cell_indices(first_col, last_col, pool_width, bin_boundaries)  # [b, R, pw, kw]
    # The maximum over a rectangle is the maximum over its columns of the maximum over
    # its rows, so reduce one axis at a time (much less data than gathering 2-D cells).
    row_samples = tf.gather(feature_map, rows, axis=1, batch_dims=1)  # [b, R, ph, kh, W, C]
    row_maxima = tf.reduce_max(row_samples, axis=3)  # [batch, R, ph, W, C]
    cell_samples = tf.gather(row_maxima, cols, axis=3, batch_dims=2)  # [b, R, ph, pw, kw, C]
    return tf.reduce_max(cell_samples, axis=4)  # [batch, R, ph, pw, C]


@keras.saving.register_keras_serializable(package="ch05_detection")
class RoIPooling(keras.layers.Layer):
    """RoI max pooling, Girshick 2015 ("Fast R-CNN"), sec. 2.1.

    Input: ``feature_map [batch, H, W, C]`` and ``rois [batch, R, 4]`` normalized
    ``[ymin, xmin, ymax, xmax]`` boxes (relative to the image the feature map covers).
    Output: ``[batch, R, pool_height, pool_width, C]``, the maximum of each grid cell.

    Args:
        pool_size: output grid, an int or ``(pool_height, pool_width)`` (7 x 7 for
            VGG-16 in the paper).
        bin_boundaries: ``"floor"``: the grid cells partition the snapped RoI (a 5-row
            RoI into 2 + 3 rows), as the chapter explains it; ``"caffe"``: cell ends
            rounded up as in the original Caffe code (5 rows -> 3 + 3, sharing a row).
    """

    def __init__(self, pool_size=(7, 7), bin_boundaries="floor", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        if bin_boundaries not in BIN_BOUNDARIES:
            raise ValueError(
                f"`bin_boundaries` must be one of {BIN_BOUNDARIES}, got {bin_boundaries!r}")
        self.bin_boundaries = bin_boundaries

    def call(self, feature_map, rois):
        return roi_pool(feature_map, rois, self.pool_size, self.bin_boundaries)

    def compute_output_shape(self, feature_map_shape, rois_shape):
        return (feature_map_shape[0], rois_shape[1], *self.pool_size, feature_map_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=list(self.pool_size), bin_boundaries=self.bin_boundaries)
        return config


# ----------------------------------------------------------------------------------
# RoIAlign
# ----------------------------------------------------------------------------------
def _bilinear_reference(image, y, x, aligned):
    """Bilinear value of ``image [H, W, C]`` at continuous index (y, x) (NumPy).

    aligned=True follows Detectron2's RoIAlign: points more than one pixel outside the
    map give 0, points within one pixel are clamped to the border. aligned=False follows
    ``tf.image.crop_and_resize``: points outside ``[0, H-1] x [0, W-1]`` give 0.
    """
    height, width = image.shape[:2]
    if aligned:
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(image.shape[2])
        y = min(max(y, 0.0), height - 1.0)
        x = min(max(x, 0.0), width - 1.0)
    elif y < 0.0 or y > height - 1.0 or x < 0.0 or x > width - 1.0:
        return np.zeros(image.shape[2])
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    dy, dx = y - y0, x - x0
    top = (1 - dx) * image[y0, x0] + dx * image[y0, x1]
    bottom = (1 - dx) * image[y1, x0] + dx * image[y1, x1]
    return (1 - dy) * top + dy * bottom


def roi_align_reference(feature_map, rois, pool_size=(7, 7), sampling_ratio=2,
                        aligned=True, pooling="average"):
    """RoIAlign with plain loops (NumPy), He et al. 2017, sec. 3.

    aligned=True: the RoI covers the continuous span ``[ymin * H, ymax * H]`` of the
    feature map, whose cell ``k`` has its centre at ``k + 0.5``. Each of the
    ``pool_height x pool_width`` bins is sampled at ``sampling_ratio`` regular points
    per axis (centres of equal sub-bins); a point at continuous coordinate ``c`` is read
    at index ``c - 0.5``. aligned=False reproduces the plain
    ``tf.image.crop_and_resize`` grid instead: ``n = pool * sampling_ratio`` points per
    axis from ``ymin * (H - 1)`` to ``ymax * (H - 1)`` inclusive. The samples of each
    bin are then averaged (or max-pooled).
    """
    pool_height, pool_width = _pair(pool_size, "pool_size")
    feature_map = np.asarray(feature_map, np.float64)
    rois = np.asarray(rois, np.float64)
    batch, height, width, channels = feature_map.shape
    s = sampling_ratio
    rows_n, cols_n = pool_height * s, pool_width * s

    def sample_positions(start, end, size, count):
        if aligned:
            extent = (end - start) * size
            return [start * size + (k + 0.5) * extent / count - 0.5 for k in range(count)]
        if count == 1:
            return [0.5 * (start + end) * (size - 1)]
        return [start * (size - 1) + k * (end - start) * (size - 1) / (count - 1)
                for k in range(count)]

    output = np.zeros((batch, rois.shape[1], pool_height, pool_width, channels))
    for b in range(batch):
        for r, (ymin, xmin, ymax, xmax) in enumerate(rois[b]):
            ys = sample_positions(ymin, ymax, height, rows_n)
            xs = sample_positions(xmin, xmax, width, cols_n)
            samples = np.array([[_bilinear_reference(feature_map[b], y, x, aligned)
                                 for x in xs] for y in ys])  # [rows_n, cols_n, C]
            bins = samples.reshape(pool_height, s, pool_width, s, channels)
            if pooling == "average":
                output[b, r] = bins.mean(axis=(1, 3))
            else:
                output[b, r] = bins.max(axis=(1, 3))
    return output


def _check_align_arguments(pool_size, sampling_ratio, pooling):
    """RoIAlign's arguments checked: ``(pool_height, pool_width, sampling_ratio as an int)``."""
    pool_height, pool_width = _pair(pool_size, "pool_size")
    if pooling not in POOLING_MODES:
        raise ValueError(f"`pooling` must be one of {POOLING_MODES}, got {pooling!r}")
    if int(sampling_ratio) < 1:
        raise ValueError(f"`sampling_ratio` must be a positive int, got {sampling_ratio}")
    return pool_height, pool_width, int(sampling_ratio)


def roi_align(feature_map, rois, pool_size=(7, 7), sampling_ratio=2, aligned=True,
              pooling="average"):
    """RoIAlign through ``tf.image.crop_and_resize`` (bilinear sampling, vectorised).

    ``crop_and_resize`` maps a normalized box coordinate ``t`` to the pixel *index*
    ``t * (size - 1)`` and samples ``n`` points from the first to the last edge
    inclusive. RoIAlign wants the points at the centres of ``n`` equal sub-bins of the
    continuous span ``[ymin * H, ymax * H]``, read at index ``coordinate - 0.5``
    (pixel ``k`` has its centre at ``k + 0.5``). With ``aligned=True`` we therefore hand
    crop_and_resize the box whose first and last sample land on those points:
    ``(ymin * H + 0.5 * h / n - 0.5) / (H - 1)`` and ``(ymax * H - 0.5 * h / n - 0.5) / (H - 1)``
    with ``h = (ymax - ymin) * H``. The feature map is first padded by one replicated
    border pixel, so points less than a pixel outside read the border value (as in
    Detectron2's RoIAlign) instead of crop_and_resize's extrapolation value 0. With
    ``aligned=False`` the boxes go to crop_and_resize as they are (the common
    half-pixel-misaligned shortcut).

    Args:
        feature_map: ``[batch, H, W, C]``.
        rois: ``[batch, R, 4]`` normalized yxyx boxes.
        pool_size: ``(pool_height, pool_width)`` or an int.
        sampling_ratio: sample points per bin along each axis (2 -> 4 points per bin).
        aligned: apply the half-pixel correction described above.
        pooling: ``"average"`` or ``"max"`` over the samples of a bin.
    Returns:
        ``[batch, R, pool_height, pool_width, C]``.
    """
    pool_height, pool_width, sampling_ratio = _check_align_arguments(pool_size, sampling_ratio, pooling)
    feature_map, rois = _check_inputs(feature_map, rois)
    feature_dtype = feature_map.dtype
    feature_map = tf.cast(feature_map, tf.float32)
    shape = tf.shape(feature_map)
    batch, height, width = shape[0], shape[1], shape[2]
    num_rois = tf.shape(rois)[1]
    crop_height, crop_width = pool_height * sampling_ratio, pool_width * sampling_ratio

    if aligned:
        height_float = tf.cast(height, tf.float32)
        width_float = tf.cast(width, tf.float32)
        ymin, xmin, ymax, xmax = tf.unstack(rois, num=4, axis=-1)  # [batch, R] each
        half_step_y = 0.5 * (ymax - ymin) * height_float / crop_height
        half_step_x = 0.5 * (xmax - xmin) * width_float / crop_width
        # Index of the first / last sample in the *padded* map (+1 for the border),
        # divided by (padded size - 1) = size + 1.
        boxes = tf.stack([
            (ymin * height_float + half_step_y + 0.5) / (height_float + 1.0),
            (xmin * width_float + half_step_x + 0.5) / (width_float + 1.0),
            (ymax * height_float - half_step_y + 0.5) / (height_float + 1.0),
            (xmax * width_float - half_step_x + 0.5) / (width_float + 1.0),
        ], axis=-1)
        # SYMMETRIC padding by 1 repeats the border row/column.
        feature_map = tf.pad(feature_map, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    else:
        boxes = rois

    box_indices = tf.repeat(tf.range(batch), num_rois)  # [batch * R]: image of each box
    crops = tf.image.crop_and_resize(
        feature_map, tf.reshape(boxes, [-1, 4]), box_indices, [crop_height, crop_width],
        method="bilinear", extrapolation_value=0.0)  # [batch * R, ph * s, pw * s, C]
    if pooling == "average":
        pooled = tf.nn.avg_pool2d(crops, sampling_ratio, sampling_ratio, "VALID")
    else:
        pooled = tf.nn.max_pool2d(crops, sampling_ratio, sampling_ratio, "VALID")
    # Keep the channel count static when it is known (the dense head needs it).
    channels = feature_map.shape[-1]
    if channels is None:
        channels = tf.shape(feature_map)[-1]
    pooled = tf.reshape(pooled, tf.stack([batch, num_rois, pool_height, pool_width, channels]))
    return tf.cast(pooled, feature_dtype)


def _sample_positions(start, end, size, count, aligned):
    """Continuous indices of ``count`` regular samples along one axis (TF, batched).

    ``start``, ``end``: ``[batch, R]`` normalized box edges; ``size``: the map's extent
    (float scalar). The rule of ``roi_align_reference`` (see there). Returns
    ``[batch, R, count]``.
    """
    k = tf.range(count, dtype=tf.float32)  # [count]
    start, end = start[..., tf.newaxis], end[..., tf.newaxis]  # [batch, R, 1]
    if aligned:
        extent = (end - start) * size
        return start * size + (k + 0.5) * extent / count - 0.5
    if count == 1:
        return 0.5 * (start + end) * (size - 1.0) + 0.0 * k
    return start * (size - 1.0) + k * (end - start) * (size - 1.0) / (count - 1)


def _neighbours_and_weights(positions, size, aligned):
    """The two neighbours and their bilinear weights of each sample along one axis.

    ``positions`` ``[batch, R, n]`` continuous indices into an axis of ``size`` cells
    (``size`` an int). Returns ``(low, high, low_weight, high_weight)``: int32 indices
    ``[batch, R, n]`` of the cells below and above each sample and their weights
    (``1 - d`` and ``d``, ``d`` the distance to ``low``), both 0 for a sample outside the
    map, so that it reads 0 (the rule of ``_bilinear_reference``: with ``aligned``, up to
    one cell outside is clamped to the border; without, anything outside
    ``[0, size - 1]`` is outside).
    """
    last = float(size - 1)
    if aligned:
        inside = tf.logical_and(positions >= -1.0, positions <= float(size))
        positions = tf.clip_by_value(positions, 0.0, last)
    else:
        inside = tf.logical_and(positions >= 0.0, positions <= last)
        # Clamped only to keep the (zero-weighted) indices of outside samples in range.
        positions = tf.clip_by_value(positions, 0.0, last)
    low_float = tf.floor(positions)
    high_weight = positions - low_float  # d in [0, 1)
    low = tf.cast(low_float, tf.int32)
    high = tf.minimum(low + 1, size - 1)
    inside = tf.cast(inside, positions.dtype)
    return low, high, (1.0 - high_weight) * inside, high_weight * inside


def roi_align_gather(feature_map, rois, pool_size=(7, 7), sampling_ratio=2, aligned=True,
                     pooling="average"):
    """RoIAlign with the bilinear interpolation written as gathers (XLA-compatible).

    The same numbers as ``roi_align`` (and ``roi_align_reference``), without
    ``tf.image.crop_and_resize``, which has no XLA kernel: every sample point ``(y, x)``
    is ``sum over its four neighbours of weight * feature``, the weights
    ``(1 - dy)(1 - dx)``, ``(1 - dy) dx``, ``dy (1 - dx)`` and ``dy dx``. Bilinear
    interpolation is separable, so we gather the two neighbouring *rows* of every sample
    row and blend them (``[batch, R, ny, W, C]``), then the two neighbouring *columns* of
    that and blend them (``[batch, R, ny, nx, C]``): the four-neighbour sum, with half
    the gathered data. A sample outside the map gets weight 0 on both neighbours (reads
    0). Every shape is static given the feature map's height and width, and the gradient
    of a gather is a scatter-add onto the feature map, so it compiles with
    ``tf.function(jit_compile=True)``: the way TPU implementations of RoIAlign work (e.g.
    the TF Model Garden's ``multilevel_crop_and_resize``). With average pooling the
    ``sampling_ratio`` sample rows of a bin are averaged before the column step (an
    average of blends is a blend of averages), which saves half the column work.

    Args and returns: as ``roi_align``. The feature map's height and width must be
    known when tracing (the detector's are).
    """
    pool_height, pool_width, s = _check_align_arguments(pool_size, sampling_ratio, pooling)
    feature_map, rois = _check_inputs(feature_map, rois)
    height, width = feature_map.shape[1], feature_map.shape[2]
    if height is None or width is None:
        raise ValueError("roi_align_gather needs a `feature_map` of static height and width, "
                         f"got shape {feature_map.shape}; use roi_align (crop_and_resize) instead")
    feature_dtype = feature_map.dtype
    feature_map = tf.cast(feature_map, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(rois, num=4, axis=-1)  # [batch, R] each
    ys = _sample_positions(ymin, ymax, float(height), pool_height * s, aligned)  # [b, R, ny]
    xs = _sample_positions(xmin, xmax, float(width), pool_width * s, aligned)  # [b, R, nx]
    top, bottom, top_weight, bottom_weight = _neighbours_and_weights(ys, height, aligned)
    left, right, left_weight, right_weight = _neighbours_and_weights(xs, width, aligned)

    # Rows: [batch, H, W, C] -> [batch, R, ny, W, C], blending the two neighbouring rows.
    rows = (top_weight[..., None, None] * tf.gather(feature_map, top, axis=1, batch_dims=1)
            + bottom_weight[..., None, None]
            * tf.gather(feature_map, bottom, axis=1, batch_dims=1))
    if pooling == "average":
        # Average the s sample rows of each bin now: [batch, R, ph, W, C].
        shape = tf.shape(rows)
        rows = tf.reduce_mean(
            tf.reshape(rows, tf.concat([shape[:2], [pool_height, s], shape[3:]], axis=0)),
            axis=3)
    # Columns: [batch, R, rows, W, C] -> [batch, R, rows, nx, C] (the same columns for
    # every row of a RoI: gather along axis 3 with the RoI's column indices).
    def columns(index):
        return tf.gather(rows, index, axis=3, batch_dims=2)  # [batch, R, rows, nx, C]

    samples = (left_weight[:, :, None, :, None] * columns(left)
               + right_weight[:, :, None, :, None] * columns(right))
    shape = tf.shape(samples)
    binned = tf.reshape(samples, tf.concat([shape[:3], [pool_width, s], shape[4:]], axis=0))
    if pooling == "average":
        pooled = tf.reduce_mean(binned, axis=4)  # [batch, R, ph, pw, C]
    else:
        shape = tf.shape(binned)  # [batch, R, ph * s, pw, s, C]
        binned = tf.reshape(binned, tf.concat(
            [shape[:2], [pool_height, s], shape[3:]], axis=0))  # [b, R, ph, s, pw, s, C]
        pooled = tf.reduce_max(binned, axis=[3, 5])
    channels = feature_map.shape[-1]
    if channels is not None:
        pooled = tf.ensure_shape(pooled, [None, None, pool_height, pool_width, channels])
    return tf.cast(pooled, feature_dtype)


@keras.saving.register_keras_serializable(package="ch05_detection")
class RoIAlign(keras.layers.Layer):
    """RoIAlign, He et al. 2017 ("Mask R-CNN"), sec. 3.

    Input: ``feature_map [batch, H, W, C]`` and ``rois [batch, R, 4]`` normalized
    ``[ymin, xmin, ymax, xmax]`` boxes.
    Output: ``[batch, R, pool_height, pool_width, C]``.

    Args:
        pool_size: output grid, an int or ``(pool_height, pool_width)``.
        sampling_ratio: bilinear samples per bin along each axis (2 in the paper: 4 per bin).
        aligned: half-pixel correction (see ``roi_align``); False gives the plain
            crop_and_resize grid.
        pooling: ``"average"`` (Detectron's choice) or ``"max"`` over a bin's samples.
        implementation: ``"crop_and_resize"`` (``roi_align``, TensorFlow's kernel) or
            ``"gather"`` (``roi_align_gather``: the same numbers, and it compiles with XLA).
            A model switches it with ``set_implementation`` (Faster R-CNN does when it is
            compiled with ``jit_compile=True``).
    """

    def __init__(self, pool_size=(7, 7), sampling_ratio=2, aligned=True, pooling="average",
                 implementation="crop_and_resize", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        if int(sampling_ratio) < 1:
            raise ValueError(f"`sampling_ratio` must be a positive int, got {sampling_ratio}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"`pooling` must be one of {POOLING_MODES}, got {pooling!r}")
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.pooling = pooling
        self.set_implementation(implementation)

    def set_implementation(self, implementation):
        """Choose ``"crop_and_resize"`` or ``"gather"`` (retrace any ``tf.function`` after)."""
        if implementation not in ROI_ALIGN_IMPLEMENTATIONS:
            raise ValueError(f"`implementation` must be one of {ROI_ALIGN_IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.implementation = implementation

    def call(self, feature_map, rois):
        align = roi_align_gather if self.implementation == "gather" else roi_align
        return align(feature_map, rois, self.pool_size, self.sampling_ratio, self.aligned,
                     self.pooling)

    def compute_output_shape(self, feature_map_shape, rois_shape):
        return (feature_map_shape[0], rois_shape[1], *self.pool_size, feature_map_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=list(self.pool_size), sampling_ratio=self.sampling_ratio,
                      aligned=self.aligned, pooling=self.pooling,
                      implementation=self.implementation)
        return config
