"""Sliding windows: classify every window, then run the same network convolutionally (OverFeat).

The oldest recipe of the chapter, and the waste that every later detector removes. A small
classifier learns to tell a ``WINDOW_SIZE`` x ``WINDOW_SIZE`` crop of a shape (one of the K
classes) from a crop of background (class 0). To detect, slide a window over the image at
several scales and strides, classify every crop, keep the windows whose class score is high and
remove duplicates with non-maximum suppression. Two ways to compute the same scores:

* **per window** (``mode="loop"``): crop every window and run the classifier on each crop.
  Neighbouring windows overlap by 7/8 of their width, so almost all of the arithmetic is done
  again and again for the same pixels;
* **convolutionally** (``mode="conv"``, Sermanet et al. 2014, "OverFeat", sec. 3.5): the same
  trained weights with the dense layers turned into convolutions (a Dense on the flattened
  ``k x k x C`` map is a ``k x k`` convolution with the reshaped kernel; the following Denses are
  1x1 convolutions; ``convolutionalize``), run once over the whole image. Every output position
  is one window, and the overlapping part of the computation is shared.

Both give the same score map (``tests/test_ch05_sliding_windows.py`` checks it at every window
position, on random and on trained weights): the classifier has only "valid" convolutions and
2x2 poolings, so output position ``(i, j)`` of the convolutional network sees exactly the window
whose corner is at ``(i, j) * NETWORK_STRIDE`` pixels. Scales are done by resizing the image:
a window of ``s`` pixels becomes ``WINDOW_SIZE`` pixels in the image resized by
``WINDOW_SIZE / s``, and both modes read that same resized image.

Windows are square and on a fixed grid, so a box can only be as good as the nearest window: on
``shapes`` (``train_rcnn.py --variant sliding_windows``) the objects are found (mAP@0.5 0.85) but
placed badly (mAP@[.5:.95] 0.31, against 0.78 for R-CNN's regressed regions). The lesson is the
time: ``time_detection`` (both timings) and ``bench/bench_sliding_windows.py`` (the convolutional
form is 10-13x faster for the 2,127 windows of a 128-pixel image on a 2-core CPU).

Try it::

    from ch05_detection import sliding_windows
    classifier, history = sliding_windows.train_window_classifier(examples, epochs=3)
    detector = sliding_windows.SlidingWindowDetector(classifier, image_size=128)
    maps = detector.score_maps(image, mode="conv")  # {window size: [n, n, K + 1] probabilities}
    detections = detector.detect(images)            # the padded detection dict of detector.py
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from ch04_classification.vgg import dense_head_to_convolutions
from ch05_detection import boxes as box_ops
from ch05_detection.detector import check_images, empty_detections, select_detections

WINDOW_SIZE = 32  # classifier input, pixels
NETWORK_STRIDE = 4  # two 2x2 max-poolings: neighbouring output positions are 4 pixels apart
# Window sides in pixels of a 128-pixel image (the shapes are 20-56 pixels across).
DEFAULT_WINDOW_SIZES = (24, 32, 48, 64)
MODES = ("loop", "conv")


# ----------------------------------------------------------------------------------
# the window classifier and its convolutional twin
# ----------------------------------------------------------------------------------
def build_window_classifier(num_classes, window_size=WINDOW_SIZE, filters=(16, 32, 64), units=128,
                            name="window_classifier"):
    """A LeNet-like classifier of one window: K shape classes + background (index 0).

    Only "valid" convolutions and 2x2 max-poolings, so the network has no padding: its
    convolutional twin (``convolutionalize``) computes exactly the same numbers for every window.

    ``[batch, window_size, window_size, 3]`` -> logits ``[batch, num_classes + 1]``:
    conv 5x5 -> pool 2 -> conv 3x3 -> pool 2 -> conv 3x3 -> flatten ``k x k x C`` -> dense
    ``units`` -> dense ``num_classes + 1`` (for 32-pixel windows, ``k = 4``).
    """
    if int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
    if len(tuple(filters)) != 3:
        raise ValueError(f"`filters` must have 3 entries (one per convolution), got {filters!r}")
    inputs = keras.Input((window_size, window_size, 3), name="window")
    x = keras.layers.Conv2D(filters[0], 5, activation="relu", name="conv1")(inputs)  # [b, 28, 28]
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)  # [b, 14, 14, f0]
    x = keras.layers.Conv2D(filters[1], 3, activation="relu", name="conv2")(x)  # [b, 12, 12, f1]
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)  # [b, 6, 6, f1]
    x = keras.layers.Conv2D(filters[2], 3, activation="relu", name="conv3")(x)  # [b, 4, 4, f2]
    if min(x.shape[1:3]) < 1:
        raise ValueError(f"`window_size` {window_size} is too small for the classifier (>= 22)")
    x = keras.layers.Flatten(name="flatten")(x)  # [b, k * k * f2]
    x = keras.layers.Dense(units, activation="relu", name="fc1")(x)
    logits = keras.layers.Dense(int(num_classes) + 1, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def convolutionalize(classifier):
    """The classifier as a fully convolutional network with the same weights (OverFeat sec. 3.5).

    The convolution and pooling layers are kept; the first Dense, on the flattened
    ``k x k x C`` map, becomes a ``k x k`` convolution whose kernel is the Dense kernel
    ``[k * k * C, units]`` reshaped to ``[k, k, C, units]`` (Flatten runs row-major over height,
    width, channels: the order of a convolution kernel's first three axes); every following
    Dense becomes a 1x1 convolution. The copy is ``ch04_classification.vgg``'s
    ``dense_head_to_convolutions`` (the same step turns VGG into its fully convolutional form).

    Returns:
        ``keras.Model`` ``[batch, H, W, 3]`` -> ``[batch, (H - W0) // 4 + 1, ..., K + 1]`` logits
        for any ``H, W >= W0`` (the window size): position ``(i, j)`` is the window with its
        top-left corner at pixel ``(4 i, 4 j)``.
    """
    inputs = keras.Input((None, None, 3), name="image")
    x = inputs
    dense_layers = [layer for layer in classifier.layers if isinstance(layer, keras.layers.Dense)]
    flatten = next(layer for layer in classifier.layers if isinstance(layer, keras.layers.Flatten))
    k_height, k_width = (int(d) for d in flatten.input.shape[1:3])  # the map Flatten sees
    for layer in classifier.layers[1:]:
        if isinstance(layer, keras.layers.Conv2D):
            x = keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.strides,
                                    padding=layer.padding, activation=layer.activation,
                                    name=layer.name)(x)
        elif isinstance(layer, keras.layers.MaxPooling2D):
            x = keras.layers.MaxPooling2D(layer.pool_size, strides=layer.strides,
                                          padding=layer.padding, name=layer.name)(x)
        elif isinstance(layer, keras.layers.Dense):
            # The first Dense sees the whole k x k map; the others see one position (1x1).
            kernel = (k_height, k_width) if layer is dense_layers[0] else (1, 1)
            x = keras.layers.Conv2D(layer.units, kernel, activation=layer.activation,
                                    name=f"{layer.name}_conv")(x)
        elif not isinstance(layer, keras.layers.Flatten):
            raise ValueError(f"convolutionalize: no convolutional form for layer {layer.name!r} "
                             f"({type(layer).__name__})")
    fcn = keras.Model(inputs, x, name=f"{classifier.name}_convolutional")
    return dense_head_to_convolutions(classifier, fcn)


# ----------------------------------------------------------------------------------
# windows and scales
# ----------------------------------------------------------------------------------
def num_positions(resized_size, window_size=WINDOW_SIZE, stride=NETWORK_STRIDE):
    """Windows along one side of a ``resized_size`` image:
    ``(resized_size - window) // stride + 1``."""
    return max(0, (int(resized_size) - window_size) // stride + 1)


def scale_plan(image_size, window_sizes=DEFAULT_WINDOW_SIZES, window_size=WINDOW_SIZE):
    """For each window side ``s`` (pixels of the ``image_size`` image): the resized side
    ``round(image_size * window_size / s)`` on which that window is ``window_size`` pixels, and the
    number of window positions per side. Returns a list of ``(s, resized_side, positions)``."""
    plan = []
    for side in window_sizes:
        resized = int(round(image_size * window_size / float(side)))
        count = num_positions(resized, window_size)
        if count < 1:
            raise ValueError(f"`window_sizes`: a {side}-pixel window does not fit in a "
                             f"{image_size}-pixel image")
        plan.append((int(side), resized, count))
    return plan


def window_grid_boxes(resized_size, positions, window_size=WINDOW_SIZE, stride=NETWORK_STRIDE):
    """Normalized yxyx boxes of the ``positions x positions`` windows: ``[n, n, 4]`` (row ``i``,
    column ``j`` = the window at pixel ``(stride i, stride j)`` of the resized image)."""
    starts = np.arange(positions, dtype=np.float32) * stride / resized_size
    ends = starts + window_size / resized_size
    top, left = np.meshgrid(starts, starts, indexing="ij")
    bottom, right = np.meshgrid(ends, ends, indexing="ij")
    return np.stack([top, left, bottom, right], axis=-1).astype(np.float32)


def resize_image(images, side):
    """Bilinear resize of ``[B, H, W, 3]`` (or one image) to ``side x side`` (both modes use it)."""
    return tf.image.resize(check_images(images), (side, side), method="bilinear")


# ----------------------------------------------------------------------------------
# training data: window crops from detection examples
# ----------------------------------------------------------------------------------
def training_windows(image_size, window_sizes=DEFAULT_WINDOW_SIZES, stride_fraction=0.25):
    """Every square window of every size at a stride of ``stride_fraction`` of its side:
    ``[M, 4]`` normalized yxyx (the candidates the training crops are cut from)."""
    windows = []
    for side in window_sizes:
        stride = max(1.0, side * stride_fraction)
        starts = np.arange(0.0, image_size - side + 1e-6, stride)
        top, left = np.meshgrid(starts, starts, indexing="ij")
        grid = np.stack([top, left, top + side, left + side], axis=-1).reshape(-1, 4)
        windows.append(grid / image_size)
    return np.concatenate(windows).astype(np.float32)


def label_windows(windows, gt_boxes, gt_classes, positive_iou=0.5, negative_iou=0.3):
    """Class of each window: ``c + 1`` (IoU >= ``positive_iou`` with a box of class c, the best
    one), 0 background (IoU < ``negative_iou`` with every box), -1 in between (not used).

    Args: windows ``[M, 4]``, gt_boxes ``[N, 4]``, gt_classes ``[N]`` (NumPy, N may be 0).
    Returns: ``[M]`` int32.
    """
    windows = np.asarray(windows, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    labels = np.zeros(len(windows), np.int32)
    if len(gt_boxes) == 0:
        return labels
    iou = box_ops.pairwise_iou(windows, gt_boxes).numpy()  # [M, N]
    best = iou.max(axis=1)
    labels[best >= negative_iou] = -1
    positive = best >= positive_iou
    labels[positive] = np.asarray(gt_classes, np.int32)[iou.argmax(axis=1)[positive]] + 1
    return labels


def window_training_set(examples, image_size, window_sizes=DEFAULT_WINDOW_SIZES,
                        negatives_per_positive=3.0, seed=0, window_size=WINDOW_SIZE):
    """Crops and labels for the window classifier from detection examples.

    Every grid window (``training_windows``) and the square centred on each object (side =
    its longer side) is labelled by ``label_windows``; all positives are kept, with
    ``negatives_per_positive`` times as many background windows drawn at random.

    Returns:
        ``(crops [M, window_size, window_size, 3] float32, labels [M] int32)``.
    """
    rng = np.random.default_rng(seed)
    grid = training_windows(image_size, window_sizes)
    crops, labels = [], []
    for example in examples:
        gt_boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
        centre = 0.5 * (gt_boxes[:, :2] + gt_boxes[:, 2:])
        half = 0.5 * np.max(gt_boxes[:, 2:] - gt_boxes[:, :2], axis=1, keepdims=True)
        squares = np.concatenate([centre - half, centre + half], axis=1)
        windows = np.concatenate([grid, squares]).astype(np.float32)
        window_labels = label_windows(windows, gt_boxes, example["classes"])
        positive = np.flatnonzero(window_labels > 0)
        negative = np.flatnonzero(window_labels == 0)
        count = int(round(negatives_per_positive * max(len(positive), 1)))
        negative = rng.choice(negative, size=min(count, len(negative)), replace=False)
        chosen = np.concatenate([positive, negative])
        image = tf.convert_to_tensor(np.asarray(example["image"], np.float32))[None]
        crops.append(tf.image.crop_and_resize(image, windows[chosen],
                                              tf.zeros(len(chosen), tf.int32),
                                              (window_size, window_size)).numpy())
        labels.append(window_labels[chosen])
    if not crops:
        return (np.zeros((0, window_size, window_size, 3), np.float32), np.zeros((0,), np.int32))
    return np.concatenate(crops), np.concatenate(labels).astype(np.int32)


def train_window_classifier(examples, num_classes=5, epochs=3, batch_size=64, learning_rate=1e-3,
                            window_sizes=DEFAULT_WINDOW_SIZES, image_size=None, seed=0,
                            classifier=None, verbose=0):
    """Train (or continue training) the window classifier on crops of ``examples``.

    Args:
        examples: detection examples (dicts of NumPy ``image``, ``boxes``, ``classes``).
        image_size: side of the images (default: read from the first example).
        classifier: a model from ``build_window_classifier`` to continue (default: a new one).
    Returns:
        ``(classifier, keras History)``.
    """
    if not examples:
        raise ValueError("`examples` is empty: need detection examples to cut windows from")
    image_size = int(image_size or np.asarray(examples[0]["image"]).shape[0])
    keras.utils.set_random_seed(seed)
    crops, labels = window_training_set(examples, image_size, window_sizes, seed=seed)
    if classifier is None:
        classifier = build_window_classifier(num_classes)
    classifier.compile(optimizer=keras.optimizers.Adam(learning_rate),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
    history = classifier.fit(crops, labels, batch_size=batch_size, epochs=epochs, shuffle=True,
                             verbose=verbose)
    return classifier, history


# ----------------------------------------------------------------------------------
# the detector, both ways
# ----------------------------------------------------------------------------------
class SlidingWindowDetector:
    """Multi-scale sliding-window detection with a window classifier, per window or convolutional.

    Args:
        classifier: a trained ``build_window_classifier`` model (logits, background = index 0).
        class_names: names of the K classes (default ``"class i"``).
        image_size: side of the (square) input; other images are resized to it.
        window_sizes: window sides in pixels of that image.
        score_threshold, nms_iou, max_detections: post-processing (class-wise NMS).
        crop_batch_size: crops classified per call in ``mode="loop"`` (the same arithmetic per
            window as one call per crop, with fewer Python round trips).
    ``detect`` returns the padded detection dict of ``detector.py``, so ``evaluate.run_detection``
    and the COCO export work on it.
    """

    def __init__(self, classifier, class_names=None, image_size=128,
                 window_sizes=DEFAULT_WINDOW_SIZES, score_threshold=0.05, nms_iou=0.3,
                 max_detections=100, crop_batch_size=512):
        self.classifier = classifier
        self.window_size = int(classifier.input_shape[1])
        self.num_classes = int(classifier.output_shape[-1]) - 1
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"`class_names` must have {self.num_classes} names, "
                             f"got {class_names!r}")
        self.class_names = tuple(class_names or (f"class {i}" for i in range(self.num_classes)))
        self.image_size = int(image_size)
        self.plan = scale_plan(self.image_size, window_sizes, self.window_size)
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.max_detections, self.crop_batch_size = int(max_detections), int(crop_batch_size)
        self.fcn = convolutionalize(classifier)
        self._classify = tf.function(lambda crops: tf.nn.softmax(classifier(crops, training=False)),
                                     reduce_retracing=True)
        # One graph for every scale: resize, then the convolutional network, once per scale.
        self._dense_maps = tf.function(
            lambda images: [tf.nn.softmax(self.fcn(resize_image(images, resized), training=False))
                            for _, resized, _ in self.plan],
            reduce_retracing=True)
        self._boxes = {side: window_grid_boxes(resized, count, self.window_size)
                       for side, resized, count in self.plan}

    @property
    def windows_per_image(self):
        return int(sum(count * count for _, _, count in self.plan))

    def _images(self, images):
        images = check_images(images)
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            images = tf.image.resize(images, (self.image_size, self.image_size))
        return images

    def score_maps(self, image, mode="conv"):
        """Class probabilities of every window of one image ``[H, W, 3]``.

        Returns:
            dict ``{window side: [n, n, K + 1]}`` NumPy (index 0 background); ``[i, j]`` is the
            window of ``window_boxes()[side][i, j]``.
        """
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        images = self._images(image)
        if int(images.shape[0]) != 1:
            raise ValueError(f"score_maps takes one image, got a batch of {images.shape[0]}")
        if mode == "conv":
            return {side: maps[0] for side, maps in self._conv_maps(images).items()}
        maps = {}
        for side, resized, count in self.plan:
            scaled = resize_image(images, resized)[0].numpy()  # [r, r, 3]
            # Crop every window, one by one (the loop the convolutional form removes).
            crops = np.stack([scaled[i * NETWORK_STRIDE:i * NETWORK_STRIDE + self.window_size,
                                     j * NETWORK_STRIDE:j * NETWORK_STRIDE + self.window_size]
                              for i in range(count) for j in range(count)])  # [n * n, w, w, 3]
            step = self.crop_batch_size
            scores = np.concatenate([self._classify(crops[start:start + step]).numpy()
                                     for start in range(0, len(crops), step)])
            maps[side] = scores.reshape(count, count, self.num_classes + 1)
        return maps

    def _conv_maps(self, images):
        """``{side: [B, n, n, K + 1]}`` for a batch: one pass of the convolutional network per
        scale."""
        maps = {}
        for (side, _, count), dense in zip(self.plan, self._dense_maps(images)):
            dense = dense.numpy()
            if dense.shape[1:3] != (count, count):
                raise RuntimeError(f"convolutional map {dense.shape[1:3]} != {count}x{count} "
                                   "windows")
            maps[side] = dense
        return maps

    def window_boxes(self):
        """``{window side: [n, n, 4]}`` normalized yxyx boxes of the windows."""
        return dict(self._boxes)

    def _select(self, maps_per_image):
        """Detections from ``[{side: [n, n, K + 1]}]`` (one dict per image)."""
        boxes = np.concatenate([self._boxes[side].reshape(-1, 4) for side, _, _ in self.plan])
        scores = np.stack([
            np.concatenate([maps[side].reshape(-1, self.num_classes + 1)[:, 1:]
                            for side, _, _ in self.plan])
            for maps in maps_per_image])  # [B, all windows, K]
        boxes = np.broadcast_to(boxes, (len(maps_per_image),) + boxes.shape)
        result = select_detections(boxes, scores, score_threshold=self.score_threshold,
                                   iou_threshold=self.nms_iou, max_detections=self.max_detections)
        return {key: value.numpy() for key, value in result.items()}

    def detect(self, images, batch_size=16, mode="conv"):
        """Padded detections for ``[B, H, W, 3]`` images (see ``detector.py``); ``mode`` as in
        ``score_maps``."""
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        images = self._images(images)
        outputs = []
        for start in range(0, int(images.shape[0]), batch_size):
            batch = images[start:start + batch_size]
            if mode == "conv":
                dense = self._conv_maps(batch)
                per_image = [{side: dense[side][b] for side in dense} for b in range(len(batch))]
            else:
                per_image = [self.score_maps(image, mode="loop") for image in batch]
            outputs.append(self._select(per_image))
        if not outputs:
            return empty_detections(self.max_detections)
        return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


def time_detection(detector, images, repeats=1):
    """Seconds per image of ``detect`` per window (``"loop"``) and convolutionally (``"conv"``).

    One untimed call of each mode first (tracing), then the best of ``repeats`` timed calls over
    ``images`` (one image per call, the way a camera delivers them).

    Returns:
        dict ``loop_seconds_per_image``, ``conv_seconds_per_image``, ``speedup`` (their ratio),
        ``windows_per_image``.
    """
    images = check_images(images)
    if int(images.shape[0]) < 1:
        raise ValueError("`images` is empty")
    seconds = {}
    for mode in MODES:
        detector.detect(images[:1], batch_size=1, mode=mode)  # trace
        best = float("inf")
        for _ in range(max(1, int(repeats))):
            start = time.perf_counter()
            detector.detect(images, batch_size=1, mode=mode)
            best = min(best, time.perf_counter() - start)
        seconds[mode] = best / int(images.shape[0])
    return {"loop_seconds_per_image": seconds["loop"], "conv_seconds_per_image": seconds["conv"],
            "speedup": seconds["loop"] / max(seconds["conv"], 1e-12),
            "windows_per_image": detector.windows_per_image}


# ----------------------------------------------------------------------------------
# pictures (for the notebook)
# ----------------------------------------------------------------------------------
def draw_windows(image, window_sizes=(24, 64), every=4, save_path=None):
    """The windows of two (or more) scales on one image: one panel per window side, every
    ``every``-th window position along each axis drawn (all of them would fill the image), the
    first window in red and the number of windows in the title.

    Args: image ``[H, W, 3]`` in [0, 1]; window_sizes: sides in pixels of that image.
    Returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from common import viz

    image = np.asarray(image)
    size = int(image.shape[0])
    plan = scale_plan(size, window_sizes)
    figure, axes = plt.subplots(1, len(plan), figsize=(3.0 * len(plan), 3.2), squeeze=False)
    for ax, (side, resized, count) in zip(axes[0], plan):
        boxes = window_grid_boxes(resized, count)  # [n, n, 4]
        ax.imshow(np.clip(image, 0, 1))
        viz.draw_boxes(ax, boxes[::every, ::every].reshape(-1, 4), color="yellow", linewidth=0.6,
                       show_labels=False)
        viz.draw_boxes(ax, boxes[0, 0], color="red", linewidth=1.5, show_labels=False)
        ax.set_title(f"{side}-px windows: {count} x {count} = {count * count}\n"
                     f"(stride {NETWORK_STRIDE * side / WINDOW_SIZE:g} px; every {every}th drawn)",
                     fontsize=8)
        ax.axis("off")
    figure.tight_layout()
    if save_path:
        viz.save_figure(figure, save_path)
    return figure


def draw_score_maps(detector, image, window_side=None, class_index=None, save_path=None):
    """The score map of one scale computed per window and convolutionally, side by side, with
    their absolute difference (zero up to float rounding).

    Args:
        detector: a ``SlidingWindowDetector``; image ``[H, W, 3]``.
        window_side: which scale (default: the detector's second, a mid-sized window).
        class_index: which class's probability map (0-based; default: the largest foreground
            probability of any class at each window).
    Returns: the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from common import viz

    sides = [side for side, _, _ in detector.plan]
    window_side = sides[min(1, len(sides) - 1)] if window_side is None else int(window_side)
    if window_side not in sides:
        raise ValueError(f"`window_side` must be one of {sides}, got {window_side}")
    maps = {mode: detector.score_maps(image, mode=mode)[window_side] for mode in MODES}

    def foreground(scores):  # [n, n, K + 1] -> [n, n]
        return scores[..., 1:].max(-1) if class_index is None else scores[..., int(class_index) + 1]

    loop, conv = foreground(maps["loop"]), foreground(maps["conv"])
    what = ("best class" if class_index is None
            else detector.class_names[int(class_index)])
    figure, axes = plt.subplots(1, 4, figsize=(12.0, 3.2))
    axes[0].imshow(np.clip(np.asarray(image), 0, 1))
    axes[0].set_title("image", fontsize=8)
    for ax, values, title in ((axes[1], loop, "per window (crop + classify)"),
                              (axes[2], conv, "convolutional (one pass)")):
        shown = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{title}\n{window_side}-px windows, P({what})", fontsize=8)
        figure.colorbar(shown, ax=ax, fraction=0.046)
    difference = np.abs(loop - conv)
    shown = axes[3].imshow(difference, cmap="magma")
    axes[3].set_title(f"|difference|, largest {difference.max():.1e}", fontsize=8)
    figure.colorbar(shown, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    figure.tight_layout()
    if save_path:
        viz.save_figure(figure, save_path)
    return figure
