"""Benchmark: the readable NumPy NMS against tf.image.non_max_suppression.

Faster R-CNN runs NMS on the RPN's proposals: 2000 boxes kept before NMS during
training and 6000 at test time, IoU threshold 0.7, keeping 2000 / 300 after NMS
(Ren et al. 2015, sec. 3.3 and the released configuration). This script times
``boxes.nms_reference`` (the lesson, a Python loop over kept boxes) and ``boxes.nms``
(TensorFlow's kernel, eagerly and inside ``tf.function``) on proposal-like boxes
clustered around a few objects, checks they keep the same boxes, and writes the
"NMS: reference vs fast" section of ``bench/RESULTS.md``.

Run: ``python bench/bench_nms.py`` (about half a minute on a 2-core CPU).
"""

from __future__ import annotations

import os
import platform
import re
import time

import numpy as np
import tensorflow as tf

from ch05_detection import boxes as box_ops

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION_TITLE = "## NMS: reference vs fast"
# (number of boxes, max kept): training and test settings of the RPN proposal layer.
CASES = ((2000, 2000), (6000, 300))
IOU_THRESHOLD = 0.7


def proposal_like_boxes(rng, count, num_objects=20, image_size=600.0):
    """Boxes scattered around a few object centres, like RPN proposals (pixels)."""
    centres = rng.uniform(50, image_size - 50, size=(num_objects, 2))
    sizes = rng.uniform(30, 250, size=(num_objects, 2))
    which = rng.integers(0, num_objects, size=count)
    centre = centres[which] + rng.normal(0, 0.15, size=(count, 2)) * sizes[which]
    size = sizes[which] * np.exp(rng.normal(0, 0.25, size=(count, 2)))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    scores = rng.permutation(count).astype(np.float32) / count  # distinct scores
    return np.clip(boxes, 0, image_size).astype(np.float32), scores


def time_call(function, repeats):
    """Median wall time of ``function()`` in milliseconds (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    fast_graph = tf.function(box_ops.nms)
    rows = []
    for count, max_kept in CASES:
        boxes, scores = proposal_like_boxes(rng, count)
        boxes_tensor, scores_tensor = tf.constant(boxes), tf.constant(scores)
        reference = box_ops.nms_reference(boxes, scores, IOU_THRESHOLD, max_kept)
        fast = box_ops.nms(boxes_tensor, scores_tensor, IOU_THRESHOLD, max_kept).numpy()
        same = np.array_equal(reference, fast)
        reference_ms = time_call(
            lambda: box_ops.nms_reference(boxes, scores, IOU_THRESHOLD, max_kept), repeats=20)
        eager_ms = time_call(
            lambda: box_ops.nms(boxes_tensor, scores_tensor, IOU_THRESHOLD, max_kept).numpy(),
            repeats=50)
        graph_ms = time_call(
            lambda: fast_graph(boxes_tensor, scores_tensor, IOU_THRESHOLD, max_kept).numpy(),
            repeats=50)
        rows.append((count, max_kept, len(reference), same, reference_ms, eager_ms, graph_ms))
        print(f"{count} boxes, keep <= {max_kept}: kept {len(reference)}, same={same}, "
              f"reference {reference_ms:.2f} ms, tf eager {eager_ms:.2f} ms, "
              f"tf.function {graph_ms:.2f} ms, ratio {reference_ms / graph_ms:.1f}x")
    write_section(rows)


def write_section(rows):
    lines = [
        SECTION_TITLE,
        "",
        "`python bench/bench_nms.py`: greedy NMS at IoU 0.7 on proposal-like boxes (clustered "
        "around 20 objects in a 600x600 image, distinct scores). Median ms per call.",
        "",
        "| boxes | max kept | kept | same kept set | reference (NumPy) ms | "
        "tf.image.non_max_suppression eager ms | in tf.function ms | reference / tf.function |",
        "| ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    for count, max_kept, kept, same, reference_ms, eager_ms, graph_ms in rows:
        lines.append(f"| {count} | {max_kept} | {kept} | {'yes' if same else 'NO'} | "
                     f"{reference_ms:.2f} | {eager_ms:.2f} | {graph_ms:.2f} | "
                     f"{reference_ms / graph_ms:.1f}x |")
    lines += ["", f"Python {platform.python_version()}, NumPy {np.__version__}, "
                  f"TensorFlow {tf.__version__}.", ""]
    section = "\n".join(lines)

    if os.path.exists(RESULTS_PATH):
        with open(RESULTS_PATH) as file:
            text = file.read()
    else:
        text = "# Benchmark results\n\nMachine: 2-core CPU, no GPU, TF 2.21.\n\n"
    # Replace only our own section: from its title to the next "## " title or the end.
    pattern = re.compile(re.escape(SECTION_TITLE) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(RESULTS_PATH, "w") as file:
        file.write(text.rstrip("\n") + "\n")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
