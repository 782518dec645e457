"""The embedded face data set: procedurally drawn people for face verification (``faces``).

Face verification asks "are these two photos the same person?" of people the network has never
seen, so a data set for it needs *identities* and many photos of each. This module draws them with
OpenCV, no download:

* an **identity** is a fixed set of facial parameters: face outline (width, height, how square the
  jaw is), skin colour, ears, hair (colour, style, hairline), eye spacing, height, size and colour,
  eyebrows (thickness, slant), nose (length, width, style), mouth (width, lip colour), glasses,
  moustache and beard;
* each **image** of an identity varies what a camera and a mood change: pose (in-plane rotation,
  scale, shift, a turn of the head that moves the features sideways), expression (smile, eye
  opening, raised brows), lighting (brightness, a directional gradient, colour cast), background
  (colour gradient, blobs and clutter), sometimes an occluding bar, blur and noise.

An image is a pure function of ``(seed, split, identity, index)`` (NumPy's PCG64 generator and
integer OpenCV rasterisation are platform independent). Identities are disjoint between the
splits: the ``identity``-th person of a split is the global person ``split_offset + identity``
(``global_identity``), so a test person is never a training person, as in LFW's protocol.

Difficulty (measured by ``tests/test_faces.py`` and reported by ``train_siamese.py``): the nearest
neighbour on raw pixels finds the right person among 20 from one photo each far less than half of
the time, so a model has to learn what stays fixed across photos.

    python -c "from common import faces; print(faces.make_face(0, 0)['image'].shape)"
"""

from __future__ import annotations

import cv2
import numpy as np

SPLITS = ("train", "validation", "test")
# Persons per split (each split has its own people) and photos per person, when the caller does not say.
DEFAULT_IDENTITIES = {"train": 1000, "validation": 60, "test": 100}
DEFAULT_IMAGES_PER_IDENTITY = {"train": 8, "validation": 10, "test": 10}
# Global person number = offset of the split + identity: disjoint ranges, so no person is in two splits.
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
MAX_IDENTITIES_PER_SPLIT = 1_000_000
HAIR_STYLES = ("bald", "short", "long", "fringe", "bun")
NOSE_STYLES = ("line", "triangle", "round")
_SHIFT = 4  # fixed-point bits for sub-pixel OpenCV drawing


