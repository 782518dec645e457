"""Benchmark: Faster R-CNN training images/s and inference ms/image (default configuration).

Builds the model of ``python ch05_detection/train_faster_rcnn.py`` with its default
options (128x128 shapes, ResNet-small at stride 8, RoIAlign 7x7, dense head), times
``fit`` on a stream of shapes batches after a warm-up (tracing excluded) and ``detect``
at batch sizes 1 and 16, and writes the "## Faster R-CNN" section of bench/RESULTS.md
(the machine's load average is recorded: the numbers depend on what else runs).

Run from the repo root::

    python bench/bench_faster_rcnn.py            # about 2 minutes on a 2-core CPU
    python bench/bench_faster_rcnn.py --steps 5  # quicker, noisier
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import keras
import tensorflow as tf

from ch05_detection import train_faster_rcnn
from common import data as common_data
from common import synthetic, training

import results_md  # bench/results_md.py (bench/ is on the path when run as a script)

SECTION = "## Faster R-CNN"


def measure(steps=20, warmup_steps=3, inference_repeats=3):
    config = train_faster_rcnn.Config()
    keras.utils.set_random_seed(0)
    dataset = common_data.load("shapes", "train", image_size=config.image_size,
                               num_examples=config.batch_size * 4)
    batches = list(common_data.batch_detection(dataset, config.batch_size, config.max_boxes,
                                               drop_remainder=True))
    stream = tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in batches]) for k in batches[0]}).repeat()
    model = train_faster_rcnn.build_model(config, 5, synthetic.CLASS_NAMES)
    model.compile(optimizer=training.make_optimizer("adam", config.learning_rate, clipnorm=10.0),
                  jit_compile=False)
    model.fit(stream, steps_per_epoch=warmup_steps, epochs=1, verbose=0)  # trace + warm up
    start = time.perf_counter()
    model.fit(stream, steps_per_epoch=steps, epochs=1, verbose=0)
    train_seconds = time.perf_counter() - start
    images_per_second = steps * config.batch_size / train_seconds

    images = batches[0]["image"].numpy()
    inference = {}
    for batch_size in (1, config.batch_size):
        model.detect(images[:batch_size], batch_size=batch_size)  # trace
        start = time.perf_counter()
        for _ in range(inference_repeats):
            model.detect(images, batch_size=batch_size)
        seconds = (time.perf_counter() - start) / (inference_repeats * len(images))
        inference[batch_size] = 1000.0 * seconds
    return {"train_images_per_second": images_per_second, "inference_ms": inference,
            "batch_size": config.batch_size, "steps": steps, "params": model.count_params(),
            "load": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_section(result):
    load = result["load"]
    load_text = "n/a" if load is None else ", ".join(f"{v:.1f}" for v in load)
    lines = [
        SECTION, "",
        "`python bench/bench_faster_rcnn.py`: the default `train_faster_rcnn.py` model "
        f"(128x128 shapes, resnet_small stride 8, RoIAlign 7x7, dense head; "
        f"{result['params']:,} parameters), TF {tf.__version__}, {os.cpu_count()} CPU cores "
        f"({platform.machine()}), load average during the run {load_text} (the machine is "
        "shared: a busy machine gives lower numbers).", "",
        "| measure | value |", "| --- | --- |",
        f"| training, images/s (batch {result['batch_size']}, {result['steps']} steps, "
        f"tracing excluded) | {result['train_images_per_second']:.1f} |",
        f"| inference, ms/image at batch 1 | {result['inference_ms'][1]:.1f} |",
        f"| inference, ms/image at batch {result['batch_size']} | "
        f"{result['inference_ms'][result['batch_size']]:.1f} |", "",
    ]
    lines += ["The training runs' mAP is not a benchmark: the README's tables and docs/results.json hold "
              "every measured run.", ""]
    return results_md.replace_section("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    section = write_section(measure(steps=args.steps))
    print(section)


if __name__ == "__main__":
    main()
