"""Tests for the warps of common/augment.py: rotation by any angle, shear, elastic warping.

References used (independent of the code under test): the existing exact
quarter turn ``random_rotate90`` and ``numpy.rot90``;
``tf.raw_ops.ImageProjectiveTransformV3`` (the kernel behind
keras.layers.RandomRotation) for the bilinear sampler; NumPy re-implementations
of the inverse maps (float64, nearest neighbour) that draw each transformed
mask directly, at the image's resolution and 4 times finer; boxes worked out
by hand for dropping and padding.

Run: python -m pytest -q tests/test_augment_geometric.py   (about 30 s on 2 CPU cores)
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import augment, data
from common.synthetic import make_scene

SIZE = 64
MAX_BOXES = 8
SEED = tf.constant([3, 5], tf.int64)


def numpy_batch(batch):
    return {key: np.asarray(value) for key, value in batch.items()}


def scene_batch(num_examples=8, size=SIZE, max_boxes=6):
    """A padded detection + instance + semantic batch of shapes scenes (NumPy)."""
    examples = [make_scene(i, image_size=size, min_objects=1, max_objects=4)
                for i in range(num_examples)]
    batch = {"image": np.stack([e["image"] for e in examples]),
             "boxes": np.zeros((num_examples, max_boxes, 4), np.float32),
             "classes": np.full((num_examples, max_boxes), -1, np.int32),
             "masks": np.zeros((num_examples, max_boxes, size, size), np.uint8),
             "mask": np.stack([e["mask"] for e in examples])}
    for i, e in enumerate(examples):
        count = len(e["classes"])
        batch["boxes"][i, :count] = e["boxes"]
        batch["classes"][i, :count] = e["classes"]
        batch["masks"][i, :count] = e["masks"]
    return batch


def with_row_ids(batch):
    """Classes replaced by the row index, so each object can be found after a transform."""
    batch = dict(batch)
    rows = np.broadcast_to(np.arange(batch["classes"].shape[1], dtype=np.int32),
                           batch["classes"].shape)
    batch["classes"] = np.where(batch["classes"] >= 0, rows, -1).astype(np.int32)
    return batch


def smooth_image(size=SIZE, batch_size=2):
    """Low-frequency colour patterns (bilinear interpolation is nearly exact on them)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    channels = [np.sin(2 * np.pi * y) * np.cos(1.5 * np.pi * x), np.cos(2 * np.pi * (x + 0.5 * y)),
                np.sin(np.pi * x) * np.sin(np.pi * y)]
    image = (0.5 + 0.4 * np.stack(channels, axis=-1)).astype(np.float32)
    return np.stack([image if i % 2 == 0 else image[::-1] for i in range(batch_size)])


@pytest.fixture(scope="module")
def scenes():
    return scene_batch()


@pytest.fixture(scope="module")
def small_scenes():
    """Where the size does not matter: 4 scenes of 32 px (tracing and eager ops stay cheap)."""
    return scene_batch(4, size=32, max_boxes=4)


@pytest.fixture(scope="module")
def shapes_with_masks():
    """The issue's data: 32 shapes scenes of 64 px with instance masks, padded to 8 rows."""
    dataset = data.load("shapes", "train", image_size=SIZE, num_examples=32, with_masks=True)
    batch = numpy_batch(next(iter(data.batch_detection(dataset, 32, max_boxes=MAX_BOXES,
                                                       with_masks=True))))
    return with_row_ids(batch)


# --------------------------------------------------------------------------- exact cases


def test_rotation_by_90_degrees_is_the_quarter_turn(scenes):
    turned = numpy_batch(augment.random_rotate90(scenes, SEED))
    # Which quarter turn did each example get? Ask numpy.rot90 (counter-clockwise).
    turns = np.array([next(k for k in range(4)
                           if np.array_equal(np.rot90(scenes["image"][i], k), turned["image"][i]))
                      for i in range(len(scenes["image"]))])
    assert {1, 2, 3} <= set(turns.tolist()), "pick a seed that draws every quarter turn"
    for mask_boxes in (True, False):
        rotated = numpy_batch(augment.rotate_batch(scenes, 90.0 * turns, mask_boxes=mask_boxes))
        np.testing.assert_allclose(rotated["image"], turned["image"], atol=1e-5)
        for key in ("masks", "mask", "classes"):
            np.testing.assert_array_equal(rotated[key], turned[key], err_msg=key)
        # Tight boxes (from the masks) and loose ones (from the corners) are both exact here.
        np.testing.assert_allclose(rotated["boxes"], turned["boxes"], atol=1e-6)


