"""Benchmark: how fast is the embedded `shapes` data generated, and does tf.data keep up?

Run:  python bench/bench_synthetic.py [--quick] [--no-write]     (about 2 minutes on a 2-core CPU)

For each variant of `common.data.load`'s synthetic data, in one process and one run:

* **raw**: `common.synthetic.make_*` called in a plain Python loop (NumPy and OpenCV on one core),
  the rate the pipeline should reach;
* **from_generator**: the old wrapper, `tf.data.Dataset.from_generator` over the same loop (a
  private copy of it lives here as the baseline);
* **pipeline, 1 / 2 calls**: today's `common.data.generated_dataset` (a `tf.numpy_function` over
  chunks of indices, mapped with `num_parallel_calls` = 1 or 2, then unbatched);
* **pipeline, 2 calls, chunk 1**: the same with one example per call, to show what chunking buys.

Every tf.data rate is measured as a training script reads its data: (padded) batches of 32, a full pass
after a warm-up pass on another iterator; each rate is the best of ``--repeats`` passes (the
machine is shared: the best pass is the one least disturbed). Ratios are to the raw rate. Writes
its section of bench/RESULTS.md (``--no-write`` to skip) with the machine and the load average at
start and end.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import results_md  # noqa: E402
from common import data  # noqa: E402

BATCH = 32  # the consumer reads batches, as fit() does


# (title, load() name, image side, with_masks, examples per pass)
VARIANTS = [
    ("shapes 128 px + instance masks (train_mask_rcnn)", "shapes", 128, True, 384),
    ("shapes 128 px, boxes (train_faster_rcnn, train_detector)", "shapes", 128, False, 384),
    ("shapes 64 px, boxes", "shapes", 64, False, 768),
    ("shapes_segmentation 64 px (train_unet)", "shapes_segmentation", 64, False, 768),
    ("shapes_segmentation 128 px", "shapes_segmentation", 128, False, 384),
    ("shapes_classification 64 px (train_classifier)", "shapes_classification", 64,
     False, 1536),
    ("shapes_localization 64 px (train_localizer)", "shapes_localization", 64, False, 1536),
]


def old_from_generator(make, signature, num_examples):
    """The wrapper `common.data` used before: one Python generator, one example at a time."""

    def generate():
        for index in range(num_examples):
            yield make(index)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(num_examples))


def raw_rate(make, count, repeats):
    make(0)  # warm up (imports, first allocations)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            make(index)
        best = max(best, count / (time.perf_counter() - start))
    return best


def pipeline_rate(build, count, repeats):
    """Examples per second of a full pass over ``build()`` read in batches of ``BATCH``."""
    dataset = build().padded_batch(BATCH).prefetch(2)
    for _ in dataset.take(2):  # warm up: tracing, thread pools
        pass
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        seen = 0
        for batch in dataset:
            seen += int(batch["image"].shape[0])
        if seen != count:
            raise RuntimeError(f"expected {count} examples, got {seen}")
        best = max(best, seen / (time.perf_counter() - start))
    return best


def check_same_examples(make, signature, count):
    """The pipeline yields exactly make(0), make(1), ... (a cheap guard before timing it)."""
    pipeline = data.generated_dataset(make, signature, count, num_parallel_calls=2)
    for index, example in enumerate(pipeline):
        reference = make(index)
        for key in signature:
            np.testing.assert_array_equal(example[key].numpy(), reference[key], err_msg=key)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the examples, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="passes per rate (best counts)")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    load_start = os.getloadavg()
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), TF {tf.__version__}, "
               f"NumPy {np.__version__}, Python {platform.python_version()}")
    print(f"machine: {machine}; load average at start {load_start[0]:.1f}, "
          f"{load_start[1]:.1f}, {load_start[2]:.1f}")
    header = ("| variant | raw ex/s (1 core) | from_generator | pipeline, 1 call | pipeline, 2 calls "
              "| 2 calls / 1 call | 2 calls, chunk 1 |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(header)
    rows = []
    for title, name, side, with_masks, count in VARIANTS:
        count = count // 4 if args.quick else count
        make, signature = data._shapes_generator(name, "train", 0, side, with_masks)
        check_same_examples(make, signature, 2 * data.SHAPES_CHUNK_SIZE + 3)
        raw = raw_rate(make, count, repeats)
        rates = {
            "from_generator": pipeline_rate(
                lambda: old_from_generator(make, signature, count), count, repeats),
            "1": pipeline_rate(lambda: data.generated_dataset(
                make, signature, count, num_parallel_calls=1), count, repeats),
            "2": pipeline_rate(lambda: data.generated_dataset(
                make, signature, count, num_parallel_calls=2), count, repeats),
            "2, chunk 1": pipeline_rate(lambda: data.generated_dataset(
                make, signature, count, chunk_size=1, num_parallel_calls=2), count, repeats),
        }
        cells = [f"{rates[k]:.0f} ({rates[k] / raw:.2f}x)" for k in ("from_generator", "1", "2")]
        row = (f"| {title} | {raw:.0f} | {' | '.join(cells)} | {rates['2'] / rates['1']:.2f}x "
               f"| {rates['2, chunk 1']:.0f} ({rates['2, chunk 1'] / raw:.2f}x) |")
        print(row, flush=True)
        rows.append(row)
    load_end = os.getloadavg()
    print(f"load average at end {load_end[0]:.1f}, {load_end[1]:.1f}, {load_end[2]:.1f}")
    section = "\n".join([
        "## Synthetic data generation",
        "",
        f"`python bench/bench_synthetic.py`, run {time.strftime('%Y-%m-%d')}: {machine}; load "
        f"average {load_start[0]:.1f}, {load_start[1]:.1f}, {load_start[2]:.1f} at start and "
        f"{load_end[0]:.1f}, {load_end[1]:.1f}, {load_end[2]:.1f} at end. Examples per second, "
        f"best of {repeats} full passes read in batches of {BATCH}; in brackets the ratio to the raw "
        "rate of the same variant in the same run. *raw*: `common.synthetic.make_*` in a Python "
        "loop on one core. *from_generator*: the wrapper `common.data` used before "
        "(`tf.data.Dataset.from_generator`, kept in the bench as the baseline). *pipeline*: "
        "`common.data.generated_dataset`, what `load` uses now: `Dataset.range` over chunks of "
        f"{data.SHAPES_CHUNK_SIZE} indices mapped by `tf.numpy_function` with 1 or 2 parallel "
        "calls, then unbatched; *chunk 1*: one example per call.",
        "",
        header,
        *rows,
        "",
    ])
    if not args.quick and not args.no_write:
        results_md.replace_section(section)
        print(f"wrote the section to {results_md.RESULTS}")
    return rows


if __name__ == "__main__":
    main()
