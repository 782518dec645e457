"""The embedded `shapes` data: contract, determinism, variety, difficulty."""

import numpy as np
import pytest

from common import synthetic


def test_scene_contract():
    for index in range(20):
        scene = synthetic.make_scene(index, image_size=64)
        n = len(scene["classes"])
        assert scene["image"].shape == (64, 64, 3) and scene["image"].dtype == np.float32
        assert 0.0 <= scene["image"].min() and scene["image"].max() <= 1.0
        assert scene["boxes"].shape == (n, 4) and scene["boxes"].dtype == np.float32
        assert scene["classes"].dtype == np.int32
        assert scene["masks"].shape == (n, 64, 64) and scene["masks"].dtype == np.uint8
        assert scene["mask"].shape == (64, 64) and scene["mask"].dtype == np.int32
        if n:
            assert np.all((scene["boxes"] >= 0) & (scene["boxes"] <= 1))
            assert np.all(scene["boxes"][:, 2] > scene["boxes"][:, 0])
            assert np.all(scene["boxes"][:, 3] > scene["boxes"][:, 1])
            assert np.all((scene["classes"] >= 0) & (scene["classes"] < synthetic.NUM_CLASSES))


def test_boxes_are_tight_boxes_of_the_visible_masks():
    for index in range(30):
        scene = synthetic.make_scene(index, image_size=96)
        for box, mask in zip(scene["boxes"], scene["masks"]):
            ys, xs = np.nonzero(mask)
            expected = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 96
            np.testing.assert_allclose(box, expected, atol=1e-6)


def test_semantic_mask_agrees_with_instance_masks():
    for index in range(30):
        scene = synthetic.make_scene(index, image_size=64)
        expected = np.zeros((64, 64), np.int32)
        for mask, class_id in zip(scene["masks"], scene["classes"]):
            assert not np.any(expected[mask.astype(bool)]), "visible instance masks must not overlap"
            expected[mask.astype(bool)] = class_id + 1
        np.testing.assert_array_equal(scene["mask"], expected)


def test_examples_are_pure_functions_of_seed_split_index():
    a = synthetic.make_scene(7, "train", seed=3)
    b = synthetic.make_scene(7, "train", seed=3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], synthetic.make_scene(8, "train", seed=3)["image"])
    assert not np.array_equal(a["image"], synthetic.make_scene(7, "validation", seed=3)["image"])
    assert not np.array_equal(a["image"], synthetic.make_scene(7, "train", seed=4)["image"])
    c = synthetic.make_classification_example(5, "test", seed=1)
    d = synthetic.make_classification_example(5, "test", seed=1)
    np.testing.assert_array_equal(c["image"], d["image"])


def test_variety_counts_classes_and_empty_scenes():
    counts = [len(synthetic.make_scene(i, image_size=64)["classes"]) for i in range(300)]
    histogram = np.bincount(counts, minlength=5)
    assert histogram[0] > 0, "some scenes must have no object at all"
    assert histogram[0] < 0.15 * 300
    assert histogram[3:].sum() > 0.3 * 300, "many scenes have several (overlapping) objects"
    classes = np.concatenate([synthetic.make_scene(i, image_size=64)["classes"] for i in range(100)])
    assert set(classes.tolist()) == set(range(synthetic.NUM_CLASSES))
    labels = [int(synthetic.make_classification_example(i)["label"]) for i in range(200)]
    assert np.bincount(labels).min() > 20


def test_occlusion_happens_but_every_object_stays_visible():
    partly_hidden = 0
    for index in range(100):
        scene = synthetic.make_scene(index, image_size=64)
        for mask, box in zip(scene["masks"], scene["boxes"]):
            box_pixels = (box[2] - box[0]) * (box[3] - box[1]) * 64 * 64
            assert mask.sum() >= 20, "every object keeps a visible body"
            partly_hidden += mask.sum() < 0.35 * box_pixels
    # Fill ratio of a box this low happens for hidden shapes (and thin crosses/stars).
    assert partly_hidden > 0


def test_colour_alone_does_not_give_away_the_class():
    """A nearest-class-mean classifier on the mean colour inside the shape
    must be near chance: the model has to learn geometry, not colour."""
    features, labels = [], []
    for index in range(600):
        scene = synthetic.make_scene(index, image_size=64)
        for mask, class_id in zip(scene["masks"], scene["classes"]):
            features.append(scene["image"][mask.astype(bool)].mean(axis=0))
            labels.append(class_id)
    features, labels = np.array(features), np.array(labels)
    half = len(labels) // 2
    means = np.stack([features[:half][labels[:half] == c].mean(axis=0)
                      for c in range(synthetic.NUM_CLASSES)])
    predicted = np.argmin(((features[half:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == labels[half:]).mean()
    assert accuracy < 0.35, accuracy  # chance is 0.2


def test_classification_example_is_one_centred_shape():
    for index in range(20):
        example = synthetic.make_classification_example(index, image_size=48)
        assert example["image"].shape == (48, 48, 3)
        assert 0 <= int(example["label"]) < synthetic.NUM_CLASSES


def test_segmentation_example():
    example = synthetic.make_segmentation_example(3, image_size=64)
    assert set(example) == {"image", "mask"}
    assert example["mask"].max() <= synthetic.NUM_CLASSES


@pytest.mark.parametrize("bad", [{"image_size": 8}, {"split": "training"}, {"index": -1},
                                 {"min_objects": 3, "max_objects": 2}])
def test_bad_arguments_raise_value_error(bad):
    args = {"index": 0, **bad}
    with pytest.raises(ValueError):
        synthetic.make_scene(**args)
