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
   measures the three placements and the cost of each augmenter.
2. Stateless randomness: every random number comes from
   ``tf.random.stateless_*`` with an explicit ``seed`` (an int tensor of shape
   [2]), so the same batch and seed always give the same result, on every
   run, in any placement. Each example of the batch draws its own decision
   (flip or not, zoom factor, colour shift).
3. Geometry that keeps labels right: a flip, a 90 degree rotation, a
   scale-and-crop, a rotation by any angle, a shear or an elastic warp moves
   the pixels, the boxes, the instance masks and the semantic mask together;
   boxes are clipped to the image, boxes that (mostly) leave it are dropped
   (set back to padding: zero box, class -1, zero mask), and kept rows are
   moved to the front so padding stays at the end.

Papers
------
* AlexNet PCA colour augmentation: Krizhevsky, Sutskever & Hinton, 2012,
  "ImageNet Classification with Deep Convolutional Neural Networks", sec. 4.1.
* VGG scale jittering: Simonyan & Zisserman, 2015, "Very Deep Convolutional
  Networks for Large-Scale Image Recognition", sec. 3.1 (training image size).
* Scale jitter + crop for detection ("zoom in and out"): SSD, Liu et al., 2016,
  sec. 2.2 (data augmentation) and 3.6 ("zoom out").
* Elastic distortion (local warping by a smoothed random displacement field),
  with rotations and shears as the affine distortions beside it: Simard,
  Steinkraus & Platt, 2003, "Best Practices for Convolutional Neural Networks
  Applied to Visual Document Analysis", ICDAR, sec. 2.

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
Quarter turns are exact (no resampling). Rotation by any angle, shear and
elastic warping resample the pixels through an inverse map with a sampler
written here (``resample``: bilinear for images, nearest neighbour for
masks); their boxes are recomputed as the extent of each transformed
instance mask when masks are present (tight), else as the extent of the
transformed corners (looser; see ``rotate_batch``), and objects that leave
the image are dropped. crop_and_resize has no XLA kernel, so the composed
augmenter with scale jitter runs without ``jit_compile`` (flips, colour ops
and the warps alone do compile with XLA).

