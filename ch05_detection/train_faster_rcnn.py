"""Train Faster R-CNN on the embedded shapes data (or VOC / COCO / your own folder).

Ren, He, Girshick and Sun 2015, "Faster R-CNN". With no arguments this script trains
the chapter's model (ResNet-small backbone at stride 8, 9 anchors per location,
RoIAlign 7x7, a 2-layer fully connected head) on 128x128 ``shapes`` scenes with
approximate joint training, on a CPU in about 12 minutes, then evaluates it on the
held-out validation split (VOC mAP@0.5 and COCO mAP@[.5:.95], with our
``evaluate.py`` and cross-checked with pycocotools) and draws pictures.

Run from the repo root::

    python ch05_detection/train_faster_rcnn.py                 # the default run
    python ch05_detection/train_faster_rcnn.py --fast          # seconds, tiny sizes
    python ch05_detection/train_faster_rcnn.py --schedule alternating   # 4-step training
    python ch05_detection/train_faster_rcnn.py --dataset voc/2007 --backbone resnet50 \
        --image-size 512 --output-stride 16

Re-running with the same ``--out`` resumes from the last finished epoch (and only
evaluates when training is complete). Output in ``--out`` (default
``runs/train_faster_rcnn/``): ``config.json``, ``metrics.json``,
``val_ground_truth.json`` and ``val_detections.json`` (COCO format),
``detections.png`` (ground truth beside detections), ``proposals.png`` (RPN proposals
before and after NMS), ``pr_curves.png``, ``faster_rcnn.keras``, ``logs/``
(TensorBoard) and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import evaluate
from ch05_detection.faster_rcnn import ALTERNATING_SCHEDULE, FasterRCNN
from common import callbacks as common_callbacks
from common import config as common_config
from common import data as common_data
from common import viz

# The anchor sizes of the default run, in pixels of a 128x128 image: shapes are ~20 to
# ~56 px, so 24 / 48 / 96 px anchors (x 3 aspect ratios) cover them with IoU >= 0.5.
# For other image sizes the anchors scale with the image.
BASE_IMAGE_SIZE = 128
BASE_ANCHOR_SCALES = (24.0, 48.0, 96.0)


@dataclass
class Config:
    """Train Faster R-CNN (Ren et al. 2015) and evaluate it on the validation split."""

    dataset: str = field(default="shapes", metadata={
        "help": "shapes, voc/2007, coco/2017, or a folder with COCO JSON / VOC XML"})
    data_dir: str = field(default="", metadata={
        "help": "tensorflow-datasets folder ('' = default)"})
    backbone: str = field(default="resnet_small", metadata={
        "help": "chapter-4 backbone",
        "choices": ["resnet_small", "resnet50", "vgg16", "mobilenet_v2"]})
    backbone_width: int = field(default=32, metadata={
        "help": "resnet_small only: channels of its first stage (doubling per stage)"})
    output_stride: int = field(default=8, metadata={"help": "backbone stride (8 or 16)"})
    image_size: int = field(default=128, metadata={"help": "square input size in pixels"})
    roi_op: str = field(default="align", metadata={
        "help": "RoI feature op", "choices": ["align", "pool"]})
    schedule: str = field(default="joint", metadata={
        "help": "approximate joint training or the paper's 4-step alternating training",
        "choices": ["joint", "alternating"]})
    head_type: str = field(default="dense", metadata={
        "help": "detection head", "choices": ["dense", "conv"]})
    epochs: int = field(default=12, metadata={
        "help": "training epochs (alternating: per step, rounded up from epochs / 4)"})
    batch_size: int = field(default=16, metadata={"help": "images per batch"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak Adam learning rate"})
    warmup_steps: int = field(default=200, metadata={"help": "linear warm-up steps"})
    train_examples: int = field(default=4000, metadata={"help": "training images (0 = all)"})
    val_examples: int = field(default=500, metadata={"help": "validation images (0 = all)"})
    max_boxes: int = field(default=32, metadata={"help": "objects per image kept in a batch"})
    rois_per_image: int = field(default=64, metadata={"help": "sampled RoIs per image (25% fg)"})
    time_budget_minutes: float = field(default=12.5, metadata={
        "help": "stop (with a shortened LR decay) after the last epoch that fits (0 = off)"})
    eval_every: int = field(default=2, metadata={
        "help": "val mAP@0.5 on a subset every N epochs (0 = off)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    out: str = field(default="runs/train_faster_rcnn", metadata={"help": "output folder"})
    fast: bool = field(default=False, metadata={
        "help": "tiny sizes for a smoke run (or CVTF_FAST=1)"})

    FAST: ClassVar[dict] = {"epochs": 1, "image_size": 64, "batch_size": 4, "train_examples": 16,
                            "val_examples": 8, "backbone_width": 8, "rois_per_image": 16,
                            "warmup_steps": 2, "eval_every": 1}


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------
def load_split(config, split, num_examples):
    options = {"image_size": config.image_size, "seed": config.seed}
    if num_examples:
        options["num_examples"] = num_examples
    if config.data_dir:
        options["data_dir"] = config.data_dir
    if config.dataset != "shapes" and not Path(config.dataset).is_dir():
        options.pop("seed")
    return common_data.load(config.dataset, split, **options)


def make_datasets(config):
    """(train batches, validation batches, list of validation examples as NumPy)."""
    train = load_split(config, "train", config.train_examples)
    validation = load_split(config, "validation", config.val_examples)
    # The shapes scenes are generated on the CPU: cache them once (4000 x 128² x 3 floats
    # ~ 800 MB would be too much, so cache as uint8).
    train = train.map(_to_uint8).cache()
    train = train.shuffle(2048, seed=config.seed, reshuffle_each_iteration=True).map(_to_float)
    train = common_data.batch_detection(train, config.batch_size, config.max_boxes,
                                        drop_remainder=True).prefetch(2)
    val_examples = [{k: v.numpy() for k, v in example.items()} for example in validation]
    val_batches = common_data.batch_detection(
        tf.data.Dataset.from_generator(
            lambda: iter(val_examples), output_signature=validation.element_spec),
        config.batch_size, config.max_boxes)
    return train, val_batches, val_examples


def _to_uint8(example):
    example = dict(example)
    example["image"] = tf.cast(tf.round(tf.clip_by_value(example["image"], 0, 1) * 255), tf.uint8)
    return example


def _to_float(example):
    example = dict(example)
    example["image"] = tf.cast(example["image"], tf.float32) / 255.0
    return example


def count_batches(dataset):
    return int(sum(1 for _ in dataset))


# ----------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------
def build_model(config, num_classes):
    scale = config.image_size / BASE_IMAGE_SIZE
    backbone_options = {}
    if config.backbone == "resnet_small":
        width = config.backbone_width
        backbone_options = {"filters": [width, 2 * width, 4 * width, 8 * width]}
    return FasterRCNN(
        num_classes, image_size=(config.image_size, config.image_size), backbone=config.backbone,
        output_stride=config.output_stride, backbone_options=backbone_options,
        anchor_scales=tuple(s * scale for s in BASE_ANCHOR_SCALES), roi_op=config.roi_op,
        head_type=config.head_type, rois_per_image=config.rois_per_image,
        rpn_min_size=2.0 * scale, name="faster_rcnn")


@keras.saving.register_keras_serializable(package="ch05_detection")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` then cosine decay to ``peak * alpha`` at ``total_steps``.

    ``total_steps`` is a variable, so the time-budget callback can shorten the run (and
    still end the decay on time) without retracing the training step.
    """

    def __init__(self, peak, total_steps, warmup_steps=0, alpha=0.02):
        self.peak, self.warmup_steps, self.alpha = float(peak), int(warmup_steps), float(alpha)
        self.total_steps = tf.Variable(float(total_steps), trainable=False, dtype=tf.float32)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.constant(float(self.warmup_steps))
        warm = self.peak * (step + 1.0) / tf.maximum(warmup, 1.0)
        progress = tf.clip_by_value((step - warmup) / tf.maximum(self.total_steps - warmup, 1.0),
                                    0.0, 1.0)
        cosine_factor = 0.5 * (1 + tf.cos(math.pi * progress))
        cosine = self.peak * (self.alpha + (1 - self.alpha) * cosine_factor)
        return tf.where(step < warmup, warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": float(self.total_steps.numpy()),
                "warmup_steps": self.warmup_steps, "alpha": self.alpha}


