"""Train Faster R-CNN on the embedded shapes data (or VOC / COCO / your own folder).

Ren, He, Girshick and Sun 2015, "Faster R-CNN". With no arguments this script trains
the chapter's model (ResNet-small backbone at stride 8, 9 anchors per location,
RoIAlign 7x7, a 2-layer fully connected head) on 128x128 ``shapes`` scenes with
approximate joint training, on a CPU within its 12.5-minute time budget, then evaluates
it on the held-out validation split (VOC mAP@0.5 and COCO mAP@[.5:.95], with our
``evaluate.py`` and cross-checked with pycocotools) and draws pictures.

Run from the repo root::

    python ch05_detection/train_faster_rcnn.py                 # the default run
    python ch05_detection/train_faster_rcnn.py --fast          # seconds, tiny sizes
    python ch05_detection/train_faster_rcnn.py --schedule alternating   # the paper's 4 steps
    python ch05_detection/train_faster_rcnn.py --backbone-weights runs/train_classifier/model.keras
    python ch05_detection/train_faster_rcnn.py --dataset voc/2007 --backbone resnet50 \
        --image-size 512 --output-stride 16
    python ch05_detection/train_faster_rcnn.py --strategy mirrored      # all local GPUs

Everything around ``fit`` is ``common/training.py``: re-running with the same ``--out``
resumes exactly where a killed run stopped (weights, Adam's moments, stage, data order),
and a finished run is not trained again. Output in ``--out`` (default
``runs/train_faster_rcnn/``): ``config.json``, ``metrics.json``,
``val_ground_truth.json`` and ``val_detections.json`` (COCO format),
``detections.png`` (ground truth beside detections), ``proposals.png`` (RPN proposals
before and after NMS), ``pr_curves.png``, ``history.png``, ``faster_rcnn.keras`` (load it
with ``ch05_detection.load_model``), ``logs/`` (TensorBoard) and ``checkpoint/``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from ch04_classification.models import BACKBONE_NAMES
from ch05_detection import anchors as anchor_ops
from ch05_detection import evaluate
from ch05_detection.detector import load_backbone_weights
from ch05_detection.faster_rcnn import ALTERNATING_SCHEDULE, FasterRCNN

SHARED_STAGES = ("rpn_finetune", "detector_finetune")  # steps 3 and 4: one backbone for both parts
from common import data as common_data
from common import training, viz


@dataclass
class Config(training.TrainingConfig):
    """Train Faster R-CNN (Ren et al. 2015) and evaluate it on the validation split."""

    dataset: str = field(default="shapes", metadata={
        "help": "shapes, voc/2007, coco/2017, or a folder with COCO JSON / VOC XML"})
    data_dir: str = field(default="", metadata={
        "help": "tensorflow-datasets folder ('' = default)"})
    backbone: str = field(default="resnet_small", metadata={
        "help": "chapter-4 backbone", "choices": BACKBONE_NAMES})
    backbone_width: int = field(default=32, metadata={
        "help": "resnet_small only: channels of its first stage (doubling per stage)"})
    backbone_weights: str = field(default="", metadata={
        "help": "initialise the backbone from a chapter-4 classifier's model.keras "
                "(train_classifier.py; the paper's ImageNet start in miniature; '' = random)"})
    output_stride: int = field(default=8, metadata={"help": "backbone stride", "choices": (8, 16)})
    image_size: int = field(default=128, metadata={"help": "square input size in pixels (>= 64, a multiple of 32)"})
    roi_op: str = field(default="align", metadata={
        "help": "RoI feature op", "choices": ["align", "pool"]})
    schedule: str = field(default="joint", metadata={
        "help": "approximate joint training or the paper's 4-step alternating training",
        "choices": ["joint", "alternating"]})
    head_type: str = field(default="dense", metadata={
        "help": "detection head", "choices": ["dense", "conv"]})
    epochs: int = field(default=12, metadata={
        "help": "training epochs (alternating: per step, rounded up from epochs / 4)"})
    batch_size: int = field(default=16, metadata={"help": "images per step, over all replicas"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak Adam learning rate"})
    warmup_epochs: float = field(default=0.8, metadata={"help": "linear warm-up over this many epochs"})
    num_train_examples: int = field(default=4000, metadata={"help": "training images (0 = all)"})
    num_val_examples: int = field(default=500, metadata={"help": "validation images (0 = all)"})
    max_boxes: int = field(default=32, metadata={"help": "objects per image kept in a batch"})
    rois_per_image: int = field(default=64, metadata={"help": "sampled RoIs per image (a quarter foreground)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips in the train step"})
    sync_batchnorm: bool = field(default=False, metadata={
        "help": "batch statistics over all replicas (BatchNormalization(synchronized=True))"})
    time_budget_minutes: float = field(default=12.5, metadata={
        "help": "end after the last epoch that fits (LR decay shortened to match; 0 = off)"})
    eval_every: int = field(default=2, metadata={
        "help": "val mAP@0.5 on a subset every N epochs (0 = off)"})
    out: str = field(default="runs/train_faster_rcnn", metadata={"help": "output folder; re-run to resume"})

    FAST: ClassVar[dict] = {"epochs": 1, "image_size": 64, "batch_size": 4, "num_train_examples": 16,
                            "num_val_examples": 8, "backbone_width": 8, "rois_per_image": 16,
                            "warmup_epochs": 0.5, "eval_every": 1, "time_budget_minutes": 0.0}


def check_config(config):
    """ValueErrors naming the flag, before any data is loaded."""
    if config.image_size < 64 or config.image_size % 32:
        raise ValueError(f"--image-size must be a multiple of 32 and >= 64, got {config.image_size}")
    for name in ("num_train_examples", "num_val_examples"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got {getattr(config, name)}")
    for name in ("max_boxes", "rois_per_image", "backbone_width"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {config.eval_every}")
    if config.backbone_weights and not Path(config.backbone_weights).is_file():
        raise ValueError(f"--backbone-weights: no file {config.backbone_weights!r} (expected the "
                         f"model.keras that ch04_classification/train_classifier.py writes)")


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


def _to_uint8(example):
    example = dict(example)
    example["image"] = tf.cast(tf.round(tf.clip_by_value(example["image"], 0, 1) * 255), tf.uint8)
    return example


def _to_float(example):
    example = dict(example)
    example["image"] = tf.cast(example["image"], tf.float32) / 255.0
    return example


def make_datasets(config):
    """(training examples cached as uint8, their count, list of validation examples as NumPy)."""
    # 4000 x 128² x 3 floats would be ~800 MB: cache the generated scenes as uint8.
    train = load_split(config, "train", config.num_train_examples).map(_to_uint8).cache()
    progress = keras.utils.Progbar(config.num_train_examples or None, unit_name="image")
    count = 0
    for count, _ in enumerate(train, start=1):  # fills the cache once, with progress
        if count % 100 == 0:
            progress.update(count)
    progress.update(count, finalize=True)
    val_examples = [{k: v.numpy() for k, v in example.items()}
                    for example in load_split(config, "validation", config.num_val_examples)]
    return train, count, val_examples


def train_batches(config, train, first_epoch, epochs):
    """Padded batches for epochs [first_epoch, epochs), each epoch's order fixed by (seed, epoch)."""
    return training.epoch_batches(
        train, config.batch_size, first_epoch, epochs, seed=config.seed, shuffle_buffer=2048,
        batch_fn=lambda examples, epoch: common_data.batch_detection(
            examples.map(_to_float), config.batch_size, config.max_boxes, drop_remainder=True))


