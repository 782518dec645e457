"""Tests for common/data.py: every source honours the data contracts.

* tfds adapters run offline under ``tfds.testing.mock_data``: once on tfds'
  random examples (contract dtypes, shapes, ranges) and once on hand-made
  examples (difficult / crowd boxes dropped, pet trimap mapped).
* embedded data (shapes, digits) are checked against ``common.synthetic`` and
  scikit-learn, the independent references.
* own-data folders are written here with cv2.imwrite and their boxes compared
  with values computed by hand.

Run: .venv/bin/python -m pytest -q tests/test_data.py
"""

import json

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from common import data, synthetic


def as_numpy(example):
    return {key: value.numpy() for key, value in example.items()}


def check_image(image, channels=3):
    assert image.dtype == tf.float32
    assert image.shape.rank == 3 and image.shape[-1] == channels
    assert 0.0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 1.0


def check_detection(example, num_classes):
    check_image(example["image"])
    boxes, classes = example["boxes"], example["classes"]
    assert boxes.dtype == tf.float32 and classes.dtype == tf.int32
    assert boxes.shape.rank == 2 and boxes.shape[1] == 4 and classes.shape[0] == boxes.shape[0]
    assert np.all((boxes.numpy() >= 0) & (boxes.numpy() <= 1))
    assert np.all((classes.numpy() >= 0) & (classes.numpy() < num_classes))


# ---------------------------------------------------------------------------
# Registry and arguments
# ---------------------------------------------------------------------------
def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="shapes") as error:
        data.load("imagenet_not_here")
    for name in ("mnist", "cifar10", "voc/2007", "coco/2017", "digits"):
        assert name in str(error.value)
    assert set(data.list_datasets()) >= {"shapes", "shapes_classification", "shapes_segmentation",
                                         "digits", "mnist", "cifar10", "cifar100",
                                         "oxford_iiit_pet", "voc/2007", "coco/2017"}


