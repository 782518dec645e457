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

Writes into ``--out`` (default ``runs/train_unet``): ``config.json``,
``backup/`` (re-running with the same ``--out`` resumes from the last finished
epoch), ``logs/`` (TensorBoard and ``logs/epochs.csv``
one row per epoch), ``model.keras``, ``predictions.png`` (rows of
image | ground truth | prediction), ``history.png`` and ``metrics.json``
(``val_mean_iou``, ``val_pixel_accuracy``, per-class IoU, ``train_seconds``,
``epochs``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import keras
import tensorflow as tf

from common import data, viz
from common.callbacks import SimpleLogCallback, epoch_log_callbacks
from common.config import parse_config, save_config, write_metrics
from ch06_segmentation import losses, models

SEGMENTATION_MODELS = ("unet", "fcn8s", "fcn8s_vgg16")


@dataclass
class Config:
    """Options of train_unet.py (semantic segmentation with U-Net or FCN-8s)."""

    model: str = field(default="unet", metadata={
        "help": "unet, fcn8s (resnet_small backbone) or fcn8s_vgg16", "choices": SEGMENTATION_MODELS})
    dataset: str = field(default="shapes_segmentation", metadata={
        "help": "shapes_segmentation, oxford_iiit_pet, or a folder with images/ and masks/"})
    data_dir: str | None = field(default=None, metadata={"help": "tensorflow-datasets folder"})
    image_size: int = field(default=64, metadata={
        "help": "square side images are drawn/resized to (U-Net: multiple of 2**depth, FCN: of 32)"})
    train_examples: int = field(default=8000, metadata={"help": "training examples (at most)"})
    val_examples: int = field(default=300, metadata={"help": "validation examples (at most)"})
    epochs: int = field(default=6, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
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
    cache: bool = field(default=True, metadata={"help": "keep the decoded examples in memory"})
    time_budget_seconds: float = field(default=0.0, metadata={
        "help": "stop after the epoch that passes this many seconds of training (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of data, weights and shuffling"})
    out: str = field(default="runs/train_unet", metadata={"help": "output folder"})
    log_frequency: int = field(default=1, metadata={"help": "print every this many epochs"})
    fast: bool = field(default=False, metadata={"help": "tiny sizes for a smoke run (or CVTF_FAST=1)"})

    FAST: ClassVar[dict] = {"image_size": 32, "train_examples": 64, "val_examples": 16, "epochs": 2,
                            "batch_size": 16, "depth": 2, "base_filters": 4, "head_filters": 16}


def check_config(config: Config):
    """ValueError for options no model can take."""
    for name in ("image_size", "train_examples", "val_examples", "epochs", "batch_size",
                 "depth", "base_filters", "head_filters", "log_frequency"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be > 0, got {config.learning_rate}")
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


def check_first_examples(dataset: tf.data.Dataset, num_classes: int, count: int = 64):
    """Fail early with a clear ValueError on masks that do not fit the task."""
    for image, mask in dataset.take(count):
        losses.validate_segmentation_example(image.numpy(), mask.numpy(), num_classes)


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


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the first epoch that ends past ``seconds``."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.seconds and time.perf_counter() - self.start > self.seconds:
            print(f"time budget of {self.seconds:.0f} s reached after epoch {epoch + 1}: stopping")
            self.model.stop_training = True


class EpochCounter(keras.callbacks.Callback):
    """Remembers the number of the last finished epoch (also after a resume)."""

    def __init__(self):
        super().__init__()
        self.last_epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch + 1


def evaluate(model, dataset, num_classes):
    """Validation mean IoU, pixel accuracy and per-class IoU over the whole split."""
    mean_iou = losses.MeanIoU(num_classes)
    accuracy = losses.PixelAccuracy(num_classes)
    predict = tf.function(lambda images: model(images, training=False))
    for images, masks in dataset:
        logits = predict(images)
        mean_iou.update_state(masks, logits)
        accuracy.update_state(masks, logits)
    per_class = losses.iou_per_class(mean_iou.total_confusion).numpy()
    return float(mean_iou.result()), float(accuracy.result()), per_class


def save_prediction_grid(model, dataset, path, num_classes, rows=6):
    images, masks = next(iter(dataset.unbatch().batch(rows)))
    predictions = tf.argmax(model(images, training=False), axis=-1)
    figure = viz.show_segmentation(images.numpy(), masks.numpy(), predictions.numpy(),
                                   num_classes=num_classes, save_path=path)
    import matplotlib.pyplot as plt
    plt.close(figure)


def main(argv=None) -> dict:
    config = parse_config(Config, argv, description=__doc__.splitlines()[0])
    check_config(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    keras.utils.set_random_seed(config.seed)

    # ---- data ----
    info = data.get_info(config.dataset, data_dir=config.data_dir, task="segmentation")
    num_classes = info.num_classes
    print(f"data: {config.dataset}, {num_classes} classes {list(info.class_names)}, "
          f"{config.image_size}x{config.image_size} pixels")
    train = load_split(config, "train", config.train_examples)
    validation = load_split(config, "validation", config.val_examples)
    check_first_examples(train, num_classes)
    check_first_examples(validation, num_classes)
    if config.cache:
        train, validation = train.cache(), validation.cache()
    train_batches = train.shuffle(2048, seed=config.seed).batch(config.batch_size)
    if config.augment:
        from common import augment

        augmenter = augment.make_augmenter("segmentation", brightness=0.0, contrast=0.0,
                                           saturation=0.0, hue=0.0)
        train_batches = augment.augment_dataset(
            train_batches.map(lambda x, y: {"image": x, "mask": y}), augmenter, seed=config.seed
        ).map(lambda batch: (batch["image"], batch["mask"]))
    train_batches = train_batches.prefetch(tf.data.AUTOTUNE)
    val_batches = validation.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)

    # ---- model ----
    model = build_model(config, num_classes)
    steps_per_epoch = int(train_batches.cardinality())
    if steps_per_epoch < 1:  # unknown cardinality (e.g. filtered folders): count once
        steps_per_epoch = sum(1 for _ in train_batches)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, steps_per_epoch * config.epochs))
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=make_loss(config, train, num_classes),
                  metrics=[losses.MeanIoU(num_classes), losses.PixelAccuracy(num_classes)])
    print(f"model: {model.name}, {model.count_params():,} parameters")

    # ---- train ----
    counter = EpochCounter()
    callbacks = [
        # Re-running with the same --out resumes after the last finished epoch
        # (the backup is kept at the end, so a finished run is not repeated).
        keras.callbacks.BackupAndRestore(str(out / "backup"), delete_checkpoint=False),
        *epoch_log_callbacks(out / "logs"),
        SimpleLogCallback({"loss": "loss", "mIoU": "mean_iou", "val loss": "val_loss",
                           "val mIoU": "val_mean_iou", "val acc": "val_pixel_accuracy"},
                          config.epochs, config.log_frequency),
        TimeBudget(config.time_budget_seconds),
        counter,
    ]
    start = time.perf_counter()
    history = model.fit(train_batches, validation_data=val_batches, epochs=config.epochs,
                        callbacks=callbacks, verbose=0, shuffle=False)  # shuffled in tf.data
    train_seconds = time.perf_counter() - start
    epochs_done = counter.last_epoch or finished_epochs(out)

    # ---- evaluate and write outputs ----
    val_mean_iou, val_pixel_accuracy, per_class = evaluate(model, val_batches, num_classes)
    model.save(out / "model.keras")
    save_prediction_grid(model, val_batches, out / "predictions.png", num_classes)
    if history.history:
        import matplotlib.pyplot as plt
        plt.close(viz.plot_history(history.history, keys=["loss", "mean_iou"],
                                   save_path=out / "history.png"))
    metrics = {
        "val_mean_iou": val_mean_iou,
        "val_pixel_accuracy": val_pixel_accuracy,
        "train_seconds": round(train_seconds, 2),
        "epochs": epochs_done,
        "epochs_this_run": len(history.history.get("loss", [])),
        "model": config.model,
        "parameters": model.count_params(),
    }
    for name, value in zip(info.class_names, per_class):
        metrics[f"val_iou_{name}"] = None if np.isnan(value) else float(value)
    write_metrics(metrics, out)
    print(f"\nSummary: {config.model} on {config.dataset} ({config.image_size}px), "
          f"{epochs_done} epochs, {train_seconds:.0f} s of training in this run\n"
          f"  validation mean IoU {val_mean_iou:.4f}, pixel accuracy {val_pixel_accuracy:.4f}\n"
          f"  per class: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(info.class_names, per_class))
          + f"\n  outputs in {out}/ (metrics.json, predictions.png, model.keras, logs/)")
    return metrics


def finished_epochs(out: Path) -> int:
    """Epochs recorded by BackupAndRestore (used when a resumed run had nothing left to do)."""
    path = out / "backup" / "training_metadata.json"
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, KeyError, ValueError):
        return 0


if __name__ == "__main__":
    main(sys.argv[1:])
