"""Train R-CNN, Fast R-CNN or a sliding-window detector and evaluate them like every detector.

Girshick et al. 2014 ("R-CNN") and Girshick 2015 ("Fast R-CNN"), the two ancestors of Faster
R-CNN (``train_faster_rcnn.py``), and before them the sliding window, per window and
convolutionally (Sermanet et al. 2014, "OverFeat"), on the same data and with the same
evaluation, so the chapter's lineage table can put their mAP and their seconds per image side by
side (CPU; about 15 minutes for each R-CNN variant, 5 for the sliding windows)::

    python ch05_detection/train_rcnn.py --variant rcnn          # the default R-CNN run
    python ch05_detection/train_rcnn.py --variant fast_rcnn     # the default Fast R-CNN run
    python ch05_detection/train_rcnn.py --variant sliding_windows   # both sliding-window timings
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
   x 8 regions = 128 per batch, as in the paper, with ``--foreground-fraction`` 0.5 of them
   positive where the paper has 32 of 128: see ``TRAIN_DEFAULTS``) on the harness, then extract
   features of the regions of ``--svm-images`` training images, train one linear SVM per class
   with ``--svm-rounds`` rounds of hard-negative mining (the false positives of each round are
   printed and recorded) and one ridge box regressor per class; the record also holds the
   ``ablations``: SVMs vs the fine-tuned softmax (appendix B), with and without box regression
   (appendix C), decoded from the same CNN outputs;
   ``--variant fast_rcnn``: train backbone + RoI pooling + the multi-task head end to end;
   ``--variant sliding_windows``: no proposals; train ``sliding_windows``' window classifier on
   crops of the training images (every positive window, three background ones per positive),
   detect convolutionally, and time ``detect`` per window and convolutionally
   (``seconds_per_image_loop`` / ``_conv``); the window grid's recall goes where the other
   variants put their proposals';
4. evaluation on the whole validation split: VOC mAP@0.5 and COCO mAP@[.5:.95] (``evaluate.py``
   and pycocotools on the same COCO JSON files), pictures, and the inference time per image
   *including* selective search (``detect`` runs it, as the papers count it).

Output in ``--out`` (default ``runs/train_rcnn_<variant>/``): ``config.json``, ``metrics.json``
(``val_map50``, ``val_map``, ``train_seconds``, ``seconds_per_image``, ``proposals_per_image``,
``proposal_recall_50`` / ``_70``, for R-CNN ``svm_false_positives_per_round`` ...),
``val_ground_truth.json`` / ``val_detections.json``, ``detections.png``, ``proposals.png``,
``pr_curves.png``, ``history.png``, ``hard_negatives.png`` (R-CNN), ``<variant>.keras`` (load it
with ``ch05_detection.load_model``; the sliding windows: ``window_classifier.keras``, the same way, a plain
Keras model), ``logs/`` and ``checkpoint/``.

Pictures for the notebook are in ``rcnn_figures.py`` (regions, warped regions, SVM scores per
mining round, box regression) and ``sliding_windows.py`` (windows, score maps). Re-running with the same
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
from ch05_detection.rcnn_figures import draw_hard_negatives, draw_proposals, rcnn_outputs
from ch05_detection.detector import load_backbone_weights
from common import data as common_data
from common import training

VARIANTS = ("rcnn", "fast_rcnn", "sliding_windows")
DISPLAY_NAMES = {"rcnn": "R-CNN", "fast_rcnn": "Fast R-CNN", "sliding_windows": "Sliding windows"}
VARIANT_OPTIONS = ("epochs", "learning_rate", "batch_size", "warmup_epochs", "time_budget_minutes")
# The default runs: 128-pixel shapes, 2000 training images, within 15 minutes each on a 2-core CPU.
# R-CNN: 60-100 ms per step of 128 warped 32-pixel regions; the 5000 steps took 6.4 minutes at
# load 2-5 (the 10-minute budget is for a busier machine), then 49 s for the features, SVMs and
# regressors of 2000 images. How fast fine-tuning learns the classes decides the mAP: after 600
# steps the softmax named the class of 44% of the validation regions with IoU >= 0.5 at 2e-3 with
# a quarter positive (3 epochs: 0.38 mAP@0.5), 61% with half positive (--foreground-fraction) and
# 70% with that and 5e-3; the default reached 0.983.
# Fast R-CNN: ~0.25 s per step of 16 images, the cost of Faster R-CNN's without the RPN (12 epochs
# in 6 minutes, 0.956).
# Sliding windows: a LeNet-sized window classifier on 64 crops per step, 6 epochs in ~2.5 minutes.
TRAIN_DEFAULTS = {
    "rcnn": {"epochs": 40, "learning_rate": 5e-3, "batch_size": 16, "warmup_epochs": 0.5,
             "time_budget_minutes": 10.0},
    "fast_rcnn": {"epochs": 12, "learning_rate": 2e-3, "batch_size": 16, "warmup_epochs": 0.8,
                  "time_budget_minutes": 12.5},
    "sliding_windows": {"epochs": 6, "learning_rate": 2e-3, "batch_size": 64,
                        "warmup_epochs": 0.2, "time_budget_minutes": 4.0},
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
        "help": "rcnn: regions per image in a fine-tuning batch"})
    foreground_fraction: float = field(default=0.5, metadata={
        "help": "rcnn: share of a fine-tuning batch with IoU >= 0.5 (the paper: 0.25, because "
                "positives are rare among VOC's regions; here a third of the regions are)"})
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
    if not 0.0 < config.foreground_fraction <= 1.0:
        raise ValueError(f"--foreground-fraction must be in (0, 1], got {config.foreground_fraction}")
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
                          foreground_fraction=config.foreground_fraction,
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
            "svm_score_bins": rcnn.SVM_SCORE_BINS.tolist(),
            "svm_negative_score_histograms": [r["negative_histogram"]
                                              for r in report["svm_history"]],
            "svm_positive_score_histograms": [r["positive_histogram"]
                                              for r in report["svm_history"]],
            "svm_positives_per_class": report["positives"],
            "box_regression_pairs_per_class": report["regression_pairs"],
            "feature_scale": report["feature_scale"]}


def rcnn_ablations(model, val_examples, val_proposals):
    """R-CNN's scorer and box-regression ablations on the same regions and the same CNN outputs:
    SVMs vs the fine-tuned softmax (appendix B) and with vs without the box regressors
    (appendix C). Returns ``{name: {"val_map50": ..., "val_map": ...}}``."""
    from ch05_detection import evaluate

    outputs = rcnn_outputs(model, [e["image"] for e in val_examples], val_proposals)
    ground_truth = evaluate.ground_truth_list(val_examples)
    result = {}
    for scorer in rcnn.SCORERS:
        for box_regression in (True, False):
            detections = []
            for output in outputs:
                decoded = {k: v.numpy() for k, v in
                           model.decode(output, scorer=scorer, box_regression=box_regression).items()}
                for i, n in enumerate(decoded["num_detections"]):
                    detections.append({"boxes": decoded["boxes"][i, :n],
                                       "classes": decoded["classes"][i, :n],
                                       "scores": decoded["scores"][i, :n]})
            scores = evaluate.evaluate_detections(ground_truth, detections,
                                                  num_classes=model.num_classes)
            name = scorer + ("" if box_regression else "_without_box_regression")
            result[name] = {"val_map50": round(float(scores["map50"]), 4),
                            "val_map": round(float(scores["map"]), 4)}
    return result


# ----------------------------------------------------------------------------------
# sliding windows: the same data, the same evaluation
# ----------------------------------------------------------------------------------
def window_sizes_for(image_size):
    """``sliding_windows.DEFAULT_WINDOW_SIZES`` (sides at 128 pixels) scaled to ``image_size``."""
    from ch05_detection import sliding_windows

    return tuple(int(round(side * image_size / 128.0))
                 for side in sliding_windows.DEFAULT_WINDOW_SIZES)


def window_crops(arrays, window_sizes, seed=0):
    """The window classifier's training set from the training arrays: ``(crops`` uint8
    ``[M, 32, 32, 3]``, ``labels [M]`` int32, 0 = background); ``sliding_windows.
    window_training_set`` on every image (all positive windows, 3 background ones per positive)."""
    from ch05_detection import sliding_windows

    image_size = int(arrays["image"].shape[1])
    crops, labels = [], []
    for start in range(0, len(arrays["image"]), 100):  # 100 images at a time: float crops are big
        examples = []
        for i in range(start, min(start + 100, len(arrays["image"]))):
            valid = arrays["classes"][i] >= 0
            examples.append({"image": arrays["image"][i].astype(np.float32) / 255.0,
                             "boxes": arrays["boxes"][i][valid],
                             "classes": arrays["classes"][i][valid]})
        chunk, chunk_labels = sliding_windows.window_training_set(
            examples, image_size, window_sizes, seed=seed + start)
        crops.append(rcnn.to_uint8(chunk))
        labels.append(chunk_labels)
    return np.concatenate(crops), np.concatenate(labels).astype(np.int32)


def train_sliding_windows(run, arrays, val_examples, class_names):
    """``--variant sliding_windows``: train the window classifier on crops of the training
    images, then detect per window and convolutionally and evaluate like every detector.

    mAP is that of the convolutional form (``detect``'s default); the per-window loop gives the
    same score maps (``tests/test_ch05_sliding_windows.py``; the largest difference on the first
    validation image is recorded), so it is timed, not evaluated again.
    """
    import keras

    from ch05_detection import sliding_windows

    config, out = run.config, run.out
    window_sizes = window_sizes_for(config.image_size)
    start = time.perf_counter()
    crops, labels = window_crops(arrays, window_sizes, seed=config.seed)
    print(f"{len(crops)} window crops in {time.perf_counter() - start:.0f} s "
          f"({np.mean(labels > 0):.0%} positive), window sides {window_sizes} pixels")
    examples = tf.data.Dataset.from_tensor_slices({"crop": crops, "label": labels})

    def batches(first_epoch):
        return training.epoch_batches(
            examples, config.batch_size, first_epoch, config.epochs, seed=config.seed,
            shuffle_buffer=len(crops),
            batch_fn=lambda data, epoch: data.map(
                lambda e: (tf.cast(e["crop"], tf.float32) / 255.0, e["label"])).batch(
                    config.batch_size, drop_remainder=True))

    steps = len(crops) // config.batch_size
    with run.strategy.scope():
        classifier = sliding_windows.build_window_classifier(len(class_names))
        classifier.compile(optimizer=run.optimizer(steps, "adam"),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=["accuracy"], jit_compile=run.jit_compile)
    print(f"window classifier: {classifier.count_params():,} parameters")
    run.fit(classifier, batches, steps, log_keys={"loss": "loss", "accuracy": "accuracy"})
    classifier.save(out / "window_classifier.keras")

    detector = sliding_windows.SlidingWindowDetector(
        classifier, class_names=class_names, image_size=config.image_size,
        window_sizes=window_sizes, max_detections=config.max_detections)
    results = detection_run.evaluate_and_save(detector, val_examples, config, out, class_names,
                                              DISPLAY_NAMES["sliding_windows"])
    images = np.stack([e["image"] for e in val_examples[:16]])
    timing = sliding_windows.time_detection(detector, images)
    loop = detector.score_maps(images[0], mode="loop")
    conv = detector.score_maps(images[0], mode="conv")
    difference = max(float(np.abs(loop[side] - conv[side]).max()) for side in loop)
    windows = np.concatenate([boxes.reshape(-1, 4) for boxes in detector.window_boxes().values()])
    recall = rcnn.proposal_recall([windows] * len(val_examples), [e["boxes"] for e in val_examples])
    metrics = run.finish({
        **results, "model": "sliding_windows",
        "seconds_per_image": round(timing["conv_seconds_per_image"], 4),
        "seconds_per_image_loop": round(timing["loop_seconds_per_image"], 4),
        "seconds_per_image_conv": round(timing["conv_seconds_per_image"], 4),
        "speedup_conv_over_loop": round(timing["speedup"], 2),
        "windows_per_image": timing["windows_per_image"],
        "proposals_per_image": float(timing["windows_per_image"]),
        "proposal_recall_50": recall[0.5], "proposal_recall_70": recall[0.7],
        "max_score_map_difference": difference, "window_sizes": list(window_sizes),
        "window_crops": int(len(crops)), "num_train_examples": int(len(arrays["image"])),
        "train_images_per_second": None,
    }, model=classifier, history_keys=["loss", "accuracy"])
    print(f"\nSummary: sliding windows: val mAP@0.5 {metrics['val_map50']:.4f}, mAP@[.5:.95] "
          f"{metrics['val_map']:.4f}, {timing['windows_per_image']} windows per image (recall@0.5 "
          f"{recall[0.5]:.3f}, @0.7 {recall[0.7]:.3f}); per window "
          f"{timing['loop_seconds_per_image']:.4f} s/image, convolutional "
          f"{timing['conv_seconds_per_image']:.4f} s/image ({timing['speedup']:.1f}x; largest score "
          f"difference {difference:.1e}); training {metrics['train_seconds']:.0f} s. Outputs in "
          f"{out}/")
    return metrics


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
    if config.variant == "sliding_windows":
        return train_sliding_windows(run, arrays, val_examples, class_names)

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
                      jit_compile=run.no_jit_compile(
                          "Fast R-CNN's RoI sampling over precomputed proposals does not compile with XLA"))
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
    if config.variant == "rcnn":
        record["ablations"] = rcnn_ablations(model, val_examples, val_proposals)
        print("R-CNN ablations (val mAP@0.5 / mAP@[.5:.95], same regions): " + "; ".join(
            f"{name} {v['val_map50']:.3f} / {v['val_map']:.3f}"
            for name, v in record["ablations"].items()))
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