@pytest.mark.parametrize("kwargs, argument", [
    ({"split": "val"}, "split"), ({"image_size": (32,)}, "image_size"),
    ({"image_size": 0}, "image_size"), ({"channels": 2}, "channels"),
    ({"num_examples": 0}, "num_examples"), ({"task": "detection"}, "task"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        data.load("shapes_classification", **kwargs)


def test_get_info_of_registered_names():
    assert data.get_info("shapes") == data.DatasetInfo(
        "shapes", "detection", 5, synthetic.CLASS_NAMES, (128, 128))
    assert data.get_info("shapes_segmentation").num_classes == synthetic.NUM_CLASSES + 1
    assert data.get_info("shapes_classification").image_size == (64, 64)
    assert data.get_info("mnist").num_classes == 10
    assert data.get_info("cifar10").class_names[0] == "airplane"
    cifar100 = data.get_info("cifar100")
    # The fine labels are numbered alphabetically in the data set.
    assert cifar100.num_classes == 100 and list(cifar100.class_names) == sorted(
        set(cifar100.class_names))
    voc = data.get_info("voc/2007")
    assert voc.num_classes == 20 and voc.task == "detection"
    # tfds' own offline metadata has the VOC names: ours must agree in order.
    tfds_names = tfds.builder("voc/2007").info.features["objects"]["label"].names
    assert voc.class_names == tuple(tfds_names)
    coco = data.get_info("coco/2017")
    assert coco.num_classes == 80 and len(set(coco.class_names)) == 80
    assert data.get_info("oxford_iiit_pet").num_classes == 37
    pets = data.get_info("oxford_iiit_pet", task="segmentation")
    assert pets.class_names == ("background", "pet") and pets.task == "segmentation"


# ---------------------------------------------------------------------------
# Embedded data: shapes and digits
# ---------------------------------------------------------------------------
def test_shapes_is_deterministic_and_matches_synthetic():
    first = [as_numpy(x) for x in data.load("shapes", "validation", num_examples=4, seed=3)]
    second = [as_numpy(x) for x in data.load("shapes", "validation", num_examples=4, seed=3)]
    other_seed = as_numpy(next(iter(data.load("shapes", "validation", num_examples=1, seed=4))))
    assert not np.array_equal(first[0]["image"], other_seed["image"])
    for index, (a, b) in enumerate(zip(first, second)):
        reference = synthetic.make_scene(index, "validation", seed=3)
        assert set(a) == {"image", "boxes", "classes"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], reference[key])


def test_shapes_contract_masks_and_resize():
    dataset = data.load("shapes", num_examples=3, with_masks=True, image_size=(48, 32))
    assert len(dataset) == 3
    for index, example in enumerate(dataset):
        check_detection(example, synthetic.NUM_CLASSES)
        assert example["image"].shape == (48, 32, 3)
        masks = example["masks"]
        assert masks.dtype == tf.uint8 and masks.shape[1:] == (48, 32)
        assert masks.shape[0] == example["boxes"].shape[0]
        # Non-square sizes are drawn at the longer side and resized: the
        # normalized boxes are those of the 48 x 48 scene, unchanged.
        reference = synthetic.make_scene(index, "train", 0, image_size=48)
        np.testing.assert_allclose(example["boxes"].numpy(), reference["boxes"])
    assert "masks" not in data.load("shapes", num_examples=1).element_spec


def test_shapes_classification_and_segmentation_contracts():
    example = next(iter(data.load("shapes_classification", "test", num_examples=2)))
    check_image(example["image"])
    assert example["image"].shape == (64, 64, 3) and example["label"].dtype == tf.int32
    assert int(example["label"]) == synthetic.make_classification_example(0, "test")["label"]
    gray = next(iter(data.load("shapes_classification", num_examples=1, channels=1)))
    check_image(gray["image"], channels=1)
    segmentation = list(data.load("shapes", task="segmentation", num_examples=2, image_size=64))
    for index, example in enumerate(segmentation):
        assert example["image"].shape == (64, 64, 3) and example["mask"].dtype == tf.int32
        reference = synthetic.make_segmentation_example(index, "train", 0, image_size=64)
        np.testing.assert_array_equal(example["mask"].numpy(), reference["mask"])


def test_digits_splits_are_disjoint_and_match_sklearn():
    from sklearn.datasets import load_digits

    splits = {split: data.digits_split_indices(split) for split in data.SPLITS}
    sizes = {split: len(indices) for split, indices in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == 1257 and sizes["validation"] == 270 and sizes["test"] == 270
    union = np.concatenate(list(splits.values()))
    assert len(np.unique(union)) == 1797  # disjoint and complete
    digits = load_digits()
    dataset = data.load("digits", "validation")
    assert len(dataset) == 270
    images = np.stack([x["image"].numpy() for x in dataset])
    labels = np.array([int(x["label"]) for x in dataset])
    assert images.shape == (270, 8, 8, 3)
    np.testing.assert_allclose(images[..., 0], digits.images[splits["validation"]] / 16.0,
                               atol=1e-6)
    np.testing.assert_array_equal(labels, digits.target[splits["validation"]])
    lenet = next(iter(data.load("digits", "test", image_size=32, channels=1)))
    check_image(lenet["image"], channels=1)
    assert lenet["image"].shape == (32, 32, 1)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------
def _detection_dataset(object_counts, size=16):
    def generate():
        for count in object_counts:
            boxes = np.tile(np.array([[0.1, 0.2, 0.5, 0.6]], np.float32), (count, 1))
            boxes[:, 0] = np.linspace(0.0, 0.4, count) if count else boxes[:, 0]
            yield {"image": np.full((size, size, 3), 0.5, np.float32), "boxes": boxes,
                   "classes": np.arange(count, dtype=np.int32) % 5,
                   "masks": np.ones((count, size, size), np.uint8)}

    return tf.data.Dataset.from_generator(generate, output_signature={
        "image": tf.TensorSpec([size, size, 3], tf.float32),
        "boxes": tf.TensorSpec([None, 4], tf.float32),
        "classes": tf.TensorSpec([None], tf.int32),
        "masks": tf.TensorSpec([None, size, size], tf.uint8)})


def test_batch_detection_pads_truncates_and_accepts_empty_images():
    batches = list(data.batch_detection(_detection_dataset([0, 3, 40]), batch_size=2,
                                        max_boxes=32, with_masks=True))
    assert len(batches) == 2
    first, second = batches
    assert first["boxes"].shape == (2, 32, 4) and second["boxes"].shape == (1, 32, 4)
    assert first["masks"].shape == (2, 32, 16, 16) and first["masks"].dtype == tf.uint8
    classes = first["classes"].numpy()
    np.testing.assert_array_equal(classes[0], -np.ones(32))  # image without objects
    np.testing.assert_array_equal(classes[1], [0, 1, 2] + [-1] * 29)
    assert np.all(first["boxes"].numpy()[0] == 0) and np.all(first["boxes"].numpy()[1, 3:] == 0)
    assert np.all(first["masks"].numpy()[1, 3:] == 0) and np.all(first["masks"].numpy()[1, :3] == 1)
    # 40 objects -> the first 32 are kept.
    np.testing.assert_array_equal(second["classes"].numpy()[0], np.arange(32) % 5)
    np.testing.assert_allclose(second["boxes"].numpy()[0, :, 0], np.linspace(0.0, 0.4, 40)[:32])
    assert "masks" not in data.batch_detection(_detection_dataset([1]), 1).element_spec
    dropped = list(data.batch_detection(_detection_dataset([0, 3, 40]), 2, drop_remainder=True))
    assert len(dropped) == 1


def test_batch_detection_rejects_mixed_sizes_and_missing_keys():
    mixed = tf.data.Dataset.from_generator(
        lambda: iter([]), output_signature={"image": tf.TensorSpec([None, None, 3], tf.float32),
                                            "boxes": tf.TensorSpec([None, 4], tf.float32),
                                            "classes": tf.TensorSpec([None], tf.int32)})
    with pytest.raises(ValueError, match="image_size"):
        data.batch_detection(mixed, 2)
    with pytest.raises(ValueError, match="masks"):
        data.batch_detection(data.load("shapes", num_examples=1), 2, with_masks=True)
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_detection(data.load("shapes", num_examples=1), 0)


def test_to_supervised():
    image, label = next(iter(data.to_supervised(data.load("shapes_classification",
                                                          num_examples=1))))
    assert image.shape == (64, 64, 3) and label.dtype == tf.int32
    image, mask = next(iter(data.to_supervised(data.load("shapes_segmentation", num_examples=1))))
    assert mask.shape == (128, 128) and mask.dtype == tf.int32
    with pytest.raises(ValueError, match="batch_detection"):
        data.to_supervised(data.load("shapes", num_examples=1))


# ---------------------------------------------------------------------------
# tfds adapters, offline
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, num_classes", [
    ("mnist", {}, 10), ("cifar10", {"split": "validation"}, 10),
    ("cifar100", {"split": "test", "image_size": 16}, 100),
    ("oxford_iiit_pet", {"task": "classification"}, 37),
])
def test_tfds_classification_adapters_under_mock(name, kwargs, num_classes):
    with tfds.testing.mock_data(num_examples=3):
        examples = list(data.load(name, **kwargs))
    assert len(examples) == 3
    for example in examples:
        assert set(example) == {"image", "label"}
        check_image(example["image"])
        assert example["label"].dtype == tf.int32 and 0 <= int(example["label"]) < num_classes
    if "image_size" in kwargs:
        assert examples[0]["image"].shape == (16, 16, 3)


def test_tfds_pets_segmentation_under_mock():
    with tfds.testing.mock_data(num_examples=2):
        native = list(data.load("oxford_iiit_pet", "test", task="segmentation"))
        resized = list(data.load("oxford_iiit_pet", "validation", task="segmentation",
                                 image_size=24))
    for example in native + resized:
        check_image(example["image"])
        assert example["mask"].dtype == tf.int32
        assert example["mask"].shape == example["image"].shape[:2]
        assert set(np.unique(example["mask"].numpy())) <= {0, 1, 255}
    assert resized[0]["mask"].shape == (24, 24)


def test_pet_trimap_mapping_on_a_known_mask():
    trimap = np.array([[1, 2, 3], [2, 2, 1]], np.uint8)[..., None]  # tfds: 1 pet, 2 bg, 3 border
    expected = np.array([[1, 0, 255], [0, 0, 1]], np.int32)
    np.testing.assert_array_equal(data.pet_trimap_to_mask(trimap).numpy(), expected)
    assert int(data.pet_trimap_to_mask(np.array([[0]], np.uint8))[0, 0]) == 255  # unknown value

    def fake_pets(self, *args, **kwargs):
        return tf.data.Dataset.from_tensors({
            "image": np.full((2, 3, 3), 255, np.uint8), "label": np.int64(5),
            "segmentation_mask": trimap})

    with tfds.testing.mock_data(as_dataset_fn=fake_pets):
        example = next(iter(data.load("oxford_iiit_pet", task="segmentation")))
    np.testing.assert_array_equal(example["mask"].numpy(), expected)
    np.testing.assert_array_equal(example["image"].numpy(), np.ones((2, 3, 3)))


@pytest.mark.parametrize("name, num_classes", [("voc/2007", 20), ("coco/2017", 80)])
def test_tfds_detection_adapters_under_random_mock(name, num_classes):
    # tfds' random mock draws each object field with its own length and boxes
    # in any order; the adapter must still give contract-shaped output.
    with tfds.testing.mock_data(num_examples=3):
        examples = list(data.load(name, "validation"))
        resized = next(iter(data.load(name, "test", image_size=(40, 30))))
    assert len(examples) == 3
    for example in examples:
        assert set(example) == {"image", "boxes", "classes"}
        check_detection(example, num_classes)
    assert resized["image"].shape == (40, 30, 3)
    batch = next(iter(data.batch_detection(data.load("shapes", num_examples=2), 2, max_boxes=4)))
    assert batch["classes"].shape == (2, 4)


def _fake_objects(flag_name, flags):
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]],
                     np.float32)

    def fake(self, *args, **kwargs):
        return tf.data.Dataset.from_tensors({
            "image": np.zeros((10, 20, 3), np.uint8),
            "objects": {"bbox": boxes, "label": np.array([3, 14, 7], np.int64),
                        flag_name: np.array(flags)}})

    return boxes, fake


