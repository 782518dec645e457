"""Train Mask R-CNN on the embedded shapes scenes: a box, a class and a mask for every object.

He, Gkioxari, Dollár and Girshick 2017, "Mask R-CNN", on chapter 5's Faster R-CNN
(``ch06_segmentation/mask_rcnn.py``). With no arguments this script trains on 4000 128x128
``shapes`` scenes with their instance masks (ResNet-small backbone at stride 8, RoIAlign 7x7
box head and 14x14 mask head, approximate joint training) on a CPU within its 15-minute time
budget, then evaluates on the held-out validation split:

* boxes: VOC / COCO mAP with ``ch05_detection/evaluate.py``, cross-checked with pycocotools
  ``bbox`` (``val_map50``, ``val_map``, ``val_pycocotools_*``);
* masks: pycocotools ``segm`` on RLE-encoded masks (``val_mask_map50``, ``val_mask_map`` =
  mAP@[.5:.95], ``val_mask_map75``);
* semantic versus instance: how many validation objects the instances recover, against the
  connected components of a semantic mask (the ground truth's by default, a stand-in for a
  perfect U-Net; ``--semantic-model`` takes a trained ``train_unet.py`` model instead).

Run from the repo root::

    python ch06_segmentation/train_mask_rcnn.py            # the default run
    python ch06_segmentation/train_mask_rcnn.py --fast     # seconds, tiny sizes
    python ch06_segmentation/train_mask_rcnn.py --semantic-model runs/train_unet/model.keras
    python ch06_segmentation/train_mask_rcnn.py --help     # every option and its default

Everything around ``fit`` is ``common/training.py`` (re-running with the same ``--out``
resumes; a finished run is evaluated again, not retrained); data, box evaluation and the
detections picture are ``ch05_detection/detection_run.py``'s. Output in ``--out`` (default
``runs/train_mask_rcnn/``): ``config.json``, ``metrics.json``, ``mask_rcnn.keras`` (load it with
``ch06_segmentation.load_model``), COCO JSON files (``val_ground_truth.json`` /
``val_detections.json`` with boxes, ``val_ground_truth_segm.json`` / ``val_segm_detections.json``
with RLE ``segmentation``), ``masks.png`` (ground-truth instances beside predicted ones),
``semantic_vs_instance.png``, ``detections.png``, ``pr_curves.png``, ``history.png``, ``logs/``
and ``checkpoint/``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ch05_detection import anchors as anchor_ops
from ch05_detection import detection_run
from ch05_detection.detector import load_backbone_weights
from ch06_segmentation import mask_rcnn
from common import data as common_data
from common import training

SEMANTIC_STAND_IN = ("ground-truth semantic mask (the instances merged by class): a stand-in "
                     "for a perfect U-Net")


@dataclass
class Config(detection_run.DetectionConfig):
    """Train Mask R-CNN (He et al. 2017) and evaluate boxes and masks on the validation split."""

    dataset: str = field(default="shapes", metadata={
        "help": "shapes, or a folder with a COCO JSON whose annotations have 'segmentation' "
                "(polygons or RLE)"})
    output_stride: int = field(default=8, metadata={"help": "backbone stride", "choices": (8, 16)})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=16, metadata={"help": "images per step, over all replicas"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak Adam learning rate"})
    warmup_epochs: float = field(default=0.8, metadata={"help": "linear warm-up over this many epochs"})
    rois_per_image: int = field(default=64, metadata={
        "help": "sampled RoIs per image (a quarter foreground; the mask loss uses those)"})
    mask_channels: int = field(default=32, metadata={
        "help": "channels of the mask head's convolutions (256 in the paper)"})
    mask_feature_channels: int = field(default=32, metadata={
        "help": "1x1 reduction of the feature map before the mask RoIAlign (0 = none)"})
    max_detections: int = field(default=100, metadata={"help": "detections (and masks) per image"})
    max_boxes: int = field(default=8, metadata={
        "help": "objects per image kept in a batch (shapes has at most 4; each one carries an "
                "image-sized mask, so fewer rows make the batches lighter)"})
    semantic_model: str = field(default="", metadata={
        "help": "a train_unet.py model.keras for the semantic-vs-instance count ('' = the "
                "ground-truth semantic mask, a perfect semantic segmenter)"})
    time_budget_minutes: float = field(default=14.5, metadata={
        "help": "end after the last epoch that fits (LR decay shortened to match; 0 = off)"})
    out: str = field(default="runs/train_mask_rcnn", metadata={"help": "output folder; re-run to resume"})

    FAST: ClassVar[dict] = {"epochs": 1, "image_size": 64, "batch_size": 4, "num_train_examples": 16,
                            "num_val_examples": 8, "backbone_width": 8, "rois_per_image": 16,
                            "mask_channels": 8, "mask_feature_channels": 8, "max_detections": 20,
                            "warmup_epochs": 0.5, "eval_every": 1, "time_budget_minutes": 0.0}


def check_config(config):
    """ValueErrors naming the flag, before any data is loaded."""
    detection_run.check_detection_config(config)
    for name in ("rois_per_image", "mask_channels", "max_detections"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.mask_feature_channels < 0:
        raise ValueError(f"--mask-feature-channels must be >= 0 (0 = none), got "
                         f"{config.mask_feature_channels}")
    if config.dataset != "shapes" and not Path(config.dataset).is_dir():
        raise ValueError(f"--dataset {config.dataset!r} has no instance masks: use 'shapes' or a "
                         "folder with a COCO JSON whose annotations have 'segmentation'")
    if config.semantic_model and not Path(config.semantic_model).is_file():
        raise ValueError(f"--semantic-model: no file {config.semantic_model!r} (expected the "
                         "model.keras that ch06_segmentation/train_unet.py writes)")


# ----------------------------------------------------------------------------------
# model and training
# ----------------------------------------------------------------------------------
def build_model(config, num_classes, class_names):
    model = mask_rcnn.MaskRCNN(
        num_classes, class_names=tuple(class_names), image_size=(config.image_size, config.image_size),
        backbone=config.backbone, output_stride=config.output_stride,
        backbone_options=detection_run.backbone_options(config),
        anchor_scales=anchor_ops.anchor_scales_for(config.image_size),
        rois_per_image=config.rois_per_image,
        rpn_min_size=2.0 * config.image_size / anchor_ops.BASE_IMAGE_SIZE,
        mask_channels=config.mask_channels, mask_feature_channels=config.mask_feature_channels,
        max_detections=config.max_detections, flip_augment=config.flip, seed=config.seed,
        name="mask_rcnn")
    if config.backbone_weights:
        copied = load_backbone_weights(model, config.backbone_weights)
        print(f"backbone initialised from {config.backbone_weights} ({len(copied)} layers)")
    return model


def train(run, model, train_examples, num_train, val_examples, num_classes):
    """Approximate joint training (one stage, resumable); a finished run is only restored."""
    config = run.config
    steps_per_epoch = detection_run.steps_per_epoch(config, num_train)
    if run.stage_finished("main", config.epochs):
        run.restore(model, stage=None)  # evaluate the finished run's weights, not fresh ones
        return
    with run.strategy.scope():
        # Gradient clipping keeps the first steps (random proposals) from exploding.
        model.compile(optimizer=run.optimizer(steps_per_epoch, "adam", clipnorm=10.0, alpha=0.02),
                      jit_compile=run.no_jit_compile(
                          "Mask R-CNN's mask targets use tf.image.crop_and_resize, which has no XLA kernel"))
    # Trace detect() now, for any batch size (two sizes give the batch-free graph): the mAP
    # callback and the final evaluation reuse this graph instead of tracing mid-run.
    for count in (1, 2):
        model.detect(np.stack([val_examples[0]["image"]] * count))
    callbacks = []
    if config.eval_every:
        callbacks.append(detection_run.MapCallback(val_examples[:200], num_classes, config.eval_every))
    names = {"loss": "loss", "rpn cls": "rpn_class_loss", "rpn box": "rpn_box_loss",
             "head cls": "head_class_loss", "head box": "head_box_loss", "mask": "mask_loss",
             "val mAP50": "val_map50"}
    run.fit(model, lambda first_epoch: detection_run.train_batches(
        config, train_examples, first_epoch, config.epochs, with_masks=True),
        steps_per_epoch, log_keys=names, callbacks=callbacks)


# ----------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------
def semantic_masks_from_model(path, examples, batch_size=16):
    """Argmax masks ``[H, W]`` of a ``train_unet.py`` model for the examples' images (resized to
    the model's input and back, nearest neighbour for the labels)."""
    import tensorflow as tf

    import ch06_segmentation

    model = ch06_segmentation.load_model(path, compile=False)
    height, width = model.input_shape[1:3]
    masks = []
    for start in range(0, len(examples), batch_size):
        images = np.stack([e["image"] for e in examples[start:start + batch_size]])
        size = images.shape[1:3]
        probabilities = model.predict(tf.image.resize(images, (height, width)), verbose=0)
        labels = np.argmax(probabilities, axis=-1).astype(np.int32)[..., None]
        labels = tf.image.resize(labels, size, method="nearest").numpy()[..., 0]
        masks.extend(labels)
    return masks


