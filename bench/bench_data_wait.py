"""Benchmark: how long does each default training script's step wait for its input?

Run:  python bench/bench_data_wait.py [--no-write] [--only unet,localizer]   (about 75 s, 2 cores;
      alone on the machine: it times training steps)

For the default configuration of each script (its ``Config()`` dataclass, only the number of
training examples cut to what the timed steps read), the script's own data functions build its
real training stream (the cached split, shuffled per epoch, batched, padded, augmented as the
script does) and its own builders the model, compiled as the script compiles it. Then the same
compiled train step (``model.make_train_function()``, one call = one step) is timed twice:

* fed by the real ``tf.data`` stream;
* fed by one batch of that stream repeated from memory (``dataset.take(1).cache().repeat()``).

Data wait = the difference of the two medians (after 3 warm-up steps, over 10 steps), also as a
fraction of the real step. Every default script generates its split once and caches it before its
training clock starts, so the stream reads memory; the one-off generation is reported as "cache
fill" (the time to draw and cache the examples the bench uses, per 1000 examples).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import results_md  # noqa: E402

WARMUP, STEPS = 3, 10


def examples_needed(batch_size):
    return batch_size * (WARMUP + STEPS + 2)


def timed_fill(dataset):
    """Reads a cached dataset once (fills its cache); returns (count, seconds)."""
    start = time.perf_counter()
    count = sum(1 for _ in dataset.batch(256))
    return count, time.perf_counter() - start


def classifier():
    from ch04_classification import train_classifier as script
    from ch04_classification.trainer import ClassifierTrainer, accuracy_metrics
    from common import data

    config = script.TrainConfig()
    config.num_train_examples = examples_needed(config.batch_size)
    script.check_config(config)  # also resolves the defaults that depend on other options
    info = data.get_info(config.dataset)
    size = script.resolve_image_size(config, info, print_fn=lambda *_: None)
    train, num_train = script.load_split(config, "train", size, config.num_train_examples)
    _, fill = timed_fill(train)
    network = script.build_network(config, (size, size, 3), info.num_classes)
    model = ClassifierTrainer(network, script.make_augmentation(config),
                              aux_loss_weight=config.aux_loss_weight)
    model(np.zeros((1, size, size, 3), np.float32))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=accuracy_metrics(info.num_classes), jit_compile=False)
    from common import training
    stream = training.epoch_batches(train, config.batch_size, 0, 3, seed=config.seed)
    note = f"{config.model}, {size} px, batch {config.batch_size}"
    return model, stream, num_train, fill, note


def unet():
    from ch06_segmentation import losses
    from ch06_segmentation import train_unet as script
    from common import data, training

    config = script.Config()
    script.check_config(config)
    num_train = examples_needed(config.batch_size)
    train = script.load_split(config, "train", num_train).cache()
    _, fill = timed_fill(train)
    num_classes = data.get_info(config.dataset, task="segmentation").num_classes
    model = script.build_model(config, num_classes)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss=script.make_loss(config, train, num_classes),
                  metrics=[losses.MeanIoU(num_classes), losses.PixelAccuracy(num_classes)],
                  jit_compile=False)
    stream = training.epoch_batches(train, config.batch_size, 0, 3, seed=config.seed)
    note = f"{config.model}, {config.image_size} px, batch {config.batch_size}"
    return model, stream, num_train, fill, note


def _detection(script_module, with_masks):
    from ch05_detection import detection_run
    from common import data

    config = script_module.Config()
    config.num_train_examples = examples_needed(config.batch_size)
    config.num_val_examples = 1
    script_module.check_config(config)
    start = time.perf_counter()
    train, num_train, _ = detection_run.make_datasets(config, with_masks=with_masks)
    fill = time.perf_counter() - start
    info = data.get_info(config.dataset, task="detection")
    model = script_module.build_model(config, info.num_classes, tuple(info.class_names))
    model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=10.0), jit_compile=False)
    stream = detection_run.train_batches(config, train, 0, 3, with_masks=with_masks)
    note = f"{config.backbone}, {config.image_size} px, batch {config.batch_size}"
    return model, stream, num_train, fill, note


def faster_rcnn():
    from ch05_detection import train_faster_rcnn
    return _detection(train_faster_rcnn, with_masks=False)


def mask_rcnn():
    from ch06_segmentation import train_mask_rcnn
    return _detection(train_mask_rcnn, with_masks=True)


def localizer():
    from ch05_detection import train_localizer as script

    config = script.Config()
    config.num_train_examples = examples_needed(config.batch_size)
    script.check_config(config)
    start = time.perf_counter()
    train = script.load_split(config, "train", config.num_train_examples)  # fills its cache
    fill = time.perf_counter() - start
    from ch05_detection import localization
    from common import data
    info = data.get_info(script.DATASET)
    model = localization.build_localizer(
        (config.image_size, config.image_size, 3), info.num_classes, config.task,
        backbone=config.backbone, point_head=config.point_head, hidden_units=config.hidden_units)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=script.make_loss(config),
                  metrics=script.make_metrics(config), jit_compile=False)
    steps = config.num_train_examples // config.batch_size
    stream = script.training_batches(config, train, steps)(0)
    note = f"{config.task}, {config.image_size} px, batch {config.batch_size}"
    return model, stream, config.num_train_examples, fill, note


SCRIPTS = [
    ("train_classifier.py", classifier),
    ("train_unet.py", unet),
    ("train_faster_rcnn.py (and train_detector.py's batches)", faster_rcnn),
    ("train_mask_rcnn.py", mask_rcnn),
    ("train_localizer.py", localizer),
]


def median_step_ms(model, dataset):
    model.make_train_function()
    step = model.train_function
    iterator = iter(dataset)
    for _ in range(WARMUP):
        step(iterator)
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        logs = step(iterator)
        tf.nest.map_structure(lambda value: value.numpy() if hasattr(value, "numpy") else value,
                              logs)  # wait for the step to finish
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    parser.add_argument("--only", default="", help="comma-separated script names to run")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    load_start = os.getloadavg()
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), TF {tf.__version__}, "
               f"Keras {keras.__version__}")
    header = ("| script (default input) | step ms, real tf.data stream | step ms, one cached batch "
              "| data wait ms | fraction | cache fill s per 1000 examples |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: |")
    print(machine, f"load {load_start}")
    print(header)
    rows = []
    for title, setup in SCRIPTS:
        if args.only and not any(part and part in title for part in args.only.split(",")):
            continue
        model, stream, num_train, fill, note = setup()
        real = median_step_ms(model, stream)
        cached = median_step_ms(model, stream.take(1).cache().repeat())
        wait = real - cached
        row = (f"| {title}: {note} | {real:.1f} | {cached:.1f} | {wait:.1f} | "
               f"{wait / real:.1%} | {1000 * fill / max(num_train, 1):.1f} |")
        print(row, flush=True)
        rows.append(row)
        keras.backend.clear_session()
    load_end = os.getloadavg()
    print(f"load at end {load_end}")
    section = "\n".join([
        "## Data wait per default script",
        "",
        f"`python bench/bench_data_wait.py` under the CPU lock, run {time.strftime('%Y-%m-%d')}: "
        f"{machine}; load average {load_start[0]:.1f}, {load_start[1]:.1f}, {load_start[2]:.1f} "
        f"at start and {load_end[0]:.1f}, {load_end[1]:.1f}, {load_end[2]:.1f} at end. Each "
        "script's default configuration, its own data functions and model, compiled as the script "
        f"compiles it (no XLA); median ms of the compiled train step over {STEPS} steps after "
        f"{WARMUP} warm-up steps, fed by the script's real `tf.data` stream and by one batch of it "
        "repeated from memory (`take(1).cache().repeat()`). Data wait = the difference (negative: "
        "within the noise). Every default script draws its training split once and caches it "
        "before its training clock starts (`.cache()` and one pass), so the stream reads memory; "
        "the last column is that one-off generation and caching, per 1000 examples.",
        "",
        header,
        *rows,
        "",
    ])
    if not args.no_write and not args.only:
        results_md.replace_section(section)
        print(f"wrote the section to {results_md.RESULTS}")
    return rows


if __name__ == "__main__":
    main()
