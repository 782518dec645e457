"""Pictures of R-CNN and Fast R-CNN at work, for the notebook and ``train_rcnn.py``'s outputs.

``draw_proposals`` (selective-search regions on a few images), ``draw_region_filtering`` (regions
before and after filtering), ``draw_warped_regions`` (R-CNN's warped inputs with their context),
``draw_hard_negatives`` and ``draw_svm_scores`` (the SVMs' false positives and score histograms per
round of hard-negative mining, read from an R-CNN run's record), ``draw_box_regression`` (regions
before and after the ridge regressors), and ``rcnn_outputs`` (an ``RCNN`` on images with given
regions, no selective search). The sliding-window pictures are in ``sliding_windows.py``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ch05_detection import rcnn
from common import viz


def rcnn_outputs(model, images, proposals, batch_size=16):
    """``model`` (an ``RCNN``) on ``images`` with given proposals (no selective search): a list
    of output dicts, one per batch of ``batch_size`` images."""
    call = tf.function(lambda x, p, n: model(x, proposals=p, num_proposals=n),
                       reduce_retracing=True)
    outputs = []
    for start in range(0, len(images), batch_size):
        padded, counts = rcnn.pad_proposals(proposals[start:start + batch_size])
        batch = np.stack([np.asarray(image, np.float32) for image in images[start:start + batch_size]])
        outputs.append(call(tf.constant(batch), tf.constant(padded), tf.constant(counts)))
    return outputs


def draw_proposals(examples, proposals, save_path, count=4):
    """Selective-search regions (yellow) and ground truth (green) of a few validation images."""
    import matplotlib.pyplot as plt

    examples = examples[:count]
    if not examples:
        return None
    figure, axes = plt.subplots(1, len(examples), figsize=(2.8 * len(examples), 3.0),
                                squeeze=False)
    for ax, example, boxes in zip(axes[0], examples, proposals):
        ax.imshow(np.clip(example["image"], 0, 1))
        viz.draw_boxes(ax, boxes, color="yellow", linewidth=0.5)
        viz.draw_boxes(ax, example["boxes"], color="lime")
        ax.set_title(f"{len(boxes)} regions", fontsize=8)
        ax.axis("off")
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure


def draw_hard_negatives(record, class_names, save_path):
    """False positives among all negatives after each SVM round, one line per class."""
    import matplotlib.pyplot as plt

    rows = record["svm_false_positives_per_class_and_round"]
    figure, ax = plt.subplots(figsize=(4.5, 3.2))
    rounds = np.arange(1, len(rows) + 1)
    for k, name in enumerate(class_names):
        ax.plot(rounds, [row[k] for row in rows], marker="o", label=name)
    ax.set_xlabel("SVM round (hard negatives added between rounds)")
    ax.set_ylabel("negatives scoring > 0")
    ax.set_xticks(rounds)
    ax.legend(fontsize=7)
    ax.set_title("R-CNN hard-negative mining", fontsize=9)
    figure.tight_layout()
    viz.save_figure(figure, save_path)
    plt.close(figure)
    return figure


def draw_region_filtering(image, mode="fast", max_proposals=300, min_size=4.0, gt_boxes=None,
                          save_path=None):
    """Selective search's regions on one image before (every box OpenCV returns) and after
    ``filter_proposals`` (small ones and duplicates dropped, largest ``max_proposals`` kept),
    ground truth in green.

    Args: image ``[H, W, 3]`` in [0, 1]; the other options as in ``rcnn.selective_search``.
    Returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    raw = rcnn.selective_search_raw(image, mode)
    kept = rcnn.filter_proposals(raw, np.asarray(image).shape[:2], min_size, max_proposals)
    figure, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    for ax, boxes, title in ((axes[0], raw, f"selective search: {len(raw)} regions"),
                             (axes[1], kept, f"after filtering: {len(kept)}")):
        ax.imshow(np.clip(image, 0, 1))
        viz.draw_boxes(ax, boxes, color="yellow", linewidth=0.4, show_labels=False)
        if gt_boxes is not None:
            viz.draw_boxes(ax, gt_boxes, color="lime", show_labels=False)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    figure.tight_layout()
    if save_path:
        viz.save_figure(figure, save_path)
    return figure


