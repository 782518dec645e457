"""Looking inside a CNN: every visualisation of the lecture, as functions that return arrays.

What this file teaches. A trained classifier can be examined at four levels, and each function here
takes a Keras functional model (and a layer name where it needs one) and returns NumPy arrays;
plotting is left to `common/viz.py`.

Understanding the model
    first_layer_filters      the first convolution's kernels as small images (Krizhevsky et al. 2012,
                             Fig. 3: edge and colour-blob detectors)
    activation_maps          a layer's feature maps for some images
    embeddings, nearest_neighbours, tsne
                             the data set seen through a layer: neighbours in feature space
                             (Krizhevsky et al. 2012, Fig. 4) and a 2-D t-SNE map (van der Maaten &
                             Hinton 2008, via sklearn.manifold.TSNE)
    receptive_field, top_activating_patches
                             the image patches where one channel fires most (Zeiler & Fergus 2014,
                             Fig. 2; Girshick et al. 2014, Fig. 4), cut out with the receptive field
                             computed from the kernels and strides (Araujo et al. 2019, "Computing
                             Receptive Fields of Convolutional Neural Networks", Distill, eq. 1-2)
    class_visualization      gradient ascent on the input to maximise one class score (Simonyan,
                             Vedaldi & Zisserman 2014, sec. 2) with L2 decay, jitter and blur
                             (Yosinski et al. 2015, sec. 3)
Explaining one decision (each returns a heatmap per image)
    occlusion_map            slide a grey patch, record the drop of the class probability
                             (Zeiler & Fergus 2014, sec. 4.2)
    input_gradients, saliency_map
                             |d score / d pixel|, max over channels (Simonyan et al. 2014, sec. 3.1)
    guided_backprop          the gradient through ReLUs that pass back only positive gradients for
                             positive inputs (Springenberg et al. 2015, sec. 3.4, Fig. 1)
    class_activation_map     CAM for networks ending in global average pooling + one dense layer
                             (Zhou et al. 2016, "Learning Deep Features for Discriminative
                             Localization", sec. 2, eq. 1-2)
    grad_cam                 any conv layer: ReLU(sum_k alpha_k A^k) with alpha_k the spatial mean of
                             d score / d A^k (Selvaraju et al. 2017, eq. 1-2)
    explain, upsample        one name -> image-resolution heatmap, for every method above
Scoring the explanations (used by score_explanations.py)
    single_object_dataset    shapes scenes with exactly one object, and its box
    pointing_hits, mass_in_box, centre_heatmaps, format_scores
                             the pointing game (Zhang et al. 2016, sec. 5.1), the heatmap's mass inside
                             the box, and the centre baseline
Checking the explanations
    randomized_copy, sanity_check
                             the model-randomisation test of Adebayo et al. 2018 ("Sanity Checks for
                             Saliency Maps", sec. 3.1): an explanation that barely changes when the
                             weights are re-initialised does not explain the model.

"Score" always means the pre-softmax score (logit) of a class, as in Simonyan et al. and Selvaraju
et al.: the softmax makes the probability of one class depend on all the others. `pre_softmax_scores`
explains how it is found (the model may end in a Dense(activation="softmax"), as every model of the
zoo and of keras.applications does).

Every function works on the chapter-4 zoo (`ch04_classification.models`) and on keras.applications
models, e.g. `keras.applications.ResNet50(weights="imagenet")` fed with its own preprocessed inputs
(pass `value_range`/`fill_value` that match them). Run the tests with
`python -m pytest -q tests/test_ch04_interpret.py`; `notebooks/cnn_visualization.ipynb` shows them all.
"""

from __future__ import annotations

import math
import weakref
from collections import namedtuple

import keras
import numpy as np
import tensorflow as tf

from common import synthetic

PACKAGE = "ch04_classification"
METHODS = ("grad_cam", "cam", "occlusion", "saliency", "guided_backprop")

# --------------------------------------------------------------------------------------------------
# Walking a functional model's graph
# --------------------------------------------------------------------------------------------------


def _check_model(model):
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise ValueError(
            "model must be a built functional (or Sequential) keras.Model with known inputs, "
            f"got {type(model).__name__}"
        )
    if len(model.inputs) != 1:
        raise ValueError(f"model must have one image input, got {len(model.inputs)} inputs")
    if len(model.inputs[0].shape) != 4:
        raise ValueError(
            f"model's input must be images [batch, height, width, channels], got {model.inputs[0].shape}"
        )


def _producer(tensor):
    """(layer, node) that produced a symbolic tensor of a functional graph."""
    layer, node_index, _ = tensor._keras_history
    return layer, layer._inbound_nodes[node_index]


def _graph_nodes(model):
    """{id(layer): node} for every layer call in `model`'s graph (walked back from its outputs).

    Looking the node up in the model's own graph (instead of `layer.output`) keeps working when a
    layer is shared by several models, as in `guided_model`.
    """
    nodes, stack, seen = {}, list(model.outputs), set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        layer, node = _producer(tensor)
        nodes.setdefault(id(layer), node)
        stack.extend(node.input_tensors)
    return nodes


def _layer_output(model, layer_name):
    """The symbolic output tensor of the layer called `layer_name` in `model`'s graph."""
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ValueError(f"layer_name must be one of the model's layers {names}, got {layer_name!r}")
    layer = model.get_layer(layer_name)
    node = _graph_nodes(model).get(id(layer))
    if node is None:
        raise ValueError(f"layer {layer_name!r} is not on the path from the model's input to its output")
    return node.output_tensors[0]


def last_conv_layer_name(model):
    """Name of the last layer whose output is a feature map [batch, h, w, c] with h, w > 1 or unknown.

    That is the layer Grad-CAM uses by default and CAM uses always (the input of the global pooling).
    """
    _check_model(model)
    for layer in reversed(model.layers):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer) and not (
            shape[1] == 1 and shape[2] == 1
        ):
            return layer.name
    raise ValueError("model has no layer with a [batch, h, w, c] output (needs a convolutional model)")


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) if activation is not None else None


def _output_head(model):
    """(head layer, head node) of the model's (first) output."""
    return _producer(model.outputs[0])


