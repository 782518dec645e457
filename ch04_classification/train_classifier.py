"""Train an image classifier from the chapter-4 model zoo on any classification data set.

What this script teaches: the full recipe around a classification network, each piece visible:
    data        common.data.load(name) -> (image, label) batches, cached in memory
    model       ch04_classification.models.get_model(name, ...) (ResNet, VGG, MobileNet, GoogLeNet, ...)
    augment     common.augment.BatchAugmentation inside the train step (on the device; identity at test time)
    loss        sparse categorical cross-entropy; GoogLeNet adds its two auxiliary classifiers' losses
                with weight 0.3 (Szegedy et al. 2015, "Going Deeper with Convolutions", sec. 5)
    optimizer   Adam, SGD with momentum 0.9 (He et al. 2016, sec. 3.4) or AdamW (Loshchilov & Hutter 2019)
    schedule    constant, cosine (Loshchilov & Hutter 2017, "SGDR") or step (divide by 10 at 50 % and 75 %
                of training, as the ResNet CIFAR runs, He et al. 2016 sec. 4.2), with an optional linear
                warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD", sec. 2.2)
    metrics     top-1 and top-5 accuracy (top-5 only with more than 5 classes, else it is always 1)
    bookkeeping SimpleLogCallback, BackupAndRestore (re-running with the same --out resumes), TensorBoard
                logs in <out>/logs, <out>/config.json, <out>/metrics.json, confusion matrix and
                predictions PNGs, the trained network as <out>/model.keras

Run from the repo root (CPU is fine):
    python ch04_classification/train_classifier.py            # resnet_small on shapes_classification
    python ch04_classification/train_classifier.py --fast     # a seconds-long smoke run
    python ch04_classification/train_classifier.py --model googlenet --dataset cifar10 --image-size 64
    python ch04_classification/train_classifier.py --model resnet50 --weights imagenet \\
        --dataset path/to/your/class_folders --image-size 224 --optimizer sgd --learning-rate 0.01
    tensorboard --logdir runs/train_classifier/logs

The default run (no arguments) reaches a validation accuracy of at least 0.98 on the embedded shapes in
well under 5 minutes on a 2-core CPU (see metrics.json for the numbers of your run).
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

from common import augment, callbacks, config as config_lib, data, viz
from ch04_classification import models

OPTIMIZERS = ("adam", "sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")
# Default learning rate and weight decay per optimizer when the user gives none.
DEFAULT_LEARNING_RATES = {"adam": 2e-3, "adamw": 2e-3, "sgd": 0.05}
# Keras applies weight decay decoupled (w -= lr * wd * w): 1e-4 for SGD is the ResNet paper's value
# (sec. 3.4); AdamW's 0.05 is the common setting for it.
DEFAULT_WEIGHT_DECAYS = {"adam": 0.0, "adamw": 0.05, "sgd": 1e-4}
GOOGLENET_AUX_LOSS_WEIGHT = 0.3  # Szegedy et al. 2015, sec. 5: auxiliary losses "weighted by 0.3"
MIN_IMAGE_SIZE = 32  # the zoo's networks downsample by 32
# (smallest, largest) square input of the models that need something else than [32, any):
# LeNet-5 was designed for 32x32 inputs, AlexNet's 11x11/4 stem and three poolings need 67 pixels,
# GoogLeNet's auxiliary classifiers (5x5/3 pooling on inception 4a/4d) need 80.
IMAGE_SIZE_LIMITS = {"lenet5": (20, 32), "lenet5_modern": (20, 32), "alexnet": (67, None), "googlenet": (80, None)}
# The registered classification data sets of common.data ("oxford_iiit_pet" means its 37 breeds).
CLASSIFICATION_DATASETS = ("shapes_classification", "digits", "mnist", "cifar10", "cifar100",
                           "oxford_iiit_pet")


@dataclass
class TrainConfig:
    """Train a chapter-4 classifier. Every option has a default; --fast makes it a smoke run."""

    model: str = field(default="resnet_small", metadata={"help": "a name from ch04_classification.models"})
    dataset: str = field(default="shapes_classification",
                         metadata={"help": "a classification data set of common.data, or a folder of class folders"})
    image_size: int | None = field(default=48, metadata={
        "help": "square side of the images (None: the data set's own size, at least 32)"})
    num_train_examples: int | None = field(default=16000, metadata={
        "help": "train on at most this many examples (None: the whole split)"})
    num_val_examples: int | None = field(default=500, metadata={
        "help": "validate on at most this many examples (None: the whole split)"})
    epochs: int = field(default=12, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    optimizer: str = field(default="adam", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    learning_rate: float | None = field(default=None, metadata={
        "help": "peak learning rate (None: 2e-3 for adam/adamw, 0.05 for sgd)"})
    weight_decay: float | None = field(default=None, metadata={
        "help": "decoupled weight decay (None: 0 for adam, 1e-4 for sgd, 0.05 for adamw)"})
    schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule", "choices": SCHEDULES})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up from 0 over this many epochs"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    aux_loss_weight: float = field(default=GOOGLENET_AUX_LOSS_WEIGHT, metadata={
        "help": "weight of each auxiliary classifier's loss (GoogLeNet)"})
    weights: str | None = field(default=None, metadata={
        "help": "None (random init) or 'imagenet' (keras.applications weights, downloaded; needs internet)"})
    augment: bool = field(default=True, metadata={"help": "batched augmentation inside the train step"})
    flip: bool = field(default=True, metadata={"help": "augmentation: random left-right flips"})
    rotate90: bool | None = field(default=None, metadata={
        "help": "augmentation: random quarter turns (None: on for the rotation-invariant shapes only)"})
    scale_jitter: float = field(default=0.0, metadata={
        "help": "augmentation: VGG scale jittering, zoom in by up to 1 + this (0 = off)"})
    color_jitter: float = field(default=0.0, metadata={
        "help": "augmentation: brightness/contrast/saturation jitter (hue gets a fifth of it; 0 = off)"})
    out: str = field(default="runs/train_classifier", metadata={"help": "output folder; re-use it to resume"})
    seed: int = field(default=0, metadata={"help": "random seed (weights, shuffling, augmentation)"})
    fast: bool = field(default=False, metadata={"help": "tiny sizes for a smoke run (also env CVTF_FAST=1)"})

    FAST: ClassVar[dict] = {"num_train_examples": 128, "num_val_examples": 64, "epochs": 2,
                            "batch_size": 32, "image_size": 32, "warmup_epochs": 0.0}


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="ch04_classification")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then a constant, cosine or step decay.

    Step t (counted from 0), with T = total_steps and W = warmup_steps and p = (t - W) / (T - W) in [0, 1]:
        t < W:      learning_rate * t / W                                  (Goyal et al. 2017, sec. 2.2)
        constant:   learning_rate
        cosine:     learning_rate * (f + (1 - f) * (1 + cos(pi * p)) / 2)  (Loshchilov & Hutter 2017, eq. 5)
        step:       learning_rate * 0.1 ** (number of boundaries <= p), boundaries (0.5, 0.75)
                    (He et al. 2016, sec. 4.2: /10 at 32k and 48k of 64k iterations)
    where f = final_fraction. The same formulas as keras.optimizers.schedules.CosineDecay (with
    warmup_target) and PiecewiseConstantDecay, which the tests use as referees.
    """

    def __init__(self, kind, learning_rate, total_steps, warmup_steps=0, final_fraction=0.0,
                 boundaries=(0.5, 0.75), decay_factor=0.1):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        if int(total_steps) < 1 or not 0 <= int(warmup_steps) <= int(total_steps):
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                             f"got {total_steps!r}, {warmup_steps!r}")
        self.kind = kind
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_fraction = float(final_fraction)
        self.boundaries = tuple(float(b) for b in boundaries)
        self.decay_factor = float(decay_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(max(self.warmup_steps, 1))
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.kind == "cosine":
            cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
            decayed = self.learning_rate * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
        elif self.kind == "step":
            passed = tf.add_n([tf.cast(progress >= b, tf.float32) for b in self.boundaries]) \
                if self.boundaries else 0.0
            decayed = self.learning_rate * tf.pow(self.decay_factor, passed)
        else:
            decayed = tf.constant(self.learning_rate, tf.float32)
        warming = self.learning_rate * step / warmup
        return tf.where(step < self.warmup_steps, warming, decayed)

    def get_config(self):
        return {"kind": self.kind, "learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "final_fraction": self.final_fraction,
                "boundaries": list(self.boundaries), "decay_factor": self.decay_factor}


def make_optimizer(name, learning_rate, weight_decay=None):
    """Adam, SGD (momentum 0.9, Nesterov) or AdamW; `learning_rate` may be a float or a schedule."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAYS[name]
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    decay = weight_decay or None  # Keras: None = no decay
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=decay)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate, weight_decay=decay)


# --------------------------------------------------------------------------------------------------
# The train step: augmentation on the device and auxiliary losses
# --------------------------------------------------------------------------------------------------

def split_outputs(outputs):
    """(main prediction, [auxiliary predictions]) from a network's output.

    A single tensor has no auxiliary outputs. A list/tuple is (main, aux1, aux2, ...). A dict uses the key
    "predictions" (or "main") for the main output; the other keys are auxiliary classifiers in key order.
    """
    if isinstance(outputs, dict):
        main_key = next((k for k in ("predictions", "main", "logits") if k in outputs), None)
        if main_key is None:
            raise ValueError(f"a dict of outputs needs a 'predictions' key, got {sorted(outputs)}")
        return outputs[main_key], [outputs[k] for k in sorted(outputs) if k != main_key]
    if isinstance(outputs, (list, tuple)):
        return outputs[0], list(outputs[1:])
    return outputs, []


class ClassifierTrainer(keras.Model):
    """Wraps a classification network for fit(): augmentation and auxiliary losses live in train_step.

    At inference (call, evaluate, predict) it is the network's main output, [batch, num_classes]
    probabilities. In train_step the batch is augmented on the device by `augmentation` (a
    common.augment.BatchAugmentation layer, or None), the network runs in training mode, and the loss is
        loss(main) + aux_loss_weight * sum(loss(aux_i))
    for networks with auxiliary classifiers (GoogLeNet). Metrics are those of the main output.
    The wrapped network itself stays a plain functional model (saved alone as model.keras).
    """

    def __init__(self, network, augmentation=None, aux_loss_weight=GOOGLENET_AUX_LOSS_WEIGHT, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.augmentation = augmentation
        self.aux_loss_weight = float(aux_loss_weight)
        # Logged as "aux_loss" only for networks with auxiliary classifiers (more than one output).
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss") if len(network.outputs) > 1 else None

    def build(self, input_shape):
        if self.augmentation is not None:
            self.augmentation.build(input_shape)
        self.built = True

    def call(self, images, training=False):
        main, _ = split_outputs(self.network(images, training=training))
        return main

    def train_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.augmentation is not None:
            images = self.augmentation(images, training=True)  # on the device, inside the compiled step
        with tf.GradientTape() as tape:
            main, auxiliary = split_outputs(self.network(images, training=True))
            # compile()'s loss on the main output, plus the regularization losses of the layers.
            loss = self._compute_loss(x=images, y=labels, y_pred=main, sample_weight=sample_weight, training=True)
            aux_loss = tf.constant(0.0)
            for aux in auxiliary:  # the same classification loss on each auxiliary classifier
                aux_loss += tf.reduce_mean(self.loss(labels, aux))
            total = loss + self.aux_loss_weight * aux_loss
        gradients = tape.gradient(total, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self._loss_tracker.update_state(total, sample_weight=tf.shape(images)[0])
        if self.aux_loss_tracker is not None:
            self.aux_loss_tracker.update_state(aux_loss)
        return self.compute_metrics(images, labels, main, sample_weight=sample_weight)

    @property
    def has_auxiliary_outputs(self):
        return self.aux_loss_tracker is not None


def accuracy_metrics(num_classes):
    """Top-1 accuracy, plus top-5 when there are more than 5 classes (with <= 5 it is always 1)."""
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics


def make_augmentation(config):
    """The BatchAugmentation layer of the options (None with --no-augment).

    Quarter turns and flips are exact (no resampling) and keep the label of a rotation-invariant class
    (a turned star is a star), so they are on by default for the shapes; a turned 6 is a 9, so they
    are off for other data. Scale and colour jitter (VGG sec. 3.1, AlexNet sec. 4.1) are options.
    """
    if not config.augment:
        return None
    rotate90 = config.rotate90 if config.rotate90 is not None else config.dataset.startswith("shapes")
    jitter = float(config.color_jitter)
    return augment.BatchAugmentation(
        "classification", seed=config.seed, flip_left_right=0.5 if config.flip else 0.0, rotate90=rotate90,
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
    if config.model not in models.MODEL_NAMES:
        raise ValueError(f"--model must be one of {models.MODEL_NAMES}, got {config.model!r}")
    if config.dataset not in CLASSIFICATION_DATASETS and not Path(config.dataset).is_dir():
        raise ValueError(f"--dataset must be one of {CLASSIFICATION_DATASETS} or an existing folder of "
                         f"class folders, got {config.dataset!r}")
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    for name in ("num_train_examples", "num_val_examples", "image_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be None or >= 1, got {value}")
    if config.weights not in (None, "None", "none", "imagenet"):
        raise ValueError(f"--weights must be None or 'imagenet', got {config.weights!r}")
    if config.scale_jitter < 0 or config.color_jitter < 0:
        raise ValueError(f"--scale-jitter and --color-jitter must be >= 0, got {config.scale_jitter}, "
                         f"{config.color_jitter}")
    if config.warmup_epochs < 0:
        raise ValueError(f"--warmup-epochs must be >= 0, got {config.warmup_epochs}")
    if config.learning_rate is not None and not config.learning_rate > 0:
        raise ValueError(f"--learning-rate must be > 0, got {config.learning_rate}")


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


def load_split(config, split, image_size, num_examples, shuffle):
    """(image, label) batches of one split, decoded once and cached in memory; returns (dataset, count)."""
    dataset = data.load(config.dataset, split, image_size=image_size, num_examples=num_examples,
                        seed=config.seed)
    dataset = data.to_supervised(dataset).cache()
    count = int(dataset.cardinality())
    if count < 0:  # unknown size (folders): one pass fills the cache and counts
        count = sum(1 for _ in dataset)
    if count == 0:
        raise ValueError(f"--dataset {config.dataset!r} has no {split!r} examples")
    if shuffle:
        dataset = dataset.shuffle(min(count, 10000), seed=config.seed, reshuffle_each_iteration=True)
    return dataset.batch(config.batch_size).prefetch(tf.data.AUTOTUNE), count


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

def read_backup_epoch(backup_dir):
    """Epochs already completed by a previous run with the same --out (0 if none)."""
    path = Path(backup_dir) / "training_metadata.json"
    if not path.exists():
        return 0
    return int(json.loads(path.read_text()).get("epoch", 0))


def main(argv=None):
    """Train, evaluate, write <out>/metrics.json and figures; returns the metrics dict."""
    start_time = time.perf_counter()
    config = config_lib.parse_config(TrainConfig, argv, description=__doc__.split("\n")[0])
    if config.weights in ("None", "none"):
        config.weights = None
    check_config(config)
    info = dataset_info(config)
    image_size = resolve_image_size(config, info)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, out)
    keras.utils.set_random_seed(config.seed)

    # Data: generated / decoded once, cached; the first pass fills the cache before the clock starts.
    data_start = time.perf_counter()
    train_data, num_train = load_split(config, "train", image_size, config.num_train_examples, shuffle=True)
    val_data, num_val = load_split(config, "validation", image_size, config.num_val_examples, shuffle=False)
    for _ in train_data:
        pass
    for _ in val_data:
        pass
    data_seconds = time.perf_counter() - data_start

    # Model: the zoo's network inside a trainer that augments and adds auxiliary losses.
    input_shape = (image_size, image_size, 3)
    network = build_network(config, input_shape, info.num_classes)
    augmentation = make_augmentation(config)
    model = ClassifierTrainer(network, augmentation, aux_loss_weight=config.aux_loss_weight,
                              name=f"{config.model}_trainer")
    model(np.zeros((1,) + input_shape, np.float32))  # build (BackupAndRestore needs built weights)

    steps_per_epoch = math.ceil(num_train / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    learning_rate = config.learning_rate or DEFAULT_LEARNING_RATES[config.optimizer]
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps)
    schedule = WarmupSchedule(config.schedule, learning_rate, total_steps, warmup_steps)
    model.compile(
        optimizer=make_optimizer(config.optimizer, schedule, config.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy() if config.label_smoothing == 0
        else _smoothed_loss(info.num_classes, config.label_smoothing),
        metrics=accuracy_metrics(info.num_classes),
        jit_compile=False,  # the augmentation's crop_and_resize has no XLA kernel
    )

    backup_dir = out / "backup"
    initial_epoch = min(read_backup_epoch(backup_dir), config.epochs)
    print(f"{config.model} on {config.dataset}: {num_train} train / {num_val} validation images of "
          f"{image_size}x{image_size}, {info.num_classes} classes, {network.count_params():,} parameters; "
          f"data ready in {data_seconds:.1f} s")
    if initial_epoch:
        print(f"Resuming from {backup_dir}: {initial_epoch} of {config.epochs} epochs already done")
    log_keys = {"loss": "loss", "acc": "accuracy", "val loss": "val_loss", "val acc": "val_accuracy"}
    if info.num_classes > 5:
        log_keys["val top5"] = "val_top5_accuracy"
    if model.has_auxiliary_outputs:
        log_keys["aux loss"] = "aux_loss"
    fit_callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
        callbacks.SimpleLogCallback(log_keys, config.epochs),
        *callbacks.epoch_log_callbacks(out / "logs", "history.csv"),
    ]
    train_start = time.perf_counter()
    history = model.fit(train_data, validation_data=val_data, epochs=config.epochs, callbacks=fit_callbacks,
                        verbose=0, shuffle=False)  # the tf.data pipeline shuffles
    train_seconds = time.perf_counter() - train_start

    # Final evaluation, figures, the trained network.
    results = model.evaluate(val_data, verbose=0, return_dict=True)
    true, predicted, _ = predict_labels(model, val_data)
    matrix = confusion_matrix(true, predicted, info.num_classes)
    viz.plot_confusion_matrix(matrix, info.class_names, save_path=out / "confusion_matrix.png")
    save_prediction_grid(model, val_data, info.class_names, out / "predictions.png")
    if history.history:
        viz.plot_history(history, keys=["loss", "accuracy"], save_path=out / "history.png")
    import matplotlib.pyplot as plt

    plt.close("all")
    network.save(out / "model.keras")

    metrics = {
        "val_accuracy": float(results["accuracy"]),
        "val_loss": float(results["loss"]),
        "train_seconds": round(train_seconds, 2),
        "data_seconds": round(data_seconds, 2),
        "total_seconds": round(time.perf_counter() - start_time, 2),
        "epochs": config.epochs,
        "epochs_this_run": len(history.epoch),
        "initial_epoch": initial_epoch,
        "num_train_examples": num_train,
        "num_val_examples": num_val,
        "image_size": image_size,
        "num_parameters": int(network.count_params()),
    }
    if "top5_accuracy" in results:
        metrics["val_top5_accuracy"] = float(results["top5_accuracy"])
    config_lib.write_metrics(metrics, out)
    summary = f"val accuracy {metrics['val_accuracy']:.4f}"
    if "val_top5_accuracy" in metrics:
        summary += f", top-5 {metrics['val_top5_accuracy']:.4f}"
    print(f"Done: {summary} after {config.epochs} epochs; training {train_seconds:.1f} s "
          f"(this run: {len(history.epoch)} epochs), total {metrics['total_seconds']:.1f} s. Outputs in {out}/")
    return metrics


def _smoothed_loss(num_classes, label_smoothing):
    """Label smoothing needs one-hot targets in Keras; this keeps integer labels at the interface."""

    def loss(labels, predictions):
        one_hot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), num_classes)
        return keras.losses.categorical_crossentropy(one_hot, predictions, label_smoothing=label_smoothing)

    return loss


if __name__ == "__main__":
    main()