def test_voc_adapter_drops_difficult_boxes_unless_asked():
    boxes, fake = _fake_objects("is_difficult", [False, True, False])
    with tfds.testing.mock_data(as_dataset_fn=fake):
        default = next(iter(data.load("voc/2007")))
        kept = next(iter(data.load("voc/2007", keep_difficult=True)))
    np.testing.assert_allclose(default["boxes"].numpy(), boxes[[0, 2]])
    np.testing.assert_array_equal(default["classes"].numpy(), [3, 7])
    np.testing.assert_array_equal(kept["classes"].numpy(), [3, 14, 7])


def test_coco_adapter_drops_crowd_boxes():
    boxes, fake = _fake_objects("is_crowd", [True, False, False])
    with tfds.testing.mock_data(as_dataset_fn=fake):
        example = next(iter(data.load("coco/2017", "validation")))
    np.testing.assert_allclose(example["boxes"].numpy(), boxes[[1, 2]])
    np.testing.assert_array_equal(example["classes"].numpy(), [14, 7])


@pytest.mark.parametrize("name, alternative", [
    ("cifar10", "shapes_classification"), ("voc/2007", "shapes"),
])
def test_failed_download_names_the_embedded_alternative(monkeypatch, name, alternative):
    def offline(*args, **kwargs):
        raise tfds.download.DownloadError("Failed to get url https://example.org: no network")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(RuntimeError, match="no network") as error:
        data.load(name)
    assert isinstance(error.value, data.DatasetUnavailableError)
    assert f"load({alternative!r}" in str(error.value)
    assert f"`--dataset {alternative}`" in str(error.value)  # the flag a script takes
    assert "download failed" in str(error.value) and "data_dir" in str(error.value)


