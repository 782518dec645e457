"""Score CNN explanations on ground truth: the pointing game on single-object shapes.

What this script teaches: an explanation method can be *measured* when we know where the object is.
A CAM-ready classifier (a chapter-4 backbone, global average pooling, one dense layer) is trained on
`shapes` images with exactly one object at a random position and size on the textured background,
then every method of `ch04_classification/interpret.py` explains the true class of held-out images:
    pointing game   a hit when the heatmap's maximum lies inside the object's box (Zhang et al. 2016,
                    "Top-down Neural Attention by Excitation Backprop", sec. 5.1; they allow 15 pixels
                    of tolerance on full-size photographs, `--tolerance` here, 0 by default)
    mass in box     the share of the heatmap's (non-negative) mass inside the box
    centre baseline a fixed point at the image centre (and, for the mass, a centred Gaussian): what a
                    method scores without looking at the image; the object's random position keeps it low
    sanity check    Adebayo et al. 2018 ("Sanity Checks for Saliency Maps", sec. 3.1): the mean Spearman
                    rank correlation between each method's maps for the trained network and for the same
                    network re-initialised. Near 1 = the map does not depend on what the model learned.
The data: `interpret.single_object_dataset` draws `common.synthetic.make_scene` scenes with exactly one shape.
The training (`train_classifier`) has two stages on the harness `common/training.py` (config.json,
resume with the same --out, --time-budget-minutes): big centred shapes first, then the scenes.

Run from the repo root:
    python ch04_classification/score_explanations.py           # train the default classifier, score
    python ch04_classification/score_explanations.py --fast    # a smoke run on tiny data
    python ch04_classification/score_explanations.py --model-path runs/score_explanations/model.keras \\
        --out runs/score_again                                   # score a saved classifier
Outputs in --out: metrics.json (pointing_<method>, mass_in_box_<method>, pointing_center,
sanity_spearman_<method>, val_accuracy, ...), explanations.png (every method on the same images,
box dashed, maximum marked), model.keras, config.json, history.png.

What the default run reaches (measured once, on a 2-core CPU shared with other jobs: load average 6.7
at the start, 9.5 at the end, this process got 55 % of the CPU): 8 min 7 s wall clock, 269 s of CPU
time; 323 s of training (24000 centred shapes x 5 epochs, then 12000 scenes x 3 epochs), 72 s of
scoring. Validation accuracy 0.940 on 300 held-out single-object images, and:
    method             pointing  mass in box  sanity rank corr.
    grad_cam              0.947        0.549              0.001
    cam                   0.947        0.549              0.001
    occlusion             0.623        0.420              0.009
    saliency              0.687        0.294              0.276
    guided_backprop       0.857        0.529              0.256
    centre baseline       0.203        0.135
    uniform map                        0.104
Grad-CAM meets the chapter's target (pointing >= 0.90), far above the centre baseline. Grad-CAM equals
CAM here, as it must at the last feature map of a GAP + dense network.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from ch04_classification import interpret, models
from ch04_classification.trainer import ClassifierTrainer, accuracy_metrics
from common import augment, synthetic, training, viz


@dataclass
class Config(training.TrainingConfig):
    """Train a CAM-ready classifier on single-object shapes and score its explanations (pointing game)."""

    model_path: str | None = field(default=None, metadata={
        "help": "score this saved classifier (.keras) instead of training one"})
    backbone: str = field(default="resnet_small", metadata={
        "help": "a backbone of ch04_classification.models, cut at --output-stride"})
    output_stride: int = field(default=4, metadata={
        "help": "stride of the last feature map: CAM and Grad-CAM have (image size / stride)^2 cells"})
    image_size: int = field(default=64, metadata={"help": "square side of the single-object images"})
    num_train_examples: int = field(default=12000, metadata={"help": "single-object training images"})
    num_val_examples: int = field(default=300, metadata={
        "help": "held-out images for the accuracy and the pointing game"})
    pretrain_examples: int = field(default=24000, metadata={
        "help": "centred-shape images of the first stage (0 = no first stage)"})
    pretrain_epochs: int = field(default=5, metadata={"help": "passes over the centred-shape images"})
    pretrain_image_size: int = field(default=32, metadata={
        "help": "side of the centred-shape images; half --image-size gives shapes of the same size in "
                "pixels as the single-object scenes"})
    epochs: int = field(default=3, metadata={"help": "passes over the single-object images"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate (Adam) of each stage"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear warm-up from 0 over this many epochs"})
    sanity_examples: int = field(default=40, metadata={
        "help": "images for the randomisation sanity check (each method runs twice on them)"})
    grad_cam_layer: str | None = field(default=None, metadata={
        "help": "layer for Grad-CAM (None: the last feature map, the one CAM uses)"})
    occlusion_patch: int = field(default=12, metadata={"help": "side of the grey occluding square, pixels"})
    occlusion_stride: int = field(default=6, metadata={"help": "step between occluder positions, pixels"})
    tolerance: float = field(default=0.0, metadata={
        "help": "pointing game: a maximum within this many pixels of the box counts as a hit"})
    num_pictures: int = field(default=6, metadata={"help": "images in explanations.png"})
    out: str = field(default="runs/score_explanations", metadata={"help": "output folder; re-run to resume"})

    FAST: ClassVar[dict] = {"num_train_examples": 64, "num_val_examples": 12, "sanity_examples": 4,
                            "pretrain_examples": 64, "pretrain_epochs": 1, "pretrain_image_size": 32,
                            "epochs": 1, "batch_size": 32, "image_size": 32, "occlusion_patch": 8,
                            "occlusion_stride": 8, "num_pictures": 3}


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------

# resnet_small widened to 32 channels with 3 basic blocks at stride 4: with --output-stride 4 the
# network ends at conv2_block3_out, whose units see 47 pixels (3x3/2 stem, then six 3x3 convolutions,
# the first with stride 2), enough for the largest shapes (28 pixels at 64), on a 16 x 16 grid.
BACKBONE_OPTIONS = {"resnet_small": {"stem_filters": 32, "filters": (32, 64, 128, 256), "blocks": (3, 1, 1, 1)}}


def build_classifier(backbone="resnet_small", image_size=64, num_classes=synthetic.NUM_CLASSES,
                     output_stride=4):
    """A CAM-ready classifier: a zoo backbone cut at `output_stride`, global average pooling, Dense.

    [batch, S, S, 3] -> [batch, num_classes] softmax (`image_size` None: any size). Zhou et al. 2016
    (sec. 3.1) remove the last layers of their networks for the same reason: the map CAM reads must
    keep some resolution (here S / output_stride cells per side; 8-pixel cells missed half of the
    smallest shapes in our trials). The backbone gets BACKBONE_OPTIONS.
    """
    shape = (image_size, image_size, 3)
    features = models.get_backbone(backbone, shape, output_stride=output_stride,
                                   **BACKBONE_OPTIONS.get(backbone, {}))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features.output)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(features.input, outputs, name=f"{backbone}_stride{output_stride}_gap")



def centred_shape_dataset(num_examples, split="train", seed=0, image_size=32):
    """The first stage's data: one big centred shape per image (`make_classification_example`).

    Returns images uint8 [N, S, S, 3] (kept as bytes to save memory; the input pipeline divides by
    255) and labels int32 [N].
    """
    size = int(image_size)
    images = np.zeros((int(num_examples), size, size, 3), np.uint8)
    labels = np.zeros((int(num_examples),), np.int32)
    for i in range(int(num_examples)):
        example = synthetic.make_classification_example(i, split, seed, size)
        images[i] = _as_bytes(example["image"])
        labels[i] = example["label"]
    return {"images": images, "labels": labels}


def _as_bytes(images):
    return np.round(np.asarray(images) * 255.0).astype(np.uint8)


def _examples(images_uint8, labels):
    """(image in [0, 1], label) examples from uint8 arrays, cached."""
    dataset = tf.data.Dataset.from_tensor_slices((images_uint8, labels))
    return dataset.map(lambda image, label: (tf.cast(image, tf.float32) / 255.0, label),
                       num_parallel_calls=tf.data.AUTOTUNE).cache()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def check_config(config):
    """ValueError naming the option for anything wrong before data or models are made."""
    if config.model_path in ("None", "none", ""):
        config.model_path = None
    if config.grad_cam_layer in ("None", "none", ""):
        config.grad_cam_layer = None
    if config.model_path is not None and not Path(config.model_path).is_file():
        raise ValueError(f"--model-path must be a saved .keras classifier, {config.model_path!r} does not exist")
    if config.backbone not in models.BACKBONE_NAMES:
        raise ValueError(f"--backbone must be one of {models.BACKBONE_NAMES}, got {config.backbone!r}")
    if config.output_stride not in models.BACKBONE_STRIDES:
        raise ValueError(f"--output-stride must be one of {models.BACKBONE_STRIDES}, got {config.output_stride}")
    for name, size in (("image_size", config.image_size), ("pretrain_image_size", config.pretrain_image_size)):
        if size < 32:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 32 (the backbones downsample by up to "
                             f"32), got {size}")
    for name in ("num_val_examples",):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.model_path is None and config.num_train_examples < 1:
        raise ValueError(f"--num-train-examples must be >= 1, got {config.num_train_examples}")
    for name in ("pretrain_examples", "pretrain_epochs", "sanity_examples", "num_pictures"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if not 1 <= config.occlusion_patch <= config.image_size or config.occlusion_stride < 1:
        raise ValueError(f"--occlusion-patch must be in [1, --image-size] and --occlusion-stride >= 1, got "
                         f"{config.occlusion_patch} and {config.occlusion_stride}")
    if config.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {config.tolerance}")


def train_classifier(run, config):
    """Two stages on the harness: centred shapes (small images), then single-object scenes.

    Why two: on single-object scenes alone (a shape covering 2 to 15 % of the image among clutter)
    this network stays at chance for thousands of steps; big centred shapes teach the shape
    features first (a curriculum, Bengio et al. 2009, "Curriculum Learning"). The network is fully
    convolutional up to the global average pooling, so the same weights read 32- and 64-pixel images;
    at half the size the centred shapes have the scenes' shapes' size in pixels.
    Returns the trained network (input size not fixed).
    """
    seed = config.seed
    with run.strategy.scope():
        network = build_classifier(config.backbone, None, synthetic.NUM_CLASSES, config.output_stride)
        augmentation = augment.BatchAugmentation("classification", seed=seed, flip_left_right=0.5,
                                                 rotate90=True)  # shapes keep their class when turned
        model = ClassifierTrainer(network, augmentation, name="single_object_trainer")
        model(np.zeros((1, config.image_size, config.image_size, 3), np.float32))
    stages = []
    if config.pretrain_examples and config.pretrain_epochs:
        pretrain = centred_shape_dataset(config.pretrain_examples, "train", seed, config.pretrain_image_size)
        check = centred_shape_dataset(min(config.num_val_examples, 300), "validation", seed,
                                      config.pretrain_image_size)
        stages.append(("pretrain", pretrain, config.pretrain_epochs, check))
    scenes = interpret.single_object_dataset(config.num_train_examples, "train", seed, config.image_size)
    val = interpret.single_object_dataset(config.num_val_examples, "validation", seed, config.image_size)
    stages.append(("main", {"images": _as_bytes(scenes["images"]), "labels": scenes["labels"]},
                   config.epochs, {"images": _as_bytes(val["images"]), "labels": val["labels"]}))
    del scenes
    budget = 60.0 * config.time_budget_minutes
    log_keys = {"loss": "loss", "acc": "accuracy", "val acc": "val_accuracy"}
    for index, (stage, data, epochs, check) in enumerate(stages):
        if run.stage_finished(stage, epochs):
            continue
        count = len(data["labels"])
        steps_per_epoch = math.ceil(count / config.batch_size)
        print(f"stage {index + 1}/{len(stages)} ({stage}): {count} images of "
              f"{data['images'].shape[1]} pixels, {epochs} epochs of {steps_per_epoch} steps")
        with run.strategy.scope():
            model.compile(optimizer=run.optimizer(steps_per_epoch, "adam", epochs=epochs),
                          loss=keras.losses.SparseCategoricalCrossentropy(),
                          metrics=accuracy_metrics(synthetic.NUM_CLASSES),
                          jit_compile=False)  # the augmentation's ops have no XLA kernel
        examples = _examples(data["images"], data["labels"])
        validation = _examples(check["images"], check["labels"]).batch(config.batch_size)
        spent = run.state["train_seconds"]
        share = (run.state["stage_seconds"].get(stage, 0.0)
                 + max(0.0, budget - spent) / (len(stages) - index)) if budget else 0.0
        run.fit(model, lambda first_epoch, e=epochs, x=examples: training.epoch_batches(
                    x, config.batch_size, first_epoch, e, seed=config.seed),
                steps_per_epoch, validation_data=validation, log_keys=log_keys, stage=stage,
                epochs=epochs, budget_seconds=share)
    run.restore(model, stages[-1][0])  # the last checkpoint (also when every stage was done before)
    return network


def score(model, images, labels, boxes, config, print_fn=print):
    """Every method's heatmaps and scores on the held-out images; returns (metrics, heatmaps)."""
    options = {"occlusion": {"patch_size": config.occlusion_patch, "stride": config.occlusion_stride}}
    size = images.shape[1:3]
    metrics, heatmaps = {}, {}
    for method in interpret.METHODS:
        start = time.perf_counter()
        heatmaps[method] = interpret.explain(
            method, model, images, labels, layer_name=config.grad_cam_layer if method == "grad_cam" else None,
            **options.get(method, {}))
        metrics[f"seconds_{method}"] = round(time.perf_counter() - start, 2)
        for key, value in interpret.score_heatmaps(heatmaps[method], boxes, config.tolerance).items():
            metrics[f"{key}_{method}"] = value
    # The baseline that does not look: the image's exact centre, and a centred Gaussian for the mass.
    heatmaps["center"] = interpret.centre_heatmaps(len(images), size)
    centre_points = np.tile([[size[0] / 2.0, size[1] / 2.0]], (len(images), 1))
    metrics["pointing_center"] = float(np.mean(interpret.points_in_boxes(centre_points, boxes, size, config.tolerance)))
    metrics["mass_in_box_center"] = interpret.score_heatmaps(heatmaps["center"], boxes)["mass_in_box"]
    metrics["mass_in_box_uniform"] = float(np.mean(interpret.box_masks(boxes, size).mean(axis=(1, 2))))
    count = min(config.sanity_examples, len(images))
    if count:
        start = time.perf_counter()
        sanity = interpret.sanity_check(model, images[:count], labels[:count], seed=config.seed,
                                        method_options=options)
        for method, value in sanity.items():
            metrics[f"sanity_spearman_{method}"] = value
        metrics["seconds_sanity_check"] = round(time.perf_counter() - start, 2)
    return metrics, heatmaps