def draw_warped_regions(image, boxes, region_size=32, context_pixels=None, titles=None,
                        save_path=None):
    """R-CNN's input: each region (left: on the image) warped to ``region_size`` pixels with
    ``context_pixels`` of surrounding image (appendix A; default the paper's 16 px at 227 px
    scaled), the region's own extent outlined in each crop.

    Args: image ``[H, W, 3]``; boxes ``[N, 4]`` normalized yxyx; titles: N strings (optional).
    Returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    context = rcnn.default_context_pixels(region_size) if context_pixels is None \
        else float(context_pixels)
    crops = rcnn.warp_regions(np.asarray(image, np.float32)[None], boxes,
                              np.zeros(len(boxes), np.int32), region_size, context).numpy()
    figure, axes = plt.subplots(1, len(boxes) + 1, figsize=(2.2 * (len(boxes) + 1), 2.5),
                                squeeze=False)
    axes = axes[0]
    axes[0].imshow(np.clip(image, 0, 1))
    viz.draw_boxes(axes[0], boxes, color="yellow", show_labels=False)
    axes[0].set_title("regions", fontsize=8)
    inner = (context - 0.5, region_size - context - 0.5)  # the region inside its context
    for i, (ax, crop) in enumerate(zip(axes[1:], crops)):
        ax.imshow(np.clip(crop, 0, 1))
        ax.add_patch(plt.Rectangle((inner[0], inner[0]), inner[1] - inner[0], inner[1] - inner[0],
                                   fill=False, color="yellow", linestyle="--", linewidth=0.8))
        ax.set_title(titles[i] if titles else f"{region_size} x {region_size}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    figure.tight_layout()
    if save_path:
        viz.save_figure(figure, save_path)
    return figure


def draw_svm_scores(record, class_index=0, class_names=None, save_path=None):
    """SVM scores of one class after each round of hard-negative mining: histograms of the
    scores of all negatives and of the positives (``svm_stage``'s record, or ``metrics.json`` of
    an R-CNN run), with the false positives (negatives > 0) in each title.

    Returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    bins = np.asarray(record["svm_score_bins"])
    negatives = record["svm_negative_score_histograms"]
    positives = record["svm_positive_score_histograms"]
    name = class_names[class_index] if class_names else f"class {class_index}"
    centres, width = 0.5 * (bins[1:] + bins[:-1]), bins[1] - bins[0]
    figure, axes = plt.subplots(1, len(negatives), figsize=(3.2 * len(negatives), 2.8),
                                squeeze=False, sharey=True)
    for round_index, ax in enumerate(axes[0]):
        ax.bar(centres, negatives[round_index][class_index], width=width, color="tab:red",
               alpha=0.6, label="negatives (IoU < 0.3)")
        ax.bar(centres, positives[round_index][class_index], width=width, color="tab:green",
               alpha=0.6, label="positives (ground truth)")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("SVM score (clipped to the bins)")
        false_positives = int(np.sum(np.asarray(negatives[round_index][class_index])
                                     [centres > 0]))
        ax.set_title(f"{name}, round {round_index + 1}: {false_positives} negatives > 0",
                     fontsize=8)
    axes[0][0].set_ylabel("regions")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    if save_path:
        viz.save_figure(figure, save_path)
    return figure


def draw_box_regression(model, example, proposals, count=5, save_path=None):
    """R-CNN's box regression on one image: the ``count`` best-scoring regions before (dashed,
    yellow) and after (solid, class colour) their class's ridge regressor moves them, ground truth
    in green. ``proposals`` ``[P, 4]`` are the image's regions (e.g. from the cache).

    Returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    output = rcnn_outputs(model, [example["image"]], [proposals])[0]
    scores = model.region_scores(output)[0].numpy()[:int(output["num_proposals"][0])]  # [P, K]
    moved = model.regressed_boxes(output)[0].numpy()  # [P, K, 4]
    best_class = scores.argmax(-1)
    order = np.argsort(-scores.max(-1))[:count]
    figure, ax = plt.subplots(figsize=(3.6, 3.8))
    ax.imshow(np.clip(example["image"], 0, 1))
    viz.draw_boxes(ax, example["boxes"], color="lime", show_labels=False)
    viz.draw_boxes(ax, np.asarray(proposals)[order], color="yellow", linestyle="--",
                   show_labels=False)
    viz.draw_boxes(ax, moved[order, best_class[order]], classes=best_class[order],
                   scores=scores.max(-1)[order], class_names=model.class_names)
    ax.set_title("regions (dashed) -> regressed boxes", fontsize=8)
    ax.axis("off")
    figure.tight_layout()
    if save_path:
        viz.save_figure(figure, save_path)
    return figure