# ---------------------------------------------------------------------------
# Own data folders (written here with cv2.imwrite)
# ---------------------------------------------------------------------------
def write_image(path, height, width, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))
    return path


def write_corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really an image")
    return path


def test_class_folders_hash_split_and_corrupt_image(tmp_path):
    # Each image is one grey level, so we can tell which file came back.
    for index in range(30):
        class_name = ("cat", "dog")[index % 2]
        write_image(tmp_path / class_name / f"{index:03d}.png", 6, 5, value=index * 8)
    write_corrupt(tmp_path / "dog" / "broken.png")
    assert data.get_info(tmp_path).class_names == ("cat", "dog")
    seen = {}
    with pytest.warns(data.BadDataWarning, match="broken.png"):
        for split in data.SPLITS:
            for example in data.load(str(tmp_path), split):
                index = int(round(float(example["image"][0, 0, 0]) * 255 / 8))
                assert index not in seen  # splits are disjoint
                seen[index] = (split, int(example["label"]))
    assert sorted(seen) == list(range(30))  # nothing lost but the corrupt file
    for index, (split, label) in seen.items():
        assert label == index % 2
        assert split == data.hash_split(f"{('cat', 'dog')[index % 2]}/{index:03d}.png")
    assert sum(split == "train" for split, _ in seen.values()) > 15  # ~80 % train
    with pytest.raises(ValueError, match="broken.png"):
        for split in data.SPLITS:
            data.load(tmp_path, split, strict=True)


