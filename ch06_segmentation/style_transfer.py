"""Neural style transfer: content and Gram-matrix style costs, gradient descent on the pixels.

What this file teaches (Gatys, Ecker & Bethge 2016, "Image Style Transfer Using Convolutional
Neural Networks", CVPR): a generated image G is made to look like the *content* of a photograph C
painted in the *style* of an image S by minimising

    J(G) = alpha * J_content(C, G) + beta * J_style(S, G)  [+ tv_weight * TV(G)]

over the pixels of G. The network's weights stay fixed; the image is the variable.

* ``content_cost``: 1/2 * sum (a(C) - a(G))^2 over one layer's activations (Gatys eq. 1). Deep
  layers keep the arrangement of objects and let the pixels change; shallow ones keep the pixels.
* ``gram_matrix``: G_kk' = sum over positions of a_k * a_k', the correlations between channels
  k and k' of one layer (Gatys eq. 3). Summing over positions throws the layout away: what is left
  is which features occur together, i.e. texture and colour, i.e. "style".
* ``layer_style_cost``: 1 / (2 n_H n_W n_C)^2 * sum_kk' (G_kk'(S) - G_kk'(G))^2 (Gatys eq. 4, where
  N_l = n_C and M_l = n_H n_W); ``style_cost`` sums it over layers with weights w_l (eq. 5).
* ``total_variation``: sum of absolute differences of neighbouring pixels, an optional smoothness
  prior (Mahendran & Vedaldi 2015, "Understanding deep image representations by inverting them",
  sec. 3.2), equal to ``tf.image.total_variation``.
* ``build_feature_extractor``: chapter 4's VGG-19 (``get_model("vgg19", include_top=False)``),
  cut after the deepest requested layer, returning {layer name: activations}; max pooling can be
  replaced by average pooling, which Gatys et al. found gives slightly better results (sec. 2).
* ``normalize_filter_activations``: Gatys et al.'s normalisation (sec. 2): each filter is scaled so
  that its mean activation over the images and positions is 1 (here by default its root mean
  square, which suits random weights better). Every layer then speaks at about the same volume,
  so equal layer weights w_l mean about equal say.
* ``StyleTransfer`` / ``optimize``: the optimisation of the pixels under ``tf.function``, with
  Adam (Kingma & Ba 2015) or L-BFGS-B through scipy (Gatys et al. used L-BFGS), started from the
  content image or from noise, pixels kept in [0, 1].

Weights. ``weights="imagenet"`` copies keras.applications' VGG-19 ImageNet weights (a download,
so it needs the internet; offline it raises ``WeightsUnavailableError`` with what to do).
``weights=None`` keeps the random initialisation: after the normalisation above, the Gram
matrices of an *untrained* VGG-19 still carry style (He, Wang & Hopcroft 2016, "A Powerful
Generative Model Using Random Weights for the Deep Image Representation", NIPS, sec. 4-5), which
is what the offline default of ``run_style_transfer.py`` uses. ``weights`` may also be the path
of a VGG-19 trained here (``train_classifier.py --model vgg19`` writes ``model.keras``).

Names of the layers are keras.applications' (``block4_conv2`` is Gatys' conv4_2, the output of
its ReLU). Images follow the repo's contract: float RGB in [0, 1], [H, W, 3] or [batch, H, W, 3].

Run the tests: ``python -m pytest -q tests/test_ch06_style_transfer.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ch04_classification import models as ch04_models

# Gatys et al. 2016, sec. 3: content from conv4_2, style from conv1_1 .. conv5_1, w_l = 1/5.
CONTENT_LAYER = "block4_conv2"
STYLE_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")
OPTIMIZERS = ("adam", "lbfgs")
# normalize_filter_activations: filters smaller than this fraction of their layer's median are
# scaled as if they had that size.
MIN_FILTER_SIZE = 0.1
INITIALIZATIONS = ("content", "noise")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded or read (e.g. no internet)."""


# --------------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------------

