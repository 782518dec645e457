"""Benchmark: where a step of the default ``train_unet.py`` goes (model, loss, metrics, input).

The default run trains an 8-filter U-Net of depth 4 on 64x64 ``shapes_segmentation`` in batches of
16. Its step is timed in layers, each adding one thing to the last, all in one process:

(a) the model's forward and backward pass and Adam's update, with a trivial loss (the mean logit):
    the arithmetic floor of the step;
(b) + the real loss (cross-entropy + Dice, ``ch06_segmentation.losses``);
(b') Keras' own ``fit`` step with that loss and no metrics, fed from memory (Keras' plumbing:
    the loss tracker, the per-step logs);
(c) + the metrics: ``fit`` with mean IoU and pixel accuracy, fed from memory;
(d) + the input pipeline: ``fit`` fed by the script's own ``tf.data`` pipeline (cached examples,
    shuffled and batched per epoch, ``common.training.epoch_batches``).

Every figure is a median over steps: (a) and (b) time calls of a ``tf.function``, (b') to (d)
the time between the ends of consecutive batches inside ``fit`` (a callback). The layers are
timed in interleaved rounds (each round times every layer), the median of each round, then the
median over rounds. A median, because on a shared machine a step that waits for another
process's work takes twice as long, and a mean over a few steps picks up those waits; and
interleaved, because the load changes during a run (a first version of this benchmark timed each
layer once, in turn, with a mean for (c): the metrics then seemed to double the step). (d) also
reports the mean over all its steps, the wall time a user waits.

(a) to (c) are timed with and without XLA (``jit_compile``). The ratio (d) / (a) is how far the
training step is from its floor; it is written to the "## U-Net training step" section of
bench/RESULTS.md with the machine and its load average (a busy machine gives slower absolute
numbers; the ratios, measured in the same run, are what to compare). ``--json`` saves the numbers;
``--before`` adds a column from such a file (e.g. measured on the code before a change).

Run from the repo root::

    python bench/bench_unet.py            # about 3 minutes on a 2-core CPU
    python bench/bench_unet.py --steps 10 # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


class _StepTimes(keras.callbacks.Callback):
    """Wall seconds between the ends of consecutive training batches (the first batch is not
    timed: its start is the iterator's first ``next``)."""

    def on_train_begin(self, logs=None):
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())

    def seconds(self):
        return [later - earlier for earlier, later in zip(self.ends, self.ends[1:])]


def _fit_median_seconds(model, make_data, steps_per_epoch):
    """Median seconds per step of one ``fit`` epoch over ``make_data()``, and all the steps'."""
    times = _StepTimes()
    model.fit(make_data(), steps_per_epoch=steps_per_epoch, epochs=1, verbose=0, callbacks=[times])
    return statistics.median(times.seconds()), times.seconds()


def _record(all_steps, median_and_steps):
    all_steps += median_and_steps[1]
    return median_and_steps[0]