def global_identity(split: str, identity: int) -> int:
    """The person number of the ``identity``-th person of ``split`` (unique over all splits)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= int(identity) < MAX_IDENTITIES_PER_SPLIT:
        raise ValueError(f"identity must be in [0, {MAX_IDENTITIES_PER_SPLIT}), got {identity!r}")
    return SPLIT_OFFSETS[split] + int(identity)


def identity_parameters(identity: int, split: str = "train", seed: int = 0) -> dict:
    """The fixed facial parameters of one person (a dict of floats, ints and colour triples).

    Lengths are fractions of the face's half width ``a`` / half height ``b``; colours RGB in [0, 1].
    """
    rng = np.random.default_rng([int(seed), 7, global_identity(split, identity)])
    skin_tone = rng.uniform(0.0, 1.0)  # dark to light along a skin-colour line, plus a small tint
    skin = np.array([0.35 + 0.6 * skin_tone, 0.22 + 0.58 * skin_tone, 0.15 + 0.5 * skin_tone])
    skin = np.clip(skin + rng.normal(0.0, 0.04, 3), 0.05, 1.0)
    hair = rng.choice([np.array([0.08, 0.06, 0.05]), np.array([0.35, 0.2, 0.1]),
                       np.array([0.75, 0.6, 0.3]), np.array([0.6, 0.25, 0.1]),
                       np.array([0.7, 0.7, 0.7]), np.array([0.2, 0.15, 0.12])])
    hair = np.clip(hair + rng.normal(0.0, 0.05, 3), 0.0, 1.0)
    return {
        "face_width": rng.uniform(0.25, 0.34),       # half width a, fraction of the canvas
        "face_height": rng.uniform(0.31, 0.41),      # half height b
        "squareness": rng.uniform(2.0, 4.0),         # superellipse exponent: 2 oval .. 4 square jaw
        "skin": skin,
        "ear_size": rng.uniform(0.12, 0.25),
        "hair": hair,
        "hair_style": int(rng.integers(0, len(HAIR_STYLES))),
        "hairline": rng.uniform(0.35, 0.75),         # how far down the forehead the hair comes
        "eye_spacing": rng.uniform(0.3, 0.55),
        "eye_height": rng.uniform(0.05, 0.25),       # above the face centre, fraction of b
        "eye_size": rng.uniform(0.13, 0.22),
        "eye_colour": rng.choice([np.array([0.35, 0.2, 0.08]), np.array([0.2, 0.45, 0.75]),
                                  np.array([0.3, 0.55, 0.3]), np.array([0.12, 0.08, 0.05])]),
        "brow_thickness": rng.uniform(0.04, 0.12),
        "brow_slant": rng.uniform(-0.25, 0.25),
        "nose_length": rng.uniform(0.18, 0.4),
        "nose_width": rng.uniform(0.1, 0.25),
        "nose_style": int(rng.integers(0, len(NOSE_STYLES))),
        "mouth_width": rng.uniform(0.25, 0.5),
        "mouth_height": rng.uniform(0.45, 0.65),     # below the face centre, fraction of b
        "lips": np.clip(np.array([0.65, 0.25, 0.3]) * rng.uniform(0.6, 1.2) + rng.normal(0, 0.05, 3),
                        0.0, 1.0),
        "glasses": bool(rng.random() < 0.3),
        "glasses_colour": rng.uniform(0.0, 0.6, 3),
        "glasses_round": bool(rng.random() < 0.5),
        "moustache": bool(rng.random() < 0.25),
        "beard": bool(rng.random() < 0.2),
    }


def _colour(rgb):
    return tuple(float(v) for v in rgb)


def _pts(points, scale=1 << _SHIFT):
    return np.round(np.asarray(points) * scale).astype(np.int32)


def _superellipse(cx, cy, a, b, power, count=64):
    t = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = cx + a * np.sign(c) * np.abs(c) ** (2.0 / power)
    # The upper half stays an oval (the skull); the squareness shapes the jaw.
    y_power = np.where(s > 0, power, 2.0)
    y = cy + b * np.sign(s) * np.abs(s) ** (2.0 / y_power)
    return np.stack([x, y], axis=1)


def _fill(layer, alpha, points, colour):
    cv2.fillPoly(layer, [_pts(points)], _colour(colour), lineType=cv2.LINE_AA, shift=_SHIFT)
    cv2.fillPoly(alpha, [_pts(points)], 1.0, lineType=cv2.LINE_AA, shift=_SHIFT)


def _ellipse(layer, center, axes, angle, colour, alpha=None, thickness=-1):
    center = tuple(int(v) for v in _pts(center))
    axes = tuple(max(1, int(v)) for v in _pts(axes))
    cv2.ellipse(layer, center, axes, float(angle), 0, 360, _colour(colour), thickness,
                cv2.LINE_AA, _SHIFT)
    if alpha is not None:
        cv2.ellipse(alpha, center, axes, float(angle), 0, 360, 1.0, thickness, cv2.LINE_AA, _SHIFT)


def _polyline(layer, points, colour, thickness):
    cv2.polylines(layer, [_pts(points)], False, _colour(colour), max(1, int(round(thickness))),
                  cv2.LINE_AA, _SHIFT)


def _draw_face(p, rng, canvas):
    """The face of parameters ``p`` with this photo's expression and head turn, on a transparent
    canvas: (RGB layer [C, C, 3], alpha [C, C]), the face centred."""
    layer = np.zeros((canvas, canvas, 3), np.float32)
    alpha = np.zeros((canvas, canvas), np.float32)
    a, b = p["face_width"] * canvas, p["face_height"] * canvas
    cx, cy = 0.5 * canvas, 0.53 * canvas
    # Expression and head turn of this photo.
    smile = rng.uniform(-0.6, 1.0)
    openness = rng.uniform(0.35, 1.15)
    brow_raise = rng.uniform(-0.05, 0.12)
    turn = rng.uniform(-0.8, 0.8)  # a turn of the head: the inner features move sideways, the far side narrows
    fx = cx + turn * 0.18 * a      # centre line of the features
    squeeze = 1.0 - 0.15 * abs(turn)
    skin = p["skin"] * rng.uniform(0.96, 1.04)
    hair = p["hair"]
    style = HAIR_STYLES[p["hair_style"]]

    if style == "long":  # behind the head, down to the shoulders
        _fill(layer, alpha, [[cx - 1.25 * a, cy - 0.6 * b], [cx + 1.25 * a, cy - 0.6 * b],
                             [cx + 1.3 * a, cy + 1.15 * b], [cx - 1.3 * a, cy + 1.15 * b]], hair)
    if style == "bun":
        _ellipse(layer, (cx, cy - 1.1 * b), (0.45 * a, 0.35 * b), 0, hair, alpha)
    for side in (-1, 1):  # ears: the far ear hides as the head turns
        ear_x = cx + side * a * (0.98 - (0.25 if side * turn < -0.4 else 0.0))
        _ellipse(layer, (ear_x, cy - 0.05 * b), (p["ear_size"] * a, 1.6 * p["ear_size"] * b), 0,
                 skin * 0.92, alpha)
    outline = _superellipse(cx, cy, a * squeeze, b, p["squareness"])
    outline[:, 0] += turn * 0.06 * a
    _fill(layer, alpha, outline, skin)
    if p["beard"]:
        jaw = outline[outline[:, 1] > cy + 0.35 * b]
        jaw = jaw[np.argsort(np.arctan2(jaw[:, 1] - cy, jaw[:, 0] - cx))]
        _fill(layer, alpha, np.concatenate([jaw, [[fx - 0.3 * a, cy + 0.35 * b],
                                                  [fx + 0.3 * a, cy + 0.35 * b]]]), hair)
    if style != "bald":  # the hair over the top of the head, down to the hairline
        hairline_y = cy - b * (1.0 - p["hairline"]) + (0.1 * b if style == "fringe" else 0.0)
        cap = _superellipse(cx, cy, a * squeeze * 1.07, b * 1.08, 2.0)
        cap[:, 0] += turn * 0.06 * a
        cap = cap[cap[:, 1] < hairline_y]
        if len(cap) >= 3:
            cap = cap[np.argsort(cap[:, 0])]
            _fill(layer, alpha, np.concatenate([cap, [[cap[-1, 0], hairline_y],
                                                      [cap[0, 0], hairline_y]]]), hair)
    # Eyes, brows.
    eye_y = cy - p["eye_height"] * b
    eye_w, eye_h = p["eye_size"] * a, 0.55 * p["eye_size"] * a * openness
    for side in (-1, 1):
        ex = fx + side * p["eye_spacing"] * a * squeeze
        _ellipse(layer, (ex, eye_y), (eye_w, max(eye_h, 0.6)), 0, (0.95, 0.95, 0.92))
        if openness > 0.45:
            iris = 0.5 * eye_w
            _ellipse(layer, (ex + turn * 0.3 * eye_w, eye_y), (iris, min(iris, eye_h)), 0,
                     p["eye_colour"])
            _ellipse(layer, (ex + turn * 0.3 * eye_w, eye_y), (0.4 * iris, 0.4 * min(iris, eye_h)), 0,
                     (0.02, 0.02, 0.02))
        brow_y = eye_y - (0.22 + brow_raise) * b
        slant = p["brow_slant"] * side
        _polyline(layer, [[ex - 1.2 * eye_w, brow_y + slant * eye_w], [ex, brow_y - 0.1 * eye_w],
                          [ex + 1.2 * eye_w, brow_y - slant * eye_w]],
                  hair * 0.8, p["brow_thickness"] * b)
        if p["glasses"]:
            rim = (1.5 * eye_w, 1.2 * eye_w)
            if p["glasses_round"]:
                _ellipse(layer, (ex, eye_y), rim, 0, p["glasses_colour"], thickness=max(1, canvas // 50))
            else:
                cv2.rectangle(layer, tuple(int(v) for v in (ex - rim[0], eye_y - rim[1])),
                              tuple(int(v) for v in (ex + rim[0], eye_y + rim[1])),
                              _colour(p["glasses_colour"]), max(1, canvas // 50), cv2.LINE_AA)
    if p["glasses"]:
        bridge = p["eye_spacing"] * a * squeeze - 1.5 * eye_w
        _polyline(layer, [[fx - bridge, eye_y], [fx + bridge, eye_y]], p["glasses_colour"],
                  max(1, canvas // 50))
    # Nose.
    nose_top, nose_bottom = eye_y + 0.1 * b, eye_y + 0.1 * b + p["nose_length"] * b
    nose_w = p["nose_width"] * a
    nose_colour = skin * 0.75
    nose_style = NOSE_STYLES[p["nose_style"]]
    nose_x = fx + turn * 0.12 * a
    if nose_style == "line":
        _polyline(layer, [[fx, nose_top], [nose_x, nose_bottom], [nose_x - turn * nose_w, nose_bottom]],
                  nose_colour, 0.03 * canvas)
    elif nose_style == "triangle":
        cv2.fillPoly(layer, [_pts([[fx, nose_top], [nose_x + nose_w, nose_bottom],
                                   [nose_x - nose_w, nose_bottom]])], _colour(nose_colour),
                     cv2.LINE_AA, _SHIFT)
    else:
        _ellipse(layer, (nose_x, nose_bottom - 0.3 * nose_w), (0.8 * nose_w, 0.6 * nose_w), 0, nose_colour)
    for side in (-1, 1):  # nostrils
        _ellipse(layer, (nose_x + side * 0.45 * nose_w, nose_bottom), (0.15 * nose_w, 0.1 * nose_w),
                 0, skin * 0.35)
    # Mouth: a parabola bent by the smile, opened when smiling broadly.
    mouth_y = cy + p["mouth_height"] * b
    half = p["mouth_width"] * a * squeeze
    xs = np.linspace(-1.0, 1.0, 9)
    mouth = np.stack([fx + turn * 0.1 * a + xs * half, mouth_y - smile * 0.12 * b * (xs ** 2 - 0.5)], axis=1)
    if p["moustache"]:
        _polyline(layer, mouth + [0, -0.1 * b], hair, 0.07 * b)
    if smile > 0.6:
        lower = mouth[::-1] + [0, 0.15 * b * (smile - 0.5)]
        cv2.fillPoly(layer, [_pts(np.concatenate([mouth, lower]))], (0.25, 0.05, 0.05), cv2.LINE_AA,
                     _SHIFT)
    _polyline(layer, mouth, p["lips"], 0.05 * b)
    return layer, alpha


def _background(rng, size):
    """A colour gradient with low-frequency blobs and clutter (lines and rectangles), [S, S, 3]."""
    base = rng.uniform(0.1, 0.9, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)[..., None]
    image = base + ramp * rng.uniform(-0.4, 0.4, 3)
    cells = int(rng.integers(2, 7))
    blobs = rng.uniform(-1.0, 1.0, (cells, cells, 3)).astype(np.float32)
    image = image + rng.uniform(0.05, 0.25) * cv2.resize(blobs, (size, size),
                                                         interpolation=cv2.INTER_CUBIC)
    image = np.ascontiguousarray(image, np.float32)
    for _ in range(int(rng.integers(0, 5))):
        colour = _colour(rng.uniform(0, 1, 3))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.line(image, p1, p2, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            cv2.rectangle(image, p1, p2, colour, -1)
    return image


def make_face(identity: int, index: int, split: str = "train", seed: int = 0,
              image_size: int = 64) -> dict:
    """Photo number ``index`` of person ``identity`` of ``split``: {"image", "label"}.

    Args:
      identity: the person's number within the split (>= 0); ``label`` is this number.
      index: the photo's number (>= 0); any number of photos per person.
      split: "train", "validation" or "test" (disjoint people).
      seed: a different seed gives different people and photos.
      image_size: side of the square image (>= 24).

    Returns:
      {"image": float32 [S, S, 3] in [0, 1], "label": int32 []}.
    """
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24, got {image_size}")
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    p = identity_parameters(identity, split, seed)
    rng = np.random.default_rng([int(seed), 11, global_identity(split, identity), int(index)])
    canvas = 2 * image_size  # drawn at twice the size, then warped down (smoother edges)
    layer, alpha = _draw_face(p, rng, canvas)
    # Pose: in-plane rotation, scale, shift; one affine warp of canvas -> image coordinates.
    angle = rng.uniform(-15.0, 15.0)
    scale = 0.5 * rng.uniform(0.8, 1.1)
    shift = rng.uniform(-0.1, 0.1, 2) * image_size
    matrix = cv2.getRotationMatrix2D((canvas / 2, canvas / 2), angle, scale)
    matrix[:, 2] += np.array([image_size / 2, image_size / 2]) + shift - canvas / 2
    face = cv2.warpAffine(layer, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(alpha, matrix, (image_size, image_size), flags=cv2.INTER_LINEAR)[..., None]
    image = _background(rng, image_size) * (1.0 - mask) + face * mask
    if rng.random() < 0.05:  # an occluding bar below the eyes (a hand, a scarf, a microphone)
        y0 = int(rng.integers(image_size // 2, image_size))
        height = int(rng.integers(image_size // 12, image_size // 5))
        cv2.rectangle(image, (0, y0), (image_size, y0 + height), _colour(rng.uniform(0, 1, 3)), -1)
    # Lighting: brightness, a directional gradient (light from one side), a colour cast.
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.75, 1.2) * (1.0 + rng.uniform(0.0, 0.6) *
                                     (np.cos(direction) * xx + np.sin(direction) * yy))
    image = image * light[..., None] * rng.uniform(0.94, 1.06, 3)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(0.5, 1.2))
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.03), image.shape)
    return {"image": np.clip(image, 0.0, 1.0).astype(np.float32), "label": np.int32(identity)}


def make_faces(split: str = "train", num_identities: int | None = None,
               images_per_identity: int | None = None, seed: int = 0, image_size: int = 64,
               first_identity: int = 0):
    """Every photo of persons ``first_identity ..`` of a split as arrays, person by person.

    Returns:
      (images float32 [N, S, S, 3], labels int32 [N]) with N = num_identities * images_per_identity;
      labels are the persons' numbers within the split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    num_identities = DEFAULT_IDENTITIES[split] if num_identities is None else int(num_identities)
    images_per_identity = (DEFAULT_IMAGES_PER_IDENTITY[split] if images_per_identity is None
                           else int(images_per_identity))
    if num_identities < 1:
        raise ValueError(f"num_identities must be >= 1, got {num_identities}")
    if images_per_identity < 1:
        raise ValueError(f"images_per_identity must be >= 1, got {images_per_identity}")
    images = np.zeros((num_identities * images_per_identity, image_size, image_size, 3), np.float32)
    labels = np.zeros(num_identities * images_per_identity, np.int32)
    row = 0
    for identity in range(first_identity, first_identity + num_identities):
        for index in range(images_per_identity):
            example = make_face(identity, index, split, seed, image_size)
            images[row], labels[row] = example["image"], example["label"]
            row += 1
    return images, labels
