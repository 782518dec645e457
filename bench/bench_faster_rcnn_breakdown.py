"""Benchmark: where a Faster R-CNN training step goes, stage by stage.

The default ``train_faster_rcnn.py`` model (128-px shapes, resnet_small at stride 8, batch 16) is
timed five ways, each a ``tf.function`` training step (forward, backward, Adam) that adds one part of
the real step to the last:

(a) the backbone alone (loss: the mean of its feature map): the arithmetic floor;
(b) + the RPN head and its loss (anchor targets, sampling of 256 anchors per image);
(c) + the proposals (decode the deltas, clip, top-k, NMS), computed but not yet used;
(d) + RoI sampling, RoIAlign and the detection head with its loss: ``FasterRCNN.losses_for``;
(e) the whole step as ``fit`` runs it (``Detector.train_step``: the random flip, the loss, the
    gradient, Adam, the loss metrics).

and inference the same way: backbone; + RPN head; + proposals; + RoIAlign and head; + decoding
(per-class NMS), i.e. ``detect``. The ratio (e) / (a) says how far the step is from its floor.
Written to the "## Faster R-CNN step breakdown" section of bench/RESULTS.md with the machine and its
load (absolute times depend on what else runs; ratios come from the same run).

Run from the repo root::

    python bench/bench_faster_rcnn_breakdown.py             # about 3 minutes on a 2-core CPU
    python bench/bench_faster_rcnn_breakdown.py --steps 5   # quicker, noisier
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import keras
import tensorflow as tf

from ch05_detection import detection_head, rpn, targets, train_faster_rcnn
from common import data as common_data
from common import synthetic, training

import results_md  # bench/results_md.py (bench/ is on the path when run as a script)

SECTION = "## Faster R-CNN step breakdown"


def _partial_losses(model, images, gt_boxes, gt_classes, upto, step):
    """The training loss of the stages up to ``upto`` ("a" .. "c"), as ``losses_for`` computes them."""
    config = model.config
    feature_map = model.rpn_features(images, training=True)
    if upto == "a":
        return tf.reduce_mean(feature_map)
    logits, deltas = model.rpn_head(feature_map)
    index = targets.global_image_index(tf.shape(images)[0])
    labels, box_targets = rpn.assign_rpn_targets(
        model.anchors, gt_boxes, gt_classes, positive_threshold=config.rpn_positive_iou,
        negative_threshold=config.rpn_negative_iou, num_samples=config.rpn_num_samples,
        positive_fraction=config.rpn_positive_fraction,
        seed=targets.image_seeds(step, index, config.seed, targets.RPN_SAMPLING_STREAM),
        anchor_valid=model.anchor_valid)
    class_loss, box_loss = rpn.rpn_loss(logits, deltas, labels, box_targets)
    loss = class_loss + box_loss
    if upto == "b":
        return loss
    proposals, _, count = model.proposal_layer(logits, deltas, model.anchors, training=True)
    # Used (times zero) so that the graph cannot prune the proposal computation away.
    return loss + 0.0 * tf.stop_gradient(tf.reduce_sum(proposals) + tf.cast(tf.reduce_sum(count),
                                                                              tf.float32))


def _train_step(model, optimizer, upto, jit_compile=False):
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True, jit_compile=jit_compile)
    def step(images, gt_boxes, gt_classes, step_number):
        with tf.GradientTape() as tape:
            if upto == "d":
                loss = model.losses_for(images, gt_boxes, gt_classes, training=True,
                                        step=step_number)["loss"]
            else:
                loss = _partial_losses(model, images, gt_boxes, gt_classes, upto, step_number)
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(gradients, variables) if g is not None])
        return loss

    return step


def _inference(model, upto):
    @tf.function(reduce_retracing=True)
    def infer(images):
        images = model._resize(images)
        feature_map = model.rpn_features(images, training=False)
        if upto == "a":
            return tf.reduce_sum(feature_map)
        logits, deltas = model.rpn_head(feature_map)
        if upto == "b":
            return tf.reduce_sum(logits) + tf.reduce_sum(deltas)
        proposals, _, count = model.proposal_layer(logits, deltas, model.anchors, training=False)
        if upto == "c":
            return tf.reduce_sum(proposals) + tf.cast(tf.reduce_sum(count), tf.float32)
        pooled = model.pool_rois(feature_map, proposals)
        class_logits, box_deltas = model.detection_head(pooled, training=False)
        if upto == "d":
            return tf.reduce_sum(class_logits) + tf.reduce_sum(box_deltas)
        valid = tf.range(tf.shape(proposals)[1])[None, :] < count[:, None]
        detections = detection_head.postprocess_detections(
            proposals, class_logits, box_deltas, roi_valid=valid,
            score_threshold=model.config.score_threshold,
            nms_iou_threshold=model.config.detection_nms_iou,
            max_detections=model.config.max_detections)
        return detections["boxes"]

    return infer


def fixed_batch(config):
    """One padded training batch of the default data (a dict: image, boxes, classes ...), the same in
    every call."""
    dataset = common_data.load("shapes", "train", image_size=config.image_size,
                               num_examples=config.batch_size)
    batch = next(iter(common_data.batch_detection(dataset, config.batch_size, config.max_boxes,
                                                  drop_remainder=True)))
    return batch


def measure(steps=10):
    config = train_faster_rcnn.Config()
    keras.utils.set_random_seed(0)
    batch = fixed_batch(config)
    images, boxes, classes = batch["image"], batch["boxes"], batch["classes"]
    model = train_faster_rcnn.build_model(config, 5, synthetic.CLASS_NAMES)
    result = {"batch_size": config.batch_size, "steps": steps, "params": model.count_params()}
    for upto in "abcd":
        optimizer = keras.optimizers.Adam(1e-4)
        step = _train_step(model, optimizer, upto)
        counter = iter(range(10 ** 9))
        result[f"train_{upto}"] = results_md.median_seconds(
            lambda: step(images, boxes, classes, tf.constant(next(counter), tf.int64)), steps)
        result[f"infer_{upto}"] = results_md.median_seconds(lambda infer=_inference(model, upto):
                                                  infer(images), steps)
    result["infer_e"] = results_md.median_seconds(lambda infer=_inference(model, "e"): infer(images), steps)
    model.compile(optimizer=training.make_optimizer("adam", 1e-4, clipnorm=10.0), jit_compile=False)
    stream = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(stream, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(stream, steps_per_epoch=steps, epochs=1, verbose=0)
    result["train_e"] = (time.perf_counter() - start) / steps
    result["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return result


ROWS = (
    ("a", "backbone", "backbone"),
    ("b", "+ RPN head and its loss (anchor targets and sampling)", "+ RPN head"),
    ("c", "+ proposals (decode, clip, top-k, NMS)", "+ proposals"),
    ("d", "+ RoI sampling, RoIAlign, detection head and its loss", "+ RoIAlign and head"),
    ("e", "the whole step as `fit` runs it (flip, loss metrics)", "+ decoding and per-class NMS (`detect`)"),
)


def write_section(result):
    load = result["load"]
    load_text = "n/a" if load is None else ", ".join(f"{v:.1f}" for v in load)
    batch = result["batch_size"]
    lines = [
        SECTION, "",
        f"`python bench/bench_faster_rcnn_breakdown.py`: the default `train_faster_rcnn.py` model "
        f"({result['params']:,} parameters, batch {batch}), median over {result['steps']} steps, "
        f"no XLA, TF {tf.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}), load "
        f"average {load_text}. Each row adds one part to the row above; the ratio is to row (a).", "",
        "| | training step adds | ms / image | ratio | inference adds | ms / image | ratio |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for key, train_name, infer_name in ROWS:
        train, infer = result[f"train_{key}"] / batch, result[f"infer_{key}"] / batch
        lines.append(f"| ({key}) | {train_name} | {1000 * train:.1f} | "
                     f"{train * batch / result['train_a']:.2f}x | {infer_name} | {1000 * infer:.1f} | "
                     f"{infer * batch / result['infer_a']:.2f}x |")
    lines += ["", f"(e) / (a) for training: **{result['train_e'] / result['train_a']:.2f}x**.", ""]
    return results_md.replace_section("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    result = measure(steps=args.steps)
    print(result if args.no_write else write_section(result))


if __name__ == "__main__":
    main()