def make_optimizer(config, total_steps):
    warmup = max(0, min(config.warmup_steps, total_steps // 2))
    schedule = WarmupCosine(config.learning_rate, total_steps, warmup)
    # Gradient clipping keeps the first steps (random proposals) from exploding.
    return keras.optimizers.Adam(schedule, global_clipnorm=10.0), schedule


class TimeBudget(keras.callbacks.Callback):
    """Stop after the last epoch that fits in ``budget_seconds`` (measured per epoch), and
    shorten the learning-rate decay to match, so a slow or busy machine still finishes
    on time with a fully decayed learning rate."""

    def __init__(self, budget_seconds, schedule, steps_per_epoch, planned_epochs, state):
        super().__init__()
        self.budget, self.schedule = budget_seconds, schedule
        self.steps_per_epoch, self.planned_epochs = steps_per_epoch, planned_epochs
        self.state = state
        self.last_epoch = planned_epochs

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        used = self.state["train_seconds"]
        per_epoch = used / max(1, self.state["epochs_total"])
        affordable = done + int((self.budget - used) // max(per_epoch, 1e-6))
        if affordable < self.last_epoch:
            self.last_epoch = max(done, affordable)
            self.schedule.total_steps.assign(float(self.last_epoch * self.steps_per_epoch))
            print(f"time budget: stopping after epoch {self.last_epoch} of {self.planned_epochs} "
                  f"({per_epoch:.0f} s per epoch, {self.budget:.0f} s budget)")
        if done >= self.last_epoch:
            self.model.stop_training = True


# ----------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------
def run_detection(model, examples, batch_size=16):
    """Detections for a list of examples: list of dicts boxes / classes / scores."""
    images = np.stack([example["image"] for example in examples]) if examples else \
        np.zeros((0,) + model.image_size + (3,), np.float32)
    output = model.detect(images, batch_size=batch_size)
    detections = []
    for i in range(len(examples)):
        n = int(output["num_detections"][i])
        detections.append({"boxes": output["boxes"][i, :n], "classes": output["classes"][i, :n],
                           "scores": output["scores"][i, :n]})
    return detections


def ground_truth_list(examples):
    return [{"boxes": np.asarray(e["boxes"], np.float32).reshape(-1, 4),
             "classes": np.asarray(e["classes"], np.int32).reshape(-1)} for e in examples]


class MapCallback(keras.callbacks.Callback):
    """Adds ``val_map50`` (VOC AP@0.5 on a validation subset) to the logs every N epochs."""

    def __init__(self, examples, num_classes, every=1):
        super().__init__()
        self.examples, self.num_classes, self.every = examples, num_classes, max(1, every)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        detections = run_detection(self.model, self.examples)
        result = evaluate.evaluate_detections(ground_truth_list(self.examples), detections,
                                              num_classes=self.num_classes)
        logs["val_map50"] = float(result["map50"])


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves weights + progress after every epoch, so a re-run resumes (see ``train``)."""

    def __init__(self, directory, stage, state):
        super().__init__()
        self.directory, self.stage, self.state = Path(directory), stage, state
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.state["train_seconds"] += time.perf_counter() - self._start
        self.state["epochs_total"] = self.state.get("epochs_total", 0) + 1
        self.state["stage_epochs"][self.stage] = epoch + 1
        save_checkpoint(self.model, self.directory, self.state)


def save_checkpoint(model, directory, state):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_weights(directory / "latest.weights.h5")
    (directory / "state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(model, directory):
    """The saved progress (and weights loaded into ``model``), or None."""
    directory = Path(directory)
    if not (directory / "state.json").exists() or not (directory / "latest.weights.h5").exists():
        return None
    model.load_weights(directory / "latest.weights.h5")
    return json.loads((directory / "state.json").read_text())


def stage_plan(config):
    """[(stage name, epochs)] for the chosen schedule."""
    if config.schedule == "joint":
        return [("joint", config.epochs)]
    per_step = max(1, math.ceil(config.epochs / 4))
    return [(stage, per_step) for stage in ALTERNATING_SCHEDULE]


def train(model, config, train_batches, val_batches, val_examples, num_classes, out):
    """Run the schedule's stages, resuming from ``out/checkpoints``; returns the state."""
    checkpoint_dir = out / "checkpoints"
    plan = stage_plan(config)
    state = load_checkpoint(model, checkpoint_dir)
    if state is None:
        # stage_epochs: epochs done per stage; finished: stages stopped for good.
        state = {"stage_epochs": {}, "finished": [], "train_seconds": 0.0, "epochs_total": 0}
    else:
        print(f"resuming from {checkpoint_dir}: epochs done per stage {state['stage_epochs']}, "
              f"{state['train_seconds']:.0f} s of training so far")
    steps_per_epoch = count_batches(train_batches)
    eval_subset = val_examples[:min(len(val_examples), 200)]
    for stage_index, (stage, epochs) in enumerate(plan):
        initial_epoch = state["stage_epochs"].get(stage, 0)
        if initial_epoch >= epochs or stage in state["finished"]:
            continue  # done in an earlier run
        print(f"stage {stage_index + 1}/{len(plan)}: {stage} ({epochs} epochs, "
              f"{steps_per_epoch} steps each)")
        model.set_training_stage(stage)
        optimizer, schedule = make_optimizer(config, epochs * steps_per_epoch)
        # No XLA: NMS and the per-image map_fn do not compile well on the CPU.
        model.compile(optimizer=optimizer, jit_compile=False)
        optimizer.iterations.assign(initial_epoch * steps_per_epoch)  # resume the LR schedule
        names = {"loss": "loss", "rpn cls": "rpn_class_loss", "rpn box": "rpn_box_loss",
                 "head cls": "head_class_loss", "head box": "head_box_loss",
                 "val mAP50": "val_map50"}
        callbacks = [EpochCheckpoint(checkpoint_dir, stage, state)]
        if config.time_budget_minutes > 0:
            remaining_stages = len(plan) - stage_index
            budget = state["train_seconds"] + (60 * config.time_budget_minutes
                                               - state["train_seconds"]) / remaining_stages
            callbacks.append(TimeBudget(budget, schedule, steps_per_epoch,
                                        epochs, state))
        if config.eval_every and stage in ("joint", "detector", "detector_finetune"):
            callbacks.append(MapCallback(eval_subset, num_classes, config.eval_every))
        callbacks += [common_callbacks.SimpleLogCallback(names, epochs),
                      *common_callbacks.epoch_log_callbacks(out / "logs" / stage, f"{stage}.csv")]
        model.fit(train_batches, epochs=epochs, initial_epoch=initial_epoch,
                  callbacks=callbacks, verbose=0)
        if state["stage_epochs"].get(stage, 0) < epochs:  # stopped by the time budget
            state["finished"].append(stage)
        save_checkpoint(model, checkpoint_dir, state)
    model.set_training_stage("joint")
    return state


# ----------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------
def _pad(rows, width, fill):
    """Stack ragged per-image arrays into [B, width, ...] padded with ``fill``."""
    rows = [np.asarray(r) for r in rows]
    shape = rows[0].shape[1:] if rows else ()
    out = np.full((len(rows), max(width, 1)) + shape, fill, np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:width]
    return out


def draw_ground_truth_and_detections(examples, detections, class_names, save_path):
    """Top row: ground truth; bottom row: the detections (score >= 0.5) on the same images."""
    if not examples:
        return None
    images = np.stack([e["image"] for e in examples])
    kept = [{k: v[d["scores"] >= 0.5] for k, v in d.items()} for d in detections]
    width = max([len(e["classes"]) for e in examples] + [len(d["classes"]) for d in kept] + [1])
    boxes = np.concatenate([_pad([e["boxes"] for e in examples], width, 0.0),
                            _pad([d["boxes"] for d in kept], width, 0.0)])
    classes = np.concatenate([_pad([e["classes"] for e in examples], width, -1),
                              _pad([d["classes"] for d in kept], width, -1)]).astype(np.int32)
    scores = np.concatenate([_pad([np.ones(len(e["classes"])) for e in examples], width, 0.0),
                             _pad([d["scores"] for d in kept], width, 0.0)])
    titles = ["ground truth"] * len(examples) + ["detections (score >= 0.5)"] * len(examples)
    return viz.show_detections(np.concatenate([images, images]), boxes, classes, scores=scores,
                               class_names=class_names, cols=len(examples), save_path=save_path,
                               titles=titles)


def draw_proposals(model, examples, save_path, count=4):
    """RPN proposals before NMS (top 50) beside the proposals after NMS (top 20)."""
    import matplotlib.pyplot as plt  # matplotlib picks a headless backend by itself

    examples = examples[:count]
    if not examples:
        return None
    images = np.stack([e["image"] for e in examples])
    out = model.propose(images, training=False)
    figure, axes = plt.subplots(2, len(examples), figsize=(2.8 * len(examples), 5.8),
                                squeeze=False)
    for i in range(len(examples)):
        for row, (boxes, title) in enumerate([
                (out["pre_nms_boxes"][i, :50].numpy(), "before NMS (top 50)"),
                (out["proposals"][i, :min(20, int(out["num_proposals"][i]))].numpy(),
                 "after NMS (top 20)")]):
            ax = axes[row, i]
            ax.imshow(np.clip(images[i], 0, 1))
            viz.draw_boxes(ax, boxes, color="yellow")
            viz.draw_boxes(ax, examples[i]["boxes"], color="lime")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure


# ----------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------
def main(argv=None):
    config = common_config.parse_config(Config, argv)
    keras.utils.set_random_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    common_config.save_config(config, out)
    info = common_data.get_info(config.dataset, data_dir=config.data_dir or None,
                                task="detection")
    num_classes, class_names = info.num_classes, tuple(info.class_names)
    print(f"Faster R-CNN on {config.dataset} ({num_classes} classes), backbone {config.backbone}, "
          f"{config.image_size}px, schedule {config.schedule}, out {out}")

    start = time.perf_counter()
    train_batches, val_batches, val_examples = make_datasets(config)
    print(f"data ready in {time.perf_counter() - start:.1f} s "
          f"({len(val_examples)} validation images)")
    model = build_model(config, num_classes)
    print(f"model: {model.count_params():,} parameters, feature map {model.feature_size}, "
          f"{model.anchors.shape[0]} anchors")

    state = train(model, config, train_batches, val_batches, val_examples, num_classes, out)
    model_path = out / "faster_rcnn.keras"
    model.save(model_path)

    # Evaluation on the whole validation split, with our evaluate.py and pycocotools.
    eval_start = time.perf_counter()
    detections = run_detection(model, val_examples, config.batch_size)
    ground_truth = ground_truth_list(val_examples)
    result = evaluate.evaluate_detections(ground_truth, detections, num_classes=num_classes)
    gt_path, det_path = out / "val_ground_truth.json", out / "val_detections.json"
    evaluate.to_coco_json(ground_truth, detections,
                          [(config.image_size, config.image_size)] * len(ground_truth),
                          class_names, gt_path=gt_path, det_path=det_path)
    coco = evaluate.coco_map_with_pycocotools(str(gt_path), str(det_path))
    evaluate.plot_pr_curves(ground_truth, detections, class_names=class_names,
                            num_classes=num_classes, save_path=out / "pr_curves.png",
                            title="Faster R-CNN, validation (IoU 0.5)")
    draw_ground_truth_and_detections(val_examples[:4], detections[:4], class_names,
                                     out / "detections.png")
    draw_proposals(model, val_examples, out / "proposals.png")

    metrics = {
        "val_map50": float(result["map50"]), "val_map": float(result["map"]),
        "val_voc_map50": float(result["voc_map50"]), "val_map75": float(result["map75"]),
        "pycocotools_map50": float(coco["map50"]), "pycocotools_map": float(coco["map"]),
        "train_seconds": round(float(state["train_seconds"]), 1),
        "epochs": int(state.get("epochs_total", 0)),
        "planned_epochs": int(sum(epochs for _, epochs in stage_plan(config))),
        "schedule": config.schedule, "eval_seconds": round(time.perf_counter() - eval_start, 1),
        "val_images": len(val_examples),
    }
    common_config.write_metrics(metrics, out)
    print(f"\nSummary: val mAP@0.5 {metrics['val_map50']:.4f} (pycocotools "
          f"{metrics['pycocotools_map50']:.4f}), mAP@[.5:.95] {metrics['val_map']:.4f} "
          f"(pycocotools {metrics['pycocotools_map']:.4f}), training "
          f"{metrics['train_seconds']:.0f} s for {metrics['epochs']} epochs. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
