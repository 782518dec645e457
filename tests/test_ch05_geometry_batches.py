"""--rotation / --shear / --elastic-alpha of the detection scripts: warped batches with tight boxes."""

import numpy as np
import pytest

from ch05_detection import detection_run, train_faster_rcnn


def _config(**options):
    values = dict(image_size=64, num_train_examples=8, num_val_examples=2, batch_size=4, seed=3)
    values.update(options)
    return train_faster_rcnn.Config(**values)


def _epoch(config, train, epoch, with_masks=False):
    steps = detection_run.steps_per_epoch(config, 8)
    batches = detection_run.train_batches(config, train, epoch, epoch + 1, with_masks=with_masks)
    return [{k: v.numpy() for k, v in batch.items()} for batch in batches.take(steps)]


@pytest.fixture(scope="module")
def rotated():
    config = _config(rotation=40.0, shear=0.2)
    train, count, _ = detection_run.make_datasets(config)
    return config, train


def test_boxes_are_the_extent_of_the_warped_masks(rotated):
    config, train = rotated
    assert "masks" in train.element_spec  # loaded for the tight boxes
    checked = 0
    for batch in _epoch(config, train, 0, with_masks=True):
        for boxes, classes, masks in zip(batch["boxes"], batch["classes"], batch["masks"]):
            for box, cls, mask in zip(boxes, classes, masks):
                if cls < 0:
                    assert not mask.any()
                    continue
                ys, xs = np.nonzero(mask)
                side = mask.shape[0]
                expected = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / side
                np.testing.assert_allclose(box, expected, atol=1e-5)
                checked += 1
    assert checked > 8


def test_batches_are_warped_seeded_and_without_masks(rotated):
    config, train = rotated
    plain_config = _config()
    plain_train, _, _ = detection_run.make_datasets(plain_config)
    assert "masks" not in plain_train.element_spec  # no augmentation: nothing extra cached
    warped = _epoch(config, train, 0)
    plain = _epoch(plain_config, plain_train, 0)
    assert set(warped[0]) == {"image", "boxes", "classes"}
    # The same images in the same order (same seed), but moved pixels.
    assert np.abs(warped[0]["image"] - plain[0]["image"]).mean() > 0.01
    # A run resumed at epoch 0 or re-run sees the same warps; the next epoch other ones.
    again = _epoch(config, train, 0)
    np.testing.assert_array_equal(warped[0]["image"], again[0]["image"])
    np.testing.assert_array_equal(warped[0]["boxes"], again[0]["boxes"])
    assert not np.array_equal(_epoch(config, train, 1)[0]["image"], warped[0]["image"])


@pytest.mark.parametrize("flag, value", [("rotation", 181.0), ("shear", 1.0), ("elastic_alpha", -1.0)])
def test_bad_values_name_the_flag(flag, value):
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        detection_run.check_detection_config(_config(**{flag: value}))