def test_half_turn_of_a_non_square_image_reverses_both_axes():
    batch = scene_batch(2)
    batch = {"image": batch["image"][:, :, 8:56], "mask": batch["mask"][:, :, 8:56]}  # 64 x 48
    result = numpy_batch(augment.rotate_batch(batch, 180.0))
    np.testing.assert_allclose(result["image"], batch["image"][:, ::-1, ::-1], atol=1e-5)
    np.testing.assert_array_equal(result["mask"], batch["mask"][:, ::-1, ::-1])
    boxes = np.array([[[0.1, 0.2, 0.4, 0.5]]], np.float32)
    moved = numpy_batch(augment.rotate_batch(
        {"image": batch["image"][:1], "boxes": boxes, "classes": np.array([[2]], np.int32)}, 180.0))
    np.testing.assert_allclose(moved["boxes"], [[[0.6, 0.5, 0.9, 0.8]]], atol=1e-6)


def test_shear_zero_zero_field_and_zero_angle_are_identities(scenes):
    zero_field = np.zeros(scenes["image"].shape[:3] + (2,), np.float32)
    identities = {
        "shear_batch": augment.shear_batch(scenes, 0.0, 0.0),
        "random_shear": augment.random_shear(scenes, SEED, max_x_shear=0.0, max_y_shear=0.0),
        "elastic_warp_batch": augment.elastic_warp_batch(scenes, zero_field),
        "random_elastic": augment.random_elastic(scenes, SEED, alpha=0.0),
        "rotate_batch": augment.rotate_batch(scenes, 0.0),
        "affine_batch": augment.affine_batch(scenes, np.tile(np.eye(2, dtype=np.float32),
                                                             (len(scenes["image"]), 1, 1))),
    }
    for name, result in identities.items():
        for key in scenes:
            np.testing.assert_array_equal(np.asarray(result[key]), scenes[key],
                                          err_msg=f"{name} {key}")
    # ... and they are not identities when switched on.
    for result in (augment.shear_batch(scenes, 0.1), augment.random_elastic(scenes, SEED)):
        assert not np.array_equal(np.asarray(result["image"]), scenes["image"])


def test_sampler_matches_image_projective_transform():
    """Our inverse-map sampler against TF's projective-transform kernel (interior pixels)."""
    images = smooth_image()
    degrees = np.array([23.0, -37.0], np.float32)
    x_shear, y_shear = np.array([0.2, -0.15], np.float32), np.array([0.1, 0.05], np.float32)
    centre = (SIZE - 1) / 2.0  # image centre in the kernel's pixel-index coordinates
    radians = np.deg2rad(degrees)
    cos, sin = np.cos(radians), np.sin(radians)
    inverses = {  # (y, x) -> (y, x) inverse maps, one 2 x 2 matrix per example
        "rotation": np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1),
        "shear": np.stack([np.linalg.inv(np.array([[1.0, ky], [0.0, 1.0]])
                                         @ np.array([[1.0, 0.0], [kx, 1.0]]))
                           for kx, ky in zip(x_shear, y_shear)]),
    }
    ours = {"rotation": augment.rotate_batch({"image": images}, degrees)["image"],
            "shear": augment.shear_batch({"image": images}, x_shear, y_shear)["image"]}
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    interior = np.hypot(rows - centre, cols - centre) < SIZE / 2 - 8  # never read from outside
    for name, inverse in inverses.items():
        # The kernel maps output (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2).
        transforms = [[m[1, 1], m[1, 0], centre - m[1, 1] * centre - m[1, 0] * centre,
                       m[0, 1], m[0, 0], centre - m[0, 0] * centre - m[0, 1] * centre, 0.0, 0.0]
                      for m in inverse]
        reference = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=np.asarray(transforms, np.float32), output_shape=[SIZE, SIZE],
            fill_value=0.5, interpolation="BILINEAR", fill_mode="CONSTANT")
        difference = np.abs(np.asarray(ours[name]) - np.asarray(reference))[:, interior]
        assert difference.max() < 1e-4, name


