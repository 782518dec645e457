"""Where should augmentation run, and what does each augmenter cost?

Part 1, placement (per example in tf.data, batched in tf.data, or in train_step).
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

Part 2, cost per operation: every augmenter of ``common.augment`` alone, the
existing ones (flips, quarter turns, scale jitter + crop, VGG scale jitter,
colour jitter, PCA colour) beside the warps (rotation by any angle, shear,
elastic warping; Simard et al. 2003, sec. 2), as a ``tf.function`` on batches
held in memory, on detection batches without and with instance masks (the
masks are resampled too, and the warps then measure each object's visible
fraction). The ratio column is CPU time per image relative to
``random_scale_crop`` (the existing resampling augmenter, timed in the same
run; CPU time because it does not count the time other processes hold the
cores of a shared machine): above 1 = costlier.
The two composed rows show what switching the warps on costs a detection
pipeline. The warps compile with XLA (``jit_compile=True``), timed too.

Run (about 4-5 minutes on 2 CPU cores; each part alone about half of that):
    python bench/bench_augment.py [--images 512] [--size 128] [--batch 32] [--part all]
It prints the tables and writes them into bench/RESULTS.md, sections
"## Augmentation placement" and "## Augmentation cost per operation".
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
OPERATION_SECTION = "## Augmentation cost per operation"
MAX_BOXES = 8
BASELINE_OPERATION = "random_scale_crop (zoom 0.8-1.25)"


def make_data(num_images: int, size: int, with_masks: bool = False) -> dict:
    """Padded detection examples as NumPy arrays (boxes zero, classes -1 beyond each count)."""
    images = np.zeros((num_images, size, size, 3), np.float32)
    boxes = np.zeros((num_images, MAX_BOXES, 4), np.float32)
    classes = np.full((num_images, MAX_BOXES), -1, np.int32)
    masks = np.zeros((num_images, MAX_BOXES, size, size), np.uint8) if with_masks else None
    for i in range(num_images):
        scene = make_scene(i, "train", seed=0, image_size=size)
        count = min(len(scene["classes"]), MAX_BOXES)
        images[i] = scene["image"]
        boxes[i, :count] = scene["boxes"][:count]
        classes[i, :count] = scene["classes"][:count]
        if with_masks:
            masks[i, :count] = scene["masks"][:count]
    data = {"image": images, "boxes": boxes, "classes": classes}
    if with_masks:
        data["masks"] = masks
    return data


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


def write_results(table: str, notes: str, title: str = SECTION) -> None:
    machine = (f"Machine: {os.cpu_count()}-core CPU, no GPU, TF {tf.__version__}, "
               f"Keras {keras.__version__}, Python {platform.python_version()}")
    section = f"{title}\n\n{machine}. Run on {datetime.date.today().isoformat()} with " \
              f"`python bench/bench_augment.py`.\n\n{table}\n\n{notes}\n"
    if RESULTS.exists():
        text = RESULTS.read_text()
    else:
        text = "# Benchmark results\n\nMachine: 2-core CPU, no GPU, TF 2.21.\n"
    if title in text:
        start = text.index(title)
        following = text.find("\n## ", start + len(title))
        end = len(text) if following < 0 else following + 1
        text = text[:start] + section + ("\n" + text[end:] if following >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def operations(data: dict) -> list:
    """(name, is new, augment(batch, seed)) for every augmenter alone, then two composed ones."""
    eigenvalues, eigenvectors = augment.rgb_pca(data["image"][:64])
    warps = {"rotation": 15.0, "shear": 0.1, "elastic_alpha": 34.0}
    return [
        ("random_flip_left_right (p 0.5)", False, augment.random_flip_left_right),
        ("random_rotate90", False, augment.random_rotate90),
        (BASELINE_OPERATION, False, lambda b, s: augment.random_scale_crop(b, s, (0.8, 1.25))),
        ("vgg_scale_jitter (1.0-1.5)", False, lambda b, s: augment.vgg_scale_jitter(b, s)),
        ("color_jitter (0.1, hue 0.02)", False, lambda b, s: augment.color_jitter(b, s)),
        ("pca_color (std 0.1)", False,
         lambda b, s: augment.pca_color(b, s, np.sqrt(eigenvalues), eigenvectors)),
        ("random_rotate (up to 15 deg)", True, lambda b, s: augment.random_rotate(b, s, 15.0)),
        ("random_shear (up to 0.2, both axes)", True, lambda b, s: augment.random_shear(b, s)),
        ("random_elastic (alpha 34, sigma 4)", True, lambda b, s: augment.random_elastic(b, s)),
        ("make_augmenter(\"detection\")", False, augment.make_augmenter("detection")),
        ("... + rotation 15, shear 0.1, elastic 34", True,
         augment.make_augmenter("detection", **warps)),
    ]


def time_operation(function, batches: list, epochs: int, jit_compile: bool = False):
    """(images per second, CPU ms per image) of ``function`` over in-memory batches."""
    compiled = tf.function(function, jit_compile=jit_compile)
    seeds = [tf.constant([7, index], tf.int64) for index in range(len(batches))]
    compiled(batches[0], seeds[0])  # warm-up: tracing (and XLA compilation)
    if len(batches) > 1 and int(batches[-1]["image"].shape[0]) != int(batches[0]["image"].shape[0]):
        compiled(batches[-1], seeds[-1])  # the smaller last batch traces once more

    def run():
        for _ in range(epochs):
            for batch, seed in zip(batches, seeds):
                compiled(batch, seed)["image"].numpy()

    return rates(run, epochs * sum(int(batch["image"].shape[0]) for batch in batches))


def cost_per_operation(args) -> None:
    """Part 2: every augmenter alone, without and with instance masks; ratios to scale crop."""
    start = time.perf_counter()
    data = make_data(args.op_images, args.size, with_masks=True)
    print(f"generated {args.op_images} scenes of {args.size} px with masks in "
          f"{time.perf_counter() - start:.1f} s (not part of the timings)")
    keys_without = ("image", "boxes", "classes")
    variants = {}
    for name, keys in (("boxes", keys_without), ("masks", keys_without + ("masks",))):
        variants[name] = [{key: tf.constant(data[key][i:i + args.batch]) for key in keys}
                          for i in range(0, args.op_images, args.batch)]
    load_before = os.getloadavg()[0]
    rows = []  # (label, {variant: (img/s, CPU ms/img)})
    for name, new, function in operations(data):
        measured = {variant: time_operation(function, batches, args.epochs)
                    for variant, batches in variants.items()}
        label = f"{name}{' (new)' if new else ''}"
        rows.append((label, measured))
        print(f"{label}: {measured['boxes'][0]:.0f} img/s without masks, "
              f"{measured['masks'][0]:.0f} img/s with masks")
    compiled_warps = (
        ("random_rotate (up to 15 deg)", lambda b, s: augment.random_rotate(b, s, 15.0)),
        ("random_elastic (alpha 34, sigma 4)", lambda b, s: augment.random_elastic(b, s)))
    for name, function in compiled_warps:
        measured = {variant: time_operation(function, batches, args.epochs, jit_compile=True)
                    for variant, batches in variants.items()}
        rows.append((f"{name} (new), XLA", measured))
        print(f"{rows[-1][0]}: {measured['boxes'][0]:.0f} img/s without masks, "
              f"{measured['masks'][0]:.0f} img/s with masks")
    load_after = os.getloadavg()[0]

    baseline = dict(rows)[BASELINE_OPERATION]
    lines = ["| augmenter | img/s (boxes) | CPU ms/img | CPU x scale crop | img/s (boxes + masks) "
             "| CPU ms/img | CPU x scale crop |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, measured in rows:
        cells = []
        for variant in ("boxes", "masks"):
            rate, cpu = measured[variant]
            cells.append(f"{rate:.0f} | {cpu:.2f} | {cpu / baseline[variant][1]:.2f}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    notes = (
        f"{args.op_images} shapes scenes of {args.size} x {args.size} px held in memory as "
        f"tensors, batch {args.batch}, up to {MAX_BOXES} objects per image; each augmenter is "
        f"one `tf.function` (the composed rows are `Augmenter`s), {args.epochs} timed pass(es) "
        "after tracing. \"boxes\": image + boxes + classes; \"boxes + masks\": the same plus "
        f"instance masks [B, {MAX_BOXES}, H, W] (resampled by the geometric augmenters; the "
        "warps then take each box from its warped mask and measure the visible fraction of "
        "each object). CPU x scale crop = CPU ms/img relative to `random_scale_crop` measured "
        "in the same run (above 1 = costlier; CPU time is steadier than img/s on a shared "
        "machine). XLA rows: the same warp with `jit_compile=True` "
        "(crop_and_resize has no XLA kernel, so the crop rows cannot be compiled). Load average "
        f"(1 min) before/after: {load_before:.1f}/{load_after:.1f} (a shared machine: the "
        "numbers are indicative).")
    print()
    print(table)
    print()
    print(notes)
    print(f"\npart 2: {time.perf_counter() - start:.0f} s")
    if not args.no_write:
        write_results(table, notes, OPERATION_SECTION)
        print(f"wrote {RESULTS}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512,
                        help="number of cached scenes (default 512)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per row (default 2)")
    parser.add_argument("--op-images", type=int, default=256,
                        help="scenes for the cost per operation, part 2 (default 256)")
    parser.add_argument("--part", choices=("all", "placement", "operations"), default="all",
                        help="placement (part 1), cost per operation (part 2) or both")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.part in ("all", "placement"):
        placement(args)
    if args.part in ("all", "operations"):
        cost_per_operation(args)


def placement(args) -> None:
    """Part 1: the same detection augmentation per example, batched in tf.data, in train_step."""
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