def _as_features(features, argument):
    """Float32 tensor of rank 3 or 4 ([H, W, C] or [batch, H, W, C]), or ValueError."""
    features = tf.convert_to_tensor(features, dtype=tf.float32)
    if features.shape.rank not in (3, 4):
        raise ValueError(
            f"{argument} must be activations [height, width, channels] or "
            f"[batch, height, width, channels], got shape {features.shape}"
        )
    return features


def gram_matrix(features):
    """Gram matrix of a layer's activations: G_kk' = sum_ij a_ijk a_ijk' (Gatys et al. 2016, eq. 3).

    With the activations unrolled into A [n_H * n_W, n_C] (one row per position), G = A^T A: the
    inner products of every pair of channels over all positions. G is symmetric, positive
    semi-definite, and blind to where things are (shuffling the positions does not change it).

    Args:
        features: float [n_H, n_W, n_C] or [batch, n_H, n_W, n_C].
    Returns:
        [n_C, n_C] or [batch, n_C, n_C], not divided by anything (the normalisation is the cost's).
    """
    features = _as_features(features, "features")
    if features.shape.rank == 3:
        return tf.einsum("ijk,ijl->kl", features, features)
    return tf.einsum("bijk,bijl->bkl", features, features)


def content_cost(content_features, generated_features):
    """J_content = 1/2 * sum (a(C) - a(G))^2 over one layer (Gatys et al. 2016, eq. 1).

    Args:
        content_features: activations a(C) of the content image, [H, W, C] or [batch, H, W, C].
        generated_features: a(G) of the generated image, the same shape (a batch of 1 content
            image broadcasts against a batch of generated images).
    Returns:
        a scalar for unbatched input, [batch] for batched input.
    Raises:
        ValueError if the shapes differ (content and generated images must have the same size).
    """
    content = _as_features(content_features, "content_features")
    generated = _as_features(generated_features, "generated_features")
    if content.shape.rank == 4 and generated.shape.rank == 4:
        same = content.shape[1:] == generated.shape[1:]
    else:
        same = content.shape == generated.shape
    if not same:
        raise ValueError(
            f"content_features {content.shape} and generated_features {generated.shape} must have "
            "the same shape: give the content and the generated image the same size"
        )
    return 0.5 * tf.reduce_sum(tf.square(content - generated), axis=(-3, -2, -1))


def layer_style_cost(style_features, generated_features):
    """Style cost of one layer: 1 / (2 n_H n_W n_C)^2 * sum_kk' (G_kk'(S) - G_kk'(G))^2.

    The course's normalisation, equal to Gatys et al. 2016, eq. 4, E_l = 1 / (4 N_l^2 M_l^2) *
    sum (G - A)^2 with N_l = n_C channels and M_l = n_H n_W positions. Written as
    1 / (4 n_C^2) * sum (G(S) / (n_H n_W) - G(G) / (n_H n_W))^2, which is the same number and also
    works when the style image has another size than the generated one (each Gram matrix is then
    divided by its own number of positions, i.e. correlations are averaged instead of summed).

    Args:
        style_features: a(S), [H_s, W_s, C] or [batch, H_s, W_s, C].
        generated_features: a(G), [H, W, C] or [batch, H, W, C] (same number of channels C).
    Returns:
        a scalar for unbatched input, [batch] for batched input.
    Raises:
        ValueError if the channel counts differ.
    """
    style = _as_features(style_features, "style_features")
    generated = _as_features(generated_features, "generated_features")
    channels = generated.shape[-1]
    if style.shape[-1] != channels:
        raise ValueError(
            f"style_features has {style.shape[-1]} channels but generated_features has {channels}: "
            "both must come from the same layer"
        )
    style_gram = gram_matrix(style) / _positions(style)  # [(batch,) C, C]
    generated_gram = gram_matrix(generated) / _positions(generated)
    squared = tf.reduce_sum(tf.square(style_gram - generated_gram), axis=(-2, -1))
    return squared / (4.0 * float(channels) ** 2)


def _positions(features):
    """n_H * n_W as a float32 scalar (dynamic, so any image size works under tf.function)."""
    shape = tf.shape(features)
    return tf.cast(shape[-3] * shape[-2], tf.float32)


