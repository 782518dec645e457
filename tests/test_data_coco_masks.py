"""Instance masks from a COCO JSON folder (``common.data.load(folder, with_masks=True)``).

A tiny fixture written here holds every kind of COCO ``segmentation``: a polygon, an
uncompressed RLE (run lengths in column-major order) and a compressed RLE string, plus an
annotation without a segmentation and one whose RLE has the wrong size. The expected masks
are built by hand (the polygon: the pixels whose centres lie inside the rectangle; the
uncompressed RLE: the runs laid out in Fortran order), so a wrong decoder, a transposed mask
or masks assigned to the wrong box fail. Pascal VOC (a folder or tfds' voc/2007) has no
instance masks and must say so.

Run: .venv/bin/python -m pytest -q tests/test_data_coco_masks.py
"""

import json

import cv2
import numpy as np
import pytest

from common import data

HEIGHT, WIDTH = 8, 10


def hand_rle_mask(counts, height, width):
    """The mask an uncompressed COCO RLE describes: alternating runs of 0 and 1 over the pixels
    in column-major (Fortran) order, starting with 0."""
    flat = np.zeros(height * width, np.uint8)
    position, value = 0, 0
    for run in counts:
        flat[position:position + run] = value
        position, value = position + run, 1 - value
    return flat.reshape((height, width), order="F")


def compressed_rle(mask):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# Image a: a rectangle polygon (x 2..6, y 1..4) and an uncompressed RLE.
POLYGON = [[2, 1, 6, 1, 6, 4, 2, 4]]
POLYGON_MASK = np.zeros((HEIGHT, WIDTH), np.uint8)
POLYGON_MASK[1:4, 2:6] = 1  # centres (i + 0.5) inside [1, 4] x [2, 6]
RLE_COUNTS = [19, 3, 5, 3, 50]  # two vertical runs of 3 pixels: columns 2 and 3, rows 3-5
RLE_MASK = hand_rle_mask(RLE_COUNTS, HEIGHT, WIDTH)
# Image b: a compressed RLE of an L shape.
L_MASK = np.zeros((HEIGHT, WIDTH), np.uint8)
L_MASK[2:7, 6] = 1
L_MASK[6, 6:9] = 1


def bbox_of(mask):
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()),
            float(rows.max() + 1 - rows.min())]


def write_folder(root, extra_annotations=()):
    (root / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        assert cv2.imwrite(str(root / "images" / name), np.full((HEIGHT, WIDTH, 3), 80, np.uint8))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 1, 4, 3], "segmentation": POLYGON,
         "iscrowd": 0, "area": 12},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": bbox_of(RLE_MASK),
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": RLE_COUNTS}, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": bbox_of(L_MASK),
         "segmentation": compressed_rle(L_MASK), "iscrowd": 0},
        *extra_annotations,
    ]
    content = {"images": [{"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
                          {"id": 2, "file_name": "b.png", "height": HEIGHT, "width": WIDTH}],
               "annotations": annotations,
               "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "blob"}]}
    (root / "train.json").write_text(json.dumps(content))
    return root


def as_numpy(dataset):
    return [{k: v.numpy() for k, v in example.items()} for example in dataset]


def test_polygon_and_both_rle_kinds_become_instance_masks(tmp_path):
    root = write_folder(tmp_path / "coco")
    first, second = as_numpy(data.load(root, "train", task="detection", with_masks=True))
    assert first["masks"].dtype == np.uint8 and first["masks"].shape == (2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(first["classes"], [0, 1])  # category ids 3, 7 -> 0, 1
    np.testing.assert_array_equal(first["masks"][0], POLYGON_MASK)
    np.testing.assert_array_equal(first["masks"][1], RLE_MASK)
    np.testing.assert_array_equal(second["masks"], L_MASK[None])
    # Each mask lies inside its own box (the masks follow the box order).
    for example in (first, second):
        for box, mask in zip(example["boxes"], example["masks"]):
            rows, cols = np.nonzero(mask)
            assert rows.min() >= box[0] * HEIGHT - 1e-6 and rows.max() + 1 <= box[2] * HEIGHT + 1e-6
            assert cols.min() >= box[1] * WIDTH - 1e-6 and cols.max() + 1 <= box[3] * WIDTH + 1e-6
    # Resized with the image by nearest neighbour: still 0/1, one per box.
    resized = as_numpy(data.load(root, "train", task="detection", with_masks=True,
                                 image_size=(16, 20)))[0]
    assert resized["masks"].shape == (2, 16, 20)
    np.testing.assert_array_equal(resized["masks"][0], np.kron(POLYGON_MASK, np.ones((2, 2))))
    # Without with_masks nothing changes for detection users.
    plain = as_numpy(data.load(root, "train", task="detection"))[0]
    assert "masks" not in plain and len(plain["classes"]) == 2
    # Batched for Mask R-CNN.
    dataset = data.load(root, "train", task="detection", with_masks=True, image_size=(HEIGHT, WIDTH))
    batch = next(iter(data.batch_detection(dataset, 2, max_boxes=4, with_masks=True)))
    assert tuple(batch["masks"].shape) == (2, 4, HEIGHT, WIDTH)
    np.testing.assert_array_equal(batch["masks"][1, 0], L_MASK)
    assert not batch["masks"][1, 1:].numpy().any()  # padding rows are empty masks


def test_annotations_without_usable_segmentation_are_bad_data(tmp_path):
    extra = [{"id": 4, "image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 0},
             {"id": 5, "image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 0,
              "segmentation": {"size": [HEIGHT + 1, WIDTH], "counts": [90]}}]
    root = write_folder(tmp_path / "coco", extra)
    with pytest.warns(data.BadDataWarning) as record:
        examples = as_numpy(data.load(root, "train", task="detection", with_masks=True))
    messages = " ".join(str(w.message) for w in record)
    assert "annotation 4" in messages and "no 'segmentation'" in messages
    assert "annotation 5" in messages and "size" in messages
    # The bad annotations are skipped whole: the box without a mask too.
    assert len(examples[1]["classes"]) == 1 and examples[1]["masks"].shape[0] == 1
    with pytest.raises(ValueError, match="annotation 4"):
        data.load(root, "train", task="detection", with_masks=True, strict=True)
    # Boxes alone do not need segmentations: nothing is skipped.
    assert len(as_numpy(data.load(root, "train", task="detection"))[1]["classes"]) == 3


def test_voc_says_it_has_no_instance_masks(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    assert cv2.imwrite(str(root / "JPEGImages" / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    (root / "Annotations" / "x.xml").write_text(
        "<annotation><filename>x.jpg</filename><object><name>cat</name><difficult>0</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "</annotation>")
    with pytest.raises(ValueError, match="Pascal VOC.*no instance masks"):
        data.load(root, "train", with_masks=True)
    with pytest.raises(ValueError, match="voc/2007.*no instance masks"):  # before any download
        data.load("voc/2007", "train", with_masks=True)
