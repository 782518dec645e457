"""Train any one-stage detector of chapter 5 and evaluate it: YOLO, YOLO with anchors, SSD,
RetinaNet, CenterNet, DETR.

Every model follows the detector interface (``detector.py``) and every script shares the data,
the evaluation and the pictures (``detection_run.py``), so the runs of this script and of
``train_faster_rcnn.py`` fill one table: parameters, val mAP@0.5, mAP@[.5:.95], training
seconds and images/s, inference ms/image::

    python ch05_detection/train_detector.py --model ssd                # the default run
    python ch05_detection/train_detector.py --model yolo --fast        # seconds, tiny sizes
    python ch05_detection/train_detector.py --model yolo_anchors --anchors 5
    python ch05_detection/train_detector.py --model retinanet --classification-loss cross_entropy
    python ch05_detection/train_detector.py --model centernet --dataset voc/2007 --image-size 256
    python ch05_detection/train_detector.py --model detr --num-queries 25

``--epochs``, ``--learning-rate``, ``--batch-size``, ``--warmup-epochs`` and
``--time-budget-minutes`` default to the model's own defaults (``TRAIN_DEFAULTS`` in its module,
printed at the start of a run and saved in ``config.json``); pass them to override. A model's
``TRAIN_DEFAULTS`` may also name its optimizer (``optimizer``, ``weight_decay``, ``clipnorm``;
default Adam clipped at norm 10): DETR trains with AdamW clipped at 0.1, as its paper.

Output in ``--out`` (default ``runs/train_detector_<model>/``): ``config.json``, ``metrics.json``,
``val_ground_truth.json`` and ``val_detections.json`` (COCO format), ``detections.png``,
``pr_curves.png``, ``history.png``, ``<model>.keras`` (load it with
``ch05_detection.load_model``; ``predict.py --model`` takes it), ``logs/`` and ``checkpoint/``.
Re-running with the same ``--out`` resumes exactly.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ch05_detection import detection_run
from ch05_detection.detector import load_backbone_weights
from common import data as common_data
from common import training

# --model name -> the module that builds it (each has TRAIN_DEFAULTS and from_options).
MODELS = {
    "yolo": "ch05_detection.yolo",
    "yolo_anchors": "ch05_detection.yolo",
    "ssd": "ch05_detection.ssd",
    "retinanet": "ch05_detection.retinanet",
    "centernet": "ch05_detection.centernet",
    "detr": "ch05_detection.detr",
}
# Options whose default is the model's (None on the command line = "the model's default").
MODEL_DEFAULT_OPTIONS = ("epochs", "learning_rate", "batch_size", "warmup_epochs",
                         "time_budget_minutes")
MODEL_DISPLAY_NAMES = {"yolo": "YOLO v1", "yolo_anchors": "YOLO with anchors", "ssd": "SSD",
                       "retinanet": "RetinaNet", "centernet": "CenterNet", "detr": "DETR"}
# The optimizer unless the model's TRAIN_DEFAULTS names another (Adam, global norm clipped at 10).
OPTIMIZER_DEFAULTS = {"optimizer": "adam", "weight_decay": None, "clipnorm": 10.0}


@dataclass
class Config(detection_run.GeometryAugmentOptions, detection_run.DetectionConfig):
    """Train a one-stage detector (YOLO, SSD, RetinaNet, CenterNet, DETR) and evaluate it."""

    model: str = field(default="ssd", metadata={"help": "the detector", "choices": tuple(MODELS)})
    epochs: Optional[int] = field(default=None, metadata={
        "help": "passes over the training images (default: the model's)"})
    batch_size: Optional[int] = field(default=None, metadata={
        "help": "images per step, over all replicas (default: the model's)"})
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "peak learning rate (default: the model's)"})
    warmup_epochs: Optional[float] = field(default=None, metadata={
        "help": "linear warm-up over this many epochs (default: the model's)"})
    time_budget_minutes: Optional[float] = field(default=None, metadata={
        "help": "end after the last epoch that fits (LR decay shortened to match; 0 = off; "
                "default: the model's)"})
    anchors: int = field(default=5, metadata={
        "help": "yolo_anchors: anchor shapes found by k-means on the training boxes"})
    classification_loss: str = field(default="focal", metadata={
        "help": "retinanet: focal loss or plain cross-entropy (the paper's ablation)",
        "choices": ("focal", "cross_entropy")})
    num_queries: int = field(default=16, metadata={
        "help": "detr: object queries (more than the most objects in an image)"})
    paper_detr: bool = field(default=False, metadata={
        "help": "detr: the paper's model (learned queries attending everywhere, no encoder "
                "loss) instead of anchor queries with local attention and an encoder loss"})
    max_detections: int = field(default=100, metadata={"help": "detections kept per image"})
    out: str = field(default="", metadata={
        "help": "output folder; re-run to resume ('' = runs/train_detector_<model>)"})

    FAST: ClassVar[dict] = {"epochs": 1, "image_size": 64, "batch_size": 4, "num_train_examples": 16,
                            "num_val_examples": 8, "backbone_width": 8, "warmup_epochs": 0.5,
                            "eval_every": 1, "time_budget_minutes": 0.0}


def model_module(name):
    """The module of ``--model name`` (imported on demand)."""
    return importlib.import_module(MODELS[name])


def model_defaults(name):
    """The model's defaults of ``MODEL_DEFAULT_OPTIONS``."""
    module = model_module(name)
    defaults = getattr(module, "TRAIN_DEFAULTS_BY_MODEL", {}).get(name) or module.TRAIN_DEFAULTS
    missing = [key for key in MODEL_DEFAULT_OPTIONS if key not in defaults]
    if missing:
        raise RuntimeError(f"{MODELS[name]}.TRAIN_DEFAULTS lacks {missing}")
    return defaults


