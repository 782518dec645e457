"""What do rotation, shear and elastic warping buy? The default scripts with and without them.

Augmentation matters most when data are scarce, so both models are trained on a reduced training
set (500 images by default), once with the scripts' usual augmentation and once with the warps of
``common.augment`` added (rotation by up to 15 degrees, shear up to 0.1, an elastic warp of
alpha 20 px, sigma 4 px; Simard et al. 2003, sec. 2):

* ``ch04_classification/train_classifier.py`` (resnet_small on ``shapes_classification``, 48 px;
  its usual augmentation is flips and quarter turns), validation accuracy on 1000 images;
* ``ch05_detection/train_faster_rcnn.py`` (128 px ``shapes``; its usual augmentation is the
  horizontal flip), val mAP@0.5 and mAP@[.5:.95] on 300 images. The warped boxes are recomputed
  from the warped instance masks, so they stay tight.

Each pair has the same epochs and seed and no time budget, so both arms see the same number of
steps. The table goes to the "## Value of the geometric augmentations" section of bench/RESULTS.md,
with the machine's load (a busy machine changes the seconds, not the accuracies).

Run from the repo root::

    python bench/bench_augment_value.py                 # ~12 minutes on a quiet 2-core CPU
    python bench/bench_augment_value.py --only classifier --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import tensorflow as tf

import results_md  # bench/results_md.py (bench/ is on the path when run as a script)

SECTION = "## Value of the geometric augmentations"
WARPS = {"rotation": 15.0, "shear": 0.1, "elastic_alpha": 20.0}


def _flags(options):
    return [item for key, value in options.items()
            for item in (f"--{key.replace('_', '-')}", str(value))]


def run_classifier(train_images, epochs, warps, out):
    from ch04_classification import train_classifier

    options = {"num_train_examples": train_images, "num_val_examples": 1000, "epochs": epochs,
               "time_budget_minutes": 0, "warmup_epochs": 2, "out": out}
    if warps:
        options.update(WARPS)
    metrics = train_classifier.main(_flags(options))
    return {"score": metrics["val_accuracy"], "seconds": metrics["train_seconds"]}


def run_faster_rcnn(train_images, epochs, warps, out):
    from ch05_detection import train_faster_rcnn

    options = {"num_train_examples": train_images, "num_val_examples": 300, "epochs": epochs,
               "time_budget_minutes": 0, "eval_every": 0, "out": out}
    if warps:
        options.update(WARPS)
    metrics = train_faster_rcnn.main(_flags(options))
    return {"score": metrics["val_map50"], "score2": metrics["val_map"],
            "seconds": metrics["train_seconds"]}


MODELS = {
    "classifier": (run_classifier, 150, "train_classifier.py", "val accuracy"),
    "faster_rcnn": (run_faster_rcnn, 16, "train_faster_rcnn.py", "val mAP@0.5 (mAP@[.5:.95])"),
}


def measure(only, train_images, epochs_override=None):
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in only:
            run, epochs, _, _ = MODELS[name]
            epochs = epochs_override or epochs
            for warps in (False, True):
                key = f"{name}_{'warps' if warps else 'usual'}"
                results[key] = run(train_images, epochs, warps, str(Path(folder) / key))
                results[key]["epochs"] = epochs
                print(key, results[key])
    results["load"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return results


def _score(result):
    text = f"{result['score']:.3f}"
    return text + (f" ({result['score2']:.3f})" if "score2" in result else "")


def write_section(results, train_images):
    load = results["load"]
    load_text = "n/a" if load is None else ", ".join(f"{v:.1f}" for v in load)
    warps = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in WARPS.items())
    lines = [
        SECTION, "",
        f"`python bench/bench_augment_value.py`: each script trained on {train_images} images, "
        f"without and with the warps ({warps}); same epochs and seed, no time budget. TF "
        f"{tf.__version__}, {os.cpu_count()} CPU cores ({platform.machine()}), load average at the "
        f"end {load_text}.", "",
        "| script | measure | usual augmentation | + rotation, shear, elastic | train s (usual / +) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (_, _, script, measure_name) in MODELS.items():
        usual, warped = results.get(f"{name}_usual"), results.get(f"{name}_warps")
        if usual is None:
            continue
        lines.append(f"| `{script}` ({usual['epochs']} epochs) | {measure_name} | {_score(usual)} | "
                     f"{_score(warped)} | {usual['seconds']:.0f} / {warped['seconds']:.0f} |")
    lines.append("")
    return results_md.replace_section("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--only", choices=tuple(MODELS), action="append",
                        help="one model only (repeatable; default: both)")
    parser.add_argument("--train-images", type=int, default=500, help="training images per run")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run (default: 150 for the classifier (1,200 steps), 16 for Faster R-CNN)")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    if args.train_images < 16:
        parser.error(f"--train-images must be >= 16, got {args.train_images}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    results = measure(args.only or tuple(MODELS), args.train_images, args.epochs)
    if args.no_write:
        print(results)
    else:
        print(write_section(results, args.train_images))


if __name__ == "__main__":
    main()