def measure(steps=40, rounds=4):
    """Seconds per step of every layer of the step: ``steps`` per layer in ``rounds`` interleaved
    rounds (each round times every layer once, so a change of the machine's load during the run
    falls on all layers alike); the median of each round, then the median over rounds."""
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
    metrics = lambda: [losses.MeanIoU(num_classes), losses.PixelAccuracy(num_classes)]  # noqa: E731
    stream = lambda: tf.data.Dataset.from_tensors((images, masks)).repeat()  # noqa: E731
    per_round = max(2, -(-steps // rounds))
    result = {"batch_size": config.batch_size, "image_size": config.image_size,
              "steps": per_round * rounds, "rounds": rounds}

    def compiled(jit, with_metrics):
        model = train_unet.build_model(config, num_classes)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn, jit_compile=jit,
                      metrics=metrics() if with_metrics else [])
        return model

    timers = {}  # name -> function(count) -> median seconds per step over count steps
    for jit in (False, True):
        suffix = "xla" if jit else "plain"
        model = train_unet.build_model(config, num_classes)
        result["params"] = model.count_params()
        forward = tf.function(lambda x, model=model: model(x, training=False), jit_compile=jit)
        step_a = _custom_step(model, trivial_loss, jit)
        step_b = _custom_step(model, loss_fn, jit)
        timers[f"forward_{suffix}"] = lambda n, f=forward: results_md.median_seconds(
            lambda: f(images), n, warmup=0)
        timers[f"a_{suffix}"] = lambda n, f=step_a: results_md.median_seconds(
            lambda: f(images, masks), n, warmup=0)
        timers[f"b_{suffix}"] = lambda n, f=step_b: results_md.median_seconds(
            lambda: f(images, masks), n, warmup=0)
        for key, with_metrics in (("b_fit", False), ("c", True)):
            timers[f"{key}_{suffix}"] = lambda n, m=compiled(jit, with_metrics): _fit_median_seconds(
                m, stream, n + 1)[0]
    # The loss and the metrics alone, on fixed logits (no model): the loss's forward and backward
    # pass, and both metrics' updates in one tf.function, as they sit in fit's step.
    logits = tf.Variable(model(images, training=False))
    metric_objects = metrics()

    @tf.function
    def loss_alone():
        with tf.GradientTape() as tape:
            value = loss_fn(masks, logits)
        return tape.gradient(value, logits)

    @tf.function
    def metrics_alone():
        for metric in metric_objects:
            metric.update_state(masks, logits)

    timers["loss_alone_plain"] = lambda n: results_md.median_seconds(loss_alone, n, warmup=0)
    timers["metrics_alone_plain"] = lambda n: results_md.median_seconds(metrics_alone, n, warmup=0)
    # (d) as the script runs it: jit_compile "auto" (Keras turns XLA off on a CPU-only machine),
    # one epoch of the script's pipeline per round.
    model_d = compiled("auto", True)
    epoch = iter(range(10**6))
    d_steps = []  # every step of (d), for the mean
    timers["d"] = lambda n: _record(d_steps, _fit_median_seconds(model_d, lambda: training.epoch_batches(
        examples, config.batch_size, next(epoch), 1, seed=0), len(batches)))
    for timer in timers.values():
        timer(2)  # trace (and compile) + warm up, not timed
    result["d_xla"] = bool(model_d.jit_compile)
    d_steps.clear()
    medians = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            medians[name].append(timer(per_round))
    for name, values in medians.items():
        result[name] = statistics.median(values)
    result["d_mean"] = statistics.mean(d_steps)
    result["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def write_section(result, before=None):
    """The RESULTS.md section; ``before`` (a result of an earlier run) adds a column to compare."""

    def load_text(run):
        return "n/a" if run["load"] is None else ", ".join(f"{v:.1f}" for v in run["load"])

    def cell(run, key):
        value = run.get(key)
        return "-" if value is None else f"{1000 * value:.1f} ({value / run['a_plain']:.2f}x)"

    def row(name, key):
        cells = [cell(result, f"{key}_plain"), cell(result, f"{key}_xla")]
        if before is not None:
            cells.append(cell(before, f"{key}_plain"))
        return f"| {name} | " + " | ".join(cells) + " |"

    a = result["a_plain"]
    header = "| step | ms, no XLA | ms, XLA |" + (" ms before, no XLA |" if before else "")
    lines = [
        SECTION, "",
        f"`python bench/bench_unet.py`: the default `train_unet.py` model ({result['params']:,} "
        f"parameters, {result['image_size']}x{result['image_size']} images, batch "
        f"{result['batch_size']}), median ms per step over {result['steps']} steps, TF "
        f"{tf.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}), load average "
        f"{load_text(result)}. Ratios are to (a) without XLA, measured in the same run.", "",
        header, "| --- | --- | --- |" + (" --- |" if before else ""),
        row("forward only (inference)", "forward"),
        row("(a) forward + backward + Adam, trivial loss", "a"),
        row("(b) + cross-entropy + Dice loss", "b"),
        row("(b') Keras `fit` with that loss, no metrics, data in memory", "b_fit"),
        row("(c) + mean IoU and pixel accuracy (Keras `fit`, data in memory)", "c"),
        row("the loss alone: forward + backward on fixed logits", "loss_alone"),
        row("the two metrics' updates alone, in one `tf.function`", "metrics_alone"),
        "",
        f"(d) the script's `fit` with its own `tf.data` pipeline "
        f"({'XLA' if result['d_xla'] else 'no XLA'}, as `--jit-compile auto` chooses): "
        f"{1000 * result['d']:.1f} ms per step (median; mean {1000 * result['d_mean']:.1f}), "
        f"**{result['d'] / a:.2f}x** the floor (a); (c) / (a) = "
        f"**{result['c_plain'] / a:.2f}x**, (b) / (a) = {result['b_plain'] / a:.2f}x.",
    ]
    if before is not None:
        lines.append("")
        lines.append(
            f"Before: {before.get('label', 'an earlier run')}, load average {load_text(before)}: "
            f"(d) {1000 * before['d']:.1f} ms (**{before['d'] / before['a_plain']:.2f}x** its (a)), "
            f"(c) / (a) = {before['c_plain'] / before['a_plain']:.2f}x.")
    return results_md.replace_section("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleaved rounds the steps are split into")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    parser.add_argument("--json", help="also save the numbers to this JSON file")
    parser.add_argument("--label", default=None, help="what this run measured (kept in --json)")
    parser.add_argument("--before", help="a --json file of an earlier run: add it as a column")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    before = None
    if args.before:
        try:
            with open(args.before) as file:
                before = json.load(file)
        except (OSError, ValueError) as error:
            parser.error(f"--before {args.before}: cannot read a JSON result ({error})")
        missing = {"a_plain", "b_plain", "c_plain", "d", "load"} - set(before)
        if missing:
            parser.error(f"--before {args.before}: not a bench_unet.py result, missing "
                         f"{sorted(missing)}")
    result = measure(steps=args.steps, rounds=args.rounds)
    result["label"] = args.label
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    if args.no_write:
        print(result)
    else:
        print(write_section(result, before))


if __name__ == "__main__":
    main()
