"""Where should augmentation run? Per example in tf.data, batched in tf.data, or in train_step.

Measures, on this machine, images per second of the same detection
augmentation (``common.augment.make_augmenter("detection")``: random
left-right flip, scale jitter + crop with box clipping/dropping, colour
jitter) placed three ways:

1. per example: ``dataset.map(augment one example)`` and then ``.batch()``
   (the classic tf.data recipe; our batched ops applied to a batch of one);
2. batched in tf.data: ``.batch()`` and then ``.map(augment the batch)``
   (``common.augment.augment_dataset``);
3. inside the model: a custom ``train_step`` augments the batch it receives,
   so augmentation is part of the compiled training step (on the GPU when
   there is one).

Each placement is timed twice: the input pipeline alone (iterate the dataset)
and end-to-end training of a tiny conv net with ``fit()`` (plus fit without
augmentation, so the cost of augmenting is visible). The data are 512 shapes
scenes of 128 x 128 px generated once and kept in memory (``.cache()``), so
scene generation is not what is measured. Why the placement matters: the augmentation
notebook (notebooks/tf_data_and_augmentation.ipynb).

Run (about 2-3 minutes on 2 CPU cores):
    python bench/bench_augment.py [--images 512] [--size 128] [--batch 32]
It prints a table and writes it into bench/RESULTS.md, section
"## Augmentation placement".
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import time

import keras
import numpy as np
import tensorflow as tf

from common import augment
from common.synthetic import NUM_CLASSES, make_scene

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Augmentation placement"
MAX_BOXES = 8


def make_data(num_images: int, size: int) -> dict:
    """Padded detection examples as NumPy arrays (boxes zero, classes -1 beyond each count)."""
    images = np.zeros((num_images, size, size, 3), np.float32)
    boxes = np.zeros((num_images, MAX_BOXES, 4), np.float32)
    classes = np.full((num_images, MAX_BOXES), -1, np.int32)
    for i in range(num_images):
        scene = make_scene(i, "train", seed=0, image_size=size)
        count = min(len(scene["classes"]), MAX_BOXES)
        images[i] = scene["image"]
        boxes[i, :count] = scene["boxes"][:count]
        classes[i, :count] = scene["classes"][:count]
    return {"image": images, "boxes": boxes, "classes": classes}


def pipelines(data: dict, batch_size: int, augmenter) -> dict:
    """The tf.data pipelines of every placement (all cached, prefetched)."""
    examples = tf.data.Dataset.from_tensor_slices(data).cache()
    for _ in examples:  # fill the cache once, untimed
        pass

    def one_example(index, example):
        # A batch of one through the same batched ops, seed [1, index].
        batch = {key: value[None] for key, value in example.items()}
        batch = augmenter(batch, tf.stack([tf.constant(1, tf.int64), index]))
        return {key: value[0] for key, value in batch.items()}

    per_example = (examples.enumerate()
                   .map(one_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .batch(batch_size))
    batched = examples.batch(batch_size)
    return {
        "none": batched.prefetch(tf.data.AUTOTUNE),
        "per_example": per_example.prefetch(tf.data.AUTOTUNE),
        "batched": augment.augment_dataset(batched, augmenter, seed=1).prefetch(tf.data.AUTOTUNE),
    }


class PresenceNet(keras.Model):
    """Tiny conv net predicting which shape classes are present (multi-label).

    ``train_step`` receives the whole batch dict and, when an augmenter is
    given, augments it first: the "inside the model" placement. The target
    is computed after augmentation, from the boxes that survived the crop.
    """

    def __init__(self, augmenter=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.augmenter = augmenter
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.body = keras.Sequential([
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES),
        ])

    def call(self, images, training=False):
        return self.body(images, training=training)

    def train_step(self, batch):
        if self.augmenter is not None:
            batch = self.augmenter(batch, tf.cast(self.seed_generator.next(), tf.int64))
        # [B, NUM_CLASSES]: 1 where a (kept) object of that class is present.
        present = tf.one_hot(batch["classes"], NUM_CLASSES)  # class -1 -> all zeros
        target = tf.reduce_max(present, axis=1)
        with tf.GradientTape() as tape:
            logits = self(batch["image"], training=True)
            loss = self.compute_loss(x=batch["image"], y=target, y_pred=logits)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return {"loss": loss}


def rates(function, num_images: int):
    """(images per wall-clock second, CPU milliseconds per image) of function().

    CPU time (all threads of this process) is the steadier number on a shared
    machine: it does not count the time other processes hold the cores.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return num_images / wall, 1000.0 * cpu / num_images


def time_pipeline(dataset, num_images: int, epochs: int):
    for _ in dataset.take(3):  # warm-up: tracing
        pass

    def run():
        for _ in range(epochs):
            for _ in dataset:
                pass

    return rates(run, epochs * num_images)