How to run
----------
``python -m pytest -q tests/test_augment.py tests/test_augment_geometric.py``
and ``python bench/bench_augment.py``. Typical use::

    augmenter = make_augmenter("detection", scale_range=(0.8, 1.25))
    train = augment_dataset(batched_dataset, augmenter, seed=0)  # in tf.data
    # or inside the model (identity at inference):
    x = BatchAugmentation("classification", seed=0)(inputs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

TASKS = ("classification", "detection", "segmentation")

# Fixed seed slots for the composer, so switching one operation on or off
# does not change the random numbers the others draw.
_SLOTS = {"flip_left_right": 0, "flip_up_down": 1, "rotate90": 2, "scale_crop": 3,
          "vgg_scale": 4, "color": 5, "pca": 6, "warp": 7}
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
# Rotation by any angle, shear and elastic warping (resampling by an inverse map)
# ---------------------------------------------------------------------------
#
# All three are warps: output pixel p takes its value from input position
# T^-1(p). One sampler (``resample``) reads the input there, bilinearly for
# the image and by nearest neighbour for the semantic and instance masks.
# We write it (a few gathers) rather than call
# tf.raw_ops.ImageProjectiveTransformV3 (what keras.layers.RandomRotation
# uses) because: the elastic warp needs a dense sampler anyway, so one sampler
# with one pixel convention serves all three; gathers compile with XLA, and
# ImageProjectiveTransformV3 has no XLA kernel; and the masks [B, M, H, W]
# ride along as M extra channels. tests/test_augment_geometric.py checks the
# sampler against ImageProjectiveTransformV3 on the same rotation.
#
# Under ``jit_compile=True`` XLA draws other numbers than TF's kernels from the
# same stateless seed, so a compiled random warp is repeatable but differs from
# the uncompiled one; given their parameters (rotate_batch, shear_batch,
# elastic_warp_batch) both agree.
#
# Coordinates are pixel *edges* in pixel units, as for the boxes: pixel (i, j)
# covers [i, i + 1] x [j, j + 1] and its centre is (i + 0.5, j + 0.5); the
# affine maps act about the image centre (H / 2, W / 2) in pixels, so a
# rotation of a non-square image is a true rotation (not one in normalized
# coordinates, which would shear it).

# The Gaussian that smooths the elastic field is cut at this many sigmas.
_GAUSSIAN_RADIUS_IN_SIGMAS = 3.0
# Outline points per box edge for the loose box of a non-affine warp (the
# affine warps use the four corners, which is exact for them).
_OUTLINE_POINTS_PER_EDGE = 17
# Fixed-point steps that invert the elastic map for the box outlines (on 64 px
# shapes with Simard's field, 3 left up to 0.9 px of error, 8 about 0.2 px), and for the
# visible fraction of the objects, where every pixel is mapped and a border
# pixel more or less does not matter (the first step reads the field on the
# grid, without interpolation).
_ELASTIC_INVERSE_STEPS = 8
_ELASTIC_VISIBILITY_STEPS = 2


def _per_example(value, rank):
    """[B] -> [B, 1, ..., 1] of the given rank, to broadcast one number per example."""
    return tf.reshape(value, [-1] + [1] * (rank - 1))


def _pixel_centres(height, width):
    """Pixel-centre coordinates (edge units) of an H x W grid: two float32 [H, W]."""
    rows = tf.range(height, dtype=tf.float32) + 0.5
    cols = tf.range(width, dtype=tf.float32) + 0.5
    return tf.meshgrid(rows, cols, indexing="ij")


def resample(images, ys, xs, method: str = "bilinear", fill_value=0.0) -> tf.Tensor:
    """Read each image at arbitrary positions: the inverse-map sampler of the warps.

    Args:
      images: [B, H, W, C]. Any dtype for "nearest" (masks keep theirs);
        "bilinear" computes in float32 and returns float32.
      ys, xs: float32 [B, h, w]: where output pixel (b, i, j) reads image b,
        in pixel-edge units (0 = top/left edge, H or W = bottom/right edge;
        the centre of pixel (r, c) is (r + 0.5, c + 0.5)).
      method: "bilinear" (weights of the four nearest pixel centres) or
        "nearest" (the pixel that contains the position).
      fill_value: value of outputs whose position lies outside the image
        [0, H] x [0, W]. A position less than half a pixel inside the border
        reads the edge pixel (as crop_and_resize_batch). None: no fill, the
        edge pixels extend forever (used to read a displacement field).

    Returns:
      [B, h, w, C]. A position at an exact pixel centre returns that pixel
      exactly, with both methods (so an identity warp is exact).
    """
    if method not in ("bilinear", "nearest"):
        raise ValueError(f"method must be 'bilinear' or 'nearest', got {method!r}")
    images = tf.convert_to_tensor(images)
    if method == "bilinear":
        images = tf.cast(images, tf.float32)
    ys = tf.convert_to_tensor(ys, tf.float32)
    xs = tf.convert_to_tensor(xs, tf.float32)
    shape = tf.shape(images)
    batch_size, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    out_shape = tf.shape(ys)  # [B, h, w]
    flat = tf.reshape(images, [batch_size, height * width, channels])
    last_row = tf.cast(height, tf.float32) - 1.0
    last_col = tf.cast(width, tf.float32) - 1.0

    def gather(rows, cols):
        """Pixels at integer-valued float rows, cols [B, h, w] (clamped to the image)."""
        rows = tf.cast(tf.clip_by_value(rows, 0.0, last_row), tf.int32)
        cols = tf.cast(tf.clip_by_value(cols, 0.0, last_col), tf.int32)
        index = tf.reshape(rows * width + cols, [batch_size, out_shape[1] * out_shape[2]])
        values = tf.gather(flat, index, batch_dims=1)  # [B, h * w, C]
        return tf.reshape(values, [batch_size, out_shape[1], out_shape[2], channels])

    if method == "nearest":
        values = gather(tf.floor(ys), tf.floor(xs))
    else:
        # In pixel-centre units the four neighbours are floor() and floor() + 1.
        rows, cols = ys - 0.5, xs - 0.5
        row0, col0 = tf.floor(rows), tf.floor(cols)
        fy, fx = (rows - row0)[..., None], (cols - col0)[..., None]  # [B, h, w, 1]
        values = ((1.0 - fy) * (1.0 - fx) * gather(row0, col0)
                  + (1.0 - fy) * fx * gather(row0, col0 + 1.0)
                  + fy * (1.0 - fx) * gather(row0 + 1.0, col0)
                  + fy * fx * gather(row0 + 1.0, col0 + 1.0))
    values = tf.ensure_shape(values, ys.shape.concatenate(images.shape[-1:]))
    if fill_value is None:
        return values
    inside = ((ys >= 0.0) & (ys <= last_row + 1.0) & (xs >= 0.0) & (xs <= last_col + 1.0))
    return tf.where(inside[..., None], values, tf.cast(fill_value, values.dtype))


def _box_outline(boxes, height, width, points_per_edge):
    """Points on the outline of each box, in pixel units: (ys, xs) [B, M, 4 * P]."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes * tf.stack([height, width, height, width]), axis=-1)
    t = tf.linspace(0.0, 1.0, points_per_edge)  # [P]; 0 and 1 are the corners
    along_y = ymin[..., None] + t * (ymax - ymin)[..., None]  # [B, M, P]
    along_x = xmin[..., None] + t * (xmax - xmin)[..., None]
    ones = tf.ones_like(along_y)
    ys = tf.concat([ymin[..., None] * ones, ymax[..., None] * ones, along_y, along_y], axis=-1)
    xs = tf.concat([along_x, along_x, xmin[..., None] * ones, xmax[..., None] * ones], axis=-1)
    return ys, xs


def _box_area(boxes):
    return (tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
            * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def _warp(batch, source_y, source_x, forward, forward_grid, points_per_edge, min_visible,
          fill_value, mask_fill_value, mask_boxes):
    """Apply a warp given by its inverse map (source_y/x) and forward map (``forward``).

    Args:
      batch: a checked batch dict.
      source_y, source_x: float32 [B, H, W]: input position read by each
        output pixel centre (pixel-edge units).
      forward: (ys, xs) [B, N] input positions -> output positions [B, N].
      forward_grid: () -> where the input pixel centres go, (ys, xs) [B, H, W].
      points_per_edge: outline points per box edge for the loose boxes (2 =
        the corners, exact for affine maps).
    """
    if not 0.0 <= float(min_visible) <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
    out = batch
    image = out["image"]
    batch_size = tf.shape(image)[0]
    height, width = _image_size(image)
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    warped = resample(image, source_y, source_x, "bilinear", fill_value)
    out["image"] = tf.ensure_shape(tf.cast(warped, image.dtype), image.shape)
    if "mask" in out:
        mask = tf.convert_to_tensor(out["mask"])
        warped_mask = resample(mask[..., None], source_y, source_x, "nearest", mask_fill_value)
        out["mask"] = tf.ensure_shape(warped_mask[..., 0], mask.shape)
    if "boxes" not in out:
        if "masks" in out:
            raise ValueError("batch has 'masks' but no 'boxes'/'classes'; "
                             "instance masks need their boxes")
        return out

    boxes = out["boxes"]  # [B, M, 4]
    num_boxes = tf.shape(boxes)[1]
    valid = _valid_rows(out)

    def inside_frame(ys, xs):
        return (ys >= 0.0) & (ys <= height_f) & (xs >= 0.0) & (xs <= width_f)

    # Loose boxes: the extent of each box's transformed outline, clipped; kept
    # when at least min_visible of that extent stays in the image (the rule of
    # crop_and_resize_batch).
    outline_y, outline_x = _box_outline(boxes, height_f, width_f, points_per_edge)
    flat_shape = [batch_size, num_boxes * 4 * points_per_edge]
    moved_y, moved_x = forward(tf.reshape(outline_y, flat_shape), tf.reshape(outline_x, flat_shape))
    moved_y = tf.reshape(moved_y, tf.shape(outline_y))  # [B, M, 4P]
    moved_x = tf.reshape(moved_x, tf.shape(outline_x))
    loose = tf.stack([tf.reduce_min(moved_y, -1) / height_f, tf.reduce_min(moved_x, -1) / width_f,
                      tf.reduce_max(moved_y, -1) / height_f, tf.reduce_max(moved_x, -1) / width_f],
                     axis=-1)  # [B, M, 4]
    clipped = tf.clip_by_value(loose, 0.0, 1.0)
    clipped_area = _box_area(clipped)
    keep = valid & (clipped_area > 0.0) & (clipped_area >= min_visible * _box_area(loose))
    new_boxes = clipped

    if "masks" in out:
        masks = tf.convert_to_tensor(out["masks"])  # [B, M, H, W]
        warped_masks = resample(tf.transpose(masks, [0, 2, 3, 1]), source_y, source_x, "nearest", 0)
        warped_masks = tf.transpose(warped_masks, [0, 3, 1, 2])  # [B, M, H, W]
        if mask_boxes:
            # Tight boxes: the extent of each transformed mask. Visible
            # fraction: the share of the object's pixels whose centre the
            # forward map sends inside the output image.
            lands_inside = tf.cast(inside_frame(*forward_grid()), tf.float32)  # [B, H, W]
            on_object = tf.cast(tf.not_equal(masks, 0), tf.float32)  # [B, M, H, W]
            object_pixels = tf.reduce_sum(on_object, axis=[2, 3])  # [B, M]
            visible_pixels = tf.einsum("bmhw,bhw->bm", on_object, lands_inside)
            keep = (valid & (object_pixels > 0.0)
                    & (visible_pixels >= min_visible * object_pixels)
                    & tf.reduce_any(tf.not_equal(warped_masks, 0), axis=[2, 3]))
            new_boxes = boxes_from_masks(warped_masks)
        warped_masks = tf.where(keep[:, :, None, None], warped_masks, tf.zeros_like(warped_masks))

    new_boxes = tf.where(keep[..., None], new_boxes, 0.0)
    new_classes = tf.where(keep, out["classes"], tf.cast(-1, out["classes"].dtype))
    # Kept rows first, in their original order; padding after.
    order = tf.argsort(tf.cast(keep, tf.int32), axis=1, direction="DESCENDING", stable=True)
    out["boxes"] = tf.gather(new_boxes, order, batch_dims=1)
    out["classes"] = tf.gather(new_classes, order, batch_dims=1)
    if "masks" in out:
        out["masks"] = tf.ensure_shape(tf.gather(warped_masks, order, batch_dims=1), masks.shape)
    return out


def _affine_warp(batch, forward_matrix, inverse_matrix, min_visible, fill_value, mask_fill_value,
                 mask_boxes):
    """Warp by linear maps about the image centre, given with their inverses ([B, 2, 2] each)."""
    out = _check_batch(batch)
    height, width = _image_size(out["image"])
    centre_y = tf.cast(height, tf.float32) / 2.0
    centre_x = tf.cast(width, tf.float32) / 2.0

    def apply(matrix, ys, xs):
        """matrix [B, 2, 2] acting on (y, x) about the centre; ys, xs [B or 1, ...]."""
        rank = max(ys.shape.rank, 2)
        m00, m01 = _per_example(matrix[:, 0, 0], rank), _per_example(matrix[:, 0, 1], rank)
        m10, m11 = _per_example(matrix[:, 1, 0], rank), _per_example(matrix[:, 1, 1], rank)
        dy, dx = ys - centre_y, xs - centre_x
        return m00 * dy + m01 * dx + centre_y, m10 * dy + m11 * dx + centre_x

    grid_y, grid_x = _pixel_centres(height, width)
    source_y, source_x = apply(inverse_matrix, grid_y[None], grid_x[None])  # [B, H, W]
    return _warp(out, source_y, source_x, lambda ys, xs: apply(forward_matrix, ys, xs),
                 lambda: apply(forward_matrix, grid_y[None], grid_x[None]),
                 points_per_edge=2, min_visible=min_visible, fill_value=fill_value,
                 mask_fill_value=mask_fill_value, mask_boxes=mask_boxes)


def _per_example_values(values, batch_size, name):
    """A scalar or [B] -> float32 [B]."""
    values = tf.convert_to_tensor(values, tf.float32)
    if values.shape.rank not in (None, 0, 1):
        raise ValueError(f"{name} must be a number or a [B] vector, got shape {values.shape}")
    return tf.broadcast_to(values, [batch_size])


def affine_batch(batch: dict, matrices, min_visible: float = 0.3, fill_value: float = 0.5,
                 mask_fill_value: int = 255, mask_boxes: bool = True) -> dict:
    """Apply one 2 x 2 linear map per example, about the image centre, in pixel units.

    A point (y, x) (pixels, measured from the image centre) goes to
    ``matrices[b] @ (y, x)``. The matrices must be invertible (the inverse,
    which the sampler needs, is computed in closed form).

    Args:
      matrices: float32 [B, 2, 2] acting on (y, x) column vectors.
      min_visible, fill_value, mask_fill_value, mask_boxes: as in
        ``rotate_batch``.
    """
    out = _check_batch(batch)
    matrices = tf.convert_to_tensor(matrices, tf.float32)
    if matrices.shape.rank is not None and (matrices.shape.rank != 3
                                            or matrices.shape[1:].as_list() != [2, 2]):
        raise ValueError(f"matrices must be [B, 2, 2], got shape {matrices.shape}")
    a, b = matrices[:, 0, 0], matrices[:, 0, 1]
    c, d = matrices[:, 1, 0], matrices[:, 1, 1]
    determinant = a * d - b * c
    inverse = tf.stack([tf.stack([d, -b], -1), tf.stack([-c, a], -1)], axis=1) \
        / determinant[:, None, None]
    return _affine_warp(out, matrices, inverse, min_visible, fill_value, mask_fill_value,
                        mask_boxes)


def _matrices(a, b, c, d):
    """[B, 2, 2] matrices [[a, b], [c, d]] from four [B] tensors."""
    return tf.stack([tf.stack([a, b], -1), tf.stack([c, d], -1)], axis=1)


def _rotation_matrices(degrees):
    """(forward, inverse) [B, 2, 2] of counter-clockwise rotations by degrees [B], on (y, x)."""
    radians = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    # Forward: (dy, dx) -> (cos dy - sin dx, sin dy + cos dx); the inverse is the transpose.
    return _matrices(cos, -sin, sin, cos), _matrices(cos, sin, -sin, cos)


def _shear_matrices(x_shear, y_shear):
    """(forward, inverse) [B, 2, 2]: horizontal shear x_shear [B], then vertical y_shear [B]."""
    one, zero = tf.ones_like(x_shear), tf.zeros_like(x_shear)
    forward = tf.matmul(_matrices(one, y_shear, zero, one), _matrices(one, zero, x_shear, one))
    inverse = tf.matmul(_matrices(one, zero, -x_shear, one), _matrices(one, -y_shear, zero, one))
    return forward, inverse


def rotate_batch(batch: dict, degrees, min_visible: float = 0.3, fill_value: float = 0.5,
                 mask_fill_value: int = 255, mask_boxes: bool = True) -> dict:
    """Rotate each example counter-clockwise by its own angle, about the image centre.

    90 degrees is ``random_rotate90``'s quarter turn (a point (y, x) goes to
    (1 - x, y) in normalized coordinates of a square image); any other angle
    resamples: the image bilinearly, ``mask`` and ``masks`` by nearest
    neighbour. Corners that come from outside the input get ``fill_value``
    (image) and ``mask_fill_value`` (semantic mask; 255 = ignore).

    Boxes:

    * with instance ``masks`` and ``mask_boxes=True``: each box is the extent
      of its transformed mask (tight). An object is dropped (set to padding:
      zero box, class -1, zero mask) when its mask leaves the image or less
      than ``min_visible`` of its pixels land inside the output;
    * otherwise: the extent of the box's four transformed corners, clipped to
      the image. This is *looser* than the object: a rotated box encloses
      the rotated rectangle, not the rotated shape (a disc's box grows by up
      to 41 % in side at 45 degrees). Kept when at least ``min_visible`` of
      that extent stays in the image. Kalra et al., 2021, "Towards Rotation
      Invariance in Object Detection" (ICCV) measure how much this loose
      box costs a detector.

    Kept rows move to the front; padded rows (class -1) stay padding.

    Args:
      degrees: a number or float32 [B]; positive = counter-clockwise as
        displayed (y pointing down).
    """
    out = _check_batch(batch)
    forward, inverse = _rotation_matrices(
        _per_example_values(degrees, tf.shape(out["image"])[0], "degrees"))
    return _affine_warp(out, forward, inverse, min_visible, fill_value, mask_fill_value,
                        mask_boxes)


def random_rotate(batch: dict, seed, max_degrees: float = 15.0, min_visible: float = 0.3,
                  fill_value: float = 0.5, mask_fill_value: int = 255,
                  mask_boxes: bool = True) -> dict:
    """Rotate each example by an angle drawn uniformly in [-max_degrees, max_degrees].

    Small rotations and shears are the affine distortions that Simard et al.,
    2003 (sec. 2) use beside the elastic one. See ``rotate_batch`` for the
    pixels, masks, tight and loose boxes and the other arguments.
    """
    if not 0.0 <= float(max_degrees) <= 180.0:
        raise ValueError(f"max_degrees must be in [0, 180], got {max_degrees}")
    out = _check_batch(batch)
    degrees = tf.random.stateless_uniform([tf.shape(out["image"])[0]], _as_seed(seed),
                                          -float(max_degrees), float(max_degrees))
    return rotate_batch(out, degrees, min_visible, fill_value, mask_fill_value, mask_boxes)


def shear_batch(batch: dict, x_shear, y_shear=0.0, min_visible: float = 0.3,
                fill_value: float = 0.5, mask_fill_value: int = 255,
                mask_boxes: bool = True) -> dict:
    """Shear each example about the image centre, horizontally then vertically.

    A horizontal shear k_x slides row y sideways by k_x * y (y measured down
    from the centre, in pixels): x -> x + k_x * y. A vertical shear k_y
    slides column x by k_y * x: y -> y + k_y * x. k = tan(shear angle), so
    0.2 is about 11 degrees. Both keep areas (determinant 1). Shear 0 is
    the exact identity.

    Boxes, masks, dropping and padding: as ``rotate_batch`` (loose boxes
    are the extent of the four sheared corners).

    Args:
      x_shear, y_shear: numbers or float32 [B] (one per example), in (-1, 1)
        for sensible results.
    """
    out = _check_batch(batch)
    batch_size = tf.shape(out["image"])[0]
    forward, inverse = _shear_matrices(_per_example_values(x_shear, batch_size, "x_shear"),
                                       _per_example_values(y_shear, batch_size, "y_shear"))
    return _affine_warp(out, forward, inverse, min_visible, fill_value, mask_fill_value,
                        mask_boxes)


def random_shear(batch: dict, seed, max_x_shear: float = 0.2, max_y_shear: float = 0.2,
                 min_visible: float = 0.3, fill_value: float = 0.5, mask_fill_value: int = 255,
                 mask_boxes: bool = True) -> dict:
    """Shear each example by k_x ~ U(-max_x_shear, max_x_shear), k_y ~ U(-max_y_shear, max_y_shear).

    See ``shear_batch`` (k = tan of the shear angle; 0 switches a direction
    off) and ``rotate_batch`` for boxes and masks.
    """
    for name, value in (("max_x_shear", max_x_shear), ("max_y_shear", max_y_shear)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    out = _check_batch(batch)
    batch_size = tf.shape(out["image"])[0]
    seeds = _split_seed(seed, 2)
    kx = tf.random.stateless_uniform([batch_size], seeds[0], -float(max_x_shear),
                                     float(max_x_shear))
    ky = tf.random.stateless_uniform([batch_size], seeds[1], -float(max_y_shear),
                                     float(max_y_shear))
    return shear_batch(out, kx, ky, min_visible, fill_value, mask_fill_value, mask_boxes)


def random_affine(batch: dict, seed, max_degrees: float = 15.0, max_x_shear: float = 0.1,
                  max_y_shear: float = 0.1, min_visible: float = 0.3, fill_value: float = 0.5,
                  mask_fill_value: int = 255, mask_boxes: bool = True) -> dict:
    """A random rotation followed by a random shear, resampled once.

    Draws what ``random_rotate`` and ``random_shear`` draw (angle ~
    U(-max_degrees, max_degrees), k_x, k_y ~ U(-max, max), per example) and
    applies the product of the two maps in one pass: one interpolation
    instead of two (less blur) for the price of one. ``Augmenter`` uses it
    when rotation or shear is on. Boxes and masks: as ``rotate_batch``.
    """
    if not 0.0 <= float(max_degrees) <= 180.0:
        raise ValueError(f"max_degrees must be in [0, 180], got {max_degrees}")
    for name, value in (("max_x_shear", max_x_shear), ("max_y_shear", max_y_shear)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    out = _check_batch(batch)
    batch_size = tf.shape(out["image"])[0]
    seeds = _split_seed(seed, 3)

    def draw(index, limit):
        return tf.random.stateless_uniform([batch_size], seeds[index], -float(limit), float(limit))

    rotation, unrotation = _rotation_matrices(draw(0, max_degrees))
    shear, unshear = _shear_matrices(draw(1, max_x_shear), draw(2, max_y_shear))
    # Rotate first, then shear: forward S R, inverse R^-1 S^-1.
    return _affine_warp(out, tf.matmul(shear, rotation), tf.matmul(unrotation, unshear),
                        min_visible, fill_value, mask_fill_value, mask_boxes)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalized 1-D Gaussian of standard deviation sigma (pixels), cut at 3 sigma."""
    radius = max(1, int(math.ceil(_GAUSSIAN_RADIUS_IN_SIGMAS * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def elastic_displacement(seed, batch_size, height, width, alpha: float = 34.0,
                         sigma: float = 4.0) -> tf.Tensor:
    """Random smooth displacement fields (Simard, Steinkraus & Platt, 2003, sec. 2).

    "Elastic distortion": draw dy and dx independently uniform in [-1, 1] at
    every pixel, convolve each with a Gaussian of standard deviation ``sigma``
    (pixels), multiply by ``alpha``. A large sigma gives an almost rigid
    shift (the values average out), a small one a random jitter; the paper
    found sigma = 4, alpha = 34 best on 28 x 28 digits, where the result
    moves pixels by about 1.4 px (standard deviation). Zero padding at the
    borders (as scipy.ndimage.gaussian_filter(mode="constant"), the usual
    reimplementation) damps the field near the edges.

    Returns:
      float32 [B, H, W, 2]: (dy, dx) in pixels, read by ``elastic_warp_batch``.
    """
    if float(sigma) <= 0 or float(alpha) < 0:
        raise ValueError(f"sigma must be > 0 and alpha >= 0, got sigma={sigma}, alpha={alpha}")
    uniform = tf.random.stateless_uniform(tf.stack([batch_size, height, width, 2]),
                                          _as_seed(seed), -1.0, 1.0)
    kernel = tf.constant(_gaussian_kernel(float(sigma)))
    radius = (int(kernel.shape[0]) - 1) // 2

    def band(size):
        """[size, size]: row i holds the kernel centred on i (zero padding = cut-off rows)."""
        offset = tf.range(size)[:, None] - tf.range(size)[None, :] + radius
        inside = (offset >= 0) & (offset <= 2 * radius)
        return tf.where(inside, tf.gather(kernel, tf.clip_by_value(offset, 0, 2 * radius)), 0.0)

    # Separable blur as two matrix products (rows, then columns): as fast as a
    # depthwise convolution on a CPU, and 50x faster under XLA, whose CPU
    # depthwise convolution with a 25-tap kernel is slow.
    smooth = tf.einsum("ij,bjkc,lk->bilc", band(height), uniform, band(width))
    return float(alpha) * smooth


def elastic_warp_batch(batch: dict, displacement, min_visible: float = 0.3,
                       fill_value: float = 0.5, mask_fill_value: int = 255,
                       mask_boxes: bool = True) -> dict:
    """Local (elastic) warping by a displacement field: output(p) = input(p + d(p)).

    Simard, Steinkraus & Platt, 2003, "Best Practices for Convolutional
    Neural Networks Applied to Visual Document Analysis" (ICDAR), sec. 2:
    every output pixel reads the input at its own displaced position,
    bilinearly (the image) or by nearest neighbour (``mask``, ``masks``).
    A zero field is the exact identity.

    Boxes:

    * with instance ``masks`` and ``mask_boxes=True``: the extent of each
      warped mask (tight); objects are dropped as in ``rotate_batch``;
    * otherwise: the extent of the box's warped outline (17 points per edge;
      an elastic map bends edges, so four corners are not enough), clipped.
      Looser than the object, as for a rotation.

    Both need the *forward* map (where does input point q go?). The field
    gives the inverse map, so the forward map solves p + d(p) = q by eight
    fixed-point steps p <- q - d(p), d read bilinearly. They converge where
    the field is contracting (|gradient of d| < 1; Simard's sigma = 4,
    alpha = 34 stays mostly well below 1) and leave about 0.2 px of error
    there; a field that folds the image has no inverse, and the boxes are
    then approximate.

    Args:
      displacement: float32 [B, H, W, 2], (dy, dx) in pixels at each output
        pixel (``elastic_displacement`` draws one).
      min_visible, fill_value, mask_fill_value, mask_boxes: as ``rotate_batch``.
    """
    out = _check_batch(batch)
    displacement = tf.convert_to_tensor(displacement, tf.float32)
    if displacement.shape.rank is not None and (displacement.shape.rank != 4
                                                or displacement.shape[-1] != 2):
        raise ValueError(f"displacement must be [B, H, W, 2], got shape {displacement.shape}")
    height, width = _image_size(out["image"])
    grid_y, grid_x = _pixel_centres(height, width)
    source_y = grid_y[None] + displacement[..., 0]  # [B, H, W]
    source_x = grid_x[None] + displacement[..., 1]

    def solve(ys, xs, end_y, end_x, steps):
        """Fixed-point steps p <- q - d(p) for points q = (ys, xs) [B, h, w] from a first p."""
        def step(index, end_y, end_x):
            d = resample(displacement, end_y, end_x, "bilinear", fill_value=None)  # [B, h, w, 2]
            return index + 1, ys - d[..., 0], xs - d[..., 1]

        # A loop rather than unrolled steps keeps the graph (and tracing) small.
        _, end_y, end_x = tf.while_loop(lambda index, *_: index < steps, step,
                                        (tf.constant(0), end_y, end_x))
        return end_y, end_x

    def forward(ys, xs):
        """Input points [B, N] -> output points: solve p + d(p) = q for p."""
        end_y, end_x = solve(ys[..., None], xs[..., None], ys[..., None], xs[..., None],
                             _ELASTIC_INVERSE_STEPS)
        return end_y[..., 0], end_x[..., 0]

    def forward_grid():
        """The input pixel centres: the first step reads d on the grid itself."""
        return solve(grid_y[None], grid_x[None], grid_y[None] - displacement[..., 0],
                     grid_x[None] - displacement[..., 1], _ELASTIC_VISIBILITY_STEPS - 1)

    return _warp(out, source_y, source_x, forward, forward_grid, _OUTLINE_POINTS_PER_EDGE,
                 min_visible, fill_value, mask_fill_value, mask_boxes)


def random_elastic(batch: dict, seed, alpha: float = 34.0, sigma: float = 4.0,
                   min_visible: float = 0.3, fill_value: float = 0.5,
                   mask_fill_value: int = 255, mask_boxes: bool = True) -> dict:
    """Elastic distortion with a fresh random field per example (Simard et al., 2003, sec. 2).

    ``elastic_displacement(seed, ...)`` then ``elastic_warp_batch``; see
    both for the field, the boxes and the arguments. ``alpha`` = 0 is the
    identity. alpha and sigma are in pixels of the image as it is: for
    images larger than the paper's 28 x 28 digits, scale both with the
    image side for the same look.
    """
    out = _check_batch(batch)
    shape = tf.shape(out["image"])
    displacement = elastic_displacement(seed, shape[0], shape[1], shape[2], alpha, sigma)
    return elastic_warp_batch(out, displacement, min_visible, fill_value, mask_fill_value,
                              mask_boxes)


def show_tight_and_loose_boxes(batch: dict, transform, seed, index: int = 0, class_names=None,
                               save_path=None):
    """One example before and after a warp, with tight and loose boxes on one picture.

    Left: the input with its instance masks and boxes. Right: the output of
    ``transform(batch, seed)`` with the transformed masks, the tight boxes
    (extent of each transformed mask, solid, class colours) and the loose
    boxes of ``transform(batch, seed, mask_boxes=False)`` (extent of the
    transformed corners or outline, dashed white). The random draws do not
    depend on ``mask_boxes``, so both calls apply the same warp.

    Args:
      batch: a detection batch dict with ``masks`` ([B, M, H, W]).
      transform: e.g. ``random_rotate``, ``random_shear``, ``random_elastic``
        or a ``functools.partial`` of one (any augmenter that takes
        ``mask_boxes``).
      index: which example of the batch to draw.
      save_path: optional PNG path (written with ``common.viz.save_figure``).

    Returns:
      The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from common import viz

    if not isinstance(batch, dict) or "masks" not in batch:
        raise ValueError("show_tight_and_loose_boxes needs a batch dict with instance 'masks' "
                         "[B, M, H, W] (load('shapes', with_masks=True))")
    tight = transform(batch, seed)
    loose = transform(batch, seed, mask_boxes=False)

    def example(result):
        return {key: np.asarray(result[key])[index]
                for key in ("image", "boxes", "classes", "masks")}

    before, after, loose_after = example(_check_batch(batch)), example(tight), example(loose)
    figure, axes = plt.subplots(1, 2, figsize=(7.0, 3.6))
    for ax, shown, title in ((axes[0], before, "input"),
                             (axes[1], after, "tight (solid) vs loose (dashed)")):
        visible = shown["classes"] >= 0
        ax.imshow(viz.overlay_mask(shown["image"], shown["masks"][visible], alpha=0.35))
        viz.draw_boxes(ax, shown["boxes"], shown["classes"], class_names=class_names,
                       show_labels=class_names is not None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    viz.draw_boxes(axes[1], loose_after["boxes"], loose_after["classes"], color="white",
                   linestyle="--", linewidth=1.0, show_labels=False)
    figure.tight_layout()
    return viz.save_figure(figure, save_path)


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

    Order: flips, quarter turns, rotation + shear, elastic warp, scale jitter
    (random_scale_crop) or VGG scale jitter, colour jitter, PCA colour. Each
    operation gets its own fixed slot of
    ``tf.random.experimental.stateless_split(seed)``. The call is a
    ``tf.function`` (retraced only for new shapes), usable eagerly, in
    ``tf.data`` after ``.batch()`` (see ``augment_dataset``) and inside a
    model's ``train_step`` (see ``BatchAugmentation``).

    Args:
      task: "classification", "detection" or "segmentation" (instance
        segmentation = "detection" with a ``masks`` key); chooses defaults.
      flip_left_right, flip_up_down: probabilities (0 = off). Default 0.5 / 0.
      rotate90: random quarter turns (square images only).
      rotation: largest angle of the random rotation in degrees (0 = off).
      shear: largest shear factor, both directions (0 = off). Rotation and
        shear are applied together by random_affine (one resampling).
      elastic_alpha, elastic_sigma: random_elastic's field (alpha 0 = off).
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
                 flip_up_down: float = 0.0, rotate90: bool = False, rotation: float = 0.0,
                 shear: float = 0.0, elastic_alpha: float = 0.0, elastic_sigma: float = 4.0,
                 scale_range="default",
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
        self.rotation, self.shear = float(rotation), float(shear)
        self.elastic_alpha, self.elastic_sigma = float(elastic_alpha), float(elastic_sigma)
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must be in [0, 180] degrees, got {rotation}")
        if not 0.0 <= self.shear < 1.0:
            raise ValueError(f"shear must be in [0, 1), got {shear}")
        if self.elastic_alpha < 0.0 or self.elastic_sigma <= 0.0:
            raise ValueError("elastic_alpha must be >= 0 and elastic_sigma > 0, got "
                             f"{elastic_alpha}, {elastic_sigma}")
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
            "rotation": self.rotation, "shear": self.shear, "elastic_alpha": self.elastic_alpha,
            "elastic_sigma": self.elastic_sigma,
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
        if self.rotation or self.shear or self.elastic_alpha:
            # One slot for the warps, split further, so the slots of the other
            # operations (and their results) are as before.
            warp_seeds = _split_seed(seeds[_SLOTS["warp"]], 2)
            options = {"min_visible": self.min_visible, "fill_value": self.fill_value,
                       "mask_fill_value": self.mask_fill_value}
            if self.rotation or self.shear:  # one resampling for both
                batch = random_affine(batch, warp_seeds[0], self.rotation, self.shear, self.shear,
                                      **options)
            if self.elastic_alpha:
                batch = random_elastic(batch, warp_seeds[1], self.elastic_alpha,
                                       self.elastic_sigma, **options)
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


@dataclass
class WarpOptions:
    """The warps as script options (``--rotation``, ``--shear``, ``--elastic-alpha``): a dataclass
    a script's ``Config`` mixes in (``train_classifier.py``, ``train_faster_rcnn.py``,
    ``train_detector.py``); pass them to ``Augmenter(rotation=..., shear=..., elastic_alpha=...)``.
    """

    rotation: float = field(default=0.0, metadata={
        "help": "augmentation: largest random rotation in degrees (0 = off)"})
    shear: float = field(default=0.0, metadata={
        "help": "augmentation: largest random shear factor, both directions (0 = off)"})
    elastic_alpha: float = field(default=0.0, metadata={
        "help": "augmentation: strength in pixels of a random elastic warp (Simard et al. 2003; "
                "0 = off; smoothed by a Gaussian of sigma 4 px)"})


def check_warp_options(config) -> None:
    """ValueErrors naming the flag for ``WarpOptions`` values no augmenter takes."""
    if not 0.0 <= getattr(config, "rotation", 0.0) <= 180.0:
        raise ValueError(f"--rotation must be in [0, 180] degrees, got {config.rotation}")
    if not 0.0 <= getattr(config, "shear", 0.0) < 1.0:
        raise ValueError(f"--shear must be in [0, 1), got {config.shear}")
    if getattr(config, "elastic_alpha", 0.0) < 0.0:
        raise ValueError(f"--elastic-alpha must be >= 0 (0 = off), got {config.elastic_alpha}")


def has_warps(config) -> bool:
    """Whether ``config`` asks for any warp (False for a config without ``WarpOptions``)."""
    return any(getattr(config, name, 0.0) for name in ("rotation", "shear", "elastic_alpha"))


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
