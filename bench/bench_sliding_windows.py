"""Benchmark: sliding windows per window against the same network run convolutionally (OverFeat).

``ch05_detection/sliding_windows.py`` computes the score of every window of every scale two
ways with the same weights: crop each window and classify the crops (``mode="loop"``), or run
the classifier with its dense layers turned into convolutions once over the resized image
(``mode="conv"``, Sermanet et al. 2014, sec. 3.5). This script trains the window classifier for
a few seconds (so the detections, and the NMS after them, look like a real run's), checks that
both modes give the same score maps, and times per image, one image per call:

* the score maps alone (what the convolutional form changes);
* the whole ``detect`` (score maps + class-wise NMS), one image per call.

Each is measured in wall-clock time and in process CPU time (all threads; steadier than wall
time when other jobs share the cores). It prints the ratios (per-window time / convolutional
time) and writes the section
"## Sliding windows: per window vs convolutional" of ``bench/RESULTS.md`` (``--no-write``: print
only).

Run (about a minute on a 2-core CPU)::

    python bench/bench_sliding_windows.py [--images 8] [--image-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from datetime import date
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ch05_detection import sliding_windows as sw
from common import synthetic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Sliding windows: per window vs convolutional"


def best_seconds(work, images, repeats):
    """Best-of-``repeats`` (wall, CPU) seconds per image of ``work(image)`` over ``images``, after
    one untimed call (tracing)."""
    work(images[0])
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for image in images:
            work(image)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall / len(images), best_cpu / len(images)


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measure(num_images=8, image_size=128, train_images=64, repeats=3):
    examples = [synthetic.make_scene(i, "train", image_size=image_size)
                for i in range(train_images)]
    window_sizes = tuple(int(round(s * image_size / 128)) for s in sw.DEFAULT_WINDOW_SIZES)
    classifier, history = sw.train_window_classifier(examples, epochs=2,
                                                     window_sizes=window_sizes, seed=0)
    detector = sw.SlidingWindowDetector(classifier, class_names=synthetic.CLASS_NAMES,
                                        image_size=image_size, window_sizes=window_sizes)
    images = np.stack([synthetic.make_scene(i, "validation", image_size=image_size)["image"]
                       for i in range(num_images)])
    loop, conv = detector.score_maps(images[0], "loop"), detector.score_maps(images[0], "conv")
    max_difference = max(float(np.abs(loop[s] - conv[s]).max()) for s in loop)
    load_before = load_average()
    maps, detect = {}, {}
    for mode in sw.MODES:
        maps[mode] = best_seconds(lambda image: detector.score_maps(image, mode=mode), images,
                                  repeats)
        detect[mode] = best_seconds(
            lambda image: detector.detect(image[None], batch_size=1, mode=mode), images, repeats)
    return {"maps": maps, "detect": detect, "max_difference": max_difference,
            "windows": detector.windows_per_image, "plan": detector.plan,
            "train_accuracy": float(history.history["accuracy"][-1]), "num_images": num_images,
            "image_size": image_size, "repeats": repeats,
            "load": (load_before, load_average())}


def write_section(result):
    before, after = result["load"]
    load_text = "n/a" if before is None else f"{before:.1f} / {after:.1f}"
    scales = ", ".join(f"{side} px ({count}x{count})" for side, _, count in result["plan"])
    lines = [
        SECTION, "",
        f"`python bench/bench_sliding_windows.py`, run {date.today().isoformat()}: "
        f"{result['windows']} windows per {result['image_size']}-pixel image (window sides "
        f"{scales}, stride 4 pixels at the classifier's 32-pixel input), "
        f"{result['num_images']} validation images one at a time, best of {result['repeats']}. "
        f"The same trained weights both ways (largest difference between the score maps "
        f"{result['max_difference']:.1e}). TF {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores ({platform.machine()}, "
        f"no GPU); load average (1 min) before / after the timing {load_text} (a shared machine: "
        "the ratios are the lesson, not the absolute times). CPU = process CPU time, all "
        "threads.", "",
        "| measure | per window (crop + classify) ms/image, wall / CPU | convolutional ms/image, "
        "wall / CPU | ratio, wall / CPU |",
        "| --- | ---: | ---: | ---: |"]
    for title, key in (("score maps of every window", "maps"),
                       ("`detect` (score maps + class-wise NMS)", "detect")):
        (loop_wall, loop_cpu), (conv_wall, conv_cpu) = (result[key]["loop"], result[key]["conv"])
        lines.append(f"| {title} | {1000 * loop_wall:.1f} / {1000 * loop_cpu:.1f} | "
                     f"{1000 * conv_wall:.1f} / {1000 * conv_cpu:.1f} | "
                     f"{loop_wall / conv_wall:.1f}x / {loop_cpu / max(conv_cpu, 1e-9):.1f}x |")
    lines.append("")
    section = "\n".join(lines)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    # Replace only our own section: from its title to the next "## " title or the end.
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text.rstrip("\n") + "\n")
    print(f"wrote {RESULTS}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="validation images timed")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--train-images", type=int, default=64,
                        help="scenes the window classifier is trained on (a few seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best is kept)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args(argv)
    for name in ("images", "image_size", "train_images", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    result = measure(args.images, args.image_size, args.train_images, args.repeats)
    maps, detect = result["maps"], result["detect"]
    print(f"{result['windows']} windows per image; score maps: per window "
          f"{1000 * maps['loop'][0]:.1f} ms, convolutional {1000 * maps['conv'][0]:.1f} ms, ratio "
          f"{maps['loop'][0] / maps['conv'][0]:.1f}x; detect: per window "
          f"{1000 * detect['loop'][0]:.1f} ms, convolutional {1000 * detect['conv'][0]:.1f} ms, "
          f"ratio {detect['loop'][0] / detect['conv'][0]:.1f}x (max score difference "
          f"{result['max_difference']:.1e}; load {result['load']})", file=sys.stdout)
    if not args.no_write:
        write_section(result)
    return result


if __name__ == "__main__":
    main()
