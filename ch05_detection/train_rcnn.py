"""Train R-CNN or Fast R-CNN on selective-search regions and evaluate them like every detector.

Girshick et al. 2014 ("R-CNN") and Girshick 2015 ("Fast R-CNN"), the two ancestors of Faster
R-CNN (``train_faster_rcnn.py``), on the same data and with the same evaluation, so the
chapter's table can put their mAP and their seconds per image side by side::

    python ch05_detection/train_rcnn.py --variant rcnn          # the default R-CNN run
    python ch05_detection/train_rcnn.py --variant fast_rcnn     # the default Fast R-CNN run
    python ch05_detection/train_rcnn.py --variant rcnn --fast   # seconds, tiny sizes
    python ch05_detection/train_rcnn.py --variant rcnn --scorer softmax   # appendix B's ablation

What a run does (``ch05_detection/rcnn.py`` explains each step):

1. data: ``--num-train-examples`` scenes (2000: every one costs a selective search) and the
   validation split, as in every detection script (``detection_run.py``);
2. selective search ("fast" mode) on every image, **once**: the proposals are stored in
   ``--proposal-cache`` (``data/cache/selective_search/``, keyed by the pixels), so the second
   variant and every re-run read them back. The proposal recall at IoU 0.5 / 0.7 and the
   proposals per image of the validation split go into the record;
3. ``--variant rcnn``: fine-tune the chapter-4 CNN (``--backbone``) on warped regions (16 images
   x 8 regions = 32 positive + 96 background per batch) on the harness, then extract features of
   the regions of ``--svm-images`` training images, train one linear SVM per class with
   ``--svm-rounds`` rounds of hard-negative mining (the false positives of each round are
   printed and recorded) and one ridge box regressor per class;
   ``--variant fast_rcnn``: train backbone + RoI pooling + the multi-task head end to end;
4. evaluation on the whole validation split: VOC mAP@0.5 and COCO mAP@[.5:.95] (``evaluate.py``
   and pycocotools on the same COCO JSON files), pictures, and the inference time per image
   *including* selective search (``detect`` runs it, as the papers count it).

Output in ``--out`` (default ``runs/train_rcnn_<variant>/``): ``config.json``, ``metrics.json``
(``val_map50``, ``val_map``, ``train_seconds``, ``seconds_per_image``, ``proposals_per_image``,
``proposal_recall_50`` / ``_70``, for R-CNN ``svm_false_positives_per_round`` ...),
``val_ground_truth.json`` / ``val_detections.json``, ``detections.png``, ``proposals.png``,
``pr_curves.png``, ``history.png``, ``hard_negatives.png`` (R-CNN), ``<variant>.keras`` (load it
with ``ch05_detection.load_model``), ``logs/`` and ``checkpoint/``. Re-running with the same
``--out`` resumes the training on the harness (``common/training.py``); R-CNN's SVM stage,
a minute or so, runs again after it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import numpy as np
import tensorflow as tf

from ch05_detection import detection_run, rcnn
from ch05_detection.detector import load_backbone_weights
from common import data as common_data
from common import training, viz

VARIANTS = ("rcnn", "fast_rcnn")
DISPLAY_NAMES = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN"}
VARIANT_OPTIONS = ("epochs", "learning_rate", "batch_size", "warmup_epochs", "time_budget_minutes")
# The default runs: 128-pixel shapes, 2000 training images, within 15 minutes each on a 2-core CPU.
# R-CNN: ~0.1 s per step of 128 warped 32-pixel regions, so up to ~5000 steps (a short sanity run
# of 360 steps on 300 images reached only 0.52 mAP@0.5 with the loss still falling); 10 minutes
# of fine-tuning leave time for the features and the SVMs (~1 minute). Fast R-CNN: ~0.4 s per
# step of 16 images, the cost of Faster R-CNN's without the RPN.
TRAIN_DEFAULTS = {
    "rcnn": {"epochs": 40, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 0.5,
             "time_budget_minutes": 10.0},
    "fast_rcnn": {"epochs": 12, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 0.8,
                  "time_budget_minutes": 12.5},
}


@dataclass
class Config(detection_run.DetectionConfig):
    """Train R-CNN (Girshick et al. 2014) or Fast R-CNN (Girshick 2015) and evaluate it."""

    variant: str = field(default="rcnn", metadata={"help": "which detector", "choices": VARIANTS})
    epochs: Optional[int] = field(default=None, metadata={
        "help": "passes over the training images (default: the variant's, TRAIN_DEFAULTS)"})
    batch_size: Optional[int] = field(default=None, metadata={
        "help": "images per step, over all replicas (default: the variant's)"})
    learning_rate: Optional[float] = field(default=None, metadata={
        "help": "peak Adam learning rate (default: the variant's)"})
    warmup_epochs: Optional[float] = field(default=None, metadata={
        "help": "linear warm-up over this many epochs (default: the variant's)"})
    time_budget_minutes: Optional[float] = field(default=None, metadata={
        "help": "end the training after the last epoch that fits (0 = off; default: the "
                "variant's)"})
    num_train_examples: int = field(default=2000, metadata={
        "help": "training images (0 = all); each costs one selective search (~70 ms), once"})
    selective_search: str = field(default="fast", metadata={
        "help": "OpenCV selective search mode", "choices": rcnn.SELECTIVE_SEARCH_MODES})
    max_proposals: int = field(default=300, metadata={"help": "regions kept per image"})
    min_proposal_size: float = field(default=4.0, metadata={
        "help": "smallest region side, pixels at --image-size 128 (scaled with it)"})
    proposal_cache: str = field(default="data/cache/selective_search", metadata={
        "help": "folder of the proposal cache ('' = compute every time)"})
    output_stride: int = field(default=8, metadata={
        "help": "fast_rcnn: backbone stride (R-CNN's CNN runs to its last stage)",
        "choices": (8, 16)})
    region_size: int = field(default=32, metadata={
        "help": "rcnn: side of the warped regions (227 in the paper; the shapes need less)"})
    regions_per_image: int = field(default=8, metadata={
        "help": "rcnn: regions per image in a fine-tuning batch (a quarter positive)"})
    scorer: str = field(default="svm", metadata={
        "help": "rcnn: score regions with the SVMs or the fine-tuned softmax",
        "choices": rcnn.SCORERS})
    svm_images: int = field(default=2000, metadata={
        "help": "rcnn: training images whose regions train the SVMs and regressors (0 = all)"})
    svm_rounds: int = field(default=3, metadata={
        "help": "rcnn: SVM trainings per class (hard-negative mining between them)"})
    svm_c: float = field(default=1e-3, metadata={"help": "rcnn: the SVMs' C"})
    initial_negatives: int = field(default=2000, metadata={
        "help": "rcnn: random negatives of the first SVM round, per class"})
    hard_negatives_per_round: int = field(default=4000, metadata={
        "help": "rcnn: highest-scoring negatives added per round, per class"})
    ridge_alpha: float = field(default=1000.0, metadata={
        "help": "rcnn: regularisation of the box regressors (the paper's lambda)"})
    roi_op: str = field(default="pool", metadata={
        "help": "fast_rcnn: RoI max pooling (the paper) or RoIAlign", "choices": rcnn.ROI_OPS})
    rois_per_image: int = field(default=64, metadata={
        "help": "fast_rcnn: sampled RoIs per image (a quarter foreground)"})
    max_detections: int = field(default=100, metadata={"help": "detections kept per image"})
    out: str = field(default="", metadata={
        "help": "output folder; re-run to resume ('' = runs/train_rcnn_<variant>)"})

    FAST: ClassVar[dict] = {"epochs": 1, "image_size": 64, "batch_size": 4,
                            "num_train_examples": 16, "num_val_examples": 8,
                            "backbone_width": 8, "warmup_epochs": 0.5,
                            "eval_every": 1, "time_budget_minutes": 0.0, "max_proposals": 50,
                            "svm_images": 16, "initial_negatives": 100,
                            "hard_negatives_per_round": 100, "rois_per_image": 16}


def check_config(config):
    """Fill the variant's defaults into the options left out, then ValueErrors naming the flag."""
    if not config.out:
        config.out = f"runs/train_rcnn_{config.variant}"
    for key in VARIANT_OPTIONS:
        if getattr(config, key) is None:
            value = TRAIN_DEFAULTS[config.variant][key]
            setattr(config, key, type(value)(value))
    detection_run.check_detection_config(config)
    for name in ("max_proposals", "region_size", "regions_per_image", "svm_rounds",
                 "initial_negatives", "rois_per_image", "max_detections"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                             f"got {getattr(config, name)}")
    for name in ("svm_images", "hard_negatives_per_round"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, "
                             f"got {getattr(config, name)}")
    if config.min_proposal_size < 0:
        raise ValueError(f"--min-proposal-size must be >= 0, got {config.min_proposal_size}")
    for name in ("svm_c", "ridge_alpha"):
        if getattr(config, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    if config.region_size < 32:
        raise ValueError(f"--region-size must be >= 32, got {config.region_size}")


# ----------------------------------------------------------------------------------
# data with proposals
# ----------------------------------------------------------------------------------
def training_arrays(train, max_boxes):
    """The cached training split as NumPy: image uint8 ``[N, H, W, 3]``, boxes ``[N, B, 4]``
    (zero rows as padding), classes ``[N, B]`` (-1 as padding), with ``B = max_boxes``."""
    images, boxes, classes = [], [], []
    for example in train:
        count = min(int(example["classes"].shape[0]), max_boxes)
        padded_boxes = np.zeros((max_boxes, 4), np.float32)
        padded_classes = np.full((max_boxes,), -1, np.int32)
        padded_boxes[:count] = example["boxes"].numpy()[:count]
        padded_classes[:count] = example["classes"].numpy()[:count]
        images.append(example["image"].numpy())
        boxes.append(padded_boxes)
        classes.append(padded_classes)
    return {"image": np.stack(images), "boxes": np.stack(boxes), "classes": np.stack(classes)}


def with_proposals(arrays, proposals, max_proposals):
    """A dataset of training examples with their ``proposals`` ``[P, 4]`` (zero-padded to
    ``max_proposals``) and ``num_proposals``: what ``ProposalDetector.train_step`` reads."""
    padded, counts = rcnn.pad_proposals(proposals, max_proposals)
    return tf.data.Dataset.from_tensor_slices({**arrays, "proposals": padded,
                                               "num_proposals": counts}).cache()


def _to_float(example):
    return dict(example, image=tf.cast(example["image"], tf.float32) / 255.0)


def train_batches(config, examples, first_epoch, epochs):
    """Batches for epochs [first_epoch, epochs), each epoch's order fixed by (seed, epoch)."""
    return training.epoch_batches(
        examples, config.batch_size, first_epoch, epochs, seed=config.seed, shuffle_buffer=2048,
        batch_fn=lambda data, epoch: data.map(_to_float).batch(config.batch_size,
                                                               drop_remainder=True))


def min_proposal_pixels(config):
    """``--min-proposal-size`` is given at 128 pixels: scale it to ``--image-size``."""
    return config.min_proposal_size * config.image_size / 128.0


def seconds_per_image(model, examples, count=16):
    """Inference seconds per image of ``model.detect`` one image at a time (selective search
    included), averaged over up to ``count`` validation images after one untimed call."""
    images = [example["image"][None] for example in examples[:count]]
    if not images:
        return None
    model.detect(images[0], batch_size=1)  # trace
    start = time.perf_counter()
    for image in images:
        model.detect(image, batch_size=1)
    return round((time.perf_counter() - start) / len(images), 4)


def proposal_statistics(cache, val_examples, val_proposals):
    """Proposals per image, recall at IoU 0.5 / 0.7 (validation) and the seconds of one selective
    search (timed afresh on up to 16 validation images, the cache aside)."""
    recall = rcnn.proposal_recall(val_proposals, [e["boxes"] for e in val_examples])
    images = [e["image"] for e in val_examples[:16]]
    start = time.perf_counter()
    for image in images:
        rcnn.selective_search(image, cache.mode, cache.max_proposals, cache.min_size)
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    return {"proposals_per_image": float(np.mean([len(p) for p in val_proposals]))
            if val_proposals else 0.0,
            "proposal_recall_50": recall[0.5], "proposal_recall_70": recall[0.7],
            "proposal_seconds_per_image": round(seconds, 4)}


# ----------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------
def build_model(config, num_classes, class_names):
    common = dict(class_names=tuple(class_names), image_size=(config.image_size, config.image_size),
                  backbone=config.backbone, backbone_options=detection_run.backbone_options(config),
                  synchronized_batch_norm=False, selective_search=config.selective_search,
                  max_proposals=config.max_proposals,
                  min_proposal_size=min_proposal_pixels(config), flip_augment=config.flip,
                  max_detections=config.max_detections, seed=config.seed)
    if config.variant == "rcnn":
        model = rcnn.RCNN(num_classes, region_size=config.region_size,
                          regions_per_image=config.regions_per_image, scorer=config.scorer,
                          name="rcnn", **common)
    else:
        model = rcnn.FastRCNN(num_classes, output_stride=config.output_stride,
                              roi_op=config.roi_op, rois_per_image=config.rois_per_image,
                              name="fast_rcnn", **common)
    if config.backbone_weights:
        copied = load_backbone_weights(model, config.backbone_weights)
        print(f"backbone initialised from {config.backbone_weights} ({len(copied)} layers)")
    return model


def svm_stage(model, config, arrays, proposals):
    """R-CNN steps 3-5 on the first ``--svm-images`` training images; returns the record."""
    count = len(arrays["image"]) if not config.svm_images else min(config.svm_images,
                                                                   len(arrays["image"]))
    valid = [arrays["classes"][i] >= 0 for i in range(count)]
    print(f"R-CNN steps 3-5: features of the regions of {count} training images ...")
    start = time.perf_counter()
    table = rcnn.region_table(model, arrays["image"][:count],
                              [arrays["boxes"][i][valid[i]] for i in range(count)],
                              [arrays["classes"][i][valid[i]] for i in range(count)],
                              proposals[:count], progress=True)
    feature_seconds = time.perf_counter() - start
    report = rcnn.fit_svms_and_regressors(
        model, table, svm_rounds=config.svm_rounds, svm_C=config.svm_c,
        initial_negatives=config.initial_negatives,
        hard_negatives_per_round=config.hard_negatives_per_round, ridge_alpha=config.ridge_alpha,
        seed=config.seed)
    seconds = time.perf_counter() - start
    per_round = [int(sum(r["false_positives"])) for r in report["svm_history"]]
    print(f"{len(table['features'])} regions, features in {feature_seconds:.0f} s; SVMs and "
          f"regressors in {seconds - feature_seconds:.0f} s. False positives (negatives scoring "
          f"> 0, all classes) after each SVM round: {per_round}")
    return {"svm_stage_seconds": round(seconds, 2), "svm_regions": int(len(table["features"])),
            "svm_false_positives_per_round": per_round,
            "svm_false_positives_per_class_and_round": [r["false_positives"]
                                                         for r in report["svm_history"]],
            "svm_negatives_in_cache_per_round": [int(sum(r["cache"]))
                                                 for r in report["svm_history"]],
            "svm_positives_per_class": report["positives"],
            "box_regression_pairs_per_class": report["regression_pairs"],
            "feature_scale": report["feature_scale"]}


# ----------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------
def draw_proposals(examples, proposals, save_path, count=4):
    """Selective-search regions (yellow) and ground truth (green) of a few validation images."""
    import matplotlib.pyplot as plt

    examples = examples[:count]
    if not examples:
        return None
    figure, axes = plt.subplots(1, len(examples), figsize=(2.8 * len(examples), 3.0),
                                squeeze=False)
    for ax, example, boxes in zip(axes[0], examples, proposals):
        ax.imshow(np.clip(example["image"], 0, 1))
        viz.draw_boxes(ax, boxes, color="yellow", linewidth=0.5)
        viz.draw_boxes(ax, example["boxes"], color="lime")
        ax.set_title(f"{len(boxes)} regions", fontsize=8)
        ax.axis("off")
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure


def draw_hard_negatives(record, class_names, save_path):
    """False positives among all negatives after each SVM round, one line per class."""
    import matplotlib.pyplot as plt

    rows = record["svm_false_positives_per_class_and_round"]
    figure, ax = plt.subplots(figsize=(4.5, 3.2))
    rounds = np.arange(1, len(rows) + 1)
    for k, name in enumerate(class_names):
        ax.plot(rounds, [row[k] for row in rows], marker="o", label=name)
    ax.set_xlabel("SVM round (hard negatives added between rounds)")
    ax.set_ylabel("negatives scoring > 0")
    ax.set_xticks(rounds)
    ax.legend(fontsize=7)
    ax.set_title("R-CNN hard-negative mining", fontsize=9)
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
    title = DISPLAY_NAMES[config.variant]
    print(f"{title} on {config.dataset} ({num_classes} classes), backbone {config.backbone}, "
          f"{config.image_size}px, {config.epochs} epochs of batch {config.batch_size}, "
          f"learning rate {config.learning_rate}, {run.replicas} replica(s), out {out}")

    start = time.perf_counter()
    train, num_train, val_examples = detection_run.make_datasets(config)
    arrays = training_arrays(train, config.max_boxes)
    print(f"data ready in {time.perf_counter() - start:.1f} s ({num_train} training, "
          f"{len(val_examples)} validation images)")

    # Selective search, once per image (the cache keeps it for the next run).
    cache = rcnn.ProposalCache(config.proposal_cache or None, config.selective_search,
                               config.max_proposals, min_proposal_pixels(config))
    print(f"selective search ({config.selective_search} mode) on the training images ...")
    train_proposals = cache.get(arrays["image"], progress=True)
    search_seconds, searched = cache.computed_seconds, cache.computed_images
    print("selective search on the validation images ...")
    val_proposals = cache.get([e["image"] for e in val_examples], progress=True)
    search_seconds += cache.computed_seconds
    searched += cache.computed_images
    statistics = proposal_statistics(cache, val_examples, val_proposals)
    print(f"proposals: {searched} images searched now ({search_seconds:.0f} s), the rest from "
          f"{cache.path or 'nowhere (no cache)'}; {statistics['proposals_per_image']:.1f} per "
          f"validation image, recall {statistics['proposal_recall_50']:.3f} at IoU 0.5 and "
          f"{statistics['proposal_recall_70']:.3f} at IoU 0.7")
    examples = with_proposals(arrays, train_proposals, config.max_proposals)

    steps = detection_run.steps_per_epoch(config, num_train)
    with run.strategy.scope():
        model = build_model(config, num_classes, class_names)
        model.compile(optimizer=run.optimizer(steps, "adam", clipnorm=10.0, alpha=0.02),
                      jit_compile=False)  # selective search and sampling run outside XLA
    print(f"model: {model.count_params():,} parameters")
    callbacks = []
    if config.eval_every and config.variant == "fast_rcnn":
        callbacks.append(detection_run.MapCallback(val_examples[:100], num_classes,
                                                   config.eval_every))
    log_keys = {name.replace("_loss", "").replace("_", " "): name for name in model.LOSS_NAMES}
    log_keys["val mAP50"] = "val_map50"
    run.fit(model, lambda first_epoch: train_batches(config, examples, first_epoch, config.epochs),
            steps, log_keys=log_keys, callbacks=callbacks)
    train_seconds = float(run.state["train_seconds"])

    record = {}
    if config.variant == "rcnn":
        record = svm_stage(model, config, arrays, train_proposals)
        train_seconds += record["svm_stage_seconds"]
        draw_hard_negatives(record, class_names, out / "hard_negatives.png")
    model.save(out / f"{config.variant}.keras")

    results = detection_run.evaluate_and_save(model, val_examples, config, out, class_names, title)
    draw_proposals(val_examples, val_proposals, out / "proposals.png")
    metrics = run.finish({
        **results, **statistics, **record, "model": config.variant,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_image": seconds_per_image(model, val_examples),
        "train_images_per_second": detection_run.train_images_per_second(
            run, steps * config.batch_size),
        "num_train_examples": num_train, "proposal_images_searched": searched,
        "proposal_search_seconds": round(search_seconds, 2),
    }, model=model, history_keys=["loss", "map50"])
    print(f"\nSummary: {title}: val mAP@0.5 {metrics['val_map50']:.4f} (pycocotools "
          f"{metrics['val_pycocotools_map50']:.4f}), mAP@[.5:.95] {metrics['val_map']:.4f}, "
          f"training {metrics['train_seconds']:.0f} s, {metrics['seconds_per_image']} s per image "
          f"(with selective search, {statistics['proposal_seconds_per_image']} s of it), "
          f"{statistics['proposals_per_image']:.0f} proposals per image, recall@0.5 "
          f"{statistics['proposal_recall_50']:.3f}. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