def time_training(dataset, num_images: int, epochs: int, augmenter=None) -> float:
    keras.utils.set_random_seed(0)
    model = PresenceNet(augmenter)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  jit_compile=False)  # same for every row; crop_and_resize has no XLA kernel
    model.fit(dataset.take(2), epochs=1, verbose=0)  # warm-up: traces the train step
    return rates(lambda: model.fit(dataset, epochs=epochs, verbose=0), epochs * num_images)


def write_results(table: str, notes: str) -> None:
    machine = (f"Machine: {os.cpu_count()}-core CPU, no GPU, TF {tf.__version__}, "
               f"Keras {keras.__version__}, Python {platform.python_version()}")
    section = f"{SECTION}\n\n{machine}. Run on {datetime.date.today().isoformat()} with " \
              f"`python bench/bench_augment.py`.\n\n{table}\n\n{notes}\n"
    if RESULTS.exists():
        text = RESULTS.read_text()
    else:
        text = "# Benchmark results\n\nMachine: 2-core CPU, no GPU, TF 2.21.\n"
    if SECTION in text:
        start = text.index(SECTION)
        following = text.find("\n## ", start + len(SECTION))
        end = len(text) if following < 0 else following + 1
        text = text[:start] + section + ("\n" + text[end:] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512,
                        help="number of cached scenes (default 512)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per row (default 2)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = make_data(args.images, args.size)
    seconds = time.perf_counter() - start
    print(f"generated {args.images} scenes of {args.size} px in {seconds:.1f} s "
          "(not part of the timings)")
    augmenter = augment.make_augmenter("detection")  # flip + scale jitter/crop + colour jitter
    print(augmenter)
    datasets = pipelines(data, args.batch, augmenter)
    load_before = os.getloadavg()[0]

    rows = []  # (placement, pipeline (img/s, CPU ms/img) or None, training (img/s, CPU ms/img))
    for name, label in (("per_example", "1. per example: map(augment), then batch"),
                        ("batched", "2. batched in tf.data: batch, then map(augment)")):
        pipeline = time_pipeline(datasets[name], args.images, args.epochs)
        training = time_training(datasets[name], args.images, args.epochs)
        rows.append((label, pipeline, training))
        print(f"{label}: pipeline {pipeline[0]:.0f} img/s, training {training[0]:.0f} img/s")
    training = time_training(datasets["none"], args.images, args.epochs, augmenter=augmenter)
    rows.append(("3. inside train_step (batched, in the model)", None, training))
    print(f"{rows[-1][0]}: training {training[0]:.0f} img/s")
    pipeline = time_pipeline(datasets["none"], args.images, args.epochs)
    training = time_training(datasets["none"], args.images, args.epochs)
    rows.append(("no augmentation (reference)", pipeline, training))
    print(f"{rows[-1][0]}: pipeline {pipeline[0]:.0f} img/s, training {training[0]:.0f} img/s")
    load_after = os.getloadavg()[0]

    base_pipeline, base_training = rows[0][1][0], rows[0][2][0]
    lines = ["| placement | pipeline img/s | x per-example | pipeline CPU ms/img "
             "| training img/s | x per-example | training CPU ms/img |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, pipeline, training in rows:
        if pipeline is None:
            pipe = "- | - | -"
        else:
            pipe = f"{pipeline[0]:.0f} | {pipeline[0] / base_pipeline:.2f} | {pipeline[1]:.2f}"
        train = f"{training[0]:.0f} | {training[0] / base_training:.2f} | {training[1]:.2f}"
        lines.append(f"| {label} | {pipe} | {train} |")
    table = "\n".join(lines)
    notes = (
        f"{args.images} cached shapes scenes of {args.size} x {args.size} px, batch {args.batch}, "
        f"up to {MAX_BOXES} boxes per image (no instance masks); augmentation = "
        "`make_augmenter(\"detection\")` (left-right flip, scale jitter 0.8-1.25 with crop/pad "
        "and box clipping/dropping, colour jitter). Training = a 3-conv-layer multi-label "
        f"classifier, `fit()` with `jit_compile=False`, {args.epochs} timed epoch(s) after a "
        "warm-up of 2-3 batches (tracing). Row 3 has no separate pipeline number: its tf.data "
        "pipeline is the no-augmentation one. Load average (1 min) before/after: "
        f"{load_before:.1f}/{load_after:.1f} (the machine is shared, so numbers are indicative). "
        "CPU ms/img = process CPU time (all threads) per image: the cost, steadier than "
        "wall-clock rates when other jobs share the cores. On a GPU, row 3 also moves the work "
        "off the CPU that feeds it.")
    base_cpu = rows[-1][2][1]  # training CPU ms/img without augmentation
    costs = ", ".join(f"{label.split(':')[0].split(' (')[0][3:]} {training[1] - base_cpu:.2f}"
                      for label, _, training in rows[:3])
    fastest = max(rows[:3], key=lambda row: row[2][0])[0]
    notes += ("\n\nReading: CPU cost of augmenting, in ms per image (training CPU ms/img minus "
              f"the no-augmentation row): {costs}. Fastest training placement in this run: "
              f"{fastest[3:]}.")
    print()
    print(table)
    print()
    print(notes)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if not args.no_write:
        write_results(table, notes)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
