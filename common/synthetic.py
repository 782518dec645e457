"""The embedded default data set: procedurally drawn ``shapes`` scenes.

Every chapter trains on these scenes by default, so the repo runs with no
download. A scene is a textured, noisy background with 0 to N coloured shapes
(circle, square, triangle, star, cross) of random size, aspect, rotation and
colour; later shapes may partly hide earlier ones. Each example comes with
everything the three chapters need:

* ``image``  float32 [H, W, 3] in [0, 1]
* ``boxes``  float32 [N, 4], normalized [ymin, xmin, ymax, xmax] of the
  *visible* pixels of each shape (the COCO convention)
* ``classes`` int32 [N], 0-based shape ids (see ``CLASS_NAMES``)
* ``masks``  uint8 [N, H, W], visible pixels of each instance (0/1)
* ``mask``   int32 [H, W], semantic mask: 0 background, ``class + 1`` shape

``make_localization_example`` draws the localization and landmark variant
(``shapes_localization`` in ``common.data``): zero or one shape, its box,
class and landmark points (centre, corners / tips; one corner marked).

An example is a pure function of ``(seed, split, index)``: the same arguments
give the same pixels on every machine (NumPy's PCG64 generator and integer
OpenCV rasterisation are both platform independent).

This module needs only NumPy and OpenCV; ``common.data`` wraps it in
``tf.data``. Run ``python bench/bench_synthetic.py`` for the generation rate.
"""

from __future__ import annotations

import cv2
import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "validation", "test")
# The generators are infinite; these are the sizes `common.data.load` uses
# when the caller does not choose.
DEFAULT_SPLIT_SIZES = {"train": 4000, "validation": 500, "test": 500}

# Fixed-point precision for cv2.fillPoly: 4 fractional bits keeps
# sub-pixel vertex positions, so small shapes keep their outline.
_SHIFT = 4


def _unit_polygon(class_id: int) -> np.ndarray:
    """Outline of a shape of radius ~1 centred on the origin, [V, 2] as (x, y)."""
    name = CLASS_NAMES[class_id]
    if name == "circle":
        angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "square":
        # 0.85 makes its area close to the circle's.
        return 0.85 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if name == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return 1.15 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if name == "star":
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, 1.15, 0.5)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if name == "cross":
        w = 0.35  # half the arm width
        return np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
             [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]],
            np.float64,
        )
    raise ValueError(f"unknown class_id {class_id}")


