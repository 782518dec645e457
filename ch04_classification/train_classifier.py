"""Train an image classifier from the chapter-4 model zoo on any classification data set.

What this script teaches: the full recipe around a classification network, each piece visible:
    data        common.data.load(name) -> (image, label) batches, cached in memory
    model       ch04_classification.models.get_model(name, ...) (ResNet, VGG, MobileNet, GoogLeNet, ...)
    augment     common.augment.BatchAugmentation inside the train step (on the device; identity at test time)
    loss        sparse categorical cross-entropy; GoogLeNet adds its two auxiliary classifiers' losses
                with weight 0.3 (Szegedy et al. 2015, "Going Deeper with Convolutions", sec. 5)
    optimizer   Adam, SGD with momentum 0.9 (He et al. 2016, sec. 3.4) or AdamW (Loshchilov & Hutter 2019)
    schedule    Keras' CosineDecay (Loshchilov & Hutter 2017, "SGDR") or a constant rate, after a linear
                warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD", sec. 2.2)
    metrics     top-1 and top-5 accuracy (top-5 only with more than 5 classes, else it is always 1)
    bookkeeping common/training.py: exact resume (re-running with the same --out continues where a
                killed run stopped), time budget, TensorBoard and CSV logs in <out>/logs,
                <out>/config.json, <out>/metrics.json; here: confusion matrix and predictions PNGs,
                the trained network as <out>/model.keras (+ class_names.json)

Run from the repo root (CPU is fine):
    python ch04_classification/train_classifier.py            # resnet_small on shapes_classification
    python ch04_classification/train_classifier.py --fast     # a seconds-long smoke run
    python ch04_classification/train_classifier.py --model googlenet --dataset cifar10 --image-size 64
    python ch04_classification/train_classifier.py --model resnet50 --weights imagenet \\
        --dataset path/to/your/class_folders --image-size 224 --optimizer sgd --learning-rate 0.01
    tensorboard --logdir runs/train_classifier/logs

The default run (no arguments) reaches a validation accuracy of at least 0.985 on the embedded shapes in
about 3 minutes of training on a quiet 2-core CPU; its 4.5-minute time budget ends it within 5 minutes
on a slower or busier machine (see metrics.json for the numbers of your run).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from common import augment, data, training, viz
from ch04_classification import models, tta
from ch04_classification.trainer import GOOGLENET_AUX_LOSS_WEIGHT, ClassifierTrainer, accuracy_metrics

# Default peak learning rate per optimizer when the user gives none; Keras' decoupled weight decay
# defaults (common.training.make_optimizer): 0 for Adam and SGD, 0.05 for AdamW.
DEFAULT_LEARNING_RATES = {"adam": 2e-3, "adamw": 2e-3, "sgd": 0.05}
MIN_IMAGE_SIZE = 32  # the zoo's networks downsample by 32
# (smallest, largest) square input of the models that need something else than [32, any):
# LeNet-5 was designed for 32x32 inputs, AlexNet's 11x11/4 stem and three poolings need 67 pixels,
# GoogLeNet's auxiliary classifiers (5x5/3 pooling on inception 4a/4d) need 80.
IMAGE_SIZE_LIMITS = {"lenet5": (20, 32), "lenet5_modern": (20, 32), "alexnet": (67, None), "googlenet": (80, None)}
# The registered classification data sets of common.data ("oxford_iiit_pet" means its 37 breeds).
CLASSIFICATION_DATASETS = ("shapes_classification", "digits", "mnist", "cifar10", "cifar100",
                           "oxford_iiit_pet")


@dataclass
class TrainConfig(augment.WarpOptions, training.TrainingConfig):
    """Train a chapter-4 classifier. Every option has a default; --fast makes it a smoke run."""

    model: str = field(default="resnet_small", metadata={
        "help": "a network of ch04_classification.models", "choices": models.MODEL_NAMES})
    dataset: str = field(default="shapes_classification",
                         metadata={"help": "a classification data set of common.data "
                                           f"({', '.join(CLASSIFICATION_DATASETS)}) or a folder of "
                                           "class folders"})
    image_size: int | None = field(default=64, metadata={
        "help": "square side of the images (None: the data set's own size, at least 32; 64 is the "
                "shapes' own: at 48 px a thin star passes for a cross)"})
    num_train_examples: int | None = field(default=16000, metadata={
        "help": "train on at most this many examples (None: the whole split)"})
    num_val_examples: int | None = field(default=500, metadata={
        "help": "validate on at most this many examples (None: the whole split)"})
    epochs: int = field(default=14, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=64, metadata={"help": "examples per step, over all replicas"})
    optimizer: str = field(default="adam", metadata={"help": "optimizer", "choices": training.OPTIMIZERS})
    learning_rate: float | None = field(default=None, metadata={
        "help": "peak learning rate (None: 2e-3 for adam/adamw, 0.05 for sgd)"})
    weight_decay: float | None = field(default=None, metadata={
        "help": "decoupled weight decay (None: 0 for adam and sgd, 0.05 for adamw)"})
    schedule: str = field(default="cosine", metadata={
        "help": "learning rate after the warm-up: cosine decay to 0, or constant",
        "choices": training.SCHEDULES})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up from 0 over this many epochs"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    aux_loss_weight: float = field(default=GOOGLENET_AUX_LOSS_WEIGHT, metadata={
        "help": "weight of each auxiliary classifier's loss (GoogLeNet)"})
    weights: str | None = field(default=None, metadata={
        "help": "None (random init) or 'imagenet' (keras.applications weights, downloaded; needs internet)"})
    sync_batchnorm: bool = field(default=False, metadata={
        "help": "batch statistics over all replicas (BatchNormalization(synchronized=True))"})
    augment: bool = field(default=True, metadata={"help": "batched augmentation inside the train step"})
    flip: bool | None = field(default=None, metadata={
        "help": "augmentation: random left-right flips (None: on for the mirror-symmetric shapes only; "
                "a mirrored digit or letter is another image)"})
    rotate90: bool | None = field(default=None, metadata={
        "help": "augmentation: random quarter turns (None: on for the rotation-invariant shapes only)"})
    scale_jitter: float = field(default=0.0, metadata={
        "help": "augmentation: VGG scale jittering, zoom in by up to 1 + this (0 = off)"})
    color_jitter: float = field(default=0.0, metadata={
        "help": "augmentation: brightness/contrast/saturation jitter (hue gets a fifth of it; 0 = off)"})
    tta: bool = field(default=False, metadata={
        "help": "also report validation accuracy with test-time augmentation: predictions averaged "
                "over scales 0.875/1/1.125 and, where training flips, left-right flips (VGG sec. 3.2, "
                "4.2)"})
    time_budget_minutes: float = field(default=4.5, metadata={
        "help": "end after the last epoch that fits in this many minutes of training, the cosine "
                "decay shortened to match (0 = no budget)"})
    out: str = field(default="runs/train_classifier", metadata={"help": "output folder; re-use it to resume"})

    FAST: ClassVar[dict] = {"num_train_examples": 128, "num_val_examples": 64, "epochs": 2,
                            "batch_size": 32, "image_size": 32, "warmup_epochs": 0.0,
                            "time_budget_minutes": 0.0}


# --------------------------------------------------------------------------------------------------
# Augmentation and the network
# --------------------------------------------------------------------------------------------------

def make_augmentation(config):
    """The BatchAugmentation layer of the options (None with --no-augment).

    Quarter turns and flips are exact (no resampling) and keep the label of a rotation-invariant class
    (a turned star is a star), so they are on by default for the shapes; a turned 6 is a 9, so they
    are off for other data. Scale and colour jitter (VGG sec. 3.1, AlexNet sec. 4.1), rotation by
    any angle, shear and elastic warping (Simard et al. 2003) are options.
    """
    if not config.augment:
        return None
    rotate90 = config.rotate90 if config.rotate90 is not None else config.dataset.startswith("shapes")
    flip = config.flip if config.flip is not None else config.dataset.startswith("shapes")
    jitter = float(config.color_jitter)
    return augment.BatchAugmentation(
        "classification", seed=config.seed, flip_left_right=0.5 if flip else 0.0, rotate90=rotate90,
        rotation=config.rotation, shear=config.shear, elastic_alpha=config.elastic_alpha,
        vgg_scale_range=(1.0, 1.0 + config.scale_jitter) if config.scale_jitter > 0 else None,
        brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 5)


def build_network(config, input_shape, num_classes):
    """The zoo's network; GoogLeNet is asked for its auxiliary classifiers (used in training only)."""
    options = {}
    if config.weights is not None:
        options["weights"] = config.weights
    if config.model == "googlenet":
        options["aux_classifiers"] = True
    return models.get_model(config.model, input_shape, num_classes, **options)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def check_config(config):
    """ValueError naming the option for anything we can check before loading data."""
    if config.weights in ("None", "none"):
        config.weights = None
    if config.model not in models.MODEL_NAMES:
        raise ValueError(f"--model must be one of {models.MODEL_NAMES}, got {config.model!r}")
    if config.dataset not in CLASSIFICATION_DATASETS and not Path(config.dataset).is_dir():
        raise ValueError(f"--dataset must be one of {CLASSIFICATION_DATASETS} or an existing folder of "
                         f"class folders, got {config.dataset!r}")
    for name in ("num_train_examples", "num_val_examples", "image_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be None or >= 1, got {value}")
    if config.weights not in (None, "imagenet"):
        raise ValueError(f"--weights must be None or 'imagenet', got {config.weights!r}")
    if config.scale_jitter < 0 or config.color_jitter < 0:
        raise ValueError(f"--scale-jitter and --color-jitter must be >= 0, got {config.scale_jitter}, "
                         f"{config.color_jitter}")
    augment.check_warp_options(config)
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.learning_rate is None:
        config.learning_rate = DEFAULT_LEARNING_RATES[config.optimizer]


