"""Tests for common/augment.py: geometry keeps boxes, masks and pixels together.

References used (independent of the code under test): keras.layers.RandomFlip
for flips with rel_yxyx boxes; keras.layers.RandomBrightness / RandomContrast /
RandomSaturation / RandomHue for the colour ops; numpy.linalg.eigh for rgb_pca;
numpy slicing / block means for hand-computable crop windows; tight boxes of
the transformed masks for box consistency.

Run: python -m pytest -q tests/test_augment.py   (about a minute on 2 CPU cores)
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from common import augment
from common.synthetic import make_scene, make_classification_example

SIZE = 64
MAX_BOXES = 6


def detection_batch(num_examples=8, start=0, size=SIZE, max_boxes=MAX_BOXES, with_semantic=True):
    """A padded detection + instance + semantic batch of shapes scenes (numpy)."""
    examples = [make_scene(start + i, image_size=size, min_objects=1, max_objects=4)
                for i in range(num_examples)]
    batch = {
        "image": np.stack([e["image"] for e in examples]),
        "boxes": np.zeros((num_examples, max_boxes, 4), np.float32),
        "classes": np.full((num_examples, max_boxes), -1, np.int32),
        "masks": np.zeros((num_examples, max_boxes, size, size), np.uint8),
    }
    if with_semantic:
        batch["mask"] = np.stack([e["mask"] for e in examples])
    for i, e in enumerate(examples):
        count = len(e["classes"])
        batch["boxes"][i, :count] = e["boxes"]
        batch["classes"][i, :count] = e["classes"]
        batch["masks"][i, :count] = e["masks"]
    return batch


def with_row_ids(batch):
    """Replace classes by the row index so we can find each object after a transform."""
    batch = dict(batch)
    shape = batch["classes"].shape
    rows = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
    batch["classes"] = np.where(batch["classes"] >= 0, rows, -1).astype(np.int32)
    return batch


def numpy_batch(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


SEED = tf.constant([7, 11])

GEOMETRIC = {
    "flip_left_right": lambda b, s: augment.random_flip_left_right(b, s, probability=0.5),
    "flip_up_down": lambda b, s: augment.random_flip_up_down(b, s, probability=0.5),
    "rotate90": augment.random_rotate90,
    "zoom_in": lambda b, s: augment.random_scale_crop(b, s, scale_range=(1.2, 1.6)),
    "zoom_out": lambda b, s: augment.random_scale_crop(b, s, scale_range=(0.6, 0.9)),
    "scale_crop_resize": lambda b, s: augment.random_scale_crop(b, s, scale_range=(0.8, 1.25),
                                                                 output_size=(48, 56)),
    "vgg_scale_jitter": lambda b, s: augment.vgg_scale_jitter(b, s, scale_range=(1.0, 1.5)),
}


@pytest.fixture(scope="module")
def batch():
    return with_row_ids(detection_batch(8))


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_masks_boxes_and_pixels_stay_together(batch, name):
    original = numpy_batch(batch)
    result = numpy_batch(GEOMETRIC[name](batch, SEED))
    _, out_h, out_w, _ = result["image"].shape
    kept = 0
    for b in range(len(original["image"])):
        for row in range(MAX_BOXES):
            source = result["classes"][b, row]
            if source < 0:
                continue
            kept += 1
            mask = result["masks"][b, row].astype(bool)
            assert mask.any(), f"{name}: kept object with empty mask"
            ys, xs = np.nonzero(mask)
            tight = np.array([ys.min() / out_h, xs.min() / out_w, (ys.max() + 1) / out_h,
                              (xs.max() + 1) / out_w])
            box = result["boxes"][b, row]
            pixel = np.array([out_h, out_w, out_h, out_w])
            # The box is the tight box of the resampled mask within 1.5 px, and
            # so the mask lies inside the box with that tolerance.
            np.testing.assert_array_less(np.abs(box - tight) * pixel, 1.5, err_msg=name)
            # Pixels under the transformed mask have the shape's colour.
            before = original["image"][b][original["masks"][b, source].astype(bool)].mean(axis=0)
            after = result["image"][b][mask].mean(axis=0)
            np.testing.assert_allclose(after, before, atol=0.08, err_msg=name)
        # The semantic mask moves with the instance masks: every instance pixel
        # carries its object's semantic label (class + 1 of the original scene).
        if "mask" in result:
            union = result["masks"][b].any(axis=0)
            assert np.all(result["mask"][b][union] > 0), name
    assert kept > 0


def test_flips_twice_are_identity_and_match_keras_random_flip(batch):
    for flip in (augment.random_flip_left_right, augment.random_flip_up_down):
        once = flip(batch, SEED)
        twice = numpy_batch(flip(once, SEED))
        for key in batch:
            np.testing.assert_array_equal(twice[key], batch[key], err_msg=f"{flip.__name__} {key}")
        flipped = np.array([not np.array_equal(np.asarray(once["image"][i]), batch["image"][i])
                            for i in range(len(batch["image"]))])
        assert 0 < flipped.sum() < len(flipped), "decisions should differ between examples"

    # Reference: Keras flips the images, and boxes given as rel_yxyx.
    for mode, ours in (("horizontal", augment.random_flip_left_right),
                       ("vertical", augment.random_flip_up_down)):
        layer = keras.layers.RandomFlip(mode, seed=3, bounding_box_format="rel_yxyx")
        keras_out = layer({"images": tf.constant(batch["image"]),
                           "bounding_boxes": {"boxes": tf.constant(batch["boxes"]),
                                              "labels": tf.constant(batch["classes"])}},
                          training=True)
        all_flipped = numpy_batch(ours(batch, SEED, probability=1.0))
        keras_images = np.asarray(keras_out["images"])
        keras_boxes = np.asarray(keras_out["bounding_boxes"]["boxes"])
        valid = batch["classes"] >= 0
        for i in range(len(batch["image"])):
            keras_flipped = not np.array_equal(keras_images[i], batch["image"][i])
            expected = all_flipped if keras_flipped else batch
            np.testing.assert_array_equal(keras_images[i], expected["image"][i])
            np.testing.assert_allclose(keras_boxes[i][valid[i]], expected["boxes"][i][valid[i]],
                                       atol=1e-6)


def test_crop_window_by_hand():
    """Explicit windows with results computable by hand."""
    data = detection_batch(2)
    # Whole image -> exact identity.
    identity = numpy_batch(augment.crop_and_resize_batch(data, [[0, 0, 1, 1]] * 2))
    for key in data:
        np.testing.assert_array_equal(identity[key], data[key], err_msg=key)
    # Top-left quarter at the same size: nearest neighbour = every pixel twice.
    quarter = numpy_batch(augment.crop_and_resize_batch(data, [[0, 0, 0.5, 0.5]] * 2))
    half = SIZE // 2
    expected = data["mask"][:, :half, :half].repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(quarter["mask"], expected)
    # Whole image at half size: output pixel centres fall between 2 x 2 input
    # blocks, so bilinear gives the block mean and nearest one of the block's
    # pixels (a tie: which one depends on float rounding).
    small = numpy_batch(augment.crop_and_resize_batch(
        data, [[0, 0, 1, 1]] * 2, output_size=(half, half), mask_boxes=False))
    block_mean = data["image"].reshape(2, half, 2, half, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(small["image"], block_mean, atol=1e-5)
    blocks = data["masks"].reshape(2, MAX_BOXES, half, 2, half, 2)
    kept = small["classes"] >= 0
    assert kept.sum() == (data["classes"] >= 0).sum()
    assert np.all(small["masks"][kept] >= blocks.min(axis=(3, 5))[kept])
    assert np.all(small["masks"][kept] <= blocks.max(axis=(3, 5))[kept])
    np.testing.assert_allclose(small["boxes"], data["boxes"], atol=1e-6)  # same normalized boxes
    # Zoom out: the image lands in the middle of a canvas twice its size.
    canvas = [[-0.5, -0.5, 1.5, 1.5]] * 2
    out = numpy_batch(augment.crop_and_resize_batch(data, canvas, fill_value=0.25))
    assert np.all(out["image"][:, :half // 2] == 0.25)
    assert np.all(out["image"][:, :, -half // 2:] == 0.25)
    assert np.all(out["mask"][:, :half // 2] == 255)  # ignore label outside the image
    expected = (data["boxes"][data["classes"] >= 0] + 0.5) / 2.0
    # Boxes from the resampled masks: within a pixel; geometric boxes: exact.
    np.testing.assert_allclose(out["boxes"][out["classes"] >= 0], expected, atol=1.01 / SIZE)
    out = numpy_batch(augment.crop_and_resize_batch(data, canvas, mask_boxes=False))
    np.testing.assert_allclose(out["boxes"][out["classes"] >= 0], expected, atol=1e-6)


def test_zoom_factor_and_vgg_shorter_side(batch):
    # random_scale_crop with a fixed zoom of 1.5: boxes that are not clipped grow 1.5 times.
    result = numpy_batch(augment.random_scale_crop(batch, SEED, scale_range=(1.5, 1.5),
                                                   mask_boxes=False))
    kept = result["classes"] >= 0
    sources = result["classes"][kept]
    before = batch["boxes"][np.nonzero(kept)[0], sources]
    after = result["boxes"][kept]
    inside = np.all((after > 0) & (after < 1), axis=1)
    assert inside.any()
    np.testing.assert_allclose((after[:, 2:] - after[:, :2])[inside],
                               1.5 * (before[:, 2:] - before[:, :2])[inside], atol=1e-5)
    # VGG: shorter side S = 1.0 x the 32 px crop, from a 64 px image: the whole
    # image shrinks by 2, so each output pixel is the mean of a 2 x 2 block.
    images = batch["image"]
    small = np.asarray(augment.vgg_scale_jitter({"image": images}, SEED, scale_range=(1.0, 1.0),
                                                output_size=(32, 32))["image"])
    block_mean = images.reshape(-1, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(small, block_mean, atol=1e-5)


def test_box_clipping_dropping_and_padding_by_hand():
    image = np.zeros((1, 40, 40, 3), np.float32)
    boxes = np.array([[[0.0, 0.0, 0.2, 0.2],     # entirely outside the window -> dropped
                       [0.4, 0.4, 0.6, 0.6],     # half inside -> kept, clipped
                       [0.4, 0.1, 0.6, 0.55],    # 1/9 of its width inside -> dropped (< 0.3)
                       [0.0, 0.0, 0.0, 0.0],     # padding
                       [0.6, 0.6, 0.9, 0.9]]],   # inside -> kept
                     np.float32)
    classes = np.array([[3, 1, 4, -1, 2]], np.int32)
    window = [[0.0, 0.5, 1.0, 1.0]]               # right half of the image
    result = numpy_batch(augment.crop_and_resize_batch(
        {"image": image, "boxes": boxes, "classes": classes}, window, min_visible=0.3))
    # x -> (x - 0.5) / 0.5, clipped to [0, 1]; kept rows first, in order.
    expected = [[0.4, 0.0, 0.6, 0.2], [0.6, 0.2, 0.9, 0.8]] + [[0, 0, 0, 0]] * 3
    np.testing.assert_allclose(result["boxes"][0], expected, atol=1e-6)
    np.testing.assert_array_equal(result["classes"][0], [1, 2, -1, -1, -1])


def check_box_invariants(original, result):
    boxes, classes = np.asarray(result["boxes"]), np.asarray(result["classes"])
    assert np.all(boxes >= 0.0) and np.all(boxes <= 1.0)
    assert np.all(boxes[..., 0] <= boxes[..., 2]) and np.all(boxes[..., 1] <= boxes[..., 3])
    padding = classes < 0
    assert np.all(boxes[padding] == 0.0)
    if "masks" in result:
        assert np.all(np.asarray(result["masks"])[padding] == 0)
    # Never more objects than before; classes of kept objects come from the input.
    assert np.all(padding.sum(axis=1) >= (np.asarray(original["classes"]) < 0).sum(axis=1))


def test_invariants_empty_scenes_batch_of_one_and_empty_batch(batch):
    augmenter = augment.make_augmenter("detection", flip_up_down=0.5, rotate90=True,
                                       scale_range=(0.5, 2.0))
    for seed in range(3):
        check_box_invariants(batch, augmenter(batch, [seed, 1]))
    # No objects at all (every row padding), batch of 1, zero boxes per image, empty batch.
    empty = detection_batch(2)
    empty["boxes"][:] = 0
    empty["classes"][:] = -1
    empty["masks"][:] = 0
    cases = [empty, detection_batch(1),
             {k: v[:, :0] if k in ("boxes", "classes", "masks") else v
              for k, v in detection_batch(2).items()},
             {k: v[:0] for k, v in detection_batch(1).items()}]
    for case in cases:
        result = augmenter(case, [3, 4])
        assert result["image"].shape == case["image"].shape
        assert result["boxes"].shape == case["boxes"].shape
        check_box_invariants(case, result)
    assert np.all(np.asarray(augmenter(empty, [3, 4])["classes"]) == -1)


def test_segmentation_and_classification_batches():
    examples = [make_classification_example(i, image_size=32) for i in range(4)]
    classification = {"image": np.stack([e["image"] for e in examples]),
                      "label": np.array([e["label"] for e in examples])}
    result = augment.make_augmenter("classification")(classification, [1, 2])
    assert result["image"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(result["label"], classification["label"])
    scenes = detection_batch(3)
    segmentation = {"image": scenes["image"], "mask": scenes["mask"]}
    augmenter = augment.make_augmenter("segmentation", scale_range=(0.6, 0.8))
    result = numpy_batch(augmenter(segmentation, [1, 2]))
    assert result["mask"].dtype == np.int32
    assert set(np.unique(result["mask"])) <= set(np.unique(scenes["mask"])) | {255}
    assert (result["mask"] == 255).any()  # zoomed out: the border is "ignore"


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_result_different_seed_different(batch):
    augmenter = augment.make_augmenter("detection", rotate90=True)
    first, second = augmenter(batch, [5, 6]), augmenter(batch, [5, 6])
    for key in batch:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)
    other = augmenter(batch, [5, 7])
    assert not np.array_equal(np.asarray(first["image"]), np.asarray(other["image"]))
    # The eager functions agree with the composed tf.function and a tf.function wrapper.
    compiled = tf.function(lambda b, s: augment.random_scale_crop(b, s))
    eager = augment.random_scale_crop(batch, SEED)
    graph = compiled({k: tf.constant(v) for k, v in batch.items()}, SEED)
    for key in batch:  # graph optimisations may change float rounding of the pixels only
        np.testing.assert_allclose(np.asarray(eager[key]), np.asarray(graph[key]), atol=1e-5,
                                   err_msg=key)


def test_tf_data_after_batch_matches_direct_calls():
    data = detection_batch(6, with_semantic=False)
    augmenter = augment.make_augmenter("detection")
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(4)  # batches of 4 and 2
    augmented = list(augment.augment_dataset(dataset, augmenter, seed=9))
    assert [len(b["image"]) for b in augmented] == [4, 2]
    for index, (result, start) in enumerate(zip(augmented, (0, 4))):
        direct = augmenter({k: v[start:start + 4] for k, v in data.items()}, [9, index])
        for key in data:
            np.testing.assert_array_equal(np.asarray(result[key]), np.asarray(direct[key]),
                                          err_msg=key)


# --------------------------------------------------------------------------- colour


def test_colour_ops_match_keras_layers():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (4, 8, 8, 3)).astype(np.float32))
    deltas = np.array([-0.2, -0.05, 0.1, 0.3], np.float32)
    factors = np.array([0.5, 0.9, 1.2, 1.6], np.float32)
    hue_shifts = np.array([-0.3, -0.02, 0.1, 0.45], np.float32)
    # Keras layers applied with a given transformation (the dict their
    # get_random_transformation would return).
    brightness = keras.layers.RandomBrightness(0.5, value_range=(0, 1))
    contrast = keras.layers.RandomContrast(0.5, value_range=(0, 1))
    saturation = keras.layers.RandomSaturation(0.5, value_range=(0, 1))
    hue = keras.layers.RandomHue(0.5, value_range=(0, 1))
    expected = brightness.transform_images(images, {"rgb_delta": deltas.reshape(-1, 1, 1, 1)})
    np.testing.assert_allclose(augment.adjust_brightness(images, deltas), expected, atol=1e-6)
    expected = contrast.transform_images(images, {"contrast_factor": factors.reshape(-1, 1, 1, 1)})
    np.testing.assert_allclose(augment.adjust_contrast(images, factors), expected, atol=1e-6)
    expected = saturation.transform_images(images, {"factor": factors})
    np.testing.assert_allclose(augment.adjust_saturation_hue(images, saturation_factor=factors),
                               expected, atol=1e-5)
    expected = hue.transform_images(images, {"factor": hue_shifts})
    np.testing.assert_allclose(augment.adjust_saturation_hue(images, hue_delta=hue_shifts),
                               expected, atol=1e-5)


def test_color_jitter_keeps_range_and_targets(batch):
    result = augment.color_jitter(batch, SEED, brightness=0.5, contrast=0.8, saturation=0.9,
                                  hue=0.5)
    image = np.asarray(result["image"])
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert not np.allclose(image, batch["image"], atol=0.01)
    for key in ("boxes", "classes", "masks", "mask"):
        np.testing.assert_array_equal(np.asarray(result[key]), batch[key])
    with pytest.raises(ValueError, match="hue"):
        augment.color_jitter(batch, SEED, hue=0.7)


def test_rgb_pca_against_numpy_and_pca_color():
    images = np.stack([make_scene(i, image_size=32)["image"] for i in range(6)])
    values, vectors = augment.rgb_pca(images)
    pixels = images.reshape(-1, 3).astype(np.float64)
    ref_values, ref_vectors = np.linalg.eigh(np.cov(pixels, rowvar=False))
    np.testing.assert_allclose(values, ref_values[::-1], rtol=1e-5)
    # Eigenvectors are defined up to sign.
    cosines = np.sum(vectors * ref_vectors[:, ::-1], axis=0)
    np.testing.assert_allclose(np.abs(cosines), 1.0, atol=1e-5)
    # The same from a dataset of batches (streaming covariance).
    dataset = tf.data.Dataset.from_tensor_slices({"image": images}).batch(4)
    np.testing.assert_allclose(augment.rgb_pca(dataset)[0], values, rtol=1e-4)

    # pca_color: a constant shift P (alpha * lambda) per image, alpha ~ N(0, std).
    flat = {"image": np.full((512, 2, 2, 3), 0.5, np.float32)}  # mid-grey: nothing clips
    std = 0.1
    loud = np.sqrt(values)  # the bigger, "standard deviation" scale, to see the shift clearly
    shifted = np.asarray(augment.pca_color(flat, SEED, loud, vectors, std=std)["image"])
    shift = shifted[:, 0, 0, :] - 0.5  # [N, 3]
    np.testing.assert_allclose(shifted, shifted[:, :1, :1, :].repeat(2, 1).repeat(2, 2), atol=1e-6)
    alpha = (shift @ vectors) / loud  # back to the coefficients, [N, 3]
    np.testing.assert_allclose(alpha.std(axis=0), std, rtol=0.15)
    np.testing.assert_allclose(alpha.mean(axis=0), 0.0, atol=0.025)
    strong = augment.pca_color(batch_like(), SEED, values * 100, vectors)["image"]
    assert 0.0 <= np.asarray(strong).min() and np.asarray(strong).max() <= 1.0


def batch_like():
    return {"image": np.random.default_rng(1).uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)}


def test_bad_arguments_raise_value_error(batch):
    with pytest.raises(ValueError, match="seed"):
        augment.random_flip_left_right(batch, [1, 2, 3])
    with pytest.raises(ValueError, match="probability"):
        augment.random_flip_left_right(batch, SEED, probability=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        augment.random_scale_crop(batch, SEED, scale_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="square"):
        augment.random_rotate90({"image": np.zeros((1, 4, 6, 3), np.float32)}, SEED)
    with pytest.raises(ValueError, match="task"):
        augment.make_augmenter("detectoin")
    with pytest.raises(ValueError, match="image"):
        augment.color_jitter({"images": batch["image"]}, SEED)


# --------------------------------------------------------------------------- Keras layer


def test_batch_augmentation_layer(tmp_path):
    keras.utils.set_random_seed(0)
    layer = augment.BatchAugmentation("classification", seed=1, brightness=0.2, hue=0.0)
    config = layer.get_config()
    clone = augment.BatchAugmentation.from_config(config)
    assert clone.get_config() == config
    images = tf.constant(batch_like()["image"])
    np.testing.assert_array_equal(layer(images, training=False), images)
    assert not np.allclose(layer(images, training=True), images)
    dict_out = layer({"image": images, "label": tf.constant([1, 2])}, training=True)
    np.testing.assert_array_equal(dict_out["label"], [1, 2])

    inputs = keras.Input((4, 4, 3))
    x = augment.BatchAugmentation("classification", seed=2)(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, np.array([0, 1]), epochs=1, verbose=0)  # augmentation inside train_step
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(images, verbose=0),
                                  model.predict(images, verbose=0))
    assert restored.layers[1].get_config() == model.layers[1].get_config()
    with pytest.raises(ValueError, match="output_size"):
        augment.BatchAugmentation("classification", output_size=(2, 2))
