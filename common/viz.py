"""Pictures for every chapter: image grids, boxes, masks, training curves.

Every function returns the matplotlib Figure and, given ``save_path``, also
writes it as a PNG. Nothing here needs a screen: matplotlib picks a
non-interactive backend when there is no display, and notebooks show the
returned figure inline.

Boxes follow the repo's contract: normalized ``[ymin, xmin, ymax, xmax]``,
rows with class -1 are padding and are not drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.rcParams.setdefault("figure.max_open_warning", 0)
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Tableau-like colours, one per class id (cycled).
PALETTE = np.array([
    [0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
    [0.58, 0.40, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.50, 0.50, 0.50],
    [0.74, 0.74, 0.13], [0.09, 0.75, 0.81],
])


def _numpy(value):
    if value is None:
        return None
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def class_colour(class_id: int) -> np.ndarray:
    return PALETTE[int(class_id) % len(PALETTE)]


def save_figure(figure, save_path, dpi: int = 90):
    """Write ``figure`` as a PNG (creating folders) and return it."""
    if save_path is not None:
        path = Path(save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return figure


def _grid(count: int, cols: int, cell: float = 2.6):
    count = max(count, 1)
    cols = max(1, min(cols, count))
    rows = math.ceil(count / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return figure, axes.flat


def _as_display_image(image):
    image = _numpy(image).astype(np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.max(initial=0.0) > 1.0 + 1e-6:  # uint8-range images
        image = image / 255.0
    return np.clip(image, 0.0, 1.0)


def show_images(images, titles=None, cols: int = 4, save_path=None, cmap=None):
    """A grid of images ([N, H, W, 3] or [N, H, W] or a list) with optional titles."""
    images = list(_numpy(images)) if not isinstance(images, list) else images
    figure, axes = _grid(len(images), cols)
    for i, (ax, image) in enumerate(zip(axes, images)):
        image = _as_display_image(image)
        ax.imshow(image, cmap=cmap or ("gray" if image.ndim == 2 else None))
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    figure.tight_layout()
    return save_figure(figure, save_path)


def draw_boxes(ax, boxes, classes=None, scores=None, class_names=None, color=None,
               image_shape=None, linewidth: float = 1.5, linestyle: str = "-",
               show_labels: bool = True):
    """Draw normalized yxyx ``boxes`` on ``ax`` (the image must already be shown).

    ``image_shape`` (height, width) converts to pixels; by default it is read
    from the axis' image. Rows whose class is -1 (padding) are skipped.
    A label "name 0.97" is written when class names or scores are given
    (``show_labels=False`` draws the rectangles only).
    """
    boxes = _numpy(boxes).reshape(-1, 4)
    classes = None if classes is None else _numpy(classes).reshape(-1)
    scores = None if scores is None else _numpy(scores).reshape(-1)
    if image_shape is None:
        shown = ax.get_images()
        image_shape = shown[0].get_array().shape[:2] if shown else (1, 1)
    height, width = image_shape[:2]
    for i, (ymin, xmin, ymax, xmax) in enumerate(boxes):
        class_id = None if classes is None else int(classes[i])
        if class_id is not None and class_id < 0:
            continue
        edge = color if color is not None else (
            class_colour(class_id) if class_id is not None else "lime")
        ax.add_patch(patches.Rectangle(
            (xmin * width - 0.5, ymin * height - 0.5), (xmax - xmin) * width, (ymax - ymin) * height,
            fill=False, edgecolor=edge, linewidth=linewidth, linestyle=linestyle))
        label = []
        if class_id is not None:
            label.append(class_names[class_id] if class_names is not None and class_id < len(class_names)
                         else str(class_id))
        if scores is not None:
            label.append(f"{scores[i]:.2f}")
        if label and show_labels:
            ax.text(xmin * width, ymin * height - 1, " ".join(label), fontsize=7, color="white",
                    va="bottom", bbox={"facecolor": edge, "alpha": 0.75, "pad": 1, "edgecolor": "none"})
    return ax


def show_detections(images, boxes, classes, scores=None, class_names=None, gt_boxes=None,
                    gt_classes=None, cols: int = 4, save_path=None, titles=None):
    """Detections on a batch of images; ground truth (if given) dashed in white.

    Args:
      images: [B, H, W, 3]. boxes: [B, M, 4] normalized yxyx. classes: [B, M]
      (-1 = padding). scores: [B, M] or None. gt_boxes / gt_classes: the same
      for the ground truth.
    """
    images = _numpy(images)
    figure, axes = _grid(len(images), cols)
    for b, ax in enumerate(axes):
        if b >= len(images):
            break
        ax.imshow(_as_display_image(images[b]))
        if gt_boxes is not None:
            draw_boxes(ax, _numpy(gt_boxes)[b], None if gt_classes is None else _numpy(gt_classes)[b],
                       color="white", linestyle="--", linewidth=1.0, show_labels=False)
        draw_boxes(ax, _numpy(boxes)[b], _numpy(classes)[b],
                   None if scores is None else _numpy(scores)[b], class_names)
        if titles is not None:
            ax.set_title(str(titles[b]), fontsize=9)
    figure.tight_layout()
    return save_figure(figure, save_path)


def overlay_mask(image, mask, alpha: float = 0.5, ignore_label: int = 255):
    """Colour a semantic mask ([H, W] int, 0 = background) or instance masks
    ([N, H, W] 0/1) over ``image``; returns an RGB float array in [0, 1]."""
    image = _as_display_image(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    mask = _numpy(mask)
    out = image.copy()
    if mask.ndim == 3:  # instance masks: one colour per instance
        for i, instance in enumerate(mask):
            on = instance.astype(bool)
            out[on] = (1 - alpha) * out[on] + alpha * class_colour(i)
        return out
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W] or [N, H, W], got shape {mask.shape}")
    for label in np.unique(mask):
        if label == 0 or label == ignore_label:
            continue
        on = mask == label
        out[on] = (1 - alpha) * out[on] + alpha * class_colour(label - 1)
    out[mask == ignore_label] = 0.5 * out[mask == ignore_label] + 0.5
    return out


def show_segmentation(images, true_masks, pred_masks=None, num_classes=None, save_path=None,
                      max_rows: int = 6):
    """Rows of image | ground truth | prediction (masks overlaid)."""
    images = _numpy(images)[:max_rows]
    true_masks = _numpy(true_masks)[:max_rows]
    pred_masks = None if pred_masks is None else _numpy(pred_masks)[:max_rows]
    cols = 2 if pred_masks is None else 3
    figure, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.6 * len(images)),
                                squeeze=False)
    for r in range(len(images)):
        panels = [_as_display_image(images[r]), overlay_mask(images[r], true_masks[r])]
        names = ["image", "ground truth"]
        if pred_masks is not None:
            panels.append(overlay_mask(images[r], pred_masks[r]))
            names.append("prediction")
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(names[c], fontsize=9)
    figure.tight_layout()
    return save_figure(figure, save_path)


def plot_history(history, keys=None, save_path=None):
    """Training curves from a Keras ``History`` or a dict of lists.

    Each metric gets a panel; ``val_<metric>`` is drawn in the same panel.
    """
    logs = history.history if hasattr(history, "history") else dict(history)
    if keys is None:
        keys = [k for k in logs if not k.startswith("val_")]
    keys = [k for k in keys if k in logs or f"val_{k}" in logs]
    figure, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3),
                                squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name in (key, f"val_{key}"):
            if name in logs:
                values = logs[name]
                ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, save_path)


def plot_confusion_matrix(matrix, class_names, save_path=None, normalize: bool = True):
    """A confusion matrix (rows = true class, columns = predicted class)."""
    matrix = _numpy(matrix).astype(np.float64)
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    size = max(3.0, 0.5 * len(class_names) + 1.5)
    figure, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shown, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 20:
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 * shown.max() else "black")
    figure.tight_layout()
    return save_figure(figure, save_path)


# ---------------------------------------------------------------------------
# Looking inside a CNN (ch04_classification/interpret.py): heatmaps, explanations, embeddings
# ---------------------------------------------------------------------------


def overlay_heatmap(image, heatmap, alpha: float = 0.5, cmap: str = "jet"):
    """A heatmap [H, W] coloured with ``cmap`` and blended over ``image``; RGB float in [0, 1].

    The heatmap is scaled by its own minimum and maximum (a constant map is drawn as its lowest
    colour); it must have the image's height and width (upsample CAM/Grad-CAM maps first).
    """
    image = _as_display_image(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    heatmap = _numpy(heatmap).astype(np.float32)
    if heatmap.shape != image.shape[:2]:
        raise ValueError(f"heatmap must be [H, W] = {image.shape[:2]}, got shape {heatmap.shape}")
    low, high = float(heatmap.min(initial=0.0)), float(heatmap.max(initial=0.0))
    scaled = (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)
    coloured = plt.get_cmap(cmap)(scaled)[..., :3]
    return np.clip((1.0 - alpha) * image[..., :3] + alpha * coloured, 0.0, 1.0)


def show_explanations(images, heatmaps: dict, boxes=None, titles=None, mark_peak: bool = True,
                      alpha: float = 0.5, save_path=None, cell: float = 2.0):
    """One row per image: the image, then each method's heatmap overlaid on it.

    Args:
      images: [N, H, W, 3]. heatmaps: {method name: [N, H, W]} (image resolution).
      boxes: optional [N, 4] normalized yxyx ground-truth boxes, drawn dashed in white.
      titles: optional row titles (shown on the image column).
      mark_peak: a white cross on each heatmap's maximum (the point of the pointing game).
    """
    images = _numpy(images)
    names = list(heatmaps)
    cols = 1 + len(names)
    figure, axes = plt.subplots(len(images), cols, figsize=(cell * cols, cell * max(len(images), 1)),
                                squeeze=False)
    for row, image in enumerate(images):
        panels = [_as_display_image(image)] + [overlay_heatmap(image, _numpy(heatmaps[name])[row], alpha)
                                               for name in names]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel)
            ax.axis("off")
            if boxes is not None:
                draw_boxes(ax, _numpy(boxes)[row][None], color="white", linestyle="--", linewidth=1.0,
                           image_shape=image.shape[:2])
            if col > 0 and mark_peak:
                heatmap = _numpy(heatmaps[names[col - 1]])[row]
                y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
                ax.plot([x], [y], marker="x", color="white", markersize=7, markeredgewidth=2)
            if row == 0 and col > 0:
                ax.set_title(names[col - 1], fontsize=9)
            if col == 0 and titles is not None:
                ax.set_title(str(titles[row]), fontsize=8)
    figure.tight_layout()
    return save_figure(figure, save_path)


def plot_embedding_2d(points, labels, class_names=None, save_path=None, title: str | None = None):
    """A 2-D embedding (t-SNE) as a scatter plot, one colour per class, with a legend."""
    points = _numpy(points)
    labels = _numpy(labels).reshape(-1)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
        raise ValueError(f"points must be [N, 2] with N labels, got {points.shape} and {labels.shape}")
    figure, ax = plt.subplots(figsize=(4.5, 4.0))
    for label in np.unique(labels):
        chosen = labels == label
        name = class_names[int(label)] if class_names is not None else str(label)
        ax.scatter(points[chosen, 0], points[chosen, 1], s=10, color=class_colour(label), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, save_path)