def test_rotation_then_its_inverse_returns_the_image():
    images = smooth_image()
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    # Pixels whose centre stays within the image in every intermediate step.
    interior = np.hypot(rows - SIZE / 2, cols - SIZE / 2) < SIZE / 2 - 1.5
    for degrees in (10.0, 33.0, -57.0):
        once = augment.rotate_batch({"image": images}, degrees)
        back = np.asarray(augment.rotate_batch(once, -degrees)["image"])
        assert np.abs(np.asarray(once["image"]) - images)[:, interior].max() > 0.1  # it moved
        assert np.abs(back - images)[:, interior].max() < 0.02, degrees  # two bilinear reads
    sheared = augment.shear_batch({"image": images}, 0.25)
    back = np.asarray(augment.shear_batch(sheared, -0.25)["image"])
    middle = (np.abs(rows - SIZE / 2) < SIZE / 2 - 1) & (np.abs(cols - SIZE / 2) < SIZE / 2 - 10)
    assert np.abs(back - images)[:, middle].max() < 0.02


def test_random_affine_is_rotation_then_shear_in_one_pass():
    images = smooth_image(batch_size=4)
    seeds = augment._split_seed(SEED, 3)
    degrees = tf.random.stateless_uniform([4], seeds[0], -30.0, 30.0)
    x_shear = tf.random.stateless_uniform([4], seeds[1], -0.2, 0.2)
    y_shear = tf.random.stateless_uniform([4], seeds[2], -0.1, 0.1)
    once = np.asarray(augment.random_affine({"image": images}, SEED, 30.0, 0.2, 0.1)["image"])
    twice = augment.shear_batch(augment.rotate_batch({"image": images}, degrees), x_shear, y_shear)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    interior = np.hypot(rows - SIZE / 2, cols - SIZE / 2) < SIZE / 2 - 12
    assert np.abs(once - np.asarray(twice["image"]))[:, interior].max() < 0.02
    rotation_only = augment.random_affine({"image": images}, SEED, 30.0, 0.0, 0.0)["image"]
    rotated = augment.rotate_batch({"image": images}, degrees)["image"]
    np.testing.assert_array_equal(np.asarray(rotation_only), np.asarray(rotated))


# --------------------------------------------------------------------------- boxes


def _nearest_box(on):
    """Tight normalized box of a boolean [h, w] array (pixel-edge convention), or None."""
    if not on.any():
        return None
    ys, xs = np.nonzero(on)
    h, w = on.shape
    return np.array([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w])


def _iou(a, b):
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def _bilinear_numpy(field, ys, xs):
    """field [H, W, C] read at pixel-edge positions ys, xs (edge pixels extend outwards)."""
    height, width = field.shape[:2]
    rows, cols = ys - 0.5, xs - 0.5
    row0, col0 = np.floor(rows), np.floor(cols)
    fy, fx = (rows - row0)[..., None], (cols - col0)[..., None]

    def at(r, c):
        return field[np.clip(r, 0, height - 1).astype(int), np.clip(c, 0, width - 1).astype(int)]

    return ((1 - fy) * (1 - fx) * at(row0, col0) + (1 - fy) * fx * at(row0, col0 + 1)
            + fy * (1 - fx) * at(row0 + 1, col0) + fy * fx * at(row0 + 1, col0 + 1))


def _draw_directly(mask, source_y, source_x):
    """The transformed mask drawn in NumPy: each output point reads the input pixel under it."""
    height, width = mask.shape
    inside = (source_y >= 0) & (source_y <= height) & (source_x >= 0) & (source_x <= width)
    rows = np.clip(np.floor(source_y), 0, height - 1).astype(int)
    cols = np.clip(np.floor(source_x), 0, width - 1).astype(int)
    return inside & (mask[rows, cols] != 0)