def style_cost(style_features, generated_features, layer_weights=None):
    """J_style = sum_l w_l * layer_style_cost at each layer l (Gatys et al. 2016, eq. 5).

    Args:
        style_features: {layer name: a(S)} (or a list, one entry per layer).
        generated_features: {layer name: a(G)} with the same layers (or a list in the same order).
        layer_weights: {layer name: w_l} or a list; None gives every layer the weight
            1 / number of layers (Gatys et al.: w_l = 1/5 for their five layers).
    Returns:
        a scalar for unbatched input, [batch] for batched input.
    Raises:
        ValueError for an empty list of layers, or layers missing from either argument.
    """
    if isinstance(style_features, dict):
        names = list(style_features)
        if not names:
            raise ValueError("style_features is empty: give at least one style layer")
        missing = [name for name in names if name not in generated_features]
        if missing:
            raise ValueError(f"generated_features lacks the style layers {missing}")
        style_list = [style_features[name] for name in names]
        generated_list = [generated_features[name] for name in names]
    else:
        names = list(range(len(style_features)))
        style_list, generated_list = list(style_features), list(generated_features)
        if not style_list:
            raise ValueError("style_features is empty: give at least one style layer")
        if len(generated_list) != len(style_list):
            raise ValueError(
                f"style_features has {len(style_list)} layers but generated_features has "
                f"{len(generated_list)}"
            )
    if layer_weights is None:
        weights = [1.0 / len(names)] * len(names)
    elif isinstance(layer_weights, dict):
        unknown = [name for name in names if name not in layer_weights]
        if unknown:
            raise ValueError(f"layer_weights has no weight for the layers {unknown}")
        weights = [float(layer_weights[name]) for name in names]
    else:
        weights = [float(weight) for weight in layer_weights]
        if len(weights) != len(names):
            raise ValueError(
                f"layer_weights has {len(weights)} entries for {len(names)} style layers"
            )
    total = 0.0
    for weight, style, generated in zip(weights, style_list, generated_list):
        total += weight * layer_style_cost(style, generated)
    return total


def total_variation(images):
    """Anisotropic total variation: sum of |x[i+1, j] - x[i, j]| + |x[i, j+1] - x[i, j]|.

    A smoothness prior that discourages the high-frequency noise gradient descent on pixels can
    leave (Mahendran & Vedaldi 2015, sec. 3.2, with beta = 1). Same value as
    ``tf.image.total_variation``.

    Args:
        images: float [H, W, C] or [batch, H, W, C].
    Returns:
        a scalar for one image, [batch] for a batch.
    """
    images = _as_features(images, "images")
    vertical = tf.abs(images[..., 1:, :, :] - images[..., :-1, :, :])
    horizontal = tf.abs(images[..., :, 1:, :] - images[..., :, :-1, :])
    return tf.reduce_sum(vertical, axis=(-3, -2, -1)) + tf.reduce_sum(horizontal, axis=(-3, -2, -1))


# --------------------------------------------------------------------------------------------------
# Features: chapter 4's VGG-19
# --------------------------------------------------------------------------------------------------

def vgg19_layer_names():
    """Names of VGG-19's convolution and pooling layers, input to output (keras.applications')."""
    names = []
    for block, num_convs in enumerate(ch04_models.VGG_CONFIGS["vgg19"], start=1):
        names += [f"block{block}_conv{index}" for index in range(1, num_convs + 1)]
        names.append(f"block{block}_pool")
    return tuple(names)


def _check_layer_names(layer_names, argument="layer_names"):
    if isinstance(layer_names, str):
        layer_names = (layer_names,)
    layer_names = tuple(dict.fromkeys(layer_names))  # unique, in order
    if not layer_names:
        raise ValueError(f"{argument} is empty: give at least one VGG-19 layer name")
    known = vgg19_layer_names()
    unknown = [name for name in layer_names if name not in known]
    if unknown:
        raise ValueError(f"{argument} has unknown layers {unknown}; VGG-19's layers are {known}")
    return layer_names


