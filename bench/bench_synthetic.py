"""Benchmark: how fast is the embedded `shapes` data generated?

Run:  python bench/bench_synthetic.py      (about 30 s on a 2-core CPU)

Prints examples per second for each variant, straight from NumPy/OpenCV and
through the `tf.data` pipeline of `common.data.load`, and the ratio of the
tf.data rate to the raw rate (the pipeline's overhead). The generation rate
must stay well above what any training script consumes (a few tens of images
per second on this CPU), so data is never the bottleneck.
"""

import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import synthetic  # noqa: E402


def rate(make, count):
    make(0)  # warm up
    start = time.perf_counter()
    for index in range(count):
        make(index)
    return count / (time.perf_counter() - start)


def tf_data_rate(name, count, **options):
    from common import data

    dataset = data.load(name, "train", num_examples=count, **options)
    for _ in dataset.take(2):
        pass
    start = time.perf_counter()
    seen = sum(1 for _ in dataset)
    return seen / (time.perf_counter() - start)


def main():
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    rows = [
        ("shapes scene 128 px (detection + masks)", lambda i: synthetic.make_scene(i), 400,
         ("shapes", {"image_size": 128})),
        ("shapes scene 64 px", lambda i: synthetic.make_scene(i, image_size=64), 800,
         ("shapes", {"image_size": 64})),
        ("shapes_classification 64 px", lambda i: synthetic.make_classification_example(i), 2000,
         ("shapes_classification", {"image_size": 64})),
        ("shapes_segmentation 128 px", lambda i: synthetic.make_segmentation_example(i), 400,
         ("shapes_segmentation", {"image_size": 128})),
    ]
    print(f"{'variant':42s} {'NumPy ex/s':>11s} {'tf.data ex/s':>13s} {'tf.data/NumPy':>14s}")
    for title, make, count, (name, options) in rows:
        raw = rate(make, count)
        try:
            piped = tf_data_rate(name, count, **options)
            ratio = f"{piped / raw:14.2f}"
            piped = f"{piped:13.0f}"
        except ImportError:
            piped, ratio = f"{'n/a':>13s}", f"{'n/a':>14s}"
        print(f"{title:42s} {raw:11.0f} {piped} {ratio}")


if __name__ == "__main__":
    main()