def _warps(batch_size):
    """(name, transform(batch, mask_boxes), inverse map at output points) of the three warps."""
    rng = np.random.default_rng(0)
    degrees = rng.uniform(-30.0, 30.0, batch_size).astype(np.float32)
    x_shear = rng.uniform(-0.3, 0.3, batch_size).astype(np.float32)
    y_shear = rng.uniform(-0.3, 0.3, batch_size).astype(np.float32)
    field = np.asarray(augment.elastic_displacement(SEED, batch_size, SIZE, SIZE))  # Simard's 34, 4
    centre = SIZE / 2.0

    def rotation_inverse(b, ys, xs):
        t = np.deg2rad(np.float64(degrees[b]))
        dy, dx = ys - centre, xs - centre
        return np.cos(t) * dy + np.sin(t) * dx + centre, -np.sin(t) * dy + np.cos(t) * dx + centre

    def shear_inverse(b, ys, xs):
        dy, dx = ys - centre, xs - centre
        dy = dy - np.float64(y_shear[b]) * dx         # undo the vertical shear, then
        return dy + centre, dx - np.float64(x_shear[b]) * dy + centre  # the horizontal one

    def elastic_inverse(b, ys, xs):
        d = _bilinear_numpy(field[b].astype(np.float64), ys, xs)  # the field between pixel centres
        return ys + d[..., 0], xs + d[..., 1]

    return [
        ("rotation", lambda batch, **k: augment.rotate_batch(batch, degrees, **k),
         rotation_inverse),
        ("shear", lambda batch, **k: augment.shear_batch(batch, x_shear, y_shear, **k),
         shear_inverse),
        ("elastic", lambda batch, **k: augment.elastic_warp_batch(batch, field, **k),
         elastic_inverse),
    ]


def test_recomputed_boxes_enclose_their_masks_and_are_tight(shapes_with_masks):
    batch = shapes_with_masks
    batch_size = len(batch["image"])
    centres = (np.arange(SIZE) + 0.5)
    grid_y, grid_x = np.meshgrid(centres, centres, indexing="ij")
    fine_centres = (np.arange(4 * SIZE) + 0.5) / 4.0  # a 4x finer grid of output points
    fine_y, fine_x = np.meshgrid(fine_centres, fine_centres, indexing="ij")
    for name, transform, inverse in _warps(batch_size):
        tight = numpy_batch(transform(batch))
        loose = numpy_batch(transform(batch, mask_boxes=False))
        ious, fine_ious, loose_ious, objects = [], [], [], 0
        for b in range(batch_size):
            source = inverse(b, grid_y, grid_x)
            fine_source = inverse(b, fine_y, fine_x)
            loose_rows = {int(c): r for r, c in enumerate(loose["classes"][b]) if c >= 0}
            for row in np.flatnonzero(tight["classes"][b] >= 0):
                objects += 1
                source_row = tight["classes"][b, row]
                box, mask = tight["boxes"][b, row], tight["masks"][b, row].astype(bool)
                # Encloses its mask: every mask pixel lies inside the box (exact).
                ys, xs = np.nonzero(mask)
                assert ys.min() >= box[0] * SIZE - 1e-4 and ys.max() + 1 <= box[2] * SIZE + 1e-4
                assert xs.min() >= box[1] * SIZE - 1e-4 and xs.max() + 1 <= box[3] * SIZE + 1e-4
                # Tight: the box of the mask drawn directly (NumPy, float64).
                drawn = _draw_directly(batch["masks"][b, source_row], *source)
                assert np.mean(drawn != mask) < 0.005, name  # the same mask, but for float ties
                ious.append(_iou(box, _nearest_box(drawn)))
                # Against the object drawn 4x finer: within a pixel and a half on every side.
                fine = _nearest_box(_draw_directly(batch["masks"][b, source_row], *fine_source))
                assert np.abs(box - fine).max() * SIZE <= 1.5 + 1e-4, name
                fine_ious.append(_iou(box, fine))
                if source_row in loose_rows:  # the loose box encloses the object
                    loose_box = loose["boxes"][b, loose_rows[source_row]]
                    margin = np.min([fine[0] - loose_box[0], fine[1] - loose_box[1],
                                     loose_box[2] - fine[2], loose_box[3] - fine[3]]) * SIZE
                    assert margin > -0.35, (name, margin)
                    loose_ious.append(_iou(loose_box, fine))
        assert objects >= 50, name  # most of the 69 objects survive these warps
        assert min(ious) >= 0.95, (name, min(ious))
        assert np.mean(fine_ious) >= 0.93, (name, np.mean(fine_ious))
        assert np.mean(fine_ious) > np.mean(loose_ious) + 0.05, name  # tight is tighter