def dataset_info(config):
    info = data.get_info(config.dataset)
    if info.task != "classification":
        raise ValueError(f"--dataset must be a classification data set, {config.dataset!r} is {info.task}")
    return info


def resolve_image_size(config, info, print_fn=print):
    """The square side used for training: --image-size, else the data set's size, within the model's limits.

    Sizes outside what the model accepts (IMAGE_SIZE_LIMITS, at least 32 for the rest) are moved to the
    nearest allowed size with a note, so e.g. `--model googlenet --fast` trains at 80 pixels.
    """
    if config.image_size is not None:
        size = int(config.image_size)
    elif info.image_size is None:
        raise ValueError(f"--image-size is needed for {config.dataset!r} (its images differ in size)")
    else:
        size = int(max(info.image_size))
    low, high = IMAGE_SIZE_LIMITS.get(config.model, (MIN_IMAGE_SIZE, None))
    allowed = max(size, low) if high is None else min(max(size, low), high)
    if allowed != size:
        print_fn(f"note: {config.model} needs images of {low} to {high or 'any'} pixels; using {allowed} "
                 f"instead of {size}")
    return allowed


def load_split(config, split, image_size, num_examples):
    """(image, label) examples of one split, decoded once and cached in memory; returns (dataset, count)."""
    dataset = data.load(config.dataset, split, image_size=image_size, num_examples=num_examples,
                        seed=config.seed)
    dataset = data.to_supervised(dataset).cache()
    count = int(dataset.cardinality())
    if count < 0:  # unknown size (folders): one pass fills the cache and counts
        count = sum(1 for _ in dataset)
    if count == 0:
        raise ValueError(f"--dataset {config.dataset!r} has no {split!r} examples")
    return dataset, count