def _load_vgg19(weights):
    """Chapter 4's headless VGG-19 for inputs of any size, with `weights` (see module docstring).

    Random and ImageNet weights get the "caffe" ImageNet preprocessing (BGR, 0-255, mean
    subtracted), so both see the same numbers; a network trained here gets the input it was
    trained on.
    """
    if weights is None or weights == "imagenet":
        try:
            return ch04_models.get_model(
                "vgg19", (None, None, 3), num_classes=None, include_top=False, weights=weights,
                preprocessing="caffe",
            )
        except Exception as error:  # a failed download: no network, proxy, disk, corrupt file
            if weights is None:
                raise
            raise WeightsUnavailableError(
                "could not load keras.applications' ImageNet VGG-19 weights "
                f"({type(error).__name__}: {error}). They are downloaded once (about 80 MB) into "
                "~/.keras/models/ and need the internet. Without them, run with the default "
                "weights=None (random VGG-19 features, normalised; no download), or pass the path "
                "of a VGG-19 trained here (python ch04_classification/train_classifier.py "
                "--model vgg19 writes <out>/model.keras)."
            ) from error
    path = Path(str(weights))
    if not path.is_file():
        raise ValueError(
            f'weights must be None, "imagenet" or the path of a saved VGG-19 (.keras); '
            f"{str(weights)!r} is not a file"
        )
    trained = keras.models.load_model(path, compile=False)
    trained_layers = {layer.name: layer for layer in trained.layers}
    # Feed the trained network what it was trained on: train_classifier.py gives the zoo [0, 1]
    # images without preprocessing unless the model has its own preprocessing layer.
    preprocessing = "none"
    if "imagenet_preprocessing" in trained_layers:
        preprocessing = trained_layers["imagenet_preprocessing"].mode
    vgg = ch04_models.get_model(
        "vgg19", (None, None, 3), num_classes=None, include_top=False, weights=None,
        preprocessing=preprocessing,
    )
    for name in vgg19_layer_names():
        if "conv" not in name:
            continue
        if name not in trained_layers:
            raise ValueError(f"weights: {str(path)!r} has no layer {name!r}; is it a VGG-19?")
        vgg.get_layer(name).set_weights(trained_layers[name].get_weights())
    return vgg


def build_feature_extractor(layer_names=(CONTENT_LAYER,) + STYLE_LAYERS, weights=None,
                            pooling="avg", normalization_images=None, statistic="rms"):
    """VGG-19 features at named layers: images [batch, H, W, 3] in [0, 1] -> {name: activations}.

    Args:
        layer_names: VGG-19 layers (``vgg19_layer_names()``), e.g. ("block4_conv2",
            "block1_conv1", ...). The network is cut after the deepest one.
        weights: None (random initialisation; seed it with keras.utils.set_random_seed),
            "imagenet" (keras.applications' weights; a download) or the path of a VGG-19 saved by
            ``train_classifier.py --model vgg19``.
        pooling: "avg" replaces VGG's max pooling by average pooling (Gatys et al. 2016, sec. 2),
            "max" keeps it.
        normalization_images: if given, images in [0, 1] ([N, H, W, 3], or a list of [H, W, 3] of
            any sizes): the filters are rescaled so that each has activations of size 1 on them
            (``normalize_filter_activations`` with `statistic`). Needed for random weights, whose
            layers otherwise differ in scale by orders of magnitude.
        statistic: "rms" or "mean" (Gatys et al.), see ``normalize_filter_activations``.
    Returns:
        a keras.Model whose output is a dict {layer name: [batch, h, w, channels]}. Its weights are
        frozen (the optimisation changes the image, never the network).
    Raises:
        ValueError for an empty or unknown layer list or a bad `pooling`;
        WeightsUnavailableError if the ImageNet weights cannot be downloaded.
    """
    layer_names = _check_layer_names(layer_names)
    if pooling not in ("avg", "max"):
        raise ValueError(f'pooling must be "avg" or "max", got {pooling!r}')
    vgg = _load_vgg19(weights)
    order = vgg19_layer_names()
    deepest = max(order.index(name) for name in layer_names)
    inputs = keras.Input((None, None, 3), name="image")
    x = inputs
    outputs = {}
    for layer in vgg.layers[1:]:
        if isinstance(layer, keras.layers.MaxPooling2D) and pooling == "avg":
            layer = keras.layers.AveragePooling2D(2, strides=2, name=layer.name)
        x = layer(x)
        if layer.name in layer_names:
            outputs[layer.name] = x
        if layer.name == order[deepest]:
            break
    extractor = keras.Model(inputs, outputs, name=f"vgg19_features_{pooling}pool")
    extractor.trainable = False
    if normalization_images is not None:
        normalize_filter_activations(extractor, normalization_images, statistic=statistic)
    return extractor