def evaluate_masks(model, val_examples, config, out, class_names):
    """Masks on the whole validation split: pycocotools ``segm`` on RLE masks, the
    semantic-vs-instance count and the pictures. Returns the metrics."""
    start = time.perf_counter()
    print(f"mask evaluation on {len(val_examples)} validation images ...")
    detections = mask_rcnn.run_mask_detection(model, val_examples, config.batch_size, progress=True)
    ground_truth = [{"boxes": e["boxes"], "classes": e["classes"], "masks": e["masks"]}
                    for e in val_examples]
    gt_path, det_path = out / "val_ground_truth_segm.json", out / "val_segm_detections.json"
    mask_rcnn.coco_mask_json(ground_truth, detections, class_names, gt_path=gt_path,
                             det_path=det_path)
    segm = mask_rcnn.coco_mask_map(gt_path, det_path, "segm")
    boxes = mask_rcnn.coco_mask_map(gt_path, det_path, "bbox")

    if config.semantic_model:
        semantic, source = (semantic_masks_from_model(config.semantic_model, val_examples,
                                                      config.batch_size),
                            f"U-Net {config.semantic_model}")
    else:
        semantic, source = None, SEMANTIC_STAND_IN
    counts = mask_rcnn.compare_semantic_and_instance(val_examples, detections, len(class_names),
                                                     semantic_masks=semantic)
    mask_rcnn.show_instances(val_examples[:4], detections[:4], class_names, out / "masks.png")
    touching = [i for i, e in enumerate(val_examples)
                if mask_rcnn.touching_same_class(e["masks"], e["classes"])]
    if touching or val_examples:
        index = touching[0] if touching else 0
        mask_rcnn.draw_semantic_vs_instance(
            val_examples[index], detections[index], len(class_names),
            None if semantic is None else semantic[index], class_names,
            save_path=out / "semantic_vs_instance.png")
    return {
        "val_mask_map50": segm["map50"], "val_mask_map": segm["map"], "val_mask_map75": segm["map75"],
        "val_segm_file_bbox_map50": boxes["map50"],
        "semantic_source": source,
        **{f"val_{key}": int(value) for key, value in counts.items()},
        "mask_eval_seconds": round(time.perf_counter() - start, 1),
    }


