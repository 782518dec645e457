"""The data set registry: one ``load(name, split)`` for every chapter.

Every chapter asks this module for data by name and gets back an *unbatched*
``tf.data.Dataset`` whose elements follow the repo's data contracts
(docs/design.md):

* classification: ``{"image": float32 [H, W, 3] in [0, 1], "label": int32 []}``
* detection: ``{"image", "boxes": float32 [N, 4] normalized [ymin, xmin, ymax,
  xmax], "classes": int32 [N] 0-based}``, plus ``"masks": uint8 [N, H, W]``
  for instance segmentation
* semantic segmentation: ``{"image", "mask": int32 [H, W]}``, 0 = background,
  255 = ignore

Where the data come from:

* ``shapes``, ``shapes_classification``, ``shapes_segmentation``: the embedded
  synthetic scenes of ``common/synthetic.py`` (no download, the default), drawn
  in parallel tf.data calls by ``generated_dataset`` (each example a pure
  function of its index, so the order and the pixels never change).
* ``shapes_localization``: zero or one shape per image, with its box, class
  and landmark points (localization and landmark detection, ch05).
* ``digits``: scikit-learn's bundled 8x8 hand-written digits (no download).
* ``mnist``, ``cifar10``, ``cifar100``, ``oxford_iiit_pet``, ``voc/2007``,
  ``coco/2017``: tensorflow-datasets, adapted to the contracts (downloaded by
  tfds on first use; a failed download raises ``DatasetUnavailableError``
  naming the embedded alternative).
* a directory path: your own images (class folders, COCO JSON, Pascal VOC XML
  or image + mask folders); see ``data/README.md`` for the layouts.

Try it::

    python -c "from common import data; print(data.list_datasets())"
    python -c "from common import data; ds = data.load('shapes', num_examples=2);
               print(next(iter(ds)))"

``to_supervised`` turns examples into the ``(image, target)`` tuples Keras
``fit()`` wants and ``batch_detection`` pads detection examples to a fixed
number of boxes (padded boxes zeros, padded classes -1).
``check_segmentation_labels`` counts the pixels of each class and refuses
segmentation data with a single class (a perfect mean IoU for free); own mask
folders are checked file by file (binary 0/255 masks, classes.txt, stray
values: data/README.md, "Mask values").
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import cv2
import numpy as np
import tensorflow as tf

from common import faces, synthetic

SPLITS = synthetic.SPLITS  # ("train", "validation", "test"), the tfds names
TASKS = ("classification", "detection", "segmentation")
IGNORE_LABEL = 255  # segmentation pixels that no loss or metric should count
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# Own data without split folders is divided by a hash of each file's relative
# path: stable when files are added or removed, and the same on every machine.
HASH_SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}

# Native image size of each registered data set (None: varies per image).
_DEFAULT_IMAGE_SIZES = {
    "shapes": 128, "shapes_classification": 64, "shapes_segmentation": 128, "digits": 8,
    "mnist": 28, "cifar10": 32, "cifar100": 32, "oxford_iiit_pet": None,
    "voc/2007": None, "coco/2017": None,
}
_DEFAULT_TASKS = {
    "shapes": "detection", "shapes_classification": "classification",
    "shapes_segmentation": "segmentation", "digits": "classification",
    "mnist": "classification", "cifar10": "classification", "cifar100": "classification",
    "oxford_iiit_pet": "classification", "voc/2007": "detection", "coco/2017": "detection",
}
_TFDS_NAMES = ("mnist", "cifar10", "cifar100", "oxford_iiit_pet", "voc/2007", "coco/2017")
_EMBEDDED_ALTERNATIVE = {
    "classification": "shapes_classification", "detection": "shapes",
    "segmentation": "shapes_segmentation",
}
# The localization / landmark variant (ch05_detection/localization.py): zero or one shape per
# image, detection keys plus "landmarks" float32 [N, K, 2] (normalized x, y) and
# "landmark_visibility" int32 [N, K] (synthetic.make_localization_example).
_DEFAULT_IMAGE_SIZES["shapes_localization"] = 64
_DEFAULT_TASKS["shapes_localization"] = "detection"

# ---------------------------------------------------------------------------
# Class names. Hard-coded because tfds only knows some of them before the
# data have been downloaded (its cifar100 and coco names come from the files).
# ---------------------------------------------------------------------------
MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck")
# The 100 "fine" labels, in the data set's (alphabetical) label order.
CIFAR100_CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
# The 20 Pascal VOC classes in tfds' label order (alphabetical).
VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# The 80 COCO categories in category-id order, which is tfds' 0-based label order.
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
PET_SEGMENTATION_CLASS_NAMES = ("background", "pet")


class DatasetUnavailableError(RuntimeError):
    """A registered data set could not be downloaded or read (e.g. offline)."""


class BadDataWarning(UserWarning):
    """A file of your own data set was skipped (corrupt image, unusable box, ...)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set before seeing it.

    ``num_classes`` counts the classes a model predicts: foreground classes for
    detection (background is the model's business), all mask values except
    255 for segmentation (background included). ``image_size`` is the native
    (height, width), or None when images differ in size.
    """

    name: str
    task: str
    num_classes: int
    class_names: tuple
    image_size: tuple | None


def list_datasets() -> tuple:
    """Names ``load`` accepts (besides a directory path)."""
    return tuple(_DEFAULT_TASKS)


# ---------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------
def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_image_size(image_size):
    """None, an int or (height, width) -> None or a (height, width) tuple."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (int(image_size), int(image_size))
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, (int, np.integer)) and v > 0 for v in image_size)):
        raise ValueError(f"image_size must be None, a positive int or (height, width), "
                         f"got {image_size!r}")
    return (int(image_size[0]), int(image_size[1]))


def _check_positive(value, argument):
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                              or value < 1):
        raise ValueError(f"{argument} must be None or a positive int, got {value!r}")


def _check_task(task, allowed, name):
    if task is not None and task not in allowed:
        raise ValueError(f"task for {name!r} must be one of {allowed} (or None), got {task!r}")


def _unknown_name_error(name):
    return ValueError(
        f"unknown data set {name!r}: expected one of {list_datasets()} or the path of an "
        "existing directory with your own images (layouts in data/README.md)")


# ---------------------------------------------------------------------------
# Shared per-example post-processing: channels and resizing
# ---------------------------------------------------------------------------
def _adapt(example, image_size, channels):
    """Converts ``image`` to float32 [0, 1], sets channels, resizes image and masks.

    Normalized boxes need no change under a resize (a box at 25 % of the width
    stays at 25 %), so only pixels and masks are touched.
    """
    example = dict(example)
    image = example["image"]
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 / 255
    if image.shape[-1] == 1 and channels != 1:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] == 3 and channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    if image_size is not None:
        # Antialiasing keeps thin lines when shrinking (e.g. VOC -> 224).
        image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
        image = tf.clip_by_value(image, 0.0, 1.0)
        if "mask" in example:  # labels must stay labels: nearest neighbour only
            mask = tf.image.resize(example["mask"][..., None], image_size, method="nearest")
            example["mask"] = mask[..., 0]
        if "masks" in example:  # [N, H, W] -> [N, h, w], also for N = 0
            masks = tf.image.resize(example["masks"][..., None], image_size, method="nearest")
            example["masks"] = tf.cast(masks[..., 0], tf.uint8)
    example["image"] = image
    return example