def normalize_filter_activations(extractor, images, statistic="rms", preserve_function=True,
                                 min_relative_size=MIN_FILTER_SIZE):
    """Rescale every filter so that its activation has size 1 on `images`, in place.

    Gatys et al. 2016, sec. 2: "We normalized the network by scaling the weights such that the
    mean activation of each filter over images and positions is equal to one." ReLU is positively
    homogeneous (relu(s z) = s relu(z) for s > 0), so scaling a filter's kernel and bias by s scales
    its activation map by exactly s; dividing the next layer's input weights for that channel by s
    (preserve_function=True) undoes it there, so the network computes the same function up to one
    positive scale per channel. Layers are visited input to output.

    statistic="mean" is Gatys et al.'s choice (for the trained VGG). statistic="rms" (the default)
    makes the root mean square sqrt(E[a^2]) of each filter 1 instead, i.e. every diagonal entry of
    the Gram matrix divided by n_H n_W is 1 on average over `images` (and by Cauchy-Schwarz no
    entry exceeds the diagonal ones). Random activations are heavy-tailed (a few positions 100-500
    times the mean) and many filters are silent almost everywhere: their mean is tiny, and dividing
    by it blows them up; the RMS is the steadier measure of a filter's size.
    preserve_function=False leaves the next layer alone, so each layer sees inputs of unit size
    (a data-dependent initialisation, Kraehenbuehl et al. 2016).

    A filter whose size is below `min_relative_size` (default 0.1) times the median of its layer
    (a dead ReLU, or one that fires at a handful of positions) gets the scale of a filter of that
    size, so it cannot be amplified a millionfold and explode on an image where it does fire.
    Random networks have such filters: measured on china.jpg against the petals at 128 px, the
    style costs of the five layers of Gatys et al. spread over a factor of 100 with the mean and no
    floor (min_relative_size=0; block3_conv1 197, block1_conv1 1.9), and over a factor of about 6
    with the floor or with the RMS, so that equal layer weights mean roughly equal say.

    Args:
        extractor: a model from ``build_feature_extractor`` (any chain of Conv2D and pooling layers
            after an optional preprocessing layer).
        images: float [N, H, W, 3] in [0, 1], or a list of [H, W, 3] images of any sizes (e.g. the
            content and the style image); each image counts alike.
        statistic: "rms" or "mean".
        preserve_function: see above.
        min_relative_size: the floor, as a fraction of the layer's median filter size.
    Returns:
        {conv layer name: the scale s applied to its filters, [channels]}.
    """
    if statistic not in ("rms", "mean"):
        raise ValueError(f'statistic must be "rms" or "mean", got {statistic!r}')
    if isinstance(images, (list, tuple)):
        batches = [_as_image_batch(image, "images") for image in images]
    else:
        batch = tf.convert_to_tensor(images, tf.float32)
        if batch.shape.rank != 4 or batch.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] in [0, 1] or a list of [H, W, 3], "
                             f"got shape {batch.shape}")
        batches = [batch[index:index + 1] for index in range(batch.shape[0])]
    if not batches:
        raise ValueError("images is empty: give at least one image to normalise on")
    xs = batches
    scales = {}
    previous_scale = None
    for layer in extractor.layers[1:]:
        if not isinstance(layer, keras.layers.Conv2D):
            xs = [layer(x) for x in xs]
            continue
        kernel, bias = layer.get_weights()
        if preserve_function and previous_scale is not None:
            kernel = kernel / previous_scale[None, None, :, None]
            layer.set_weights([kernel, bias])
        xs = [layer(x) for x in xs]
        # Each image counts alike, whatever its size: the mean over images of a per-image mean.
        if statistic == "mean":
            size = np.mean([tf.reduce_mean(x, axis=(0, 1, 2)).numpy() for x in xs], axis=0)
        else:
            size = np.sqrt(np.mean([tf.reduce_mean(tf.square(x), axis=(0, 1, 2)).numpy()
                                    for x in xs], axis=0))
        # A filter (almost) silent on these images is scaled like one at a tenth of the layer's
        # median size, so that one which is rare here cannot blow up on another image.
        floor = np.maximum(size, min_relative_size * float(np.median(size)))
        scale = np.where(floor > 0, 1.0 / np.where(floor > 0, floor, 1.0), 1.0)
        scale = scale.astype(np.float32)  # [channels]; a filter that is 0 everywhere keeps 1
        layer.set_weights([kernel * scale, bias * scale])
        xs = [x * scale for x in xs]
        scales[layer.name] = scale
        previous_scale = scale
    return scales


