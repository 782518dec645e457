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
from typing import ClassVar

import numpy as np

from ch05_detection import anchors as anchor_ops
from ch05_detection import detection_run
from ch05_detection.detector import load_backbone_weights
from ch05_detection.faster_rcnn import ALTERNATING_SCHEDULE, FasterRCNN

from common import data as common_data
from common import training, viz

SHARED_STAGES = ("rpn_finetune", "detector_finetune")  # steps 3 and 4: one backbone for both parts


@dataclass
class Config(detection_run.GeometryAugmentOptions, detection_run.DetectionConfig):
    """Train Faster R-CNN (Ren et al. 2015) and evaluate it on the validation split."""

    output_stride: int = field(default=8, metadata={"help": "backbone stride", "choices": (8, 16)})
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
    rois_per_image: int = field(default=64, metadata={"help": "sampled RoIs per image (a quarter foreground)"})
    sync_batchnorm: bool = field(default=False, metadata={
        "help": "batch statistics over all replicas (BatchNormalization(synchronized=True))"})
    time_budget_minutes: float = field(default=12.5, metadata={
        "help": "end after the last epoch that fits (LR decay shortened to match; 0 = off)"})
    out: str = field(default="runs/train_faster_rcnn", metadata={"help": "output folder; re-run to resume"})

    FAST: ClassVar[dict] = {"epochs": 1, "image_size": 64, "batch_size": 4, "num_train_examples": 16,
                            "num_val_examples": 8, "backbone_width": 8, "rois_per_image": 16,
                            "warmup_epochs": 0.5, "eval_every": 1, "time_budget_minutes": 0.0}


def check_config(config):
    """ValueErrors naming the flag, before any data is loaded."""
    detection_run.check_detection_config(config)
    if config.rois_per_image < 1:
        raise ValueError(f"--rois-per-image must be >= 1, got {config.rois_per_image}")


# ----------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------
def build_model(config, num_classes, class_names):
    scales = anchor_ops.anchor_scales_for(config.image_size)
    model = FasterRCNN(
        num_classes, class_names=tuple(class_names), image_size=(config.image_size, config.image_size),
        backbone=config.backbone, output_stride=config.output_stride,
        backbone_options=detection_run.backbone_options(config),
        synchronized_batch_norm=config.sync_batchnorm, schedule=config.schedule,
        anchor_scales=scales, roi_op=config.roi_op, head_type=config.head_type,
        rois_per_image=config.rois_per_image, rpn_min_size=2.0 * config.image_size / anchor_ops.BASE_IMAGE_SIZE,
        flip_augment=config.flip, seed=config.seed, name="faster_rcnn")
    if config.backbone_weights:
        copied = load_backbone_weights(model, config.backbone_weights)
        print(f"backbone initialised from {config.backbone_weights} ({len(copied)} layers)")
    return model


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
    steps_per_epoch = detection_run.steps_per_epoch(config, num_train)
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
                          # auto: off, XLA measured slower on the CPU (bench/bench_faster_rcnn_xla.py)
                          jit_compile=run.jit_compile_for("faster_rcnn"))
        callbacks = []
        if config.eval_every and stage in ("joint", "detector", "detector_finetune"):
            callbacks.append(detection_run.MapCallback(eval_subset, num_classes, config.eval_every))
        # Each remaining stage gets an equal share of what is left of the budget.
        spent = run.state["train_seconds"]
        share = (run.state["stage_seconds"].get(stage, 0.0)
                 + max(0.0, budget - spent) / (len(plan) - index)) if budget else 0.0
        run.fit(model, lambda first_epoch, e=epochs: detection_run.train_batches(config, train, first_epoch, e),
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
    train_examples, num_train, val_examples = detection_run.make_datasets(config)
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
    results = detection_run.evaluate_and_save(model, val_examples, config, out, class_names,
                                              title="Faster R-CNN")
    draw_proposals(model, val_examples, out / "proposals.png")
    results["train_images_per_second"] = detection_run.train_images_per_second(
        run, detection_run.steps_per_epoch(config, num_train) * config.batch_size)

    metrics = run.finish({
        **results, "model": "faster_rcnn",
        "planned_epochs": int(sum(epochs for _, epochs in stage_plan(config))),
        "schedule": config.schedule, "num_train_examples": num_train,
    }, model=model, history_keys=["loss", "map50"])
    print(f"\nSummary: val mAP@0.5 {metrics['val_map50']:.4f} (pycocotools "
          f"{metrics['val_pycocotools_map50']:.4f}), mAP@[.5:.95] {metrics['val_map']:.4f} "
          f"(pycocotools {metrics['val_pycocotools_map']:.4f}), training "
          f"{metrics['train_seconds']:.0f} s for {metrics['epochs']} epochs. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
