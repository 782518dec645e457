"""Tests for the parallel synthetic-data pipeline of common/data.py (``generated_dataset``).

* every ``shapes`` variant that ``load`` serves equals, element by element and in order,
  ``common.synthetic.make_*`` called directly (the independent reference), across chunk borders;
* per-object keys of chunks with no object at all (N = 0 everywhere) come through;
* two parallel calls really run at the same time, also with op determinism on (the training
  harness' default), and one call at a time with ``num_parallel_calls=1``;
* a process that ends with a half-read pipeline exits instead of hanging;
* a bad signature or inconsistent per-object keys give a ValueError naming the key.

Run: .venv/bin/python -m pytest -q tests/test_data_parallel.py
"""

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from common import data, synthetic

# Two full chunks and a partial one: chunk borders and a short last chunk are covered.
COUNT = 2 * data.SHAPES_CHUNK_SIZE + 3


@pytest.mark.parametrize("name, options, reference", [
    ("shapes", {"with_masks": True, "image_size": 48},
     lambda i: synthetic.make_scene(i, "validation", 5, image_size=48)),
    ("shapes", {"image_size": 32},
     lambda i: synthetic.make_scene(i, "validation", 5, image_size=32)),
    ("shapes_localization", {"image_size": 32},
     lambda i: synthetic.make_localization_example(i, "validation", 5, image_size=32)),
    ("shapes_classification", {"image_size": 32},
     lambda i: synthetic.make_classification_example(i, "validation", 5, image_size=32)),
    ("shapes_segmentation", {"image_size": 32},
     lambda i: synthetic.make_segmentation_example(i, "validation", 5, image_size=32)),
])
def test_every_shapes_variant_equals_synthetic_in_order(name, options, reference):
    dataset = data.load(name, "validation", num_examples=COUNT, seed=5, **options)
    assert int(dataset.cardinality()) == COUNT
    side = options["image_size"]
    spec = dataset.element_spec
    assert spec["image"].shape == (side, side, 3) and spec["image"].dtype == tf.float32
    examples = list(dataset)
    assert len(examples) == COUNT
    for index, example in enumerate(examples):
        expected = reference(index)
        assert set(example) == set(spec)
        for key, value in example.items():
            assert value.dtype == spec[key].dtype and spec[key].shape.is_compatible_with(value.shape)
            np.testing.assert_array_equal(value.numpy(), np.asarray(expected[key]),
                                          err_msg=f"{name} example {index} key {key}")
    if "boxes" in spec:  # the per-object keys keep an unknown leading dimension
        assert spec["boxes"].shape.as_list() == [None, 4]
        if name == "shapes_localization":  # an empty image (N = 0) among them
            assert min(len(example["boxes"]) for example in examples) == 0


def counting_make(counts):
    """A toy pure function of the index: N = counts[index] objects of value index."""

    def make(index):
        n = counts[index]
        return {"image": np.full((4, 4, 3), index, np.float32),
                "boxes": np.full((n, 4), index / 10, np.float32),
                "classes": np.full((n,), index, np.int32)}

    return make


SIGNATURE = {"image": tf.TensorSpec([4, 4, 3], tf.float32),
             "boxes": tf.TensorSpec([None, 4], tf.float32),
             "classes": tf.TensorSpec([None], tf.int32)}


def test_chunks_without_any_object_and_uneven_counts():
    counts = [0, 0, 0, 0, 3, 0, 1, 0, 2, 0]  # chunk 0 is all empty, the last chunk is short
    make = counting_make(counts)
    dataset = data.generated_dataset(make, SIGNATURE, len(counts), chunk_size=4,
                                     num_parallel_calls=2)
    out = list(dataset)
    assert [len(example["boxes"]) for example in out] == counts
    for index, example in enumerate(out):
        for key, value in make(index).items():
            np.testing.assert_array_equal(example[key].numpy(), value)
    # and the padded batches of the detection contract (classes -1 where padded)
    batch = next(iter(data.batch_detection(dataset, 10, max_boxes=3)))
    np.testing.assert_array_equal(batch["classes"][4].numpy(), [4, 4, 4])
    np.testing.assert_array_equal(batch["classes"][0].numpy(), [-1, -1, -1])


@pytest.fixture
def op_determinism():
    """Op determinism on for one test (the harness' default), as it was afterwards."""
    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was_on:
        tf_config.disable_op_determinism()


def call_intervals(num_parallel_calls):
    """(start, end) wall times of each Python call of a 6-example pipeline of 40 ms calls."""
    intervals, lock = [], threading.Lock()

    def make(index):
        start = time.perf_counter()
        time.sleep(0.04)  # releases the GIL, as NumPy/OpenCV array loops do
        with lock:
            intervals.append((start, time.perf_counter()))
        return {"image": np.full((4, 4, 3), index, np.float32)}

    dataset = data.generated_dataset(make, {"image": SIGNATURE["image"]}, 6, chunk_size=1,
                                     num_parallel_calls=num_parallel_calls)
    values = [float(example["image"][0, 0, 0]) for example in dataset]
    assert values == [0, 1, 2, 3, 4, 5]  # in index order whatever finished first
    return sorted(intervals)


def overlapping(intervals):
    return sum(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))


def test_two_parallel_calls_overlap_even_with_op_determinism(op_determinism):
    # A stateful numpy_function would be run one call at a time under op determinism.
    assert overlapping(call_intervals(2)) >= 2
    assert overlapping(call_intervals(1)) == 0  # the check can tell the two apart


def test_process_with_a_half_read_pipeline_exits(repo_root):
    # Without the exit guard (data._GeneratorCalls) this script hung or aborted at exit in 4 of 4
    # runs on a 2-core CPU: a chunk was still being drawn when the interpreter shut down.
    script = textwrap.dedent("""
        from common import data
        iterator = iter(data.load("shapes_classification", num_examples=1000).batch(8))
        next(iterator)
        print("read one")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True,
                            text=True, timeout=60)  # a hang fails with TimeoutExpired
    assert result.returncode == 0 and "read one" in result.stdout, result.stderr[-2000:]


def test_bad_signature_and_inconsistent_objects_raise_value_error():
    with pytest.raises(ValueError, match="image"):
        data.generated_dataset(counting_make([1]), {"image": tf.TensorSpec([4, None, 3])}, 1)
    with pytest.raises(ValueError, match="num_examples"):
        data.generated_dataset(counting_make([1]), SIGNATURE, 0)

    def inconsistent(index):
        return {"image": np.zeros((4, 4, 3), np.float32), "boxes": np.zeros((2, 4), np.float32),
                "classes": np.zeros((1,), np.int32)}

    with pytest.raises(tf.errors.InvalidArgumentError, match="classes"):
        list(data.generated_dataset(inconsistent, SIGNATURE, 2))
