"""Benchmark: the Faster R-CNN training step and inference with and without XLA, in one run.

The default ``train_faster_rcnn.py`` model (128-px shapes, resnet_small at stride 8, batch 16) is
timed on one fixed batch, each variant a separate copy of the model with the same weights:

* the whole training step as ``fit`` runs it (``Detector.train_step``), ``compile(jit_compile=False)``
  (TensorFlow's kernels: ``crop_and_resize``, per-image NMS) against ``compile(jit_compile=True)``
  (the whole step one XLA cluster, with the XLA-compatible ops: ``roi_ops.roi_align_gather`` and
  ``boxes.nms_padded``; see ``FasterRCNN.use_xla_ops``): train images / s and their ratio;
* the rows (a) to (d) of ``bench_faster_rcnn_breakdown.py`` (the backbone alone; + the RPN head and
  its targets; + the proposals; + RoI sampling, RoIAlign and the head), without and with XLA: where
  the time goes, and (e) / (a) for both;
* the cost of the two op swaps alone, without XLA (the XLA-compatible ops run by TensorFlow);
* inference at batch 1 (``detect``): ms / image without XLA, and with ``call`` (backbone, RPN,
  proposals, RoIAlign, head) compiled by XLA and the per-class NMS of ``decode`` left to TensorFlow
  (``tf.image.combined_non_max_suppression`` has no XLA kernel).

Variants are timed in alternation, ``--rounds`` times, and each number is the median over the rounds,
so a change of load during the run hits all of them alike. Written to the "## Faster R-CNN with XLA"
section of bench/RESULTS.md with the machine and its load; ``common/training.py``'s
``JIT_MEASURED_FASTER`` records the verdict (``--jit-compile auto`` turns XLA on only for models
measured faster with it on this kind of machine).

Run from the repo root (hold the CPU lock; about 6 minutes on a 2-core CPU, most of it compiling)::

    python bench/bench_faster_rcnn_xla.py
    python bench/bench_faster_rcnn_xla.py --rounds 2 --steps 3 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import keras
import tensorflow as tf

from ch05_detection import train_faster_rcnn
from common import synthetic

import results_md  # bench/results_md.py (bench/ is on the path when run as a script)
from bench_faster_rcnn_breakdown import _train_step, fixed_batch

SECTION = "## Faster R-CNN with XLA"
ROWS = (("a", "backbone alone"), ("b", "+ RPN head, anchor targets and sampling"),
        ("c", "+ proposals (decode, top-k, NMS)"), ("d", "+ RoI sampling, RoIAlign, head"))


def _model(config, weights=None):
    model = train_faster_rcnn.build_model(config, len(synthetic.CLASS_NAMES), synthetic.CLASS_NAMES)
    if weights is not None:
        model.set_weights(weights)
    return model


def _fit_step(model, batch, jit_compile, xla_ops=None):
    """A zero-argument callable running one ``train_on_batch`` of ``model`` compiled as asked."""
    model.compile(optimizer=keras.optimizers.Adam(1e-4, clipnorm=10.0), jit_compile=jit_compile)
    if xla_ops is not None:  # the XLA-compatible ops without XLA
        model.use_xla_ops(xla_ops)
    return lambda: model.train_on_batch(batch)


def _inference(model, jit_compile):
    """Batch-1 ``detect`` as a tf.function; with XLA, ``call`` is one compiled cluster inside it."""
    model.use_xla_ops(jit_compile)
    raw = tf.function(lambda images: model(images, training=False), jit_compile=jit_compile)

    @tf.function
    def infer(images):
        return model.decode(raw(images))["boxes"]

    return infer


def measure(steps=5, rounds=3):
    config = train_faster_rcnn.Config()
    keras.utils.set_random_seed(0)
    batch = fixed_batch(config)
    images, boxes, classes = batch["image"], batch["boxes"], batch["classes"]
    reference = _model(config)
    weights = reference.get_weights()
    result = {"batch_size": config.batch_size, "steps": steps, "rounds": rounds,
              "params": reference.count_params()}

    compile_start = time.perf_counter()
    variants = {
        "train": _fit_step(_model(config, weights), batch, jit_compile=False),
        "train_xla": _fit_step(_model(config, weights), batch, jit_compile=True),
        "train_xla_ops": _fit_step(_model(config, weights), batch, jit_compile=False, xla_ops=True),
    }
    for upto in "abcd":  # the rows of bench_faster_rcnn_breakdown.py, without and with XLA
        for jit in (False, True):
            model = _model(config, weights)
            model.use_xla_ops(jit)
            step = _train_step(model, keras.optimizers.Adam(1e-4), upto, jit_compile=jit)
            counter = iter(range(10 ** 9))
            variants[f"row_{upto}" + ("_xla" if jit else "")] = (
                lambda step=step, counter=counter: step(images, boxes, classes,
                                                        tf.constant(next(counter), tf.int64)))
    one_image = images[:1]
    for jit, key in ((False, "infer"), (True, "infer_xla")):
        infer = _inference(_model(config, weights), jit)
        variants[key] = lambda infer=infer: infer(one_image)
    for function in variants.values():  # trace and compile everything first
        function()
    result["compile_seconds"] = time.perf_counter() - compile_start

    times = {key: [] for key in variants}
    for _ in range(rounds):
        for key, function in variants.items():
            times[key].append(results_md.median_seconds(function, steps, warmup=1))
    for key, values in times.items():
        result[key] = statistics.median(values)
    result["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


def faster_with_xla(result):
    """The verdict ``--jit-compile auto`` follows: XLA's training step at least 5% faster."""
    return result["train"] / result["train_xla"] >= 1.05