class _ScoreNetwork:
    """images -> (feature maps of the requested layers, pre-softmax scores [batch, classes]).

    How the pre-softmax score is found from the model's last layer:
      - Dense(activation="softmax" or "sigmoid"): the layer's linear part, x @ kernel + bias,
        computed with the layer's own (shared) weights on the layer's input;
      - Activation("softmax"/"sigmoid") or Softmax layer: that layer's input;
      - a last layer with a linear activation (classifier_activation=None): the output itself.
    The probability is the softmax (or sigmoid) of the score in every case.
    """

    def __init__(self, model, layer_names=()):
        _check_model(model)
        head, node = _output_head(model)
        activation = _activation_name(head)
        self.dense = None
        self.probability = "softmax"
        if isinstance(head, keras.layers.Softmax) or (
            isinstance(head, keras.layers.Activation) and activation in ("softmax", "sigmoid")
        ):
            score_tensor = node.input_tensors[0]
            self.probability = "sigmoid" if activation == "sigmoid" else "softmax"
        elif activation in ("softmax", "sigmoid"):
            if not isinstance(head, keras.layers.Dense):
                raise ValueError(
                    f"cannot take the pre-softmax score of a final {type(head).__name__} with a "
                    f"{activation} activation; build the model with classifier_activation=None"
                )
            score_tensor = node.input_tensors[0]
            self.dense = head
            self.probability = activation
        elif activation in (None, "linear") and len(model.outputs[0].shape) == 2:
            score_tensor = model.outputs[0]
        else:
            raise ValueError(
                "model must end in class scores [batch, classes]: a Dense layer (softmax, sigmoid or "
                f"linear) or a softmax Activation, got {type(head).__name__} with output "
                f"{model.outputs[0].shape}"
            )
        self.num_features = len(layer_names)
        features = [_layer_output(model, name) for name in layer_names]
        self.model = keras.Model(model.inputs[0], features + [score_tensor])
        self.num_classes = int(model.outputs[0].shape[-1])
        self._functions = {}

    def function(self, name, build):
        """A tf.function made once per network by `build(self)` (so repeated calls reuse traces)."""
        if name not in self._functions:
            self._functions[name] = _quietly(build(self))
        return self._functions[name]

    def __call__(self, images):
        outputs = self.model(images, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        features, scores = list(outputs[:-1]), outputs[-1]
        if self.dense is not None:
            scores = tf.matmul(scores, self.dense.kernel)  # [batch, classes]
            if self.dense.use_bias:
                scores = scores + self.dense.bias
        return features, scores

    def probabilities(self, scores):
        return tf.sigmoid(scores) if self.probability == "sigmoid" else tf.nn.softmax(scores, axis=-1)


def _quietly(function):
    """Call `function` with TensorFlow's retracing warnings off.

    Every model (and its guided and re-initialised copies) gets its own traced functions, which
    TensorFlow's retracing detector counts as one function traced again and again.
    """

    def call(*args):
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")
        try:
            return function(*args)
        finally:
            logger.setLevel(level)

    return call


# Score networks and guided copies are made once per model and reused (with their traced
# tf.functions); the cache forgets a model when it is garbage collected.
_NETWORKS = weakref.WeakKeyDictionary()
_GUIDED_MODELS = weakref.WeakKeyDictionary()


def _score_network(model, layer_names=()):
    _check_model(model)
    networks = _NETWORKS.setdefault(model, {})
    key = tuple(layer_names)
    if key not in networks:
        networks[key] = _ScoreNetwork(model, key)
    return networks[key]


def _as_images(images, model=None):
    images = np.asarray(images.numpy() if hasattr(images, "numpy") else images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be a batch [batch, height, width, channels], got shape {images.shape}")
    if model is not None:
        expected = model.inputs[0].shape[1:]
        for got, want in zip(images.shape[1:], expected):
            if want is not None and got != want:
                raise ValueError(
                    f"images must have the model's input shape {tuple(expected)}, got {images.shape[1:]}"
                )
    return images


def _class_indices(class_index, num_images, num_classes, network=None, images=None, batch_size=64):
    """int32 [num_images] class per image; None = the model's top class for each image."""
    if class_index is None:
        if network is None:
            raise ValueError("class_index is needed here")
        return np.concatenate(
            [np.argmax(np.asarray(network(images[i : i + batch_size])[1]), axis=-1)
             for i in range(0, len(images), batch_size)] or [np.zeros([0], np.int64)]
        ).astype(np.int32)
    classes = np.asarray(class_index)
    if classes.ndim == 0:
        classes = np.full([num_images], int(classes))
    if classes.shape != (num_images,) or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(
            f"class_index must be an int or {num_images} ints (one per image), got {class_index!r}"
        )
    if num_images and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class_index must be in [0, {num_classes}), got {class_index!r}")
    return classes.astype(np.int32)


def _chunks(count, batch_size):
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def pre_softmax_scores(model, images, batch_size=64):
    """Class scores before the softmax: [batch, H, W, C] -> [batch, classes].

    For a model ending in Dense(activation="softmax") the score is that layer's linear output
    x @ kernel + bias, computed with its own weights on its input (the model is not changed or
    copied); softmax(pre_softmax_scores(model, x)) == model(x). See `_ScoreNetwork`.
    """
    network = _score_network(model)
    images = _as_images(images, model)
    if len(images) == 0:
        return np.zeros([0, network.num_classes], np.float32)
    return np.concatenate(
        [np.asarray(network(images[s])[1]) for s in _chunks(len(images), batch_size)]
    )


# --------------------------------------------------------------------------------------------------
# Understanding the model: filters, activations, embeddings
# --------------------------------------------------------------------------------------------------


def first_layer_filters(model, normalize=True):
    """The first convolution's kernels as images: [filters, kernel_h, kernel_w, in_channels].

    With `normalize`, each filter is scaled to [0, 1] by its own minimum and maximum, as the filter
    pictures of Krizhevsky et al. 2012 (Fig. 3) are drawn.
    """
    _check_model(model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
            kernel = np.asarray(layer.kernel)  # [kh, kw, in, out]
            filters = np.transpose(kernel, (3, 0, 1, 2)).astype(np.float32)
            if normalize:
                low = filters.min(axis=(1, 2, 3), keepdims=True)
                high = filters.max(axis=(1, 2, 3), keepdims=True)
                filters = (filters - low) / np.maximum(high - low, 1e-12)
            return filters
    raise ValueError("model has no Conv2D layer")


def activation_maps(model, images, layer_name, batch_size=64):
    """The output of layer `layer_name` for each image: [batch, h, w, channels] (any layer's shape)."""
    _check_model(model)
    images = _as_images(images, model)
    sub_model = keras.Model(model.inputs[0], _layer_output(model, layer_name))
    if len(images) == 0:
        return np.zeros((0,) + tuple(d or 0 for d in sub_model.outputs[0].shape[1:]), np.float32)
    return np.concatenate(
        [np.asarray(sub_model(images[s], training=False)) for s in _chunks(len(images), batch_size)]
    )


def embeddings(model, images, layer_name, pooling="avg", batch_size=64):
    """Feature vectors of `images` at `layer_name`: [N, D].

    A feature map [N, h, w, c] is reduced by `pooling`: "avg" (global average, D = c), "max", or
    "flatten" (D = h * w * c). Vectors [N, D] are returned as they are.
    """
    if pooling not in ("avg", "max", "flatten"):
        raise ValueError(f'pooling must be "avg", "max" or "flatten", got {pooling!r}')
    features = activation_maps(model, images, layer_name, batch_size)
    if features.ndim == 2:
        return features
    if pooling == "avg":
        return features.mean(axis=tuple(range(1, features.ndim - 1)))
    if pooling == "max":
        return features.max(axis=tuple(range(1, features.ndim - 1)))
    return features.reshape(len(features), -1)


def nearest_neighbours(query_embeddings, database_embeddings, count=5, metric="euclidean"):
    """Indices [Q, count] and distances [Q, count] of the `count` nearest database rows per query.

    metric: "euclidean" or "cosine" (1 - cosine similarity). Ties keep the lower index first.
    Krizhevsky et al. 2012 (Fig. 4) show that images close in the last hidden layer's space are
    semantically alike although their pixels differ.
    """
    queries = np.asarray(query_embeddings, np.float64)
    database = np.asarray(database_embeddings, np.float64)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            "query_embeddings and database_embeddings must be [Q, D] and [N, D], got "
            f"{queries.shape} and {database.shape}"
        )
    if not 1 <= int(count) <= len(database):
        raise ValueError(f"count must be in [1, {len(database)}], got {count}")
    if metric == "euclidean":
        squared = (
            (queries**2).sum(1)[:, None] - 2.0 * queries @ database.T + (database**2).sum(1)[None, :]
        )
        distances = np.sqrt(np.maximum(squared, 0.0))
    elif metric == "cosine":
        q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        d = database / np.maximum(np.linalg.norm(database, axis=1, keepdims=True), 1e-12)
        distances = 1.0 - q @ d.T
    else:
        raise ValueError(f'metric must be "euclidean" or "cosine", got {metric!r}')
    order = np.argsort(distances, axis=1, kind="stable")[:, :count]
    return order, np.take_along_axis(distances, order, axis=1)


def tsne(embeddings_array, perplexity=30.0, seed=0):
    """A 2-D t-SNE map of [N, D] embeddings: [N, 2] (sklearn.manifold.TSNE, PCA initialisation).

    The perplexity (roughly the number of neighbours each point keeps close) must be below N;
    it is lowered to (N - 1) / 3 for small sets.
    """
    from sklearn.manifold import TSNE

    points = np.asarray(embeddings_array, np.float32)
    if points.ndim != 2 or len(points) < 2:
        raise ValueError(f"embeddings must be [N, D] with N >= 2, got shape {points.shape}")
    perplexity = float(min(perplexity, max((len(points) - 1) / 3.0, 1.0)))
    if len(points) <= perplexity:
        perplexity = len(points) - 1.0
    model = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return model.fit_transform(points).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Receptive fields and maximally activating patches
# --------------------------------------------------------------------------------------------------

# Per axis (height, width): size of the field, stride between neighbouring units, and the input
# coordinate of the centre of unit 0 (pixel centres are at 0, 1, 2, ...; may be x.5).
Geometry = namedtuple("Geometry", ["size", "stride", "start"])


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _same_padding_before(kernel, stride, length):
    """Zeros TensorFlow's "same" padding puts before the first pixel (the extra one goes after)."""
    if length is None:  # unknown size: assume it divides by the stride
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - (length % stride if length % stride else stride), 0)
    return total // 2


def _sliding(geometry, kernel, stride, padding, lengths):
    size, step, start = [], [], []
    for axis in range(2):
        k, s = kernel[axis], stride[axis]
        before = _same_padding_before(k, s, lengths[axis]) if padding == "same" else 0
        size.append(geometry.size[axis] + (k - 1) * geometry.stride[axis])
        step.append(geometry.stride[axis] * s)
        start.append(geometry.start[axis] + ((k - 1) / 2.0 - before) * geometry.stride[axis])
    return Geometry(tuple(size), tuple(step), tuple(start))


def _union(geometries):
    """Field of a unit that sees several maps of the same grid (Add, Concatenate, Multiply)."""
    strides = {g.stride for g in geometries}
    if len(strides) != 1:
        raise ValueError(f"cannot merge feature maps with different strides {sorted(strides)}")
    size, start = [], []
    for axis in range(2):
        low = min(g.start[axis] - (g.size[axis] - 1) / 2.0 for g in geometries)
        high = max(g.start[axis] + (g.size[axis] - 1) / 2.0 for g in geometries)
        size.append(high - low + 1)
        start.append((low + high) / 2.0)
    return Geometry(tuple(_integral(v) for v in size), geometries[0].stride, tuple(start))


def _integral(value):
    return round(value) if math.isfinite(value) else value


def _compose(outer, inner):
    """Field of `inner` (relative to a sub-model's input) placed on `outer` (that input's field)."""
    return Geometry(
        tuple(outer.size[a] + (inner.size[a] - 1) * outer.stride[a] for a in range(2)),
        tuple(outer.stride[a] * inner.stride[a] for a in range(2)),
        tuple(outer.start[a] + inner.start[a] * outer.stride[a] for a in range(2)),
    )


def _is_spatial(tensor):
    return len(tensor.shape) == 4


def _layer_geometry(layer, node, inputs):
    """Geometry of `layer`'s output from its inputs' geometries (None = not a spatial map)."""
    output = node.output_tensors[0]
    spatial_inputs = [g for g in inputs if g is not None]
    if not _is_spatial(output) or isinstance(
        layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
    ):
        return None  # vectors, global pooling (also squeeze-and-excitation branches)
    if not spatial_inputs:
        return None  # a map made from a vector (the Reshape of a squeeze-and-excitation branch)
    geometry = spatial_inputs[0] if len(spatial_inputs) == 1 else _union(spatial_inputs)
    lengths = node.input_tensors[0].shape[1:3]
    name = type(layer).__name__
    if isinstance(layer, keras.Model):  # a nested functional model: its own field, composed
        return _compose(geometry, _output_geometry(layer, layer.outputs[0]))
    if "Transpose" in name or isinstance(layer, keras.layers.UpSampling2D):
        raise ValueError(f"receptive fields through upsampling layer {layer.name!r} ({name}) are not handled")
    if hasattr(layer, "kernel_size") and hasattr(layer, "strides"):  # Conv2D, Depthwise, Separable
        dilation = _pair(getattr(layer, "dilation_rate", 1))
        kernel = tuple(d * (k - 1) + 1 for k, d in zip(_pair(layer.kernel_size), dilation))
        return _sliding(geometry, kernel, _pair(layer.strides), layer.padding, lengths)
    if hasattr(layer, "pool_size"):  # MaxPooling2D, AveragePooling2D
        strides = _pair(layer.strides if layer.strides is not None else layer.pool_size)
        return _sliding(geometry, _pair(layer.pool_size), strides, layer.padding, lengths)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        (top, _), (left, _) = layer.padding
        return Geometry(geometry.size, geometry.stride,
                        (geometry.start[0] - top * geometry.stride[0],
                         geometry.start[1] - left * geometry.stride[1]))
    if isinstance(layer, keras.layers.Cropping2D):
        (top, _), (left, _) = layer.cropping
        return Geometry(geometry.size, geometry.stride,
                        (geometry.start[0] + top * geometry.stride[0],
                         geometry.start[1] + left * geometry.stride[1]))
    # Any other layer must keep the spatial size (activations, BN, Add, Concatenate, Multiply, ...).
    for tensor in node.input_tensors:
        if _is_spatial(tensor) and tensor.shape[1:3] != output.shape[1:3] and tensor.shape[1] != 1:
            raise ValueError(
                f"cannot compute a receptive field through layer {layer.name!r} ({name}): it changes "
                f"the spatial size {tuple(tensor.shape[1:3])} -> {tuple(output.shape[1:3])}"
            )
    return geometry


def _output_geometry(model, tensor):
    """Geometry of a symbolic tensor of `model`'s graph, relative to the model's input."""
    geometries = {id(t): Geometry((1, 1), (1, 1), (0.0, 0.0)) for t in model.inputs}
    stack = [tensor]
    while stack:  # iterative post-order walk (ResNet-152 is too deep for recursion)
        current = stack[-1]
        if id(current) in geometries:
            stack.pop()
            continue
        layer, node = _producer(current)
        if isinstance(layer, keras.layers.InputLayer):  # the graph is wrong, not an argument's type
            raise ValueError(f"tensor {current.name!r} does not come from the model's input")  # noqa: TRY004
        missing = [t for t in node.input_tensors if id(t) not in geometries]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        inputs = [geometries[id(t)] for t in node.input_tensors]
        geometry = _layer_geometry(layer, node, inputs)
        for output in node.output_tensors:
            geometries[id(output)] = geometry
    return geometries[id(tensor)]


def receptive_field_geometry(model, layer_name):
    """Geometry(size, stride, start) of `layer_name`'s units, each a (height, width) pair.

    size: the theoretical receptive field, r_l = r_{l-1} + (k_l - 1) * j_{l-1} (with dilation,
    k_l = d (k - 1) + 1); stride: j_l = j_{l-1} * s_l (Araujo et al. 2019, eq. 1-2); start: the input
    coordinate of the centre of unit (0, 0), moved by padding and by each layer's
    ((k - 1) / 2 - padding before) * j_{l-1}. Unit (i, j) is centred on
    (start_h + i * stride_h, start_w + j * stride_w). Branches are merged by taking the union of their
    fields. Branches through global pooling (squeeze-and-excitation) are not counted: they only
    rescale channels from a summary of the whole image, strictly a field as large as the image.
    """
    _check_model(model)
    geometry = _output_geometry(model, _layer_output(model, layer_name))
    if geometry is None:
        raise ValueError(
            f"layer_name {layer_name!r} must have a [batch, h, w, c] output to have a receptive field"
        )
    return geometry


def receptive_field(model, layer_name):
    """(size, stride) in input pixels of one unit of `layer_name` (ints; (h, w) pairs if not square).

    VGG-16's block5_pool gives (212, 32) and ResNet-50's last block (483, 32), the values of
    Araujo et al. 2019 (Table 1). See `receptive_field_geometry` for the formula.
    """
    geometry = receptive_field_geometry(model, layer_name)
    size = geometry.size[0] if geometry.size[0] == geometry.size[1] else geometry.size
    stride = geometry.stride[0] if geometry.stride[0] == geometry.stride[1] else geometry.stride
    return size, stride


def receptive_field_box(geometry, row, col):
    """Inclusive pixel box (top, left, bottom, right) seen by unit (row, col); may leave the image.

    The box is the theoretical field: where it leaves the image the unit sees padding, and a
    "valid" strided layer that drops the last row or column of its input leaves those pixels
    inside the box but unseen.
    """
    top = geometry.start[0] + row * geometry.stride[0] - (geometry.size[0] - 1) / 2.0
    left = geometry.start[1] + col * geometry.stride[1] - (geometry.size[1] - 1) / 2.0
    top, left = math.floor(top + 1e-6), math.floor(left + 1e-6)
    return top, left, top + geometry.size[0] - 1, left + geometry.size[1] - 1


def _crop(image, box, fill_value):
    """image[top:bottom+1, left:right+1] with `fill_value` where the box leaves the image."""
    top, left, bottom, right = box
    height, width = image.shape[:2]
    patch = np.full((bottom - top + 1, right - left + 1, image.shape[2]), fill_value, image.dtype)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(bottom, height - 1), min(right, width - 1)
    if y0 <= y1 and x0 <= x1:
        patch[y0 - top : y1 - top + 1, x0 - left : x1 - left + 1] = image[y0 : y1 + 1, x0 : x1 + 1]
    return patch


def top_activating_patches(model, images, layer_name, channel, count=9, one_per_image=True,
                           fill_value=0.5, batch_size=64):
    """The image patches where channel `channel` of `layer_name` fires most.

    For every unit (image, row, col) of the channel's map, its activation; the `count` largest
    (at most one per image with `one_per_image`, so one image does not fill the grid) are cut out
    of their images with the unit's receptive field (`receptive_field_geometry`), padded with
    `fill_value` where the field leaves the image. A field larger than the image (deep layers of
    big networks) is capped at the whole image around the unit.

    Returns a dict: patches [count, h, w, C], image_indices [count], positions [count, 2] (row, col
    in the layer's map), boxes [count, 4] inclusive pixel boxes (top, left, bottom, right),
    activations [count].
    """
    images = _as_images(images, model)
    maps = activation_maps(model, images, layer_name, batch_size)
    if maps.ndim != 4:
        raise ValueError(f"layer_name {layer_name!r} must have a [batch, h, w, c] output, got {maps.shape}")
    if not 0 <= int(channel) < maps.shape[-1]:
        raise ValueError(f"channel must be in [0, {maps.shape[-1]}), got {channel}")
    geometry = receptive_field_geometry(model, layer_name)
    if not math.isfinite(geometry.size[0]) or not math.isfinite(geometry.size[1]):
        raise ValueError(f"layer_name {layer_name!r} sees the whole image; choose an earlier layer")
    height, width = images.shape[1:3]
    capped = Geometry(
        (min(geometry.size[0], 2 * height - 1), min(geometry.size[1], 2 * width - 1)),
        geometry.stride, geometry.start,
    )
    values = maps[..., int(channel)]  # [N, h, w]
    flat = values.reshape(len(values), -1)
    if one_per_image:
        best_position = flat.argmax(axis=1)
        candidates = [(flat[n, p], n, p) for n, p in enumerate(best_position)]
    else:
        candidates = [(flat[n, p], n, p) for n in range(len(flat)) for p in range(flat.shape[1])]
    candidates.sort(key=lambda item: (-item[0], item[1], item[2]))
    candidates = candidates[: int(count)]
    patches, indices, positions, boxes, activations = [], [], [], [], []
    for value, index, position in candidates:
        row, col = divmod(int(position), values.shape[2])
        box = receptive_field_box(capped, row, col)
        patches.append(_crop(images[index], box, fill_value))
        indices.append(index)
        positions.append((row, col))
        boxes.append(box)
        activations.append(value)
    channels = images.shape[-1]
    return {
        "patches": np.stack(patches) if patches else np.zeros((0, 1, 1, channels), np.float32),
        "image_indices": np.asarray(indices, np.int64),
        "positions": np.asarray(positions, np.int64).reshape(-1, 2),
        "boxes": np.asarray(boxes, np.int64).reshape(-1, 4),
        "activations": np.asarray(activations, np.float32),
    }


# --------------------------------------------------------------------------------------------------
# Class visualisation by gradient ascent
# --------------------------------------------------------------------------------------------------


def gaussian_blur(images, sigma):
    """Blur [batch, H, W, C] with a Gaussian of `sigma` pixels (reflected borders, so no dark rim)."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel_1d = np.exp(-0.5 * (x / sigma) ** 2)
    kernel_1d /= kernel_1d.sum()
    channels = images.shape[-1]
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.constant(np.tile(kernel_1d[:, None, None, None], (1, 1, channels, 1)))
    cols = tf.constant(np.tile(kernel_1d[None, :, None, None], (1, 1, channels, 1)))
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")


def class_visualization(model, class_index, steps=200, step_size=0.05, l2_decay=0.01, jitter=2,
                        blur_every=4, blur_sigma=0.5, image_shape=None, value_range=(0.0, 1.0),
                        seed=0):
    """An input image that maximises one class's pre-softmax score: [H, W, C].

    Gradient ascent from a grey image with a little noise (Simonyan et al. 2014, sec. 2), with the
    three regularisers that keep the picture readable (Yosinski et al. 2015, sec. 3):
      - L2 decay: after each step the image is pulled towards grey by a factor (1 - l2_decay), the
        L2 penalty of Simonyan et al.'s objective S_c(I) - lambda ||I||^2 taken as weight decay;
      - jitter: the image is shifted by up to `jitter` pixels (a random roll) before each gradient
        and shifted back after, so the result cannot rely on exact pixel positions;
      - blur: every `blur_every` steps a Gaussian blur of `blur_sigma` pixels removes the high
        frequencies that raise the score without looking like anything (0 = off).
    Each step moves the image by `step_size` times the value range along the gradient divided by
    its mean absolute value, and clips it to `value_range` (the model's input range: (0, 1) for the
    zoo, e.g. (-1, 1) or (0, 255) for inputs preprocessed outside the model).
    """
    network = _score_network(model)
    class_index = int(_class_indices(class_index, 1, network.num_classes)[0])
    if image_shape is None:
        image_shape = tuple(model.inputs[0].shape[1:])
    if len(image_shape) != 3 or any(d is None for d in image_shape):
        raise ValueError(f"image_shape must be (height, width, channels) for this model, got {image_shape!r}")
    if int(steps) < 0 or step_size <= 0 or not 0 <= l2_decay < 1 or jitter < 0 or blur_sigma < 0:
        raise ValueError(
            "need steps >= 0, step_size > 0, 0 <= l2_decay < 1, jitter >= 0, blur_sigma >= 0; got "
            f"{steps}, {step_size}, {l2_decay}, {jitter}, {blur_sigma}"
        )
    low, high = (float(v) for v in value_range)
    middle, scale = 0.5 * (low + high), high - low
    rng = np.random.default_rng(seed)
    image = middle + 0.02 * scale * rng.standard_normal((1,) + tuple(image_shape))
    image = tf.Variable(np.clip(image, low, high).astype(np.float32))

    @tf.function
    def ascent_step(shift):
        shifted = tf.roll(image, shift, axis=[1, 2])
        with tf.GradientTape() as tape:
            tape.watch(shifted)
            score = network(shifted)[1][0, class_index]
        gradient = tf.roll(tape.gradient(score, shifted), -shift, axis=[1, 2])
        gradient = gradient / (tf.reduce_mean(tf.abs(gradient)) + 1e-12)
        updated = image + step_size * scale * gradient
        image.assign(middle + (1.0 - l2_decay) * (updated - middle))

    ascent_step = _quietly(ascent_step)
    for step in range(int(steps)):
        ascent_step(tf.constant(rng.integers(-jitter, jitter + 1, size=2), tf.int32))
        if blur_every and blur_sigma > 0 and step % int(blur_every) == 0:
            image.assign(gaussian_blur(image, blur_sigma))
        image.assign(tf.clip_by_value(image, low, high))
    return image.numpy()[0]


# --------------------------------------------------------------------------------------------------
# Explaining one decision
# --------------------------------------------------------------------------------------------------


def occlusion_map(model, images, class_index=None, patch_size=8, stride=4, fill_value=0.5,
                  batch_size=128):
    """How much the class probability drops when a grey patch hides each pixel: [batch, H, W].

    A `patch_size` square of `fill_value` slides over the image with `stride` (the last row and
    column of positions are moved in to touch the border, so every pixel is covered); for each
    position the drop p_c(image) - p_c(occluded image) is recorded, and a pixel's value is the mean
    drop over the positions whose patch covers it (Zeiler & Fergus 2014, sec. 4.2 and Fig. 7 plot
    the probability at the patch centre; averaging gives a map at the image's resolution). Negative
    values mean hiding the pixel made the class more likely. Costs (number of positions) forward
    passes per image.
    """
    network = _score_network(model)
    images = _as_images(images, model)
    classes = _class_indices(class_index, len(images), network.num_classes, network, images)
    height, width = images.shape[1:3]
    if not 1 <= int(patch_size) <= min(height, width) or int(stride) < 1:
        raise ValueError(f"need 1 <= patch_size <= {min(height, width)} and stride >= 1, got "
                         f"{patch_size}, {stride}")

    def starts(length):
        positions = list(range(0, length - patch_size + 1, stride))
        if positions[-1] != length - patch_size:
            positions.append(length - patch_size)
        return positions

    masks = []
    for top in starts(height):
        for left in starts(width):
            mask = np.zeros((height, width, 1), np.float32)
            mask[top : top + patch_size, left : left + patch_size] = 1.0
            masks.append(mask)
    masks = np.stack(masks)  # [P, H, W, 1]
    coverage = masks.sum(axis=0)[..., 0]  # [H, W], >= 1 everywhere

    probabilities = network.function("probabilities", _probability_function)
    result = np.zeros((len(images), height, width), np.float32)
    for n, image in enumerate(images):
        base = float(probabilities(image[None])[0, classes[n]])
        drops = []
        for s in _chunks(len(masks), batch_size):
            occluded = image[None] * (1.0 - masks[s]) + fill_value * masks[s]
            drops.append(base - np.asarray(probabilities(occluded))[:, classes[n]])
        drops = np.concatenate(drops)  # [P]
        result[n] = np.tensordot(drops, masks[..., 0], axes=1) / coverage
    return result


def _probability_function(network):
    return tf.function(lambda batch: network.probabilities(network(batch)[1]), reduce_retracing=True)


def _gradient_function(network):
    @tf.function(reduce_retracing=True)
    def gradients(images, classes):
        with tf.GradientTape() as tape:
            tape.watch(images)
            scores = network(images)[1]
            score = tf.reduce_sum(tf.gather(scores, classes, batch_dims=1))
        return tape.gradient(score, images)

    return gradients


def input_gradients(model, images, class_index=None, batch_size=32):
    """d score_c / d image for each image: [batch, H, W, C] (score = pre-softmax, see above).

    Sums over the batch are safe: image i's score depends only on image i (inference mode).
    """
    network = _score_network(model)
    images = _as_images(images, model)
    classes = _class_indices(class_index, len(images), network.num_classes, network, images)
    if len(images) == 0:
        return np.zeros_like(images)
    gradients = network.function("gradients", _gradient_function)
    return np.concatenate(
        [np.asarray(gradients(tf.constant(images[s]), tf.constant(classes[s])))
         for s in _chunks(len(images), batch_size)]
    )


def gradient_heatmap(gradients):
    """[batch, H, W, C] gradients -> [batch, H, W] max over channels of |gradient|."""
    return np.abs(np.asarray(gradients)).max(axis=-1)


def saliency_map(model, images, class_index=None, batch_size=32):
    """Vanilla saliency (Simonyan et al. 2014, sec. 3.1): max_c |d score / d pixel|, [batch, H, W]."""
    return gradient_heatmap(input_gradients(model, images, class_index, batch_size))


@tf.custom_gradient
def guided_relu(x):
    """ReLU forward; backward passes a gradient only where the input AND the gradient are positive.

    relu'(x) * g becomes [x > 0] [g > 0] g: Springenberg et al. 2015 (sec. 3.4, Fig. 1) combine the
    backward pass of backpropagation ([x > 0]) with that of the "deconvnet" ([g > 0]).
    """

    def gradient(upstream):
        return upstream * tf.cast(x > 0, upstream.dtype) * tf.cast(upstream > 0, upstream.dtype)

    return tf.nn.relu(x), gradient


@tf.custom_gradient
def _positive_gradient_gate(x):
    """Identity forward; backward keeps only the positive part of the incoming gradient."""

    def gradient(upstream):
        return tf.nn.relu(upstream)

    return tf.identity(x), gradient


@keras.saving.register_keras_serializable(package=PACKAGE)
class GuidedBackpropGate(keras.layers.Layer):
    """Identity in the forward pass; passes back only positive gradients. [any shape] -> same shape.

    Put after a ReLU (a ReLU/Activation layer or a Dense/Conv with activation="relu"): the ReLU's own
    backward pass gives [x > 0] g and the gate adds [g > 0], so ReLU + gate = `guided_relu`
    (Springenberg et al. 2015, sec. 3.4). This works for every way Keras writes a ReLU (also ReLU6
    and ReLUs inside Dense/Conv layers) without copying a layer's weights.
    """

    def call(self, inputs):
        return _positive_gradient_gate(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


def _applies_relu(layer):
    if isinstance(layer, keras.layers.ReLU):
        return True
    return _activation_name(layer) in ("relu", "relu6")


def guided_model(model):
    """A model sharing `model`'s layers and weights, with a `GuidedBackpropGate` after every ReLU.

    Its forward pass equals `model`'s; its gradients are guided backpropagation's. Built with
    keras.models.clone_model(clone_function=identity, call_function=...) so no weight is copied.
    """
    _check_model(model)
    if model in _GUIDED_MODELS:
        return _GUIDED_MODELS[model]

    def call_function(layer, *args, **kwargs):
        output = layer(*args, **kwargs)
        if _applies_relu(layer):
            output = GuidedBackpropGate(name=f"{layer.name}_guided_gate")(output)
        return output

    guided = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call_function)
    _GUIDED_MODELS[model] = guided
    return guided


def guided_backprop(model, images, class_index=None, batch_size=32):
    """Guided backpropagation (Springenberg et al. 2015): the guided gradient image [batch, H, W, C].

    Shown as an image it looks like the object's edges. `gradient_heatmap` reduces it to
    [batch, H, W]. On a network without ReLUs it equals `input_gradients`.
    """
    return input_gradients(guided_model(model), images, class_index, batch_size)


def _normalize_maps(maps):
    """ReLU, then divide each map by its maximum (an all-zero map stays zero)."""
    maps = np.maximum(np.asarray(maps, np.float32), 0.0)
    peak = maps.reshape(len(maps), -1).max(axis=1, initial=0.0)
    return maps / np.maximum(peak, 1e-12)[:, None, None]


def _cam_parts(model):
    """(feature-map tensor, classifier Dense layer) of a model ending in GAP + one dense layer."""
    head, node = _output_head(model)
    if isinstance(head, (keras.layers.Softmax, keras.layers.Activation)):
        head, node = _producer(node.input_tensors[0])
    if not isinstance(head, keras.layers.Dense):  # the architecture is the bad value
        raise ValueError(  # noqa: TRY004
            "class_activation_map needs a model that ends in global average pooling + one Dense "
            f"layer, the last layer is {type(head).__name__}; use grad_cam for other models"
        )
    layer, pooling_node = _producer(node.input_tensors[0])
    while isinstance(layer, keras.layers.Dropout):
        layer, pooling_node = _producer(pooling_node.input_tensors[0])
    if not isinstance(layer, keras.layers.GlobalAveragePooling2D):
        raise ValueError(  # noqa: TRY004
            "class_activation_map needs global average pooling right before the last Dense layer, "
            f"found {type(layer).__name__} {layer.name!r}; use grad_cam for other models"
        )
    return pooling_node.input_tensors[0], head


def class_activation_map(model, images, class_index=None, normalize=True, batch_size=64):
    """CAM (Zhou et al. 2016, eq. 2): M_c(x, y) = sum_k w_k^c f_k(x, y), [batch, h, w].

    f_k are the maps that enter the global average pooling and w^c the last Dense layer's weights
    of class c, so the class score is the spatial mean of M_c plus the bias. The map has the
    resolution of f (use `upsample`). With `normalize` it is ReLU'd and divided by its maximum;
    without, it is the signed sum.
    """
    _check_model(model)
    feature_tensor, dense = _cam_parts(model)
    images = _as_images(images, model)
    classes = _class_indices(class_index, len(images), int(dense.kernel.shape[-1]),
                             _score_network(model) if class_index is None else None, images)
    feature_model = keras.Model(model.inputs[0], feature_tensor)
    kernel = np.asarray(dense.kernel)  # [channels, classes]
    maps = []
    for s in _chunks(len(images), batch_size):
        features = np.asarray(feature_model(images[s], training=False))  # [b, h, w, k]
        maps.append(np.einsum("bhwk,kb->bhw", features, kernel[:, classes[s]]))
    if not maps:
        return np.zeros((0,) + tuple(feature_tensor.shape[1:3]), np.float32)
    maps = np.concatenate(maps).astype(np.float32)
    return _normalize_maps(maps) if normalize else maps


def _grad_cam_function(network):
    @tf.function(reduce_retracing=True)
    def weighted_maps(batch, batch_classes):
        with tf.GradientTape() as tape:
            (features,), scores = network(batch)
            score = tf.reduce_sum(tf.gather(scores, batch_classes, batch_dims=1))
        gradients = tape.gradient(score, features)  # [b, h, w, k]
        alphas = tf.reduce_mean(gradients, axis=[1, 2])  # alpha_k^c, [b, k] (eq. 1)
        return tf.nn.relu(tf.einsum("bhwk,bk->bhw", features, alphas))  # eq. 2

    return weighted_maps


def grad_cam(model, images, class_index=None, layer_name=None, normalize=True, batch_size=32):
    """Grad-CAM (Selvaraju et al. 2017, eq. 1-2) at `layer_name`: [batch, h, w].

    alpha_k^c = mean over (i, j) of d y^c / d A^k_ij, with y^c the pre-softmax score;
    L^c = ReLU(sum_k alpha_k^c A^k). With `normalize` the map is divided by its maximum.
    `layer_name` defaults to `last_conv_layer_name(model)`. At that layer of a GAP + dense model,
    d y^c / d A^k_ij = w_k^c / (h w), so Grad-CAM = ReLU(CAM) / (h w) (Selvaraju et al., sec. 3.1).
    """
    layer_name = layer_name or last_conv_layer_name(model)
    network = _score_network(model, [layer_name])
    images = _as_images(images, model)
    classes = _class_indices(class_index, len(images), network.num_classes, network, images)
    feature_shape = network.model.outputs[0].shape
    if len(feature_shape) != 4:
        raise ValueError(f"layer_name {layer_name!r} must have a [batch, h, w, c] output, got {feature_shape}")

    weighted_maps = network.function("grad_cam", _grad_cam_function)
    maps = [np.asarray(weighted_maps(tf.constant(images[s]), tf.constant(classes[s])))
            for s in _chunks(len(images), batch_size)]
    if not maps:
        return np.zeros((0,) + tuple(d or 0 for d in feature_shape[1:3]), np.float32)
    maps = np.concatenate(maps).astype(np.float32)
    return _normalize_maps(maps) if normalize else maps


def upsample(heatmaps, size, method="bilinear"):
    """Resize heatmaps [batch, h, w] to `size` (height, width) -> [batch, height, width].

    Bilinear by default (tf.image.resize, half-pixel centres), as CAM and Grad-CAM are drawn.
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    if heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must be [batch, h, w], got shape {heatmaps.shape}")
    size = tuple(int(s) for s in _pair(size))
    if heatmaps.shape[1:] == size:
        return heatmaps
    if len(heatmaps) == 0:
        return np.zeros((0,) + size, np.float32)
    return tf.image.resize(heatmaps[..., None], size, method=method).numpy()[..., 0]


def explain(method, model, images, class_index=None, layer_name=None, normalize=True, **options):
    """One heatmap per image at the image's resolution, [batch, H, W], for any method of METHODS.

    grad_cam and cam are upsampled bilinearly; saliency and guided_backprop are max_c |gradient|;
    occlusion's negative values (hiding made the class more likely) are set to 0. With `normalize`
    each map is divided by its maximum. `options` go to the method (e.g. patch_size for occlusion).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    images = _as_images(images, model)
    size = images.shape[1:3]
    if method == "grad_cam":
        maps = upsample(grad_cam(model, images, class_index, layer_name, **options), size)
    elif method == "cam":
        maps = upsample(class_activation_map(model, images, class_index, **options), size)
    elif method == "occlusion":
        maps = np.maximum(occlusion_map(model, images, class_index, **options), 0.0)
    elif method == "saliency":
        maps = saliency_map(model, images, class_index, **options)
    else:
        maps = gradient_heatmap(guided_backprop(model, images, class_index, **options))
    return _normalize_maps(maps) if normalize else np.asarray(maps, np.float32)


# --------------------------------------------------------------------------------------------------
# Scoring explanations on ground truth: single-object data, the pointing game, mass in box
# --------------------------------------------------------------------------------------------------

def single_object_dataset(num_examples, split="train", seed=0, image_size=64):
    """`num_examples` scenes with exactly one shape at a random position and size: a dict of arrays.

    Drawn by `common.synthetic.make_scene(..., min_objects=1, max_objects=1, empty_fraction=0)`: the
    shape's radius is 8 to 22 % of the side and its centre anywhere in the middle 76 % of the image,
    on the textured background with distractor lines. A scene where no placement was found (rare:
    the shape fell mostly outside the image) is skipped and the next index is used, so the result
    is still a pure function of (seed, split, image_size, num_examples).

    Returns: images float32 [N, S, S, 3] in [0, 1], labels int32 [N], boxes float32 [N, 4]
    (normalized [ymin, xmin, ymax, xmax] of the visible pixels), indices int64 [N] (the scene index).
    """
    if int(num_examples) < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    images, labels, boxes, indices = [], [], [], []
    index = 0
    while len(images) < num_examples:
        scene = synthetic.make_scene(index, split, seed, image_size, max_objects=1, min_objects=1,
                                     empty_fraction=0.0)
        if len(scene["classes"]) == 1:
            images.append(scene["image"])
            labels.append(scene["classes"][0])
            boxes.append(scene["boxes"][0])
            indices.append(index)
        index += 1
    size = int(image_size)
    return {
        "images": np.stack(images) if images else np.zeros((0, size, size, 3), np.float32),
        "labels": np.asarray(labels, np.int32),
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "indices": np.asarray(indices, np.int64),
    }


# --------------------------------------------------------------------------------------------------
# The scores
# --------------------------------------------------------------------------------------------------

def _check_maps_and_boxes(heatmaps, boxes):
    heatmaps = np.asarray(heatmaps, np.float64)
    boxes = np.asarray(boxes, np.float64)
    if heatmaps.ndim != 3 or boxes.shape != (len(heatmaps), 4):
        raise ValueError(f"heatmaps must be [N, H, W] and boxes [N, 4], got {heatmaps.shape} and {boxes.shape}")
    return heatmaps, boxes


def peak_points(heatmaps):
    """(row, col) of each heatmap's maximum, [N, 2] (the first one in row-major order on ties)."""
    heatmaps = np.asarray(heatmaps)
    flat = heatmaps.reshape(len(heatmaps), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, heatmaps.shape[1:]), axis=1).reshape(-1, 2)


def pointing_hits(heatmaps, boxes, tolerance=0.0):
    """Pointing game (Zhang et al. 2016): bool [N], True when the maximum is in (or within
    `tolerance` pixels of) the box. Pixel (i, j) has its centre at ((i + 0.5) / H, (j + 0.5) / W) in
    the boxes' normalized coordinates."""
    heatmaps, boxes = _check_maps_and_boxes(heatmaps, boxes)
    height, width = heatmaps.shape[1:]
    points = peak_points(heatmaps) + 0.5  # pixel centres, in pixels
    return points_in_boxes(points, boxes, (height, width), tolerance)


def points_in_boxes(points, boxes, image_shape, tolerance=0.0):
    """bool [N]: point (y, x) in pixels (continuous) within `tolerance` pixels of the normalized box."""
    height, width = image_shape
    boxes = np.asarray(boxes, np.float64) * [height, width, height, width]
    points = np.asarray(points, np.float64).reshape(-1, 2)
    dy = np.maximum(np.maximum(boxes[:, 0] - points[:, 0], points[:, 0] - boxes[:, 2]), 0.0)
    dx = np.maximum(np.maximum(boxes[:, 1] - points[:, 1], points[:, 1] - boxes[:, 3]), 0.0)
    return np.hypot(dy, dx) <= tolerance


def box_masks(boxes, image_shape):
    """bool [N, H, W]: the pixels whose centre lies inside each normalized box."""
    height, width = image_shape
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    inside_rows = (rows[None] >= boxes[:, :1]) & (rows[None] <= boxes[:, 2:3])  # [N, H]
    inside_cols = (cols[None] >= boxes[:, 1:2]) & (cols[None] <= boxes[:, 3:4])  # [N, W]
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def mass_in_box(heatmaps, boxes):
    """float [N]: sum of the heatmap inside the box / sum over the image (negative values set to 0).

    An all-zero heatmap says nothing, so it scores like a uniform one: the box's share of the image.
    """
    heatmaps, boxes = _check_maps_and_boxes(heatmaps, boxes)
    heatmaps = np.maximum(heatmaps, 0.0)
    inside = box_masks(boxes, heatmaps.shape[1:])
    total = heatmaps.sum(axis=(1, 2))
    uniform = inside.mean(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = (heatmaps * inside).sum(axis=(1, 2)) / total
    return np.where(total > 0, share, uniform)


def centre_heatmaps(count, image_shape, sigma_fraction=0.25):
    """The fixed baseline: a centred Gaussian (sigma = `sigma_fraction` of the side), [count, H, W].

    Its maximum is the centre pixel(s), so its pointing score is the fixed centre-point baseline.
    """
    height, width = image_shape
    rows = (np.arange(height) + 0.5 - height / 2) / (sigma_fraction * height)
    cols = (np.arange(width) + 0.5 - width / 2) / (sigma_fraction * width)
    gaussian = np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2)).astype(np.float32)
    return np.broadcast_to(gaussian, (count, height, width))


