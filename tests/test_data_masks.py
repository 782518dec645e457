"""Mask conventions of own segmentation folders (images/ + masks/), checked.

* binary 0/255 masks are read as background + one class (255 -> 1), with a
  note, instead of "everything is ignore" and a single class;
* the class count comes from classes.txt, or from the labels seen, which must
  run 0..K-1: one stray value is an error naming its file, not 201 classes;
* a folder or a split whose labels hold a single class is refused (a model
  predicting it everywhere would report mean IoU 1.0);
* every mask is checked as it is read, so a bad label anywhere (not only in
  the first examples) names its file instead of failing inside TensorFlow.

The folders are written here with cv2.imwrite; the expected labels are the
arrays written, mapped by hand.

Run: .venv/bin/python -m pytest -q tests/test_data_masks.py
"""

import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from common import data, synthetic

SIZE = 8  # tiny masks: the tests are about values, not pixels


def write_example(root, name, mask, split=None):
    folder = root / split if split else root
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    image = np.full(mask.shape + (3,), 90, np.uint8)
    assert cv2.imwrite(str(folder / "images" / f"{name}.png"), image)
    assert cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask.astype(np.uint8))
    return folder / "masks" / f"{name}.png"


def object_mask(value, corner=2, background=0):
    mask = np.full((SIZE, SIZE), background, np.uint8)
    mask[corner:corner + 3, corner:corner + 3] = value
    return mask


def write_split_folder(root, masks_by_split):
    paths = {}
    for split, masks in masks_by_split.items():
        for index, mask in enumerate(masks):
            paths[split, index] = write_example(root, f"{index:03d}", mask, split)
    return paths


# ---------------------------------------------------------------------------
# Item: binary 0/255 masks
# ---------------------------------------------------------------------------
def test_binary_0_255_masks_are_background_and_one_class(tmp_path, capsys):
    masks = [object_mask(255, corner=c) for c in (0, 2, 4)]
    write_split_folder(tmp_path, {"train": masks[:2], "validation": masks[2:]})
    info = data.get_info(tmp_path)
    assert info.num_classes == 2 and info.class_names == ("background", "foreground")
    assert "binary" in capsys.readouterr().out  # the reading is said, not silent
    loaded = [example["mask"].numpy() for example in data.load(tmp_path, "train")]
    for mask, written in zip(loaded, masks[:2]):
        expected = (written == 255).astype(np.int32)  # 255 -> 1, 0 stays background
        np.testing.assert_array_equal(mask, expected)
    validation = next(iter(data.load(tmp_path, "validation", image_size=4)))
    assert set(np.unique(validation["mask"].numpy())) <= {0, 1}


def test_binary_masks_take_their_names_from_classes_txt(tmp_path):
    write_split_folder(tmp_path, {"train": [object_mask(255), object_mask(0)]})
    (tmp_path / "classes.txt").write_text("sky\nroad\n")
    assert data.get_info(tmp_path).class_names == ("sky", "road")
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    with pytest.raises(ValueError, match=r"only 0 and 255.*classes\.txt lists 3"):
        data.get_info(tmp_path)


def test_labels_0_1_with_255_border_keep_255_as_ignore(tmp_path):
    mask = object_mask(1)
    mask[0, :] = 255  # the ignore contract: a border that is not scored
    write_split_folder(tmp_path, {"train": [mask]})
    assert data.get_info(tmp_path).num_classes == 2
    loaded = next(iter(data.load(tmp_path, "train")))["mask"].numpy()
    np.testing.assert_array_equal(loaded, mask.astype(np.int32))


# ---------------------------------------------------------------------------
# Item: class count from classes.txt or from the labels seen; stray values
# ---------------------------------------------------------------------------
def test_a_stray_value_names_its_file_instead_of_adding_classes(tmp_path):
    masks = [object_mask(1), object_mask(2, corner=4), object_mask(1)]
    masks[2][7, 7] = 200  # one stray pixel
    paths = write_split_folder(tmp_path, {"train": masks})
    stray_file = str(paths["train", 2])
    with pytest.raises(ValueError) as error:
        data.get_info(tmp_path)  # was: 201 classes
    message = str(error.value)
    assert stray_file in message and "[200]" in message and "[0, 2]" in message
    assert "classes.txt" in message  # how to declare it if it is a class
    with pytest.raises(ValueError, match="200"):
        data.load(tmp_path, "train")


def test_values_beyond_classes_txt_name_the_file(tmp_path):
    masks = [object_mask(1), object_mask(2), object_mask(5)]
    paths = write_split_folder(tmp_path, {"train": masks})
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    with pytest.raises(ValueError) as error:
        data.get_info(tmp_path)
    assert str(paths["train", 2]) in str(error.value) and "[5]" in str(error.value)
    # With the fifth class listed, the same folder is fine (gaps allowed when declared).
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\nbird\nfish\nfrog\n")
    assert data.get_info(tmp_path).num_classes == 6