def write_section(result):
    load = result["load"]
    load_text = "n/a" if load is None else ", ".join(f"{v:.1f}" for v in load)
    batch = result["batch_size"]

    def per_image(key, size=batch):
        return 1000.0 * result[key] / size

    speedup = result["train"] / result["train_xla"]
    lines = [
        SECTION, "",
        f"`python bench/bench_faster_rcnn_xla.py`: the default `train_faster_rcnn.py` model "
        f"({result['params']:,} parameters, batch {batch}), median of {result['rounds']} rounds of "
        f"{result['steps']} steps each, variants in alternation; TF {tf.__version__}, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load_text} at the end; "
        f"tracing and XLA compilation of all variants took {result['compile_seconds']:.0f} s.", "",
        "| | without XLA | with XLA | XLA speed-up |",
        "| --- | ---: | ---: | ---: |",
        f"| training step, ms / image | {per_image('train'):.1f} | {per_image('train_xla'):.1f} | "
        f"{speedup:.2f}x |",
        f"| training, images / s | {batch / result['train']:.1f} | {batch / result['train_xla']:.1f} | |",
        *[f"| ({key}) {name}, ms / image | {per_image('row_' + key):.1f} | "
          f"{per_image('row_' + key + '_xla'):.1f} | "
          f"{result['row_' + key] / result['row_' + key + '_xla']:.2f}x |" for key, name in ROWS],
        f"| (e) / (a) | {result['train'] / result['row_a']:.2f}x | "
        f"{result['train_xla'] / result['row_a_xla']:.2f}x | |",
        f"| inference at batch 1 (`detect`), ms / image | {per_image('infer', 1):.1f} | "
        f"{per_image('infer_xla', 1):.1f} | {result['infer'] / result['infer_xla']:.2f}x |",
        "",
        f"The XLA-compatible ops without XLA (RoIAlign by gathers, batched NMS): "
        f"{per_image('train_xla_ops'):.1f} ms / image against {per_image('train'):.1f} with "
        f"TensorFlow's `crop_and_resize` and per-image NMS. Goals of issue 19: >= 1.3x training "
        f"speed-up, (e) / (a) <= 1.6 with XLA. Verdict for `--jit-compile auto`: "
        f"**{'XLA on' if faster_with_xla(result) else 'XLA off'}** for the detector on this machine "
        f"(`common.training.JIT_MEASURED_FASTER`).", "",
    ]
    return results_md.replace_section("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all variants in alternation")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    result = measure(steps=args.steps, rounds=args.rounds)
    print(result if args.no_write else write_section(result))


if __name__ == "__main__":
    main()