def score_heatmaps(heatmaps, boxes, tolerance=0.0):
    """{"pointing": hit rate, "mass_in_box": mean share} of one method's heatmaps [N, H, W]."""
    return {"pointing": float(np.mean(pointing_hits(heatmaps, boxes, tolerance))) if len(boxes) else float("nan"),
            "mass_in_box": float(np.mean(mass_in_box(heatmaps, boxes))) if len(boxes) else float("nan")}




def format_scores(metrics):
    """The pointing-game table of a metrics dict as text (one row per method, the baselines last).

    Reads the keys score_explanations.py writes: pointing_<method>, mass_in_box_<method>, and if
    present sanity_spearman_<method> and seconds_<method>; pointing_center, mass_in_box_center,
    mass_in_box_uniform.
    """

    def cell(key, width):
        value = metrics.get(key)
        return f"{'' if value is None else f'{value:.3f}':>{width}}"

    lines = [f"{'method':<18}{'pointing':>10}{'mass in box':>13}{'sanity rank corr.':>19}{'seconds':>9}"]
    for method in METHODS:
        seconds = metrics.get(f"seconds_{method}")
        lines.append(f"{method:<18}{cell(f'pointing_{method}', 10)}{cell(f'mass_in_box_{method}', 13)}"
                     f"{cell(f'sanity_spearman_{method}', 19)}{'' if seconds is None else f'{seconds:.1f}':>9}")
    lines.append(f"{'centre baseline':<18}{cell('pointing_center', 10)}{cell('mass_in_box_center', 13)}")
    lines.append(f"{'uniform map':<18}{'':>10}{cell('mass_in_box_uniform', 13)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The randomisation sanity check
# --------------------------------------------------------------------------------------------------


def randomized_copy(model, layer_names=None, seed=0):
    """A copy of `model` whose layers `layer_names` (None = all) get freshly initialised weights.

    Made with keras.models.clone_model, which rebuilds every layer from its config with its own
    initialisers; the layers not listed get the original weights back. Adebayo et al. 2018 (sec. 3.1)
    re-initialise all layers ("full") or the top k ("cascading"). `seed` seeds Keras' global
    random generator (keras.utils.set_random_seed) so the copy is repeatable.
    """
    _check_model(model)
    names = [layer.name for layer in model.layers]
    if layer_names is not None:
        unknown = [name for name in layer_names if name not in names]
        if unknown:
            raise ValueError(f"layer_names must be layers of the model, unknown: {unknown}")
    keras.utils.set_random_seed(int(seed))
    copy = keras.models.clone_model(model)
    for layer in model.layers:
        if layer_names is not None and layer.name not in layer_names and layer.weights:
            copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy


def rank_correlation(first, second):
    """Spearman rank correlation of two maps (any shape, flattened); 0 if either is constant."""
    from scipy.stats import rankdata

    a = rankdata(np.asarray(first, np.float64).ravel())
    b = rankdata(np.asarray(second, np.float64).ravel())
    if a.size != b.size:
        raise ValueError(f"maps must have the same size, got {np.shape(first)} and {np.shape(second)}")
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def sanity_check(model, images, class_index, methods=METHODS, randomized_model=None, seed=0,
                 method_options=None):
    """Model-randomisation test (Adebayo et al. 2018, sec. 3.1): {method: mean rank correlation}.

    For each method, the mean over images of the Spearman rank correlation between its heatmap
    for the trained model and for `randomized_model` (default: `randomized_copy(model, seed=seed)`,
    every layer re-initialised), both from `explain`. A method that explains the model gives maps
    that change, a correlation near 0; a value near 1 means the map shows the image more than the
    model (Adebayo et al. find this for guided backpropagation). `method_options` maps a method
    name to its options (e.g. {"occlusion": {"patch_size": 8}}).
    """
    images = _as_images(images, model)
    randomized_model = randomized_model or randomized_copy(model, seed=seed)
    method_options = method_options or {}
    results = {}
    for method in methods:
        options = method_options.get(method, {})
        trained = explain(method, model, images, class_index, **options)
        random = explain(method, randomized_model, images, class_index, **options)
        correlations = [rank_correlation(t, r) for t, r in zip(trained, random)]
        results[method] = float(np.mean(correlations)) if correlations else float("nan")
    return results