def test_dropping_by_visible_fraction_and_padding_by_hand():
    """Zoom in 2x about the centre (affine_batch): points move to 2 * (p - 20) + 20 px."""
    boxes = np.array([[[0.0, 0.0, 0.2, 0.2],     # pixels 0..8 -> -20..-4: leaves the image
                       [0.4, 0.4, 0.6, 0.6],     # 16..24 -> 12..28: kept
                       [0.1, 0.4, 0.3, 0.6],     # rows 4..12 -> -12..4: 1/4 visible
                       [0.0, 0.0, 0.0, 0.0],     # padding
                       [0.6, 0.6, 0.7, 0.8]]],   # 24..28 x 24..32 -> 28..36 x 28..44: clipped
                     np.float32)
    classes = np.array([[3, 1, 4, -1, 2]], np.int32)
    masks = np.zeros((1, 5, 40, 40), np.uint8)
    for row, (y0, x0, y1, x1) in enumerate(np.round(boxes[0] * 40).astype(int)):
        masks[0, row, y0:y1, x0:x1] = row != 3
    image = np.zeros((1, 40, 40, 3), np.float32)
    zoom = np.array([[[2.0, 0.0], [0.0, 2.0]]], np.float32)
    for with_masks in (True, False):
        batch = {"image": image, "boxes": boxes, "classes": classes}
        if with_masks:
            batch["masks"] = masks
        centre, top, corner = [0.3, 0.3, 0.7, 0.7], [0.0, 0.3, 0.1, 0.7], [0.7, 0.7, 0.9, 1.0]
        for min_visible, expected_boxes, expected_classes in (
                (0.3, [centre, corner], [1, 2]), (0.2, [centre, top, corner], [1, 4, 2])):
            result = numpy_batch(augment.affine_batch(batch, zoom, min_visible=min_visible))
            padding = 5 - len(expected_classes)
            np.testing.assert_allclose(result["boxes"][0],
                                       expected_boxes + [[0, 0, 0, 0]] * padding, atol=1e-6)
            np.testing.assert_array_equal(result["classes"][0], expected_classes + [-1] * padding)
            if with_masks:
                assert np.all(result["masks"][0, len(expected_classes):] == 0)
                assert result["masks"][0, 0].sum() == 16 * 16  # 8 x 8 pixels grown 2x


def test_empty_scenes_no_rows_and_empty_batch():
    warps = [functools.partial(augment.random_rotate, max_degrees=40.0), augment.random_shear,
             augment.random_affine, augment.random_elastic]
    empty = scene_batch(2)
    empty["boxes"][:] = 0
    empty["classes"][:] = -1
    empty["masks"][:] = 0
    no_rows = {k: v[:, :0] if k in ("boxes", "classes", "masks") else v
               for k, v in scene_batch(2).items()}
    no_examples = {k: v[:0] for k, v in scene_batch(1).items()}
    for warp in warps:
        for case in (empty, no_rows, no_examples):
            result = numpy_batch(warp(case, SEED))
            for key in case:
                assert result[key].shape == case[key].shape, key
        assert np.all(numpy_batch(warp(empty, SEED))["classes"] == -1)
        assert np.all(numpy_batch(warp(empty, SEED))["boxes"] == 0)


# --------------------------------------------------------------------------- randomness


def test_determinism_under_a_seed(small_scenes):
    scenes = small_scenes
    for warp in (augment.random_rotate, augment.random_shear, augment.random_affine,
                 augment.random_elastic):
        first, second = warp(scenes, [5, 6]), warp(scenes, [5, 6])
        for key in scenes:
            np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]))
        other = warp(scenes, [5, 7])
        assert not np.array_equal(np.asarray(first["image"]), np.asarray(other["image"]))
        # Each example draws its own warp: eight copies of one image come out eight ways.
        copies = np.repeat(smooth_image(size=32, batch_size=1), 8, axis=0)
        outputs = np.asarray(warp({"image": copies}, SEED)["image"]).reshape(8, -1)
        assert len(np.unique(outputs.round(4), axis=0)) == 8
    # (Graph and eager give the same numbers: see the train_step and tf.data tests.)


