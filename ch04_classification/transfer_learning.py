"""Transfer learning: reuse a network trained on one task for another task with few labels.

What this script teaches: the strategies of the chapter, compared on the same small training budget:
    scratch               the same network, randomly initialised, everything trained (the baseline)
    feature_extraction    the pretrained backbone frozen, only a new dense head trained
    fine_tune_top         the new head and the backbone's top block(s) trained, the lower blocks frozen
    fine_tune_all         everything trained, at the original learning rate
    fine_tune_all_low_lr  everything trained at about a tenth of the original learning rate
    head_then_fine_tune   the usual recipe: half the budget to train the head on the frozen backbone,
                          then everything at a tenth of the learning rate (a random head's large
                          gradients would otherwise wreck the pretrained features)
and the advice matrix (how much data x how similar the new task is), see ADVICE and print_advice().
Yosinski et al. 2014 ("How transferable are features in deep neural networks?") measured why this works:
the first layers learn general features (edges, colour blobs), the last ones task-specific ones.

The offline demonstration (default, no download):
    1. pretrain a small ResNet (resnet_small) on the embedded shapes (5 classes, 3,000 images, 32x32);
    2. transfer it to scikit-learn's hand-written digits (10 classes) with only 10 labels per class,
       images upsampled from 8x8 to 32x32 and evaluated on the whole digits validation split.
Why this pair: it is the "little data, dissimilar task" corner of the advice matrix (coloured synthetic
shapes -> grey hand-written strokes, 5 -> 10 classes, a different label set), the hardest case and the
common one in practice, and both data sets ship with the repo. What transfers are the low-level features:
edges, corners, strokes and curves, which both tasks need; the shapes' class-specific top layers do not.

With `--weights imagenet` the backbone is a keras.applications network (default resnet50) with its
ImageNet weights instead of the shapes pretraining (downloads the weights; needs internet), e.g.
    python ch04_classification/transfer_learning.py --weights imagenet --backbone resnet50 \\
        --target-dataset path/to/your/class_folders --image-size 160

Run from the repo root:
    python ch04_classification/transfer_learning.py          # about 2-3 minutes on a 2-core CPU
    python ch04_classification/transfer_learning.py --fast   # seconds
Writes <out>/metrics.json (the table), <out>/config.json and <out>/transfer_table.png.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from common import augment, config as config_lib, data
from ch04_classification import models
from ch04_classification.trainer import ClassifierTrainer, accuracy_metrics
from common.training import make_optimizer

STRATEGIES = ("scratch", "feature_extraction", "fine_tune_top", "fine_tune_all", "fine_tune_all_low_lr",
              "head_then_fine_tune")
STRATEGY_DESCRIPTIONS = {
    "scratch": "random init, all layers trained",
    "feature_extraction": "backbone frozen, new head trained",
    "fine_tune_top": "head + top block trained, lower blocks frozen",
    "fine_tune_all": "all layers trained at the original learning rate",
    "fine_tune_all_low_lr": "all layers trained at 1/10 of the learning rate",
    "head_then_fine_tune": "head first (half the epochs), then all layers at 1/10",
}
LOW_LEARNING_RATE_FACTOR = 0.1  # "about a tenth of the original learning rate"

# The advice matrix: (amount of target data, similarity to the pretraining task) -> what to do.
ADVICE = {
    ("little data", "similar task"): "feature extraction: freeze the backbone, train a new head "
                                     "(fine-tuning many weights on few images overfits)",
    ("little data", "dissimilar task"): "keep the general lower layers, retrain the top: fine-tune the top "
                                        "block(s), or extract features from an earlier layer",
    ("plenty of data", "similar task"): "fine-tune everything at a low learning rate (about 1/10), "
                                        "starting from a trained head",
    ("plenty of data", "dissimilar task"): "fine-tune everything (or train from scratch; the pretrained "
                                           "start usually still converges faster)",
}


@dataclass
class TransferConfig:
    """Compare transfer-learning strategies with training from scratch on the same small budget."""

    backbone: str = field(default="resnet_small", metadata={"help": "a model name from ch04_classification.models"})
    weights: str | None = field(default=None, metadata={
        "help": "None: pretrain on --pretrain-dataset here; 'imagenet': keras.applications weights (internet)"})
    pretrain_dataset: str = field(default="shapes_classification", metadata={"help": "source task"})
    pretrain_examples: int = field(default=3000, metadata={"help": "source training examples"})
    pretrain_epochs: int = field(default=8, metadata={"help": "source training epochs"})
    target_dataset: str = field(default="digits", metadata={"help": "target task (data set name or folder)"})
    labels_per_class: int = field(default=10, metadata={"help": "target training labels per class (few!)"})
    val_examples: int | None = field(default=None, metadata={"help": "target validation examples (None: all)"})
    image_size: int = field(default=32, metadata={"help": "square image side for both tasks"})
    epochs: int = field(default=30, metadata={"help": "target training epochs, the same for every strategy"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "the original (Adam) learning rate"})
    top_layers_fraction: float = field(default=0.25, metadata={
        "help": "fine_tune_top for non-ResNet backbones: train the last fraction of the backbone's layers"})
    strategies: tuple[str, ...] = field(default=STRATEGIES, metadata={"help": "strategies to compare"})
    out: str = field(default="runs/transfer_learning", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    fast: bool = field(default=False, metadata={"help": "tiny sizes for a smoke run (also env CVTF_FAST=1)"})

    FAST: ClassVar[dict] = {"pretrain_examples": 192, "pretrain_epochs": 1, "labels_per_class": 2,
                            "val_examples": 64, "epochs": 2}


def print_advice(print_fn=print):
    """Print the advice matrix: rows = amount of target data, columns = similarity of the task."""
    for (amount, similarity), advice in ADVICE.items():
        print_fn(f"  {amount:<15} {similarity:<16} -> {advice}")


# --------------------------------------------------------------------------------------------------
# Backbone, head and freezing
# --------------------------------------------------------------------------------------------------

def build_backbone(name, image_size, weights=None):
    """The network without its classifier, ending in global average pooling: [b, H, W, 3] -> [b, channels]."""
    options = {"pooling": "avg"}
    if weights is not None:
        options["weights"] = weights
    return models.get_model(name, (image_size, image_size, 3), None, include_top=False, **options)


def with_new_head(backbone, num_classes, name):
    """backbone -> dropout -> a new dense softmax classifier for the target classes."""
    inputs = keras.Input(backbone.input_shape[1:], name="image")
    features = backbone(inputs)  # [batch, channels]; frozen layers run in inference mode (BN statistics fixed)
    features = keras.layers.Dropout(0.2, name="head_dropout")(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="new_head")(features)
    return keras.Model(inputs, outputs, name=name)


def top_layer_names(backbone, backbone_name, fraction=0.25):
    """Names of the backbone layers that 'fine-tune the top blocks' trains.

    ResNets: the last stage (conv5_x, the blocks at stride 32). Other families: the last `fraction` of
    the layers that have weights.
    """
    if backbone_name.startswith("resnet"):
        names = [layer.name for layer in backbone.layers if layer.name.startswith("conv5_")]
        if names:
            return names
    weighted = [layer.name for layer in backbone.layers if layer.weights]
    return weighted[int(len(weighted) * (1.0 - fraction)):]


def set_trainable(backbone, mode, top_names=()):
    """mode "all": every layer trains; "none": frozen (feature extraction); "top": only `top_names` train."""
    if mode not in ("all", "none", "top"):
        raise ValueError(f'mode must be "all", "none" or "top", got {mode!r}')
    backbone.trainable = mode != "none"
    if mode != "none":  # reset every layer: an earlier "top" may have frozen some of them
        top_names = set(top_names)
        for layer in backbone.layers:
            layer.trainable = mode == "all" or layer.name in top_names


def count_trainable(model):
    return int(sum(np.prod(weight.shape) for weight in model.trainable_weights))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def as_arrays(dataset):
    """A small unbatched (image, label) dataset as two numpy arrays."""
    images, labels = [], []
    for image, label in data.to_supervised(dataset).batch(256):
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.concatenate(images), np.concatenate(labels)


def few_labels(images, labels, per_class, seed=0):
    """The first `per_class` examples of every class in a seeded random order: a balanced tiny train set."""
    order = np.random.default_rng(seed).permutation(len(labels))
    keep = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
    keep = np.sort(keep)
    return images[keep], labels[keep]


def batches(images, labels, batch_size, shuffle, seed):
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def fit(network, train, validation, epochs, learning_rate, num_classes, seed, augmentation=False):
    """Adam at a constant learning rate; returns evaluate()'s dict.

    augmentation=True adds exact flips and quarter turns on the device (used for the shapes pretraining;
    digits are not rotation invariant, a 6 turned is a 9).
    """
    augmentation_layer = augment.BatchAugmentation(
        "classification", seed=seed, rotate90=True, vgg_scale_range=None, brightness=0.0, contrast=0.0,
        saturation=0.0, hue=0.0) if augmentation else None
    trainer = ClassifierTrainer(network, augmentation_layer)
    trainer.compile(optimizer=make_optimizer("adam", learning_rate), jit_compile=False,
                    loss=keras.losses.SparseCategoricalCrossentropy(), metrics=accuracy_metrics(num_classes))
    trainer.fit(train, epochs=epochs, verbose=0, shuffle=False)
    return trainer.evaluate(validation, verbose=0, return_dict=True)


def pretrain(config, print_fn=print):
    """Train backbone + head on the source task; returns (backbone, source validation accuracy)."""
    info = data.get_info(config.pretrain_dataset)
    train_images, train_labels = as_arrays(data.load(
        config.pretrain_dataset, "train", image_size=config.image_size,
        num_examples=config.pretrain_examples, seed=config.seed))
    val_images, val_labels = as_arrays(data.load(
        config.pretrain_dataset, "validation", image_size=config.image_size, num_examples=min(500, config.pretrain_examples), seed=config.seed))
    backbone = build_backbone(config.backbone, config.image_size)
    network = with_new_head(backbone, info.num_classes, "source_model")
    result = fit(network, batches(train_images, train_labels, config.batch_size, True, config.seed),
                 batches(val_images, val_labels, 256, False, config.seed), config.pretrain_epochs,
                 config.learning_rate, info.num_classes, config.seed, augmentation=True)
    print_fn(f"pretrained {config.backbone} on {config.pretrain_dataset} ({len(train_labels)} images, "
             f"{config.pretrain_epochs} epochs): source validation accuracy {result['accuracy']:.4f}")
    return backbone, float(result["accuracy"])


def run_strategy(strategy, config, pretrained_weights, train, validation, num_classes):
    """Train one strategy from a fresh copy of the pretrained backbone; returns a table row."""
    keras.utils.set_random_seed(config.seed)  # the same head initialisation for every strategy
    weights = config.weights if strategy != "scratch" else None
    backbone = build_backbone(config.backbone, config.image_size, weights=weights)
    if strategy != "scratch" and pretrained_weights is not None:
        backbone.set_weights(pretrained_weights)
    network = with_new_head(backbone, num_classes, f"target_{strategy}")
    learning_rate = config.learning_rate
    start = time.perf_counter()
    if strategy in ("scratch", "fine_tune_all"):
        set_trainable(backbone, "all")
    elif strategy == "feature_extraction":
        set_trainable(backbone, "none")
    elif strategy == "fine_tune_top":
        set_trainable(backbone, "top", top_layer_names(backbone, config.backbone, config.top_layers_fraction))
    elif strategy == "fine_tune_all_low_lr":
        set_trainable(backbone, "all")
        learning_rate = config.learning_rate * LOW_LEARNING_RATE_FACTOR
    elif strategy == "head_then_fine_tune":
        head_epochs = max(1, config.epochs // 2)
        set_trainable(backbone, "none")
        fit(network, train, validation, head_epochs, config.learning_rate, num_classes, config.seed)
        set_trainable(backbone, "all")
        learning_rate = config.learning_rate * LOW_LEARNING_RATE_FACTOR
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    trainable = count_trainable(network)
    epochs = config.epochs - (max(1, config.epochs // 2) if strategy == "head_then_fine_tune" else 0)
    result = fit(network, train, validation, max(epochs, 1), learning_rate, num_classes, config.seed)
    row = {
        "strategy": strategy,
        "description": STRATEGY_DESCRIPTIONS[strategy],
        "trainable_parameters": trainable,
        "learning_rate": learning_rate,
        "val_accuracy": float(result["accuracy"]),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if "top5_accuracy" in result:
        row["val_top5_accuracy"] = float(result["top5_accuracy"])
    return row


def format_table(rows):
    """The comparison table as text, one line per strategy."""
    has_top5 = any("val_top5_accuracy" in row for row in rows)
    header = f"{'strategy':<22}{'trainable params':>17}{'lr':>9}{'val acc':>9}" + \
        (f"{'top-5':>8}" if has_top5 else "") + f"{'seconds':>9}  what trains"
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (f"{row['strategy']:<22}{row['trainable_parameters']:>17,}{row['learning_rate']:>9.0e}"
                f"{row['val_accuracy']:>9.4f}")
        if has_top5:
            line += f"{row.get('val_top5_accuracy', float('nan')):>8.4f}"
        lines.append(line + f"{row['seconds']:>9.1f}  {row['description']}")
    return "\n".join(lines)


def save_table_figure(rows, save_path):
    """A bar chart of validation accuracy per strategy (scratch in grey)."""
    import matplotlib.pyplot as plt

    names = [row["strategy"] for row in rows]
    values = [row["val_accuracy"] for row in rows]
    figure, ax = plt.subplots(figsize=(7, 3))
    colours = ["0.6" if name == "scratch" else "tab:blue" for name in names]
    ax.barh(names[::-1], values[::-1], color=colours[::-1])
    for index, value in enumerate(values[::-1]):
        ax.text(value + 0.01, index, f"{value:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("target validation accuracy")
    figure.tight_layout()
    Path(save_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(save_path, dpi=90)
    plt.close(figure)


def check_config(config):
    if config.backbone not in models.MODEL_NAMES:
        raise ValueError(f"--backbone must be one of {models.MODEL_NAMES}, got {config.backbone!r}")
    unknown = [s for s in config.strategies if s not in STRATEGIES]
    if unknown or not config.strategies:
        raise ValueError(f"--strategies must be a non-empty subset of {STRATEGIES}, got {config.strategies!r}")
    if config.weights not in (None, "imagenet"):
        raise ValueError(f"--weights must be None or 'imagenet', got {config.weights!r}")
    for name in ("labels_per_class", "epochs", "batch_size", "image_size", "pretrain_examples",
                 "pretrain_epochs"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if not 0 < config.top_layers_fraction <= 1:
        raise ValueError(f"--top-layers-fraction must be in (0, 1], got {config.top_layers_fraction}")


def main(argv=None):
    """Pretrain (or load ImageNet weights), run every strategy, print and save the table."""
    start_time = time.perf_counter()
    config = config_lib.parse_config(TransferConfig, argv, description=__doc__.split("\n")[0])
    if config.weights in ("None", "none"):
        config.weights = None
    check_config(config)
    out = Path(config.out)
    config_lib.save_config(config, out)
    keras.utils.set_random_seed(config.seed)

    print("The advice matrix (amount of target data x similarity of the task):")
    print_advice()

    # Source task: pretrain here, or take ImageNet weights from keras.applications.
    if config.weights is None:
        backbone, source_accuracy = pretrain(config)
        pretrained_weights = backbone.get_weights()
    else:
        source_accuracy, pretrained_weights = None, None  # build_backbone(weights="imagenet") loads them
        print(f"using {config.backbone} with ImageNet weights from keras.applications")

    # Target task: few labels per class, the whole validation split.
    info = data.get_info(config.target_dataset)
    if info.task != "classification":
        raise ValueError(f"--target-dataset must be a classification data set, got {config.target_dataset!r}")
    all_images, all_labels = as_arrays(data.load(config.target_dataset, "train", image_size=config.image_size,
                                                 seed=config.seed))
    train_images, train_labels = few_labels(all_images, all_labels, config.labels_per_class, config.seed)
    val_images, val_labels = as_arrays(data.load(config.target_dataset, "validation",
                                                 image_size=config.image_size,
                                                 num_examples=config.val_examples, seed=config.seed))
    train = batches(train_images, train_labels, config.batch_size, True, config.seed)
    validation = batches(val_images, val_labels, 256, False, config.seed)
    print(f"target: {config.target_dataset}, {len(train_labels)} training labels "
          f"({config.labels_per_class} per class), {len(val_labels)} validation images, "
          f"{config.epochs} epochs per strategy")

    rows = []
    for strategy in config.strategies:
        rows.append(run_strategy(strategy, config, pretrained_weights, train, validation, info.num_classes))
        print(f"  {strategy:<22} val accuracy {rows[-1]['val_accuracy']:.4f}")
    table = format_table(rows)
    print()
    print(table)
    save_table_figure(rows, out / "transfer_table.png")

    metrics = {
        "table": rows,
        "source_val_accuracy": source_accuracy,
        "target_train_examples": int(len(train_labels)),
        "target_val_examples": int(len(val_labels)),
        "epochs": config.epochs,
        "train_seconds": round(time.perf_counter() - start_time, 1),
    }
    metrics["val_accuracy"] = max(row["val_accuracy"] for row in rows)
    config_lib.write_metrics(metrics, out)
    print(f"\nwrote {out / 'metrics.json'} ({metrics['train_seconds']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