# --------------------------------------------------------------------------------------------------
# The optimisation of the pixels
# --------------------------------------------------------------------------------------------------

def _as_image_batch(image, argument):
    image = tf.convert_to_tensor(image, tf.float32)
    if image.shape.rank == 3:
        image = image[None]
    if image.shape.rank != 4 or image.shape[0] != 1 or image.shape[-1] != 3:
        raise ValueError(
            f"{argument} must be one RGB image [H, W, 3] (or [1, H, W, 3]) in [0, 1], "
            f"got shape {image.shape}"
        )
    if image.shape[1] is None or image.shape[1] < 16 or image.shape[2] < 16:
        raise ValueError(f"{argument} must be at least 16x16 pixels, got shape {image.shape}")
    return image


class StyleTransfer:
    """J(G) = alpha J_content(C, G) + beta J_style(S, G) + tv_weight TV(G) for fixed C and S.

    Computes the targets a(C) and a(S) once; ``costs(G)`` and ``value_and_gradient(G)`` run under
    ``tf.function`` (traced once per image size).

    Args:
        extractor: from ``build_feature_extractor``; must output `content_layer` and `style_layers`.
        content_image: [H, W, 3] in [0, 1]; the generated image has its size.
        style_image: [H_s, W_s, 3] in [0, 1], any size.
        content_layer: one layer name (default Gatys' conv4_2).
        style_layers: layer names (default conv1_1 .. conv5_1), or {name: weight}.
        content_weight, style_weight: alpha and beta.
        tv_weight: weight of ``total_variation`` (0 = off).
    """

    def __init__(self, extractor, content_image, style_image, content_layer=CONTENT_LAYER,
                 style_layers=STYLE_LAYERS, content_weight=1.0, style_weight=1.0, tv_weight=0.0):
        if isinstance(style_layers, dict):
            self.style_layer_weights = {name: float(w) for name, w in style_layers.items()}
        else:
            names = _check_layer_names(style_layers, "style_layers")
            self.style_layer_weights = {name: 1.0 / len(names) for name in names}
        _check_layer_names(tuple(self.style_layer_weights), "style_layers")
        (self.content_layer,) = _check_layer_names((content_layer,), "content_layer")
        missing = [name for name in (self.content_layer, *self.style_layer_weights)
                   if name not in extractor.output]
        if missing:
            raise ValueError(f"extractor does not output the layers {missing}; build it with them")
        for name, value in (("content_weight", content_weight), ("style_weight", style_weight),
                            ("tv_weight", tv_weight)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.extractor = extractor
        self.content_image = _as_image_batch(content_image, "content_image")
        self.style_image = _as_image_batch(style_image, "style_image")
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.tv_weight = float(tv_weight)
        self.content_target = extractor(self.content_image)[self.content_layer]
        style_outputs = extractor(self.style_image)
        self.style_targets = {name: style_outputs[name] for name in self.style_layer_weights}
        self.costs = tf.function(self._costs)
        self.value_and_gradient = tf.function(self._value_and_gradient)

    @property
    def image_shape(self):
        return tuple(self.content_image.shape)

    def _costs(self, image):
        """{"content", "style", "tv", "total"} of one image [1, H, W, 3] (scalars)."""
        outputs = self.extractor(image)
        content = content_cost(self.content_target, outputs[self.content_layer])[0]
        style = style_cost(self.style_targets, outputs, self.style_layer_weights)[0]
        tv = total_variation(image)[0]
        total = self.content_weight * content + self.style_weight * style + self.tv_weight * tv
        return {"content": content, "style": style, "tv": tv, "total": total}

    def _value_and_gradient(self, image):
        with tf.GradientTape() as tape:
            tape.watch(image)
            costs = self._costs(image)
        return costs, tape.gradient(costs["total"], image)

    def initial_image(self, init="content", seed=0, noise_ratio=1.0):
        """Where G starts: the content image, or noise (uniform in [0, 1]).

        noise_ratio < 1 with init="noise" blends noise with the content image:
        G = noise_ratio * noise + (1 - noise_ratio) * C (the course's initialisation).
        """
        if init not in INITIALIZATIONS:
            raise ValueError(f"init must be one of {INITIALIZATIONS}, got {init!r}")
        if init == "content":
            return tf.identity(self.content_image)
        noise = tf.random.stateless_uniform(self.image_shape, seed=[seed, 0])
        return noise_ratio * noise + (1.0 - noise_ratio) * self.content_image


def optimize(transfer, initial_image, steps, optimizer="lbfgs", learning_rate=0.02,
             log_every=0, time_budget_seconds=None):
    """Minimise J(G) over the pixels of G, kept in [0, 1].

    Args:
        transfer: a ``StyleTransfer``.
        initial_image: [1, H, W, 3] (``transfer.initial_image(...)``).
        steps: iterations (Adam steps, or L-BFGS iterations, each one or a few evaluations).
        optimizer: "adam" (``keras.optimizers.Adam``, then clipping to [0, 1], under tf.function)
            or "lbfgs" (scipy's L-BFGS-B with the box constraint 0 <= pixel <= 1, the optimiser of
            Gatys et al.; the gradient comes from ``transfer.value_and_gradient`` under
            tf.function).
        learning_rate: Adam's step size on the [0, 1] pixel scale (ignored by L-BFGS).
        log_every: print the costs every this many iterations (0 = quiet).
        time_budget_seconds: stop early when this much time has passed (None = no limit).
    Returns:
        (image [1, H, W, 3], history) with history = {"step", "content", "style", "tv", "total",
        "seconds"} lists, entry 0 at the initial image, then one entry per iteration.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    initial_image = tf.convert_to_tensor(initial_image, tf.float32)
    if tuple(initial_image.shape) != transfer.image_shape:
        raise ValueError(
            f"initial_image must have the content image's shape {transfer.image_shape}, "
            f"got {tuple(initial_image.shape)}"
        )
    history = {key: [] for key in ("step", "content", "style", "tv", "total", "seconds")}
    start = time.perf_counter()

    def record(step, costs):
        history["step"].append(int(step))
        for key in ("content", "style", "tv", "total"):
            history[key].append(float(costs[key]))
        history["seconds"].append(time.perf_counter() - start)
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step:4d}  total {float(costs['total']):.4g}  content "
                  f"{float(costs['content']):.4g}  style {float(costs['style']):.4g}  "
                  f"({history['seconds'][-1]:.0f} s)", flush=True)

    def out_of_time():
        return time_budget_seconds is not None and time.perf_counter() - start > time_budget_seconds

    if optimizer == "adam":
        image = _optimize_adam(transfer, initial_image, steps, learning_rate, record, out_of_time)
    else:
        record(0, transfer.costs(initial_image))
        image = _optimize_lbfgs(transfer, initial_image, steps, record, out_of_time)
    return image, history


def _optimize_adam(transfer, initial_image, steps, learning_rate, record, out_of_time):
    image = tf.Variable(initial_image, name="generated_image")
    adam = keras.optimizers.Adam(learning_rate)

    @tf.function
    def train_step():
        costs, gradient = transfer._value_and_gradient(tf.convert_to_tensor(image))
        adam.apply_gradients([(gradient, image)])
        image.assign(tf.clip_by_value(image, 0.0, 1.0))  # a pixel lives in [0, 1]
        return costs

    step = 0
    while step < steps:
        # The costs come with the gradient, i.e. they are those of the image *before* this step:
        # step k + 1 reports J(G_k). One forward pass per step instead of two.
        record(step, train_step())
        step += 1
        if out_of_time():
            break
    record(step, transfer.costs(tf.convert_to_tensor(image)))  # the final image
    return tf.convert_to_tensor(image)


class _StopOptimization(Exception):
    pass


def _optimize_lbfgs(transfer, initial_image, steps, record, out_of_time):
    from scipy.optimize import minimize  # scipy comes with scikit-learn

    shape = transfer.image_shape
    cache = {}

    def value_and_gradient(flat):
        image = tf.constant(flat.reshape(shape), tf.float32)
        costs, gradient = transfer.value_and_gradient(image)
        cache["costs"], cache["x"] = costs, flat.copy()
        return float(costs["total"]), gradient.numpy().astype(np.float64).ravel()

    iteration = [0]

    def callback(flat):
        iteration[0] += 1
        if not np.array_equal(flat, cache.get("x")):
            cache["costs"] = transfer.costs(tf.constant(flat.reshape(shape), tf.float32))
            cache["x"] = flat.copy()
        record(iteration[0], cache["costs"])
        best["x"] = flat.copy()
        if out_of_time():
            raise _StopOptimization

    best = {"x": initial_image.numpy().astype(np.float64).ravel()}
    if steps > 0:
        try:
            minimize(value_and_gradient, best["x"], jac=True, method="L-BFGS-B",
                     bounds=[(0.0, 1.0)] * best["x"].size, callback=callback,
                     options={"maxiter": int(steps), "maxfun": 2 * int(steps) + 10})
        except _StopOptimization:
            pass
    return tf.constant(best["x"].reshape(shape), tf.float32)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------

# Photographs bundled with scikit-learn (no download), and a crop of one as a texture.
# "flower_petals": the dahlia's petals; the crop is [ymin, xmin, ymax, xmax] as fractions of
# flower.jpg's height and width.
SAMPLE_IMAGES = {
    "china.jpg": ("china.jpg", None),
    "flower.jpg": ("flower.jpg", None),
    "flower_petals": ("flower.jpg", (0.24, 0.30, 0.74, 0.66)),
}


def load_image(source, max_size=None):
    """An RGB image float32 [H, W, 3] in [0, 1] from a file or a name of ``SAMPLE_IMAGES``.

    max_size: if given, resize (keeping the aspect ratio, area interpolation) so that the longer
    side is `max_size` pixels.
    """
    source = str(source)
    if source in SAMPLE_IMAGES:
        from sklearn.datasets import load_sample_image  # bundled with scikit-learn

        name, crop = SAMPLE_IMAGES[source]
        image = load_sample_image(name)
        if crop is not None:
            height, width = image.shape[:2]
            image = image[int(crop[0] * height):int(crop[2] * height),
                          int(crop[1] * width):int(crop[3] * width)]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"image {source!r} is neither a file nor one of the bundled samples "
                f"{sorted(SAMPLE_IMAGES)}"
            )
        try:
            image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3,
                                       expand_animations=False).numpy()
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(f"image {source!r} is not a PNG, JPEG, GIF or BMP file") from error
    image = tf.convert_to_tensor(image, tf.float32) / 255.0
    if max_size is not None:
        if int(max_size) != max_size or max_size < 16:
            raise ValueError(f"max_size must be an integer >= 16, got {max_size!r}")
        height, width = image.shape[:2]
        scale = max_size / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = tf.image.resize(image, size, method="area", antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)