def check_config(config):
    """Fill the model's defaults into the options left out, then ValueErrors naming the flag."""
    if not config.out:
        config.out = f"runs/train_detector_{config.model}"
    defaults = model_defaults(config.model)
    for key in MODEL_DEFAULT_OPTIONS:
        if getattr(config, key) is None:
            setattr(config, key, type(defaults[key])(defaults[key]))
    detection_run.check_detection_config(config)
    if config.anchors < 1:
        raise ValueError(f"--anchors must be >= 1, got {config.anchors}")
    if config.num_queries < 1:
        raise ValueError(f"--num-queries must be >= 1, got {config.num_queries}")
    if config.max_detections < 1:
        raise ValueError(f"--max-detections must be >= 1, got {config.max_detections}")


def build_model(config, num_classes, class_names, train_boxes):
    model = model_module(config.model).from_options(config, num_classes, tuple(class_names),
                                                    train_boxes)
    if config.backbone_weights:
        copied = load_backbone_weights(model, config.backbone_weights)
        print(f"backbone initialised from {config.backbone_weights} ({len(copied)} layers)")
    return model


def main(argv=None):
    run = training.start_run(Config, argv, check=check_config, description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    info = common_data.get_info(config.dataset, data_dir=config.data_dir or None, task="detection")
    num_classes, class_names = info.num_classes, tuple(info.class_names)
    title = MODEL_DISPLAY_NAMES[config.model]
    print(f"{title} on {config.dataset} ({num_classes} classes), backbone {config.backbone}, "
          f"{config.image_size}px, {config.epochs} epochs of batch {config.batch_size}, "
          f"learning rate {config.learning_rate}, {run.replicas} replica(s), out {out}")

    start = time.perf_counter()
    train, num_train, val_examples = detection_run.make_datasets(config)
    train_boxes = detection_run.training_boxes(train)
    print(f"data ready in {time.perf_counter() - start:.1f} s ({num_train} training images with "
          f"{len(train_boxes)} boxes, {len(val_examples)} validation images)")
    steps = detection_run.steps_per_epoch(config, num_train)
    with run.strategy.scope():
        model = build_model(config, num_classes, class_names, train_boxes)
        optimizer = {**OPTIMIZER_DEFAULTS, **{key: value for key, value in
                                              model_defaults(config.model).items()
                                              if key in OPTIMIZER_DEFAULTS}}
        model.compile(optimizer=run.optimizer(steps, optimizer["optimizer"],
                                              weight_decay=optimizer["weight_decay"],
                                              clipnorm=optimizer["clipnorm"], alpha=0.02),
                      jit_compile=run.no_jit_compile(
                          f"the {config.model} step's target assignment and NMS do not compile with XLA"))
    print(f"model: {model.count_params():,} parameters; optimizer {optimizer['optimizer']} "
          f"(weight decay {optimizer['weight_decay']}, gradient norm clipped at "
          f"{optimizer['clipnorm']})")

    callbacks = []
    if config.eval_every:
        callbacks.append(detection_run.MapCallback(val_examples[:200], num_classes,
                                                   config.eval_every))
    log_keys = {name.replace("_loss", "").replace("_", " "): name for name in model.LOSS_NAMES}
    log_keys["val mAP50"] = "val_map50"
    run.fit(model, lambda first_epoch: detection_run.train_batches(config, train, first_epoch,
                                                                   config.epochs),
            steps, log_keys=log_keys, callbacks=callbacks)
    model.save(out / f"{config.model}.keras")

    results = detection_run.evaluate_and_save(model, val_examples, config, out, class_names, title)
    results["train_images_per_second"] = detection_run.train_images_per_second(
        run, steps * config.batch_size)
    metrics = run.finish({**results, "model": config.model, "num_train_examples": num_train},
                         model=model, history_keys=["loss", "map50"])
    print(f"\nSummary: {title}: val mAP@0.5 {metrics['val_map50']:.4f} (pycocotools "
          f"{metrics['val_pycocotools_map50']:.4f}), mAP@[.5:.95] {metrics['val_map']:.4f}, "
          f"training {metrics['train_seconds']:.0f} s for {metrics['epochs']} epochs "
          f"({metrics['train_images_per_second']} images/s), inference "
          f"{metrics['inference_ms_batch1']} ms/image at batch 1. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
