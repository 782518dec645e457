"""Train U-Net (or FCN-8s) for semantic segmentation.

Label every pixel of the embedded ``shapes_segmentation`` scenes (background
+ 5 shape classes) with U-Net (Ronneberger et al. 2015) or, with
``--model fcn8s``, FCN-8s (Long et al. 2015). Runs on a CPU: the default
setting reaches a validation mean IoU above 0.85 in under 10 minutes on
2 cores (see README / the chapter notebook for measured numbers).

Run from the repository root::

    python ch06_segmentation/train_unet.py                  # U-Net on shapes
    python ch06_segmentation/train_unet.py --model fcn8s    # FCN-8s, resnet_small backbone
    python ch06_segmentation/train_unet.py --fast           # seconds: a smoke run
    python ch06_segmentation/train_unet.py --dataset oxford_iiit_pet --image-size 128
    python ch06_segmentation/train_unet.py --dataset path/to/folder   # images/ + masks/
    python ch06_segmentation/train_unet.py --help           # every option and its default

Everything around ``fit`` is ``common/training.py``. Writes into ``--out`` (default
``runs/train_unet``): ``config.json``, ``checkpoint/`` (re-running with the same
``--out`` resumes exactly after the last finished epoch), ``logs/`` (TensorBoard and
``logs/epochs.csv``, one row per epoch), ``model.keras`` (load it with
``ch06_segmentation.load_model``), ``predictions.png`` (rows of image | ground truth |
prediction), ``history.png`` and ``metrics.json`` (``val_mean_iou``,
``val_pixel_accuracy``, per-class IoU, ``train_seconds``, ``epochs``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import keras
import tensorflow as tf

from common import augment, data, training, viz
from ch06_segmentation import losses, models

SEGMENTATION_MODELS = ("unet", "fcn8s", "fcn8s_vgg16")


@dataclass
class Config(training.TrainingConfig):
    """Options of train_unet.py (semantic segmentation with U-Net or FCN-8s)."""

    model: str = field(default="unet", metadata={
        "help": "unet, fcn8s (resnet_small backbone) or fcn8s_vgg16", "choices": SEGMENTATION_MODELS})
    dataset: str = field(default="shapes_segmentation", metadata={
        "help": "shapes_segmentation, oxford_iiit_pet, or a folder with images/ and masks/"})
    data_dir: str | None = field(default=None, metadata={"help": "tensorflow-datasets folder"})
    image_size: int = field(default=64, metadata={
        "help": "square side images are drawn/resized to (U-Net: multiple of 2**depth, FCN: of 32)"})
    num_train_examples: int = field(default=8000, metadata={"help": "training examples (at most)"})
    num_val_examples: int = field(default=300, metadata={"help": "validation examples (at most)"})
    epochs: int = field(default=6, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=16, metadata={"help": "examples per step, over all replicas"})
    learning_rate: float = field(default=2e-3, metadata={
        "help": "Adam's peak learning rate (cosine decay to 0 over the run)"})
    loss: str = field(default="ce+dice", metadata={
        "help": "ce (ignores 255), weighted_ce (median frequency), dice, ce+dice",
        "choices": ("ce", "weighted_ce", "dice", "ce+dice")})
    depth: int = field(default=4, metadata={"help": "U-Net: number of poolings"})
    base_filters: int = field(default=8, metadata={"help": "U-Net: filters of the first level"})
    backbone: str = field(default="resnet_small", metadata={"help": "FCN-8s: chapter-4 backbone"})
    head_filters: int = field(default=128, metadata={"help": "FCN-8s: width of fc6/fc7"})
    augment: bool = field(default=False, metadata={
        "help": "random flips and scale jitter (common.augment); the synthetic data need none"})
    time_budget_minutes: float = field(default=9.0, metadata={
        "help": "end after the last epoch that fits in this many minutes of training, the cosine "
                "decay shortened to match (0 = no budget)"})
    out: str = field(default="runs/train_unet", metadata={"help": "output folder; re-run to resume"})

    FAST: ClassVar[dict] = {"image_size": 32, "num_train_examples": 64, "num_val_examples": 16, "epochs": 2,
                            "batch_size": 16, "depth": 2, "base_filters": 4, "head_filters": 16,
                            "time_budget_minutes": 0.0}


def check_config(config: Config):
    """ValueError for options no model can take."""
    for name in ("image_size", "num_train_examples", "num_val_examples", "depth", "base_filters",
                 "head_filters"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    factor = 2 ** config.depth if config.model == "unet" else 32
    if config.image_size % factor:
        raise ValueError(
            f"--image-size must be a multiple of {factor} for --model {config.model}"
            f"{' with --depth ' + str(config.depth) if config.model == 'unet' else ''}, "
            f"got {config.image_size}")


def load_split(config: Config, split: str, num_examples: int) -> tf.data.Dataset:
    """(image, mask) pairs of one split, resized to the configured square size."""
    dataset = data.load(config.dataset, split, image_size=config.image_size,
                        num_examples=num_examples, seed=config.seed, data_dir=config.data_dir,
                        task="segmentation")
    return data.to_supervised(dataset)


def build_model(config: Config, num_classes: int) -> keras.Model:
    input_shape = (config.image_size, config.image_size, 3)
    if config.model == "unet":
        return models.get_model("unet", input_shape, num_classes, depth=config.depth,
                                base_filters=config.base_filters)
    options = {"head_filters": config.head_filters}
    if config.model == "fcn8s":
        options["backbone"] = config.backbone
    return models.get_model(config.model, input_shape, num_classes, **options)


def make_loss(config: Config, train: tf.data.Dataset, num_classes: int):
    class_weights = None
    if config.loss == "weighted_ce":
        masks = np.concatenate([m.numpy().ravel() for _, m in train.take(20)])
        class_weights = losses.median_frequency_weights(masks, num_classes).tolist()
        print("class weights (median frequency):", [round(w, 3) for w in class_weights])
    return losses.get_loss(config.loss, num_classes, class_weights)


def evaluate(model, dataset, num_classes):
    """Validation mean IoU, pixel accuracy and per-class IoU over the whole split.

    All three are read from one confusion matrix, accumulated once per batch.
    """
    mean_iou = losses.MeanIoU(num_classes)
    predict = tf.function(lambda images: model(images, training=False))
    for images, masks in dataset:
        mean_iou.update_state(masks, predict(images))
    confusion = mean_iou.total_confusion
    per_class = losses.iou_per_class(confusion).numpy()
    return (float(mean_iou.result()), float(losses.pixel_accuracy_from_confusion(confusion)),
            per_class)


def save_prediction_grid(model, dataset, path, num_classes, rows=6):
    images, masks = next(iter(dataset.unbatch().batch(rows)))
    predictions = tf.argmax(model(images, training=False), axis=-1)
    figure = viz.show_segmentation(images.numpy(), masks.numpy(), predictions.numpy(),
                                   num_classes=num_classes, save_path=path)
    import matplotlib.pyplot as plt
    plt.close(figure)


def main(argv=None) -> dict:
    run = training.start_run(Config, argv, check=check_config, description=__doc__.splitlines()[0])
    config, out = run.config, run.out

    # ---- data ----
    info = data.get_info(config.dataset, data_dir=config.data_dir, task="segmentation")
    num_classes = info.num_classes
    print(f"data: {config.dataset}, {num_classes} classes {list(info.class_names)}, "
          f"{config.image_size}x{config.image_size} pixels")
    train = load_split(config, "train", config.num_train_examples).cache()
    validation = load_split(config, "validation", config.num_val_examples).cache()
    # Labels checked before any training: values in range, more than one class present (a run on
    # one class would report a perfect, meaningless score), every bad file named.
    data.check_segmentation_labels(train, num_classes, what=f"{config.dataset} train split",
                                   class_names=info.class_names, max_examples=64)
    data.check_segmentation_labels(validation, num_classes, what=f"{config.dataset} validation split",
                                   class_names=info.class_names)
    # One pass fills the cache (with progress) and counts the examples (folders have no known size).
    progress = keras.utils.Progbar(None if int(train.cardinality()) < 0 else int(train.cardinality()),
                                   unit_name="example")
    num_train = 0
    for images, _ in train.batch(256):
        num_train += int(images.shape[0])
        progress.update(num_train)
    progress.update(num_train, finalize=True)
    if num_train == 0:
        training.fail(f"--dataset {config.dataset!r} has no training examples")
    augmenter = None
    if config.augment:
        augmenter = augment.make_augmenter("segmentation", brightness=0.0, contrast=0.0,
                                           saturation=0.0, hue=0.0)

    def batches(examples, epoch):
        batched = examples.batch(config.batch_size)
        if augmenter is None:
            return batched
        # The augmentation's seed depends on (seed, epoch, batch), so a resumed run sees the same.
        return augment.augment_dataset(batched.map(lambda x, y: {"image": x, "mask": y}), augmenter,
                                       seed=config.seed * 1000 + epoch).map(
            lambda batch: (batch["image"], batch["mask"]))

    val_batches = validation.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    steps_per_epoch = -(-num_train // config.batch_size)

    # ---- model ----
    with run.strategy.scope():
        model = build_model(config, num_classes)
        model.compile(optimizer=run.optimizer(steps_per_epoch, "adam"),
                      loss=make_loss(config, train, num_classes),
                      metrics=[losses.MeanIoU(num_classes), losses.PixelAccuracy(num_classes)],
                      jit_compile=run.jit_compile)
    print(f"model: {model.name}, {model.count_params():,} parameters, {num_train} training examples")

    # ---- train ----
    run.fit(model, lambda first_epoch: training.epoch_batches(
                train, config.batch_size, first_epoch, config.epochs, seed=config.seed, batch_fn=batches),
            steps_per_epoch, validation_data=val_batches,
            log_keys={"loss": "loss", "mIoU": "mean_iou", "val loss": "val_loss",
                      "val mIoU": "val_mean_iou", "val acc": "val_pixel_accuracy"})

    # ---- evaluate and write outputs ----
    val_mean_iou, val_pixel_accuracy, per_class = evaluate(model, val_batches, num_classes)
    model.save(out / "model.keras")
    save_prediction_grid(model, val_batches, out / "predictions.png", num_classes)
    metrics = {
        "val_mean_iou": val_mean_iou,
        "val_pixel_accuracy": val_pixel_accuracy,
        "model": config.model,
        "num_train_examples": num_train,
    }
    for name, value in zip(info.class_names, per_class):
        metrics[f"val_iou_{name}"] = None if np.isnan(value) else float(value)
    metrics = run.finish(metrics, model=model, history_keys=["loss", "mean_iou"])
    print(f"\nSummary: {config.model} on {config.dataset} ({config.image_size}px), "
          f"{metrics['epochs']} epochs, {metrics['train_seconds']:.0f} s of training\n"
          f"  validation mean IoU {val_mean_iou:.4f}, pixel accuracy {val_pixel_accuracy:.4f}\n"
          f"  per class: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(info.class_names, per_class))
          + f"\n  outputs in {out}/ (metrics.json, predictions.png, model.keras, logs/)")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