# ----------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------
def build_model(config, num_classes, class_names):
    backbone_options = {}
    if config.backbone == "resnet_small":
        width = config.backbone_width
        backbone_options = {"filters": [width, 2 * width, 4 * width, 8 * width]}
    scales = anchor_ops.anchor_scales_for(config.image_size)
    model = FasterRCNN(
        num_classes, class_names=tuple(class_names), image_size=(config.image_size, config.image_size),
        backbone=config.backbone, output_stride=config.output_stride, backbone_options=backbone_options,
        synchronized_batch_norm=config.sync_batchnorm, schedule=config.schedule,
        anchor_scales=scales, roi_op=config.roi_op, head_type=config.head_type,
        rois_per_image=config.rois_per_image, rpn_min_size=2.0 * config.image_size / anchor_ops.BASE_IMAGE_SIZE,
        flip_augment=config.flip, seed=config.seed, name="faster_rcnn")
    if config.backbone_weights:
        copied = load_backbone_weights(model, config.backbone_weights)
        print(f"backbone initialised from {config.backbone_weights} ({len(copied)} layers)")
    return model


class MapCallback(keras.callbacks.Callback):
    """Adds ``val_map50`` (VOC AP@0.5 on a validation subset) to the logs every N epochs."""

    def __init__(self, examples, num_classes, every=1):
        super().__init__()
        self.examples, self.num_classes, self.every = examples, num_classes, max(1, every)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or (epoch + 1) % self.every:
            return
        detections = evaluate.run_detection(self.model, self.examples)
        result = evaluate.evaluate_detections(evaluate.ground_truth_list(self.examples), detections,
                                              num_classes=self.num_classes)
        logs["val_map50"] = float(result["map50"])


def stage_plan(config):
    """[(stage name, epochs)] for the chosen schedule."""
    if config.schedule == "joint":
        return [("joint", config.epochs)]
    per_step = max(1, math.ceil(config.epochs / 4))
    return [(stage, per_step) for stage in ALTERNATING_SCHEDULE]