def _finish(dataset, image_size, channels, num_examples=None):
    if num_examples is not None:
        dataset = dataset.take(num_examples)
    image_spec = dataset.element_spec["image"]
    if (image_size is None and image_spec.dtype == tf.float32
            and image_spec.shape[-1] == (channels or 3)):
        return dataset  # already in contract form: skip a no-op map
    return dataset.map(lambda example: _adapt(example, image_size, channels),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ---------------------------------------------------------------------------
# Embedded data: synthetic shapes and scikit-learn digits
# ---------------------------------------------------------------------------
def _shapes_generator(name, split, seed, side, with_masks):
    """``(make, signature)`` of one shapes variant: ``make(index)`` -> dict of NumPy arrays
    (only the keys of ``signature``), a pure function of (index, split, seed)."""
    image_spec = tf.TensorSpec([side, side, 3], tf.float32)
    detection = {"image": image_spec, "boxes": tf.TensorSpec([None, 4], tf.float32),
                 "classes": tf.TensorSpec([None], tf.int32)}
    if name == "shapes":
        signature = dict(detection)
        if with_masks:
            signature["masks"] = tf.TensorSpec([None, side, side], tf.uint8)

        def make(index):
            return synthetic.make_scene(index, split, seed, image_size=side)
    elif name == "shapes_localization":
        num_landmarks = synthetic.NUM_LANDMARKS
        signature = dict(detection, landmarks=tf.TensorSpec([None, num_landmarks, 2], tf.float32),
                         landmark_visibility=tf.TensorSpec([None, num_landmarks], tf.int32))

        def make(index):
            return synthetic.make_localization_example(index, split, seed, image_size=side)
    elif name == "shapes_classification":
        signature = {"image": image_spec, "label": tf.TensorSpec([], tf.int32)}

        def make(index):
            return synthetic.make_classification_example(index, split, seed, image_size=side)
    else:
        signature = {"image": image_spec, "mask": tf.TensorSpec([side, side], tf.int32)}

        def make(index):
            return synthetic.make_segmentation_example(index, split, seed, image_size=side)

    def make_selected(index):
        example = make(index)
        return {key: example[key] for key in signature}

    return make_selected, signature


# Examples drawn per Python call inside the tf.data map of ``generated_dataset``: a chunk pays the
# Python <-> TensorFlow crossing once instead of per example (bench/bench_synthetic.py measures it).
SHAPES_CHUNK_SIZE = 8


class _GeneratorCalls:
    """Counts the Python calls of ``generated_dataset`` pipelines running in tf.data's threads.

    A parallel map runs ahead of its reader. If the interpreter starts shutting down while such a
    call is in flight (a script ends, or dies of an exception, with an iterator still alive), the
    call's thread can never take the GIL back and the iterator's destructor waits for it forever:
    the process hangs at exit. ``wait_at_exit`` (registered with ``atexit``, which runs before that
    point) refuses new calls and waits until the running ones have returned.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.started = 0
        self.exiting = False

    def begin(self):
        with self.lock:
            if self.exiting:
                raise RuntimeError("the interpreter is exiting: no more synthetic examples")
            self.running += 1
            self.started += 1

    def end(self):
        with self.lock:
            self.running -= 1

    def wait_at_exit(self, timeout=5.0, quiet=0.05):
        with self.lock:
            self.exiting = True
            if not self.started:
                return
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:  # until nothing runs and nothing started for `quiet` s
            with self.lock:
                state = (self.running, self.started)
            if state[0] == 0 and state == last:
                return
            last = state
            time.sleep(quiet)


_GENERATOR_CALLS = _GeneratorCalls()
atexit.register(_GENERATOR_CALLS.wait_at_exit)


def generated_dataset(make, signature, num_examples, chunk_size=SHAPES_CHUNK_SIZE,
                      num_parallel_calls=tf.data.AUTOTUNE):
    """``make(0), make(1), ..., make(num_examples - 1)`` as a ``tf.data.Dataset``, in that order,
    generated in parallel.

    ``make(index)`` must be a pure function of the index returning a dict of NumPy arrays that
    match ``signature`` (a dict of ``tf.TensorSpec``; a ``None`` leading dimension marks the
    per-object keys, which all have the same length N in one example, N = 0 included). The
    indices are cut into chunks of ``chunk_size``; ``Dataset.range`` over the chunk starts is
    mapped by ``tf.numpy_function`` with ``num_parallel_calls`` chunks in flight and
    ``deterministic=True`` (examples come out in index order whatever finishes first), then
    unbatched. Per-object keys are padded to the longest example of their chunk and cut back to
    each example's own N after the unbatch.

    The Python function holds the GIL while it runs Python code; NumPy and OpenCV release it
    inside their array loops, which is what two parallel calls gain from.
    """
    _check_positive(num_examples, "num_examples")
    _check_positive(chunk_size, "chunk_size")
    keys = tuple(signature)
    ragged = tuple(key for key in keys if signature[key].shape.rank and
                   signature[key].shape[0] is None)
    for key in keys:
        shape = signature[key].shape
        if not (shape[1:] if key in ragged else shape).is_fully_defined():
            raise ValueError(f"generated_dataset: signature[{key!r}] must have every dimension "
                             f"known but the leading one of per-object keys, got {shape}")

    def make_chunk(start):
        _GENERATOR_CALLS.begin()
        try:
            return draw_chunk(int(start))
        finally:
            _GENERATOR_CALLS.end()

    def draw_chunk(start):
        examples = [make(index) for index in range(start, min(start + chunk_size, num_examples))]
        # N of each example (per-object keys only), so they can be cut back after the unbatch.
        counts = np.asarray([len(example[ragged[0]]) if ragged else 0 for example in examples],
                            np.int32)
        # At least one (padding) row: Dataset.unbatch crashes the process (segmentation fault,
        # TF 2.21) on a component with zero elements, e.g. the boxes of a chunk of empty scenes.
        longest = max(1, int(counts.max()))
        outputs = []
        for key in keys:
            spec = signature[key]
            dtype = spec.dtype.as_numpy_dtype
            if key in ragged:  # [chunk, longest, ...], zeros after each example's own N
                stacked = np.zeros((len(examples), longest) + tuple(spec.shape[1:]), dtype)
                for row, example in enumerate(examples):
                    value = np.asarray(example[key], dtype)
                    if len(value) != counts[row]:
                        raise ValueError(f"generated_dataset: {key!r} has {len(value)} rows but "
                                         f"{ragged[0]!r} {counts[row]} in one example")
                    stacked[row, :len(value)] = value
            else:
                stacked = np.stack([np.asarray(example[key], dtype) for example in examples])
            outputs.append(stacked)
        return outputs + [counts]

    def call(start):
        # stateful=False: the chunk is a pure function of its start index. A stateful function
        # would run one call at a time once op determinism is on (the harness' default).
        outputs = tf.numpy_function(
            make_chunk, [start], [signature[key].dtype for key in keys] + [tf.int32],
            stateful=False)
        chunk = {}
        for key, value in zip(keys, outputs[:-1]):
            shape = signature[key].shape
            value.set_shape([None] + ([None] + shape[1:].as_list() if key in ragged
                                      else shape.as_list()))
            chunk[key] = value
        counts = outputs[-1]
        counts.set_shape([None])
        return chunk, counts

    def cut(example, count):  # drop the chunk's padding rows of the per-object keys
        return {key: example[key][:count] if key in ragged else example[key] for key in keys}

    dataset = tf.data.Dataset.range(0, num_examples, chunk_size).map(
        call, num_parallel_calls=num_parallel_calls, deterministic=True)
    if ragged:
        dataset = dataset.unbatch().map(cut, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)
    else:
        dataset = dataset.unbatch().map(lambda example, count: example)
    return dataset.apply(tf.data.experimental.assert_cardinality(num_examples))


def _load_shapes(name, split, image_size, num_examples, seed, with_masks, channels):
    if num_examples is None:
        num_examples = synthetic.DEFAULT_SPLIT_SIZES[split]
    # Draw at the requested size directly (sharper than resizing); a non-square
    # request is drawn at the larger side and resized.
    if image_size is None:
        side = _DEFAULT_IMAGE_SIZES[name]
    else:
        side = max(16, *image_size)  # synthetic draws at least 16 x 16
    resize = None if image_size in (None, (side, side)) else image_size
    make, signature = _shapes_generator(name, split, seed, side, with_masks)
    return _finish(generated_dataset(make, signature, num_examples), resize, channels)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into scikit-learn's 1797 digits for one split (70/15/15).

    A fixed permutation (seed 0, independent of ``load``'s seed) so the test
    set is the same in every run and on every machine.
    """
    _check_split(split)
    total = 1797  # sklearn.datasets.load_digits: 1797 images of 8 x 8
    order = np.random.default_rng(0).permutation(total)
    train_end, validation_end = int(0.70 * total), int(0.85 * total)
    bounds = {"train": (0, train_end), "validation": (train_end, validation_end),
              "test": (validation_end, total)}
    start, stop = bounds[split]
    return np.sort(order[start:stop])


def _load_digits(split, image_size, num_examples, channels):
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    indices = digits_split_indices(split)
    if num_examples is not None:
        indices = indices[:num_examples]
    images = (digits.images[indices] / 16.0).astype(np.float32)[..., None]  # 0..16 -> [0, 1]
    labels = digits.target[indices].astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return _finish(dataset, image_size, channels)


# ---------------------------------------------------------------------------
# tensorflow-datasets adapters
# ---------------------------------------------------------------------------
# Our split names -> each tfds data set's own. Where a data set has no
# validation split we hold out the last 10 % of its training split.
_TFDS_SPLITS = {
    "mnist": {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},
    "cifar10": {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},
    "cifar100": {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},
    "oxford_iiit_pet": {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},
    "voc/2007": {"train": "train", "validation": "validation", "test": "test"},
    # COCO's test-dev annotations are not public: "test" is val2017 as well,
    # which is what papers report on.
    "coco/2017": {"train": "train", "validation": "validation", "test": "validation"},
}

_PET_MASK_TABLE = np.full(256, IGNORE_LABEL, np.int32)
_PET_MASK_TABLE[1] = 1  # tfds trimap 1 = pet
_PET_MASK_TABLE[2] = 0  # 2 = background
_PET_MASK_TABLE[3] = IGNORE_LABEL  # 3 = the uncertain border around the pet


def pet_trimap_to_mask(segmentation_mask):
    """Oxford-IIIT Pet trimap (tfds values 1 pet, 2 background, 3 border) -> contract.

    Args:
      segmentation_mask: uint8 [H, W, 1] or [H, W].
    Returns:
      int32 [H, W]: 0 background, 1 pet, 255 border (ignored by losses and
      metrics, as in the data set's own evaluation); any other value -> 255.
    """
    mask = tf.convert_to_tensor(segmentation_mask)
    if mask.shape.rank == 3:
        mask = mask[..., 0]
    return tf.gather(tf.constant(_PET_MASK_TABLE), tf.cast(mask, tf.int32))


def _objects(example, keys):
    """The per-object sequences, cut to a common length.

    Real tfds data always have equal lengths; tfds.testing.mock_data draws
    each sequence with its own random length, so the cut lets the adapters
    run (and be tested) under the mock too. On real data it changes nothing.
    """
    objects = example["objects"]
    count = tf.reduce_min(tf.stack([tf.shape(objects[key])[0] for key in keys]))
    return {key: objects[key][:count] for key in keys}


def _adapt_tfds(name, task, keep_difficult):
    def classification(example):
        return {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}

    def pet_segmentation(example):
        image = example["image"]
        mask = pet_trimap_to_mask(example["segmentation_mask"])
        # Same size as the image on real data; the resize is a no-op there and
        # only matters under tfds' random mock, whose mask has its own size.
        mask = tf.image.resize(mask[..., None], tf.shape(image)[:2], method="nearest")[..., 0]
        return {"image": image, "mask": mask}

    def detection(example, flag, drop_when_true):
        objects = _objects(example, ["bbox", "label", flag])
        keep = tf.ones_like(objects[flag]) if not drop_when_true else tf.logical_not(objects[flag])
        boxes = tf.clip_by_value(tf.boolean_mask(objects["bbox"], keep), 0.0, 1.0)
        classes = tf.cast(tf.boolean_mask(objects["label"], keep), tf.int32)
        return {"image": example["image"], "boxes": tf.reshape(boxes, [-1, 4]), "classes": classes}

    if name == "oxford_iiit_pet" and task == "segmentation":
        return pet_segmentation
    if name == "voc/2007":
        return lambda example: detection(example, "is_difficult", not keep_difficult)
    if name == "coco/2017":
        # Crowd annotations cover a group of objects with one box; the COCO
        # evaluation ignores them, so they are not training targets either.
        return lambda example: detection(example, "is_crowd", True)
    return classification


def embedded_alternative(name: str, task: str | None = None) -> str:
    """The embedded data set (no download) to use when ``name`` cannot be had.

    mnist -> digits (hand-written digits too); otherwise by task: shapes
    (detection), shapes_classification, shapes_segmentation.
    """
    if name == "mnist":
        return "digits"
    if name == "lfw":
        return "faces"
    task = task or _DEFAULT_TASKS.get(name, "detection")
    return _EMBEDDED_ALTERNATIVE.get(task, "shapes")


def _exception_chain(error):
    """``error`` and every exception it was raised from / during, outermost first."""
    chain = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _network_error_types():
    """Exception types that mean "the download did not get through"."""
    import socket
    import urllib.error

    types = [ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError]
    try:
        import requests  # what tensorflow-datasets downloads with

        types.append(requests.exceptions.RequestException)
    except ImportError:
        pass
    try:
        import tensorflow_datasets as tfds

        types.append(tfds.download.DownloadError)
    except (ImportError, AttributeError):
        pass
    return tuple(types)


def _failure_kind(error):
    """("module" | "name" | "network" | "other", the exception that says so).

    Walks from the outermost exception inward; the first one that tells what
    happened decides.
    """
    network = _network_error_types()
    for cause in _exception_chain(error):
        if isinstance(cause, ImportError):
            return "module", cause
        if type(cause).__name__ == "DatasetNotFoundError" or re.search(
                r"BuilderConfig .* not found", str(cause)):
            return "name", cause
        if isinstance(cause, network):
            return "network", cause
    return "other", error


def _tfds_failure_message(name, tfds_split, data_dir, task, error):
    """Says what went wrong when tfds could not give ``name``: a missing module,
    the network, a name this tfds does not know, or anything else."""
    alternative = embedded_alternative(name, task)
    offline_hint = (f"To go on without it, train on the embedded data, which needs no "
                    f"download: pass `--dataset {alternative}` to a training script "
                    f"(data.load({alternative!r}, ...) in Python).")
    where = f"tfds data set {name!r} (split {tfds_split!r}, data_dir {data_dir!r})"
    kind, cause = _failure_kind(error)
    # First line only: tfds' "not found" error goes on to list every data set it knows.
    first_line = (str(cause).strip().splitlines() or [""])[0]
    original = f"{type(cause).__name__}: {first_line[:400]}"
    if kind == "module":
        module = getattr(cause, "name", None) or str(cause)
        state = ("is not installed" if isinstance(cause, ModuleNotFoundError)
                 else "could not be imported (another version installed?)")
        return (f"could not load {where}: the Python module {module!r} {state}; "
                f"tensorflow-datasets needs it ({original}). Install the pinned requirements: "
                f"`pip install -r requirements.txt` (`make test` does it in .venv). "
                f"{offline_hint}")
    if kind == "name":
        import tensorflow_datasets as tfds

        return (f"could not load {where}: tensorflow-datasets {tfds.__version__} has no data set "
                f"or config named {name!r} ({original}). The name is registered in "
                f"common/data.py; install the tensorflow-datasets version pinned in "
                f"requirements.txt (`pip install -r requirements.txt`). {offline_hint}")
    if kind == "network":
        return (f"could not download {where}: the download failed, no network connection "
                f"(offline, or the server did not answer; {original}). {offline_hint} "
                f"To use {name!r}, connect to the internet once so tensorflow-datasets can "
                f"download and prepare it, or prepare it on another machine "
                f"(`tfds build {name}`) and pass data_dir=... pointing at the copied folder "
                f"(see data/README.md).")
    return (f"could not load {where}: {original}. {offline_hint} If the download or the "
            f"prepared copy is broken, delete the data set's folder under data_dir and "
            f"retry (see data/README.md).")


def _tfds_load(name, tfds_split, data_dir, task):
    try:
        import tensorflow_datasets as tfds  # imported here: slow, and only needed here

        return tfds.load(name, split=tfds_split, data_dir=data_dir, shuffle_files=False)
    except Exception as error:  # reworded below: missing module, network, name, other
        raise DatasetUnavailableError(
            _tfds_failure_message(name, tfds_split, data_dir, task, error)) from error


def _load_tfds(name, split, task, image_size, num_examples, data_dir, with_masks, channels,
               keep_difficult):
    allowed = ("classification", "segmentation") if name == "oxford_iiit_pet" else (
        _DEFAULT_TASKS[name],)
    _check_task(task, allowed, name)
    task = task or _DEFAULT_TASKS[name]
    if with_masks:
        raise ValueError(f"with_masks=True: {name!r} has no instance masks in tfds; "
                         "use 'shapes' for instance segmentation")
    dataset = _tfds_load(name, _TFDS_SPLITS[name][split], data_dir, task)
    dataset = dataset.map(_adapt_tfds(name, task, keep_difficult),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(dataset, image_size, channels, num_examples)


# ---------------------------------------------------------------------------
# Your own data in a folder
# ---------------------------------------------------------------------------
def hash_split(relative_path: str) -> str:
    """The split of a file in a folder without split sub-folders (80/10/10).

    The first 8 hex digits of the MD5 of the relative path (with "/") give a
    number in [0, 1); each file keeps its split when others are added.
    """
    key = str(relative_path).replace(os.sep, "/")
    fraction = int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) / 16 ** 8
    if fraction < HASH_SPLIT_FRACTIONS["train"]:
        return "train"
    if fraction < HASH_SPLIT_FRACTIONS["train"] + HASH_SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "test"


class _BadData:
    """Collects problems found while indexing: warn and skip, or raise (strict)."""

    def __init__(self, strict):
        self.strict = strict

    def __call__(self, path, reason):
        message = f"{path}: {reason}"
        if self.strict:
            raise ValueError(message)
        warnings.warn(f"skipped {message}", BadDataWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel():
    """warnings.warn stacklevel that points at the first frame outside this file."""
    frame, level = sys._getframe(2), 1  # frame 2: the function that calls warn()
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _is_image(path):
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _read_image(path):
    """RGB uint8 [H, W, 3] via OpenCV, or None if the file cannot be decoded."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _image_shape(path, bad):
    """(height, width) of a readable image, else reports it and returns None."""
    image = _read_image(path)
    if image is None:
        bad(path, "not a readable image (corrupt or unsupported format)")
        return None
    return image.shape[:2]


def _detect_layout(root):
    if _coco_json_files(root):
        return "coco"
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "segmentation"
    if any((root / split / "images").is_dir() for split in SPLITS):
        return "segmentation"
    return "classification"


def _split_root(root, split):
    """root/<split> when the folder has split sub-folders, else None (hash split)."""
    if any((root / name).is_dir() for name in SPLITS):
        folder = root / split
        if not folder.is_dir():
            present = [name for name in SPLITS if (root / name).is_dir()]
            raise ValueError(f"{root} has split folders {present} but no {split!r} folder")
        return folder
    return None


# -- (a) one folder per class ----------------------------------------------
def _classification_class_names(root):
    """Sorted sub-folder names; from root/train when there are split folders,
    so that every split numbers the classes alike."""
    name_root = root / "train" if any((root / s).is_dir() for s in SPLITS) else root
    class_names = tuple(sorted(p.name for p in name_root.iterdir() if p.is_dir())) if (
        name_root.is_dir()) else ()
    if not class_names:
        raise ValueError(f"{name_root} has no class sub-folders: expected "
                         f"{name_root}/<class name>/<image>{IMAGE_EXTENSIONS}")
    return class_names


def _classification_index(root, split, bad):
    base = _split_root(root, split)
    class_root = base if base is not None else root
    class_names = _classification_class_names(root)
    records = []
    for label, class_name in enumerate(class_names):
        folder = class_root / class_name
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            if base is None and hash_split(path.relative_to(root).as_posix()) != split:
                continue
            if _image_shape(path, bad) is not None:
                records.append({"path": path, "label": label})
    return class_names, records


# -- (b) COCO JSON -----------------------------------------------------------
def _coco_json_files(root):
    files = []
    for folder in (root, root / "annotations"):
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                try:
                    with open(path) as handle:
                        content = json.load(handle)
                except (OSError, ValueError):
                    continue
                if isinstance(content, dict) and {"images", "annotations", "categories"} <= set(
                        content):
                    files.append(path)
    return files


_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}


def _split_of_file_name(path):
    """"train", "validation", "test" if the file name says so (instances_val2017.json), else None."""
    stem = path.stem.lower()
    for split, aliases in _SPLIT_ALIASES.items():
        if any(re.search(rf"(^|[^a-z]){alias}([^a-z]|$)", stem) for alias in aliases):
            return split
    return None


def _coco_json_for_split(root, split):
    """(json path, use_hash_split).

    JSON files named after splits (train.json, instances_val2017.json, ...)
    are used as they are; a single JSON without a split name is divided by
    the hash split.
    """
    files = _coco_json_files(root)
    if not files:
        raise ValueError(f"{root}: no COCO JSON with 'images', 'annotations' and 'categories'")
    named = {}
    for path in files:
        named.setdefault(_split_of_file_name(path), path)
    named.pop(None, None)
    if named:
        if split not in named:
            raise ValueError(f"{root}: COCO JSON files {[p.name for p in files]} name the splits "
                             f"{sorted(named)}, none is for split {split!r}")
        return named[split], False
    if len(files) == 1:
        return files[0], True
    raise ValueError(f"{root} has several COCO JSON files {[p.name for p in files]} and none "
                     f"is named after split {split!r} (e.g. train.json, val.json, test.json)")


def _coco_class_names(files, root):
    if not files:
        raise ValueError(f"{root}: no COCO JSON with 'images', 'annotations' and 'categories'")
    # Every split's JSON should list the same categories; prefer the train one.
    files = sorted(files, key=lambda path: _split_of_file_name(path) != "train")
    with open(files[0]) as handle:
        categories = sorted(json.load(handle)["categories"], key=lambda c: c["id"])
    return tuple(str(c.get("name", c["id"])) for c in categories)


def _find_image(root, json_dir, file_name):
    for folder in (root / "images", root, json_dir, json_dir / "images"):
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def _normalize_box(ymin, xmin, ymax, xmax, height, width, path, bad, what):
    """Absolute pixel edges -> normalized yxyx, clipped; None if unusable."""
    box = np.array([ymin / height, xmin / width, ymax / height, xmax / width], np.float64)
    if not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        bad(path, f"{what}: degenerate box (ymin, xmin, ymax, xmax) = "
                  f"{(ymin, xmin, ymax, xmax)} pixels")
        return None
    clipped = np.clip(box, 0.0, 1.0)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        bad(path, f"{what}: box {(ymin, xmin, ymax, xmax)} lies outside the "
                  f"{height} x {width} image")
        return None
    return clipped.astype(np.float32)  # partly outside: clipped to the image


def _check_segmentation(segmentation, height, width):
    """None if a COCO ``segmentation`` is usable for an image of ``height`` x ``width``, else
    the reason: polygons ``[[x1, y1, x2, y2, ...], ...]`` (at least 3 points each) or RLE
    ``{"size": [height, width], "counts": [...] or "..."}`` of the image's size."""
    if isinstance(segmentation, list):
        if not segmentation or not all(
                isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                and all(isinstance(v, (int, float)) for v in polygon) for polygon in segmentation):
            return ("'segmentation' polygons must be lists [x1, y1, x2, y2, ...] of at least 3 "
                    "points")
        return None
    if isinstance(segmentation, dict) and {"size", "counts"} <= set(segmentation):
        size = segmentation["size"]
        if not (isinstance(size, list) and len(size) == 2) or [int(v) for v in size] != [
                height, width]:
            return f"RLE 'size' {size} is not the image's [height, width] [{height}, {width}]"
        if not isinstance(segmentation["counts"], (list, str)):
            return "RLE 'counts' must be a list of run lengths or a compressed string"
        return None
    return ("'segmentation' must be polygons (a list of [x1, y1, ...] lists) or RLE "
            "({'size': [h, w], 'counts': ...})")


def decode_coco_segmentation(segmentation, height, width):
    """One COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> uint8 mask
    ``[height, width]`` of 0/1, with ``pycocotools.mask`` (polygons are rasterised by its
    ``frPyObjects``; several polygons of one object are merged)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE, counts as str
        rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _coco_index(root, split, bad, with_masks=False):
    json_path, use_hash = _coco_json_for_split(root, split)
    with open(json_path) as handle:
        content = json.load(handle)
    categories = sorted(content["categories"], key=lambda c: c["id"])
    # COCO ids have gaps (1..90 for 80 classes): renumber 0, 1, 2, ... by id.
    class_of_category = {c["id"]: index for index, c in enumerate(categories)}
    class_names = tuple(str(c.get("name", c["id"])) for c in categories)
    annotations_of_image = {}
    for annotation in content["annotations"]:
        annotations_of_image.setdefault(annotation["image_id"], []).append(annotation)
    records = []
    for image_entry in sorted(content["images"], key=lambda e: str(e["file_name"])):
        file_name = str(image_entry["file_name"])
        if use_hash and hash_split(file_name) != split:
            continue
        path = _find_image(root, json_path.parent, file_name)
        if path is None:
            bad(root / file_name, f"listed in {json_path.name} but not found under {root}")
            continue
        shape = _image_shape(path, bad)
        if shape is None:
            continue
        height, width = shape
        boxes, classes, segmentations = [], [], []
        for annotation in annotations_of_image.get(image_entry["id"], []):
            if annotation.get("iscrowd", 0):
                continue  # crowd regions are ignored, as in the COCO evaluation
            if annotation["category_id"] not in class_of_category:
                bad(path, f"annotation {annotation.get('id')} has unknown category_id "
                          f"{annotation['category_id']}")
                continue
            if with_masks:  # the object needs its mask: without one it is skipped whole
                problem = ("no 'segmentation'" if "segmentation" not in annotation else
                           _check_segmentation(annotation["segmentation"], height, width))
                if problem is not None:
                    bad(path, f"annotation {annotation.get('id')} in {json_path.name}: {problem}")
                    continue
            x, y, box_width, box_height = (float(v) for v in annotation["bbox"])  # xywh pixels
            box = _normalize_box(y, x, y + box_height, x + box_width, height, width, path, bad,
                                 f"annotation {annotation.get('id')}")
            if box is not None:
                boxes.append(box)
                classes.append(class_of_category[annotation["category_id"]])
                if with_masks:
                    segmentations.append(annotation["segmentation"])
        record = {"path": path, "boxes": np.reshape(np.array(boxes, np.float32), (-1, 4)),
                  "classes": np.array(classes, np.int32)}
        if with_masks:
            record.update(segmentations=segmentations, height=height, width=width)
        records.append(record)
    return class_names, records


# -- (c) Pascal VOC XML ------------------------------------------------------
def _parse_voc_xml(xml_path):
    """(file name, [(name, difficult, xmin, ymin, xmax, ymax)]) or raises ValueError."""
    try:
        tree = ElementTree.parse(xml_path).getroot()
        file_name = tree.findtext("filename") or (xml_path.stem + ".jpg")
        objects = []
        for obj in tree.iter("object"):
            box = obj.find("bndbox")
            objects.append((obj.findtext("name").strip(), int(obj.findtext("difficult") or 0),
                            *(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{xml_path}: not a Pascal VOC annotation ({error})") from error
    return file_name, objects


def _parse_voc_folder(root, bad):
    parsed = {}
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        try:
            parsed[xml_path] = _parse_voc_xml(xml_path)
        except ValueError as error:
            bad(xml_path, str(error).split(": ", 1)[-1])
    return parsed


def _voc_class_names(parsed):
    # Class ids from every XML of the folder, so all splits number them alike.
    return tuple(sorted({obj[0] for _, objects in parsed.values() for obj in objects}))


def _voc_index(root, split, bad, keep_difficult):
    parsed = _parse_voc_folder(root, bad)
    class_names = _voc_class_names(parsed)
    list_file = root / "ImageSets" / "Main" / f"{'val' if split == 'validation' else split}.txt"
    chosen = None
    if list_file.is_file():  # VOC's own split lists: one image id per line
        chosen = {line.split()[0] for line in list_file.read_text().splitlines() if line.strip()}
    records = []
    for xml_path, (file_name, objects) in parsed.items():
        if chosen is not None:
            if xml_path.stem not in chosen:
                continue
        elif hash_split(xml_path.stem) != split:
            continue
        path = root / "JPEGImages" / file_name
        if not path.is_file():
            bad(path, f"image of {xml_path.name} not found")
            continue
        shape = _image_shape(path, bad)
        if shape is None:
            continue
        height, width = shape
        boxes, classes = [], []
        for name, difficult, xmin, ymin, xmax, ymax in objects:
            if difficult and not keep_difficult:
                continue
            # VOC pixel coordinates are 1-based and inclusive: pixel column
            # xmin covers [xmin - 1, xmin] in 0-based edge coordinates.
            box = _normalize_box(ymin - 1, xmin - 1, ymax, xmax, height, width, xml_path, bad,
                                 f"object {name!r}")
            if box is not None:
                boxes.append(box)
                classes.append(class_names.index(name))
        records.append({"path": path, "boxes": np.reshape(np.array(boxes, np.float32), (-1, 4)),
                        "classes": np.array(classes, np.int32)})
    return class_names, records


# -- (d) images + masks ------------------------------------------------------
# Label conventions of a mask folder (data/README.md, "Mask values"):
# * label masks: 0 = background, 1, 2, ... = classes, 255 = ignore;
# * binary masks: every mask holds only 0 and 255 (the usual one-object
#   format): 255 is read as class 1, since under "255 = ignore" such a folder
#   would have a single class and nothing to learn.
BINARY_MASK_VALUES = (0, IGNORE_LABEL)


@dataclasses.dataclass(frozen=True)
class _SegmentationLabels:
    """How a folder's mask values become labels: class names and the binary rule."""

    class_names: tuple
    binary: bool  # masks hold only 0 and 255: 255 -> 1

    @property
    def num_classes(self):
        return len(self.class_names)


def _read_mask(path):
    """int32 [H, W] labels; None if unreadable; "colour" if the channels differ."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        return None
    if mask.ndim == 3:
        mask = mask[..., :3] if mask.shape[2] == 4 else mask  # an alpha channel is no label
        if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, mask.shape[2])):
            return "colour"
        mask = mask[..., 0]
    return mask.astype(np.int32)


_MASK_SCANS = {}  # path -> ((mtime_ns, size), (shape, values) or None)


def _scan_mask(path):
    """((height, width), sorted values) of a mask file, or None if unreadable.

    Cached per file (by modification time and size): get_info and every
    split's load read each mask only once.
    """
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _MASK_SCANS.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    mask = _read_mask(path)
    scan = None
    if isinstance(mask, np.ndarray) and mask.size and mask.min() >= 0:
        # bincount is O(pixels), np.unique would sort them.
        scan = (mask.shape, tuple(int(v) for v in np.flatnonzero(np.bincount(mask.ravel()))))
    _MASK_SCANS[path] = (key, scan)
    return scan


def _segmentation_folders(root):
    """[(split, folder)]: (None, root) for one images/ + masks/ pair (hash split),
    else one entry per split folder that has images/."""
    if (root / "images").is_dir():
        return [(None, root)]
    return [(split, root / split) for split in SPLITS if (root / split / "images").is_dir()]


def _segmentation_pairs(root, folder, split):
    """(image path, mask path or None) of one folder, restricted to ``split``
    by the hash when ``split`` is given."""
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise ValueError(f"{folder}: expected images/ and masks/ sub-folders")
    masks_by_stem = {p.stem: p for p in mask_dir.iterdir() if p.is_file()}
    for path in sorted(p for p in image_dir.iterdir() if _is_image(p)):
        if split is not None and hash_split(path.relative_to(root).as_posix()) != split:
            continue
        yield path, masks_by_stem.get(path.stem)


def _mask_value_error(mask_path, values, num_classes, reason=""):
    """The one message for a mask value that is no label: file, values, allowed range."""
    hint = (" JPEG compression changes label values: save masks as PNG."
            if mask_path.suffix.lower() in (".jpg", ".jpeg") else "")
    return ValueError(
        f"{mask_path}: mask values must be class ids in [0, {num_classes - 1}] or the ignore "
        f"label {IGNORE_LABEL}; found {[int(v) for v in values][:10]}.{reason}{hint} (Mask values: "
        "data/README.md)")


_NOTED = set()


def _note_once(key, message):
    if key not in _NOTED:
        _NOTED.add(key)
        print(message)


def _segmentation_labels(root):
    """Reads every mask of the folder (all splits) once and fixes the label convention.

    Class names come from classes.txt (line i = label i) when present, else
    from the labels seen, which must then run 0, 1, ..., K-1 without gaps.

    Raises:
      ValueError: naming the mask file, for a value that is no class (beyond
        classes.txt, or a stray value above a gap); naming the folder, when
        the masks hold a single class (a model would score a perfect mean IoU
        by predicting it everywhere).
    """
    names_file = root / "classes.txt"
    listed = None
    if names_file.is_file():
        listed = tuple(line.strip() for line in names_file.read_text().splitlines()
                       if line.strip())
        if not listed:
            raise ValueError(f"{names_file} is empty: expected one class name a line "
                             "(line i = label i, starting with the background)")
    folders = _segmentation_folders(root)
    if not folders:
        raise ValueError(f"{root}: expected images/ and masks/ sub-folders (or "
                         "train/images/, train/masks/, ...; data/README.md)")
    first_file_of = {}  # mask value -> the first mask file holding it
    for _, folder in folders:
        for _, mask_path in _segmentation_pairs(root, folder, None):
            scan = _scan_mask(mask_path) if mask_path is not None else None
            for value in scan[1] if scan is not None else ():  # unreadable: reported by load
                first_file_of.setdefault(value, mask_path)
    values = set(first_file_of)

    if values == set(BINARY_MASK_VALUES):
        if listed is not None and len(listed) != 2:
            raise ValueError(
                f"{root}: every mask holds only 0 and 255, read as binary masks (0 = "
                f"background, 255 = object), but {names_file.name} lists {len(listed)} "
                f"classes: list two (background, your object) or give the masks labels "
                f"0..{len(listed) - 1}")
        names = listed or ("background", "foreground")
        _note_once(root, f"note: every mask in {root} holds only 0 and 255: read as binary "
                         f"masks, 0 = {names[0]}, 255 -> label 1 = {names[1]} "
                         "(data/README.md, Mask values)")
        return _SegmentationLabels(tuple(names), binary=True)

    labels = sorted(values - {IGNORE_LABEL})
    if listed is not None:
        stray = [value for value in labels if value >= len(listed)]
        if stray:
            raise _mask_value_error(first_file_of[stray[0]], stray, len(listed),
                                    f" {names_file.name} lists {len(listed)} classes.")
        names = listed
    else:
        count = labels[-1] + 1 if labels else 1
        unused = sorted(set(range(count)) - set(labels))
        if unused and labels:
            stray = [value for value in labels if value > unused[0]]
            raise _mask_value_error(
                first_file_of[stray[0]], stray, unused[0],
                f" The masks of {root} hold the labels {labels[:20]}: {unused[0]} never occurs, "
                f"so {stray[0]} looks like a stray value. If it is a class, list every class "
                f"name in {names_file} (line i = label i).")
        names = ("background",) + tuple(f"class_{i}" for i in range(1, count))
    if len(labels) < 2:
        seen = f"only label {labels[0]}" if labels else f"no label but {IGNORE_LABEL} (ignore)"
        raise ValueError(
            f"{root}: the masks hold {seen} (values seen: {sorted(values)}): a single class, "
            "so a model that predicts it everywhere would score a perfect mean IoU and learn "
            "nothing. Masks need background 0 and at least one object label (1, 2, ...), or "
            "0 and 255 for binary masks (data/README.md, Mask values).")
    return _SegmentationLabels(tuple(names), binary=False)


def _segmentation_index(root, split, bad):
    folders = dict(_segmentation_folders(root))
    if None in folders:
        folder, by_hash = folders[None], split
    else:
        folder, by_hash = _split_root(root, split), None
    records = []
    for path, mask_path in _segmentation_pairs(root, folder, by_hash):
        if mask_path is None:
            bad(path, f"no mask with the same name in {folder / 'masks'}")
            continue
        shape = _image_shape(path, bad)
        if shape is None:
            continue
        scan = _scan_mask(mask_path)
        if scan is None:
            bad(mask_path, "not a readable single-channel label image (integer class per pixel)")
            continue
        if scan[0] != tuple(shape):
            bad(mask_path, f"mask is {scan[0]} but its image is {tuple(shape)}")
            continue
        records.append({"path": path, "mask_path": mask_path})
    return records


def _read_labels(mask_path, labels, image_shape):
    """The mask of one example as the contract wants it, checked as it is read.

    Binary masks get 255 -> 1; every value must be a class id or 255. Raises
    ValueError naming the file, so a bad label never reaches TensorFlow.
    """
    mask = _read_mask(mask_path)
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"{mask_path}: not a readable single-channel label image any more "
                         "(changed since the folder was indexed?)")
    if mask.shape != tuple(image_shape):
        raise ValueError(f"{mask_path}: mask is {mask.shape} but its image is "
                         f"{tuple(image_shape)}")
    if labels.binary:
        mask = np.where(mask == IGNORE_LABEL, 1, mask).astype(np.int32)
    bad = (mask < 0) | ((mask >= labels.num_classes) & (mask != IGNORE_LABEL))
    if bad.any():
        raise _mask_value_error(mask_path, np.unique(mask[bad]), labels.num_classes)
    return mask


def check_segmentation_labels(dataset, num_classes, *, what="segmentation data",
                              class_names=None, max_examples=None):
    """Pixel count of every class in ``dataset``; refuses labels that cannot be scored.

    Args:
      dataset: a ``tf.data.Dataset`` of dicts with a ``"mask"`` key or of
        ``(image, mask)`` tuples, batched or not; masks int [..., H, W].
      num_classes: classes the model predicts (255 = ignore is not one).
      what: how to name the data in messages, e.g. "my_folder validation split".
      class_names: optional names for the message.
      max_examples: look at the first this many elements only (None: all).

    Returns:
      int64 [num_classes]: pixels of each class (ignored pixels not counted).

    Raises:
      ValueError: a value outside [0, num_classes) other than 255; no
        example; or fewer than two classes present, since then a model that
        predicts the one class everywhere reaches mean IoU 1.0.
    """
    _check_positive(num_classes, "num_classes")
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    counts = np.zeros(num_classes, np.int64)
    examples = 0
    for element in dataset.as_numpy_iterator():
        mask = np.asarray(element["mask"] if isinstance(element, dict) else element[1])
        bad = (mask < 0) | ((mask >= num_classes) & (mask != IGNORE_LABEL))
        if bad.any():
            raise ValueError(
                f"{what}: mask values must be class ids in [0, {num_classes - 1}] or the "
                f"ignore label {IGNORE_LABEL}; found {np.unique(mask[bad])[:10].tolist()}")
        counts += np.bincount(mask[mask != IGNORE_LABEL].ravel(), minlength=num_classes)
        examples += 1
    if not examples:
        raise ValueError(f"{what}: no examples")
    present = np.flatnonzero(counts)
    if len(present) < 2:
        names = class_names or tuple(str(i) for i in range(num_classes))
        seen = (f"only class {int(present[0])} ({names[present[0]]})" if len(present)
                else f"no pixel that counts (all {IGNORE_LABEL} = ignore)")
        raise ValueError(
            f"{what}: the masks hold {seen} in {examples} examples: a single class, so a model "
            "that predicts it everywhere would score a perfect mean IoU. Use data with "
            "background and at least one object class (data/README.md, Mask values).")
    return counts


def _folder_kind(root, task):
    layout = _detect_layout(root)
    if task is None:
        return layout
    _check_task(task, TASKS, str(root))
    if task == "detection" and layout not in ("coco", "voc"):
        raise ValueError(f"task='detection' but {root} has neither a COCO JSON nor "
                         "Annotations/*.xml (see data/README.md)")
    if task == "detection":
        return layout
    return task


def _load_folder(root, split, task, image_size, num_examples, with_masks, channels,
                 keep_difficult, strict):
    kind = _folder_kind(root, task)
    bad = _BadData(strict)
    if with_masks and kind == "voc":
        raise ValueError(f"with_masks=True: {root} is a Pascal VOC folder (Annotations/*.xml), "
                         "which has boxes only, no instance masks; use a COCO JSON folder whose "
                         "annotations have 'segmentation' (polygons or RLE), or 'shapes'")
    if with_masks and kind != "coco":
        raise ValueError(f"with_masks=True: {root} is a {kind} folder; instance masks are read "
                         "from COCO JSON folders (annotations with 'segmentation') and 'shapes'")
    if kind == "classification":
        _, records = _classification_index(root, split, bad)
    elif kind == "coco":
        _, records = _coco_index(root, split, bad, with_masks)
    elif kind == "voc":
        _, records = _voc_index(root, split, bad, keep_difficult)
    else:
        labels = _segmentation_labels(root)
        records = _segmentation_index(root, split, bad)
    if not records:
        raise ValueError(f"{root}: no usable examples for split {split!r} (layouts and the "
                         "80/10/10 hash split are described in data/README.md)")
    if num_examples is not None:
        records = records[:num_examples]

    image_spec = tf.TensorSpec([None, None, 3], tf.uint8)
    if kind == "classification":
        signature = {"image": image_spec, "label": tf.TensorSpec([], tf.int32)}
    elif kind == "segmentation":
        signature = {"image": image_spec, "mask": tf.TensorSpec([None, None], tf.int32)}
    else:
        signature = {"image": image_spec, "boxes": tf.TensorSpec([None, 4], tf.float32),
                     "classes": tf.TensorSpec([None], tf.int32)}
        if with_masks:
            signature["masks"] = tf.TensorSpec([None, None, None], tf.uint8)

    def generate():
        for record in records:
            # Every file was decoded once while indexing; OpenCV decodes it
            # again here, so what was checked is exactly what is used.
            example = {"image": _read_image(record["path"])}
            if example["image"] is None:
                raise ValueError(f"{record['path']}: not a readable image any more "
                                 "(changed since the folder was indexed?)")
            if kind == "classification":
                example["label"] = np.int32(record["label"])
            elif kind == "segmentation":  # checked here, so the error names the file
                example["mask"] = _read_labels(record["mask_path"], labels,
                                               example["image"].shape[:2])
            else:
                example["boxes"], example["classes"] = record["boxes"], record["classes"]
                if with_masks:  # [N, H, W] 0/1, one per box
                    height, width = record["height"], record["width"]
                    masks = [decode_coco_segmentation(s, height, width)
                             for s in record["segmentations"]]
                    example["masks"] = (np.stack(masks) if masks
                                        else np.zeros((0, height, width), np.uint8))
            yield example

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(records)))
    return _finish(dataset, image_size, channels)


# ---------------------------------------------------------------------------
# Face verification: persons, not classes (ch04_classification/siamese.py)
# ---------------------------------------------------------------------------
# "faces": the embedded persons of common/faces.py; "lfw": Labeled Faces in the
# Wild through tensorflow-datasets. ``label`` is a person number and the persons
# of train / validation / test are disjoint (verification is scored on people
# never seen), so there is no class list shared by the splits.
FACE_DATASETS = ("faces", "lfw")
_DEFAULT_IMAGE_SIZES.update({"faces": 64, "lfw": 250})
_DEFAULT_TASKS.update({"faces": "classification", "lfw": "classification"})
# LFW has one tfds split; its persons go to train / validation / test by a
# FarmHash of the name (platform independent): buckets 0-7, 8, 9 (80/10/10).
LFW_SPLIT_BUCKETS = {"train": (0, 8), "validation": (8, 9), "test": (9, 10)}


def lfw_person_split(name: str) -> str:
    """The split of an LFW person, e.g. lfw_person_split("George_W_Bush")."""
    bucket = int(tf.strings.to_hash_bucket_fast(tf.constant(name), 10))
    return next(s for s, (low, high) in LFW_SPLIT_BUCKETS.items() if low <= bucket < high)


def _load_face_dataset(name, split, task, image_size, num_examples, seed, data_dir,
                       with_masks, channels):
    _check_task(task, ("classification",), name)
    if with_masks:
        raise ValueError(f"with_masks=True: {name!r} has no masks")
    if name == "lfw":
        low, high = LFW_SPLIT_BUCKETS[split]

        def person_of_split(example):
            bucket = tf.strings.to_hash_bucket_fast(example["label"], 10)
            return tf.logical_and(bucket >= low, bucket < high)

        def adapt(example):  # the person number: a hash of the name (31 bits)
            label = tf.strings.to_hash_bucket_fast(example["label"], 2**31 - 1)
            return {"image": example["image"], "label": tf.cast(label, tf.int32)}

        dataset = _tfds_load("lfw", "train", data_dir, "classification")
        dataset = dataset.filter(person_of_split).map(adapt)
        return _finish(dataset, image_size, channels, num_examples)
    per_person = faces.DEFAULT_IMAGES_PER_IDENTITY[split]
    if num_examples is None:
        num_examples = faces.DEFAULT_IDENTITIES[split] * per_person
    side = _DEFAULT_IMAGE_SIZES["faces"] if image_size is None else max(24, *image_size)
    resize = None if image_size in (None, (side, side)) else image_size

    def generate():  # person by person, per_person photos each
        for index in range(num_examples):
            yield faces.make_face(index // per_person, index % per_person, split, seed, side)

    dataset = tf.data.Dataset.from_generator(generate, output_signature={
        "image": tf.TensorSpec([side, side, 3], tf.float32), "label": tf.TensorSpec([], tf.int32)})
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_examples))
    return _finish(dataset, resize, channels)


def person_split(person_name: str) -> str:
    """The split of a person of a folder-per-person data set (80/10/10 by ``hash_split`` of the
    folder name): all photos of one person go to one split, so evaluation is on people never seen."""
    return hash_split(person_name)


def load_person_folder(root, split="train", image_size=64, strict=False):
    """Your own photos for face verification: one sub-folder of photos per person.

    Layouts (persons are disjoint between the splits, as verification needs)::

        root/<person>/<photo>.jpg                  persons split 80/10/10 by a hash of the name
        root/{train,validation,test}/<person>/...  your own split

    Args:
        root: the folder.
        split: "train", "validation" or "test".
        image_size: int or (height, width); photos are resized (bilinear) to it.
        strict: raise on an unreadable file instead of warning and skipping it.
    Returns:
        ``(images, labels, person_names)``: float32 ``[N, H, W, 3]`` in [0, 1], int32 ``[N]``
        (0 .. P-1, photos of a person next to each other), and the P folder names.
    Raises:
        ValueError: no such folder, no person folders, or no photo of any person in ``split``
            (the message says how many persons each split got).
    """
    _check_split(split)
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder (expected one sub-folder of photos per person)")
    size = _check_image_size(image_size) or (64, 64)
    bad = _BadData(strict)
    base = _split_root(root, split)
    person_root = root if base is None else base
    persons = sorted(p for p in person_root.iterdir() if p.is_dir())
    if not persons:
        raise ValueError(f"{person_root} has no person sub-folders: expected "
                         f"{person_root}/<person>/<photo>{IMAGE_EXTENSIONS}")
    counts = {name: 0 for name in SPLITS}
    images, labels, names = [], [], []
    for person in persons:
        own_split = split if base is not None else person_split(person.name)
        counts[own_split] += 1
        if own_split != split:
            continue
        photos = []
        for path in sorted(p for p in person.iterdir() if _is_image(p)):
            image = _read_image(path)
            if image is None:
                bad(path, "not a readable image (corrupt or unsupported format)")
                continue
            photos.append(cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA))
        if not photos:
            continue
        labels += [len(names)] * len(photos)
        names.append(person.name)
        images += photos
    if not images:
        where = "" if base is not None else (
            f" (the hash split gave {counts} persons; with few persons, make "
            f"{root}/train, validation and test folders yourself)")
        raise ValueError(f"{person_root}: no photo of any person in split {split!r}{where}")
    return (np.stack(images).astype(np.float32) / 255.0, np.asarray(labels, np.int32),
            tuple(names))


def _face_info(name):
    """Training persons of ``faces`` as its "classes" (LFW's are only known after the download)."""
    if name == "faces":
        names = tuple(f"person_{i}" for i in range(faces.DEFAULT_IDENTITIES["train"]))
        return DatasetInfo(name, "classification", len(names), names, (64, 64))
    return DatasetInfo(name, "classification", 0, (), (250, 250))


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def load(name, split="train", *, image_size=None, num_examples=None, seed=0, data_dir=None,
         task=None, with_masks=False, channels=None, keep_difficult=False, strict=False):
    """An unbatched ``tf.data.Dataset`` of contract dicts (see the module docstring).

    Args:
      name: a name from ``list_datasets()`` or the path of a directory with your
        own data (a registered name wins; write "./mnist" for a folder so named).
      split: "train", "validation" or "test"; mapped onto each source's splits
        (see data/README.md).
      image_size: None (native size), an int (square) or (height, width).
        Images are resized bilinearly, masks by nearest neighbour; normalized
        boxes are unchanged. Needed for batching sources of mixed sizes.
      num_examples: at most this many examples (synthetic: exactly this many,
        default ``synthetic.DEFAULT_SPLIT_SIZES[split]``).
      seed: seed of the synthetic data; the other sources have fixed splits.
      data_dir: tensorflow-datasets folder (None: tfds' default, ~/tensorflow_datasets).
      task: "classification", "detection" or "segmentation". Picks what
        oxford_iiit_pet gives (default classification), what kind of own
        folder to read, and redirects "shapes" to its classification /
        segmentation variants.
      with_masks: add instance masks uint8 [N, H, W] (0/1, one per box): "shapes", and
        COCO JSON folders (each annotation's 'segmentation', polygons or RLE, decoded with
        pycocotools; an annotation without one is skipped as bad data). Pascal VOC (tfds
        or a folder) has no instance masks: a ValueError says so.
      channels: None or 3 -> RGB; 1 -> grayscale [H, W, 1].
      keep_difficult: voc/2007 and VOC folders: keep boxes marked difficult
        (dropped by default, like the VOC evaluation).
      strict: own data: raise ValueError on a corrupt image or unusable box
        instead of skipping it with a BadDataWarning.

    Raises:
      ValueError: unknown name or bad argument.
      DatasetUnavailableError: a tfds data set could not be downloaded / read.
    """
    _check_split(split)
    image_size = _check_image_size(image_size)
    _check_positive(num_examples, "num_examples")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if isinstance(name, str) and name in FACE_DATASETS:
        return _load_face_dataset(name, split, task, image_size, num_examples, seed, data_dir,
                                  with_masks, channels)
    if isinstance(name, str) and name in _DEFAULT_TASKS:
        if name.startswith("shapes"):
            if name == "shapes" and task in ("classification", "segmentation"):
                name = f"shapes_{task}"
            else:
                _check_task(task, (_DEFAULT_TASKS[name],), name)
            if with_masks and name != "shapes":
                raise ValueError(f"with_masks=True needs name='shapes', got {name!r}")
            return _load_shapes(name, split, image_size, num_examples, seed, with_masks, channels)
        if with_masks and name == "voc/2007":
            raise ValueError("with_masks=True: 'voc/2007' (Pascal VOC detection in "
                             "tensorflow-datasets) has boxes only, no instance masks; use "
                             "'shapes' or a COCO JSON folder with 'segmentation' annotations")
        if with_masks:
            raise ValueError(f"with_masks=True: {name!r} has no instance masks here; use 'shapes' "
                             "or a COCO JSON folder with 'segmentation' annotations")
        if name == "digits":
            _check_task(task, ("classification",), name)
            return _load_digits(split, image_size, num_examples, channels)
        return _load_tfds(name, split, task, image_size, num_examples, data_dir, with_masks,
                          channels, keep_difficult)
    if isinstance(name, (str, os.PathLike)) and Path(name).is_dir():
        return _load_folder(Path(name), split, task, image_size, num_examples, with_masks,
                            channels, keep_difficult, strict)
    raise _unknown_name_error(name)


def _tfds_class_names(name, fallback_count):
    """Class names from the tfds builder if it knows them offline, else numbers."""
    try:
        import tensorflow_datasets as tfds

        names = tuple(tfds.builder(name).info.features["label"].names)
        if len(names) == fallback_count and not all(n.isdigit() for n in names):
            return names
    except Exception:  # no metadata offline: numbered names are still usable
        pass
    return tuple(str(i) for i in range(fallback_count))


def get_info(name, data_dir=None, task=None) -> DatasetInfo:
    """Task, number of classes, class names and native size, without loading images.

    For a folder the folder is indexed (class folders / annotations read; for
    segmentation every mask is read once to check its values against classes.txt,
    or to count the labels without it; see data/README.md, Mask values).
    """
    del data_dir  # class lists are known offline; kept for symmetry with load()
    if isinstance(name, str) and name in FACE_DATASETS:
        _check_task(task, ("classification",), name)
        return _face_info(name)
    if isinstance(name, str) and name in _DEFAULT_TASKS:
        if name == "shapes" and task in ("classification", "segmentation"):
            name = f"shapes_{task}"
        allowed = ("classification", "segmentation") if name == "oxford_iiit_pet" else (
            _DEFAULT_TASKS[name],)
        _check_task(task, allowed, name)
        task = task or _DEFAULT_TASKS[name]
        side = _DEFAULT_IMAGE_SIZES[name]
        image_size = None if side is None else (side, side)
        if name in ("shapes", "shapes_classification", "shapes_localization"):
            names = synthetic.CLASS_NAMES
        elif name == "shapes_segmentation":
            names = ("background",) + synthetic.CLASS_NAMES
        elif name in ("digits", "mnist"):
            names = MNIST_CLASS_NAMES
        elif name == "cifar10":
            names = CIFAR10_CLASS_NAMES
        elif name == "cifar100":
            names = CIFAR100_CLASS_NAMES
        elif name == "voc/2007":
            names = VOC_CLASS_NAMES
        elif name == "coco/2017":
            names = COCO_CLASS_NAMES
        elif task == "segmentation":  # oxford_iiit_pet
            names = PET_SEGMENTATION_CLASS_NAMES
        else:
            names = _tfds_class_names("oxford_iiit_pet", 37)  # 37 breeds
        return DatasetInfo(name, task, len(names), tuple(names), image_size)
    if isinstance(name, (str, os.PathLike)) and Path(name).is_dir():
        root = Path(name)
        kind = _folder_kind(root, task)
        if kind == "classification":
            names = _classification_class_names(root)
        elif kind == "coco":
            names = _coco_class_names(_coco_json_files(root), root)
        elif kind == "voc":
            names = _voc_class_names(_parse_voc_folder(root, _BadData(strict=False)))
        else:
            names = _segmentation_labels(root).class_names
        task = "detection" if kind in ("coco", "voc") else kind
        return DatasetInfo(str(root), task, len(names), tuple(names), None)
    raise _unknown_name_error(name)


def to_supervised(dataset):
    """Contract dicts -> ``(image, label)`` or ``(image, mask)`` tuples for ``fit()``.

    Works batched or unbatched. Detection has no single target tensor: batch
    it with ``batch_detection`` and hand the dict to the model's train_step.
    """
    spec = dataset.element_spec
    if not isinstance(spec, dict) or "image" not in spec:
        raise ValueError("to_supervised expects a dataset of dicts with an 'image' key, "
                         f"got element_spec {spec}")
    for target in ("label", "mask"):
        if target in spec:
            return dataset.map(lambda example: (example["image"], example[target]),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    raise ValueError(f"to_supervised needs a 'label' or 'mask' key, got {sorted(spec)}; "
                     "detection data go through batch_detection(...)")


def batch_detection(dataset, batch_size, max_boxes=32, drop_remainder=False, with_masks=False):
    """Pads detection examples to ``max_boxes`` and batches them.

    Input: unbatched ``{"image" [H, W, C], "boxes" [N, 4], "classes" [N],
    optional "masks" [N, H, W]}`` with the same H, W for every image (load
    with ``image_size=...``). Objects beyond ``max_boxes`` are dropped; images
    with no objects are fine.

    Returns batches ``{"image": [B, H, W, C], "boxes": [B, max_boxes, 4]
    (zeros where padded), "classes": [B, max_boxes] (-1 where padded)}`` and,
    with ``with_masks``, ``"masks": [B, max_boxes, H, W]`` (zeros where padded).
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(max_boxes, "max_boxes")
    spec = dataset.element_spec
    for key in ("image", "boxes", "classes") + (("masks",) if with_masks else ()):
        if not isinstance(spec, dict) or key not in spec:
            raise ValueError(f"batch_detection needs a dataset of dicts with key {key!r}"
                             + (" (load('shapes', with_masks=True))" if key == "masks" else ""))
    image_shape = spec["image"].shape
    if not image_shape[:2].is_fully_defined():
        raise ValueError("batch_detection needs images of one size (padding pixels would "
                         "move normalized boxes): load(..., image_size=(height, width)) first")
    keys = ("image", "boxes", "classes") + (("masks",) if with_masks else ())

    def truncate(example):
        out = {"image": example["image"], "boxes": example["boxes"][:max_boxes],
               "classes": example["classes"][:max_boxes]}
        if with_masks:
            out["masks"] = example["masks"][:max_boxes]
        return out

    height, width = int(image_shape[0]), int(image_shape[1])
    padded_shapes = {"image": image_shape, "boxes": [max_boxes, 4], "classes": [max_boxes],
                     "masks": [max_boxes, height, width]}
    padding_values = {"image": tf.constant(0.0, spec["image"].dtype), "boxes": 0.0,
                      "classes": tf.constant(-1, tf.int32), "masks": tf.constant(0, tf.uint8)}
    dataset = dataset.map(truncate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.padded_batch(
        batch_size,
        padded_shapes={key: padded_shapes[key] for key in keys},
        padding_values={key: padding_values[key] for key in keys},
        drop_remainder=drop_remainder)
