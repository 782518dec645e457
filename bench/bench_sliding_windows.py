"""Benchmark: sliding windows per window against the same network run convolutionally (OverFeat).

``ch05_detection/sliding_windows.py`` computes the score of every window of every scale two
ways with the same weights: crop each window and classify the crops (``mode="loop"``), or run
the classifier with its dense layers turned into convolutions once over the resized image
(``mode="conv"``, Sermanet et al. 2014, sec. 3.5). This script trains the window classifier for
a few seconds (so the detections, and the NMS after them, look like a real run's), checks that
both modes give the same score maps, and times per image, one image per call:

* the score maps alone (what the convolutional form changes);
* the whole ``detect`` (score maps + class-wise NMS), with ``sliding_windows.time_detection``.

It prints the ratios (per-window time / convolutional time) and writes the section
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
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from ch05_detection import sliding_windows as sw
from common import synthetic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Sliding windows: per window vs convolutional"


def score_map_seconds(detector, images, mode, repeats):
    """Best-of-``repeats`` seconds per image of ``score_maps`` (after one untimed call)."""
    detector.score_maps(images[0], mode=mode)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            detector.score_maps(image, mode=mode)
        best = min(best, time.perf_counter() - start)
    return best / len(images)


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
    maps = {mode: score_map_seconds(detector, images, mode, repeats) for mode in sw.MODES}
    detect = sw.time_detection(detector, images, repeats=repeats)
    return {"maps": maps, "detect": detect, "max_difference": max_difference,
            "windows": detector.windows_per_image, "plan": detector.plan,
            "train_accuracy": float(history.history["accuracy"][-1]), "num_images": num_images,
            "image_size": image_size, "repeats": repeats,
            "load": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_section(result):
    load = result["load"]
    load_text = "n/a" if load is None else ", ".join(f"{v:.1f}" for v in load)
    maps, detect = result["maps"], result["detect"]
    scales = ", ".join(f"{side} px ({count}x{count})" for side, _, count in result["plan"])
    lines = [
        SECTION, "",
        f"`python bench/bench_sliding_windows.py`: {result['windows']} windows per "
        f"{result['image_size']}-pixel image (window sides {scales}, stride 4 pixels at the "
        f"classifier's 32-pixel input), {result['num_images']} validation images one at a time, "
        f"best of {result['repeats']}. The same trained weights both ways (largest difference "
        f"between the score maps {result['max_difference']:.1e}). TF {tf.__version__}, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load_text} (shared "
        "machine: the ratio is the lesson, not the absolute times).", "",
        "| measure | per window (crop + classify) ms/image | convolutional ms/image | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| score maps of every window | {1000 * maps['loop']:.1f} | {1000 * maps['conv']:.1f} | "
        f"{maps['loop'] / maps['conv']:.1f}x |",
        f"| `detect` (score maps + class-wise NMS) | "
        f"{1000 * detect['loop_seconds_per_image']:.1f} | "
        f"{1000 * detect['conv_seconds_per_image']:.1f} | {detect['speedup']:.1f}x |", ""]
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
    result = measure(args.images, args.image_size, args.train_images, args.repeats)
    maps, detect = result["maps"], result["detect"]
    print(f"{result['windows']} windows per image; score maps: per window "
          f"{1000 * maps['loop']:.1f} ms, convolutional {1000 * maps['conv']:.1f} ms, ratio "
          f"{maps['loop'] / maps['conv']:.1f}x; detect: per window "
          f"{1000 * detect['loop_seconds_per_image']:.1f} ms, convolutional "
          f"{1000 * detect['conv_seconds_per_image']:.1f} ms, ratio {detect['speedup']:.1f}x "
          f"(max score difference {result['max_difference']:.1e})")
    if not args.no_write:
        write_section(result)
    return result


if __name__ == "__main__":
    main()