# --------------------------------------------------------------------------------------------------
# Evaluation and figures
# --------------------------------------------------------------------------------------------------

def predict_labels(model, dataset):
    """(true labels [N], predicted labels [N], probabilities [N, classes]) over a batched dataset."""
    true, probabilities = [], []
    for images, labels in dataset:
        probabilities.append(np.asarray(model(images, training=False)))
        true.append(np.asarray(labels))
    probabilities = np.concatenate(probabilities)
    return np.concatenate(true), probabilities.argmax(axis=-1), probabilities


def confusion_matrix(true, predicted, num_classes):
    """matrix[i, j] = number of examples of class i predicted as class j."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def save_prediction_grid(model, dataset, class_names, save_path, count=16):
    """A grid of validation images titled "predicted (true)"; wrong ones marked with an x."""
    images, labels = next(iter(dataset.unbatch().batch(count)))
    predicted = np.asarray(model(images, training=False)).argmax(axis=-1)
    titles = [f"{'' if p == t else 'x '}{class_names[p]} ({class_names[t]})"
              for p, t in zip(predicted, np.asarray(labels))]
    return viz.show_images(np.asarray(images), titles=titles, cols=4, save_path=save_path)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main(argv=None):
    """Train, evaluate, write <out>/metrics.json and figures; returns the metrics dict."""
    run = training.start_run(TrainConfig, argv, check=check_config,
                             description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    info = dataset_info(config)
    image_size = resolve_image_size(config, info)

    # Data: generated / decoded once and cached; the first pass fills the cache before the clock starts.
    data_start = time.perf_counter()
    train_examples, num_train = load_split(config, "train", image_size, config.num_train_examples)
    val_examples, num_val = load_split(config, "validation", image_size, config.num_val_examples)
    for _ in train_examples.batch(1024):
        pass
    val_data = val_examples.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    for _ in val_data:
        pass
    data_seconds = time.perf_counter() - data_start
    steps_per_epoch = math.ceil(num_train / config.batch_size)

    # Model: the zoo's network inside a trainer that augments and adds auxiliary losses.
    input_shape = (image_size, image_size, 3)
    with run.strategy.scope():
        network = build_network(config, input_shape, info.num_classes)
        if config.sync_batchnorm:
            network = training.synchronize_batchnorm(network)
        model = ClassifierTrainer(network, make_augmentation(config), aux_loss_weight=config.aux_loss_weight,
                                  name=f"{config.model}_trainer")
        model(np.zeros((1,) + input_shape, np.float32))  # build every weight before a resume loads them
        model.compile(
            optimizer=run.optimizer(steps_per_epoch, config.optimizer, weight_decay=config.weight_decay,
                                    kind=config.schedule),
            loss=keras.losses.SparseCategoricalCrossentropy() if config.label_smoothing == 0
            else _smoothed_loss(info.num_classes, config.label_smoothing),
            metrics=accuracy_metrics(info.num_classes),
            jit_compile=False if config.augment else run.jit_compile,  # crop_and_resize has no XLA kernel
        )
    print(f"{config.model} on {config.dataset}: {num_train} train / {num_val} validation images of "
          f"{image_size}x{image_size}, {info.num_classes} classes, {network.count_params():,} parameters, "
          f"{run.replicas} replica(s); data ready in {data_seconds:.1f} s")
    log_keys = {"loss": "loss", "acc": "accuracy", "val loss": "val_loss", "val acc": "val_accuracy"}
    if info.num_classes > 5:
        log_keys["val top5"] = "val_top5_accuracy"
    if model.has_auxiliary_outputs:
        log_keys["aux loss"] = "aux_loss"
    run.fit(model, lambda first_epoch: training.epoch_batches(
                train_examples, config.batch_size, first_epoch, config.epochs, seed=config.seed),
            steps_per_epoch, validation_data=val_data, log_keys=log_keys)

    # Final evaluation, figures, the trained network (with its class names beside it).
    results = model.evaluate(val_data, verbose=0, return_dict=True)
    true, predicted, _ = predict_labels(model, val_data)
    matrix = confusion_matrix(true, predicted, info.num_classes)
    viz.plot_confusion_matrix(matrix, info.class_names, save_path=out / "confusion_matrix.png")
    save_prediction_grid(model, val_data, info.class_names, out / "predictions.png")
    import matplotlib.pyplot as plt

    plt.close("all")
    network.save(out / "model.keras")
    (out / "class_names.json").write_text(json.dumps(list(info.class_names)) + "\n")

    metrics = {
        "val_accuracy": float(results["accuracy"]),
        "val_loss": float(results["loss"]),
        "data_seconds": round(data_seconds, 2),
        "num_train_examples": num_train,
        "num_val_examples": num_val,
        "image_size": image_size,
        "parameters": int(network.count_params()),
    }
    if "top5_accuracy" in results:
        metrics["val_top5_accuracy"] = float(results["top5_accuracy"])
    if config.tta:
        # Flip at test time only where training flipped (a mirrored digit is another digit).
        flips = config.flip if config.flip is not None else config.dataset.startswith("shapes")
        result = tta.evaluate_tta(network, val_data, flips=flips, batch_size=config.batch_size)
        metrics["val_accuracy_tta"] = float(result["tta_accuracy"])
        metrics["val_accuracy_tta_plain"] = float(result["accuracy"])  # the same views as val_accuracy
        metrics["tta_views"] = int(result["num_views"])
    metrics = run.finish(metrics, history_keys=["loss", "accuracy"])
    summary = f"val accuracy {metrics['val_accuracy']:.4f}"
    if "val_top5_accuracy" in metrics:
        summary += f", top-5 {metrics['val_top5_accuracy']:.4f}"
    if "val_accuracy_tta" in metrics:
        summary += f", with test-time augmentation ({metrics['tta_views']} views) {metrics['val_accuracy_tta']:.4f}"
    print(f"Done: {summary} after {metrics['epochs']} epochs; {metrics['train_seconds']:.1f} s of training "
          f"in all (this run: {metrics['epochs_this_run']} epochs). Outputs in {out}/")
    return metrics


def _smoothed_loss(num_classes, label_smoothing):
    """Label smoothing needs one-hot targets in Keras; this keeps integer labels at the interface."""
    return SparseSmoothedCrossentropy(num_classes, label_smoothing)


@keras.saving.register_keras_serializable(package="ch04_classification")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy with label smoothing (Szegedy et al. 2016, sec. 7) on integer labels.

    A ``keras.losses.Loss``, so Keras averages it over the batch and divides it by the replicas.
    """

    def __init__(self, num_classes, label_smoothing, name="smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)

    def call(self, labels, predictions):
        one_hot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), self.num_classes)
        return keras.losses.categorical_crossentropy(one_hot, predictions,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing}


if __name__ == "__main__":
    main()
