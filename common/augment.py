"""Batched data augmentation on the accelerator, with boxes and masks kept consistent.

Every function here takes a whole *batch dict* and a seed and returns a new
batch dict. The batch follows the repo's data contracts (see docs/design.md):

* classification: ``image`` float32 [B, H, W, 3] in [0, 1], ``label`` [B]
* semantic segmentation: ``image`` and ``mask`` int32 [B, H, W] (255 = ignore)
* detection: ``image``, ``boxes`` float32 [B, M, 4] normalized
  [ymin, xmin, ymax, xmax], ``classes`` int32 [B, M]; padded rows have a zero
  box and class -1
* instance segmentation: detection keys + ``masks`` uint8 [B, M, H, W]

Keys an augmenter does not know (``label``, ids, ...) pass through untouched.

What the file teaches
---------------------
1. Augmenting a *batch* in one graph (``tf.function``) instead of one example
   at a time: the same code runs in ``tf.data`` after ``.batch()`` or inside the
   model's ``train_step`` (on the GPU when there is one). ``bench/bench_augment.py``
   measures the three placements.
2. Stateless randomness: every random number comes from
   ``tf.random.stateless_*`` with an explicit ``seed`` (an int tensor of shape
   [2]), so the same batch and seed always give the same result, on every
   run, in any placement. Each example of the batch draws its own decision
   (flip or not, zoom factor, colour shift).
3. Geometry that keeps labels right: a flip, a 90 degree rotation or a
   scale-and-crop moves the pixels, the boxes, the instance masks and the
   semantic mask together; boxes are clipped to the crop, boxes that (mostly)
   leave it are dropped (set back to padding: zero box, class -1, zero mask),
   and kept rows are moved to the front so padding stays at the end.

Papers
------
* AlexNet PCA colour augmentation: Krizhevsky, Sutskever & Hinton, 2012,
  "ImageNet Classification with Deep Convolutional Neural Networks", sec. 4.1.
* VGG scale jittering: Simonyan & Zisserman, 2015, "Very Deep Convolutional
  Networks for Large-Scale Image Recognition", sec. 3.1 (training image size).
* Scale jitter + crop for detection ("zoom in and out"): SSD, Liu et al., 2016,
  sec. 2.2 (data augmentation) and 3.6 ("zoom out").

Keras preprocessing layers: what we use and why
-----------------------------------------------
Keras 3.15 ships box-aware layers (``keras.layers.RandomFlip``,
``RandomZoom``, ``RandomTranslation``, ``RandomCrop``, ...) that accept
``{"images", "bounding_boxes": {"boxes", "labels"}}`` with
``bounding_box_format="rel_yxyx"``, and colour layers (``RandomBrightness``,
``RandomContrast``, ``RandomSaturation``, ``RandomHue``, ``RandomColorJitter``).
We checked their source and do not call them in the augmenters because:

* randomness comes from a ``keras.random.SeedGenerator`` (a variable) or a
  Python int; ``get_random_transformation(seed=...)`` goes through
  ``keras.random.draw_seed``, which rejects a seed *tensor*. So a result
  cannot be a pure function of ``(batch, seed)`` inside ``tf.data`` or a
  ``train_step``, which is what determinism and the tests here need;
* boxes whose area becomes zero get label -1 but keep their coordinates, no
  "drop when less than X % stays visible" rule, kept rows are not compacted;
* there is no per-instance mask tensor [B, M, H, W] that follows the boxes
  (``segmentation_masks`` is one mask per image).

So the pixel maths is written here (it is a few lines each) and the Keras
layers are the *referee*: ``tests/test_augment.py`` checks our flips against
``keras.layers.RandomFlip`` (images and ``rel_yxyx`` boxes) and our colour ops
against ``RandomBrightness``/``RandomContrast``/``RandomSaturation``/
``RandomHue`` applied with the same factors. The colour parameters follow the
Keras meaning (brightness: additive shift, contrast: factor around the
per-channel mean, saturation: factor on HSV saturation, hue: shift as a
fraction of the colour circle).

Scale-and-crop uses one ``tf.image.crop_and_resize`` call for the whole batch
(one crop window per example), which handles zooming in (window inside the
image) and out (window larger than the image, padded with ``fill_value``).
When instance masks are present, a cropped object's box is recomputed as the
tight box of its resampled mask (a clipped box is looser than the visible
part of a triangle cut by the crop); without masks the clipped box is used.
Rotations are quarter turns only (exact for pixels, boxes and masks); a small
angle rotation would need boxes recomputed from masks or loosened from the
rotated corners, and is left out. crop_and_resize has no XLA kernel, so the
composed augmenter runs without ``jit_compile`` (flips and colour ops alone
do compile with XLA).

How to run
----------
``python -m pytest -q tests/test_augment.py`` and
``python bench/bench_augment.py``. Typical use::

    augmenter = make_augmenter("detection", scale_range=(0.8, 1.25))
    train = augment_dataset(batched_dataset, augmenter, seed=0)  # in tf.data
    # or inside the model (identity at inference):
    x = BatchAugmentation("classification", seed=0)(inputs)
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

TASKS = ("classification", "detection", "segmentation")

# Fixed seed slots for the composer, so switching one operation on or off
# does not change the random numbers the others draw.
_SLOTS = {"flip_left_right": 0, "flip_up_down": 1, "rotate90": 2, "scale_crop": 3,
          "vgg_scale": 4, "color": 5, "pca": 6}
_NUM_SLOTS = 8

# The VGG paper trains 224 x 224 crops from images whose shorter side S is in
# [256, 512] (sec. 3.1); relative to the crop that is S / 224 in [1.14, 2.29].
VGG_RELATIVE_SCALE_RANGE = (256.0 / 224.0, 512.0 / 224.0)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def _as_seed(seed) -> tf.Tensor:
    """A stateless seed: int64 tensor of shape [2]. A Python int n means [n, 0]."""
    if isinstance(seed, (int, np.integer)):
        seed = [int(seed), 0]
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"seed must be an int32/int64 tensor of shape [2], got dtype {seed.dtype}")
    if seed.shape.rank is not None and seed.shape.as_list() != [2]:
        raise ValueError(f"seed must have shape [2], got {seed.shape}")
    # One dtype: stateless_split gives different numbers for int32 and int64 seeds.
    return tf.cast(seed, tf.int64)


def _split_seed(seed, num: int) -> tf.Tensor:
    """num independent seeds derived from one, [num, 2]."""
    return tf.random.experimental.stateless_split(_as_seed(seed), num=num)


def _check_batch(batch) -> dict:
    if not isinstance(batch, dict) or "image" not in batch:
        raise ValueError("batch must be a dict with at least an 'image' key "
                         f"of shape [B, H, W, C], got {type(batch).__name__}"
                         + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    out = dict(batch)
    out["image"] = tf.convert_to_tensor(batch["image"])
    if out["image"].shape.rank is not None and out["image"].shape.rank != 4:
        raise ValueError(f"batch['image'] must be [B, H, W, C], got shape {out['image'].shape}")
    if ("boxes" in out) != ("classes" in out):
        raise ValueError("batch needs both 'boxes' [B, M, 4] and 'classes' [B, M] or neither")
    if "boxes" in out:
        out["boxes"] = tf.convert_to_tensor(out["boxes"], tf.float32)
        out["classes"] = tf.convert_to_tensor(out["classes"])
    return out


def _check_probability(probability, name="probability"):
    if not 0.0 <= float(probability) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {probability}")


def _check_range(value, name, low_bound=0.0):
    if value is None:
        return None
    if len(value) != 2 or not low_bound < float(value[0]) <= float(value[1]):
        raise ValueError(f"{name} must be (low, high) with {low_bound} < low <= high, got {value}")
    return (float(value[0]), float(value[1]))


def _select(condition, when_true, when_false):
    """Per-example tf.where: condition [B] broadcast over the other axes."""
    rank = when_true.shape.rank
    condition = tf.reshape(condition, [-1] + [1] * (rank - 1))
    return tf.where(condition, when_true, when_false)


def _valid_rows(batch) -> tf.Tensor:
    return batch["classes"] >= 0  # [B, M]; class -1 marks padding


def _image_size(image):
    shape = tf.shape(image)
    return shape[1], shape[2]


def boxes_from_masks(masks) -> tf.Tensor:
    """Tight normalized yxyx boxes of instance masks; empty masks give zeros.

    Args:
      masks: [B, M, H, W] (any dtype; nonzero = inside).
    Returns:
      float32 [B, M, 4], pixel-edge convention: a mask covering rows r0..r1
      gives ymin = r0 / H, ymax = (r1 + 1) / H (as ``common.synthetic``).
    """
    masks = tf.convert_to_tensor(masks)
    inside = tf.not_equal(masks, 0)
    height = tf.shape(masks)[2]
    width = tf.shape(masks)[3]
    rows = tf.reduce_any(inside, axis=3)  # [B, M, H]
    cols = tf.reduce_any(inside, axis=2)  # [B, M, W]

    def first_last(any_along, size):
        index = tf.range(size)
        big = tf.fill(tf.shape(any_along), size)
        first = tf.reduce_min(tf.where(any_along, index, big), axis=-1)
        last = tf.reduce_max(tf.where(any_along, index, -1), axis=-1)
        return tf.cast(first, tf.float32), tf.cast(last + 1, tf.float32)

    y0, y1 = first_last(rows, height)
    x0, x1 = first_last(cols, width)
    boxes = tf.stack([y0 / tf.cast(height, tf.float32), x0 / tf.cast(width, tf.float32),
                      y1 / tf.cast(height, tf.float32), x1 / tf.cast(width, tf.float32)], axis=-1)
    non_empty = tf.reduce_any(rows, axis=-1)
    return tf.where(non_empty[..., None], boxes, 0.0)


# ---------------------------------------------------------------------------
# Flips and 90 degree rotations (exact: no resampling)
# ---------------------------------------------------------------------------

def _random_flip(batch, seed, probability, horizontal):
    _check_probability(probability)
    out = _check_batch(batch)
    image = out["image"]
    batch_size = tf.shape(image)[0]
    flip = tf.random.stateless_uniform([batch_size], _as_seed(seed)) < probability  # [B]
    # Width is axis 2 of [B, H, W, C], axis 3 of [B, M, H, W], axis 2 of [B, H, W].
    out["image"] = _select(flip, tf.reverse(image, [2 if horizontal else 1]), image)
    if "boxes" in out:
        boxes = out["boxes"]
        ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
        if horizontal:   # x -> 1 - x, so min and max swap
            flipped = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
        else:
            flipped = tf.stack([1.0 - ymax, xmin, 1.0 - ymin, xmax], axis=-1)
        flipped = tf.where(_valid_rows(out)[..., None], flipped, boxes)  # padding stays zeros
        out["boxes"] = _select(flip, flipped, boxes)
    if "masks" in out:
        masks = tf.convert_to_tensor(out["masks"])
        out["masks"] = _select(flip, tf.reverse(masks, [3 if horizontal else 2]), masks)
    if "mask" in out:
        mask = tf.convert_to_tensor(out["mask"])
        out["mask"] = _select(flip, tf.reverse(mask, [2 if horizontal else 1]), mask)
    return out


def random_flip_left_right(batch: dict, seed, probability: float = 0.5) -> dict:
    """Mirror each example left-right with the given probability (own decision per example).

    Boxes [ymin, xmin, ymax, xmax] become [ymin, 1 - xmax, ymax, 1 - xmin];
    masks are mirrored with the image; padded rows are left as they are.
    """
    return _random_flip(batch, seed, probability, horizontal=True)


def random_flip_up_down(batch: dict, seed, probability: float = 0.5) -> dict:
    """Mirror each example top-bottom with the given probability (see random_flip_left_right)."""
    return _random_flip(batch, seed, probability, horizontal=False)


def _rot90_once(x, height_axis, width_axis):
    """Rotate 90 degrees counter-clockwise (as np.rot90): mirror columns, then transpose."""
    x = tf.reverse(x, [width_axis])
    perm = list(range(x.shape.rank))
    perm[height_axis], perm[width_axis] = perm[width_axis], perm[height_axis]
    return tf.transpose(x, perm)


def random_rotate90(batch: dict, seed) -> dict:
    """Rotate each example by k * 90 degrees counter-clockwise, k uniform in {0, 1, 2, 3}.

    Only for square images (a quarter turn of a non-square batch would change
    its shape per example). Exact, no resampling: a point (y, x) goes to
    (1 - x, y) per quarter turn, so a box [y1, x1, y2, x2] becomes
    [1 - x2, y1, 1 - x1, y2] and stays the tight box of its mask.
    """
    out = _check_batch(batch)
    image = out["image"]
    height, width = image.shape[1], image.shape[2]
    if height is not None and width is not None and height != width:
        raise ValueError("random_rotate90 needs square images, got batch['image'] shape "
                         f"{image.shape}")
    batch_size = tf.shape(image)[0]
    turns = tf.random.stateless_uniform([batch_size], _as_seed(seed), minval=0, maxval=4,
                                        dtype=tf.int32)  # [B]

    def rotate_all(x, height_axis, width_axis):
        result, current = x, x
        for k in (1, 2, 3):
            current = _rot90_once(current, height_axis, width_axis)
            result = _select(tf.equal(turns, k), current, result)
        return result

    out["image"] = rotate_all(image, 1, 2)
    if "masks" in out:
        out["masks"] = rotate_all(tf.convert_to_tensor(out["masks"]), 2, 3)
    if "mask" in out:
        out["mask"] = rotate_all(tf.convert_to_tensor(out["mask"]), 1, 2)
    if "boxes" in out:
        boxes = out["boxes"]
        valid = _valid_rows(out)[..., None]
        result, current = boxes, boxes
        for k in (1, 2, 3):
            y1, x1, y2, x2 = tf.unstack(current, axis=-1)
            current = tf.where(valid, tf.stack([1.0 - x2, y1, 1.0 - x1, y2], axis=-1), current)
            result = _select(tf.equal(turns, k), current, result)
        out["boxes"] = result
    return out


# ---------------------------------------------------------------------------
# Crop windows: scale jitter (zoom in and out) and VGG scale jittering
# ---------------------------------------------------------------------------

def _sampling_boxes(windows, size_in, size_out, pad):
    """crop_and_resize coordinates for output pixel centres inside ``windows``.

    Our coordinates are pixel *edges* (0 = left edge of the first pixel, 1 =
    right edge of the last), the convention of the boxes. crop_and_resize maps
    0 and 1 to the *centres* of the first and last pixel. Output pixel i has
    its centre at u = w0 + (i + 0.5) / out * (w1 - w0); in input pixel-centre
    units p = u * size - 0.5, and in the padded image p + pad. Solving
    c0 * (size_padded - 1) = p_0 and the step for c0, c1 gives the lines below.
    Returns (c0, c1) [B] each.
    """
    w0, w1 = windows
    size_in = tf.cast(size_in, tf.float32)
    size_out = tf.cast(size_out, tf.float32)
    last_padded = size_in + 2.0 * pad - 1.0  # index of the last padded pixel
    extent = w1 - w0
    first = w0 * size_in + 0.5 * extent * size_in / size_out - 0.5 + pad
    step_total = extent * size_in * (size_out - 1.0) / size_out
    return first / last_padded, (first + step_total) / last_padded


def crop_and_resize_batch(batch: dict, windows, output_size=None, fill_value: float = 0.5,
                          min_visible: float = 0.3, mask_fill_value: int = 255,
                          mask_boxes: bool = True) -> dict:
    """Resample every example from its own crop window (one crop_and_resize call).

    Args:
      batch: batch dict (image [B, H, W, C]; optional boxes/classes, masks,
        mask).
      windows: float32 [B, 4] normalized [ymin, xmin, ymax, xmax] of the region
        of each input image that becomes the output. A window inside [0, 1]
        zooms in; a window larger than the image zooms out and the area
        outside the image is filled.
      output_size: (height, width) of the output; default the input size.
      fill_value: image value outside the input image (zoom out).
      min_visible: a box is kept when at least this fraction of its
        (transformed) area stays inside the output; otherwise it becomes
        padding (zero box, class -1, zero mask).
      mask_fill_value: semantic ``mask`` value outside the input image
        (255 = ignore, so the loss does not learn the fill colour).
      mask_boxes: when instance ``masks`` are present, replace each
        kept box by the tight box of its resampled mask (and drop objects
        whose mask vanished). Without masks, a clipped box can be looser than
        the visible part of a non-rectangular object.

    Returns:
      A new batch dict. Image: bilinear; masks: nearest neighbour; boxes:
      mapped, clipped to [0, 1], dropped as above, kept rows first.
    """
    out = _check_batch(batch)
    if not 0.0 <= float(min_visible) <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
    image = tf.cast(out["image"], tf.float32)
    batch_size = tf.shape(image)[0]
    height, width = _image_size(image)
    if output_size is None:
        out_height, out_width = height, width
        static_hw = image.shape[1:3]
    else:
        if len(output_size) != 2 or min(int(output_size[0]), int(output_size[1])) < 1:
            raise ValueError("output_size must be (height, width) of positive ints, "
                             f"got {output_size}")
        out_height, out_width = int(output_size[0]), int(output_size[1])
        static_hw = (out_height, out_width)
    windows = tf.convert_to_tensor(windows, tf.float32)  # [B, 4]
    wy0, wx0, wy1, wx1 = tf.unstack(windows, axis=-1)
    box_indices = tf.range(batch_size)
    crop_size = tf.stack([out_height, out_width])

    # One pixel of padding so that output pixels whose centre lies less than
    # half a pixel outside the outermost pixel centres still read the edge
    # pixel instead of the extrapolation value.
    cy0, cy1 = _sampling_boxes((wy0, wy1), height, out_height, pad=1.0)
    cx0, cx1 = _sampling_boxes((wx0, wx1), width, out_width, pad=1.0)
    sampling = tf.stack([cy0, cx0, cy1, cx1], axis=-1)  # [B, 4]

    # Which output pixels have their centre inside the input image: [B, h, w].
    def inside(w0, w1, size_out):
        centres = (tf.range(size_out, dtype=tf.float32) + 0.5) / tf.cast(size_out, tf.float32)
        u = w0[:, None] + centres[None, :] * (w1 - w0)[:, None]
        return (u >= 0.0) & (u <= 1.0)

    inside_image = (inside(wy0, wy1, out_height)[:, :, None]
                    & inside(wx0, wx1, out_width)[:, None, :])

    padded = tf.pad(image, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
    resized = tf.image.crop_and_resize(padded, sampling, box_indices, crop_size,
                                       method="bilinear", extrapolation_value=fill_value)
    resized = tf.where(inside_image[..., None], resized, fill_value)
    out["image"] = tf.ensure_shape(tf.cast(resized, out["image"].dtype),
                                   [None, static_hw[0], static_hw[1], image.shape[3]])

    if "mask" in out:
        mask = tf.convert_to_tensor(out["mask"])
        padded_mask = tf.pad(tf.cast(mask, tf.float32)[..., None], [[0, 0], [1, 1], [1, 1], [0, 0]],
                             constant_values=float(mask_fill_value))
        resized_mask = tf.image.crop_and_resize(padded_mask, sampling, box_indices, crop_size,
                                                method="nearest",
                                                extrapolation_value=float(mask_fill_value))[..., 0]
        resized_mask = tf.where(inside_image, resized_mask, float(mask_fill_value))
        out["mask"] = tf.ensure_shape(tf.cast(tf.round(resized_mask), mask.dtype),
                                      [None, static_hw[0], static_hw[1]])

    if "boxes" in out:
        boxes = out["boxes"]  # [B, M, 4]
        valid = _valid_rows(out)
        origin = tf.stack([wy0, wx0, wy0, wx0], axis=-1)[:, None, :]
        extent = tf.stack([wy1 - wy0, wx1 - wx0, wy1 - wy0, wx1 - wx0], axis=-1)[:, None, :]
        moved = (boxes - origin) / extent  # [B, M, 4] in output coordinates
        clipped = tf.clip_by_value(moved, 0.0, 1.0)

        def area(b):
            return tf.maximum(b[..., 2] - b[..., 0], 0.0) * tf.maximum(b[..., 3] - b[..., 1], 0.0)

        clipped_area = area(clipped)
        keep = valid & (clipped_area > 0.0) & (clipped_area >= min_visible * area(moved))  # [B, M]
        new_boxes = clipped
        if "masks" in out:
            masks = tf.convert_to_tensor(out["masks"])  # [B, M, H, W]
            num_masks = tf.shape(masks)[1]
            channels_last = tf.transpose(tf.cast(masks, tf.float32), [0, 2, 3, 1])  # [B, H, W, M]
            channels_last = tf.pad(channels_last, [[0, 0], [1, 1], [1, 1], [0, 0]])
            resized_masks = tf.image.crop_and_resize(channels_last, sampling, box_indices,
                                                     crop_size, method="nearest",
                                                     extrapolation_value=0.0)
            resized_masks = tf.transpose(resized_masks, [0, 3, 1, 2])  # [B, M, h, w]
            resized_masks = tf.reshape(tf.cast(tf.round(resized_masks), masks.dtype),
                                       [batch_size, num_masks, out_height, out_width])
            if mask_boxes:
                # A cropped shape is usually smaller than its clipped box (a
                # triangle cut by the window), so take the tight box of what
                # is left of the mask; an object whose mask vanished is dropped.
                keep = keep & tf.reduce_any(tf.not_equal(resized_masks, 0), axis=[2, 3])
                new_boxes = boxes_from_masks(resized_masks)
            resized_masks = tf.where(keep[:, :, None, None], resized_masks,
                                     tf.zeros_like(resized_masks))
        new_boxes = tf.where(keep[..., None], new_boxes, 0.0)
        new_classes = tf.where(keep, out["classes"], tf.cast(-1, out["classes"].dtype))
        # Kept rows first, in their original order; padding after.
        order = tf.argsort(tf.cast(keep, tf.int32), axis=1, direction="DESCENDING", stable=True)
        out["boxes"] = tf.gather(new_boxes, order, batch_dims=1)
        out["classes"] = tf.gather(new_classes, order, batch_dims=1)
        if "masks" in out:
            out["masks"] = tf.ensure_shape(tf.gather(resized_masks, order, batch_dims=1),
                                           [None, masks.shape[1], static_hw[0], static_hw[1]])
    elif "masks" in out:
        raise ValueError("batch has 'masks' but no 'boxes'/'classes'; "
                         "instance masks need their boxes")
    return out


def random_scale_crop(batch: dict, seed, scale_range=(0.8, 1.25), aspect_range=(1.0, 1.0),
                      output_size=None, fill_value: float = 0.5, min_visible: float = 0.3,
                      mask_fill_value: int = 255, mask_boxes: bool = True) -> dict:
    """Scale jitter + random crop: zoom in (crop) or out (pad) by a random factor per example.

    A zoom factor s is drawn log-uniformly in ``scale_range`` (log-uniform so
    that 0.8 and 1.25 are equally likely); the crop window has side 1 / s of
    the image (times sqrt(aspect) / 1/sqrt(aspect) for an aspect jitter) and a
    uniform random position: inside the image when s > 1, around it when
    s < 1 (the image lands somewhere in a larger, ``fill_value`` canvas; the
    SSD "zoom out", Liu et al. 2016, sec. 3.6). Boxes follow, are clipped, and
    are dropped when less than ``min_visible`` of their area stays in view.
    See ``crop_and_resize_batch`` for the arguments shared with it.
    """
    scale_range = _check_range(scale_range, "scale_range")
    aspect_range = _check_range(aspect_range, "aspect_range")
    out = _check_batch(batch)
    batch_size = tf.shape(out["image"])[0]
    seeds = _split_seed(seed, 3)
    log_scale = tf.random.stateless_uniform([batch_size], seeds[0], math.log(scale_range[0]),
                                            math.log(scale_range[1]) + 1e-12)
    log_aspect = tf.random.stateless_uniform([batch_size], seeds[1], math.log(aspect_range[0]),
                                             math.log(aspect_range[1]) + 1e-12)
    window_h = tf.exp(-log_scale - 0.5 * log_aspect)  # [B]; aspect = width / height of the window
    window_w = tf.exp(-log_scale + 0.5 * log_aspect)
    position = tf.random.stateless_uniform([batch_size, 2], seeds[2])  # [B, 2] in [0, 1)
    # Same formula for both directions: (1 - side) < 0 when zooming out.
    y0 = position[:, 0] * (1.0 - window_h)
    x0 = position[:, 1] * (1.0 - window_w)
    windows = tf.stack([y0, x0, y0 + window_h, x0 + window_w], axis=-1)  # [B, 4]
    return crop_and_resize_batch(out, windows, output_size, fill_value, min_visible,
                                 mask_fill_value, mask_boxes)


def vgg_scale_jitter(batch: dict, seed, scale_range=(1.0, 1.5), output_size=None,
                     fill_value: float = 0.5, min_visible: float = 0.3,
                     mask_boxes: bool = True) -> dict:
    """VGG multi-scale training (Simonyan & Zisserman, 2015, sec. 3.1), for small images.

    VGG rescales each training image so its shorter side is S, drawn in
    [S_min, S_max] = [256, 512], and takes a random 224 x 224 crop. Here S is
    relative to the crop: S = r * min(crop height, crop width) with r drawn
    uniformly in ``scale_range`` (the paper's values are
    ``VGG_RELATIVE_SCALE_RANGE`` = (1.14, 2.29); the default (1.0, 1.5) keeps
    more of a 32-64 px image). Resize + crop is done as one crop window per
    example, so boxes and masks, if present, follow as in random_scale_crop.

    Args:
      output_size: crop size (height, width); default the input size.
    """
    scale_range = _check_range(scale_range, "scale_range")
    out = _check_batch(batch)
    image = out["image"]
    batch_size = tf.shape(image)[0]
    height, width = _image_size(image)
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    if output_size is None:
        crop_h, crop_w = height_f, width_f
    else:
        crop_h, crop_w = float(output_size[0]), float(output_size[1])
    seeds = _split_seed(seed, 2)
    relative = tf.random.stateless_uniform([batch_size], seeds[0], scale_range[0], scale_range[1])
    shorter_side = relative * tf.minimum(crop_h, crop_w)  # S, in pixels  [B]
    resize_factor = shorter_side / tf.minimum(height_f, width_f)  # [B]
    # The crop covers crop / (size * factor) of the resized image.
    window_h = crop_h / (height_f * resize_factor)
    window_w = crop_w / (width_f * resize_factor)
    position = tf.random.stateless_uniform([batch_size, 2], seeds[1])
    y0 = position[:, 0] * (1.0 - window_h)
    x0 = position[:, 1] * (1.0 - window_w)
    windows = tf.stack([y0, x0, y0 + window_h, x0 + window_w], axis=-1)
    return crop_and_resize_batch(out, windows, output_size, fill_value, min_visible,
                                 mask_boxes=mask_boxes)


# ---------------------------------------------------------------------------
# Colour (pixels only: boxes and masks are untouched)
# ---------------------------------------------------------------------------

def adjust_brightness(images, delta):
    """images + delta per example (delta [B]), clipped to [0, 1] (keras.layers.RandomBrightness)."""
    return tf.clip_by_value(images + tf.reshape(delta, [-1, 1, 1, 1]), 0.0, 1.0)


def adjust_contrast(images, factor):
    """(x - mean) * factor + mean per example and channel, clipped (as keras RandomContrast)."""
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)  # [B, 1, 1, C]
    return tf.clip_by_value((images - mean) * tf.reshape(factor, [-1, 1, 1, 1]) + mean, 0.0, 1.0)


def adjust_saturation_hue(images, saturation_factor=None, hue_delta=None):
    """Scale HSV saturation (clipped to [0, 1]) and shift hue (wrapped), per example.

    saturation_factor [B]: 1 = unchanged, 0 = grey (keras.layers.RandomSaturation
    multiplies S the same way). hue_delta [B]: fraction of the colour circle
    (keras.layers.RandomHue adds it to H the same way).
    """
    hsv = tf.image.rgb_to_hsv(images)
    hue, saturation, value = tf.unstack(hsv, axis=-1)
    if saturation_factor is not None:
        saturation = tf.clip_by_value(
            saturation * tf.reshape(saturation_factor, [-1, 1, 1]), 0.0, 1.0)
    if hue_delta is not None:
        hue = tf.math.floormod(hue + tf.reshape(hue_delta, [-1, 1, 1]), 1.0)
    rgb = tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))
    return tf.clip_by_value(rgb, 0.0, 1.0)


def color_jitter(batch: dict, seed, brightness: float = 0.1, contrast: float = 0.1,
                 saturation: float = 0.1, hue: float = 0.02) -> dict:
    """Random brightness, contrast, saturation and hue, drawn per example.

    Per example: brightness delta ~ U(-brightness, brightness); contrast
    factor ~ U(1 - contrast, 1 + contrast); saturation factor ~
    U(1 - saturation, 1 + saturation); hue shift ~ U(-hue, hue) (fraction of
    the colour circle). Applied in that order (as keras.layers.RandomColorJitter),
    each result clipped to [0, 1]. A value of 0 switches a part off. Boxes and
    masks are unchanged.
    """
    for name, value, high in (("brightness", brightness, 1.0), ("contrast", contrast, 1.0),
                              ("saturation", saturation, 1.0), ("hue", hue, 0.5)):
        if not 0.0 <= float(value) <= high:
            raise ValueError(f"{name} must be in [0, {high}], got {value}")
    out = _check_batch(batch)
    images = tf.cast(out["image"], tf.float32)
    batch_size = tf.shape(images)[0]
    seeds = _split_seed(seed, 4)

    def draw(i, low, high):
        return tf.random.stateless_uniform([batch_size], seeds[i], low, high)

    if brightness:
        images = adjust_brightness(images, draw(0, -brightness, brightness))
    if contrast:
        images = adjust_contrast(images, draw(1, 1.0 - contrast, 1.0 + contrast))
    if saturation or hue:
        images = adjust_saturation_hue(
            images,
            draw(2, 1.0 - saturation, 1.0 + saturation) if saturation else None,
            draw(3, -hue, hue) if hue else None)
    out["image"] = tf.cast(images, out["image"].dtype)
    return out


def rgb_pca(images, max_batches: int | None = None):
    """Eigen decomposition of the RGB covariance of a sample of images.

    The ingredient of AlexNet's PCA colour augmentation (Krizhevsky et al.,
    2012, sec. 4.1), which uses the 3 x 3 covariance of all RGB pixel values.

    Args:
      images: array/tensor [..., 3] (e.g. [N, H, W, 3]), or a tf.data.Dataset
        of such tensors or of dicts with an "image" key (batched or not).
      max_batches: with a dataset, read at most this many elements.

    Returns:
      (eigenvalues [3], eigenvectors [3, 3]) float32 numpy arrays, largest
      eigenvalue first; column i of eigenvectors is the i-th principal
      direction, with the sign chosen so that its largest component is
      positive.
    """
    count = 0.0
    total = np.zeros(3, np.float64)
    outer = np.zeros((3, 3), np.float64)
    if isinstance(images, tf.data.Dataset):
        elements = images.take(max_batches) if max_batches else images
    else:
        elements = [images]
    for element in elements:
        pixels = element["image"] if isinstance(element, dict) else element
        pixels = tf.reshape(tf.cast(pixels, tf.float64), [-1, 3])
        if pixels.shape[0] == 0:
            continue
        count += float(pixels.shape[0])
        total += tf.reduce_sum(pixels, axis=0).numpy()
        outer += tf.matmul(pixels, pixels, transpose_a=True).numpy()
    if count < 2:
        raise ValueError("images must contain at least 2 RGB pixels ([..., 3])")
    mean = total / count
    covariance = (outer - count * np.outer(mean, mean)) / (count - 1.0)
    values, vectors = tf.linalg.eigh(tf.constant(covariance))  # ascending
    values = values.numpy()[::-1]
    vectors = vectors.numpy()[:, ::-1]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(3)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    return values.astype(np.float32), vectors.astype(np.float32)


def pca_color(batch: dict, seed, eigenvalues, eigenvectors, std: float = 0.1) -> dict:
    """AlexNet PCA colour augmentation (Krizhevsky et al., 2012, sec. 4.1).

    To every pixel of an image add sum_i alpha_i * lambda_i * p_i, where p_i,
    lambda_i are the eigenvectors / eigenvalues of the RGB covariance
    (``rgb_pca``) and alpha_i ~ N(0, std) is drawn once per image (paper:
    std = 0.1). Result clipped to [0, 1].

    Scale note: on [0, 1] pixels the eigenvalues are variances (~1e-2), so the
    shift is small; many reimplementations pass the square roots (standard
    deviations along the principal axes) instead: ``eigenvalues=np.sqrt(values)``.

    Args:
      eigenvalues: [3]; eigenvectors: [3, 3], one direction per column.
    """
    if float(std) < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    eigenvalues = tf.convert_to_tensor(eigenvalues, tf.float32)
    eigenvectors = tf.convert_to_tensor(eigenvectors, tf.float32)
    if eigenvalues.shape.as_list() != [3] or eigenvectors.shape.as_list() != [3, 3]:
        raise ValueError("eigenvalues must be [3] and eigenvectors [3, 3], got "
                         f"{eigenvalues.shape} and {eigenvectors.shape}")
    out = _check_batch(batch)
    images = tf.cast(out["image"], tf.float32)
    batch_size = tf.shape(images)[0]
    alpha = tf.random.stateless_normal([batch_size, 3], _as_seed(seed), stddev=std)  # [B, 3]
    # [B, 3]: row b is P (alpha_b * lambda), P = eigenvectors (one per column).
    shift = tf.matmul(alpha * eigenvalues, eigenvectors, transpose_b=True)
    out["image"] = tf.cast(tf.clip_by_value(images + shift[:, None, None, :], 0.0, 1.0),
                           out["image"].dtype)
    return out


# ---------------------------------------------------------------------------
# Composer, tf.data helper and Keras layer
# ---------------------------------------------------------------------------

_DEFAULTS = {
    # task: (flip_left_right, scale_range, vgg_scale_range)
    "classification": (0.5, None, (1.0, 1.5)),
    "detection": (0.5, (0.8, 1.25), None),
    "segmentation": (0.5, (0.8, 1.25), None),
}


class Augmenter:
    """A composed, deterministic batch augmentation: ``augmenter(batch, seed) -> batch``.

    Order: flips, quarter turns, scale jitter (random_scale_crop) or VGG scale
    jitter, colour jitter, PCA colour. Each operation gets its own fixed slot
    of ``tf.random.experimental.stateless_split(seed)``. The call is a
    ``tf.function`` (retraced only for new shapes), usable eagerly, in
    ``tf.data`` after ``.batch()`` (see ``augment_dataset``) and inside a
    model's ``train_step`` (see ``BatchAugmentation``).

    Args:
      task: "classification", "detection" or "segmentation" (instance
        segmentation = "detection" with a ``masks`` key); chooses defaults.
      flip_left_right, flip_up_down: probabilities (0 = off). Default 0.5 / 0.
      rotate90: random quarter turns (square images only).
      scale_range: zoom range for random_scale_crop, or None for off.
        Default (0.8, 1.25) for detection and segmentation, off for
        classification.
      vgg_scale_range: relative shorter-side range for vgg_scale_jitter, or
        None. Default (1.0, 1.5) for classification, off otherwise.
      output_size: (height, width) for the crop operations; default input size.
      min_visible, fill_value, mask_fill_value: see crop_and_resize_batch.
      brightness, contrast, saturation, hue: color_jitter ranges (0 = off).
      pca_eigenvalues, pca_eigenvectors, pca_std: enable pca_color when given.
    """

    def __init__(self, task: str = "classification", *, flip_left_right=None,
                 flip_up_down: float = 0.0, rotate90: bool = False, scale_range="default",
                 vgg_scale_range="default", output_size=None, min_visible: float = 0.3,
                 fill_value: float = 0.5, mask_fill_value: int = 255, brightness: float = 0.1,
                 contrast: float = 0.1, saturation: float = 0.1, hue: float = 0.02,
                 pca_eigenvalues=None, pca_eigenvectors=None, pca_std: float = 0.1):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        default_flip, default_scale, default_vgg = _DEFAULTS[task]
        self.task = task
        self.flip_left_right = default_flip if flip_left_right is None else float(flip_left_right)
        self.flip_up_down = float(flip_up_down)
        _check_probability(self.flip_left_right, "flip_left_right")
        _check_probability(self.flip_up_down, "flip_up_down")
        self.rotate90 = bool(rotate90)
        self.scale_range = _check_range(default_scale if scale_range == "default" else scale_range,
                                        "scale_range")
        self.vgg_scale_range = _check_range(
            default_vgg if vgg_scale_range == "default" else vgg_scale_range, "vgg_scale_range")
        if self.scale_range and self.vgg_scale_range:
            raise ValueError("use either scale_range or vgg_scale_range, not both")
        if output_size is not None and (len(output_size) != 2 or min(output_size) < 1):
            raise ValueError(f"output_size must be None or (height, width), got {output_size}")
        self.output_size = (None if output_size is None
                            else (int(output_size[0]), int(output_size[1])))
        self.min_visible = float(min_visible)
        self.fill_value = float(fill_value)
        self.mask_fill_value = int(mask_fill_value)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)
        if (pca_eigenvalues is None) != (pca_eigenvectors is None):
            raise ValueError("give both pca_eigenvalues and pca_eigenvectors, or neither")
        self.pca_eigenvalues = None if pca_eigenvalues is None else \
            np.asarray(pca_eigenvalues, np.float32).reshape(3)
        self.pca_eigenvectors = None if pca_eigenvectors is None else \
            np.asarray(pca_eigenvectors, np.float32).reshape(3, 3)
        self.pca_std = float(pca_std)
        self._function = tf.function(self._augment, reduce_retracing=True)

    def get_config(self) -> dict:
        return {
            "task": self.task, "flip_left_right": self.flip_left_right,
            "flip_up_down": self.flip_up_down, "rotate90": self.rotate90,
            "scale_range": None if self.scale_range is None else list(self.scale_range),
            "vgg_scale_range": None if self.vgg_scale_range is None else list(self.vgg_scale_range),
            "output_size": None if self.output_size is None else list(self.output_size),
            "min_visible": self.min_visible, "fill_value": self.fill_value,
            "mask_fill_value": self.mask_fill_value, "brightness": self.brightness,
            "contrast": self.contrast, "saturation": self.saturation, "hue": self.hue,
            "pca_eigenvalues": (None if self.pca_eigenvalues is None
                                else self.pca_eigenvalues.tolist()),
            "pca_eigenvectors": (None if self.pca_eigenvectors is None
                                 else self.pca_eigenvectors.tolist()),
            "pca_std": self.pca_std,
        }

    def _augment(self, batch, seed):
        seeds = _split_seed(seed, _NUM_SLOTS)
        if self.flip_left_right > 0:
            batch = random_flip_left_right(batch, seeds[_SLOTS["flip_left_right"]],
                                           self.flip_left_right)
        if self.flip_up_down > 0:
            batch = random_flip_up_down(batch, seeds[_SLOTS["flip_up_down"]], self.flip_up_down)
        if self.rotate90:
            batch = random_rotate90(batch, seeds[_SLOTS["rotate90"]])
        if self.scale_range is not None:
            batch = random_scale_crop(batch, seeds[_SLOTS["scale_crop"]], self.scale_range,
                                      output_size=self.output_size, fill_value=self.fill_value,
                                      min_visible=self.min_visible,
                                      mask_fill_value=self.mask_fill_value)
        elif self.vgg_scale_range is not None:
            batch = vgg_scale_jitter(batch, seeds[_SLOTS["vgg_scale"]], self.vgg_scale_range,
                                     output_size=self.output_size, fill_value=self.fill_value,
                                     min_visible=self.min_visible)
        if self.brightness or self.contrast or self.saturation or self.hue:
            batch = color_jitter(batch, seeds[_SLOTS["color"]], self.brightness, self.contrast,
                                 self.saturation, self.hue)
        if self.pca_eigenvalues is not None:
            batch = pca_color(batch, seeds[_SLOTS["pca"]], self.pca_eigenvalues,
                              self.pca_eigenvectors, self.pca_std)
        return batch

    def __call__(self, batch: dict, seed) -> dict:
        batch = _check_batch(batch)
        return self._function(batch, _as_seed(seed))

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "task")
        return f"Augmenter({self.task!r}, {options})"


def make_augmenter(task: str, **options) -> Augmenter:
    """``Augmenter(task, **options)``: a callable ``augment(batch, seed) -> batch``."""
    return Augmenter(task, **options)


def augment_dataset(dataset: tf.data.Dataset, augmenter, seed: int = 0,
                    num_parallel_calls=tf.data.AUTOTUNE) -> tf.data.Dataset:
    """Apply ``augmenter`` to a *batched* dataset of dicts, batch i with seed [seed, i].

    The seed depends only on the batch position, so the augmented stream is
    the same on every run (``deterministic=True`` keeps the order too).
    """
    base = tf.constant(int(seed), tf.int64)
    return dataset.enumerate().map(
        lambda index, batch: augmenter(batch, tf.stack([base, index])),
        num_parallel_calls=num_parallel_calls, deterministic=True)


@keras.saving.register_keras_serializable(package="common")
class BatchAugmentation(keras.layers.Layer):
    """Batched augmentation as the first layer of a model (training only).

    Runs an ``Augmenter`` inside the model, so the augmentation is part of
    the compiled train step and runs on the model's device; at inference
    (``training`` false or None) it is the identity. Each training call draws
    a fresh stateless seed from a ``keras.random.SeedGenerator(seed)``, so
    a run is repeatable after ``keras.utils.set_random_seed``.

    Input: an image tensor [B, H, W, C] (geometric ops then move only the
    pixels: right for classification, wrong for segmentation targets), or a
    batch dict (image, boxes, classes, masks, mask) for a custom
    ``train_step`` that augments images and targets together.
    Output: same structure and shape. ``output_size`` is not allowed here,
    because inference must see the same size as training.

    Papers: see the module docstring (AlexNet 2012 sec. 4.1; VGG 2015 sec. 3.1;
    SSD 2016 sec. 2.2).
    """

    def __init__(self, task: str = "classification", seed=None, **augment_options):
        super().__init__(**{k: augment_options.pop(k) for k in ("name", "dtype", "trainable")
                            if k in augment_options})
        if augment_options.get("output_size") is not None:
            raise ValueError("output_size must be None in BatchAugmentation (inference is the "
                             "identity, so training must keep the input size)")
        self.task = task
        self.seed = seed
        self.augmenter = Augmenter(task, **augment_options)
        self.seed_generator = keras.random.SeedGenerator(seed)
        # crop_and_resize has no XLA kernel, so keep fit()'s train step un-jitted.
        self.supports_jit = False

    def call(self, inputs, training=None):
        if not training:
            return inputs
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        if isinstance(inputs, dict):
            return self.augmenter(dict(inputs), seed)
        return self.augmenter({"image": inputs}, seed)["image"]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        options = self.augmenter.get_config()
        options.pop("task")
        config.update({"task": self.task, "seed": self.seed, **options})
        return config
