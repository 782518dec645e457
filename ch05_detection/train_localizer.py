"""Train one network to say what is in an image, where (a box) or which points (landmarks).

What this script teaches: object localization and landmark detection, the step between
classification (chapter 4) and detection. The images of the `shapes_localization` data hold zero or
one shape; a chapter-4 backbone with a two-branch head (ch05_detection/localization.py) outputs

    --task localization   y = [p_c, b_x, b_y, b_h, b_w, c_1..c_K]   is there a shape, its box, its class
    --task landmarks      y = [p_c, x_1, y_1, ..., x_L, y_L, v_1..v_L]   its centre and corners / tips

trained with the lecture's squared error (`--loss lecture`) or the modern split (`--loss modern`:
binary cross-entropy for p_c, cross-entropy for the class, smooth L1 for coordinates; Girshick,
"Fast R-CNN", ICCV 2015, eq. 2-3). Regressing a box from a CNN's features is how OverFeat localised
(Sermanet et al., ICLR 2014, sec. 4); the landmark points come from one heatmap per point and its
soft-argmax (integral regression, Sun et al., ECCV 2018), or with `--point-head dense` from the
lecture's dense regression (as DeepPose, Toshev & Szegedy, CVPR 2014). Landmark 1 is the corner the
generator marks with a small disc, the others follow clockwise. The training batches are flipped and
transposed at random (the 8 symmetries of a square), with the boxes and points moved to match and the
landmarks numbered again (`random_dihedral`).

Run from the repo root (CPU is fine):
    python ch05_detection/train_localizer.py                          # --task localization
    python ch05_detection/train_localizer.py --task landmarks
    python ch05_detection/train_localizer.py --loss lecture           # the course's squared error
    python ch05_detection/train_localizer.py --fast                   # a seconds-long smoke run
Outputs in runs/train_localizer/<task>/ (config.json, checkpoint/, logs/, metrics.json, history.png,
predictions.png, model.keras); re-run the same command to resume.

The default runs, measured once each on the project's shared 2-core CPU (up to 20 epochs of 8000
images):
    --task localization: val_presence_accuracy 0.992, val_class_accuracy 0.992 (357 of the 360
                         images with a shape), val_mean_iou 0.836 in 172 s of training, 17 epochs
                         (load average 4.2 to 3.8); with --seed 1 (other images): 0.998, 0.990,
                         0.837, all 20 epochs in 146 s (load 1.7 to 1.2). With the landmark run's
                         learning rate (2e-3) and the class weighted 1 it had reached class accuracy
                         0.947 and 0.958 only.
    --task landmarks:    val_presence_accuracy 0.998, val_nme 0.035 of the image side in 257 s of
                         training (load average 1.4 to 4.6)
Each run stops within its 5-minute time budget (`--time-budget-minutes`); on a busier machine the
budget cuts epochs and the numbers are lower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import tensorflow as tf

from ch04_classification import models
from ch05_detection import localization
from common import data, training

DATASET = "shapes_localization"
DEFAULT_OUT = "runs/train_localizer"
# Per task: the box shares the network with the class (a heavier box term slows the classes down);
# points are the only hard output of the landmark task, and an almost-L1 loss (small beta) keeps
# pushing errors of a pixel or two, as Feng et al. found for facial landmarks ("Wing Loss", CVPR 2018).
COORDINATE_WEIGHTS = {"localization": 1.0, "landmarks": 5.0}
BETAS = {"localization": 0.1, "landmarks": 0.02}
# The class is the output the localization network learns last (the box is good long before the
# class is), so its run gets a higher peak learning rate and twice the weight on the class's
# cross-entropy. Measured on 1,250 steps of 4,000 images (class accuracy on 1,000 validation images):
# 2e-3 and weight 1: 0.54; 4e-3: 0.72; 6e-3: 0.73; 2e-3 and weight 2: 0.58; 6e-3 and weight 2: 0.85.
LEARNING_RATES = {"localization": 6e-3, "landmarks": 2e-3}


@dataclass
class Config(training.TrainingConfig):
    """Train a localization (class + box) or landmark network on images with zero or one shape."""

    task: str = field(default="localization", metadata={
        "help": "what the head outputs: localization (p_c, box, class) or landmarks (p_c, points)",
        "choices": localization.TASKS})
    loss: str = field(default="modern", metadata={
        "help": "lecture (squared error over every output when p_c = 1, only p_c's when p_c = 0) or "
                "modern (BCE for p_c, CE for the class, smooth L1 for coordinates)",
        "choices": localization.LOSS_KINDS})
    point_head: str = field(default="heatmap", metadata={
        "help": "--task landmarks: heatmap (a soft-argmax per point, integral regression) or dense "
                "(the lecture's regression by a dense layer)", "choices": localization.POINT_HEADS})
    backbone: str = field(default="resnet_small", metadata={
        "help": "a chapter-4 backbone (ch04_classification.models)", "choices": models.BACKBONE_NAMES})
    image_size: int = field(default=64, metadata={"help": "square side of the images"})
    num_train_examples: int = field(default=8000, metadata={"help": "training images (generated once)"})
    num_val_examples: int = field(default=500, metadata={"help": "validation images"})
    epochs: int = field(default=20, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=32, metadata={"help": "examples per step, over all replicas"})
    learning_rate: float | None = field(default=None, metadata={
        "help": f"peak learning rate (Adam; None: {LEARNING_RATES})"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up from 0 over this many epochs"})
    coordinate_weight: float | None = field(default=None, metadata={
        "help": "--loss modern: weight of the smooth L1 of the box or of the points (None: "
                f"{COORDINATE_WEIGHTS})"})
    beta: float | None = field(default=None, metadata={
        "help": "--loss modern: smooth L1 is quadratic below this error, a fraction of the image side "
                f"(None: {BETAS})"})
    class_weight: float = field(default=2.0, metadata={
        "help": "--task localization, --loss modern: weight of the class's cross-entropy"})
    hidden_units: int = field(default=256, metadata={"help": "width of each head branch's dense layer"})
    augment: bool = field(default=True, metadata={
        "help": "random flips and transposes of the training batches (targets moved to match)"})
    time_budget_minutes: float = field(default=5.0, metadata={
        "help": "end after the last epoch that fits in this many minutes of training, the cosine "
                "decay shortened to match (0 = no budget)"})
    out: str = field(default=DEFAULT_OUT, metadata={
        "help": f"output folder; re-run with it to resume ({DEFAULT_OUT} becomes {DEFAULT_OUT}/<task>)"})

    FAST: ClassVar[dict] = {"num_train_examples": 64, "num_val_examples": 32, "epochs": 2,
                            "batch_size": 16, "image_size": 32, "hidden_units": 16,
                            "warmup_epochs": 0.0, "time_budget_minutes": 0.0}


def check_config(config):
    """ValueError naming the option for anything the harness does not check."""
    if config.task not in localization.TASKS:
        raise ValueError(f"--task must be one of {localization.TASKS}, got {config.task!r}")
    if config.loss not in localization.LOSS_KINDS:
        raise ValueError(f"--loss must be one of {localization.LOSS_KINDS}, got {config.loss!r}")
    if config.point_head not in localization.POINT_HEADS:
        raise ValueError(f"--point-head must be one of {localization.POINT_HEADS}, got {config.point_head!r}")
    if config.backbone not in models.BACKBONE_NAMES:
        raise ValueError(f"--backbone must be one of {models.BACKBONE_NAMES}, got {config.backbone!r}")
    if config.image_size < 32:
        raise ValueError(f"--image-size must be >= 32 (the backbone downsamples by 32), got "
                         f"{config.image_size}")
    for name in ("num_train_examples", "num_val_examples", "hidden_units"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.num_train_examples < config.batch_size:
        raise ValueError(f"--num-train-examples ({config.num_train_examples}) must be at least "
                         f"--batch-size ({config.batch_size})")
    if config.coordinate_weight is None:
        config.coordinate_weight = COORDINATE_WEIGHTS[config.task]
    if config.beta is None:
        config.beta = BETAS[config.task]
    if config.learning_rate is None:
        config.learning_rate = LEARNING_RATES[config.task]
    for name in ("coordinate_weight", "beta", "class_weight"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    if config.out.rstrip("/") == DEFAULT_OUT:  # one folder per task, so the two never collide
        config.out = f"{DEFAULT_OUT}/{config.task}"


# --------------------------------------------------------------------------------------------------
# Data, loss, metrics
# --------------------------------------------------------------------------------------------------
def load_split(config, split, num_examples):
    """(image, y) examples of one split, generated once and cached in memory."""
    info = data.get_info(DATASET)
    dataset = data.load(DATASET, split, image_size=config.image_size, num_examples=num_examples,
                        seed=config.seed)
    dataset = dataset.map(localization.example_to_target(config.task, info.num_classes),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    for _ in dataset.batch(1024):  # fill the cache now, before the training clock starts
        pass
    return dataset


def training_batches(config, examples, steps_per_epoch):
    """``first_epoch -> batches``: each epoch's order a pure function of (seed, epoch) and each batch's
    flips a pure function of (seed, step), so a resumed run sees exactly the batches of an
    uninterrupted one."""

    def make(first_epoch):
        batches = training.epoch_batches(examples, config.batch_size, first_epoch, config.epochs,
                                         seed=config.seed, drop_remainder=True)
        if not config.augment:
            return batches
        first_step = int(first_epoch) * steps_per_epoch

        def flip(step, batch):
            images, targets = batch
            return localization.random_dihedral(images, targets, tf.stack([tf.cast(config.seed, tf.int64), step]),
                                                config.task)

        return batches.enumerate(start=first_step).map(flip, num_parallel_calls=tf.data.AUTOTUNE,
                                                       deterministic=True)

    return make


def make_loss(config):
    if config.task == "localization":
        return localization.LocalizationLoss(config.loss, box_weight=config.coordinate_weight,
                                             beta=config.beta, class_weight=config.class_weight)
    return localization.LandmarkLoss(config.loss, point_weight=config.coordinate_weight, beta=config.beta)


def make_metrics(config):
    if config.task == "localization":
        return localization.localization_metrics()
    return localization.landmark_metrics()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    """Train, evaluate, write <out>/metrics.json and pictures; returns the metrics dict."""
    run = training.start_run(Config, argv, check=check_config, description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    info = data.get_info(DATASET)

    data_start = time.perf_counter()
    train_examples = load_split(config, "train", config.num_train_examples)
    val_examples = load_split(config, "validation", config.num_val_examples)
    val_data = val_examples.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)
    data_seconds = time.perf_counter() - data_start
    steps_per_epoch = config.num_train_examples // config.batch_size  # full batches only

    input_shape = (config.image_size, config.image_size, 3)
    with run.strategy.scope():
        model = localization.build_localizer(input_shape, info.num_classes, config.task,
                                             backbone=config.backbone, point_head=config.point_head,
                                             hidden_units=config.hidden_units)
        model.compile(optimizer=run.optimizer(steps_per_epoch), loss=make_loss(config),
                      metrics=make_metrics(config), jit_compile=run.jit_compile)
    print(f"{config.task} on {DATASET}: {config.num_train_examples} train / {config.num_val_examples} "
          f"validation images of {config.image_size}x{config.image_size}, {config.loss} loss, "
          f"{model.count_params():,} parameters, {run.replicas} replica(s); data ready in "
          f"{data_seconds:.1f} s")
    if config.task == "localization":
        log_keys = {"loss": "loss", "val loss": "val_loss", "val presence": "val_presence_accuracy",
                    "val class": "val_class_accuracy", "val IoU": "val_mean_iou"}
    else:
        log_keys = {"loss": "loss", "val loss": "val_loss", "val presence": "val_presence_accuracy",
                    "val NME": "val_nme"}
    run.fit(model, training_batches(config, train_examples, steps_per_epoch), steps_per_epoch,
            validation_data=val_data, log_keys=log_keys)

    # Final evaluation, pictures, the trained network.
    results = model.evaluate(val_data, verbose=0, return_dict=True)
    images, targets = next(iter(val_examples.batch(16)))
    outputs = model.predict(images, verbose=0)
    import matplotlib.pyplot as plt

    if config.task == "localization":
        localization.show_localization(images, outputs, targets, info.class_names,
                                       save_path=out / "predictions.png")
    else:
        localization.show_landmarks(images, outputs, targets, save_path=out / "predictions.png")
    plt.close("all")
    model.save(out / "model.keras")

    metrics = {f"val_{key}": float(value) for key, value in results.items()}
    metrics.update({"data_seconds": round(data_seconds, 2), "task": config.task, "loss_kind": config.loss,
                    "num_train_examples": config.num_train_examples,
                    "num_val_examples": config.num_val_examples, "image_size": config.image_size})
    metrics = run.finish(metrics, model=model, history_keys=["loss"] + list(
        name.removeprefix("val_") for name in log_keys.values()))
    if config.task == "localization":
        summary = (f"presence accuracy {metrics['val_presence_accuracy']:.3f}, class accuracy "
                   f"{metrics['val_class_accuracy']:.3f}, mean box IoU {metrics['val_mean_iou']:.3f}")
    else:
        summary = (f"presence accuracy {metrics['val_presence_accuracy']:.3f}, NME "
                   f"{metrics['val_nme']:.4f} of the image side")
    print(f"Done ({config.task}, {config.loss} loss): validation {summary} after {metrics['epochs']} "
          f"epochs; {metrics['train_seconds']:.1f} s of training in all. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main()