_UNIT_POLYGONS = [_unit_polygon(c) for c in range(NUM_CLASSES)]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + low-frequency colour noise + a few clutter lines, [H, W, 3]."""
    base = rng.uniform(0.15, 0.85, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)[..., None]
    image = base + ramp * rng.uniform(-0.3, 0.3, size=3)
    cells = int(rng.integers(3, 9))
    blobs = rng.uniform(-1.0, 1.0, size=(cells, cells, 3)).astype(np.float32)
    image = image + rng.uniform(0.05, 0.2) * cv2.resize(
        blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.ascontiguousarray(image, dtype=np.float32)
    for _ in range(int(rng.integers(0, 4))):  # thin distractor lines
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 1, 3))
        cv2.line(image, p1, p2, colour, thickness=int(rng.integers(1, 3)))
    return image


def _shape_outline(rng, class_id, radius, center):
    """Vertices [V, 2] (x, y, pixel centres at integers) of one randomly rotated and stretched shape."""
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    points = _UNIT_POLYGONS[class_id] * radius * np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)])
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return points @ rotation.T + np.asarray(center)


def _rasterise(points, size):
    """Fill the polygon ``points`` [V, 2] (x, y) into a 0/1 uint8 [size, size] mask."""
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(points * (1 << _SHIFT)).astype(np.int32)], 1,
                 lineType=cv2.LINE_8, shift=_SHIFT)
    return mask


def _shape_mask(rng, class_id, size, radius, center):
    """Rasterise one randomly rotated and stretched shape into a 0/1 mask."""
    return _rasterise(_shape_outline(rng, class_id, radius, center), size)


def _shape_colour(rng, background_colour):
    """A random colour that differs clearly from the background under it."""
    for _ in range(20):
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.abs(colour - background_colour).sum() > 0.6:
            return colour
    return 1.0 - background_colour  # always far enough


def _finish(rng, image):
    image = image + rng.normal(0.0, rng.uniform(0.01, 0.05), size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def make_scene(index: int, split: str = "train", seed: int = 0, image_size: int = 128,
               max_objects: int = 4, min_objects: int = 0, empty_fraction: float = 0.05,
               min_visible: float = 0.6) -> dict:
    """One detection / instance / semantic segmentation example as NumPy arrays.

    Args:
      index: example number (>= 0) within the split.
      split: "train", "validation" or "test" (independent streams).
      seed: global seed; a different seed gives a different data set.
      image_size: side of the square image in pixels.
      max_objects / min_objects: range of the number of shapes.
      empty_fraction: probability of a scene with no shape at all.
      min_visible: every shape keeps at least this fraction of its own area
        visible after the shapes drawn over it (and after the image border).

    Returns:
      dict with image [S, S, 3] float32, boxes [N, 4] float32 (normalized
      yxyx), classes [N] int32, masks [N, S, S] uint8, mask [S, S] int32.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = _rng(seed, split, index)
    size = image_size
    image = _background(rng, size)
    if min_objects == 0 and rng.random() < empty_fraction:
        count = 0
    else:
        count = int(rng.integers(max(min_objects, 1), max_objects + 1)) if max_objects else 0

    visible: list[np.ndarray] = []   # current visible mask of each accepted shape
    areas: list[int] = []            # full (unoccluded, in-image) area of each
    classes: list[int] = []
    for _ in range(count):
        for _attempt in range(15):
            class_id = int(rng.integers(0, NUM_CLASSES))
            radius = rng.uniform(0.08, 0.22) * size
            center = rng.uniform(0.12 * size, 0.88 * size, size=2)
            full = _shape_mask(rng, class_id, size, radius, center)
            area = int(full.sum())
            if area < 0.7 * np.pi * (0.08 * size) ** 2 * min_visible:
                continue  # mostly outside the image
            occluded = [(v & (1 - full)) for v in visible]
            if all(o.sum() >= min_visible * a for o, a in zip(occluded, areas)):
                break
        else:
            continue  # no placement found: fewer shapes in this scene
        cy, cx = int(np.clip(center[1], 0, size - 1)), int(np.clip(center[0], 0, size - 1))
        colour = _shape_colour(rng, image[cy, cx])
        # A gentle left-to-right shading so a shape is not one flat colour.
        ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :, None]
        shaded = colour.astype(np.float32) * (1.0 + rng.uniform(-0.3, 0.3) * ramp)
        inside = full.astype(bool)
        image[inside] = np.broadcast_to(shaded, image.shape)[inside]
        visible = occluded + [full]
        areas.append(area)
        classes.append(class_id)

    image = _finish(rng, image)
    masks = np.stack(visible).astype(np.uint8) if visible else np.zeros((0, size, size), np.uint8)
    boxes = np.zeros((len(visible), 4), np.float32)
    for i, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        boxes[i] = [rows[0] / size, cols[0] / size, (rows[-1] + 1) / size, (cols[-1] + 1) / size]
    semantic = np.zeros((size, size), np.int32)
    for m, c in zip(masks, classes):
        semantic[m.astype(bool)] = c + 1
    return {
        "image": image,
        "boxes": boxes,
        "classes": np.asarray(classes, np.int32),
        "masks": masks,
        "mask": semantic,
    }


