"""Benchmark: where a step of the default ``train_unet.py`` goes (model, loss, metrics, input).

The default run trains an 8-filter U-Net of depth 4 on 64x64 ``shapes_segmentation`` in batches of
16. Its step is timed in layers, each adding one thing to the last, all in one process:

(a) the model's forward and backward pass and Adam's update, with a trivial loss (the mean logit):
    the arithmetic floor of the step;
(b) + the real loss (cross-entropy + Dice, ``ch06_segmentation.losses``);
(c) + the metrics, i.e. Keras' own ``fit`` step with mean IoU and pixel accuracy, fed from memory;
(d) + the input pipeline: ``fit`` fed by the script's own ``tf.data`` pipeline (cached examples,
    shuffled and batched per epoch, ``common.training.epoch_batches``).

(a) to (c) are timed with and without XLA (``jit_compile``). The ratio (d) / (a) is how far the
training step is from its floor; it is written to the "## U-Net training step" section of
bench/RESULTS.md with the machine and its load average (a busy machine gives slower absolute
numbers; the ratios, measured in the same run, are what to compare).

Run from the repo root::

    python bench/bench_unet.py            # about 2 minutes on a 2-core CPU
    python bench/bench_unet.py --steps 10 # quicker, noisier
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import keras
import tensorflow as tf

from ch06_segmentation import losses, train_unet
from common import data, training

import results_md  # bench/results_md.py (bench/ is on the path when run as a script)

SECTION = "## U-Net training step"


def _custom_step(model, loss_fn, jit):
    """A tf.function train step: forward, ``loss_fn(masks, logits)``, backward, Adam."""
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def step(images, masks):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(masks, logits)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    return step


def measure(steps=20):
    config = train_unet.Config()
    keras.utils.set_random_seed(0)
    num_classes = data.get_info(config.dataset, task="segmentation").num_classes
    examples = data.to_supervised(data.load(config.dataset, "train", image_size=config.image_size,
                                            num_examples=config.batch_size * 32)).cache()
    # The pipeline of (d) reads these 512 examples per epoch, as the script reads its 8000.
    batches = list(examples.batch(config.batch_size))
    images, masks = batches[0]
    loss_fn = losses.get_loss(config.loss, num_classes, None)
    trivial_loss = lambda masks, logits: tf.reduce_mean(logits)  # noqa: E731
    result = {"batch_size": config.batch_size, "image_size": config.image_size, "steps": steps}

    for jit in (False, True):
        suffix = "xla" if jit else "plain"
        model = train_unet.build_model(config, num_classes)
        result["params"] = model.count_params()
        forward = tf.function(lambda x: model(x, training=False), jit_compile=jit)
        result[f"forward_{suffix}"] = results_md.median_seconds(lambda: forward(images), steps)
        step_a = _custom_step(model, trivial_loss, jit)
        result[f"a_{suffix}"] = results_md.median_seconds(lambda: step_a(images, masks), steps)
        step_b = _custom_step(model, loss_fn, jit)
        result[f"b_{suffix}"] = results_md.median_seconds(lambda: step_b(images, masks), steps)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn, jit_compile=jit,
                      metrics=[losses.MeanIoU(num_classes), losses.PixelAccuracy(num_classes)])
        stream = tf.data.Dataset.from_tensors((images, masks)).repeat()
        model.fit(stream, steps_per_epoch=3, epochs=1, verbose=0)  # trace + warm up
        start = time.perf_counter()
        model.fit(stream, steps_per_epoch=steps, epochs=1, verbose=0)
        result[f"c_{suffix}"] = (time.perf_counter() - start) / steps
    # (d) as the script runs it: jit_compile "auto" (Keras turns XLA off on a CPU-only machine).
    model = train_unet.build_model(config, num_classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn, jit_compile="auto",
                  metrics=[losses.MeanIoU(num_classes), losses.PixelAccuracy(num_classes)])
    model.fit(tf.data.Dataset.from_tensors((images, masks)).repeat(), steps_per_epoch=3, epochs=1,
              verbose=0)
    result["d_xla"] = bool(model.jit_compile)
    # One fit over several epochs, as the script does (the iterator is made once per fit).
    epochs = max(1, -(-steps // len(batches)))
    pipeline = training.epoch_batches(examples, config.batch_size, 0, epochs, seed=0)
    start = time.perf_counter()
    model.fit(pipeline, steps_per_epoch=len(batches), epochs=epochs, verbose=0)
    result["d"] = (time.perf_counter() - start) / (epochs * len(batches))
    result["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def write_section(result):
    load = result["load"]
    load_text = "n/a" if load is None else ", ".join(f"{v:.1f}" for v in load)
    a = result["a_plain"]

    def row(name, key):
        plain, xla = result[f"{key}_plain"], result[f"{key}_xla"]
        return (f"| {name} | {1000 * plain:.1f} ({plain / a:.2f}x) | {1000 * xla:.1f} "
                f"({xla / a:.2f}x) |")

    lines = [
        SECTION, "",
        f"`python bench/bench_unet.py`: the default `train_unet.py` model ({result['params']:,} "
        f"parameters, {result['image_size']}x{result['image_size']} images, batch "
        f"{result['batch_size']}), median ms per step over {result['steps']} steps, TF "
        f"{tf.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}), load average "
        f"{load_text}. Ratios are to (a) without XLA, measured in the same run.", "",
        "| step | ms, no XLA | ms, XLA |", "| --- | --- | --- |",
        row("forward only (inference)", "forward"),
        row("(a) forward + backward + Adam, trivial loss", "a"),
        row("(b) + cross-entropy + Dice loss", "b"),
        row("(c) + mean IoU and pixel accuracy (Keras `fit`, data in memory)", "c"),
        "",
        f"(d) the script's `fit` with its own `tf.data` pipeline "
        f"({'XLA' if result['d_xla'] else 'no XLA'}, as `--jit-compile auto` chooses): "
        f"{1000 * result['d']:.1f} ms per step, **{result['d'] / a:.2f}x** the floor (a).", "",
    ]
    return results_md.replace_section("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    result = measure(steps=args.steps)
    if args.no_write:
        print(result)
    else:
        print(write_section(result))


if __name__ == "__main__":
    main()