def composed_by_hand(batch, seed, rotation, shear, elastic_alpha, elastic_sigma=4.0):
    """What Augmenter("detection", rotation=..., shear=..., elastic_alpha=..., scale_range=None,
    colour off) must do: the existing flip on its slot, then the warps on the new slot, split in
    two (rotation + shear in one pass, elastic)."""
    seeds = augment._split_seed(seed, augment._NUM_SLOTS)
    batch = augment.random_flip_left_right(batch, seeds[augment._SLOTS["flip_left_right"]], 0.5)
    warp_seeds = augment._split_seed(seeds[augment._SLOTS["warp"]], 2)
    batch = augment.random_affine(batch, warp_seeds[0], rotation, shear, shear)
    return augment.random_elastic(batch, warp_seeds[1], elastic_alpha, elastic_sigma)


WARP_OPTIONS = {"rotation": 25.0, "shear": 0.15, "elastic_alpha": 34.0, "scale_range": None,
                "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def test_composer_new_options_and_unchanged_defaults(small_scenes):
    scenes = small_scenes
    # The composer's steps run eagerly here (Augmenter._augment); the tf.data test runs them traced.
    # Defaults: exactly the composition of the existing operations on their seed slots.
    seeds = augment._split_seed([1, 2], augment._NUM_SLOTS)
    expected = augment.random_flip_left_right(scenes, seeds[0], 0.5)
    expected = augment.random_scale_crop(expected, seeds[3], (0.8, 1.25))
    expected = augment.color_jitter(expected, seeds[5], 0.1, 0.1, 0.1, 0.02)
    result = augment.make_augmenter("detection")._augment(scenes, augment._as_seed([1, 2]))
    for key in scenes:
        np.testing.assert_array_equal(np.asarray(result[key]), np.asarray(expected[key]),
                                      err_msg=key)
    # The warps switched on: one new seed slot, split in two, and a config that round-trips.
    warping = augment.make_augmenter("detection", **WARP_OPTIONS)
    expected = composed_by_hand(scenes, [1, 2], 25.0, 0.15, 34.0)
    result = warping._augment(scenes, augment._as_seed([1, 2]))
    for key in scenes:
        np.testing.assert_array_equal(np.asarray(result[key]), np.asarray(expected[key]),
                                      err_msg=key)
    assert not np.array_equal(np.asarray(result["image"]), scenes["image"])
    config = warping.get_config()
    assert augment.Augmenter(**config).get_config() == config
    assert config["rotation"] == 25.0 and config["elastic_sigma"] == 4.0
    layer = augment.BatchAugmentation("classification", seed=1, rotation=15.0, shear=0.1,
                                      elastic_alpha=10.0, elastic_sigma=3.0)
    config = layer.get_config()
    assert augment.BatchAugmentation.from_config(config).get_config() == config
    np.testing.assert_array_equal(layer(scenes["image"], training=False), scenes["image"])


# --------------------------------------------------------------------------- placements


class WarpInTrainStep(keras.Model):
    """A tiny net whose train_step warps the batch dict first and reports what it saw."""

    def __init__(self, warp, **kwargs):
        super().__init__(**kwargs)
        self.warp = warp
        self.body = keras.Sequential([keras.layers.Conv2D(4, 3, strides=4, activation="relu"),
                                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])

    def call(self, images, training=False):
        return self.body(images, training=training)

    def train_step(self, batch):
        batch = self.warp(batch)
        target = tf.reduce_max(tf.one_hot(batch["classes"], 5), axis=1)  # class -1 -> zeros
        with tf.GradientTape() as tape:
            logits = self(batch["image"], training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(target, logits))
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return {"loss": loss, "image_sum": tf.reduce_sum(batch["image"]),
                "kept": tf.reduce_sum(tf.cast(batch["classes"] >= 0, tf.float32)),
                "mask_sum": tf.reduce_sum(tf.cast(batch["masks"], tf.float32))}


def test_inside_a_compiled_train_step_and_with_xla(small_scenes):
    batch = {k: v for k, v in small_scenes.items() if k != "mask"}
    field = augment.elastic_displacement([1, 1], 4, 32, 32, alpha=20.0, sigma=3.0)

    def random_warps(b):
        b = augment.random_rotate(b, SEED, 30.0)
        b = augment.random_shear(b, SEED)
        return augment.random_elastic(b, SEED, alpha=20.0, sigma=3.0)

    keras.utils.set_random_seed(0)
    model = WarpInTrainStep(random_warps)
    model.compile(optimizer="sgd", jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0).history
    eager = numpy_batch(random_warps(batch))  # the same numbers eagerly
    assert 0 < (eager["classes"] >= 0).sum()
    np.testing.assert_allclose(history["image_sum"][0], eager["image"].sum(), rtol=1e-4)
    assert history["kept"][0] == (eager["classes"] >= 0).sum()
    assert history["mask_sum"][0] == eager["masks"].astype(np.float32).sum()

    # XLA: the warps compile (gathers, no crop_and_resize). Given their parameters they agree
    # with eager; XLA's stateless generator draws other numbers from a seed than TF's kernels,
    # so under XLA the random versions are deterministic but not equal to the eager draw.
    def given_warps(b):
        b = augment.rotate_batch(b, [10.0, -20.0, 30.0, 5.0])
        b = augment.shear_batch(b, 0.1, -0.1)
        return augment.elastic_warp_batch(b, field)

    compiled = numpy_batch(tf.function(given_warps, jit_compile=True)(batch))
    eager = numpy_batch(given_warps(batch))
    np.testing.assert_allclose(compiled["image"], eager["image"], atol=1e-5)
    for key in ("boxes", "classes", "masks"):
        np.testing.assert_array_equal(compiled[key], eager[key], err_msg=key)


def test_in_tf_data_after_batch_matches_direct_calls():
    batch = scene_batch(6, size=32, max_boxes=4)
    augmenter = augment.make_augmenter("detection", **WARP_OPTIONS)
    dataset = tf.data.Dataset.from_tensor_slices(batch).batch(4)  # batches of 4 and 2
    augmented = list(augment.augment_dataset(dataset, augmenter, seed=9))
    assert [len(b["image"]) for b in augmented] == [4, 2]
    for index, (result, start) in enumerate(zip(augmented, (0, 4))):
        direct = composed_by_hand({k: v[start:start + 4] for k, v in batch.items()}, [9, index],
                                  25.0, 0.15, 34.0)
        for key in batch:
            np.testing.assert_allclose(np.asarray(result[key], np.float32),
                                       np.asarray(direct[key], np.float32), atol=1e-5, err_msg=key)


# --------------------------------------------------------------------------- picture, errors


def test_tight_and_loose_boxes_picture(tmp_path, scenes):
    import matplotlib.pyplot as plt

    path = tmp_path / "tight_vs_loose.png"
    figure = augment.show_tight_and_loose_boxes(
        scenes, functools.partial(augment.random_rotate, max_degrees=40.0), SEED, index=1,
        save_path=path)
    assert path.exists() and path.stat().st_size > 1000
    tight = numpy_batch(augment.random_rotate(scenes, SEED, 40.0))
    loose = numpy_batch(augment.random_rotate(scenes, SEED, 40.0, mask_boxes=False))
    left, right = figure.axes
    assert len(left.patches) == (scenes["classes"][1] >= 0).sum()
    assert len(right.patches) == (tight["classes"][1] >= 0).sum() + (loose["classes"][1] >= 0).sum()
    plt.close(figure)
    with pytest.raises(ValueError, match="masks"):
        augment.show_tight_and_loose_boxes({"image": scenes["image"]}, augment.random_rotate, SEED)


def test_bad_arguments_raise_value_error(scenes):
    cases = [
        lambda: augment.random_rotate(scenes, SEED, max_degrees=-1.0),
        lambda: augment.random_shear(scenes, SEED, max_x_shear=1.5),
        lambda: augment.random_affine(scenes, SEED, max_y_shear=-0.1),
        lambda: augment.elastic_displacement(SEED, 1, 8, 8, sigma=0.0),
        lambda: augment.rotate_batch(scenes, np.zeros((2, 2))),
        lambda: augment.affine_batch(scenes, np.zeros((8, 3, 3))),
        lambda: augment.elastic_warp_batch(scenes, np.zeros((8, 64, 64))),
        lambda: augment.rotate_batch(scenes, 10.0, min_visible=1.5),
        lambda: augment.resample(scenes["image"], np.zeros((8, 2, 2)), np.zeros((8, 2, 2)),
                                 "cubic"),
        lambda: augment.rotate_batch({"image": scenes["image"], "masks": scenes["masks"]}, 10.0),
        lambda: augment.make_augmenter("detection", rotation=200.0),
        lambda: augment.make_augmenter("detection", elastic_alpha=-1.0),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