# ---------------------------------------------------------------------------
# Item: a single class is refused (it would score a perfect mean IoU)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 255])
def test_a_folder_with_a_single_class_is_refused(tmp_path, value):
    # All background, or all ignore: nothing to learn, mean IoU 1.0 for free.
    write_split_folder(tmp_path, {"train": [np.full((SIZE, SIZE), value, np.uint8)] * 2,
                                  "validation": [np.full((SIZE, SIZE), value, np.uint8)]})
    for call in (lambda: data.get_info(tmp_path), lambda: data.load(tmp_path, "train")):
        with pytest.raises(ValueError, match="single class"):
            call()


def test_check_segmentation_labels_counts_pixels_like_numpy():
    dataset = data.load("shapes_segmentation", "validation", num_examples=3, image_size=32)
    counts = data.check_segmentation_labels(dataset, synthetic.NUM_CLASSES + 1)
    masks = [synthetic.make_segmentation_example(i, "validation", 0, image_size=32)["mask"]
             for i in range(3)]
    expected = np.bincount(np.concatenate([m.ravel() for m in masks]),
                           minlength=synthetic.NUM_CLASSES + 1)
    np.testing.assert_array_equal(counts, expected)
    batched = data.to_supervised(dataset).batch(2)  # (image, mask) tuples, batched
    np.testing.assert_array_equal(data.check_segmentation_labels(batched, 6), expected)


def _mask_dataset(masks):
    return tf.data.Dataset.from_tensor_slices(
        {"image": np.zeros((len(masks), SIZE, SIZE, 3), np.float32),
         "mask": np.stack(masks).astype(np.int32)})


def test_check_segmentation_labels_refuses_one_class_and_bad_values():
    background_and_ignore = [object_mask(255), np.zeros((SIZE, SIZE))]
    with pytest.raises(ValueError, match=r"my split: .*only class 0 \(background\)"):
        data.check_segmentation_labels(_mask_dataset(background_and_ignore), 2, what="my split",
                                       class_names=("background", "pet"))
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[3\]"):
        data.check_segmentation_labels(_mask_dataset([object_mask(3)]), 2)
    with pytest.raises(ValueError, match="no examples"):
        data.check_segmentation_labels(_mask_dataset([object_mask(1)]).take(0), 2)
    counts = data.check_segmentation_labels(_mask_dataset([object_mask(1), object_mask(3)]), 4)
    np.testing.assert_array_equal(counts, [2 * SIZE * SIZE - 18, 9, 0, 9])


# ---------------------------------------------------------------------------
# Item: a bad label after the first examples names its file
# ---------------------------------------------------------------------------
def test_a_bad_label_late_in_the_folder_names_the_file(tmp_path):
    masks = [object_mask(1 + index % 2) for index in range(70)]
    masks[66][3, 3] = 9  # beyond the 3 listed classes, after the first 64 examples
    paths = write_split_folder(tmp_path, {"train": masks, "validation": masks[:2]})
    (tmp_path / "classes.txt").write_text("background\ndisc\nbar\n")
    for call in (lambda: data.get_info(tmp_path), lambda: data.load(tmp_path, "train")):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert str(paths["train", 66]) in message and "[9]" in message
        assert "[0, 2]" in message and len(message) < 1000


def test_every_mask_is_checked_as_it_is_read(tmp_path):
    paths = write_split_folder(tmp_path, {"train": [object_mask(1), object_mask(2)] * 3})
    dataset = data.load(tmp_path, "train")  # indexed while the files were fine
    bad = object_mask(2)
    bad[0, 0] = 7
    assert cv2.imwrite(str(paths["train", 4]), bad)  # changed after indexing
    os.utime(paths["train", 4], ns=(0, 10**9))  # a different modification time for sure
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        for _ in dataset:
            pass
    message = str(error.value)
    assert f"ValueError: {paths['train', 4]}" in message and "[7]" in message
    assert "[0, 2]" in message


def test_the_early_example_check_names_its_source():
    from ch06_segmentation import losses

    image, mask = np.zeros((4, 4, 3), np.float32), np.full((4, 4), 9)
    with pytest.raises(ValueError, match=r"^validation example 3: mask values .*\[0, 2\].*\[9\]"):
        losses.validate_segmentation_example(image, mask, 3, source="validation example 3")
    with pytest.raises(ValueError, match=r"^a\.png: mask must have the image's height"):
        losses.validate_segmentation_example(image, mask[:2], 3, source="a.png")