def train(run, model, train, num_train, val_examples, num_classes):
    """Run the schedule's stages on the harness (each resumable); returns nothing."""
    config = run.config
    plan = stage_plan(config)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch < 1:
        training.fail(f"{num_train} training images are fewer than one batch of --batch-size "
                      f"{config.batch_size}; lower --batch-size or add images")
    eval_subset = val_examples[:min(len(val_examples), 200)]
    names = {"loss": "loss", "rpn cls": "rpn_class_loss", "rpn box": "rpn_box_loss",
             "head cls": "head_class_loss", "head box": "head_box_loss", "val mAP50": "val_map50"}
    budget = 60.0 * config.time_budget_minutes
    trained = False
    for index, (stage, epochs) in enumerate(plan):
        if run.stage_finished(stage, epochs):
            continue  # done in an earlier run
        trained = True
        print(f"stage {index + 1}/{len(plan)}: {stage} ({epochs} epochs of {steps_per_epoch} steps)")
        model.set_training_stage(stage)
        with run.strategy.scope():
            # Gradient clipping keeps the first steps (random proposals) from exploding.
            model.compile(optimizer=run.optimizer(steps_per_epoch, "adam", epochs=epochs, clipnorm=10.0,
                                                  alpha=0.02),
                          jit_compile=False)  # NMS and the per-image sampling do not compile on the CPU
        callbacks = []
        if config.eval_every and stage in ("joint", "detector", "detector_finetune"):
            callbacks.append(MapCallback(eval_subset, num_classes, config.eval_every))
        # Each remaining stage gets an equal share of what is left of the budget.
        spent = run.state["train_seconds"]
        share = (run.state["stage_seconds"].get(stage, 0.0)
                 + max(0.0, budget - spent) / (len(plan) - index)) if budget else 0.0
        run.fit(model, lambda first_epoch, e=epochs: train_batches(config, train, first_epoch, e),
                steps_per_epoch, stage=stage, epochs=epochs, budget_seconds=share, log_keys=names,
                callbacks=callbacks,
                # Steps 3 and 4 run the RPN on the detector's backbone: re-tie the copy after loading.
                after_restore=model.share_backbone if stage in SHARED_STAGES else None)
    model.set_training_stage(plan[-1][0] if config.schedule == "alternating" else "joint")
    if not trained:  # every stage was finished by an earlier run: evaluate its weights, not fresh ones
        run.restore(model, stage=None)


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
    run = training.start_run(Config, argv, check=check_config, description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    info = common_data.get_info(config.dataset, data_dir=config.data_dir or None, task="detection")
    num_classes, class_names = info.num_classes, tuple(info.class_names)
    print(f"Faster R-CNN on {config.dataset} ({num_classes} classes), backbone {config.backbone}, "
          f"{config.image_size}px, schedule {config.schedule}, {run.replicas} replica(s), out {out}")

    start = time.perf_counter()
    train_examples, num_train, val_examples = make_datasets(config)
    print(f"data ready in {time.perf_counter() - start:.1f} s ({num_train} training, "
          f"{len(val_examples)} validation images)")
    with run.strategy.scope():
        model = build_model(config, num_classes, class_names)
    print(f"model: {model.count_params():,} parameters, feature map {model.feature_size}, "
          f"{model.anchors.shape[0]} anchors")

    train(run, model, train_examples, num_train, val_examples, num_classes)
    model_path = out / "faster_rcnn.keras"
    model.save(model_path)

    # Evaluation on the whole validation split, with our evaluate.py and pycocotools.
    eval_start = time.perf_counter()
    print(f"evaluating on {len(val_examples)} validation images ...")
    detections = evaluate.run_detection(model, val_examples, config.batch_size, progress=True)
    ground_truth = evaluate.ground_truth_list(val_examples)
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

    metrics = run.finish({
        "val_map50": float(result["map50"]), "val_map": float(result["map"]),
        "val_voc_map50": float(result["voc_map50"]), "val_map75": float(result["map75"]),
        "val_pycocotools_map50": float(coco["map50"]), "val_pycocotools_map": float(coco["map"]),
        "planned_epochs": int(sum(epochs for _, epochs in stage_plan(config))),
        "schedule": config.schedule, "eval_seconds": round(time.perf_counter() - eval_start, 1),
        "num_train_examples": num_train, "num_val_examples": len(val_examples),
    }, model=model, history_keys=["loss", "map50"])
    print(f"\nSummary: val mAP@0.5 {metrics['val_map50']:.4f} (pycocotools "
          f"{metrics['val_pycocotools_map50']:.4f}), mAP@[.5:.95] {metrics['val_map']:.4f} "
          f"(pycocotools {metrics['val_pycocotools_map']:.4f}), training "
          f"{metrics['train_seconds']:.0f} s for {metrics['epochs']} epochs. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