def test_class_folders_with_split_folders(tmp_path):
    write_image(tmp_path / "train" / "a" / "x.png", 8, 8)
    write_image(tmp_path / "train" / "b" / "y.jpg", 8, 8)
    write_image(tmp_path / "validation" / "b" / "z.png", 10, 12)
    train = list(data.load(tmp_path, "train", image_size=4))
    assert [int(x["label"]) for x in train] == [0, 1] and train[0]["image"].shape == (4, 4, 3)
    validation = list(data.load(tmp_path, "validation"))
    assert len(validation) == 1 and int(validation[0]["label"]) == 1  # "b" numbered from train
    assert validation[0]["image"].shape == (10, 12, 3)
    with pytest.raises(ValueError, match="test"):
        data.load(tmp_path, "test")


def test_coco_json_folder(tmp_path):
    write_image(tmp_path / "images" / "a.png", 40, 80)
    write_image(tmp_path / "images" / "b.png", 50, 50)
    write_corrupt(tmp_path / "images" / "c.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 80},
                   {"id": 2, "file_name": "b.png", "height": 50, "width": 50},
                   {"id": 3, "file_name": "c.png", "height": 50, "width": 50}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [70, 30, 20, 20], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [100, 100, 10, 10], "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 40], "iscrowd": 1},
            {"id": 14, "image_id": 3, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 0},
        ]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    info = data.get_info(tmp_path)
    assert info.task == "detection" and info.class_names == ("cat", "dog")  # sorted by id
    with pytest.warns(data.BadDataWarning) as caught:
        examples = [as_numpy(x) for x in data.load(tmp_path, "train")]
    messages = " ".join(str(w.message) for w in caught)
    assert "c.png" in messages and "a.png" in messages and "outside" in messages
    assert len(examples) == 2
    # a.png is 40 high, 80 wide. [x, y, w, h] = [10, 5, 20, 10] ->
    # [5/40, 10/80, 15/40, 30/80]; [70, 30, 20, 20] is clipped at the image
    # edge -> [30/40, 70/80, 1, 1]; [100, 100, ...] lies outside: skipped.
    np.testing.assert_allclose(examples[0]["boxes"], [[0.125, 0.125, 0.375, 0.375],
                                                      [0.75, 0.875, 1.0, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(examples[0]["classes"], [1, 0])  # dog (id 7) -> 1, cat -> 0
    assert examples[1]["boxes"].shape == (0, 4) and examples[1]["classes"].shape == (0,)
    assert examples[1]["image"].shape == (50, 50, 3)
    with pytest.raises(ValueError, match=r"a\.png.*outside"):  # strict: first problem raises
        data.load(tmp_path, "train", strict=True)
    with pytest.raises(ValueError, match="validation"):
        data.load(tmp_path, "validation")  # only train.json exists
    with pytest.warns(data.BadDataWarning):
        resized = data.load(tmp_path, image_size=32)
    batch = next(iter(data.batch_detection(resized, 2, max_boxes=3)))
    np.testing.assert_array_equal(batch["classes"].numpy(), [[1, 0, -1], [-1, -1, -1]])


def _voc_xml(file_name, height, width, objects):
    parts = [f"<annotation><filename>{file_name}</filename>"
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, difficult, (xmin, ymin, xmax, ymax) in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
                     f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                     f"<ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def test_voc_xml_folder(tmp_path):
    (tmp_path / "Annotations").mkdir()
    write_image(tmp_path / "JPEGImages" / "one.png", 40, 100)
    write_corrupt(tmp_path / "JPEGImages" / "two.png")
    (tmp_path / "Annotations" / "one.xml").write_text(_voc_xml("one.png", 40, 100, [
        ("dog", 0, (1, 1, 50, 20)), ("cat", 1, (11, 21, 30, 40)), ("dog", 0, (150, 5, 190, 9))]))
    (tmp_path / "Annotations" / "two.xml").write_text(_voc_xml("two.png", 40, 100, [
        ("bird", 0, (1, 1, 5, 5))]))
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("one\ntwo\n")
    assert data.get_info(tmp_path).class_names == ("bird", "cat", "dog")
    with pytest.warns(data.BadDataWarning) as caught:
        examples = [as_numpy(x) for x in data.load(tmp_path, "train")]
    messages = " ".join(str(w.message) for w in caught)
    assert "two.png" in messages and "outside" in messages
    assert len(examples) == 1
    # 1-based inclusive pixels: x 1..50 of 100 -> [0, 0.5]; y 1..20 of 40 -> [0, 0.5].
    np.testing.assert_allclose(examples[0]["boxes"], [[0.0, 0.0, 0.5, 0.5]], atol=1e-6)
    np.testing.assert_array_equal(examples[0]["classes"], [2])
    with pytest.warns(data.BadDataWarning):
        kept = as_numpy(next(iter(data.load(tmp_path, "train", keep_difficult=True))))
    # cat: x 11..30, y 21..40 -> [20/40, 10/100, 40/40, 30/100]
    np.testing.assert_allclose(kept["boxes"], [[0.0, 0.0, 0.5, 0.5], [0.5, 0.1, 1.0, 0.3]],
                               atol=1e-6)
    np.testing.assert_array_equal(kept["classes"], [2, 1])


def test_segmentation_folder(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    mask = np.zeros((12, 10), np.uint8)
    mask[2:6, 3:8] = 1
    mask[8:, :] = 2
    mask[0, 0] = 255
    folder = tmp_path / "train"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    cv2.imwrite(str(folder / "images" / "p.png"), image)
    cv2.imwrite(str(folder / "masks" / "p.png"), mask)
    write_image(folder / "images" / "q.png", 12, 10)
    cv2.imwrite(str(folder / "masks" / "q.png"), np.zeros((5, 5), np.uint8))  # wrong size
    info = data.get_info(tmp_path)
    assert info.task == "segmentation" and info.num_classes == 3  # 0, 1, 2 (255 ignored)
    with pytest.warns(data.BadDataWarning, match="q.png"):
        examples = list(data.load(tmp_path, "train"))
    assert len(examples) == 1
    np.testing.assert_array_equal(examples[0]["mask"].numpy(), mask.astype(np.int32))
    # cv2 stores BGR; the contract is RGB in [0, 1].
    np.testing.assert_allclose(examples[0]["image"].numpy(), image[..., ::-1] / 255.0, atol=1e-6)
    with pytest.warns(data.BadDataWarning):
        small = next(iter(data.load(tmp_path, "train", image_size=(6, 5))))
    assert small["mask"].shape == (6, 5)
    assert set(np.unique(small["mask"].numpy())) <= {0, 1, 2, 255}


def test_folder_task_must_fit_the_layout(tmp_path):
    write_image(tmp_path / "a" / "x.png", 8, 8)
    with pytest.raises(ValueError, match="detection"):
        data.load(tmp_path, task="detection")
    empty_split = next(s for s in data.SPLITS if s != data.hash_split("a/x.png"))
    with pytest.raises(ValueError, match="no usable examples"):
        data.load(tmp_path, empty_split)  # one file cannot fill every split


def test_coco_json_files_named_after_splits(tmp_path):
    for split, file_name in [("train", "t.png"), ("val", "v.png")]:
        write_image(tmp_path / "images" / file_name, 10, 10)
        content = {"images": [{"id": 1, "file_name": file_name, "height": 10, "width": 10}],
                   "categories": [{"id": 1, "name": "thing"}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                    "bbox": [0, 0, 5, 10] if split == "train" else [5, 0, 5, 5]}]}
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(content))
    train = as_numpy(next(iter(data.load(tmp_path, "train"))))
    validation = as_numpy(next(iter(data.load(tmp_path, "validation"))))
    np.testing.assert_allclose(train["boxes"], [[0.0, 0.0, 1.0, 0.5]])
    np.testing.assert_allclose(validation["boxes"], [[0.0, 0.5, 0.5, 1.0]])
    with pytest.raises(ValueError, match="test"):
        data.load(tmp_path, "test")


def test_hash_split_fractions():
    splits = [data.hash_split(f"folder/image_{index}.jpg") for index in range(3000)]
    assert data.hash_split("folder/image_7.jpg") == splits[7]  # stable
    fractions = {split: splits.count(split) / len(splits) for split in data.SPLITS}
    assert abs(fractions["train"] - 0.8) < 0.03
    assert abs(fractions["validation"] - 0.1) < 0.02 and abs(fractions["test"] - 0.1) < 0.02