# ----------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------
def main(argv=None):
    run = training.start_run(Config, argv, check=check_config, description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    info = common_data.get_info(config.dataset, data_dir=config.data_dir or None, task="detection")
    num_classes, class_names = info.num_classes, tuple(info.class_names)
    print(f"Mask R-CNN on {config.dataset} ({num_classes} classes), backbone {config.backbone}, "
          f"{config.image_size}px, {run.replicas} replica(s), out {out}")

    start = time.perf_counter()
    train_examples, num_train, val_examples = detection_run.make_datasets(config, with_masks=True)
    print(f"data ready in {time.perf_counter() - start:.1f} s ({num_train} training, "
          f"{len(val_examples)} validation images, with instance masks)")
    with run.strategy.scope():
        model = build_model(config, num_classes, class_names)
    print(f"model: {model.count_params():,} parameters, feature map {model.feature_size}, "
          f"{model.anchors.shape[0]} anchors, {model.mask_size}x{model.mask_size} masks")

    train(run, model, train_examples, num_train, val_examples, num_classes)
    model.save(out / "mask_rcnn.keras")

    results = detection_run.evaluate_and_save(model, val_examples, config, out, class_names,
                                              title="Mask R-CNN")
    results.update(evaluate_masks(model, val_examples, config, out, class_names))
    results["train_images_per_second"] = detection_run.train_images_per_second(
        run, detection_run.steps_per_epoch(config, num_train) * config.batch_size)
    metrics = run.finish({**results, "model": "mask_rcnn", "planned_epochs": config.epochs,
                          "num_train_examples": num_train},
                         model=model, history_keys=["loss", "mask_loss", "map50"])
    print(f"\nSummary: val mask mAP@0.5 {metrics['val_mask_map50']:.4f}, mask mAP@[.5:.95] "
          f"{metrics['val_mask_map']:.4f}; box mAP@0.5 {metrics['val_map50']:.4f} (pycocotools "
          f"{metrics['val_pycocotools_map50']:.4f}), box mAP@[.5:.95] {metrics['val_map']:.4f}; "
          f"objects recovered: instances {metrics['val_instance_recovered']} vs semantic "
          f"components {metrics['val_semantic_recovered']} of {metrics['val_objects']}; training "
          f"{metrics['train_seconds']:.0f} s for {metrics['epochs']} epochs. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