def main(argv=None):
    """Train (or load) the classifier, score every explanation method, write metrics and pictures."""
    run = training.start_run(Config, argv, check=check_config, description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    start = time.perf_counter()
    if config.model_path is not None:
        model = keras.models.load_model(config.model_path)
        print(f"scoring {config.model_path} ({model.count_params():,} parameters)")
    else:
        network = train_classifier(run, config)
        # A copy with the image size fixed: what is saved and scored.
        model = build_classifier(config.backbone, config.image_size, synthetic.NUM_CLASSES, config.output_stride)
        model.set_weights(network.get_weights())
        model.save(out / "model.keras")
    if tuple(model.inputs[0].shape[1:3]) not in ((config.image_size, config.image_size), (None, None)):
        training.fail(f"--model-path's model takes {tuple(model.inputs[0].shape[1:3])} images; pass "
                      f"--image-size {model.inputs[0].shape[1]}")
    val = interpret.single_object_dataset(config.num_val_examples, "validation", config.seed, config.image_size)
    images, labels, boxes = val["images"], val["labels"], val["boxes"]
    probabilities = np.concatenate([np.asarray(model(images[i : i + 128], training=False))
                                    for i in range(0, len(images), 128)])
    if probabilities.shape[-1] != synthetic.NUM_CLASSES:
        training.fail(f"--model-path must classify the {synthetic.NUM_CLASSES} shapes, its output is "
                      f"{probabilities.shape[1:]}")
    accuracy = float(np.mean(probabilities.argmax(-1) == labels))
    score_start = time.perf_counter()
    metrics, heatmaps = score(model, images, labels, boxes, config)
    metrics.update({"val_accuracy": accuracy, "num_val_examples": len(images),
                    "image_size": config.image_size, "parameters": int(model.count_params()),
                    "score_seconds": round(time.perf_counter() - score_start, 2)})
    shown = slice(0, min(config.num_pictures, len(images)))
    titles = [f"{synthetic.CLASS_NAMES[t]} (p={p[t]:.2f})" for t, p in zip(labels[shown], probabilities[shown])]
    if config.num_pictures:
        import matplotlib.pyplot as plt

        plt.close(viz.show_explanations(images[shown], {m: h[shown] for m, h in heatmaps.items()},
                                        boxes=boxes[shown], titles=titles, save_path=out / "explanations.png"))
    metrics["total_seconds"] = round(time.perf_counter() - start, 2)
    metrics = run.finish(metrics, history_keys=["loss", "accuracy"])
    print(interpret.format_scores(metrics))
    print(f"val accuracy {accuracy:.3f} on {len(images)} single-object images; Grad-CAM pointing "
          f"{metrics['pointing_grad_cam']:.3f} (centre baseline {metrics['pointing_center']:.3f}). "
          f"Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main()