def make_classification_example(index: int, split: str = "train", seed: int = 0,
                                image_size: int = 64) -> dict:
    """One centred shape on a textured background: {"image", "label"}.

    The shape fills 40 to 80 % of the image side, with random aspect, rotation
    and colour, and its centre is jittered by up to 10 % of the side.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng = _rng(seed, split, index)
    size = image_size
    image = _background(rng, size)
    label = int(rng.integers(0, NUM_CLASSES))
    radius = rng.uniform(0.2, 0.4) * size
    center = size / 2 + rng.uniform(-0.1, 0.1, size=2) * size
    full = _shape_mask(rng, label, size, radius, center).astype(bool)
    colour = _shape_colour(rng, image[size // 2, size // 2])
    image[full] = colour.astype(np.float32)
    return {"image": _finish(rng, image), "label": np.int32(label)}


def make_segmentation_example(index: int, split: str = "train", seed: int = 0,
                              image_size: int = 128, **scene_options) -> dict:
    """A scene reduced to the semantic segmentation contract: {"image", "mask"}.

    ``mask`` is int32 [H, W] with 0 for background and ``class + 1`` for the
    shapes, so a segmentation model has ``NUM_CLASSES + 1`` output classes.
    """
    scene = make_scene(index, split, seed, image_size, **scene_options)
    return {"image": scene["image"], "mask": scene["mask"]}


# ---------------------------------------------------------------------------
# Localization and landmarks: zero or one shape per image
# ---------------------------------------------------------------------------
# Landmark 0 is the shape's centre; landmarks 1.. are its corners (square,
# triangle), tips (star) or arm ends (cross). These shapes look the same after
# a turn by a fraction of a full turn, so nothing in the image would say which
# corner is "landmark 1" (a network would have to guess, and its guess must
# jump somewhere as the shape turns). As the parts of a face can be told apart,
# one corner carries a small mark: it is landmark 1, and the others follow
# clockwise on screen. A circle has its centre only. NUM_LANDMARKS is the
# largest count (the star's centre + 5 tips); shorter lists are padded and
# flagged invisible.
LANDMARK_COUNTS = {"circle": 1, "square": 5, "triangle": 4, "star": 6, "cross": 5}
NUM_LANDMARKS = max(LANDMARK_COUNTS.values())
# Which outline vertices (indices into _UNIT_POLYGONS) make each landmark:
# one index = that vertex, a pair = the midpoint of the two (the cross's arm ends).
_LANDMARK_VERTICES = {
    "circle": [],
    "square": [(0,), (1,), (2,), (3,)],
    "triangle": [(0,), (1,), (2,)],
    "star": [(0,), (2,), (4,), (6,), (8,)],  # the outer vertices
    "cross": [(0, 1), (3, 4), (6, 7), (9, 10)],
}


# The mark on landmark 1: a disc this far from the centre towards the corner
# (inside every shape's corner or tip), of this radius (fraction of the side).
MARK_POSITION = 0.6
MARK_RADIUS = 0.035


def _clockwise_from(points, center, first):
    """``points`` [L, 2] (x, y) in clockwise order on screen (y points down), starting at ``first``."""
    dx, dy = points[:, 0] - center[0], points[:, 1] - center[1]
    angle = np.arctan2(dx, -dy)  # 0 = up, pi/2 = right, pi = down: clockwise on screen
    return points[np.argsort(np.mod(angle - angle[first], 2.0 * np.pi), kind="stable")]


def make_localization_example(index: int, split: str = "train", seed: int = 0,
                              image_size: int = 64, empty_fraction: float = 0.25) -> dict:
    """An image with zero or one shape, its box, class and landmark points.

    The data of object localization (one network outputs "is there an
    object, which class, where is its box") and landmark detection. The
    shape lies wholly inside the image (every landmark is on the image) and
    spans about 45 to 95 % of its side; the background is the scenes' textured
    one with distractor lines. A small black or white disc marks the corner
    that is landmark 1 (see the comment above ``LANDMARK_COUNTS``).

    Args:
      index, split, seed: as ``make_scene`` (a pure function of the three).
      image_size: side of the square image in pixels (>= 16).
      empty_fraction: probability of an image with no shape.

    Returns:
      dict of NumPy arrays, N = 0 or 1 objects, K = ``NUM_LANDMARKS``:

      * ``image`` float32 [S, S, 3] in [0, 1]
      * ``boxes`` float32 [N, 4], normalized [ymin, xmin, ymax, xmax] (tight
        box of the shape's pixels, the detection contract)
      * ``classes`` int32 [N], 0-based (``CLASS_NAMES``)
      * ``landmarks`` float32 [N, K, 2], normalized (x, y) in [0, 1], the
        image's left/top edge at 0 and right/bottom edge at 1 (as the boxes);
        zeros where not visible
      * ``landmark_visibility`` int32 [N, K]: 1 for a real landmark, 0 for
        padding (see ``LANDMARK_COUNTS``)
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    rng = _rng(seed, split, index)
    size = image_size
    image = _background(rng, size)
    boxes = np.zeros((0, 4), np.float32)
    classes = np.zeros((0,), np.int32)
    landmarks = np.zeros((0, NUM_LANDMARKS, 2), np.float32)
    visibility = np.zeros((0, NUM_LANDMARKS), np.int32)
    if rng.random() >= empty_fraction:
        class_id = int(rng.integers(0, NUM_CLASSES))
        radius = rng.uniform(0.22, 0.38) * size
        outline = _shape_outline(rng, class_id, radius, (0.0, 0.0))  # [V, 2] about the origin
        extent = outline.max(axis=0) - outline.min(axis=0)
        if extent.max() > 0.95 * (size - 1):  # too large to fit: shrink it
            outline = outline * (0.95 * (size - 1) / extent.max())
        # Anywhere the whole outline stays inside the image (so every landmark is on it).
        center = rng.uniform(-outline.min(axis=0), (size - 1) - outline.max(axis=0))
        outline = outline + center
        full = _rasterise(outline, size)
        name = CLASS_NAMES[class_id]
        corners = np.array([outline[list(group)].mean(axis=0) for group in _LANDMARK_VERTICES[name]],
                           np.float64).reshape(-1, 2)
        if len(corners):  # the marked corner, drawn at random: landmark 1
            corners = _clockwise_from(corners, center, int(rng.integers(0, len(corners))))
        points = np.concatenate([np.asarray(center, np.float64)[None], corners])  # [L, 2] pixel (x, y)
        colour = _shape_colour(rng, image[int(center[1]), int(center[0])])
        ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :, None]
        shaded = colour.astype(np.float32) * (1.0 + rng.uniform(-0.3, 0.3) * ramp)
        inside = full.astype(bool)
        image[inside] = np.broadcast_to(shaded, image.shape)[inside]
        if len(corners):  # black on a light shape, white on a dark one
            mark = center + MARK_POSITION * (corners[0] - center)
            shade = 0.0 if colour.mean() > 0.5 else 1.0
            cv2.circle(image, tuple(int(v) for v in np.round(mark * (1 << _SHIFT))),
                       int(round(max(1.0, MARK_RADIUS * size) * (1 << _SHIFT))), (shade,) * 3,
                       thickness=-1, lineType=cv2.LINE_8, shift=_SHIFT)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        boxes = np.array([[rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]], np.float32) / size
        classes = np.array([class_id], np.int32)
        landmarks = np.zeros((1, NUM_LANDMARKS, 2), np.float32)
        # Pixel centres sit at integers and pixel i covers [i, i + 1) / size, as for the boxes.
        landmarks[0, :len(points)] = (points + 0.5) / size
        visibility = np.zeros((1, NUM_LANDMARKS), np.int32)
        visibility[0, :len(points)] = 1
    return {"image": _finish(rng, image), "boxes": boxes, "classes": classes,
            "landmarks": landmarks, "landmark_visibility": visibility}
