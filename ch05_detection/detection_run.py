"""What every detector's training script shares: data options, data, evaluation, pictures.

``train_faster_rcnn.py`` and ``train_detector.py`` (YOLO, SSD, RetinaNet, CenterNet ...) differ only
in the model they build and how they schedule it; everything around the model is here, once:

* ``DetectionConfig``: the data and evaluation options (``--dataset``, ``--image-size``,
  ``--num-train-examples``, ``--backbone`` ...) on top of the harness' ``TrainingConfig``;
* ``make_datasets``: the training split cached once as uint8 (with progress) and the validation
  split as a list of NumPy examples; ``train_batches``: padded batches, each epoch's order fixed by
  (seed, epoch) so a resumed run sees the same data;
* ``MapCallback``: val mAP@0.5 on a subset every N epochs, in the training log;
* ``evaluate_and_save``: the final evaluation of any detector (``evaluate.py`` and pycocotools on
  the same COCO JSON files), the PR curves and the detections picture, and the speed numbers of the
  detector table (train images/s, inference ms/image at batch 1 and 16).

Everything takes a ``Detector`` (``detector.py``) and uses only ``detect``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ch04_classification.models import BACKBONE_NAMES
from ch05_detection import evaluate
from ch05_detection.detector import backbone_options_for
from common import data as common_data
from common import augment, training, viz


@dataclass
class DetectionConfig(training.TrainingConfig):
    """Data, backbone and evaluation options of every detection script."""

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
    image_size: int = field(default=128, metadata={
        "help": "square input size in pixels (>= 64, a multiple of 32)"})
    num_train_examples: int = field(default=4000, metadata={"help": "training images (0 = all)"})
    num_val_examples: int = field(default=500, metadata={"help": "validation images (0 = all)"})
    max_boxes: int = field(default=32, metadata={"help": "objects per image kept in a batch"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips in the train step"})
    eval_every: int = field(default=2, metadata={
        "help": "val mAP@0.5 on a subset every N epochs (0 = off)"})


# Mixed into the Config of the scripts whose batches come from train_batches (train_faster_rcnn.py,
# train_detector.py): --rotation, --shear, --elastic-alpha warp each batch in tf.data before the
# train step (whose horizontal flip is --flip). Where the data have instance masks (shapes), they are
# loaded with the training split and warped with the image, and each box is recomputed as the extent
# of its warped mask: boxes stay tight. Other data sets have boxes only: a box becomes the extent of
# its warped corners, looser than the object.
GeometryAugmentOptions = augment.WarpOptions
geometry_augmentation = augment.has_warps


def _has_instance_masks(config):
    return config.dataset == "shapes"


def check_detection_config(config):
    """ValueErrors naming the flag, before any data is loaded."""
    if config.image_size < 64 or config.image_size % 32:
        raise ValueError(f"--image-size must be a multiple of 32 and >= 64, got {config.image_size}")
    for name in ("num_train_examples", "num_val_examples"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 = all), got {getattr(config, name)}")
    for name in ("max_boxes", "backbone_width"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {config.eval_every}")
    augment.check_warp_options(config)
    if config.backbone_weights and not Path(config.backbone_weights).is_file():
        raise ValueError(f"--backbone-weights: no file {config.backbone_weights!r} (expected the "
                         f"model.keras that ch04_classification/train_classifier.py writes)")


def backbone_options(config):
    """Builder options of the chosen backbone (resnet_small's widths from ``--backbone-width``)."""
    return backbone_options_for(config.backbone, config.backbone_width)


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------
def load_split(config, split, num_examples, with_masks=False):
    options = {"image_size": config.image_size, "seed": config.seed}
    if with_masks:  # instance masks [N, H, W] (Mask R-CNN, ch06_segmentation/train_mask_rcnn.py)
        options["with_masks"] = True
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


def make_datasets(config, with_masks=False):
    """(training examples cached as uint8, their count, list of validation examples as NumPy);
    ``with_masks``: with the instance masks."""
    # 4000 x 128² x 3 floats would be ~800 MB: cache the generated scenes as uint8.
    # The geometric augmentations recompute boxes from the warped instance masks where there are.
    train_masks = with_masks or (geometry_augmentation(config) and _has_instance_masks(config))
    train = load_split(config, "train", config.num_train_examples,
                       train_masks).map(_to_uint8).cache()
    progress = keras.utils.Progbar(config.num_train_examples or None, unit_name="image")
    count = 0
    for count, _ in enumerate(train, start=1):  # fills the cache once, with progress
        if count % 100 == 0:
            progress.update(count)
    progress.update(count, finalize=True)
    val_examples = [{k: v.numpy() for k, v in example.items()}
                    for example in load_split(config, "validation", config.num_val_examples,
                                              with_masks)]
    return train, count, val_examples


def training_boxes(train):
    """Every box of the (cached) training split as one float32 ``[M, 4]`` array (for k-means
    anchors and statistics)."""
    boxes = [example["boxes"].numpy().reshape(-1, 4) for example in train]
    return (np.concatenate(boxes).astype(np.float32) if boxes
            else np.zeros((0, 4), np.float32))


def train_batches(config, train, first_epoch, epochs, with_masks=False):
    """Padded batches for epochs [first_epoch, epochs), each epoch's order fixed by (seed, epoch)
    (``with_masks``: with ``masks`` [batch, max_boxes, H, W])."""
    cached_masks = "masks" in train.element_spec
    augmenter = None
    if geometry_augmentation(config):
        augmenter = augment.make_augmenter(
            "detection", flip_left_right=0.0, rotation=config.rotation, shear=config.shear,
            elastic_alpha=config.elastic_alpha, scale_range=None, vgg_scale_range=None,
            brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)

    def batches(examples, epoch):
        batched = common_data.batch_detection(
            examples.map(_to_float), config.batch_size, config.max_boxes, drop_remainder=True,
            with_masks=cached_masks)
        if augmenter is not None:
            # Seeded by (seed, epoch, batch): a resumed run sees the same warps.
            batched = augment.augment_dataset(batched, augmenter,
                                              seed=config.seed * 1000 + epoch)
        if cached_masks and not with_masks:  # loaded only to keep the warped boxes tight
            batched = batched.map(lambda batch: {k: v for k, v in batch.items() if k != "masks"})
        return batched

    return training.epoch_batches(train, config.batch_size, first_epoch, epochs, seed=config.seed,
                                  shuffle_buffer=2048, batch_fn=batches)


def steps_per_epoch(config, num_train):
    """Full batches per epoch; a clear error when there is not even one."""
    steps = num_train // config.batch_size
    if steps < 1:
        training.fail(f"{num_train} training images are fewer than one batch of --batch-size "
                      f"{config.batch_size}; lower --batch-size or add images")
    return steps


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


def draw_ground_truth_and_detections(examples, detections, class_names, save_path, min_score=0.5):
    """Top row: ground truth; bottom row: the detections (score >= ``min_score``) on the same
    images."""
    if not examples:
        return None
    images = np.stack([e["image"] for e in examples])
    kept = [{k: v[d["scores"] >= min_score] for k, v in d.items()} for d in detections]
    width = max([len(e["classes"]) for e in examples] + [len(d["classes"]) for d in kept] + [1])
    boxes = np.concatenate([_pad([e["boxes"] for e in examples], width, 0.0),
                            _pad([d["boxes"] for d in kept], width, 0.0)])
    classes = np.concatenate([_pad([e["classes"] for e in examples], width, -1),
                              _pad([d["classes"] for d in kept], width, -1)]).astype(np.int32)
    scores = np.concatenate([_pad([np.ones(len(e["classes"])) for e in examples], width, 0.0),
                             _pad([d["scores"] for d in kept], width, 0.0)])
    titles = (["ground truth"] * len(examples)
              + [f"detections (score >= {min_score})"] * len(examples))
    return viz.show_detections(np.concatenate([images, images]), boxes, classes, scores=scores,
                               class_names=class_names, cols=len(examples), save_path=save_path,
                               titles=titles)


# ----------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------
def inference_milliseconds(model, images, batch_size, repeats=3):
    """Milliseconds per image of ``model.detect`` at ``batch_size`` (best of ``repeats`` after
    one warm-up call that traces the graph); None without enough images."""
    if len(images) < batch_size:
        return None
    batch = np.stack(images[:batch_size])
    model.detect(batch, batch_size=batch_size)  # trace once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.detect(batch, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return round(1000.0 * best / batch_size, 2)


def evaluate_and_save(model, val_examples, config, out, class_names, title):
    """Evaluate ``model`` on the whole validation split and write the record's files.

    Writes ``val_ground_truth.json`` / ``val_detections.json`` (COCO format), ``pr_curves.png``
    and ``detections.png`` into ``out``. Returns the metrics: ``val_map50``, ``val_map``,
    ``val_voc_map50``, ``val_map75`` (``evaluate.py``), ``val_pycocotools_map50`` / ``_map``
    (pycocotools on the same files), ``eval_seconds``, ``inference_ms_batch1`` /
    ``inference_ms_batch16``.
    """
    out = Path(out)
    start = time.perf_counter()
    print(f"evaluating on {len(val_examples)} validation images ...")
    detections = evaluate.run_detection(model, val_examples, config.batch_size, progress=True)
    ground_truth = evaluate.ground_truth_list(val_examples)
    result = evaluate.evaluate_detections(ground_truth, detections, num_classes=len(class_names))
    gt_path, det_path = out / "val_ground_truth.json", out / "val_detections.json"
    evaluate.to_coco_json(ground_truth, detections,
                          [(config.image_size, config.image_size)] * len(ground_truth),
                          class_names, gt_path=gt_path, det_path=det_path)
    coco = evaluate.coco_map_with_pycocotools(str(gt_path), str(det_path))
    evaluate.plot_pr_curves(ground_truth, detections, class_names=class_names,
                            num_classes=len(class_names), save_path=out / "pr_curves.png",
                            title=f"{title}, validation (IoU 0.5)")
    draw_ground_truth_and_detections(val_examples[:4], detections[:4], class_names,
                                     out / "detections.png")
    eval_seconds = round(time.perf_counter() - start, 1)
    images = [example["image"] for example in val_examples[:16]]
    return {
        "val_map50": float(result["map50"]), "val_map": float(result["map"]),
        "val_voc_map50": float(result["voc_map50"]), "val_map75": float(result["map75"]),
        "val_pycocotools_map50": float(coco["map50"]), "val_pycocotools_map": float(coco["map"]),
        "eval_seconds": eval_seconds,
        "inference_ms_batch1": inference_milliseconds(model, images, 1),
        "inference_ms_batch16": inference_milliseconds(model, images, 16),
        "num_val_examples": len(val_examples),
    }


def train_images_per_second(run, images_per_epoch):
    """Training throughput over the whole record (every resume): images seen / training seconds."""
    seconds = float(run.state.get("train_seconds") or 0.0)
    return round(images_per_epoch * run.epochs_done / seconds, 1) if seconds else None
